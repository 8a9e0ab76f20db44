"""Codebook kernels, in one place.

The ``*_ref`` functions are the reference: plain MLX ops, correct on every
device, the ground truth in tests. ``codebook_matmul`` and
``codebook_gather_matmul`` are what the layers call: on the CPU they use the
native extension (``tqpipe/native``) when it is usable, else the reference.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np


def unpack_indices(packed: mx.array, bits: int, n: int) -> mx.array:
    """``[..., words]`` uint32 -> ``[..., n]`` uint32 indices (layout of ``quant.packing``)."""
    pos = np.arange(n, dtype=np.int64) * bits
    word, off = pos // 32, pos % 32
    lo = mx.take(packed, mx.array(word.astype(np.int32)), axis=-1) >> mx.array(off.astype(np.uint32))
    spill = off + bits > 32
    if spill.any():
        nxt = np.minimum(word + 1, packed.shape[-1] - 1).astype(np.int32)
        hi_shift = np.where(spill, 32 - off, 0).astype(np.uint32)
        hi = mx.take(packed, mx.array(nxt), axis=-1) << mx.array(hi_shift)
        lo = lo | mx.where(mx.array(spill), hi, mx.zeros_like(hi))
    return lo & ((1 << bits) - 1)


def dequantize(
    packed: mx.array, scales: mx.array, levels: mx.array, *, bits: int, group_size: int, n: int
) -> mx.array:
    """Rotated-basis float32 weight ``[out, n]`` = ``scales ⊗ levels[indices]``."""
    idx = unpack_indices(packed, bits, n)
    vals = levels[idx].reshape(*idx.shape[:-1], n // group_size, group_size)
    return (vals * scales.astype(mx.float32)[..., None]).reshape(*idx.shape)


def codebook_matmul_ref(
    x_rot: mx.array, packed: mx.array, scales: mx.array, levels: mx.array,
    *, bits: int, group_size: int,
) -> mx.array:
    """``x_rot @ Ŵᵀ`` by dequantizing then multiplying (reference path)."""
    w = dequantize(packed, scales, levels, bits=bits, group_size=group_size, n=x_rot.shape[-1])
    return x_rot @ w.astype(x_rot.dtype).T


def codebook_gather_matmul_ref(
    x_rot: mx.array, packed: mx.array, scales: mx.array, levels: mx.array, indices: mx.array,
    *, bits: int, group_size: int, sorted_indices: bool = False,
) -> mx.array:
    """The expert-stack form: ``x_rot @ Ŵ[indices]ᵀ`` for packed ``[experts, out, words]``.

    Only the selected experts are dequantized when they are fewer than the stack
    (decoding picks a handful of hundreds), so memory follows the tokens, not the experts.
    """
    n = x_rot.shape[-1]
    if indices.size < packed.shape[0]:
        flat = indices.flatten()
        w = dequantize(packed[flat], scales[flat], levels, bits=bits, group_size=group_size, n=n)
        local = mx.arange(flat.size, dtype=mx.uint32).reshape(indices.shape)
        return gather_matmul(x_rot, w, local, sorted_indices=sorted_indices)
    w = dequantize(packed, scales, levels, bits=bits, group_size=group_size, n=n)
    return gather_matmul(x_rot, w, indices, sorted_indices=sorted_indices)


def gather_matmul(x: mx.array, w: mx.array, indices: mx.array, *, sorted_indices: bool = False) -> mx.array:
    """``x @ w[indices]ᵀ`` for experts ``w [experts, out, in]``, in float32 (mlx's CPU gather_mm
    supports nothing else), returned in ``x``'s dtype."""
    y = mx.gather_mm(x.astype(mx.float32), w.astype(mx.float32).swapaxes(-1, -2), rhs_indices=indices,
                     sorted_indices=sorted_indices)
    return y.astype(x.dtype)


SMALL_BATCH = 8  # up to this many rows the native kernel multiplies directly; above, it may dequantize for BLAS
NATIVE_ROWS_PER_WEIGHT = 2.0**-19  # ... and up to this many rows per weight (4096² at batch 32: native 3x faster)


def use_native_product(rows: int, weights: int) -> bool:
    """Multiply packed (decoding on the fly) or dequantize once and use BLAS? Measured on a 2-core x86:
    dequantize + BLAS wins from ~12 rows on 1536×576 and from ~48 on 4096×4096."""
    return rows <= SMALL_BATCH or rows <= weights * NATIVE_ROWS_PER_WEIGHT


def _native_here():
    from tqpipe.native import native_kernels

    return native_kernels() if mx.default_device() == mx.cpu else None


def codebook_matmul(
    x_rot: mx.array, packed: mx.array, scales: mx.array, levels: mx.array, *, bits: int, group_size: int,
) -> mx.array:
    """``x_rot @ Ŵᵀ`` for a packed ``[out, words]`` weight, on the fastest path available."""
    nat = _native_here()
    if nat is None:
        return codebook_matmul_ref(x_rot, packed, scales, levels, bits=bits, group_size=group_size)
    lead, n = x_rot.shape[:-1], x_rot.shape[-1]
    x2 = x_rot.reshape(-1, n)
    if use_native_product(x2.shape[0], packed.shape[0] * n):
        y = nat.codebook_matmul(x2, packed, scales, levels, bits=bits, group_size=group_size)
    else:
        w = nat.codebook_dequantize(packed, scales, levels, bits=bits, group_size=group_size)
        y = x2.astype(mx.float32) @ w.T
    return y.reshape(*lead, packed.shape[0]).astype(x_rot.dtype)


def codebook_gather_matmul(
    x_rot: mx.array, packed: mx.array, scales: mx.array, levels: mx.array, indices: mx.array,
    *, bits: int, group_size: int, sorted_indices: bool = False,
) -> mx.array:
    """The expert-stack product as mlx-lm's SwitchLinear computes it, on the fastest path available."""
    nat = _native_here()
    if nat is None or x_rot.shape[-2] != 1:
        return codebook_gather_matmul_ref(x_rot, packed, scales, levels, indices, bits=bits,
                                          group_size=group_size, sorted_indices=sorted_indices)
    n, out = x_rot.shape[-1], packed.shape[1]
    pairs = mx.broadcast_to(x_rot, (*indices.shape, 1, n)).reshape(-1, n)
    y = nat.codebook_gather_matmul(pairs, packed, scales, levels, indices.flatten(), bits=bits,
                                   group_size=group_size)
    return y.reshape(*indices.shape, 1, out).astype(x_rot.dtype)
