"""Synthetic checkpoints in real Hugging Face naming, for tests and benchmarks.

A random model is described by an mlx-lm config; its tensors are generated
one at a time and streamed into bfloat16 safetensors shards, so a checkpoint
larger than memory can be written. The names are those of the original HF
checkpoint (what ``fetch`` sees), obtained by undoing mlx-lm's ``sanitize``
for the architectures that need it:

- ``nemotron_h``: routed experts stored one per tensor
  (``mixer.experts.{e}.{up,down}_proj.weight``), conv1d as ``[C, 1, K]``, and
  the multi-token-prediction block (``mtp.*``), which mlx-lm drops on load.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten
from tqdm import tqdm

from tqpipe.model_io import build_model
from tqpipe.shards import SHARD_BYTES, ShardWriter

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
    """Every tensor of the HF checkpoint that ``config`` describes, with its shape."""
    shapes = _mlx_shapes(config)
    if config["model_type"] != "nemotron_h":
        return shapes
    out: dict[str, tuple[int, ...]] = {}
    for name, shape in shapes.items():
        out.update(_nemotron_h_hf(name, shape))
    return out | _nemotron_h_mtp(config)


def _random_tensor(name: str, shape: tuple[int, ...], key: mx.array) -> mx.array:
    if name.endswith(("norm.weight", "layernorm.weight")) or re.search(r"\.D$", name):
        return mx.ones(shape, dtype=mx.bfloat16)
    if name.endswith(("A_log", "dt_bias", "bias")):
        return (0.1 * mx.random.normal(shape, key=key)).astype(mx.bfloat16)
    fan_in = shape[-1] if len(shape) > 1 else 1
    return (mx.random.normal(shape, key=key) * fan_in**-0.5).astype(mx.bfloat16)


def write_checkpoint(folder: Path, config: dict, *, seed: int = 0, shard_bytes: int = SHARD_BYTES) -> int:
    """Write ``config.json`` and random bfloat16 shards for ``config`` into ``folder``; returns bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    shapes = hf_tensor_shapes(config)
    total = sum(2 * math.prod(s) for s in shapes.values())
    writer = ShardWriter(folder, shard_bytes=shard_bytes, metadata={"format": "pt"})
    with tqdm(total=total, desc="synthetic checkpoint", unit="B", unit_scale=True) as bar:
        for i, (name, shape) in enumerate(shapes.items()):
            writer.add(name, _random_tensor(name, shape, mx.random.key(seed * 1_000_003 + i)))
            bar.update(2 * math.prod(shape))  # generated lazily; written when its shard fills
        writer.finish()
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return total
