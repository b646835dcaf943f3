// y = x @ W.T for 4-bit weights in groups of 32 along K: w = code * scale + minimum (GGUF Q4_1's form),
// codes 0..15, on AVX2.
//
// Layout (made by slmkit.nn.quant.Int4Linear): per row, per group, 16 bytes whose low nibbles are codes
// 0..15 and high nibbles codes 16..31; scale and minimum as float16 [N, K/32]. The activation is quantized
// to int8 blocks of 32 (scale s_b), so a group's contribution is
//     s_b * (scale * sum(code * qx) + minimum * sum(qx)),
// the first sum one maddubs (unsigned codes x signed activations) and madd, the second shared by all rows.
// As in int8_linear.cpp, every row of x is taken while a tile of weight rows is in cache.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/types.h>
#include <immintrin.h>

#include <cstdint>
#include <vector>

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

}  // namespace

namespace slmkit {

void int4_matmul(const float* xp, int64_t m, int64_t k, const uint8_t* cp, const uint16_t* scp, const uint16_t* mnp,
                 int64_t n, float* yp) {
  const int64_t nb = k / kBlock;
  std::vector<int8_t> qx(m * k);
  std::vector<float> sx(m * nb);
  std::vector<float> sum_x(m * nb);  // s_b * sum(qx) per block: the minimum's factor
  int8_t* qp = qx.data();
  float* sp = sx.data();
  float* sump = sum_x.data();
  at::parallel_for(0, m, 16, [&](int64_t lo, int64_t hi) {
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

  const int64_t row_bytes = k / 2;
  at::parallel_for(0, n, 16, [&](int64_t r0, int64_t r1) {
    const __m128i low_mask = _mm_set1_epi8(0x0F);
    const __m256i ones = _mm256_set1_epi16(1);
    for (int64_t r = r0; r < r1; r += 2) {
      const bool pair = r + 1 < r1;
      const uint8_t* c0 = cp + r * row_bytes;
      const uint8_t* c1 = pair ? c0 + row_bytes : c0;
      const uint16_t* s0 = scp + r * nb;
      const uint16_t* s1 = pair ? s0 + nb : s0;
      const uint16_t* m0 = mnp + r * nb;
      const uint16_t* m1 = pair ? m0 + nb : m0;
      for (int64_t i = 0; i < m; ++i) {
        const int8_t* xq = qp + i * k;
        const float* xs = sp + i * nb;
        const float* xsum = sump + i * nb;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0;
        float mins0 = 0.0f, mins1 = 0.0f;
        for (int64_t b = 0; b < nb; ++b) {
          const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + b * kBlock));
          const __m256i p0 = _mm256_madd_epi16(_mm256_maddubs_epi16(codes32(c0 + b * 16, low_mask), xv), ones);
          const __m256i p1 = _mm256_madd_epi16(_mm256_maddubs_epi16(codes32(c1 + b * 16, low_mask), xv), ones);
          a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p0), _mm256_set1_ps(half(s0 + b) * xs[b]), a0);
          a1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p1), _mm256_set1_ps(half(s1 + b) * xs[b]), a1);
          mins0 += half(m0 + b) * xsum[b];
          mins1 += half(m1 + b) * xsum[b];
        }
        yp[i * n + r] = hsum(a0) + mins0;
        if (pair) yp[i * n + r + 1] = hsum(a1) + mins1;
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
