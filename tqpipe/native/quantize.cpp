// Rotation + scale fitting + nearest level + dense bit packing, one row at a time.
//
// Matches tqpipe/quant/{rotation,scales,packing}.py: the same Hadamard as
// mx.hadamard_transform (H_m ⊗ H_2^k, 2^k-chunks contiguous), the same scale
// search (float16 candidates from the RMS scale by over-relaxed least-squares
// steps, the one with the least error kept), and the
// same bit stream. Results agree with the numpy path up to float rounding.

#include "quantize.h"

#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string_view>
#include <vector>

#include "mlx/backend/common/hadamard.h"
#include "mlx/types/half_types.h"
#include "parallel.h"
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

#if defined(__x86_64__) && defined(__GNUC__)
// The same transform with AVX2, n a power of two >= 8: the first three stages inside each 8-lane
// vector (a lane swap and one FMA with ±1 each), the rest two stages per pass over memory.
__attribute__((target("avx2,fma"))) void fwht_avx2(float* x, int n) {
  const __m256 s1 = _mm256_setr_ps(1, -1, 1, -1, 1, -1, 1, -1), s2 = _mm256_setr_ps(1, 1, -1, -1, 1, 1, -1, -1),
               s4 = _mm256_setr_ps(1, 1, 1, 1, -1, -1, -1, -1);
  for (int i = 0; i < n; i += 8) {
    __m256 v = _mm256_loadu_ps(x + i);
    v = _mm256_fmadd_ps(v, s1, _mm256_permute_ps(v, 0xB1));
    v = _mm256_fmadd_ps(v, s2, _mm256_permute_ps(v, 0x4E));
    v = _mm256_fmadd_ps(v, s4, _mm256_permute2f128_ps(v, v, 1));
    _mm256_storeu_ps(x + i, v);
  }
  int h = 8;
  for (; 4 * h <= n; h *= 4)  // stages h and 2h together
    for (int i = 0; i < n; i += 4 * h)
      for (int j = i; j < i + h; j += 8) {
        const __m256 a0 = _mm256_loadu_ps(x + j), a1 = _mm256_loadu_ps(x + j + h);
        const __m256 a2 = _mm256_loadu_ps(x + j + 2 * h), a3 = _mm256_loadu_ps(x + j + 3 * h);
        const __m256 b0 = _mm256_add_ps(a0, a1), b1 = _mm256_sub_ps(a0, a1);
        const __m256 b2 = _mm256_add_ps(a2, a3), b3 = _mm256_sub_ps(a2, a3);
        _mm256_storeu_ps(x + j, _mm256_add_ps(b0, b2));
        _mm256_storeu_ps(x + j + h, _mm256_add_ps(b1, b3));
        _mm256_storeu_ps(x + j + 2 * h, _mm256_sub_ps(b0, b2));
        _mm256_storeu_ps(x + j + 3 * h, _mm256_sub_ps(b1, b3));
      }
  if (h < n)  // one stage left
    for (int j = 0; j < h; j += 8) {
      const __m256 a = _mm256_loadu_ps(x + j), b = _mm256_loadu_ps(x + j + h);
      _mm256_storeu_ps(x + j, _mm256_add_ps(a, b));
      _mm256_storeu_ps(x + j + h, _mm256_sub_ps(a, b));
    }
}

#endif

// The unnormalized transform: its 1/sqrt(block) is folded into the signs the row is loaded with.
void rotate_block(float* x, const BlockHadamard& H, std::vector<float>& tmp) {
#if defined(__x86_64__) && defined(__GNUC__)
  const bool simd = H.n2 >= 8 && has_avx2();
#else
  const bool simd = false;
#endif
  for (int c = 0; c < H.m; ++c) {
#if defined(__x86_64__) && defined(__GNUC__)
    if (simd) {
      fwht_avx2(x + size_t(c) * H.n2, H.n2);
      continue;
    }
#endif
    fwht(x + size_t(c) * H.n2, H.n2);
  }
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
}

