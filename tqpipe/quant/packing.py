"""Dense b-bit packing of codebook indices into little-endian uint32 words.

Each row is one bit stream: index ``j`` occupies bits ``[j·b, (j+1)·b)``,
least significant first, and word ``k`` holds stream bits ``[32k, 32k+32)``.
3-bit indices therefore cost exactly 3 bits each; an index may straddle two
words. A row of ``n`` indices takes ``ceil(n·b / 32)`` words (zero padded).
"""

from __future__ import annotations

import numpy as np


def packed_words(n: int, bits: int) -> int:
    """uint32 words per row for ``n`` indices of ``bits`` bits."""
    return -(-n * bits // 32)


def pack_indices(indices: np.ndarray, bits: int) -> np.ndarray:
    """Pack ``[rows, n]`` integer indices (< 2**bits) into ``[rows, words]`` uint32.

    Every 32 indices fill exactly ``bits`` words, so the stream is built 32
    indices at a time: index ``k`` of a block lands at bit ``k·bits`` of the
    block, spilling into the next word when it straddles a boundary.
    """
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    idx = np.asarray(indices)
    if idx.size and int(idx.max()) >> bits:
        raise ValueError(f"an index does not fit in {bits} bits")
    rows, n = idx.shape
    words = packed_words(n, bits)
    blocks = -(-n // 32)
    if blocks * 32 != n:
        idx = np.pad(idx, ((0, 0), (0, blocks * 32 - n)))
    idx = idx.reshape(rows, blocks, 32).astype(np.uint32)
    out = np.zeros((rows, blocks, bits), dtype=np.uint32)
    for k in range(32):
        word, off = divmod(k * bits, 32)
        out[:, :, word] |= idx[:, :, k] << np.uint32(off)
        if off + bits > 32:
            out[:, :, word + 1] |= idx[:, :, k] >> np.uint32(32 - off)
    return out.reshape(rows, blocks * bits)[:, :words].copy()


def unpack_indices(packed: np.ndarray, bits: int, n: int) -> np.ndarray:
    """Inverse of :func:`pack_indices`: ``[rows, words]`` uint32 to ``[rows, n]`` uint8."""
    rows = packed.shape[0]
    as_bytes = np.ascontiguousarray(packed.astype("<u4")).view(np.uint8)
    stream = np.unpackbits(as_bytes, axis=-1, bitorder="little")[:, : n * bits]
    weights = (1 << np.arange(bits, dtype=np.uint16)).astype(np.uint16)
    return (stream.reshape(rows, n, bits) * weights).sum(-1).astype(np.uint8)
