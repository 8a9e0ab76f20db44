"""The native CPU kernels agree with the reference, and a missing or mismatched build falls back."""

from __future__ import annotations

import logging

import mlx.core as mx
import numpy as np
import pytest

from tqpipe.quant.codebook import lloyd_max_gaussian
from tqpipe.quant.quantize import quantize_tensor
from tqpipe.runtime import kernels
from tqpipe.native import native_kernels


def packed_weight(shape, bits, group=32, seed=0):
    w = mx.random.normal(shape, key=mx.random.key(seed))
    levels = lloyd_max_gaussian(bits)
    q = quantize_tensor(w, np.ones(shape[-1], np.int8), 1, levels, bits=bits, group_size=group, scale_method="mse")
    return mx.array(q.packed), mx.array(q.scales), mx.array(levels.astype(np.float32))


def test_native_extension_is_built_for_this_mlx():
    nat = native_kernels()
    assert nat is not None, "tqpipe._native is missing or unusable: `pip install -e .` should build it"
    assert nat.mlx_version == mx.__version__


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("rows", [1, 7, 40])  # matrix-vector, small batch, and the dequantize + BLAS path
def test_native_matmul_equals_reference(bits, rows):
    group = 64 if bits == 5 else 32
    packed, scales, levels = packed_weight((48, 128), bits, group)
    x = mx.random.normal((rows, 128), key=mx.random.key(1))
    ref = kernels.codebook_matmul_ref(x, packed, scales, levels, bits=bits, group_size=group)
    got = kernels.codebook_matmul(x, packed, scales, levels, bits=bits, group_size=group)
    np.testing.assert_allclose(np.array(got), np.array(ref), rtol=1e-4, atol=1e-4)
    deq = native_kernels().codebook_dequantize(packed, scales, levels, bits=bits, group_size=group)
    assert mx.array_equal(deq, kernels.dequantize(packed, scales, levels, bits=bits, group_size=group, n=128))


def test_native_gathered_experts_equal_reference():
    packed, scales, levels = packed_weight((6, 40, 64), 3)
    x = mx.random.normal((2, 3, 1, 1, 64), key=mx.random.key(2))  # as mlx-lm's SwitchGLU passes it
    idx = mx.random.randint(0, 6, (2, 3, 4), key=mx.random.key(3)).astype(mx.uint32)
    ref = kernels.codebook_gather_matmul_ref(x, packed, scales, levels, idx, bits=3, group_size=32)
    got = kernels.codebook_gather_matmul(x, packed, scales, levels, idx, bits=3, group_size=32)
    assert got.shape == ref.shape == (2, 3, 4, 1, 40)
    np.testing.assert_allclose(np.array(got), np.array(ref), rtol=1e-4, atol=1e-4)


def test_native_gradient_wrt_input():
    packed, scales, levels = packed_weight((16, 64), 2)
    nat = native_kernels()
    x = mx.random.normal((3, 64), key=mx.random.key(4))
    g = mx.grad(lambda v: nat.codebook_matmul(v, packed, scales, levels, bits=2, group_size=32).sum())(x)
    w = kernels.dequantize(packed, scales, levels, bits=2, group_size=32, n=64)
    np.testing.assert_allclose(np.array(g), np.array(mx.broadcast_to(w.sum(0), (3, 64))), rtol=1e-5, atol=1e-5)


def test_bad_arguments_are_refused_before_running():
    packed, scales, levels = packed_weight((16, 64), 2)
    with pytest.raises(ValueError, match="shapes do not match"):
        native_kernels().codebook_matmul(mx.zeros((1, 96)), packed, scales, levels, bits=2, group_size=32)
    w, signs, lv = np.zeros((4, 64), np.float32), np.ones(64, np.int8), np.linspace(-1, 1, 4, dtype=np.float32)
    args = dict(bits=2, group_size=32, candidates=1)
    with pytest.raises(ValueError, match="packed_out and scales_out"):  # 64 weights at 2 bits are 4 words, not 3
        native_kernels().quantize_rows(w, signs, 64, lv, **args, packed_out=np.zeros((4, 3), np.uint32),
                                       scales_out=np.zeros((4, 2), np.uint16))
    packed_out, scales_out = np.full((4, 4), 7, np.uint32), np.zeros((4, 2), np.uint16)
    native_kernels().quantize_rows(w + 1, signs, 64, lv, **args, packed_out=packed_out, scales_out=scales_out)
    fresh, fresh_scales, *_ = native_kernels().quantize_rows(w + 1, signs, 64, lv, **args)
    np.testing.assert_array_equal(packed_out, fresh)  # written in place, the same as into new arrays
    np.testing.assert_array_equal(scales_out, fresh_scales)