#define TQ_INLINE inline __attribute__((always_inline))

constexpr float kRelaxation = 1.5f;  // ω of the least-squares steps between scale candidates (tqpipe.quant.scales)

TQ_INLINE float round_half(float x) { return static_cast<float>(float16_t(x)); }

// The next scale candidate: an over-relaxed least-squares step from s, rounded to float16.
TQ_INLINE float next_candidate(float s, float num, float den) {
  return round_half(s + kRelaxation * ((den > 0 ? num / den : s) - s));
}

// One candidate scale s for a group: its nearest-level indices, ⟨w,c⟩, ⟨c,c⟩ and ‖s·c - w‖².
// Index = #{mids < v}, c = lv[0] + the steps passed: arithmetic over 8 lanes that the compiler vectorizes.
template <int NM>
TQ_INLINE void score_candidate(const float* g, int gs, float s, const float* lv, const float* mids,
                               const float* steps, uint8_t* idx, float& num, float& den, float& err) {
  const float inv = 1.f / (s > 0 ? s : 1.f);
  float nv[8] = {}, dv[8] = {}, ev[8] = {};
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
      const float d = c[j] * s - g[i + j];
      idx[i + j] = uint8_t(k[j]);
      nv[j] += g[i + j] * c[j];
      dv[j] += c[j] * c[j];
      ev[j] += d * d;
    }
  }
  num = den = err = 0.f;
  for (int j = 0; j < 8; ++j) {
    num += nv[j];
    den += dv[j];
    err += ev[j];
  }
}

// The scale search of tqpipe.quant.scales.quantize_groups for one group: up to `candidates` float16
// scales from the RMS one, the best kept. idx gets its indices, err[0..2] += ‖w‖², ‖ŵ-w‖², ⟨ŵ,w⟩.
template <int NM>
TQ_INLINE void quantize_group_t(const float* g, int gs, const float* lv, const float* mids, const float* steps,
                                int candidates, uint8_t* idx, uint8_t* scratch, float16_t* scale_out,
                                float* err) {
  float sv[8] = {};
  for (int i = 0; i < gs; i += 8)
    for (int j = 0; j < 8; ++j) sv[j] += g[i + j] * g[i + j];
  float ss = 0.f;
  for (int j = 0; j < 8; ++j) ss += sv[j];
  float s = round_half(std::sqrt(ss / gs)), best_s = s, best_e = INFINITY, best_num = 0.f;
  for (int t = 0; t < candidates; ++t) {
    float num, den, e;
    score_candidate<NM>(g, gs, s, lv, mids, steps, scratch, num, den, e);
    if (e < best_e) {
      best_s = s, best_e = e, best_num = num;
      std::memcpy(idx, scratch, size_t(gs));
    }
    const float next = next_candidate(s, num, den);
    if (next == s) break;  // the float16 scale no longer moves
    s = next;
  }
  err[0] += ss;
  err[1] += best_e;
  err[2] += best_s * best_num;
  *scale_out = float16_t(best_s);
}

TQ_CLONES void quantize_group(int bits, const float* g, int gs, const float* lv, const float* mids,
                              const float* steps, int candidates, uint8_t* idx, uint8_t* scratch,
                              float16_t* scale_out, float* err) {
  switch (bits) {
    case 1: return quantize_group_t<1>(g, gs, lv, mids, steps, candidates, idx, scratch, scale_out, err);
    case 2: return quantize_group_t<3>(g, gs, lv, mids, steps, candidates, idx, scratch, scale_out, err);
    case 3: return quantize_group_t<7>(g, gs, lv, mids, steps, candidates, idx, scratch, scale_out, err);
    case 4: return quantize_group_t<15>(g, gs, lv, mids, steps, candidates, idx, scratch, scale_out, err);
    case 5: return quantize_group_t<31>(g, gs, lv, mids, steps, candidates, idx, scratch, scale_out, err);
    case 6: return quantize_group_t<63>(g, gs, lv, mids, steps, candidates, idx, scratch, scale_out, err);
    case 7: return quantize_group_t<127>(g, gs, lv, mids, steps, candidates, idx, scratch, scale_out, err);
    default: return quantize_group_t<255>(g, gs, lv, mids, steps, candidates, idx, scratch, scale_out, err);
  }
}

