"""Quantized layers that drop into mlx-lm models in place of ``nn.Linear``."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from tqpipe.quant.packing import packed_words
from tqpipe.quant.rotation import rotate
from tqpipe.runtime.kernels import codebook_gather_matmul, codebook_matmul, dequantize, gather_matmul


class SharedRotation:
    """One rotated activation for the modules that read the same input (q/k/v, gate/up, ...).

    Their signs are equal by construction (pack derives them from one key), so the
    first module to see an input rotates it and the others reuse the result. The
    input is recognised by identity (mlx arrays are immutable), and the memo is
    dropped once every consumer has read it, so nothing outlives the step.
    """

    def __init__(self, consumers: int) -> None:
        self.consumers = consumers
        self._x = self._y = None
        self._left = 0

    def __call__(self, x: mx.array, signs: mx.array, block: int) -> mx.array:
        if x is self._x:
            y = self._y
            self._left -= 1
            if self._left <= 0:
                self._x = self._y = None
            return y
        y = rotate(x, signs, block)
        if self.consumers > 1:
            self._x, self._y, self._left = x, y, self.consumers - 1
        return y


def share_rotations(modules: dict[str, nn.Module], keys: dict[str, str]) -> int:
    """Give the quantized modules with the same rotation key one :class:`SharedRotation`;
    returns how many rotations a forward pass saves."""
    groups: dict[str, list[nn.Module]] = {}
    for path, key in keys.items():
        groups.setdefault(key, []).append(modules[path])
    for members in groups.values():
        shared = SharedRotation(len(members))
        for m in members:
            m.rotation = shared
    return sum(len(m) - 1 for m in groups.values())


def _rotated(layer: nn.Module, x: mx.array) -> mx.array:
    shared = getattr(layer, "rotation", None)
    return shared(x, layer.signs, layer.block) if shared is not None else rotate(x, layer.signs, layer.block)


class TQLinear(nn.Module):
    """``y = Ŵ' (R x) + b`` with ``Ŵ'`` a codebook-quantized, rotated weight.

    Parameters (as stored in the safetensors): ``weight`` uint32 packed indices
    ``[out, words]``, ``scales`` float16 ``[out, in/g]``, ``signs`` int8 ``[in]``
    and an optional ``bias``. The codebook levels come from config.json.
    """

    def __init__(
        self, input_dims: int, output_dims: int, *, bits: int, group_size: int, block: int,
        levels: list[float], bias: bool = False,
    ) -> None:
        super().__init__()
        if len(levels) != 1 << bits:
            raise ValueError(f"a {bits}-bit codebook needs {1 << bits} levels, got {len(levels)}")
        self.input_dims, self.output_dims = input_dims, output_dims
        self.bits, self.group_size, self.block = bits, group_size, block
        self.weight = mx.zeros((output_dims, packed_words(input_dims, bits)), dtype=mx.uint32)
        self.scales = mx.zeros((output_dims, input_dims // group_size), dtype=mx.float16)
        self.signs = mx.ones((input_dims,), dtype=mx.int8)
        if bias:
            self.bias = mx.zeros((output_dims,))
        self._levels = mx.array(levels, dtype=mx.float32)  # underscore: not a parameter
        self.freeze()

    def __call__(self, x: mx.array) -> mx.array:
        y = codebook_matmul(
            _rotated(self, x), self.weight, self.scales, self._levels,
            bits=self.bits, group_size=self.group_size,
        )
        return y + self.bias if "bias" in self else y

    def dequantized_weight(self) -> mx.array:
        """The float32 weight in the rotated basis (what the kernel multiplies by)."""
        return dequantize(self.weight, self.scales, self._levels,
                          bits=self.bits, group_size=self.group_size, n=self.input_dims)

    def to_dense(self) -> "RotatedLinear":
        """A float32 twin that skips unpacking: same outputs, for fast evaluation."""
        return RotatedLinear(self.dequantized_weight(), self.signs, self.block,
                             self.bias if "bias" in self else None)

    def _extra_repr(self) -> str:
        return (f"input_dims={self.input_dims}, output_dims={self.output_dims}, bits={self.bits}, "
                f"group_size={self.group_size}, block={self.block}, bias={'bias' in self}")


class RotatedLinear(nn.Module):
    """A dense float weight in the rotated basis: ``y = W' (R x) + b``."""

    def __init__(self, weight: mx.array, signs: mx.array, block: int, bias: mx.array | None) -> None:
        super().__init__()
        self.weight, self.signs, self.block = weight, signs, block
        if bias is not None:
            self.bias = bias
        self.freeze()

    def __call__(self, x: mx.array) -> mx.array:
        y = rotate(x, self.signs, self.block) @ self.weight.astype(x.dtype).T
        return y + self.bias if "bias" in self else y


class TQSwitchLinear(nn.Module):
    """A stack of codebook-quantized experts, in place of mlx-lm's ``SwitchLinear``.

    ``weight`` is uint32 ``[experts, out, words]`` and ``scales`` float16
    ``[experts, out, in/g]``; all experts read the same rotated input, so one
    ``signs`` vector ``[in]`` serves the whole stack.
    """

    def __init__(
        self, input_dims: int, output_dims: int, num_experts: int, *, bits: int, group_size: int,
        block: int, levels: list[float], bias: bool = False,
    ) -> None:
        super().__init__()
        if len(levels) != 1 << bits:
            raise ValueError(f"a {bits}-bit codebook needs {1 << bits} levels, got {len(levels)}")
        self.input_dims, self.output_dims, self.num_experts = input_dims, output_dims, num_experts
        self.bits, self.group_size, self.block = bits, group_size, block
        self.weight = mx.zeros((num_experts, output_dims, packed_words(input_dims, bits)), dtype=mx.uint32)
        self.scales = mx.zeros((num_experts, output_dims, input_dims // group_size), dtype=mx.float16)
        self.signs = mx.ones((input_dims,), dtype=mx.int8)
        if bias:
            self.bias = mx.zeros((num_experts, output_dims))
        self._levels = mx.array(levels, dtype=mx.float32)
        self.freeze()

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        y = codebook_gather_matmul(
            _rotated(self, x), self.weight, self.scales, self._levels, indices,
            bits=self.bits, group_size=self.group_size, sorted_indices=sorted_indices,
        )
        return y + mx.expand_dims(self.bias[indices], -2) if "bias" in self else y

    def dequantized_weight(self) -> mx.array:
        return dequantize(self.weight, self.scales, self._levels,
                          bits=self.bits, group_size=self.group_size, n=self.input_dims)

    def to_dense(self) -> "RotatedSwitchLinear":
        return RotatedSwitchLinear(self.dequantized_weight(), self.signs, self.block,
                                   self.bias if "bias" in self else None)

    def _extra_repr(self) -> str:
        return (f"input_dims={self.input_dims}, output_dims={self.output_dims}, "
                f"num_experts={self.num_experts}, bits={self.bits}, group_size={self.group_size}, "
                f"block={self.block}, bias={'bias' in self}")


class RotatedSwitchLinear(RotatedLinear):
    """Dense float experts ``[experts, out, in]`` in the rotated basis: the twin of :class:`TQSwitchLinear`."""

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        y = gather_matmul(rotate(x, self.signs, self.block), self.weight, indices, sorted_indices=sorted_indices)
        return y + mx.expand_dims(self.bias[indices], -2) if "bias" in self else y
