// Compact weights back to a dense matrix, for prefill: with hundreds of activation rows a dense bf16 (or
// float32) matmul through torch (oneDNN: AMX or AVX-512 BF16 where the CPU has them) beats the int4/int8
// kernels, whose strength is reading few bytes per row. The dense copy is made per call, one layer at a
// time, so it never holds more than the largest layer.
//
// int4 (Int4Linear's block layout): per row and group of 32, 16 bytes whose low nibbles are codes 0..15 and
// high nibbles codes 16..31; w = code * scale + minimum with float16 scale and minimum.
// int8: w = q * scale[row].
// bfloat16 results are rounded to nearest even, as torch's float -> bfloat16 cast does.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/types.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "avx512.h"

namespace {

// 8 floats to bfloat16, rounded to nearest even (as torch's cast; weights are finite, so NaN needs no care).
inline __m128i to_bf16(__m256 v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7fff))), 16);
  return _mm_packus_epi32(_mm256_castsi256_si128(rounded), _mm256_extracti128_si256(rounded, 1));
}

inline void store8(__m256 v, float* out) { _mm256_storeu_ps(out, v); }
inline void store8(__m256 v, uint16_t* out) { _mm_storeu_si128(reinterpret_cast<__m128i*>(out), to_bf16(v)); }

// 8 unsigned bytes (the low 8 of b) as floats.
inline __m256 bytes_to_float(__m128i b) { return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b)); }

// ---- AVX-512 (avx512.h): 16 values per instruction, the same roundings (a bf16 expansion is most of a dense
// layer's time at a few dozen rows: batched decoding, the output head).

// 16 floats to bfloat16, rounded to nearest even as to_bf16 does.
SLMKIT_AVX512 inline void store16(__m512 v, uint16_t* out) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff))), 16);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), _mm512_cvtepi32_epi16(rounded));
}

SLMKIT_AVX512 inline void store16(__m512 v, float* out) { _mm512_storeu_ps(out, v); }

// One weight row (the parallel loops call these: a lambda does not inherit the target attribute).
template <typename Out>
SLMKIT_AVX512 void int4_row_512(const uint8_t* codes, const uint16_t* scale, const uint16_t* minimum, int64_t k,
                                Out* out) {
  const __m128i low = _mm_set1_epi8(0x0F);
  for (int64_t g = 0; g < k / 32; ++g) {
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + g * 16));
    const __m128i lo = _mm_and_si128(bytes, low), hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), low);
    const __m512 s = _mm512_set1_ps(_cvtsh_ss(scale[g])), m = _mm512_set1_ps(_cvtsh_ss(minimum[g]));
    store16(_mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(lo)), s, m), out + g * 32);
    store16(_mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(hi)), s, m), out + g * 32 + 16);
  }
}

template <typename Out>
SLMKIT_AVX512 void int8_row_512(const int8_t* weight, float scale, int64_t k, Out* out) {
  const __m512 s = _mm512_set1_ps(scale);
  for (int64_t c = 0; c < k; c += 16) {  // k is a multiple of 32 (int8_linear's requirement)
    const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(weight + c));
    store16(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q)), s), out + c);
  }
}

template <typename Out>
void int4_rows_512(const uint8_t* codes, const uint16_t* scale, const uint16_t* minimum, int64_t n, int64_t k,
                   Out* out) {
  const int64_t groups = k / 32;
  at::parallel_for(0, n, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      int4_row_512(codes + r * (k / 2), scale + r * groups, minimum + r * groups, k, out + r * k);
  });
}

template <typename Out>
void int8_rows_512(const int8_t* weight, const float* scale, int64_t n, int64_t k, Out* out) {
  at::parallel_for(0, n, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) int8_row_512(weight + r * k, scale[r], k, out + r * k);
  });
}

