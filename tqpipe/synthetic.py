"""Synthetic checkpoints in real Hugging Face naming, for tests and benchmarks.

A random model is described by an mlx-lm config; its tensors are generated
one at a time and streamed into bfloat16 safetensors shards, so a checkpoint
larger than memory can be written. The names and shapes are those of the
original HF checkpoint (``model_io.hf_tensor_shapes``), what ``fetch`` sees.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import mlx.core as mx
import numpy as np
from tqdm import tqdm

from tqpipe.model_io import hf_tensor_shapes
from tqpipe.shards import SHARD_BYTES, ShardWriter

def _random_tensor(name: str, shape: tuple[int, ...], rng: np.random.Generator,
                   pool: np.ndarray | None) -> mx.array:
    """Norm weights and ``D`` are ones, small vectors ~N(0, 0.1²), matrices ~N(0, 1/fan_in)."""
    if name.endswith(("norm.weight", "layernorm.weight")) or re.search(r"\.D$", name):
        return mx.ones(shape, dtype=mx.bfloat16)
    n = math.prod(shape)
    scale = 0.1 if name.endswith(("A_log", "dt_bias", "bias")) or len(shape) == 1 else shape[-1] ** -0.5
    if pool is None or n < 1 << 16:
        vals = rng.standard_normal(n, dtype=np.float32)
    elif n <= len(pool):
        start = int(rng.integers(0, len(pool) - n + 1))
        vals = pool[start:start + n]
    else:
        vals = np.resize(np.roll(pool, -int(rng.integers(0, len(pool)))), n)
    arr = (mx.array(vals) * scale).astype(mx.bfloat16).reshape(shape)
    mx.eval(arr)  # drop the float32 copy now, not when the shard is written
    return arr


def write_checkpoint(folder: Path, config: dict, *, seed: int = 0, shard_bytes: int = SHARD_BYTES,
                     noise_pool: int = 0) -> int:
    """Write ``config.json`` and random bfloat16 shards for ``config`` into ``folder``; returns bytes.

    ``noise_pool`` > 0 draws large tensors as random windows of one shared pool of
    that many N(0, 1) values instead of fresh samples: several times faster, for
    benchmarks where throughput and memory matter, not the values.
    """
    folder.mkdir(parents=True, exist_ok=True)
    shapes = hf_tensor_shapes(config)
    total = sum(2 * math.prod(s) for s in shapes.values())
    writer = ShardWriter(folder, shard_bytes=shard_bytes, metadata={"format": "pt"})
    rng = np.random.default_rng(seed)
    pool = rng.standard_normal(noise_pool, dtype=np.float32) if noise_pool > 0 else None
    with tqdm(total=total, desc="synthetic checkpoint", unit="B", unit_scale=True) as bar:
        for name, shape in shapes.items():
            writer.add(name, _random_tensor(name, shape, rng, pool))
            bar.update(2 * math.prod(shape))  # written to disk when its shard fills
        writer.finish()
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return total
