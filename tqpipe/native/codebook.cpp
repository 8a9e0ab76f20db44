// CPU kernels for codebook-quantized matrices (see codebook.h for the format).
//
// The hot loops are compiled twice on x86-64, for AVX2/FMA (x86-64-v3) and for
// the baseline, and the loader picks one at run time (GCC/Clang target_clones).
// Other architectures (arm64: NEON is baseline) get one generic build.

#include "codebook.h"

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "mlx/allocator.h"
#include "simd.h"
#include "mlx/backend/cpu/encoder.h"

#if defined(__x86_64__) && defined(__GNUC__)
#define TQ_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define TQ_CLONES
#endif
#define TQ_INLINE inline __attribute__((always_inline))

namespace tqpipe {

namespace {

// 32 consecutive indices (B words) -> their codebook levels.
template <int B>
TQ_INLINE void decode32(const uint32_t* w, const float* levels, float* out) {
#pragma GCC unroll 32
  for (int k = 0; k < 32; ++k) {
    const int bit = k * B, word = bit >> 5, off = bit & 31;
    uint32_t v = w[word] >> off;
    if (off + B > 32) v |= w[word + 1] << (32 - off);
    out[k] = levels[v & ((1u << B) - 1u)];
  }
}

struct Rows {
  const uint32_t* packed;  // [rows, n*B/32]
  const float16_t* scales;  // [rows, n/g]
  const float* levels;
  int n, g;
};

// y[m * ldy + o] = x[m] . W[o] for o in [o0, o1), m < M; at most 8 rows of x at a time.
template <int B>
TQ_INLINE void matmul_rows(const Rows& w, const float* x, int M, float* y, int ldy, int o0, int o1) {
  const int words = w.n * B / 32, groups = w.n / w.g;
  alignas(32) float wv[32];
  for (int o = o0; o < o1; ++o) {
    for (int m0 = 0; m0 < M; m0 += 8) {
      const int mb = std::min(8, M - m0);
      float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      const uint32_t* wp = w.packed + size_t(o) * words;
      for (int gi = 0; gi < groups; ++gi) {
        alignas(32) float part[8][8] = {};
        for (int b0 = gi * w.g; b0 < (gi + 1) * w.g; b0 += 32, wp += B) {
          decode32<B>(wp, w.levels, wv);
          for (int m = 0; m < mb; ++m) {
            const float* xm = x + size_t(m0 + m) * w.n + b0;
            for (int k = 0; k < 32; k += 8)
              for (int j = 0; j < 8; ++j) part[m][j] += wv[k + j] * xm[k + j];
          }
        }
        const float s = static_cast<float>(w.scales[size_t(o) * groups + gi]);
        for (int m = 0; m < mb; ++m) {
          float d = 0.f;
          for (int j = 0; j < 8; ++j) d += part[m][j];
          acc[m] += s * d;
        }
      }
      for (int m = 0; m < mb; ++m) y[size_t(m0 + m) * ldy + o] = acc[m];
    }
  }
}

#if defined(__x86_64__) && defined(__GNUC__)


// The same product for B <= 4 with AVX2: 32 indices come out of B words as four 8-lane vectors
// (per-lane word select + variable shifts) and become levels through an in-register table.
template <int B>
__attribute__((target("avx2,fma"))) void matmul_rows_avx2(const Rows& w, const float* x, int M, float* y,
                                                        int ldy, int o0, int o1) {
  const int words = w.n * B / 32, groups = w.n / w.g;
  __m256i widx[4], wnext[4], shr[4], shl[4];
  for (int v = 0; v < 4; ++v) {
    alignas(32) int32_t a[8], b[8], c[8], d[8];
    for (int i = 0; i < 8; ++i) {
      const int bit = (8 * v + i) * B, off = bit & 31;
      a[i] = bit >> 5;
      b[i] = std::min((bit >> 5) + 1, 7);
      c[i] = off;
      d[i] = off + B > 32 ? 32 - off : 32;  // a shift of 32 gives 0: no spill into the next word
    }
    widx[v] = _mm256_load_si256(reinterpret_cast<const __m256i*>(a));
    wnext[v] = _mm256_load_si256(reinterpret_cast<const __m256i*>(b));
    shr[v] = _mm256_load_si256(reinterpret_cast<const __m256i*>(c));
    shl[v] = _mm256_load_si256(reinterpret_cast<const __m256i*>(d));
  }
  const __m256i mask = _mm256_set1_epi32((1 << B) - 1), seven = _mm256_set1_epi32(7);
  const __m256i load_mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(B), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  alignas(32) float lut[16] = {};
  for (int i = 0; i < (1 << B); ++i) lut[i] = w.levels[i];
  const __m256 lut_lo = _mm256_load_ps(lut), lut_hi = _mm256_load_ps(lut + 8);
  for (int m0 = 0; m0 < M; m0 += 8) {
    const int mb = std::min(8, M - m0);
    for (int o = o0; o < o1; ++o) {
      const uint32_t* wp = w.packed + size_t(o) * words;
      __m256 tot[8];
      for (int m = 0; m < mb; ++m) tot[m] = _mm256_setzero_ps();
      for (int gi = 0; gi < groups; ++gi) {
        __m256 gacc[8];
        for (int m = 0; m < mb; ++m) gacc[m] = _mm256_setzero_ps();
        for (int b0 = gi * w.g; b0 < (gi + 1) * w.g; b0 += 32, wp += B) {
          // the block's B words into lanes 0..B-1; masked lanes are not read, so no read past the row
          const __m256i words8 = _mm256_maskload_epi32(reinterpret_cast<const int*>(wp), load_mask);
          for (int v = 0; v < 4; ++v) {
            const __m256i lo = _mm256_permutevar8x32_epi32(words8, widx[v]);
            const __m256i hi = _mm256_permutevar8x32_epi32(words8, wnext[v]);
            const __m256i id = _mm256_and_si256(
                _mm256_or_si256(_mm256_srlv_epi32(lo, shr[v]), _mm256_sllv_epi32(hi, shl[v])), mask);
            __m256 val = _mm256_permutevar8x32_ps(lut_lo, id);
            if constexpr (B == 4)
              val = _mm256_blendv_ps(val, _mm256_permutevar8x32_ps(lut_hi, id),
                                     _mm256_castsi256_ps(_mm256_cmpgt_epi32(id, seven)));
            for (int m = 0; m < mb; ++m)
              gacc[m] = _mm256_fmadd_ps(val, _mm256_loadu_ps(x + size_t(m0 + m) * w.n + b0 + 8 * v), gacc[m]);
          }
        }
        const __m256 s = _mm256_set1_ps(static_cast<float>(w.scales[size_t(o) * groups + gi]));
        for (int m = 0; m < mb; ++m) tot[m] = _mm256_fmadd_ps(gacc[m], s, tot[m]);
      }
      for (int m = 0; m < mb; ++m) y[size_t(m0 + m) * ldy + o] = hsum8(tot[m]);
    }
  }
}

#endif

template <int B>
TQ_INLINE void dequantize_rows(const Rows& w, float* out, size_t r0, size_t r1) {
  const int words = w.n * B / 32, groups = w.n / w.g;
  for (size_t r = r0; r < r1; ++r) {
    const uint32_t* wp = w.packed + r * words;
    float* op = out + r * w.n;
    for (int gi = 0; gi < groups; ++gi) {
      const float s = static_cast<float>(w.scales[r * groups + gi]);
      for (int b0 = gi * w.g; b0 < (gi + 1) * w.g; b0 += 32, wp += B) {
        decode32<B>(wp, w.levels, op + b0);
        for (int k = 0; k < 32; ++k) op[b0 + k] *= s;
      }
    }
  }
}

#define TQ_DISPATCH_BITS(bits, CALL)                                    \
  switch (bits) {                                                      \
    case 1: { constexpr int B = 1; CALL; break; }                      \
    case 2: { constexpr int B = 2; CALL; break; }                      \
    case 3: { constexpr int B = 3; CALL; break; }                      \
    case 4: { constexpr int B = 4; CALL; break; }                      \
    case 5: { constexpr int B = 5; CALL; break; }                      \
    case 6: { constexpr int B = 6; CALL; break; }                      \
    case 7: { constexpr int B = 7; CALL; break; }                      \
    case 8: { constexpr int B = 8; CALL; break; }                      \
    default: throw std::invalid_argument("[tqpipe] bits must be 1..8"); \
  }

TQ_CLONES void matmul_kernel(int bits, const Rows& w, const float* x, int M, float* y, int ldy, int o0, int o1) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (bits <= 4 && has_avx2()) {
    switch (bits) {
      case 1: return matmul_rows_avx2<1>(w, x, M, y, ldy, o0, o1);
      case 2: return matmul_rows_avx2<2>(w, x, M, y, ldy, o0, o1);
      case 3: return matmul_rows_avx2<3>(w, x, M, y, ldy, o0, o1);
      default: return matmul_rows_avx2<4>(w, x, M, y, ldy, o0, o1);
    }
  }
#endif
  TQ_DISPATCH_BITS(bits, (matmul_rows<B>(w, x, M, y, ldy, o0, o1)))
}

TQ_CLONES void dequantize_kernel(int bits, const Rows& w, float* out, size_t r0, size_t r1) {
  TQ_DISPATCH_BITS(bits, (dequantize_rows<B>(w, out, r0, r1)))
}

// Split [0, total) over threads when the work (in weights touched) is large enough to pay for them.
template <class F>
void parallel_for(size_t total, size_t work, F&& fn) {
  const size_t hw = std::max(1u, std::thread::hardware_concurrency());
  const size_t nt = std::min({hw, total, std::max<size_t>(1, work >> 18)});
  if (nt <= 1) {
    fn(size_t(0), total);
    return;
  }
  std::vector<std::thread> pool;
  const size_t step = (total + nt - 1) / nt;
  for (size_t t = 1; t < nt; ++t) {
    const size_t a = t * step, b = std::min(total, a + step);
    if (a < b) pool.emplace_back([&fn, a, b] { fn(a, b); });
  }
  fn(size_t(0), std::min(total, step));
  for (auto& th : pool) th.join();
}

void check_format(const array& packed, const array& scales, const array& levels, int n, int bits, int g) {
  if (bits < 1 || bits > 8) throw std::invalid_argument("[tqpipe] bits must be in 1..8");
  if (g % 32 != 0 || n % g != 0)
    throw std::invalid_argument("[tqpipe] group size must be a multiple of 32 that divides the input width");
  if (packed.dtype() != uint32 || !issubdtype(scales.dtype(), floating) || levels.dtype() != float32)
    throw std::invalid_argument("[tqpipe] expected uint32 indices, floating-point scales and float32 levels");
  if (packed.shape(-1) != n * bits / 32 || scales.shape(-1) != n / g || levels.size() != (size_t(1) << bits))
    throw std::invalid_argument("[tqpipe] packed/scales/levels shapes do not match the input width and bits");
}

}  // namespace

