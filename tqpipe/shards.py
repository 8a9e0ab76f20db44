"""Write a model's tensors as safetensors shards, a bounded amount held at a time.

Names follow Hugging Face: one ``model.safetensors``, or
``model-0000i-of-0000N.safetensors`` with ``model.safetensors.index.json`` when
the tensors don't fit one shard. mlx-lm and ``transformers`` read both.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np

SHARD_BYTES = 1 << 30


class ShardWriter:
    """``add`` tensors in any order; a shard is written whenever ``shard_bytes`` are held."""

    def __init__(self, folder: Path, *, shard_bytes: int = SHARD_BYTES, metadata: dict[str, str] | None = None):
        self.folder, self.shard_bytes = folder, shard_bytes
        self.metadata = metadata or {"format": "mlx"}
        self.held: dict[str, mx.array] = {}
        self.held_bytes = 0
        self.files: list[str] = []
        self.weight_map: dict[str, str] = {}
        self.total_bytes = 0

    def add(self, name: str, array: mx.array | np.ndarray) -> None:
        if name in self.weight_map or name in self.held:
            raise ValueError(f"tensor {name!r} written twice")
        arr = array if isinstance(array, mx.array) else mx.array(array)
        self.held[name] = arr
        self.held_bytes += arr.nbytes
        if self.held_bytes >= self.shard_bytes:
            self.flush()

    def flush(self) -> None:
        if not self.held:
            return
        name = f"model-{len(self.files) + 1:05d}.safetensors"
        # mlx's writer: it handles bfloat16, which numpy cannot hold
        mx.save_safetensors(str(self.folder / name), self.held, metadata=self.metadata)
        self.files.append(name)
        self.weight_map.update({k: name for k in self.held})
        self.total_bytes += self.held_bytes
        self.held, self.held_bytes = {}, 0

    def finish(self) -> list[str]:
        """Write what is held and give the shards their final names; returns the file names."""
        self.flush()
        if len(self.files) == 1:
            (self.folder / self.files[0]).rename(self.folder / "model.safetensors")
            return ["model.safetensors"]
        n = len(self.files)
        final = {old: f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i, old in enumerate(self.files)}
        for old, new in final.items():
            (self.folder / old).rename(self.folder / new)
        index = {"metadata": {"total_size": self.total_bytes},
                 "weight_map": {k: final[v] for k, v in sorted(self.weight_map.items())}}
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        return list(final.values())