#if defined(__x86_64__) && defined(__GNUC__)


// Nearest level of each lane of v: its index counts the midpoints below it (a compare mask is -1).
template <int NM>
__attribute__((target("avx2,fma"), always_inline)) inline __m256i nearest_index(__m256 v, const __m256* mv) {
  __m256i k = _mm256_setzero_si256();
  for (int t = 0; t < NM; ++t) k = _mm256_sub_epi32(k, _mm256_castps_si256(_mm256_cmp_ps(v, mv[t], _CMP_GT_OQ)));
  return k;
}

// For a codebook symmetric about 0 (mids[t] = -mids[NM-1-t], Lloyd-Max's) and v = |x|/s: the number
// of positive midpoints below v, 2^(B-1) - 1 compares instead of 2^B - 1. The caller mirrors it by
// x's sign: the level is levels[NH + 1 + c] for x > 0 and levels[NH - c] otherwise. Only an x exactly
// on a negative midpoint (equally far from both levels) may get the other neighbour than numpy's.
template <int NM>
__attribute__((target("avx2,fma"), always_inline)) inline __m256i nearest_count_positive(__m256 v, const __m256* mv) {
  constexpr int NH = NM / 2;  // mids[NH] = 0; mv[NH + 1 ...] are the positive ones
  __m256i c = _mm256_setzero_si256();
  for (int t = NH + 1; t < NM; ++t) c = _mm256_sub_epi32(c, _mm256_castps_si256(_mm256_cmp_ps(v, mv[t], _CMP_GT_OQ)));
  return c;
}

// levels[k] per lane from a 16-entry table in two registers
template <int B>
__attribute__((target("avx2,fma"), always_inline)) inline __m256 level_at(__m256i k, __m256 lo, __m256 hi) {
  __m256 c = _mm256_permutevar8x32_ps(lo, k);
  if constexpr (B == 4)
    c = _mm256_blendv_ps(c, _mm256_permutevar8x32_ps(hi, k), _mm256_castsi256_ps(_mm256_slli_epi32(k, 28)));
  return c;
}

// Lane j = the sum of the 8 lanes of v[j].
__attribute__((target("avx2,fma"), always_inline)) inline __m256 sum_lanes8(const __m256* v) {
  const __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
  const __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

// 32 indices as 4 vectors of 8, each index already shifted to bit j·B of its 8B-bit chunk -> B words.
template <int B>
__attribute__((target("avx2,fma"), always_inline)) inline void pack32(const __m256i* kv, uint32_t* out) {
  // the four chunks (disjoint bits, so sums are ORs), then the block's B words
  const __m256i t = _mm256_hadd_epi32(_mm256_hadd_epi32(kv[0], kv[1]), _mm256_hadd_epi32(kv[2], kv[3]));
  const __m128i u = _mm_add_epi32(_mm256_castsi256_si128(t), _mm256_extracti128_si256(t, 1));  // 4 chunks of 8B bits
  if constexpr (B == 4) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out), u);
  } else if constexpr (B == 3) {  // 24-bit chunks: word i = chunk i >> 8i | chunk i+1 << (24 - 8i)
    const __m128i lo = _mm_srlv_epi32(u, _mm_setr_epi32(0, 8, 16, 0));
    const __m128i hi = _mm_sllv_epi32(_mm_shuffle_epi32(u, 0xF9), _mm_setr_epi32(24, 16, 8, 0));
    const __m128i w = _mm_or_si128(lo, hi);
    _mm_storel_epi64(reinterpret_cast<__m128i*>(out), w);
    out[2] = uint32_t(_mm_extract_epi32(w, 2));
  } else if constexpr (B == 2) {  // 16-bit chunks, two per word
    _mm_storel_epi64(reinterpret_cast<__m128i*>(out), _mm_packus_epi32(u, u));
  } else {  // 8-bit chunks, four per word
    const __m128i h = _mm_packus_epi32(u, u);
    out[0] = uint32_t(_mm_cvtsi128_si32(_mm_packus_epi16(h, h)));
  }
}

