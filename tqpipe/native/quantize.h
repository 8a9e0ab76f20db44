// Rotate and quantize weight rows into tqpipe's packed format (for the pack stage).
#pragma once

#include <cstdint>

namespace tqpipe {

struct QuantizeSpec {
  int n;           // input width (row length)
  int block;       // Hadamard block, m·2^k with m in {1, 12, 20, 28}
  int bits;        // 1..8
  int group_size;  // multiple of 32 dividing n
  int candidates;  // float16 scales scored per group (1: the RMS scale; see tqpipe.quant.scales)
};

struct ErrorSums {
  double w2 = 0, d2 = 0, wh = 0;  // ‖w‖², ‖ŵ-w‖², ⟨ŵ,w⟩ over the rotated weights
};

// rows × n weights in (float32, or bfloat16 given as its uint16 bits), rotated by diag(signs)
// then the block Hadamard, quantized group by group.
// packed: rows × (n·bits/32) uint32; scales: rows × (n/group) float16 bits.
template <class T>
ErrorSums quantize_rows(const T* w, int64_t rows, const int8_t* signs, const float* levels,
                        const QuantizeSpec& spec, uint32_t* packed, uint16_t* scales);

// One group's float16 scale (returned as a float) by the same search as quantize_rows' portable
// path: `candidates` float16 scales from the RMS one, the one with the least squared error kept.
// mids[t] = (levels[t] + levels[t+1]) / 2 and steps[t] = levels[t+1] - levels[t]; idx and scratch
// hold gs indices each.
float fit_group_scale(const float* g, int gs, int bits, const float* levels, const float* mids, const float* steps,
                      int candidates, uint8_t* idx, uint8_t* scratch);

// GPTQ's column sweep over one block of columns, rows in parallel (tqpipe.quant.gptq.gptq_quantize's
// inner loop). wt: bw × rows, the block's columns of the rotated weight (row i = column i, a row of
// Wᵀ), updated in place with the error feedback; u: bw × bw, the block's diagonal block of the
// upper inverse-Hessian factor. A group's scale is fitted when the sweep reaches its first column.
// idx: bw × rows level indices; scales: rows × (bw/group) float16 bits; err: bw × rows, each
// column's scaled rounding error (what the caller spreads over the columns after the block).
void gptq_block(float* wt, int64_t rows, int bw, const float* u, const float* levels, int bits, int group_size,
                int candidates, uint8_t* idx, uint16_t* scales, float* err);

}  // namespace tqpipe
