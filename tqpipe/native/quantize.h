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

}  // namespace tqpipe