// blocks × B words, inline: a memcpy call here would make the compiler spill and reload the vector
// registers around it for every group that improves
template <int B>
__attribute__((target("avx2,fma"), always_inline)) inline void copy_words(const uint32_t* src, uint32_t* dst,
                                                                          int blocks) {
  for (int b = 0; b < blocks; ++b, src += B, dst += B) {
    if constexpr (B == 4) {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm_loadu_si128(reinterpret_cast<const __m128i*>(src)));
    } else {
      if constexpr (B >= 2) _mm_storel_epi64(reinterpret_cast<__m128i*>(dst), _mm_loadl_epi64(reinterpret_cast<const __m128i*>(src)));
      if constexpr (B != 2) dst[B - 1] = src[B - 1];
    }
  }
}

// x rounded to float16 and back, 8 lanes (F16C; the same round-to-nearest-even as float16_t)
__attribute__((target("avx2,fma,f16c"), always_inline)) inline __m256 round_half8(__m256 x) {
  return _mm256_cvtph_ps(_mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

// One row, bits <= 4, group size a multiple of 32: the scale search of the portable path, 8 groups
// interleaved, their scales and errors one lane each. Each candidate pass yields the bit stream and
// exact error of that scale, so the best one is kept without a final pass. scratch holds 8 groups'
// packed words.
template <int B, bool Symmetric>
__attribute__((target("avx2,fma,f16c"))) void quantize_row_avx2(float* row, int n, int gs, const float* mids,
                                                               const float* lv, int candidates, uint32_t* packed,
                                                               float16_t* scales, double* err, uint32_t* scratch,
                                                               float* neg) {
  constexpr int NM = (1 << B) - 1;
  __m256 mv[NM];
  for (int t = 0; t < NM; ++t) mv[t] = _mm256_set1_ps(mids[t]);
  alignas(32) float lut[16] = {};
  for (int i = 0; i <= NM; ++i) lut[i] = lv[i];
  const __m256 lut_lo = _mm256_load_ps(lut), lut_hi = _mm256_load_ps(lut + 8);
  const __m256 lut_pos = _mm256_loadu_ps(lut + (NM + 1) / 2), sign_bit = _mm256_set1_ps(-0.f);  // levels ≥ 0
  const __m256i first_pos = _mm256_set1_epi32((NM + 1) / 2);  // index of the smallest positive level
  const __m256i lane_shift = _mm256_setr_epi32(0, B, 2 * B, 3 * B, 4 * B, 5 * B, 6 * B, 7 * B);
  const __m256 zero = _mm256_setzero_ps(), one = _mm256_set1_ps(1.f), omega = _mm256_set1_ps(kRelaxation);
  const int groups = n / gs, words = gs * B / 32;
  for (int gb = 0; gb < groups; gb += 8) {
    const int cnt = std::min(8, groups - gb);
    float* g0 = row + size_t(gb) * gs;  // the symmetric path overwrites it with |x|
    __m256 part[8];
    for (int j = 0; j < 8; ++j) {
      __m256 acc = _mm256_setzero_ps();  // (a zeroed array would be cleared with a slow `rep stos`)
      for (int i = 0; j < cnt && i < gs; i += 8) {
        const __m256 x = _mm256_loadu_ps(g0 + j * gs + i);
        acc = _mm256_fmadd_ps(x, x, acc);
        if constexpr (Symmetric) {  // once per group, not per candidate: |x| in place, and x ≤ 0 as a lane mask
          _mm256_storeu_ps(g0 + j * gs + i, _mm256_andnot_ps(sign_bit, x));
          _mm256_storeu_ps(neg + j * gs + i, _mm256_cmp_ps(x, zero, _CMP_LE_OQ));
        }
      }
      part[j] = acc;
    }
    const __m256 ss = sum_lanes8(part);
    __m256 s = round_half8(_mm256_sqrt_ps(_mm256_div_ps(ss, _mm256_set1_ps(float(gs)))));
    __m256 best_s = s, best_e = _mm256_set1_ps(INFINITY), best_num = zero;
    unsigned moving = (1u << cnt) - 1;  // groups whose float16 scale still moves
    for (int t = 0; moving && t < candidates; ++t) {
      alignas(32) float sj[8], ij[8];
      _mm256_store_ps(sj, s);
      _mm256_store_ps(ij, _mm256_div_ps(one, _mm256_blendv_ps(one, s, _mm256_cmp_ps(s, zero, _CMP_GT_OQ))));
      __m256 num[8], den[8];
      for (int j = 0; j < 8; ++j) {
        __m256 an = _mm256_setzero_ps(), ad = an;  // in registers: arrays indexed by j would live on the stack
        if (moving >> j & 1) {
          const __m256 ib = _mm256_set1_ps(ij[j]), sb = _mm256_set1_ps(sj[j]);
          const float* g = g0 + size_t(j) * gs;
          for (int b0 = 0; b0 < gs; b0 += 32) {
            __m256i kv[4];
            for (int i = 0; i < 32; i += 8) {
              const __m256 x = _mm256_loadu_ps(g + b0 + i);
              const __m256 v = _mm256_mul_ps(x, ib);
              if constexpr (Symmetric) {  // x holds |w| here; the level is ±p, of w's sign, so w·level = |w|·p
                const __m256i c = nearest_count_positive<NM>(v, mv);
                const __m256 p = _mm256_permutevar8x32_ps(lut_pos, c);
                // levels[NH + 1 + c] for w > 0, levels[NH - c] = levels[NH + 1 + ~c] otherwise
                const __m256i k = _mm256_add_epi32(
                    _mm256_xor_si256(c, _mm256_castps_si256(_mm256_loadu_ps(neg + j * gs + b0 + i))), first_pos);
                kv[i / 8] = _mm256_sllv_epi32(k, lane_shift);  // index j of 8 at bit j·B
                an = _mm256_fmadd_ps(x, p, an);
                ad = _mm256_fmadd_ps(p, p, ad);
              } else {
                const __m256i k = nearest_index<NM>(v, mv);
                const __m256 c = level_at<B>(k, lut_lo, lut_hi);
                kv[i / 8] = _mm256_sllv_epi32(k, lane_shift);
                an = _mm256_fmadd_ps(x, c, an);
                ad = _mm256_fmadd_ps(c, c, ad);
              }
            }
            pack32<B>(kv, scratch + size_t(j) * words + b0 / 32 * B);
          }
        }
        num[j] = an, den[j] = ad;
      }
      const __m256 nm = sum_lanes8(num), dn = sum_lanes8(den);
      // ‖s·c - w‖² = s²⟨c,c⟩ - 2s⟨w,c⟩ + ‖w‖²: two fewer operations per 8 weights than summing the squares
      const __m256 er = _mm256_max_ps(zero, _mm256_fmadd_ps(s, _mm256_fmsub_ps(s, dn, _mm256_add_ps(nm, nm)), ss));
      const unsigned live = moving;
      const __m256 better = _mm256_cmp_ps(er, best_e, _CMP_LT_OQ);  // NaN never wins, as in the scalar path
      for (unsigned m = unsigned(_mm256_movemask_ps(better)) & live; m; m &= m - 1) {
        const int j = __builtin_ctz(m);
        copy_words<B>(scratch + size_t(j) * words, packed + size_t(gb + j) * words, gs / 32);
      }
      const __m256 take = _mm256_and_ps(better, _mm256_castsi256_ps(_mm256_cmpgt_epi32(
          _mm256_and_si256(_mm256_set1_epi32(int(live)), _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128)),
          _mm256_setzero_si256())));
      best_s = _mm256_blendv_ps(best_s, s, take);
      best_e = _mm256_blendv_ps(best_e, er, take);
      best_num = _mm256_blendv_ps(best_num, nm, take);
      // the next candidate: an over-relaxed least-squares step, rounded to float16 (next_candidate)
      const __m256 ls = _mm256_blendv_ps(s, _mm256_div_ps(nm, dn), _mm256_cmp_ps(dn, zero, _CMP_GT_OQ));
      const __m256 next = round_half8(_mm256_add_ps(s, _mm256_mul_ps(omega, _mm256_sub_ps(ls, s))));
      moving &= unsigned(_mm256_movemask_ps(_mm256_cmp_ps(next, s, _CMP_NEQ_UQ)));
      s = next;
    }
    alignas(32) float bs[8], be[8], bn[8], sq[8];
    alignas(16) uint16_t half[8];
    _mm_store_si128(reinterpret_cast<__m128i*>(half), _mm256_cvtps_ph(best_s, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    _mm256_store_ps(bs, best_s);
    _mm256_store_ps(be, best_e);
    _mm256_store_ps(bn, best_num);
    _mm256_store_ps(sq, ss);
    std::memcpy(scales + gb, half, sizeof(uint16_t) * size_t(cnt));
    for (int j = 0; j < cnt; ++j) {
      err[0] += sq[j];
      err[1] += be[j];
      err[2] += bs[j] * bn[j];
    }
  }
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

// row[i] = w[i] · signs[i] in float32 (signs: ±1/sqrt(block), the rotation's signs and its normalization)
template <class T>
void load_row_scalar(const T* src, const float* signs, int n, float* row) {
  for (int i = 0; i < n; ++i) row[i] = to_float(src[i]) * signs[i];
}

#if defined(__x86_64__) && defined(__GNUC__)
template <class T>
__attribute__((target("avx2,fma"))) void load_row_avx2(const T* src, const float* signs, int n, float* row) {
  int i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256 v;
    if constexpr (sizeof(T) == 2)  // bfloat16 bits: widen, shift into the top half
      v = _mm256_castsi256_ps(_mm256_slli_epi32(
          _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))), 16));
    else
      v = _mm256_loadu_ps(reinterpret_cast<const float*>(src + i));
    _mm256_storeu_ps(row + i, _mm256_mul_ps(v, _mm256_loadu_ps(signs + i)));
  }
  load_row_scalar(src + i, signs + i, n - i, row + i);
}
#endif

