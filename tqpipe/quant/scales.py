"""Per-group scales and nearest-level indices for a scaled codebook.

A weight row is cut into groups of ``group_size`` consecutive (rotated) input
elements; each group ``w`` is approximated by ``s · levels[idx]`` with one
float16 scale ``s``. Two ways to choose ``s``:

- ``rms``: ``s = sqrt(mean(w²))``, matching the N(0,1) codebook's unit variance;
- ``mse``: alternate nearest-level assignment and the least-squares scale
  ``s = ⟨w, c⟩ / ⟨c, c⟩`` starting from the RMS scale. Each step can only lower
  the group's squared error, so it is never worse than ``rms``.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

ScaleMethod = Literal["rms", "mse"]


def nearest_level(x: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """Index (uint8) of the nearest entry of ascending ``levels`` for each element of ``x``."""
    mids = ((levels[1:] + levels[:-1]) / 2).astype(x.dtype)
    if len(mids) <= 15:  # up to 4 bits: a few vector comparisons beat a binary search per element
        idx = np.zeros(x.shape, dtype=np.uint8)
        for m in mids:
            idx += x > m
        return idx
    return np.searchsorted(mids, x).astype(np.uint8)


def _grouped(w: np.ndarray, group_size: int) -> np.ndarray:
    rows, n = w.shape
    if n % group_size:
        raise ValueError(f"group size {group_size} does not divide input width {n}")
    return w.reshape(rows, n // group_size, group_size)


def quantize_groups(
    w: np.ndarray,
    levels: np.ndarray,
    *,
    group_size: int,
    method: ScaleMethod = "mse",
    iters: int = 4,
) -> tuple[np.ndarray, np.ndarray]:
    """Quantize a 2-D weight ``[rows, n]``; returns (indices uint8 [rows, n], scales fp16 [rows, n/g])."""
    g = _grouped(np.asarray(w, dtype=np.float32), group_size)
    lv = np.asarray(levels, dtype=np.float32)
    scale = np.sqrt(np.mean(g * g, axis=-1, keepdims=True))
    if method == "mse":
        for _ in range(iters):
            c = lv[nearest_level(g / np.where(scale > 0, scale, 1), lv)]
            num = np.sum(g * c, axis=-1, keepdims=True)
            den = np.sum(c * c, axis=-1, keepdims=True)
            scale = np.where(den > 0, num / np.where(den > 0, den, 1), scale)
    elif method != "rms":
        raise ValueError(f"scale method must be 'rms' or 'mse', got {method!r}")
    scale16 = scale.astype(np.float16)
    s = scale16.astype(np.float32)
    idx = nearest_level(g / np.where(s > 0, s, 1), lv)
    return idx.reshape(w.shape), scale16[..., 0]


def dequantize_groups(
    indices: np.ndarray, scales: np.ndarray, levels: np.ndarray, *, group_size: int
) -> np.ndarray:
    """Inverse of :func:`quantize_groups`: ``scales ⊗ levels[indices]`` as float32 ``[rows, n]``."""
    rows, n = indices.shape
    vals = np.asarray(levels, dtype=np.float32)[indices].reshape(rows, n // group_size, group_size)
    return (vals * scales.astype(np.float32)[..., None]).reshape(rows, n)
