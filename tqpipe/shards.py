"""Write a model's tensors as safetensors shards, a bounded amount held at a time.

Names follow Hugging Face: one ``model.safetensors``, or
``model-0000i-of-0000N.safetensors`` with ``model.safetensors.index.json`` when
the tensors don't fit one shard. mlx-lm and ``transformers`` read both.

A full shard is written by a background thread (safetensors' writer releases
the GIL) while the caller goes on producing the next one; the same thread then
hashes the file it wrote, still in the page cache, so the stage's manifest
need not read it again. At most one shard is being written while the next
fills: memory stays under about two shards.

Only the last shard is written after the last tensor arrives, with nothing left
to overlap. When the writer is told the bytes to expect, the last shard-size of
them is therefore cut in halves (down to ``MIN_SHARD_BYTES``): each half is
written while the next, smaller one fills, and what is left at the end is
small. Shard boundaries depend only on the sizes, so a rebuild writes the same
files.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import mlx.core as mx
import numpy as np
from safetensors import TensorSpec, serialize_file

from tqpipe.manifest import sha256_file

SHARD_BYTES = 1 << 30
MIN_SHARD_BYTES = 128 << 20  # the halving stops here: a model this small stays one file


def _as_numpy(array: mx.array | np.ndarray) -> tuple[np.ndarray, str]:
    """A zero-copy host view of ``array`` and its safetensors dtype name (bfloat16 travels as its uint16 bits)."""
    if isinstance(array, np.ndarray):
        return np.ascontiguousarray(array), array.dtype.name
    mx.eval(array)
    name = str(array.dtype).removeprefix("mlx.core.")
    bits = array.view(mx.uint16) if array.dtype == mx.bfloat16 else array
    return np.ascontiguousarray(np.asarray(memoryview(bits))), name  # a strided view (a transpose) is copied


def save_arrays(path: Path, tensors: dict[str, tuple[np.ndarray, str]], metadata: dict[str, str] | None = None) -> None:
    """A safetensors file straight from the arrays' buffers (``safetensors.numpy.save_file`` first
    copies each array into a bytes object: twice the memory for large tensors)."""
    specs = {k: TensorSpec(dtype=dtype, shape=list(a.shape), data_ptr=a.ctypes.data, data_len=a.nbytes)
             for k, (a, dtype) in tensors.items()}
    serialize_file(specs, str(path), metadata=metadata)  # `tensors` keeps the buffers alive until here


def _write(path: Path, tensors: dict[str, tuple[np.ndarray, str]], metadata: dict[str, str]) -> str:
    save_arrays(path, tensors, metadata)
    return sha256_file(path)


class ShardWriter:
    """``add`` tensors in any order; a shard is written whenever ``shard_bytes`` are held
    (fewer towards the end when ``expected_bytes``, the total to come, is given).

    ``finish`` must be called (it waits for the last write); ``hashes`` then maps
    each final file name to its sha256.
    """

    def __init__(self, folder: Path, *, shard_bytes: int = SHARD_BYTES, expected_bytes: int | None = None,
                 min_shard_bytes: int = MIN_SHARD_BYTES, metadata: dict[str, str] | None = None):
        self.folder, self.shard_bytes, self.expected_bytes = folder, shard_bytes, expected_bytes
        self.min_shard_bytes = min_shard_bytes
        self.metadata = metadata or {"format": "mlx"}
        self.held: dict[str, mx.array | np.ndarray] = {}
        self.held_bytes = 0
        self.files: list[str] = []
        self.weight_map: dict[str, str] = {}
        self.total_bytes = 0
        self.hashes: dict[str, str] = {}
        self.waited = 0.0  # seconds the caller spent waiting for writes to finish
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="shard-writer")
        self._writes: list[Future[str]] = []  # one per file, in order; each gives the file's sha256

    def add(self, name: str, array: mx.array | np.ndarray) -> None:
        if name in self.weight_map or name in self.held:
            raise ValueError(f"tensor {name!r} written twice")
        self.held[name] = array
        self.held_bytes += array.nbytes
        if self.held_bytes >= self._shard_limit():
            self.flush()

    def _shard_limit(self) -> int:
        """Bytes at which the shard being filled is written: half of what is still to come once that is
        under two shards, so the tail written after the last tensor is small."""
        if self.expected_bytes is None:
            return self.shard_bytes
        to_come = self.expected_bytes - self.total_bytes  # held bytes included
        return min(self.shard_bytes, max(self.min_shard_bytes, to_come // 2))

    def flush(self) -> None:
        if not self.held:
            return
        name = f"model-{len(self.files) + 1:05d}.safetensors"
        tensors = {k: _as_numpy(v) for k, v in self.held.items()}  # lazy mlx tensors are computed here
        self._wait()  # one shard in flight at most
        self._writes.append(self._pool.submit(_write, self.folder / name, tensors, self.metadata))
        self.files.append(name)
        self.weight_map.update({k: name for k in self.held})
        self.total_bytes += self.held_bytes
        self.held, self.held_bytes = {}, 0

    def _wait(self) -> None:
        started = time.perf_counter()
        for write in self._writes:  # a failed write raises here
            write.result()
        self.waited += time.perf_counter() - started

    def finish(self) -> list[str]:
        """Write what is held and give the shards their final names; returns the file names."""
        try:
            self.flush()
            self._wait()
            digests = [f.result() for f in self._writes]
        finally:
            self._pool.shutdown(wait=True)
        n = len(self.files)
        if n == 1:
            final = {self.files[0]: "model.safetensors"}
        else:
            final = {old: f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i, old in enumerate(self.files)}
        self.hashes = {final[old]: d for old, d in zip(self.files, digests)}
        for old, new in final.items():
            (self.folder / old).rename(self.folder / new)
        if n == 1:
            return list(final.values())
        index = {"metadata": {"total_size": self.total_bytes},
                 "weight_map": {k: final[v] for k, v in sorted(self.weight_map.items())}}
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        return list(final.values())
