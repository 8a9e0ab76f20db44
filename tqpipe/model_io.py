"""Reading Hugging Face model folders through mlx-lm's own model classes.

Module paths and tensor names are mlx-lm's (after ``Model.sanitize``), because
that is what the runtime loads. Shapes come from a model built lazily from
``config.json``: no weight is read to plan.
"""

from __future__ import annotations

import glob
import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.utils import _get_classes

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
    "tokenizer.model",
)


def read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{folder} has no config.json: is it a Hugging Face model folder?")
    return json.loads(path.read_text())


def build_model(config: dict) -> nn.Module:
    """Instantiate the mlx-lm model for ``config`` (weights stay lazy, unevaluated)."""
    model_cls, args_cls = _get_classes(config)
    return model_cls(args_cls.from_dict(config))


def load_weights(folder: Path, model: nn.Module) -> dict[str, mx.array]:
    """All safetensors tensors of ``folder``, renamed by the model's ``sanitize``."""
    files = sorted(glob.glob(str(folder / "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {folder}")
    weights: dict[str, mx.array] = {}
    for f in files:
        weights.update(mx.load(f))
    return model.sanitize(weights) if hasattr(model, "sanitize") else weights
