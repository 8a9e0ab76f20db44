"""Builds tqpipe's native kernels (tqpipe/native, an MLX C++ extension) with mlx's CMake helper.

Everything else about the package is in pyproject.toml. The extension is optional:
if it cannot be built (no C++ compiler, say), installation goes on and tqpipe
uses its pure-MLX reference kernels, which give the same results, slower.
"""

import sys

from mlx.extension import CMakeBuild, CMakeExtension
from setuptools import setup


class OptionalCMakeBuild(CMakeBuild):
    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as e:  # noqa: BLE001 - any build failure falls back to the reference kernels
            print(f"WARNING: tqpipe's native kernels were not built ({e}); the reference kernels will be used.",
                  file=sys.stderr)

    def copy_extensions_to_source(self):
        try:
            super().copy_extensions_to_source()
        except FileNotFoundError:  # the optional build failed: nothing to copy
            pass


setup(ext_modules=[CMakeExtension("tqpipe._native", sourcedir="tqpipe/native")],
      cmdclass={"build_ext": OptionalCMakeBuild})
