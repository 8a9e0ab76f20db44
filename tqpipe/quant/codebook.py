"""Lloyd-Max scalar quantizer levels for a standard normal source (data-free)."""

from __future__ import annotations

import math

import numpy as np

_SQRT2 = math.sqrt(2.0)
_INV_SQRT2PI = 1.0 / math.sqrt(2.0 * math.pi)
_TAIL = 40.0  # stands in for ±inf: φ(40) and 1-Φ(40) are 0 in float64


def _pdf(t: np.ndarray) -> np.ndarray:
    return _INV_SQRT2PI * np.exp(-0.5 * t * t)


def _cdf(t: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.vectorize(math.erf)(t / _SQRT2))


def _cell_edges(levels: np.ndarray) -> np.ndarray:
    return np.concatenate(([-_TAIL], (levels[1:] + levels[:-1]) / 2, [_TAIL]))


def lloyd_max_gaussian(bits: int, *, iters: int = 500, tol: float = 1e-12) -> np.ndarray:
    """Levels (ascending, float64, exactly symmetric about 0) minimizing E[(X - Q(X))²] for X ~ N(0, 1).

    Lloyd iteration: thresholds are midpoints of neighbouring levels; each level
    moves to the conditional mean of its cell, (φ(a) - φ(b)) / (Φ(b) - Φ(a)).
    2 bits gives ±0.4528, ±1.5104.
    """
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    k = 1 << bits
    # start from equally spaced quantiles of N(0,1), a good initial guess
    levels = np.linspace(-2.0, 2.0, k) * (1.0 + 0.25 * bits) / 2.0
    for _ in range(iters):
        edges = _cell_edges(levels)
        lo, hi = edges[:-1], edges[1:]
        mass = _cdf(hi) - _cdf(lo)
        new = (_pdf(lo) - _pdf(hi)) / np.maximum(mass, 1e-300)
        if np.max(np.abs(new - levels)) < tol:
            levels = new
            break
        levels = new
    # N(0,1) is symmetric, so is its optimum: make it exact (lets the quantizer mirror its level search)
    return (levels - levels[::-1]) / 2


def gaussian_mse(levels: np.ndarray) -> float:
    """Mean squared error of quantizing N(0,1) with ``levels`` (nearest-level rule)."""
    edges = _cell_edges(levels)
    # E[(X-c)^2 ; a<X<b] = (1+c^2)(Φb-Φa) - 2c(φa-φb) + (aφa - bφb)
    a, b, c = edges[:-1], edges[1:], levels
    pa, pb = _pdf(a), _pdf(b)
    terms = (1 + c * c) * (_cdf(b) - _cdf(a)) - 2 * c * (pa - pb) + (a * pa - b * pb)
    return float(terms.sum())