template <class T>
void load_row(const T* src, const float* signs, int n, float* row) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (has_avx2()) return load_row_avx2(src, signs, n, row);
#endif
  load_row_scalar(src, signs, n, row);
}

template <class T>
ErrorSums quantize_rows(const T* w, int64_t rows, const int8_t* signs, const float* levels,
                        const QuantizeSpec& spec, uint32_t* packed, uint16_t* scales) {
  const int n = spec.n, gs = spec.group_size, L = 1 << spec.bits;
  if (spec.bits < 1 || spec.bits > 8 || gs % 32 || n % gs || n % spec.block)
    throw std::invalid_argument("[quantize_rows] bad bits, group size or block for this width");
  const BlockHadamard H(spec.block);
  std::vector<float> mids(L - 1), steps(L - 1);
  for (int t = 0; t + 1 < L; ++t) {
    mids[t] = (levels[t] + levels[t + 1]) / 2;
    steps[t] = levels[t + 1] - levels[t];
  }
  const int words = n * spec.bits / 32, groups = n / gs, candidates = std::max(1, spec.candidates);
  bool symmetric = L >= 4;  // the mirrored nearest-level search (fewer compares) needs mids[t] = -mids[L-2-t]
  for (int t = 0; t + 1 < L; ++t) symmetric = symmetric && mids[t] == -mids[L - 2 - t];
  std::vector<float> scaled_signs(n);  // the orthonormal Hadamard's 1/sqrt(block), applied as the row is loaded
  for (int i = 0; i < n; ++i) scaled_signs[i] = float(signs[i]) * H.scale;
  std::vector<double> row_err(size_t(rows) * 3, 0.0);  // per row, summed in order below: thread-count independent
  // rows are independent: split them over the worker pool, each part with its own buffers, in 8 parts
  // per thread (pack's reader and shard-writer threads take cores from the quantizer now and then)
  parallel_for(size_t(rows), size_t(rows) * n * 8, [&](size_t r0, size_t r1) {
    std::vector<float> row(n), tmp;
    std::vector<uint8_t> idx(n), scratch(gs);
    std::vector<uint32_t> scratch_words(size_t(8) * gs * spec.bits / 32 + 1);
    std::vector<float> neg(size_t(8) * gs);  // sign masks of 8 groups (symmetric path)
    for (size_t r = r0; r < r1; ++r) {
      load_row(w + r * n, scaled_signs.data(), n, row.data());
      for (int b = 0; b < n; b += spec.block) rotate_block(row.data() + b, H, tmp);
      float16_t* sc = reinterpret_cast<float16_t*>(scales + r * groups);
      double* e = row_err.data() + 3 * r;
      uint32_t* out = packed + r * words;
#if defined(__x86_64__) && defined(__GNUC__)
      if (spec.bits <= 4 && has_avx2()) {
        float* x = row.data();
        uint32_t* sw = scratch_words.data();
        float* ng = neg.data();
        const float* m = mids.data();
        switch (spec.bits * 2 + symmetric) {
          case 2: case 3: quantize_row_avx2<1, false>(x, n, gs, m, levels, candidates, out, sc, e, sw, ng); break;
          case 4: quantize_row_avx2<2, false>(x, n, gs, m, levels, candidates, out, sc, e, sw, ng); break;
          case 5: quantize_row_avx2<2, true>(x, n, gs, m, levels, candidates, out, sc, e, sw, ng); break;
          case 6: quantize_row_avx2<3, false>(x, n, gs, m, levels, candidates, out, sc, e, sw, ng); break;
          case 7: quantize_row_avx2<3, true>(x, n, gs, m, levels, candidates, out, sc, e, sw, ng); break;
          case 8: quantize_row_avx2<4, false>(x, n, gs, m, levels, candidates, out, sc, e, sw, ng); break;
          default: quantize_row_avx2<4, true>(x, n, gs, m, levels, candidates, out, sc, e, sw, ng); break;
        }
        continue;
      }
#endif
      float ef[3] = {0.f, 0.f, 0.f};
      for (int gi = 0; gi < groups; ++gi)
        quantize_group(spec.bits, row.data() + size_t(gi) * gs, gs, levels, mids.data(), steps.data(), candidates,
                       idx.data() + size_t(gi) * gs, scratch.data(), sc + gi, ef);
      pack_row(idx.data(), n, spec.bits, out);
      for (int k = 0; k < 3; ++k) e[k] = ef[k];
    }
  }, /*parts_per_thread=*/8);
  ErrorSums err;
  for (int64_t r = 0; r < rows; ++r) {
    err.w2 += row_err[3 * r];
    err.d2 += row_err[3 * r + 1];
    err.wh += row_err[3 * r + 2];
  }
  return err;
}

float fit_group_scale(const float* g, int gs, int bits, const float* levels, const float* mids, const float* steps,
                      int candidates, uint8_t* idx, uint8_t* scratch) {
  float16_t scale;
  float err[3] = {0.f, 0.f, 0.f};
  quantize_group(bits, g, gs, levels, mids, steps, std::max(1, candidates), idx, scratch, &scale, err);
  return static_cast<float>(scale);
}

template ErrorSums quantize_rows<float>(const float*, int64_t, const int8_t*, const float*, const QuantizeSpec&,
                                        uint32_t*, uint16_t*);
template ErrorSums quantize_rows<uint16_t>(const uint16_t*, int64_t, const int8_t*, const float*,
                                           const QuantizeSpec&, uint32_t*, uint16_t*);

}  // namespace tqpipe
