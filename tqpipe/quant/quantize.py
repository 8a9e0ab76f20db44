"""Entry points for quantizing weights: one rotated matrix, or a whole tensor streamed by rows."""

from __future__ import annotations

from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np

from tqpipe.native import native_kernels
from tqpipe.quant.gptq import InverseHessianFactor, gptq_output_error, gptq_quantize, inverse_hessian_factor
from tqpipe.quant.packing import pack_indices, packed_words
from tqpipe.quant.rotation import rotate
from tqpipe.quant.scales import ScaleMethod, dequantize_groups, quantize_groups, scale_candidates

CHUNK_ELEMENTS = 1 << 18  # rows are quantized in chunks of about this many weights (1 MB float32: cache-sized)
NATIVE_CHUNK_ELEMENTS = 1 << 22  # the native path reads the source dtype in place: larger calls, fewer round trips
GPTQ_CHUNK_ELEMENTS = 1 << 21  # GPTQ sweeps the columns once per chunk: more rows per pass (2.8x at 8192 wide)


def to_numpy(x: mx.array) -> np.ndarray:
    """A zero-copy numpy view of an mlx array (``np.array(x)`` copies element by element, ~10x slower)."""
    mx.eval(x)
    return np.asarray(memoryview(x))


def quantize_weight(
    w: np.ndarray,
    levels: np.ndarray,
    *,
    group_size: int,
    scale_method: ScaleMethod,
    hessian: np.ndarray | None = None,
    damp: float = 0.01,
    factor: InverseHessianFactor | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(indices uint8, fp16 scales) for a rotated ``w``; GPTQ when a rotated input ``hessian`` is given."""
    if hessian is None:
        return quantize_groups(w, levels, group_size=group_size, method=scale_method)
    idx, scales, _ = gptq_quantize(w, hessian, levels, group_size=group_size, method=scale_method, damp=damp,
                                   factor=factor)
    return idx, scales


@dataclass
class ErrorSums:
    """Running sums for a tensor's reconstruction error, accumulated chunk by chunk."""

    w2: float = 0.0  # ‖w‖²
    d2: float = 0.0  # ‖ŵ - w‖²
    wh: float = 0.0  # ⟨ŵ, w⟩
    out_num: float = 0.0  # tr(ΔW H ΔWᵀ)
    out_den: float = 0.0  # tr(W H Wᵀ)

    def add(self, w: np.ndarray, w_hat: np.ndarray, h: np.ndarray | None, out_num: float | None = None) -> None:
        """``out_num``: tr(ΔW H ΔWᵀ) when the caller has it already (GPTQ's sweep gives it for free)."""
        d = w_hat - w
        flat_w, flat_d = w.ravel(), d.ravel()
        self.w2 += float(np.dot(flat_w, flat_w))
        self.d2 += float(np.dot(flat_d, flat_d))
        self.wh += float(np.dot(w_hat.ravel(), flat_w))
        if h is not None:
            self.out_num += float(np.sum((d @ h) * d)) if out_num is None else out_num
            self.out_den += float(np.sum((w @ h) * w))

    def stats(self) -> dict[str, float]:
        """``rel_mse`` = ‖ŵ-w‖²/‖w‖², ``projection`` = ⟨ŵ,w⟩/‖w‖² (1.0 = unbiased along w) and,
        with a Hessian, ``calib_output_error`` = ‖ΔW X‖²/‖W X‖² on the calibration inputs."""
        norm = self.w2 or 1.0
        out = {"rel_mse": self.d2 / norm, "projection": self.wh / norm}
        if self.out_den:
            out["calib_output_error"] = self.out_num / self.out_den
        return out


@dataclass
class QuantizedTensor:
    packed: np.ndarray  # uint32 [..., out, words]
    scales: np.ndarray  # float16 [..., out, in / group]
    stats: dict[str, float] = field(default_factory=dict)
    sums: ErrorSums = field(default_factory=ErrorSums)  # the sums ``stats`` came from


def quantize_tensor(
    w: mx.array,
    signs: np.ndarray,
    block: int,
    levels: np.ndarray,
    *,
    bits: int,
    group_size: int,
    scale_method: ScaleMethod,
    hessian: np.ndarray | None = None,
    damp: float = 0.01,
    chunk_elements: int | None = None,
) -> QuantizedTensor:
    """Rotate, quantize and pack an unrotated weight ``[..., out, in]`` (2-D, or 3-D expert stacks).

    Rows are independent, so they are processed in chunks: memory beyond the
    input and the packed output stays at a few times ``chunk_elements`` (by default
    larger for the native path, which reads the source dtype in place).
    """
    *lead, n = w.shape
    if hessian is None:
        src = native_rows(w)
        if src is not None:
            return quantize_native_rows(src, tuple(lead), signs, block, levels, bits=bits, group_size=group_size,
                                        scale_method=scale_method, chunk_elements=chunk_elements)
    rows = int(np.prod(lead))
    flat = w.reshape(rows, n)
    s = mx.array(signs)
    packed = np.empty((rows, packed_words(n, bits)), dtype=np.uint32)
    scales = np.empty((rows, n // group_size), dtype=np.float16)
    errors = ErrorSums()
    factor = None if hessian is None else inverse_hessian_factor(hessian, damp=damp)
    nat = native_kernels() if hessian is None and n % 32 == 0 else None
    if chunk_elements is None:
        chunk_elements = (NATIVE_CHUNK_ELEMENTS if nat is not None
                          else GPTQ_CHUNK_ELEMENTS if hessian is not None else CHUNK_ELEMENTS)
    step = max(1, chunk_elements // n)
    for r0 in range(0, rows, step):
        r1 = min(r0 + step, rows)
        if nat is not None:  # another source dtype (float16): the native path on float32 chunks
            q = quantize_native_rows(to_numpy(flat[r0:r1].astype(mx.float32)), (r1 - r0,), signs, block, levels,
                                     bits=bits, group_size=group_size, scale_method=scale_method,
                                     packed_out=packed[r0:r1], scales_out=scales[r0:r1])
            errors.w2, errors.d2, errors.wh = errors.w2 + q.sums.w2, errors.d2 + q.sums.d2, errors.wh + q.sums.wh
            continue
        chunk = to_numpy(rotate(flat[r0:r1].astype(mx.float32), s, block))
        if factor is None:
            idx, sc = quantize_groups(chunk, levels, group_size=group_size, method=scale_method)
            out_num = None
        else:
            result = gptq_quantize(chunk, hessian, levels, group_size=group_size, method=scale_method, factor=factor)
            idx, sc = result.idx, result.scales
        packed[r0:r1], scales[r0:r1] = pack_indices(idx, bits), sc
        w_hat = dequantize_groups(idx, sc, levels, group_size=group_size)
        if factor is not None:  # the output error's numerator from the sweep itself: no n×n product
            out_num = gptq_output_error(chunk, w_hat, result, factor)
        errors.add(chunk, w_hat, hessian, out_num)
    return QuantizedTensor(packed.reshape(*lead, -1), scales.reshape(*lead, -1), errors.stats())


def native_rows(w: mx.array) -> np.ndarray | None:
    """``w [..., out, in]`` as the 2-D rows the native quantizer reads in place, evaluated: bfloat16 as
    its uint16 bits, float32 as is (zero-copy). None when the native path can't take it that way (no
    native kernels, a width not a multiple of 32, another dtype)."""
    if native_kernels() is None or w.shape[-1] % 32 or w.dtype not in (mx.bfloat16, mx.float32):
        return None
    flat = w.reshape(-1, w.shape[-1])
    return np.ascontiguousarray(to_numpy(flat.view(mx.uint16) if w.dtype == mx.bfloat16 else flat))


def quantize_native_rows(
    src: np.ndarray,
    lead: tuple[int, ...],
    signs: np.ndarray,
    block: int,
    levels: np.ndarray,
    *,
    bits: int,
    group_size: int,
    scale_method: ScaleMethod,
    chunk_elements: int | None = None,
    packed_out: np.ndarray | None = None,
    scales_out: np.ndarray | None = None,
) -> QuantizedTensor:
    """The native quantizer (rotation, scale search, packing in C++) over rows already in host memory
    (:func:`native_rows`), reshaped to ``lead``. numpy only and the GIL released: it may run on another
    thread while the caller reads the next tensor with mlx."""
    nat = native_kernels()
    rows, n = src.shape
    packed = np.empty((rows, packed_words(n, bits)), dtype=np.uint32) if packed_out is None else packed_out
    scales = np.empty((rows, n // group_size), dtype=np.float16) if scales_out is None else scales_out
    signs8 = np.ascontiguousarray(signs, dtype=np.int8)
    levels32 = np.ascontiguousarray(levels, dtype=np.float32)
    step = max(1, (chunk_elements or NATIVE_CHUNK_ELEMENTS) // n)
    errors = ErrorSums()
    for r0 in range(0, rows, step):
        r1 = min(r0 + step, rows)
        _, _, w2, d2, wh = nat.quantize_rows(  # straight into this tensor's output rows
            src[r0:r1], signs8, block, levels32, bits=bits, group_size=group_size,
            candidates=scale_candidates(scale_method), packed_out=packed[r0:r1],
            scales_out=scales[r0:r1].view(np.uint16))
        errors.w2, errors.d2, errors.wh = errors.w2 + w2, errors.d2 + d2, errors.wh + wh
    return QuantizedTensor(packed.reshape(*lead, -1), scales.reshape(*lead, -1), errors.stats(), errors)
