"""The pure math against numpy references."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest

from tqpipe.quant.codebook import gaussian_mse, lloyd_max_gaussian
from tqpipe.quant.packing import pack_indices, packed_words, unpack_indices
from tqpipe.quant.rotation import hadamard_block_size, random_signs, rotate, supported_block
from tqpipe.quant.scales import dequantize_groups, nearest_level, quantize_groups
from tqpipe.runtime.kernels import unpack_indices as unpack_indices_mx


def sylvester(n: int) -> np.ndarray:
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h / math.sqrt(n)


# --- codebook -----------------------------------------------------------------
def test_lloyd_max_matches_published_levels():
    np.testing.assert_allclose(lloyd_max_gaussian(2), [-1.5104, -0.4528, 0.4528, 1.5104], atol=1e-4)
    np.testing.assert_allclose(
        lloyd_max_gaussian(3), [-2.1520, -1.3439, -0.7560, -0.2451, 0.2451, 0.7560, 1.3439, 2.1520], atol=2e-4
    )


def test_lloyd_max_levels_are_centroids_of_their_cells():
    """Monte-Carlo check of the optimality conditions, independent of the closed forms."""
    x = np.random.default_rng(0).standard_normal(2_000_000)
    levels = lloyd_max_gaussian(3)
    idx = nearest_level(x.astype(np.float32), levels)
    centroids = np.array([x[idx == i].mean() for i in range(8)])
    np.testing.assert_allclose(centroids, levels, atol=0.01)
    assert gaussian_mse(levels) == pytest.approx(np.mean((x - levels[idx]) ** 2), rel=0.01)


def test_lloyd_max_rejects_bad_bits():
    with pytest.raises(ValueError, match="1..8"):
        lloyd_max_gaussian(9)


# --- rotation -----------------------------------------------------------------
def test_block_sizes():
    assert hadamard_block_size(576) == 192  # 3 x (12 * 16)
    assert hadamard_block_size(1536) == 1536  # 12 * 128
    assert hadamard_block_size(4096, max_block=1024) == 1024
    assert supported_block(20 * 8) and not supported_block(9 * 64)


def test_rotation_matches_explicit_block_matrix():
    n, b = 256, 64
    x = np.random.default_rng(1).standard_normal((3, n)).astype(np.float32)
    s = random_signs(n, seed=7, key="k")
    r = np.kron(np.eye(n // b), sylvester(b)) @ np.diag(s.astype(np.float64))
    got = np.array(rotate(mx.array(x), mx.array(s), b))
    np.testing.assert_allclose(got, x @ r.T, atol=1e-5)


@pytest.mark.parametrize("n", [576, 1536, 20 * 16, 28 * 4])
def test_rotation_preserves_products_for_non_power_of_two_widths(n):
    """W x == (W Rᵀ)(R x) with R applied to rows and activations by the same function."""
    rng = np.random.default_rng(2)
    w, x = rng.standard_normal((5, n)).astype(np.float32), rng.standard_normal((4, n)).astype(np.float32)
    s, b = mx.array(random_signs(n, seed=0, key="a")), hadamard_block_size(n)
    wr, xr = rotate(mx.array(w), s, b), rotate(mx.array(x), s, b)
    np.testing.assert_allclose(np.array(xr @ wr.T), x @ w.T, atol=2e-4 * n**0.5)
    np.testing.assert_allclose(np.linalg.norm(np.array(wr), axis=1), np.linalg.norm(w, axis=1), rtol=1e-5)


def test_signs_are_deterministic_and_keyed():
    a, b = random_signs(64, seed=0, key="x"), random_signs(64, seed=0, key="x")
    assert (a == b).all() and set(np.unique(a)) == {-1, 1}
    assert not (a == random_signs(64, seed=1, key="x")).all()
    assert not (a == random_signs(64, seed=0, key="y")).all()


# --- scales -------------------------------------------------------------------
def numpy_reference_quantize(w, levels, g):
    """Brute force: RMS scale per group, fp16-rounded, then argmin |w/s - level|."""
    grp = w.reshape(w.shape[0], -1, g)
    s = np.sqrt((grp**2).mean(-1, keepdims=True)).astype(np.float16).astype(np.float32)
    idx = np.abs(grp[..., None] / s[..., None] - levels[None, None, None, :]).argmin(-1)
    return idx.reshape(w.shape), s[..., 0].astype(np.float16)


def test_rms_scales_match_brute_force():
    w = np.random.default_rng(3).standard_normal((8, 128)).astype(np.float32)
    lv = lloyd_max_gaussian(3).astype(np.float32)
    idx, s = quantize_groups(w, lv, group_size=32, method="rms")
    ref_idx, ref_s = numpy_reference_quantize(w, lv, 32)
    np.testing.assert_array_equal(s, ref_s)
    assert (idx == ref_idx).mean() > 0.999  # ties at cell edges may round either way


def test_mse_scales_never_worse_than_rms():
    w = np.random.default_rng(4).standard_normal((64, 256)).astype(np.float32) * 0.02
    lv = lloyd_max_gaussian(2)
    errs = {}
    for m in ("rms", "mse"):
        idx, s = quantize_groups(w, lv, group_size=32, method=m)
        errs[m] = np.sum((dequantize_groups(idx, s, lv, group_size=32) - w) ** 2)
    assert errs["mse"] < errs["rms"]
    rel = errs["mse"] / np.sum(w**2)
    assert 0.09 < rel < 0.12  # near the Lloyd-Max Gaussian MSE (0.1175) at 2 bits


def test_zero_groups_stay_zero():
    w = np.zeros((2, 64), dtype=np.float32)
    idx, s = quantize_groups(w, lloyd_max_gaussian(3), group_size=32)
    assert np.all(dequantize_groups(idx, s, lloyd_max_gaussian(3), group_size=32) == 0)


# --- packing ------------------------------------------------------------------
@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_round_trip_and_density(bits):
    idx = np.random.default_rng(bits).integers(0, 1 << bits, size=(7, 96))
    packed = pack_indices(idx, bits)
    assert packed.dtype == np.uint32 and packed.shape == (7, 96 * bits // 32)
    np.testing.assert_array_equal(unpack_indices(packed, bits, 96), idx)
    np.testing.assert_array_equal(np.array(unpack_indices_mx(mx.array(packed), bits, 96)), idx)


def test_pack_layout_is_a_little_endian_bit_stream():
    """3-bit index j sits at stream bits [3j, 3j+3); index 10 straddles words 0 and 1."""
    idx = np.zeros((1, 32), dtype=np.uint8)
    idx[0, 10] = 0b111
    packed = pack_indices(idx, 3)
    assert packed[0, 0] == 0b11 << 30 and packed[0, 1] == 0b1
    assert packed_words(32, 3) == 3


def test_pack_rejects_out_of_range_indices():
    with pytest.raises(ValueError, match="fit"):
        pack_indices(np.array([[4]]), 2)


@pytest.mark.parametrize("bits, target", [(2, 0.107), (3, 0.0285)])
def test_gaussian_rel_mse_meets_the_targets_at_g32(bits, target):
    w = np.random.default_rng(10).standard_normal((512, 1024)).astype(np.float32)
    lv = lloyd_max_gaussian(bits)
    idx, s = quantize_groups(w, lv, group_size=32, method="mse")
    rel = np.sum((dequantize_groups(idx, s, lv, group_size=32) - w) ** 2) / np.sum(w**2)
    assert rel <= target
