// y = x @ W.T for 4-bit weights in groups of 32 along K: w = code * scale + minimum (GGUF Q4_1's form),
// codes 0..15, on AVX2.
//
// Layout (made by slmkit.nn.quant.Int4Linear): per row, per group, 16 bytes whose low nibbles are codes
// 0..15 and high nibbles codes 16..31; scale and minimum as float16 [N, K/32]. The activation is quantized
// to int8 blocks of 32 (scale s_b), so a group's contribution is
//     s_b * (scale * sum(code * qx) + minimum * sum(qx)),
// the first sum one maddubs + madd (unsigned codes x signed activations; one VNNI dpbusd where the CPU has
// it), the second shared by all rows.
// As in int8_linear.cpp, every row of x is taken while a tile of weight rows is in cache. Where the CPU has
// AVX-512 VNNI (avx512.h) a variant takes two groups per instruction: batched decoding is compute-bound here.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/types.h>
#include <immintrin.h>

#include <cstdint>
#include <vector>

#include "avx512.h"
#include "common.h"
#include "linear.h"

namespace {

using slmkit::hsum;
using slmkit::kBlock;
using slmkit::quantize_row;

inline __m256i codes32(const uint8_t* p, __m128i low_mask) {
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m128i lo = _mm_and_si128(bytes, low_mask);
  const __m128i hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), low_mask);
  return _mm256_set_m128i(hi, lo);
}

inline float half(const uint16_t* p) { return _cvtsh_ss(*p); }

// Two weight rows (codes, scales, minimums); the second repeats the first when the row count is odd.
struct RowPair {
  const uint8_t *c0, *c1;
  const uint16_t *s0, *s1, *m0, *m1;
};

// G activation rows (from row i) times a pair of weight rows: each weight block is unpacked once and
// meets the G activation blocks while in registers (batched decoding reads and unpacks weights once).
template <int G>
inline void rows_times_pair(const RowPair& w, const int8_t* qp, const float* sp, const float* sump, int64_t i,
                            int64_t k, int64_t nb, float* yp, int64_t n, int64_t r, bool pair) {
  const __m128i low_mask = _mm_set1_epi8(0x0F);
  __m256 a0[G], a1[G];
  float mins0[G], mins1[G];
  for (int j = 0; j < G; ++j) {
    a0[j] = a1[j] = _mm256_setzero_ps();
    mins0[j] = mins1[j] = 0.0f;
  }
  for (int64_t b = 0; b < nb; ++b) {
    const __m256i w0 = codes32(w.c0 + b * 16, low_mask), w1 = codes32(w.c1 + b * 16, low_mask);
    const float sc0 = half(w.s0 + b), sc1 = half(w.s1 + b), mn0 = half(w.m0 + b), mn1 = half(w.m1 + b);
    for (int j = 0; j < G; ++j) {
      const int64_t row = i + j;
      const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qp + row * k + b * kBlock));
      const float xs = sp[row * nb + b], xsum = sump[row * nb + b];
      const __m256i p0 = slmkit::dot_u8s8(w0, xv);
      const __m256i p1 = slmkit::dot_u8s8(w1, xv);
      a0[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p0), _mm256_set1_ps(sc0 * xs), a0[j]);
      a1[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p1), _mm256_set1_ps(sc1 * xs), a1[j]);
      mins0[j] += mn0 * xsum;
      mins1[j] += mn1 * xsum;
    }
  }
  for (int j = 0; j < G; ++j) {
    yp[(i + j) * n + r] = hsum(a0[j]) + mins0[j];
    if (pair) yp[(i + j) * n + r + 1] = hsum(a1[j]) + mins1[j];
  }
}

// ---- AVX-512 (avx512.h): a 512-bit register holds two blocks of a weight row, [block b | block b+1].

// Codes of blocks b and b+1 of one row (32 bytes) in the activation's order: lanes of 16 codes
// (low nibbles of b, high nibbles of b, low of b+1, high of b+1).
SLMKIT_AVX512 inline __m512i codes64(const uint8_t* p) {
  const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  const __m256i mask = _mm256_set1_epi8(0x0F);
  const __m256i lo = _mm256_and_si256(bytes, mask), hi = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), mask);
  const __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);  // lo_b lo_b+1 hi_b hi_b+1
  return _mm512_shuffle_i64x2(both, both, _MM_SHUFFLE(3, 1, 2, 0));
}

