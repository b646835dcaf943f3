// AVX-512 variants of the matmul kernels, compiled for that target per function and chosen at run time:
// one build serves every x86 CPU, and the rest of the library stays on 256-bit code. Their gain is in
// batched decoding, where the kernels are compute-bound: a 512-bit VNNI instruction takes two blocks of
// 32 at once, so the per-block float work (convert, scale, accumulate) is done half as often.
#pragma once
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#define SLMKIT_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,fma,f16c")))

namespace slmkit {

// Whether the matmuls take their AVX-512 variants: true on CPUs with AVX-512 F/BW/VL/DQ and VNNI unless the
// environment says SLMKIT_AVX512=0; set_avx512 switches it at run time (tests run both paths) and refuses to
// turn it on where the CPU lacks the instructions.
bool cpu_has_avx512();
bool use_avx512();
bool set_avx512(bool enabled);  // returns the previous setting

// [a x 8, b x 8] for two consecutive float16 values at p.
SLMKIT_AVX512 inline __m512 pair_of_halves(const uint16_t* p) {
  int32_t bits;
  std::memcpy(&bits, p, sizeof bits);
  const __m128 two = _mm_cvtph_ps(_mm_cvtsi32_si128(bits));
  const __m512i index = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
  return _mm512_permutexvar_ps(index, _mm512_castps128_ps512(two));
}

// Each activation row's block scales spread to 16 lanes per pair of blocks ([s_b x 8, s_b+1 x 8]), the
// layout a 512-bit accumulator of two blocks needs: rows x (nb / 2) x 16 floats.
SLMKIT_AVX512 inline void spread_pair_scales(const float* scales, int64_t rows, int64_t nb, float* out) {
  const int64_t pairs = nb / 2;
  const __m512i index = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t p = 0; p < pairs; ++p) {
      const __m512 two = _mm512_castps128_ps512(_mm_castsi128_ps(_mm_loadl_epi64(
          reinterpret_cast<const __m128i*>(scales + r * nb + 2 * p))));
      _mm512_storeu_ps(out + (r * pairs + p) * 16, _mm512_permutexvar_ps(index, two));
    }
}

}  // namespace slmkit
