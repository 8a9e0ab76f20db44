"""tqpipe's native CPU kernels (``tqpipe._native``, built from the C++ in this folder), when they can be trusted here.

They are an MLX C++ extension built by ``pip install -e .`` against one exact
mlx version. On import this module checks that the extension exists, that it
was built for the mlx that is loaded, and that a small product agrees with the
reference kernel. If any check fails, the reference kernels are used and the
reason is logged once. ``TQPIPE_NATIVE=off`` disables the extension.
"""

from __future__ import annotations

import functools
import logging
import os
from types import ModuleType

import mlx.core as mx

log = logging.getLogger(__name__)


def _smoke_test(native: ModuleType) -> None:
    from tqpipe.runtime.kernels import codebook_matmul_ref

    key = mx.random.key(0)
    packed = mx.random.randint(0, 2**31 - 1, (8, 3 * 64 // 32), key=key).astype(mx.uint32)
    scales = mx.full((8, 2), 0.5, dtype=mx.float16)
    levels = mx.linspace(-2, 2, 8)
    x = mx.random.normal((3, 64), key=key)
    want = codebook_matmul_ref(x, packed, scales, levels, bits=3, group_size=32)
    got = native.codebook_matmul(x, packed, scales, levels, bits=3, group_size=32)
    if not mx.allclose(want, got, rtol=1e-4, atol=1e-4).item():
        raise RuntimeError("its smoke product disagrees with the reference kernel")


@functools.cache
def native_kernels() -> ModuleType | None:
    """The extension module, or ``None`` (reason logged once) when it is missing or unusable."""
    if os.environ.get("TQPIPE_NATIVE", "auto") == "off":
        log.info("native kernels disabled by TQPIPE_NATIVE=off; using the reference kernels")
        return None
    try:
        from tqpipe import _native
    except ImportError as e:
        log.warning("tqpipe's native kernels are not built (%s); using the slower reference kernels. "
                    "Reinstall with `pip install -e .` where a C++ compiler and CMake are available.", e)
        return None
    if _native.mlx_version != mx.__version__:
        log.warning("tqpipe's native kernels were built for mlx %s but mlx %s is loaded; using the reference "
                    "kernels. Rebuild with `pip install -e .`.", _native.mlx_version, mx.__version__)
        return None
    try:
        _smoke_test(_native)
    except Exception as e:  # noqa: BLE001 - any failure means: don't use it
        log.warning("tqpipe's native kernels failed their check (%s); using the reference kernels.", e)
        return None
    return _native
