"""Make mlx's CPU backend use a fast BLAS on Linux.

The Linux ``mlx-cpu`` wheel bundles the reference BLAS (~3 GFLOP/s fp32).
Loading OpenBLAS with ``RTLD_GLOBAL`` *before* mlx is imported makes mlx's
``cblas_*`` calls resolve to it (~40x faster matmul). This must run before the
first ``import mlx``; ``tqpipe/__init__.py`` calls it first thing.

Set ``TQPIPE_BLAS=off`` to skip, or ``TQPIPE_BLAS=/path/to/libblas.so.3``.
"""

from __future__ import annotations

import ctypes
import os
import sys

_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib64/libopenblas.so.0",
)

loaded_blas: str | None = None


def preload_fast_blas() -> str | None:
    """Load OpenBLAS globally if we are on Linux and mlx is not imported yet."""
    global loaded_blas
    choice = os.environ.get("TQPIPE_BLAS", "auto")
    if not sys.platform.startswith("linux") or choice == "off" or "mlx.core" in sys.modules:
        return loaded_blas
    paths = _CANDIDATES if choice == "auto" else (choice,)
    for path in paths:
        if os.path.exists(path):
            try:
                ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            except OSError:
                continue
            loaded_blas = path
            break
    return loaded_blas