array codebook_matmul(const array& x, const array& packed, const array& scales, const array& levels,
                      int bits, int group_size, StreamOrDevice s) {
  if (x.ndim() != 2 || packed.ndim() != 2) throw std::invalid_argument("[codebook_matmul] x and packed must be 2-D");
  check_format(packed, scales, levels, x.shape(1), bits, group_size);
  auto st = to_stream(s);
  std::vector<array> in = {contiguous(astype(x, float32, st), false, st), contiguous(packed, false, st),
                           contiguous(astype(scales, float16, st), false, st), contiguous(levels, false, st)};
  return array({x.shape(0), packed.shape(0)}, float32,
               std::make_shared<CodebookMatmul>(st, bits, group_size, false), std::move(in));
}

array codebook_gather_matmul(const array& x, const array& packed, const array& scales, const array& levels,
                             const array& experts, int bits, int group_size, StreamOrDevice s) {
  if (x.ndim() != 2 || packed.ndim() != 3 || experts.ndim() != 1 || experts.shape(0) != x.shape(0))
    throw std::invalid_argument("[codebook_gather_matmul] expects x [P, n], packed [E, out, words], experts [P]");
  check_format(packed, scales, levels, x.shape(1), bits, group_size);
  auto st = to_stream(s);
  std::vector<array> in = {contiguous(astype(x, float32, st), false, st), contiguous(packed, false, st),
                           contiguous(astype(scales, float16, st), false, st), contiguous(levels, false, st),
                           contiguous(astype(experts, uint32, st), false, st)};
  return array({x.shape(0), packed.shape(1)}, float32,
               std::make_shared<CodebookMatmul>(st, bits, group_size, true), std::move(in));
}