template <typename Out>
void int4_rows(const uint8_t* codes, const uint16_t* scale, const uint16_t* minimum, int64_t n, int64_t k, Out* out) {
  if (slmkit::use_avx512()) return int4_rows_512(codes, scale, minimum, n, k, out);
  const int64_t groups = k / 32;
  at::parallel_for(0, n, 16, [&](int64_t r0, int64_t r1) {
    const __m128i low = _mm_set1_epi8(0x0F);
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t g = 0; g < groups; ++g) {
        const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + r * (k / 2) + g * 16));
        const __m128i lo = _mm_and_si128(bytes, low), hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), low);
        const __m256 s = _mm256_set1_ps(_cvtsh_ss(scale[r * groups + g]));
        const __m256 m = _mm256_set1_ps(_cvtsh_ss(minimum[r * groups + g]));
        Out* o = out + r * k + g * 32;
        store8(_mm256_fmadd_ps(bytes_to_float(lo), s, m), o);
        store8(_mm256_fmadd_ps(bytes_to_float(_mm_srli_si128(lo, 8)), s, m), o + 8);
        store8(_mm256_fmadd_ps(bytes_to_float(hi), s, m), o + 16);
        store8(_mm256_fmadd_ps(bytes_to_float(_mm_srli_si128(hi, 8)), s, m), o + 24);
      }
  });
}

template <typename Out>
void int8_rows(const int8_t* weight, const float* scale, int64_t n, int64_t k, Out* out) {
  if (slmkit::use_avx512()) return int8_rows_512(weight, scale, n, k, out);
  at::parallel_for(0, n, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const __m256 s = _mm256_set1_ps(scale[r]);
      for (int64_t c = 0; c < k; c += 8) {  // k is a multiple of 32 (int8_linear's requirement)
        const __m128i q = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(weight + r * k + c));
        store8(_mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)), s), out + r * k + c);
      }
    }
  });
}

void check_dtype(at::ScalarType dtype) {
  TORCH_CHECK(dtype == torch::kFloat || dtype == torch::kBFloat16, "dequantize to float32 or bfloat16");
}

}  // namespace

torch::Tensor int4_dequantize(torch::Tensor codes, torch::Tensor scale, torch::Tensor minimum,
                              at::ScalarType dtype) {
  check_dtype(dtype);
  TORCH_CHECK(codes.scalar_type() == torch::kByte && codes.is_contiguous() && codes.dim() == 2, "codes: uint8 [N, K/2]");
  const int64_t n = codes.size(0), k = codes.size(1) * 2;
  TORCH_CHECK(k % 32 == 0, "K must be a multiple of 32");
  TORCH_CHECK(scale.scalar_type() == torch::kHalf && minimum.scalar_type() == torch::kHalf && scale.is_contiguous() &&
              minimum.is_contiguous() && scale.numel() == n * (k / 32) && minimum.numel() == n * (k / 32),
              "scale, minimum: float16 [N, K/32]");
  auto out = torch::empty({n, k}, dtype);
  const auto* s = reinterpret_cast<const uint16_t*>(scale.data_ptr<at::Half>());
  const auto* m = reinterpret_cast<const uint16_t*>(minimum.data_ptr<at::Half>());
  if (dtype == torch::kFloat)
    int4_rows(codes.data_ptr<uint8_t>(), s, m, n, k, out.data_ptr<float>());
  else
    int4_rows(codes.data_ptr<uint8_t>(), s, m, n, k, reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>()));
  return out;
}

torch::Tensor int8_dequantize(torch::Tensor weight, torch::Tensor scale, at::ScalarType dtype) {
  check_dtype(dtype);
  TORCH_CHECK(weight.scalar_type() == torch::kChar && weight.is_contiguous() && weight.dim() == 2, "weight: int8 [N, K]");
  const int64_t n = weight.size(0), k = weight.size(1);
  TORCH_CHECK(k % 32 == 0, "K must be a multiple of 32");
  TORCH_CHECK(scale.scalar_type() == torch::kFloat && scale.is_contiguous() && scale.numel() == n, "scale: float32 [N]");
  auto out = torch::empty({n, k}, dtype);
  if (dtype == torch::kFloat)
    int8_rows(weight.data_ptr<int8_t>(), scale.data_ptr<float>(), n, k, out.data_ptr<float>());
  else
    int8_rows(weight.data_ptr<int8_t>(), scale.data_ptr<float>(), n, k,
              reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>()));
  return out;
}
