"""Random-sign block-Hadamard rotation along the input (last) dimension.

``R = H_b ⊗ I`` applied block-wise after multiplying by random ±1 signs, with
``H_b`` the orthonormal Hadamard matrix of size ``b`` that
``mx.hadamard_transform`` implements (``b = m·2^k``, ``m ∈ {1, 12, 20, 28}``).
A weight row and an activation go through the *same* function, so
``(W Rᵀ)(R x) = W x`` holds whatever the symmetry of ``H_b`` (for m = 20, 28
it is not symmetric: its inverse is its transpose).
"""

from __future__ import annotations

import hashlib

import mlx.core as mx
import numpy as np

HADAMARD_BASES = (1, 12, 20, 28)
MAX_BLOCK = 1 << 14  # mlx supports power-of-two sizes up to 2^14 on every backend


def supported_block(b: int) -> bool:
    """True when ``mx.hadamard_transform`` accepts width ``b`` (m·2^k, m ∈ {1,12,20,28})."""
    for m in HADAMARD_BASES:
        if b % m == 0:
            p = b // m
            if p >= 1 and p & (p - 1) == 0 and b <= MAX_BLOCK:
                return True
    return False


def hadamard_block_size(n: int, max_block: int = MAX_BLOCK) -> int:
    """Largest supported Hadamard width that divides ``n`` and is at most ``max_block``.

    576 = 3 × 192 gives 192 (12·16); 1536 = 12·128 gives 1536 itself.
    """
    if n < 1:
        raise ValueError(f"input width must be positive, got {n}")
    for b in range(min(n, max_block), 0, -1):
        if n % b == 0 and supported_block(b):
            return b
    return 1  # unreachable: b = 1 always qualifies


def random_signs(n: int, *, seed: int, key: str) -> np.ndarray:
    """Deterministic ±1 vector (int8) from a seed and a stable string key.

    The key names the shared input (e.g. ``model.layers.3.self_attn:in``), so
    modules that read the same activation get the same signs. Uses sha256, not
    Python's salted ``hash()``, so it is identical across processes.
    """
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    rng = np.random.Generator(np.random.PCG64(int.from_bytes(digest[:16], "little")))
    return np.where(rng.random(n) < 0.5, -1, 1).astype(np.int8)


def rotate(x: mx.array, signs: mx.array, block: int) -> mx.array:
    """Apply ``R x`` along the last axis: signs, then an orthonormal block Hadamard."""
    n = x.shape[-1]
    if n % block:
        raise ValueError(f"block {block} does not divide width {n}")
    y = x * signs.astype(x.dtype)
    if block == 1:
        return y
    lead = y.shape[:-1]
    y = y.reshape(*lead, n // block, block)
    y = mx.hadamard_transform(y, scale=block**-0.5)
    return y.reshape(*lead, n)