array codebook_dequantize(const array& packed, const array& scales, const array& levels, int bits,
                          int group_size, StreamOrDevice s) {
  const int n = scales.shape(-1) * group_size;
  check_format(packed, scales, levels, n, bits, group_size);
  auto st = to_stream(s);
  Shape shape = packed.shape();
  shape.back() = n;
  std::vector<array> in = {contiguous(packed, false, st), contiguous(astype(scales, float16, st), false, st),
                           contiguous(levels, false, st)};
  return array(std::move(shape), float32, std::make_shared<CodebookDequantize>(st, bits, group_size),
               std::move(in));
}

void CodebookMatmul::eval_cpu(const std::vector<array>& inputs, array& out) {
  for (auto& a : inputs)
    if (!a.flags().row_contiguous) throw std::runtime_error("[CodebookMatmul] inputs must be row contiguous");
  out.set_data(allocator::malloc(out.nbytes()));
  auto& enc = cpu::get_command_encoder(stream());
  for (auto& a : inputs) enc.set_input_array(a);
  enc.set_output_array(out);
  std::vector<array> ins;
  for (auto& a : inputs) ins.push_back(array::unsafe_weak_copy(a));
  enc.dispatch([ins = std::move(ins), out = array::unsafe_weak_copy(out), bits = bits_, g = group_size_,
                gathered = gathered_]() mutable {
    const array &x = ins[0], &packed = ins[1], &scales = ins[2], &levels = ins[3];
    const int M = x.shape(0), n = x.shape(1), rows = out.shape(1);
    Rows w{packed.data<uint32_t>(), scales.data<float16_t>(), levels.data<float>(), n, g};
    float* y = out.data<float>();
    const float* xp = x.data<float>();
    if (!gathered) {
      parallel_for(size_t(rows), size_t(rows) * n * std::max(1, M / 4), [&](size_t a, size_t b) {
        matmul_kernel(bits, w, xp, M, y, rows, int(a), int(b));
      });
      return;
    }
    const uint32_t* experts = ins[4].data<uint32_t>();
    const size_t words = size_t(n) * bits / 32, groups = size_t(n) / g;
    parallel_for(size_t(M) * rows, size_t(M) * rows * n, [&](size_t a, size_t b) {
      while (a < b) {  // flat index over (pair p, output row o), one pair's run at a time
        const size_t p = a / rows, o0 = a % rows, o1 = std::min<size_t>(rows, o0 + (b - a));
        const size_t e = experts[p];
        Rows we{w.packed + e * rows * words, w.scales + e * rows * groups, w.levels, n, g};
        matmul_kernel(bits, we, xp + p * n, 1, y + p * rows, rows, int(o0), int(o1));
        a += o1 - o0;
      }
    });
  });
}

