// Codebook-quantized matrix kernels for tqpipe's packed format, as MLX primitives.
//
// A packed weight row holds b-bit indices as a little-endian bit stream in
// uint32 words; every 32 indices fill exactly b words. A group of g inputs
// (g = 32, 64, 128) shares one float16 scale, and the value of index i is
// levels[i] * scale. These kernels never materialize the float weight for
// small batches: they decode 32 indices at a time into registers.
#pragma once

#include "mlx/ops.h"
#include "mlx/primitives.h"

namespace tqpipe {

using namespace mlx::core;

// y[m, o] = sum_k x[m, k] * levels[idx[o, k]] * scales[o, k / g]   (x: [M, n] float32)
array codebook_matmul(const array& x, const array& packed, const array& scales, const array& levels,
                      int bits, int group_size, StreamOrDevice s = {});

// The float32 weight [..., out, n] that `packed` encodes.
array codebook_dequantize(const array& packed, const array& scales, const array& levels,
                          int bits, int group_size, StreamOrDevice s = {});

// Expert form: y[p, o] = x[p] . W[experts[p]][o]  (x: [P, n], packed: [E, out, words], experts: [P] uint32)
array codebook_gather_matmul(const array& x, const array& packed, const array& scales, const array& levels,
                             const array& experts, int bits, int group_size, StreamOrDevice s = {});

class CodebookMatmul : public UnaryPrimitive {
 public:
  CodebookMatmul(Stream stream, int bits, int group_size, bool gathered)
      : UnaryPrimitive(stream), bits_(bits), group_size_(group_size), gathered_(gathered) {}
  void eval_cpu(const std::vector<array>& inputs, array& out) override;
  void eval_gpu(const std::vector<array>& inputs, array& out) override;
  std::vector<array> vjp(const std::vector<array>& primals, const std::vector<array>& cotangents,
                         const std::vector<int>& argnums, const std::vector<array>& outputs) override;
  std::vector<Shape> output_shapes(const std::vector<array>& inputs) override;
  const char* name() const override { return gathered_ ? "CodebookGatherMatmul" : "CodebookMatmul"; }
  bool is_equivalent(const Primitive& other) const override;

 private:
  int bits_, group_size_;
  bool gathered_;
};

class CodebookDequantize : public UnaryPrimitive {
 public:
  CodebookDequantize(Stream stream, int bits, int group_size)
      : UnaryPrimitive(stream), bits_(bits), group_size_(group_size) {}
  void eval_cpu(const std::vector<array>& inputs, array& out) override;
  void eval_gpu(const std::vector<array>& inputs, array& out) override;
  std::vector<Shape> output_shapes(const std::vector<array>& inputs) override;
  const char* name() const override { return "CodebookDequantize"; }
  bool is_equivalent(const Primitive& other) const override;

 private:
  int bits_, group_size_;
};

}  // namespace tqpipe