// Lanes that sum to sum over blocks of minimum_b * (s_b * sum(qx_b)): the minimums' share of one output,
// left unreduced so that it joins the accumulator before the one horizontal sum.
SLMKIT_AVX512 inline __m512 minimum_lanes(const uint16_t* minimum, const float* sum_x, int64_t nb) {
  __m512 acc = _mm512_setzero_ps();
  int64_t b = 0;
  for (; b + 16 <= nb; b += 16)
    acc = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(minimum + b))),
                          _mm512_loadu_ps(sum_x + b), acc);
  if (b < nb) {
    const __mmask16 mask = static_cast<__mmask16>((1u << (nb - b)) - 1);
    acc = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, minimum + b)),
                          _mm512_maskz_loadu_ps(mask, sum_x + b), acc);
  }
  return acc;
}

// The eight horizontal sums of v[0..7] in one vector (lane i = sum of v[i]): a transposing add tree,
// about a third of the instructions of eight separate reductions.
SLMKIT_AVX512 inline __m256 sum_each(const __m512* v) {
  __m256 h[8];
  for (int i = 0; i < 8; ++i) h[i] = _mm256_add_ps(_mm512_castps512_ps256(v[i]), _mm512_extractf32x8_ps(v[i], 1));
  const __m256 t0 = _mm256_hadd_ps(h[0], h[1]), t1 = _mm256_hadd_ps(h[2], h[3]);
  const __m256 t2 = _mm256_hadd_ps(h[4], h[5]), t3 = _mm256_hadd_ps(h[6], h[7]);
  const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);  // halves: lanes 0-3, lanes 4-7
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

// The horizontal sum of one vector in sum_each's order, so that a row's output does not depend on whether it
// was computed in a group of four or alone (one sequence's tokens then agree with one-token decoding steps).
SLMKIT_AVX512 inline float sum_one(__m512 v) {
  const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));
  const __m128 pairs = _mm_hadd_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));  // h0+h1 .. h6+h7
  const __m128 quads = _mm_hadd_ps(pairs, pairs);  // (h0+h1)+(h2+h3), (h4+h5)+(h6+h7), ...
  return _mm_cvtss_f32(_mm_add_ss(quads, _mm_movehdup_ps(quads)));
}

// The last block of a row with an odd number of blocks, the 256-bit way.
SLMKIT_AVX512 inline float last_block(const uint8_t* codes, const uint16_t* scale, const int8_t* xq, float xs) {
  const __m256i w = codes32(codes, _mm_set1_epi8(0x0F));
  const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq));
  return hsum(_mm256_cvtepi32_ps(slmkit::dot_u8s8(w, xv))) * (half(scale) * xs);
}

// rows_times_pair with two blocks per instruction; xsv holds the activation scales spread to pairs
// (spread_pair_scales).
template <int G>
SLMKIT_AVX512 void rows_times_pair_512(const RowPair& w, const int8_t* qp, const float* sp, const float* xsv,
                                       const float* sump, int64_t i, int64_t k, int64_t nb, float* yp, int64_t n,
                                       int64_t r, bool pair) {
  const int64_t pairs = nb / 2;
  const __m512i zero = _mm512_setzero_si512();
  __m512 a0[G], a1[G];
  for (int j = 0; j < G; ++j) a0[j] = a1[j] = _mm512_setzero_ps();
  for (int64_t p = 0; p < pairs; ++p) {
    const __m512i w0 = codes64(w.c0 + p * 32), w1 = codes64(w.c1 + p * 32);
    const __m512 d0 = slmkit::pair_of_halves(w.s0 + 2 * p), d1 = slmkit::pair_of_halves(w.s1 + 2 * p);
    for (int j = 0; j < G; ++j) {
      const int64_t row = i + j;
      const __m512i xv = _mm512_loadu_si512(qp + row * k + p * 64);
      const __m512 xs = _mm512_loadu_ps(xsv + (row * pairs + p) * 16);
      a0[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(zero, w0, xv)), _mm512_mul_ps(d0, xs), a0[j]);
      a1[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(zero, w1, xv)), _mm512_mul_ps(d1, xs), a1[j]);
    }
  }
  for (int j = 0; j < G; ++j) {
    const float* sums = sump + (i + j) * nb;
    a0[j] = _mm512_add_ps(a0[j], minimum_lanes(w.m0, sums, nb));
    if (pair) a1[j] = _mm512_add_ps(a1[j], minimum_lanes(w.m1, sums, nb));
  }
  float y0[G], y1[G];
  if constexpr (G == 4) {
    const __m512 all[8] = {a0[0], a0[1], a0[2], a0[3], a1[0], a1[1], a1[2], a1[3]};
    float sums[8];
    _mm256_storeu_ps(sums, sum_each(all));
    for (int j = 0; j < 4; ++j) y0[j] = sums[j], y1[j] = sums[4 + j];
  } else {
    for (int j = 0; j < G; ++j) y0[j] = sum_one(a0[j]), y1[j] = sum_one(a1[j]);
  }
  for (int j = 0; j < G; ++j) {
    const int64_t row = i + j;
    if (nb % 2) {
      const int64_t b = nb - 1;
      const int8_t* xq = qp + row * k + b * kBlock;
      y0[j] += last_block(w.c0 + b * 16, w.s0 + b, xq, sp[row * nb + b]);
      if (pair) y1[j] += last_block(w.c1 + b * 16, w.s1 + b, xq, sp[row * nb + b]);
    }
    yp[row * n + r] = y0[j];
    if (pair) yp[row * n + r + 1] = y1[j];
  }
}

}  // namespace

