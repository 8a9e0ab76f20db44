// Python bindings: tqpipe._native. NB_DOMAIN mlx shares mlx's array type casters.
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/variant.h>

#include <string>

#include "codebook.h"
#include "mlx/version.h"

namespace nb = nanobind;
using namespace nb::literals;

NB_MODULE(_native, m) {
  m.doc() = "tqpipe's native CPU kernels for codebook-quantized matrices";
  // the mlx this was compiled against; the loader refuses to use it with any other
  m.attr("mlx_version") = std::to_string(MLX_VERSION_MAJOR) + "." + std::to_string(MLX_VERSION_MINOR) + "." +
                          std::to_string(MLX_VERSION_PATCH);
  m.def("codebook_matmul", &tqpipe::codebook_matmul, "x"_a, "packed"_a, "scales"_a, "levels"_a, nb::kw_only(),
        "bits"_a, "group_size"_a, "stream"_a = nb::none(),
        "x [M, n] @ dequantized(packed)ᵀ -> [M, out] float32");
  m.def("codebook_gather_matmul", &tqpipe::codebook_gather_matmul, "x"_a, "packed"_a, "scales"_a, "levels"_a,
        "experts"_a, nb::kw_only(), "bits"_a, "group_size"_a, "stream"_a = nb::none(),
        "row p of x [P, n] times expert experts[p] of packed [E, out, words] -> [P, out] float32");
  m.def("codebook_dequantize", &tqpipe::codebook_dequantize, "packed"_a, "scales"_a, "levels"_a, nb::kw_only(),
        "bits"_a, "group_size"_a, "stream"_a = nb::none(), "the float32 weight [..., out, n]");
}
