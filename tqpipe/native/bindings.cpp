// Python bindings: tqpipe._native. NB_DOMAIN mlx shares mlx's array type casters.
#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/variant.h>

#include <optional>
#include <string>

#include <nanobind/ndarray.h>

#include "codebook.h"
#include "quantize.h"
#include "mlx/version.h"

namespace nb = nanobind;
using namespace nb::literals;

using SignVec = nb::ndarray<const int8_t, nb::ndim<1>, nb::c_contig, nb::device::cpu>;
using LevelVec = nb::ndarray<const float, nb::ndim<1>, nb::c_contig, nb::device::cpu>;

template <class T>
nb::ndarray<nb::numpy, T, nb::ndim<2>> owned(size_t rows, size_t cols) {
  T* data = new T[rows * cols];
  nb::capsule owner(data, [](void* p) noexcept { delete[] static_cast<T*>(p); });
  return nb::ndarray<nb::numpy, T, nb::ndim<2>>(data, {rows, cols}, owner);
}

using WordsOut = nb::ndarray<uint32_t, nb::ndim<2>, nb::c_contig, nb::device::cpu>;
using HalvesOut = nb::ndarray<uint16_t, nb::ndim<2>, nb::c_contig, nb::device::cpu>;

// packed and scales go into the caller's arrays when given (no allocation, no copy), else into new ones
template <class T>
nb::tuple quantize_rows(nb::ndarray<const T, nb::ndim<2>, nb::c_contig, nb::device::cpu> w, SignVec signs,
                        int block, LevelVec levels, int bits, int group_size, int candidates,
                        std::optional<WordsOut> packed_out, std::optional<HalvesOut> scales_out) {
  const size_t rows = w.shape(0), n = w.shape(1), words = n * bits / 32, groups = n / group_size;
  if (signs.shape(0) != n || levels.shape(0) != (size_t(1) << bits))
    throw std::invalid_argument("[quantize_rows] signs or levels do not match the width and bits");
  if (packed_out.has_value() != scales_out.has_value() ||
      (packed_out && (packed_out->shape(0) != rows || packed_out->shape(1) != words || scales_out->shape(0) != rows ||
                      scales_out->shape(1) != groups)))
    throw std::invalid_argument("[quantize_rows] packed_out and scales_out must both be given, [rows, n*bits/32] "
                                "uint32 and [rows, n/group_size] uint16");
  nb::object packed = packed_out ? nb::cast(*packed_out) : nb::cast(owned<uint32_t>(rows, words));
  nb::object scales = scales_out ? nb::cast(*scales_out) : nb::cast(owned<uint16_t>(rows, groups));
  uint32_t* p = packed_out ? packed_out->data() : nb::cast<WordsOut>(packed).data();
  uint16_t* sc = scales_out ? scales_out->data() : nb::cast<HalvesOut>(scales).data();
  tqpipe::QuantizeSpec spec{int(n), block, bits, group_size, candidates};
  tqpipe::ErrorSums err;
  {
    nb::gil_scoped_release unlocked;
    err = tqpipe::quantize_rows<T>(w.data(), int64_t(rows), signs.data(), levels.data(), spec, p, sc);
  }
  return nb::make_tuple(packed, scales, err.w2, err.d2, err.wh);
}

using Floats2 = nb::ndarray<float, nb::ndim<2>, nb::c_contig, nb::device::cpu>;

// one block of GPTQ's column sweep, in place: wt [bw, rows] (updated), idx_out [bw, rows] uint8,
// scales_out [rows, bw/group] float16 bits, err_out [bw, rows]
void gptq_block(Floats2 wt, nb::ndarray<const float, nb::ndim<2>, nb::c_contig, nb::device::cpu> u, LevelVec levels,
                int bits, int group_size, int candidates, nb::ndarray<uint8_t, nb::ndim<2>, nb::c_contig, nb::device::cpu> idx_out,
                HalvesOut scales_out, Floats2 err_out) {
  const size_t bw = wt.shape(0), rows = wt.shape(1);
  if (bits < 1 || bits > 8 || group_size < 1 || bw % size_t(group_size) || levels.shape(0) != (size_t(1) << bits))
    throw std::invalid_argument("[gptq_block] bits, group size or levels do not fit the block");
  if (u.shape(0) != bw || u.shape(1) != bw || idx_out.shape(0) != bw || idx_out.shape(1) != rows ||
      scales_out.shape(0) != rows || scales_out.shape(1) != bw / group_size || err_out.shape(0) != bw ||
      err_out.shape(1) != rows)
    throw std::invalid_argument("[gptq_block] u must be [bw, bw]; idx_out and err_out [bw, rows]; scales_out "
                                "[rows, bw/group_size]");
  nb::gil_scoped_release unlocked;
  tqpipe::gptq_block(wt.data(), int64_t(rows), int(bw), u.data(), levels.data(), bits, group_size, candidates,
                     idx_out.data(), scales_out.data(), err_out.data());
}

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
  m.def("gptq_block", &gptq_block, "wt"_a, "u"_a, "levels"_a, nb::kw_only(), "bits"_a, "group_size"_a, "candidates"_a,
        "idx_out"_a, "scales_out"_a, "err_out"_a);
  m.def("quantize_rows", &quantize_rows<float>, "w"_a, "signs"_a, "block"_a, "levels"_a, nb::kw_only(), "bits"_a,
        "group_size"_a, "candidates"_a, "packed_out"_a = nb::none(), "scales_out"_a = nb::none());
  m.def("quantize_rows", &quantize_rows<uint16_t>, "w"_a, "signs"_a, "block"_a, "levels"_a, nb::kw_only(), "bits"_a,
        "group_size"_a, "candidates"_a, "packed_out"_a = nb::none(), "scales_out"_a = nb::none(),
        "rotate and quantize rows [rows, n] (float32, or bfloat16 as uint16 bits) -> (packed uint32, float16 "
        "scales as uint16, ‖w‖², ‖ŵ-w‖², ⟨ŵ,w⟩ of the rotated rows); packed_out and scales_out, if given, "
        "receive the results in place");
  m.def("codebook_dequantize", &tqpipe::codebook_dequantize, "packed"_a, "scales"_a, "levels"_a, nb::kw_only(),
        "bits"_a, "group_size"_a, "stream"_a = nb::none(), "the float32 weight [..., out, n]");
}
