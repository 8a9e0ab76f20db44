// GPTQ's column sweep over one block of columns: tqpipe/quant/gptq.py's inner loop in C++.
//
// Rows are independent given the inverse-Hessian factor, so each thread sweeps its own rows through
// the whole block; per column it takes the nearest level at the group's scale, divides the rounding
// error by the factor's diagonal and subtracts it, times the factor's row, from the block's later
// columns. The same float32 operations as the numpy loop, so results agree up to float rounding.

#include <algorithm>
#include <cstring>
#include <vector>

#include "mlx/types/half_types.h"
#include "parallel.h"
#include "quantize.h"

namespace tqpipe {

#if defined(__x86_64__) && defined(__GNUC__)
#define TQ_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define TQ_CLONES
#endif

namespace {

// dst -= c · e: one column's error spread onto a later column (what numpy's outer product does)
TQ_CLONES void subtract_scaled(float* dst, const float* e, float c, size_t m) {
  for (size_t r = 0; r < m; ++r) dst[r] -= c * e[r];
}

}  // namespace

void gptq_block(float* wt, int64_t rows, int bw, const float* u, const float* levels, int bits, int group_size,
                int candidates, uint8_t* idx, uint16_t* scales, float* err) {
  const int L = 1 << bits, groups = bw / group_size;
  std::vector<float> mids(L - 1), steps(L - 1);
  for (int t = 0; t + 1 < L; ++t) {
    mids[t] = (levels[t] + levels[t + 1]) / 2;
    steps[t] = levels[t + 1] - levels[t];
  }
  const size_t n = size_t(rows);
  parallel_for(n, n * size_t(bw) * size_t(bw) / 2, [&](size_t r0, size_t r1) {
    const size_t m = r1 - r0;
    std::vector<float> s(m), safe(m), group(group_size);
    std::vector<uint8_t> gi(group_size), scratch(group_size);
    for (int i = 0; i < bw; ++i) {
      float* col = wt + size_t(i) * n;
      if (i % group_size == 0) {  // the group's scale, from its columns as corrected so far
        for (size_t r = r0; r < r1; ++r) {
          for (int k = 0; k < group_size; ++k) group[k] = wt[size_t(i + k) * n + r];
          const float sc = fit_group_scale(group.data(), group_size, bits, levels, mids.data(), steps.data(),
                                           candidates, gi.data(), scratch.data());
          mlx::core::float16_t half(sc);
          std::memcpy(scales + r * size_t(groups) + i / group_size, &half, sizeof half);
          s[r - r0] = sc;
          safe[r - r0] = sc > 0 ? sc : 1.f;
        }
      }
      const float d = u[size_t(i) * bw + i];
      float* e = err + size_t(i) * n;
      uint8_t* q = idx + size_t(i) * n;
      for (size_t r = r0; r < r1; ++r) {
        const float v = col[r] / safe[r - r0];
        int k = 0;
        for (int t = 0; t + 1 < L; ++t) k += v > mids[t];
        q[r] = uint8_t(k);
        const float rec = s[r - r0] * levels[k];
        e[r] = (col[r] - rec) / d;
      }
      for (int j = i + 1; j < bw; ++j) {  // this column's error, spread over the block's later columns
        subtract_scaled(wt + size_t(j) * n + r0, e + r0, u[size_t(i) * bw + j], m);
      }
    }
  });
}

}  // namespace tqpipe
