"""Second moments of every linear layer's input, ``H = Σ x xᵀ``, from running a model on text.

Used by the GPTQ calibration mode (error feedback through H) and by the
validate stage's per-layer output error ``‖ΔW X‖² / ‖W X‖² = tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)``.
Modules that read the same input share one accumulator, keyed as in the plan.
"""

from __future__ import annotations

from collections.abc import Iterable

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

from tqpipe.quant.rotation import rotate


class _Capture(nn.Module):
    """Wraps a module; adds ``xᵀx`` of its input to ``store[key]`` on every call."""

    def __init__(self, inner: nn.Module, key: str, store: dict[str, mx.array]) -> None:
        super().__init__()
        self.inner = inner
        self._key, self._store = key, store

    def __call__(self, x: mx.array) -> mx.array:
        x2 = x.reshape(-1, x.shape[-1]).astype(mx.float32)
        prev = self._store.get(self._key)
        xtx = x2.T @ x2
        self._store[self._key] = xtx if prev is None else prev + xtx
        return self.inner(x)


class InputMoments:
    """Context manager: while active, ``model``'s named modules accumulate input moments.

    ``keys`` maps module path -> shared-input key; only the first module per key
    is wrapped (its siblings see the same input).
    """

    def __init__(self, model: nn.Module, keys: dict[str, str]) -> None:
        self.model, self.store = model, {}
        modules = dict(model.named_modules())
        first: dict[str, str] = {}
        for path, key in sorted(keys.items()):
            first.setdefault(key, path)
        self._originals = [(p, modules[p]) for p in first.values()]
        self._wrapped = [(p, _Capture(modules[p], keys[p], self.store)) for p in first.values()]
        self.tokens = 0

    def __enter__(self) -> "InputMoments":
        self.model.update_modules(tree_unflatten(self._wrapped))
        return self

    def __exit__(self, *exc: object) -> None:
        self.model.update_modules(tree_unflatten(self._originals))

    def run(self, windows: Iterable[mx.array]) -> None:
        """Feed token windows ``[T]`` through the model, evaluating moments window by window."""
        for w in windows:
            mx.eval(self.model(w[None]), list(self.store.values()))
            self.tokens += w.shape[0]


def rotated_moment(h: mx.array, signs: mx.array, block: int) -> mx.array:
    """``R H Rᵀ``: the second moment of the rotated input ``R x``."""
    return rotate(rotate(h, signs, block).T, signs, block)
