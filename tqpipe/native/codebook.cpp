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
#include <vector>

#include "mlx/allocator.h"
#include "parallel.h"
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


// The same product for B <= 4 with AVX2. Eight consecutive indices are 8·B bits = B bytes, starting
// at byte B·v of their 32-index block: one 32-bit broadcast load, a per-lane variable shift and a mask
// give eight indices, and an in-register table (vpermps) turns them into levels. The last load of a
// block is pulled back so it never reads past the block (extra shift instead).
template <int B>
struct Decoder {
  static constexpr int off(int v) { return B * v < 4 * B - 4 ? B * v : 4 * B - 4; }  // byte offset
  __m256i shift[4];
  __m256i mask;
  __m256 lut_lo, lut_hi;
  __attribute__((target("avx2,fma"))) explicit Decoder(const float* levels) {
    for (int v = 0; v < 4; ++v) {
      const int extra = 8 * (B * v - off(v));
      shift[v] = _mm256_setr_epi32(extra, extra + B, extra + 2 * B, extra + 3 * B, extra + 4 * B,
                                   extra + 5 * B, extra + 6 * B, extra + 7 * B);
    }
    mask = _mm256_set1_epi32((1 << B) - 1);
    alignas(32) float lut[16] = {};
    for (int i = 0; i < (1 << B); ++i) lut[i] = levels[i];
    lut_lo = _mm256_load_ps(lut);
    lut_hi = _mm256_load_ps(lut + 8);
  }
  // levels of indices 8v..8v+7 of the block at `block`
  __attribute__((target("avx2,fma"))) TQ_INLINE __m256 operator()(const uint8_t* block, int v) const {
    int32_t word;
    __builtin_memcpy(&word, block + off(v), 4);
    const __m256i id = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(word), shift[v]), mask);
    __m256 val = _mm256_permutevar8x32_ps(lut_lo, id);
    if constexpr (B == 4)
      val = _mm256_blendv_ps(val, _mm256_permutevar8x32_ps(lut_hi, id),
                             _mm256_castsi256_ps(_mm256_slli_epi32(id, 28)));
    return val;
  }
};

// MB rows of x against output rows [o0, o1). Small MB keeps several partial sums per row (V) so the
// FMA chains overlap; the group's scale is applied once per group.
template <int B, int MB>
__attribute__((target("avx2,fma"))) void matmul_block_avx2(const Rows& w, const Decoder<B>& dec, const float* x,
                                                         float* y, int ldy, int o0, int o1) {
  constexpr int V = MB >= 4 ? 1 : 4 / MB;
  const int words = w.n * B / 32, groups = w.n / w.g, blocks_per_group = w.g / 32;
  for (int o = o0; o < o1; ++o) {
    const uint8_t* wp = reinterpret_cast<const uint8_t*>(w.packed + size_t(o) * words);
    const float16_t* sp = w.scales + size_t(o) * groups;
    __m256 tot[MB];
    for (int m = 0; m < MB; ++m) tot[m] = _mm256_setzero_ps();
    const float* xb = x;
    for (int gi = 0; gi < groups; ++gi) {
      __m256 acc[MB][V];
      for (int m = 0; m < MB; ++m)
        for (int a = 0; a < V; ++a) acc[m][a] = _mm256_setzero_ps();
      for (int blk = 0; blk < blocks_per_group; ++blk, wp += 4 * B, xb += 32) {
#pragma GCC unroll 4
        for (int v = 0; v < 4; ++v) {
          const __m256 val = dec(wp, v);
#pragma GCC unroll 8
          for (int m = 0; m < MB; ++m)
            acc[m][v % V] = _mm256_fmadd_ps(val, _mm256_loadu_ps(xb + size_t(m) * w.n + 8 * v), acc[m][v % V]);
        }
      }
      const __m256 s = _mm256_set1_ps(static_cast<float>(sp[gi]));
      for (int m = 0; m < MB; ++m) {
        __m256 sum = acc[m][0];
        for (int a = 1; a < V; ++a) sum = _mm256_add_ps(sum, acc[m][a]);
        tot[m] = _mm256_fmadd_ps(sum, s, tot[m]);
      }
    }
    for (int m = 0; m < MB; ++m) y[size_t(m) * ldy + o] = hsum8(tot[m]);
  }
}

