"""Load a packed tqpipe folder into its mlx-lm model class.

The packed ``config.json`` has a ``tqpipe`` section naming every quantized
module with its bits, group size, codebook and rotation block. The loader uses
mlx-lm's own ``load_model`` and its ``get_model_classes`` hook to swap those
modules for :class:`TQLinear` (and expert stacks for :class:`TQSwitchLinear`) before the weights are read. No mlx-lm internals
are patched.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten
from mlx_lm.tokenizer_utils import TokenizerWrapper
from mlx_lm.utils import load_tokenizer
from mlx_lm.utils import _get_classes, load_model

from tqpipe import FORMAT_VERSION
from mlx_lm.models.switch_layers import SwitchLinear

from tqpipe.runtime.layers import TQLinear, TQSwitchLinear


def quantized_layers(spec: dict[str, Any], model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The quantized layer for each module the ``tqpipe`` config section names."""
    codebooks = spec["codebooks"]
    modules = dict(model.named_modules())
    layers = []
    for path, m in spec["modules"].items():
        old = modules.get(path)
        q = {"bits": m["bits"], "group_size": m["group_size"], "block": m["block"],
             "levels": codebooks[m["codebook"]], "bias": "bias" in old} if old is not None else {}
        if isinstance(old, nn.Linear):
            out, n = old.weight.shape
            layers.append((path, TQLinear(n, out, **q)))
        elif isinstance(old, SwitchLinear):
            experts, out, n = old.weight.shape
            layers.append((path, TQSwitchLinear(n, out, experts, **q)))
        else:
            raise ValueError(f"packed config names {path!r}, which is not a linear layer of this model")
    return layers


def _classes_with_tq(config: dict):
    spec = config.get("tqpipe")
    if spec is None:
        raise ValueError("config.json has no 'tqpipe' section: not a tqpipe packed model")
    if spec.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"packed format version {spec.get('format_version')} is not {FORMAT_VERSION}, "
            "the one this tqpipe reads; repack the model with this tqpipe version"
        )
    model_cls, args_cls = _get_classes(config)

    def build(args):
        model = model_cls(args)
        model.update_modules(tree_unflatten(quantized_layers(spec, model)))
        return model

    return build, args_cls


def load(
    path: str | Path, *, lazy: bool = False, dtype: mx.Dtype | None = None,
) -> tuple[nn.Module, TokenizerWrapper]:
    """Load a packed model folder and its tokenizer.

    ``dtype`` casts the floating-point parameters (kept tensors and scales), e.g.
    ``mx.float32`` on a CPU, where float16 arithmetic is emulated and slow.
    """
    path = Path(path)
    model, config = load_model(path, lazy=lazy, get_model_classes=_classes_with_tq)
    if dtype is not None:
        model.set_dtype(dtype)
    return model, load_tokenizer(path, eos_token_ids=config.get("eos_token_id"))