namespace slmkit {

void int4_matmul(const float* xp, int64_t m, int64_t k, const uint8_t* cp, const uint16_t* scp, const uint16_t* mnp,
                 int64_t n, float* yp) {
  const int64_t nb = k / kBlock;
  int8_t* qp = scratch<int8_t, Scratch::kQuantX>(m * k);
  float* sp = scratch<float, Scratch::kScaleX>(m * nb);
  float* sump = scratch<float, Scratch::kSumX>(m * nb);  // s_b * sum(qx) per block: the minimum's factor
  at::parallel_for(0, m, rows_per_task(k), [&](int64_t lo, int64_t hi) {
    const __m256i ones8 = _mm256_set1_epi8(1);
    const __m256i ones16 = _mm256_set1_epi16(1);
    for (int64_t r = lo; r < hi; ++r) {
      quantize_row(xp + r * k, k, qp + r * k, sp + r * nb);
      for (int64_t b = 0; b < nb; ++b) {
        const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qp + r * k + b * kBlock));
        const __m256i s = _mm256_madd_epi16(_mm256_maddubs_epi16(ones8, q), ones16);
        sump[r * nb + b] = hsum(_mm256_cvtepi32_ps(s)) * sp[r * nb + b];
      }
    }
  });

  const bool wide = use_avx512();
  float* xsv = wide ? scratch<float, Scratch::kSpread>(m * (nb / 2) * 16) : nullptr;
  if (wide) spread_pair_scales(sp, m, nb, xsv);

  const int64_t row_bytes = k / 2;
  at::parallel_for(0, n, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; r += 2) {
      const bool pair = r + 1 < r1;
      const RowPair w{cp + r * row_bytes, pair ? cp + (r + 1) * row_bytes : cp + r * row_bytes, scp + r * nb,
                      pair ? scp + (r + 1) * nb : scp + r * nb, mnp + r * nb, pair ? mnp + (r + 1) * nb : mnp + r * nb};
      int64_t i = 0;
      if (wide) {
        for (; i + 4 <= m; i += 4) rows_times_pair_512<4>(w, qp, sp, xsv, sump, i, k, nb, yp, n, r, pair);
        for (; i < m; ++i) rows_times_pair_512<1>(w, qp, sp, xsv, sump, i, k, nb, yp, n, r, pair);
      } else {
        for (; i + 4 <= m; i += 4) rows_times_pair<4>(w, qp, sp, sump, i, k, nb, yp, n, r, pair);
        for (; i < m; ++i) rows_times_pair<1>(w, qp, sp, sump, i, k, nb, yp, n, r, pair);
      }
    }
  });
}

}  // namespace slmkit

torch::Tensor int4_linear(torch::Tensor x, torch::Tensor codes, torch::Tensor scale, torch::Tensor minimum) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat && x.is_contiguous(), "x: contiguous float32 [M, K]");
  const int64_t m = x.size(0), k = x.size(1), n = codes.size(0), nb = k / kBlock;
  TORCH_CHECK(k % kBlock == 0, "K must be a multiple of 32");
  TORCH_CHECK(codes.scalar_type() == torch::kByte && codes.is_contiguous() && codes.dim() == 2 && codes.size(1) == k / 2,
              "codes: uint8 [N, K/2]");
  TORCH_CHECK(scale.scalar_type() == torch::kHalf && minimum.scalar_type() == torch::kHalf && scale.is_contiguous() &&
              minimum.is_contiguous() && scale.numel() == n * nb && minimum.numel() == n * nb,
              "scale, minimum: float16 [N, K/32]");
  auto y = torch::empty({m, n}, torch::kFloat);
  slmkit::int4_matmul(x.data_ptr<float>(), m, k, codes.data_ptr<uint8_t>(),
                      reinterpret_cast<const uint16_t*>(scale.data_ptr<at::Half>()),
                      reinterpret_cast<const uint16_t*>(minimum.data_ptr<at::Half>()), n, y.data_ptr<float>());
  return y;
}
