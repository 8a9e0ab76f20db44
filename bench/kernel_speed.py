"""Native kernels alone: the codebook product against mx.quantized_matmul, and the pack quantizer.

The product at 4096×4096, 1536×576 and 49152×576, batch 1 and 32, 2/3/4 bits
(tqpipe b-bit g32 against mlx affine b-bit g64 and float32; median of 15 calls
after 2 warm-up calls), with the native kernel's error against the reference;
then the pack quantizer: tqpipe's rotate-and-quantize against ``mx.quantize`` (what
``mlx_lm.convert -q`` runs) on the same 2048×8192 bfloat16 rows, median of 5 calls,
with the cores each kept busy (CPU time over wall time).

    python bench/kernel_speed.py
    python bench/kernel_speed.py --quantize-only
"""

from __future__ import annotations

import statistics
import sys
import time

import tqpipe  # noqa: F401  (fast BLAS before mlx)

import mlx.core as mx
import numpy as np

from tqpipe.native import native_kernels
from tqpipe.quant.codebook import lloyd_max_gaussian
from tqpipe.quant.quantize import quantize_tensor
from tqpipe.quant.scales import scale_candidates
from tqpipe.runtime.kernels import codebook_matmul, codebook_matmul_ref


def timed(fn, repeat: int) -> float:
    """Median seconds per call after two warm-up calls (the median shrugs off a noisy neighbour)."""
    for _ in range(2):
        mx.eval(fn())
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        mx.eval(fn())
        times.append(time.perf_counter() - t)
    return statistics.median(times)


SHAPES = [(4096, 4096), (1536, 576), (49152, 576)]  # (out, in): a 7B-class layer, SmolLM2's MLP, its lm_head


def main() -> None:
    nat = native_kernels()
    if nat is None:
        raise SystemExit("tqpipe._native is not usable here (see the log); run `pip install -e .`")
    if "--quantize-only" in sys.argv[1:]:
        return quantize_speed(nat)
    print("Median ms per call. tqpipe b-bit g32 against mlx affine b-bit g64 (same bits/weight) and float32. "
          "'native' is the C++ kernel itself; 'runtime' is what TQLinear calls (the native product for few "
          "rows, native dequantize + BLAS for many: runtime.kernels.use_native_product); 'max rel err' compares "
          "native with the pure-MLX reference.\n")
    print("| out×in | bits | batch | tqpipe native | tqpipe runtime | mx.quantized_matmul | float32 matmul | "
          "native vs affine | max rel err |\n|---|---|---|---|---|---|---|---|---|")
    for out, n in SHAPES:
        w = mx.random.normal((out, n), key=mx.random.key(0))
        mx.eval(w)
        for bits in (2, 3, 4):
            lv = lloyd_max_gaussian(bits)
            q = quantize_tensor(w, np.ones(n, np.int8), 1, lv, bits=bits, group_size=32, scale_method="rms")
            packed, scales, levels = mx.array(q.packed), mx.array(q.scales), mx.array(lv.astype(np.float32))
            affine = mx.quantize(w, group_size=64, bits=bits)
            for m in (1, 32):
                x = mx.random.normal((m, n), key=mx.random.key(1))
                mx.eval(x, packed, scales, levels, *affine)
                args = (x, packed, scales, levels)
                tn = timed(lambda: nat.codebook_matmul(*args, bits=bits, group_size=32), 15)
                tr = timed(lambda: codebook_matmul(*args, bits=bits, group_size=32), 15)
                ta = timed(lambda: mx.quantized_matmul(x, *affine, transpose=True, group_size=64, bits=bits), 15)
                tf = timed(lambda: x @ w.T, 15)
                ref = codebook_matmul_ref(*args, bits=bits, group_size=32)
                err = (mx.abs(nat.codebook_matmul(*args, bits=bits, group_size=32) - ref).max()
                       / mx.abs(ref).max()).item()
                print(f"| {out}×{n} | {bits} | {m} | {tn * 1e3:.2f} | {tr * 1e3:.2f} | {ta * 1e3:.2f} | "
                      f"{tf * 1e3:.2f} | {ta / tn:.1f}× | {err:.1e} |", flush=True)
    quantize_speed(nat)


def _median_call(fn, repeat: int = 5) -> tuple[float, float]:
    """Median wall seconds of ``fn()`` after one warm-up call, and CPU seconds over wall seconds (cores busy)."""
    fn()
    walls, cpus = [], []
    for _ in range(repeat):
        w, c = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    return statistics.median(walls), sum(cpus) / sum(walls)


def quantize_speed(nat) -> None:
    rows, n = 2048, 8192
    w = mx.random.normal((rows, n), key=mx.random.key(2)).astype(mx.bfloat16)
    mx.eval(w)
    bits16 = np.asarray(memoryview(w.view(mx.uint16)))
    signs = np.random.default_rng(0).choice([-1, 1], n).astype(np.int8)
    print(f"\nPack quantizer on {rows}×{n} bfloat16 rows, M weights/s (cores busy), median of 5 calls:\n")
    print("| bits | tqpipe, mse scales (3 candidates) | tqpipe, rms scales | mx.quantize, affine g64 |\n|---|---|---|---|")
    for bits in (2, 3, 4):
        lv = lloyd_max_gaussian(bits).astype(np.float32)
        cells = []
        for method in ("mse", "rms"):
            t, busy = _median_call(lambda: nat.quantize_rows(bits16, signs, 4096, lv, bits=bits, group_size=32,
                                                             candidates=scale_candidates(method)))
            cells.append(f"{w.size / t / 1e6:.0f} ({busy:.1f})")
        t, busy = _median_call(lambda: mx.eval(mx.quantize(w, group_size=64, bits=bits)))
        cells.append(f"{w.size / t / 1e6:.0f} ({busy:.1f})")
        print(f"| {bits} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