void CodebookMatmul::eval_gpu(const std::vector<array>&, array&) {
  throw std::runtime_error("[CodebookMatmul] no GPU kernel yet: use the reference path");
}

std::vector<array> CodebookMatmul::vjp(const std::vector<array>& primals, const std::vector<array>& cotangents,
                                       const std::vector<int>& argnums, const std::vector<array>&) {
  std::vector<array> grads;
  for (int a : argnums) {
    if (a != 0 || gathered_) throw std::invalid_argument("[CodebookMatmul] only the input x has a gradient");
    auto w = codebook_dequantize(primals[1], primals[2], primals[3], bits_, group_size_, stream());
    grads.push_back(matmul(cotangents[0], w, stream()));  // dy [M, out] @ W [out, n]
  }
  return grads;
}

std::vector<Shape> CodebookMatmul::output_shapes(const std::vector<array>& inputs) {
  return {{inputs[0].shape(0), gathered_ ? inputs[1].shape(1) : inputs[1].shape(0)}};
}

bool CodebookMatmul::is_equivalent(const Primitive& other) const {
  auto& o = static_cast<const CodebookMatmul&>(other);
  return bits_ == o.bits_ && group_size_ == o.group_size_ && gathered_ == o.gathered_;
}

void CodebookDequantize::eval_cpu(const std::vector<array>& inputs, array& out) {
  for (auto& a : inputs)
    if (!a.flags().row_contiguous) throw std::runtime_error("[CodebookDequantize] inputs must be row contiguous");
  out.set_data(allocator::malloc(out.nbytes()));
  auto& enc = cpu::get_command_encoder(stream());
  for (auto& a : inputs) enc.set_input_array(a);
  enc.set_output_array(out);
  enc.dispatch([packed = array::unsafe_weak_copy(inputs[0]), scales = array::unsafe_weak_copy(inputs[1]),
                levels = array::unsafe_weak_copy(inputs[2]), out = array::unsafe_weak_copy(out), bits = bits_,
                g = group_size_]() mutable {
    const int n = out.shape(-1);
    const size_t rows = out.size() / n;
    Rows w{packed.data<uint32_t>(), scales.data<float16_t>(), levels.data<float>(), n, g};
    float* o = out.data<float>();
    parallel_for(rows, rows * n, [&](size_t a, size_t b) { dequantize_kernel(bits, w, o, a, b); });
  });
}

void CodebookDequantize::eval_gpu(const std::vector<array>&, array&) {
  throw std::runtime_error("[CodebookDequantize] no GPU kernel yet: use the reference path");
}

std::vector<Shape> CodebookDequantize::output_shapes(const std::vector<array>& inputs) {
  Shape shape = inputs[0].shape();
  shape.back() = inputs[1].shape(-1) * group_size_;
  return {shape};
}

bool CodebookDequantize::is_equivalent(const Primitive& other) const {
  auto& o = static_cast<const CodebookDequantize&>(other);
  return bits_ == o.bits_ && group_size_ == o.group_size_;
}

}  // namespace tqpipe
