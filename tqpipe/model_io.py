"""Reading Hugging Face model folders through mlx-lm's own model classes.

Module paths and tensor names are mlx-lm's (after ``Model.sanitize``), because
that is what the runtime loads. Shapes come from a model built lazily from
``config.json``: no weight is read to plan.
"""

from __future__ import annotations

import glob
import json
import re
from collections.abc import Iterator
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
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


def kept_dtype(model: nn.Module, name: str, dtype: mx.Dtype, kept: str) -> mx.Dtype:
    """The dtype an unquantized tensor is stored in: the recipe's ``kept`` dtype for floating
    tensors the model lets be cast (its ``cast_predicate``: Nemotron-H keeps ``A_log`` as
    stored), else its own. Shared by the plan (bytes) and pack (the cast)."""
    castable = getattr(model, "cast_predicate", None)
    if mx.issubdtype(dtype, mx.floating) and (castable is None or castable(name)):
        return getattr(mx, kept)
    return dtype


# --- the HF checkpoint layout a config describes (undoing mlx-lm's sanitize) ---

_EXPERTS = re.compile(r"^(.*\.mixer)\.switch_mlp\.(fc1|fc2)\.weight$")
_EXPERT_NAMES = {"fc1": "up_proj", "fc2": "down_proj"}


def _mlx_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of the mlx-lm model (lazy: nothing is allocated)."""
    return {k: tuple(v.shape) for k, v in tree_flatten(build_model(config).parameters())}


def _nemotron_h_hf(name: str, shape: tuple[int, ...]) -> Iterator[tuple[str, tuple[int, ...]]]:
    m = _EXPERTS.match(name)
    if m:
        for e in range(shape[0]):
            yield f"{m[1]}.experts.{e}.{_EXPERT_NAMES[m[2]]}.weight", shape[1:]
    elif name.endswith("conv1d.weight"):
        yield name, (shape[0], 1, shape[1])
    else:
        yield name, shape


def _nemotron_h_mtp(config: dict) -> dict[str, tuple[int, ...]]:
    """The MTP block: layers after the ``mtp_hybrid_override_pattern``, plus its own projections.
    Modelled on the released checkpoints' layout; mlx-lm drops every ``mtp.*`` tensor."""
    pattern = config.get("mtp_hybrid_override_pattern")
    if not pattern or not config.get("num_nextn_predict_layers"):
        return {}
    sub = dict(config, num_hidden_layers=len(pattern), hybrid_override_pattern=pattern)
    h = config["hidden_size"]
    shapes = {"mtp.enorm.weight": (h,), "mtp.hnorm.weight": (h,), "mtp.eh_proj.weight": (h, 2 * h),
              "mtp.final_layernorm.weight": (h,)}
    for name, shape in _mlx_shapes(sub).items():
        if name.startswith("backbone.layers."):
            for hf, s in _nemotron_h_hf(name, shape):
                shapes["mtp." + hf.removeprefix("backbone.")] = s
    return shapes


def hf_tensor_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor of the HF checkpoint that ``config`` describes, with its shape.

    The mlx-lm model's parameters, renamed back to the original checkpoint's
    layout where mlx-lm's ``sanitize`` changes it. ``nemotron_h``: routed
    experts one per tensor (``mixer.experts.{e}.{up,down}_proj.weight``),
    conv1d as ``[C, 1, K]``, plus the multi-token-prediction block (``mtp.*``),
    which mlx-lm drops on load.
    """
    shapes = _mlx_shapes(config)
    if config["model_type"] != "nemotron_h":
        return shapes
    out: dict[str, tuple[int, ...]] = {}
    for name, shape in shapes.items():
        out.update(_nemotron_h_hf(name, shape))
    return out | _nemotron_h_mtp(config)
