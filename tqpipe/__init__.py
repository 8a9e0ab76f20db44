"""tqpipe: recipe-driven TurboQuant quantization for MLX."""

from tqpipe._blas import preload_fast_blas

preload_fast_blas()  # before anything imports mlx

__version__ = "0.2.0"
FORMAT_VERSION = 1  # version of the packed-model format in config.json
