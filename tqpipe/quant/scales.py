"""Per-group scales and nearest-level indices for a scaled codebook.

A weight row is cut into groups of ``group_size`` consecutive (rotated) input
elements; each group ``w`` is approximated by ``s · levels[idx]`` with one
float16 scale ``s``. Two ways to choose ``s``:

- ``rms``: ``s = sqrt(mean(w²))``, matching the N(0,1) codebook's unit variance;
- ``mse``: a short search for the scale with the least squared error. It
  starts at the RMS scale and takes over-relaxed least-squares steps
  ``s + ω(⟨w, c⟩/⟨c, c⟩ - s)``, ``c`` the levels nearest ``w / s`` and ω = 1.5.
  Each candidate is rounded to float16 (the scale that is stored) and scored
  by its exact error; the best of ``MSE_CANDIDATES`` is kept (a group stops
  early when a step no longer moves its float16 scale). Over-relaxation
  reaches in 3 candidates what plain least-squares alternation reached in 4
  steps plus a final pass (about 0.0281 relative MSE at 3 bits on N(0,1) and on
  rotated SmolLM2 weights), and since the first candidate is the RMS scale the result is never
  worse than ``rms``.
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


MSE_CANDIDATES = 3  # scales scored per group by ``mse`` (``rms`` scores one: the RMS scale)
RELAXATION = 1.5  # ω of the least-squares steps between candidates


def scale_candidates(method: ScaleMethod) -> int:
    if method not in ("rms", "mse"):
        raise ValueError(f"scale method must be 'rms' or 'mse', got {method!r}")
    return MSE_CANDIDATES if method == "mse" else 1


def _half(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).astype(np.float32)


def quantize_groups(
    w: np.ndarray,
    levels: np.ndarray,
    *,
    group_size: int,
    method: ScaleMethod = "mse",
) -> tuple[np.ndarray, np.ndarray]:
    """Quantize a 2-D weight ``[rows, n]``; returns (indices uint8 [rows, n], scales fp16 [rows, n/g])."""
    candidates = scale_candidates(method)
    g = _grouped(np.asarray(w, dtype=np.float32), group_size)
    lv = np.asarray(levels, dtype=np.float32)
    scale = _half(np.sqrt(np.mean(g * g, axis=-1, keepdims=True)))
    best_scale, best_err = scale, np.full_like(scale, np.inf)
    best_idx = np.zeros(g.shape, dtype=np.uint8)
    moving = np.ones_like(scale, dtype=bool)
    for t in range(candidates):
        idx = nearest_level(g * (1 / np.where(scale > 0, scale, 1)), lv)
        c = lv[idx]
        err = np.sum((scale * c - g) ** 2, axis=-1, keepdims=True)
        better = moving & (err < best_err)
        best_scale, best_err = np.where(better, scale, best_scale), np.where(better, err, best_err)
        best_idx = np.where(better, idx, best_idx)
        if t + 1 == candidates:
            break
        num = np.sum(g * c, axis=-1, keepdims=True)
        den = np.sum(c * c, axis=-1, keepdims=True)
        step = _half(scale + RELAXATION * (np.where(den > 0, num / np.where(den > 0, den, 1), scale) - scale))
        moving &= step != scale
        if not moving.any():
            break
        scale = np.where(moving, step, scale)
    return best_idx.reshape(w.shape), best_scale[..., 0].astype(np.float16)


def dequantize_groups(
    indices: np.ndarray, scales: np.ndarray, levels: np.ndarray, *, group_size: int
) -> np.ndarray:
    """Inverse of :func:`quantize_groups`: ``scales ⊗ levels[indices]`` as float32 ``[rows, n]``."""
    rows, n = indices.shape
    vals = np.asarray(levels, dtype=np.float32)[indices].reshape(rows, n // group_size, group_size)
    return (vals * scales.astype(np.float32)[..., None]).reshape(rows, n)
