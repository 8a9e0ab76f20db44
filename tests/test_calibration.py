"""GPTQ error feedback and input-moment capture against numpy references."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from tqpipe.calibration import InputMoments, rotated_moment
from tqpipe.quant.codebook import lloyd_max_gaussian
from tqpipe.quant.gptq import gptq_quantize, inverse_hessian_factor, output_error
from tqpipe.quant.rotation import random_signs, rotate
from tqpipe.quant.scales import dequantize_groups, nearest_level, quantize_groups


def correlated_inputs(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2048, n)) * (1 + 8 * (rng.random(n) < 0.05))  # a few loud channels
    return x @ (np.eye(n) + 0.2 * rng.standard_normal((n, n)) / np.sqrt(n))


def test_inverse_hessian_factor_is_the_cholesky_factor_of_the_damped_inverse():
    """float32 via H = V Vᵀ (V upper), U = V⁻¹ must equal the float64 chol((H + λI)⁻¹)ᵀ."""
    x = correlated_inputs(96)
    h = x.T @ x / len(x)
    h[5, :] = h[:, 5] = 0  # a dead input
    u, dead, _ = inverse_hessian_factor(h, damp=0.01)
    assert u.dtype == np.float32 and dead.tolist() == [i == 5 for i in range(96)]
    ref = h.copy()
    ref[5, 5] = 1.0
    ref[np.diag_indices(96)] += 0.01 * np.mean(np.diag(ref))
    want = np.linalg.cholesky(np.linalg.inv(ref)).T
    np.testing.assert_allclose(u, want, rtol=0, atol=2e-5 * np.abs(want).max())
    np.testing.assert_allclose(u.T.astype(np.float64) @ u, np.linalg.inv(ref), atol=1e-4 * np.abs(want).max() ** 2)


def gptq_reference(w, h, levels, g, damp=0.01):
    """Textbook GPTQ: one column at a time, full update of all later columns, no blocking."""
    u, dead, _ = inverse_hessian_factor(h, damp=damp)
    w = w.astype(np.float64).copy()
    w[:, dead] = 0
    idx = np.zeros(w.shape, dtype=np.uint8)
    for i in range(w.shape[1]):
        if i % g == 0:
            _, s16 = quantize_groups(w[:, i:i + g].astype(np.float32), levels, group_size=g, method="mse")
            s = s16[:, 0].astype(np.float64)
        idx[:, i] = nearest_level(w[:, i] / np.where(s > 0, s, 1), levels)
        e = (w[:, i] - s * levels[idx[:, i]]) / u[i, i]
        w[:, i + 1:] -= np.outer(e, u[i, i + 1:])
    return idx


def test_blocked_gptq_matches_the_textbook_loop():
    n, g = 128, 32
    x = correlated_inputs(n)
    h = x.T @ x / len(x)
    w = np.random.default_rng(1).standard_normal((16, n)).astype(np.float32)
    lv = lloyd_max_gaussian(3)
    idx = gptq_quantize(w, h, lv, group_size=g, block=64).idx
    assert (idx == gptq_reference(w, h, lv, g)).mean() > 0.995  # float rounding may flip a tie


def test_gptq_with_identity_hessian_is_plain_rounding():
    w = np.random.default_rng(2).standard_normal((8, 64)).astype(np.float32)
    lv = lloyd_max_gaussian(2)
    idx, s, _ = gptq_quantize(w, np.eye(64), lv, group_size=32)
    ref_idx, ref_s = quantize_groups(w, lv, group_size=32)
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_array_equal(s, ref_s)


def test_gptq_lowers_output_error_on_correlated_inputs():
    n = 256
    x = correlated_inputs(n, seed=3)
    h = x.T @ x / len(x)
    w = np.random.default_rng(4).standard_normal((64, n)).astype(np.float32)
    lv = lloyd_max_gaussian(3)
    rtn = dequantize_groups(*quantize_groups(w, lv, group_size=32), lv, group_size=32)
    fb = dequantize_groups(*gptq_quantize(w, h, lv, group_size=32)[:2], lv, group_size=32)
    assert output_error(w, fb, h) < 0.8 * output_error(w, rtn, h)
    # output_error is ‖ΔW X‖² / ‖W X‖² computed through H = XᵀX
    direct = np.sum(((fb - w) @ x.T) ** 2) / np.sum((w @ x.T) ** 2)
    assert abs(output_error(w, fb, x.T @ x) - direct) < 1e-9


def test_input_moments_equal_xtx_and_rotate_consistently():
    lin = nn.Linear(64, 8)
    model = nn.Sequential(lin)
    x = mx.random.normal((3, 10, 64))
    with InputMoments(model, {"layers.0": "in"}) as m:
        m.run([x[0], x[1], x[2]])
    xs = np.array(x).reshape(-1, 64)
    np.testing.assert_allclose(np.array(m.store["in"]), xs.T @ xs, rtol=1e-4, atol=1e-3)
    assert m.tokens == 30 and type(model.layers[0]) is nn.Linear  # unwrapped again
    signs = mx.array(random_signs(64, seed=0, key="in"))
    xr = np.array(rotate(mx.array(xs), signs, 64))
    np.testing.assert_allclose(np.array(rotated_moment(m.store["in"], signs, 64)), xr.T @ xr, rtol=1e-3, atol=1e-2)


@pytest.mark.parametrize("bits, shift", [(2, 0.0), (3, 0.0), (4, 0.0), (3, 0.05)])
def test_native_gptq_sweep_matches_the_numpy_loop(bits, shift, monkeypatch):
    """The C++ column sweep (rows over the cores) and the numpy one agree up to float rounding."""
    import tqpipe.quant.gptq as gptq

    if gptq.native_kernels() is None:
        pytest.skip("native kernels not built")
    n = 256
    x = correlated_inputs(n, seed=5)
    h = x.T @ x / len(x)
    w = np.random.default_rng(6).standard_normal((40, n)).astype(np.float32)
    lv = lloyd_max_gaussian(bits) + shift
    fast = gptq.gptq_quantize(w, h, lv, group_size=32, block=64)
    monkeypatch.setattr(gptq, "native_kernels", lambda: None)
    slow = gptq.gptq_quantize(w, h, lv, group_size=32, block=64)
    assert (fast[0] == slow[0]).mean() > 0.995
    np.testing.assert_allclose(fast[1].astype(np.float32), slow[1].astype(np.float32), rtol=2e-3)
    err = [output_error(w, dequantize_groups(r.idx, r.scales, lv, group_size=32), h) for r in (fast, slow)]
    assert err[0] == pytest.approx(err[1], rel=1e-2)


@pytest.mark.parametrize("native", [True, False])
def test_gptq_output_error_from_the_sweep_equals_the_direct_product(native, monkeypatch):
    """tr(ΔW H ΔWᵀ) = ‖E‖² - λ‖ΔW₀‖² - ‖ΔW₀[:, dead]‖² from the sweep's scaled errors, dead input included."""
    import tqpipe.quant.gptq as gptq

    if not native:
        monkeypatch.setattr(gptq, "native_kernels", lambda: None)
    n = 192
    x = correlated_inputs(n, seed=7)
    h = x.T @ x / len(x)
    h[7, :] = h[:, 7] = 0  # a dead input, whose weights are nonzero
    w = np.random.default_rng(8).standard_normal((24, n)).astype(np.float32)
    lv = lloyd_max_gaussian(3)
    factor = gptq.inverse_hessian_factor(h, damp=0.01)
    result = gptq.gptq_quantize(w, h, lv, group_size=32, factor=factor)
    w_hat = dequantize_groups(result.idx, result.scales, lv, group_size=32)
    d = (w_hat - w).astype(np.float64)
    direct = float(np.sum((d @ h) * d))
    assert gptq.gptq_output_error(w, w_hat, result, factor) == pytest.approx(direct, rel=1e-4)
