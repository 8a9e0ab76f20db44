"""Native kernels alone: the codebook product against mx.quantized_matmul, and the pack quantizer.

One 4096×4096 weight; the product at batch 1 and 8 (tqpipe b-bit g32 against mlx
affine b-bit g64, 10 calls each after 2 warm-up calls), and tqpipe's
rotate-and-quantize on 1024×4096 float32 rows (one call per setting).

    python bench/kernel_speed.py
"""

from __future__ import annotations

import time

import tqpipe  # noqa: F401  (fast BLAS before mlx)

import mlx.core as mx
import numpy as np

from tqpipe.native import native_kernels
from tqpipe.quant.codebook import lloyd_max_gaussian
from tqpipe.quant.quantize import quantize_tensor


def timed(fn, repeat: int) -> float:
    for _ in range(2):
        mx.eval(fn())
    t = time.perf_counter()
    for _ in range(repeat):
        mx.eval(fn())
    return (time.perf_counter() - t) / repeat


def main() -> None:
    nat = native_kernels()
    if nat is None:
        raise SystemExit("tqpipe._native is not usable here (see the log); run `pip install -e .`")
    n = 4096
    w = mx.random.normal((n, n), key=mx.random.key(0))
    print("| bits | batch | tqpipe native (ms) | mx.quantized_matmul (ms) |\n|---|---|---|---|")
    for bits in (2, 3, 4):
        lv = lloyd_max_gaussian(bits)
        q = quantize_tensor(w, np.ones(n, np.int8), 1, lv, bits=bits, group_size=32, scale_method="rms")
        packed, scales, levels = mx.array(q.packed), mx.array(q.scales), mx.array(lv.astype(np.float32))
        affine = mx.quantize(w, group_size=64, bits=bits)
        for m in (1, 8):
            x = mx.random.normal((m, n), key=mx.random.key(1))
            tn = timed(lambda: nat.codebook_matmul(x, packed, scales, levels, bits=bits, group_size=32), 10)
            ta = timed(lambda: mx.quantized_matmul(x, *affine, transpose=True, group_size=64, bits=bits), 10)
            print(f"| {bits} | {m} | {tn * 1e3:.2f} | {ta * 1e3:.2f} |")
    rows = np.random.default_rng(0).standard_normal((1024, n), dtype=np.float32)
    signs = np.ones(n, np.int8)
    print("\n| bits | scales | quantize_rows (M weights/s) |\n|---|---|---|")
    for bits in (2, 3, 4):
        lv = lloyd_max_gaussian(bits).astype(np.float32)
        for mse in (True, False):
            t = time.perf_counter()
            nat.quantize_rows(rows, signs, n, lv, bits=bits, group_size=32, mse=mse)
            print(f"| {bits} | {'mse' if mse else 'rms'} | {rows.size / (time.perf_counter() - t) / 1e6:.0f} |")


if __name__ == "__main__":
    main()
