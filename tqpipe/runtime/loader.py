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
from mlx.utils import tree_map_with_path, tree_unflatten
from mlx_lm.tokenizer_utils import TokenizerWrapper
from mlx_lm.utils import load_tokenizer
from mlx_lm.utils import _get_classes, load_model

from tqpipe import FORMAT_VERSION
from mlx_lm.models.switch_layers import SwitchLinear

from tqpipe.runtime.layers import TQLinear, TQSwitchLinear, share_rotations


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


def swap_in_quantized(model: nn.Module, spec: dict[str, Any]) -> None:
    """Replace the modules the spec names with quantized layers; modules that read one input
    (same ``rotation`` key) rotate it once between them."""
    layers = quantized_layers(spec, model)
    model.update_modules(tree_unflatten(layers))
    keys = {path: m["rotation"] for path, m in spec["modules"].items() if "rotation" in m}
    share_rotations(dict(layers), keys)


def _checked_spec(config: dict) -> dict:
    spec = config.get("tqpipe")
    if spec is None:
        raise ValueError("config.json has no 'tqpipe' section: not a tqpipe packed model")
    if spec.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"packed format version {spec.get('format_version')} is not {FORMAT_VERSION}, "
            "the one this tqpipe reads; repack the model with this tqpipe version"
        )
    return spec


def _classes_with_tq(config: dict):
    spec = _checked_spec(config)
    model_cls, args_cls = _get_classes(config)

    def build(args):
        model = model_cls(args)
        swap_in_quantized(model, spec)
        return model

    return build, args_cls


MODEL_FILE = "tqpipe_model.py"
MODEL_FILE_SOURCE = '''"""Lets stock mlx-lm load this tqpipe-packed model: `mlx_lm.load(path, trust_remote_code=True)`,
`mlx_lm.generate --model path --trust-remote-code`, `mlx_lm.server --model path --trust-remote-code`.
Needs tqpipe installed (`pip install -e .` in its repository); written by tqpipe's pack stage."""
from pathlib import Path

from tqpipe.runtime.loader import remote_code_classes

Model, ModelArgs = remote_code_classes(Path(__file__).with_name("config.json"))
'''


def remote_code_classes(config_path: str | Path):
    """``(Model, ModelArgs)`` for mlx-lm's ``model_file`` hook: the architecture's own classes,
    with the quantized layers swapped in when the model is built."""
    import json

    config = json.loads(Path(config_path).read_text())
    spec = _checked_spec(config)
    base_cls, args_cls = _get_classes(config)

    class Model(base_cls):
        def __init__(self, args):
            super().__init__(args)
            swap_in_quantized(self, spec)

    Model.__name__ = Model.__qualname__ = f"TQ{base_cls.__name__}"
    return Model, args_cls


def load(
    path: str | Path, *, lazy: bool = False, dtype: mx.Dtype | None = None,
) -> tuple[nn.Module, TokenizerWrapper]:
    """Load a packed model folder and its tokenizer.

    ``dtype`` casts the kept floating-point tensors, e.g. ``mx.float32`` on a CPU,
    where float16 arithmetic is emulated and slow. Scales stay float16: the kernels
    read them as stored, and the memory stays that of the packed files.
    """
    path = Path(path)
    # model_file is for stock mlx-lm; tqpipe builds the classes itself, running no file from the folder
    model, config = load_model(path, lazy=lazy, get_model_classes=_classes_with_tq, model_config={"model_file": None})
    scales = {f"{p}.scales" for p, m in model.named_modules() if isinstance(m, (TQLinear, TQSwitchLinear))}
    if dtype is not None:  # cast the floating tensors, except the quantized layers' scales
        model.update(tree_map_with_path(
            lambda path, a: a.astype(dtype) if mx.issubdtype(a.dtype, mx.floating) and path not in scales else a,
            model.parameters()))
    return model, load_tokenizer(path, eos_token_ids=config.get("eos_token_id"))