def test_version_mismatch_falls_back_to_reference_and_says_so(monkeypatch, caplog):
    import tqpipe._native as built

    monkeypatch.setattr(built, "mlx_version", "0.0.1")
    native_kernels.cache_clear()
    try:
        with caplog.at_level(logging.WARNING):
            assert native_kernels() is None
        assert "built for mlx 0.0.1" in caplog.text
        packed, scales, levels = packed_weight((8, 64), 3)
        x = mx.random.normal((2, 64), key=mx.random.key(5))
        np.testing.assert_array_equal(
            np.array(kernels.codebook_matmul(x, packed, scales, levels, bits=3, group_size=32)),
            np.array(kernels.codebook_matmul_ref(x, packed, scales, levels, bits=3, group_size=32)))
    finally:
        monkeypatch.undo()
        native_kernels.cache_clear()


@pytest.mark.parametrize("bits, method, width, group_size, shift", [
    (2, "mse", 4096, 32, 0), (3, "mse", 2688, 32, 0), (4, "rms", 576, 32, 0), (3, "rms", 1536, 32, 0),
    (1, "mse", 1024, 32, 0), (4, "mse", 2048, 64, 0), (3, "mse", 320, 64, 0),  # 320/64 = 5 groups: a partial 8
    (2, "mse", 1024, 32, 0.05), (3, "mse", 1024, 32, 0.05), (4, "mse", 1024, 32, 0.05),  # asymmetric: unmirrored search
])
def test_native_quantizer_matches_the_numpy_path(bits, method, width, group_size, shift, monkeypatch):
    """Same rotation (blocks m·2^k included), scales and bit stream as tqpipe.quant, up to float rounding."""
    import tqpipe.quant.quantize as q
    from tqpipe.quant.rotation import hadamard_block_size, random_signs

    w = (mx.random.normal((64, width), key=mx.random.key(6)) * 0.02).astype(mx.bfloat16)
    signs, block, levels = random_signs(width, seed=0, key="t"), hadamard_block_size(width), lloyd_max_gaussian(bits)
    levels = levels + shift
    args = dict(bits=bits, group_size=group_size, scale_method=method)
    fast = q.quantize_tensor(w, signs, block, levels, **args)
    monkeypatch.setattr(q, "native_kernels", lambda: None)
    slow = q.quantize_tensor(w, signs, block, levels, **args)
    assert np.mean(fast.packed == slow.packed) > 0.999
    np.testing.assert_allclose(fast.scales.astype(np.float32), slow.scales.astype(np.float32), rtol=2e-3, atol=1e-6)
    assert fast.stats["rel_mse"] == pytest.approx(slow.stats["rel_mse"], rel=1e-3)
    assert fast.stats["projection"] == pytest.approx(slow.stats["projection"], rel=1e-4)


def test_float16_sources_take_the_native_path_in_float32_chunks():
    """A float16 weight is not read in place (only bfloat16 and float32 are): it is quantized in
    float32 row chunks, to the same bytes as the same values given as float32 in one pass."""
    import tqpipe.quant.quantize as q

    w16 = (mx.random.normal((3, 40, 256), key=mx.random.key(8)) * 0.02).astype(mx.float16)
    signs, levels = np.where(np.arange(256) % 3, 1, -1).astype(np.int8), lloyd_max_gaussian(3)
    args = dict(bits=3, group_size=32, scale_method="mse")
    assert q.native_rows(w16) is None and q.native_rows(w16.astype(mx.float32)) is not None
    chunked = q.quantize_tensor(w16, signs, 256, levels, chunk_elements=256 * 7, **args)
    whole = q.quantize_tensor(w16.astype(mx.float32), signs, 256, levels, **args)
    assert chunked.packed.shape == (3, 40, 256 * 3 // 32)
    np.testing.assert_array_equal(chunked.packed, whole.packed)
    np.testing.assert_array_equal(chunked.scales, whole.scales)
    assert chunked.stats["rel_mse"] == pytest.approx(whole.stats["rel_mse"], rel=1e-6)
