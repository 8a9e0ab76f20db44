// Rotation + scale fitting + nearest level + dense bit packing, one row at a time.
//
// Matches tqpipe/quant/{rotation,scales,packing}.py: the same Hadamard as
// mx.hadamard_transform (H_m ⊗ H_2^k, 2^k-chunks contiguous), the same scale
// rules (RMS start, then least-squares steps, rounded to float16), and the
// same bit stream. Results agree with the numpy path up to float rounding.

#include "quantize.h"

#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string_view>
#include <vector>

#include "mlx/backend/common/hadamard.h"
#include "mlx/types/half_types.h"
#include "simd.h"

#if defined(__x86_64__) && defined(__GNUC__)
#define TQ_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define TQ_CLONES
#endif

namespace tqpipe {

namespace {

using mlx::core::float16_t;

// In-place orthonormal Hadamard of one block of size n2·m.
struct BlockHadamard {
  int n2 = 1, m = 1;
  float scale = 1.f;
  std::vector<float> hm;  // m × m, ±1
  explicit BlockHadamard(int block) {
    auto [p, f] = mlx::core::decompose_hadamard(block);
    n2 = p;
    m = f;
    scale = 1.f / std::sqrt(float(block));
    if (m > 1) {
      std::string_view mat = mlx::core::hadamard_matrices().at(m);
      for (char c : mat)
        if (c == '+' || c == '-') hm.push_back(c == '+' ? 1.f : -1.f);
    }
  }
};

TQ_CLONES void fwht(float* x, int n) {
  int h = 1;
  if (n >= 8) {  // the first three stages as one radix-8 butterfly per 8 values (short loops don't vectorize)
    for (int i = 0; i < n; i += 8) {
      float* v = x + i;
      const float a0 = v[0] + v[1], a1 = v[0] - v[1], a2 = v[2] + v[3], a3 = v[2] - v[3];
      const float a4 = v[4] + v[5], a5 = v[4] - v[5], a6 = v[6] + v[7], a7 = v[6] - v[7];
      const float b0 = a0 + a2, b1 = a1 + a3, b2 = a0 - a2, b3 = a1 - a3;
      const float b4 = a4 + a6, b5 = a5 + a7, b6 = a4 - a6, b7 = a5 - a7;
      v[0] = b0 + b4, v[1] = b1 + b5, v[2] = b2 + b6, v[3] = b3 + b7;
      v[4] = b0 - b4, v[5] = b1 - b5, v[6] = b2 - b6, v[7] = b3 - b7;
    }
    h = 8;
  }
  for (; h < n; h <<= 1)
    for (int i = 0; i < n; i += 2 * h)
      for (int j = i; j < i + h; ++j) {
        const float a = x[j], b = x[j + h];
        x[j] = a + b;
        x[j + h] = a - b;
      }
}

void rotate_block(float* x, const BlockHadamard& H, std::vector<float>& tmp) {
  for (int c = 0; c < H.m; ++c) fwht(x + size_t(c) * H.n2, H.n2);
  if (H.m > 1) {
    tmp.assign(size_t(H.m) * H.n2, 0.f);
    for (int j = 0; j < H.m; ++j)
      for (int k = 0; k < H.m; ++k) {
        const float sgn = H.hm[size_t(j) * H.m + k];
        const float* src = x + size_t(k) * H.n2;
        float* dst = tmp.data() + size_t(j) * H.n2;
        for (int i = 0; i < H.n2; ++i) dst[i] += sgn * src[i];
      }
    std::copy(tmp.begin(), tmp.end(), x);
  }
  const int size = H.n2 * H.m;
  for (int i = 0; i < size; ++i) x[i] *= H.scale;
}

#define TQ_INLINE inline __attribute__((always_inline))

// Index and level of v without a table lookup: idx = #{mids < v}, c = lv[0] + sum of the steps passed.
// Written as arithmetic over 8 lanes so that the compiler vectorizes it.
template <int NM>
TQ_INLINE void group_stats(const float* g, int gs, float inv, const float* lv, const float* mids,
                           const float* steps, float& num, float& den) {
  float nv[8] = {}, dv[8] = {};
  for (int i = 0; i < gs; i += 8) {
    float v[8], c[8];
    for (int j = 0; j < 8; ++j) {
      v[j] = g[i + j] * inv;
      c[j] = lv[0];
    }
    for (int t = 0; t < NM; ++t) {
      const float m = mids[t], st = steps[t];
      for (int j = 0; j < 8; ++j) c[j] += v[j] > m ? st : 0.f;
    }
    for (int j = 0; j < 8; ++j) {
      nv[j] += g[i + j] * c[j];
      dv[j] += c[j] * c[j];
    }
  }
  num = den = 0.f;
  for (int j = 0; j < 8; ++j) {
    num += nv[j];
    den += dv[j];
  }
}

template <int NM>
TQ_INLINE void quantize_group_t(const float* g, int gs, const float* lv, const float* mids, const float* steps,
                                bool mse, int iters, uint8_t* idx, float16_t* scale_out, float* err) {
  float sv[8] = {};
  for (int i = 0; i < gs; i += 8)
    for (int j = 0; j < 8; ++j) sv[j] += g[i + j] * g[i + j];
  float ss = 0.f;
  for (int j = 0; j < 8; ++j) ss += sv[j];
  float scale = std::sqrt(ss / gs);
  if (mse) {
    for (int it = 0; it < iters; ++it) {
      float num, den;
      group_stats<NM>(g, gs, scale > 0 ? 1.f / scale : 1.f, lv, mids, steps, num, den);
      if (den > 0) scale = num / den;
    }
  }
  const float16_t s16(scale);
  const float s = static_cast<float>(s16);
  const float inv = 1.f / (s > 0 ? s : 1.f);
  float w2[8] = {}, d2[8] = {}, wh[8] = {};
  for (int i = 0; i < gs; i += 8) {
    float v[8], c[8], k[8];
    for (int j = 0; j < 8; ++j) {
      v[j] = g[i + j] * inv;
      c[j] = lv[0];
      k[j] = 0.f;
    }
    for (int t = 0; t < NM; ++t) {
      const float m = mids[t], st = steps[t];
      for (int j = 0; j < 8; ++j) {
        const bool up = v[j] > m;
        c[j] += up ? st : 0.f;
        k[j] += up ? 1.f : 0.f;
      }
    }
    for (int j = 0; j < 8; ++j) {
      const float x = g[i + j], xh = c[j] * s;
      idx[i + j] = uint8_t(k[j]);
      w2[j] += x * x;
      d2[j] += (xh - x) * (xh - x);
      wh[j] += xh * x;
    }
  }
  for (int j = 0; j < 8; ++j) {
    err[0] += w2[j];
    err[1] += d2[j];
    err[2] += wh[j];
  }
  *scale_out = s16;
}

TQ_CLONES void quantize_group(int bits, const float* g, int gs, const float* lv, const float* mids,
                              const float* steps, bool mse, int iters, uint8_t* idx, float16_t* scale_out,
                              float* err) {
  switch (bits) {
    case 1: return quantize_group_t<1>(g, gs, lv, mids, steps, mse, iters, idx, scale_out, err);
    case 2: return quantize_group_t<3>(g, gs, lv, mids, steps, mse, iters, idx, scale_out, err);
    case 3: return quantize_group_t<7>(g, gs, lv, mids, steps, mse, iters, idx, scale_out, err);
    case 4: return quantize_group_t<15>(g, gs, lv, mids, steps, mse, iters, idx, scale_out, err);
    case 5: return quantize_group_t<31>(g, gs, lv, mids, steps, mse, iters, idx, scale_out, err);
    case 6: return quantize_group_t<63>(g, gs, lv, mids, steps, mse, iters, idx, scale_out, err);
    case 7: return quantize_group_t<127>(g, gs, lv, mids, steps, mse, iters, idx, scale_out, err);
    default: return quantize_group_t<255>(g, gs, lv, mids, steps, mse, iters, idx, scale_out, err);
  }
}

// 32 indices (as int32) -> B words, shifts known at compile time.
template <int B>
inline void pack32(const int32_t* idx, uint32_t* out) {
  uint32_t w[B] = {};
#pragma GCC unroll 32
  for (int k = 0; k < 32; ++k) {
    const int bit = k * B, word = bit >> 5, off = bit & 31;
    w[word] |= uint32_t(idx[k]) << off;
    if (off + B > 32) w[word + 1] |= uint32_t(idx[k]) >> (32 - off);
  }
  for (int i = 0; i < B; ++i) out[i] = w[i];
}

#if defined(__x86_64__) && defined(__GNUC__)


// One row, bits <= 4, group size a multiple of 32: the scale search, the nearest levels, the bit
// stream and the error sums, 8 lanes at a time. Same arithmetic as the portable path.
template <int B>
__attribute__((target("avx2,fma"))) void quantize_row_avx2(const float* row, int n, int gs, const float* lv,
                                                          const float* mids, const float* steps, bool mse,
                                                          int iters, uint32_t* packed, float16_t* scales,
                                                          double* err) {
  constexpr int NM = (1 << B) - 1;
  __m256 mv[NM], sv[NM];
  for (int t = 0; t < NM; ++t) {
    mv[t] = _mm256_set1_ps(mids[t]);
    sv[t] = _mm256_set1_ps(steps[t]);
  }
  const __m256 lv0 = _mm256_set1_ps(lv[0]), one = _mm256_set1_ps(1.f);
  __m256 w2 = _mm256_setzero_ps(), d2 = w2, wh = w2;
  alignas(32) int32_t idx[32];
  for (int g0 = 0; g0 < n; g0 += gs) {
    const float* g = row + g0;
    __m256 acc = _mm256_setzero_ps();
    for (int i = 0; i < gs; i += 8) {
      const __m256 x = _mm256_loadu_ps(g + i);
      acc = _mm256_fmadd_ps(x, x, acc);
    }
    float scale = std::sqrt(hsum8(acc) / gs);
    for (int it = 0; mse && it < iters; ++it) {
      const __m256 inv = _mm256_set1_ps(scale > 0 ? 1.f / scale : 1.f);
      __m256 num = _mm256_setzero_ps(), den = num;
      for (int i = 0; i < gs; i += 8) {
        const __m256 x = _mm256_loadu_ps(g + i), v = _mm256_mul_ps(x, inv);
        __m256 c = lv0;
        for (int t = 0; t < NM; ++t) c = _mm256_add_ps(c, _mm256_and_ps(_mm256_cmp_ps(v, mv[t], _CMP_GT_OQ), sv[t]));
        num = _mm256_fmadd_ps(x, c, num);
        den = _mm256_fmadd_ps(c, c, den);
      }
      const float dn = hsum8(den);
      if (dn > 0) scale = hsum8(num) / dn;
    }
    const float16_t s16(scale);
    const float s = static_cast<float>(s16);
    *scales++ = s16;
    const __m256 inv = _mm256_set1_ps(1.f / (s > 0 ? s : 1.f)), sb = _mm256_set1_ps(s);
    for (int b0 = 0; b0 < gs; b0 += 32) {
      for (int i = 0; i < 32; i += 8) {
        const __m256 x = _mm256_loadu_ps(g + b0 + i), v = _mm256_mul_ps(x, inv);
        __m256 c = lv0, k = _mm256_setzero_ps();
        for (int t = 0; t < NM; ++t) {
          const __m256 up = _mm256_cmp_ps(v, mv[t], _CMP_GT_OQ);
          c = _mm256_add_ps(c, _mm256_and_ps(up, sv[t]));
          k = _mm256_add_ps(k, _mm256_and_ps(up, one));
        }
        _mm256_store_si256(reinterpret_cast<__m256i*>(idx + i), _mm256_cvttps_epi32(k));
        const __m256 xh = _mm256_mul_ps(c, sb), d = _mm256_sub_ps(xh, x);
        w2 = _mm256_fmadd_ps(x, x, w2);
        d2 = _mm256_fmadd_ps(d, d, d2);
        wh = _mm256_fmadd_ps(xh, x, wh);
      }
      pack32<B>(idx, packed);
      packed += B;
    }
  }
  err[0] += hsum8(w2);
  err[1] += hsum8(d2);
  err[2] += hsum8(wh);
}

#endif

void pack_row(const uint8_t* idx, int n, int bits, uint32_t* out) {
  const int words = n * bits / 32;
  for (int w = 0; w < words; ++w) out[w] = 0;
  for (int k = 0; k < n; ++k) {
    const int64_t bit = int64_t(k) * bits;
    const int word = int(bit >> 5), off = int(bit & 31);
    out[word] |= uint32_t(idx[k]) << off;
    if (off + bits > 32) out[word + 1] |= uint32_t(idx[k]) >> (32 - off);
  }
}

}  // namespace

inline float to_float(float v) { return v; }
inline float to_float(uint16_t bf16_bits) {  // bfloat16 is the top half of a float32
  uint32_t u = uint32_t(bf16_bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

template <class T>
ErrorSums quantize_rows(const T* w, int64_t rows, const int8_t* signs, const float* levels,
                        const QuantizeSpec& spec, uint32_t* packed, uint16_t* scales) {
  const int n = spec.n, gs = spec.group_size, L = 1 << spec.bits;
  if (spec.bits < 1 || spec.bits > 8 || gs % 32 || n % gs || n % spec.block)
    throw std::invalid_argument("[quantize_rows] bad bits, group size or block for this width");
  BlockHadamard H(spec.block);
  std::vector<float> mids(L - 1), steps(L - 1), row(n), tmp;
  for (int t = 0; t + 1 < L; ++t) {
    mids[t] = (levels[t] + levels[t + 1]) / 2;
    steps[t] = levels[t + 1] - levels[t];
  }
  std::vector<uint8_t> idx(n);
  const int words = n * spec.bits / 32, groups = n / gs;
  ErrorSums err;
  for (int64_t r = 0; r < rows; ++r) {
    const T* src = w + r * n;
    for (int i = 0; i < n; ++i) row[i] = to_float(src[i]) * float(signs[i]);
    for (int b = 0; b < n; b += spec.block) rotate_block(row.data() + b, H, tmp);
    float16_t* sc = reinterpret_cast<float16_t*>(scales + r * groups);
#if defined(__x86_64__) && defined(__GNUC__)
    if (spec.bits <= 4 && has_avx2()) {
      double e4[3] = {0, 0, 0};
      uint32_t* out = packed + r * words;
      switch (spec.bits) {
        case 1: quantize_row_avx2<1>(row.data(), n, gs, levels, mids.data(), steps.data(), spec.mse, spec.iters, out, sc, e4); break;
        case 2: quantize_row_avx2<2>(row.data(), n, gs, levels, mids.data(), steps.data(), spec.mse, spec.iters, out, sc, e4); break;
        case 3: quantize_row_avx2<3>(row.data(), n, gs, levels, mids.data(), steps.data(), spec.mse, spec.iters, out, sc, e4); break;
        default: quantize_row_avx2<4>(row.data(), n, gs, levels, mids.data(), steps.data(), spec.mse, spec.iters, out, sc, e4); break;
      }
      err.w2 += e4[0];
      err.d2 += e4[1];
      err.wh += e4[2];
      continue;
    }
#endif
    float e[3] = {0.f, 0.f, 0.f};
    for (int gi = 0; gi < groups; ++gi)
      quantize_group(spec.bits, row.data() + size_t(gi) * gs, gs, levels, mids.data(), steps.data(), spec.mse,
                     spec.iters, idx.data() + size_t(gi) * gs, sc + gi, e);
    pack_row(idx.data(), n, spec.bits, packed + r * words);
    err.w2 += e[0];
    err.d2 += e[1];
    err.wh += e[2];
  }
  return err;
}

template ErrorSums quantize_rows<float>(const float*, int64_t, const int8_t*, const float*, const QuantizeSpec&,
                                        uint32_t*, uint16_t*);
template ErrorSums quantize_rows<uint16_t>(const uint16_t*, int64_t, const int8_t*, const float*,
                                           const QuantizeSpec&, uint32_t*, uint16_t*);

}  // namespace tqpipe
