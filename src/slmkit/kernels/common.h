// Shared by slmkit's int8 and int4 CPU kernels (AVX2): activation rows quantized to int8 blocks of 32.
#pragma once
#include <immintrin.h>
#include <cstdint>
#include <vector>

namespace slmkit {

inline constexpr int64_t kBlock = 32;

// The temporaries of the matmuls and the fused layer, each a per-thread buffer reused across calls (grown,
// never shrunk): a decode step would otherwise allocate, zero and free the same ones hundreds of times per
// token (page faults and memset showed in the profile). Buffers live at the same time need distinct names.
enum class Scratch { kQuantX, kScaleX, kSumX, kSpread, kHidden, kQkv, kQuery, kAttention, kGateUp, kActivation };

// Rows of activations per task when quantizing them: a decode batch (tens of rows) is quantized on the calling
// thread, where a parallel region would cost more than the work; prefill chunks are split.
inline int64_t rows_per_task(int64_t k) { return k >= (1 << 16) ? 1 : (1 << 16) / k; }

template <typename T, Scratch name>
T* scratch(int64_t count) {
  thread_local std::vector<T> buffer;
  if (static_cast<int64_t>(buffer.size()) < count) buffer.resize(count);
  return buffer.data();
}

// Per int32 lane, the sum of four products u8(a) * s8(b): one VNNI instruction where the build targets it
// (kernels/__init__.py adds the flags from /proc/cpuinfo), else maddubs + madd. The results are the same:
// every caller keeps |products| small enough that maddubs never saturates.
inline __m256i dot_u8s8(__m256i a, __m256i b) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), a, b);
#elif defined(__AVXVNNI__)
  return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), a, b);
#else
  return _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), _mm256_set1_epi16(1));
#endif
}

inline float hsum(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
  return _mm_cvtss_f32(lo);
}

// One row of x (k floats) to int8 blocks of 32 and their scales (max |x| / 127).
inline void quantize_row(const float* x, int64_t k, int8_t* q, float* scale) {
  const __m256 sign_mask = _mm256_set1_ps(-0.0f);
  for (int64_t b = 0; b < k / kBlock; ++b) {
    const float* xb = x + b * kBlock;
    __m256 m = _mm256_setzero_ps();
    for (int i = 0; i < kBlock; i += 8) m = _mm256_max_ps(m, _mm256_andnot_ps(sign_mask, _mm256_loadu_ps(xb + i)));
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    h = _mm_max_ss(h, _mm_movehdup_ps(h));
    const float amax = _mm_cvtss_f32(h);
    const float s = amax / 127.0f;
    scale[b] = s;
    const __m256 inv = _mm256_set1_ps(s > 0.0f ? 1.0f / s : 0.0f);
    __m256i packed[4];
    for (int i = 0; i < 4; ++i) {
      __m256 v = _mm256_mul_ps(_mm256_loadu_ps(xb + 8 * i), inv);
      packed[i] = _mm256_cvtps_epi32(_mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    }
    // int32 -> int16 -> int8 with saturation, then undo the lane interleave of the two packs
    __m256i p16a = _mm256_packs_epi32(packed[0], packed[1]);
    __m256i p16b = _mm256_packs_epi32(packed[2], packed[3]);
    __m256i p8 = _mm256_packs_epi16(p16a, p16b);
    p8 = _mm256_permutevar8x32_epi32(p8, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + b * kBlock), p8);
  }
}

}  // namespace slmkit