template <int B>
__attribute__((target("avx2,fma"))) void dequantize_rows_avx2(const Rows& w, float* out, size_t r0, size_t r1) {
  const Decoder<B> dec(w.levels);
  const int words = w.n * B / 32, groups = w.n / w.g;
  for (size_t r = r0; r < r1; ++r) {
    const uint8_t* wp = reinterpret_cast<const uint8_t*>(w.packed + r * words);
    float* op = out + r * w.n;
    for (int gi = 0; gi < groups; ++gi) {
      const __m256 s = _mm256_set1_ps(static_cast<float>(w.scales[r * groups + gi]));
      for (int b0 = gi * w.g; b0 < (gi + 1) * w.g; b0 += 32, wp += 4 * B)
        for (int v = 0; v < 4; ++v) _mm256_storeu_ps(op + b0 + 8 * v, _mm256_mul_ps(dec(wp, v), s));
    }
  }
}

template <int B>
__attribute__((target("avx2,fma"))) void matmul_rows_avx2(const Rows& w, const float* x, int M, float* y,
                                                        int ldy, int o0, int o1) {
  const Decoder<B> dec(w.levels);
  int m0 = 0;
  for (; m0 + 8 <= M; m0 += 8) matmul_block_avx2<B, 8>(w, dec, x + size_t(m0) * w.n, y + size_t(m0) * ldy, ldy, o0, o1);
  if (M - m0 >= 4) matmul_block_avx2<B, 4>(w, dec, x + size_t(m0) * w.n, y + size_t(m0) * ldy, ldy, o0, o1), m0 += 4;
  if (M - m0 >= 2) matmul_block_avx2<B, 2>(w, dec, x + size_t(m0) * w.n, y + size_t(m0) * ldy, ldy, o0, o1), m0 += 2;
  if (M - m0 >= 1) matmul_block_avx2<B, 1>(w, dec, x + size_t(m0) * w.n, y + size_t(m0) * ldy, ldy, o0, o1);
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
#if defined(__x86_64__) && defined(__GNUC__)
  if (bits <= 4 && has_avx2()) {
    switch (bits) {
      case 1: return dequantize_rows_avx2<1>(w, out, r0, r1);
      case 2: return dequantize_rows_avx2<2>(w, out, r0, r1);
      case 3: return dequantize_rows_avx2<3>(w, out, r0, r1);
      default: return dequantize_rows_avx2<4>(w, out, r0, r1);
    }
  }
#endif
  TQ_DISPATCH_BITS(bits, (dequantize_rows<B>(w, out, r0, r1)))
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

namespace {
// What every eval_cpu here does first: check the inputs, allocate the output, register both with the
// stream's command encoder (which then runs the dispatched kernel).
cpu::CommandEncoder& prepare_cpu(const char* name, const Stream& stream, const std::vector<array>& inputs,
                                 array& out) {
  for (auto& a : inputs)
    if (!a.flags().row_contiguous) throw std::runtime_error(std::string("[") + name + "] inputs must be row contiguous");
  out.set_data(allocator::malloc(out.nbytes()));
  auto& enc = cpu::get_command_encoder(stream);
  for (auto& a : inputs) enc.set_input_array(a);
  enc.set_output_array(out);
  return enc;
}
}  // namespace

void CodebookMatmul::eval_cpu(const std::vector<array>& inputs, array& out) {
  auto& enc = prepare_cpu(name(), stream(), inputs, out);
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
  auto& enc = prepare_cpu(name(), stream(), inputs, out);
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
