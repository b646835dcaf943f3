// Small fused element-wise ops for the decode path, where each torch op costs more in dispatch than in
// arithmetic (a 576-wide RMSNorm is eight ops in eager torch).
#include <ATen/ATen.h>
#include <torch/types.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "common.h"
#include "fused.h"

namespace {

// 8 floats from a float or a float16 (uint16_t bits) cache; one element.
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
inline float load1(const float* p) { return *p; }
inline float load1(const uint16_t* p) { return _cvtsh_ss(*p); }

// sum(a[i] * b[i]) over d elements, 8 lanes at a time where d allows.
template <typename T>
inline float dot(const float* a, const T* b, int64_t d) {
  int64_t i = 0;
  float total = 0.0f;
  if (d >= 8) {
    __m256 acc = _mm256_setzero_ps();
    for (; i + 8 <= d; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), load8(b + i), acc);
    total = slmkit::hsum(acc);
  }
  for (; i < d; ++i) total += a[i] * load1(b + i);
  return total;
}

// The eight horizontal sums of v[0..7] in one vector (lane i = sum of v[i]), by a transposing add tree.
inline __m256 sum_each8(const __m256* v) {
  const __m256 t0 = _mm256_hadd_ps(v[0], v[1]), t1 = _mm256_hadd_ps(v[2], v[3]);
  const __m256 t2 = _mm256_hadd_ps(v[4], v[5]), t3 = _mm256_hadd_ps(v[6], v[7]);
  const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);  // halves: lanes 0-3, lanes 4-7
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

// scores[s] = q . key_s for 8 consecutive slots (d a multiple of 8): eight independent accumulators, so
// the FMAs overlap instead of waiting on one chain, and one transposing reduction for all eight.
template <typename T>
inline __m256 dot8(const float* q, const T* k0, int64_t stride, int64_t d) {
  __m256 acc[8];
  for (int j = 0; j < 8; ++j) acc[j] = _mm256_setzero_ps();
  for (int64_t i = 0; i < d; i += 8) {
    const __m256 qv = _mm256_loadu_ps(q + i);
    for (int j = 0; j < 8; ++j) acc[j] = _mm256_fmadd_ps(qv, load8(k0 + j * stride + i), acc[j]);
  }
  return sum_each8(acc);
}

// y[i] += p * x[i] over d elements.
template <typename T>
inline void axpy(float p, const T* x, float* y, int64_t d) {
  int64_t i = 0;
  const __m256 pv = _mm256_set1_ps(p);
  for (; i + 8 <= d; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(pv, load8(x + i), _mm256_loadu_ps(y + i)));
  for (; i < d; ++i) y[i] += p * load1(x + i);
}

// e^x on 8 lanes (Cephes' expf: x = n ln2 + r, |r| <= ln2 / 2, e^r by a degree-6 polynomial, times 2^n), within
// 2 ulp of the C library's over the range SiLU meets; x is clamped to e^x's normal float range.
inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  const __m256 e_r = _mm256_add_ps(_mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.0f));
  const __m256i two_n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(e_r, _mm256_castsi256_ps(two_n));
}

// out = sum_s p[s] * v_s over `length` slots for D floats (D a multiple of 8), the output in registers.
template <int D, typename T>
inline void weighted_sum(const float* p, const T* vb, int64_t stride, int64_t length, float* out) {
  __m256 acc[D / 8];
  for (int j = 0; j < D / 8; ++j) acc[j] = _mm256_setzero_ps();
  for (int64_t s = 0; s < length; ++s) {
    if (p[s] == 0.0f) continue;
    const __m256 w = _mm256_set1_ps(p[s]);
    const T* v = vb + s * stride;
    for (int j = 0; j < D / 8; ++j) acc[j] = _mm256_fmadd_ps(w, load8(v + 8 * j), acc[j]);
  }
  for (int j = 0; j < D / 8; ++j) _mm256_storeu_ps(out + 8 * j, acc[j]);
}

}  // namespace

namespace slmkit {

void rms_norm_rows(const float* xp, int64_t rows, int64_t d, const float* wp, float eps, float* yp) {
  at::parallel_for(0, rows, 64, [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      const float* xr = xp + r * d;
      float* yr = yp + r * d;
      float ss = 0.0f;
      for (int64_t i = 0; i < d; ++i) ss += xr[i] * xr[i];
      const float inv = 1.0f / std::sqrt(ss / static_cast<float>(d) + eps);
      for (int64_t i = 0; i < d; ++i) yr[i] = xr[i] * inv * wp[i];
    }
  });
}

void silu_mul_rows(const float* gp, int64_t rows, int64_t h, float* yp) {
  at::parallel_for(0, rows, 16, [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      const float* g = gp + r * 2 * h;
      const float* u = g + h;
      float* out = yp + r * h;
      int64_t i = 0;
      const __m256 one = _mm256_set1_ps(1.0f), sign = _mm256_set1_ps(-0.0f);
      for (; i + 8 <= h; i += 8) {
        const __m256 gv = _mm256_loadu_ps(g + i);
        const __m256 silu = _mm256_div_ps(gv, _mm256_add_ps(one, exp8(_mm256_xor_ps(gv, sign))));
        _mm256_storeu_ps(out + i, _mm256_mul_ps(silu, _mm256_loadu_ps(u + i)));
      }
      for (; i < h; ++i) out[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
    }
  });
}

template <typename T>
void attend_rows(const float* qp, int64_t b, int64_t h, int64_t d, CacheView<T> k, CacheView<T> v, int64_t kv,
                 int64_t full_length, const bool* vp, float sc, float* op) {
  // One task per (row, KV head): the group's query heads meet each cached key while it is loaded.
  const int64_t group = h / kv;
  at::parallel_for(0, b * kv, 1, [&](int64_t lo, int64_t hi) {
    std::vector<float> scores(group * full_length);  // [head in group, slot]
    for (int64_t task = lo; task < hi; ++task) {
      const int64_t row = task / kv, kvh = task % kv;
      const float* q0 = qp + (row * h + kvh * group) * d;
      const T* kb = k.base + row * k.stride_row + kvh * k.stride_head;
      const T* vb = v.base + row * v.stride_row + kvh * v.stride_head;
      const bool* valid = vp ? vp + row * full_length : nullptr;
      // A row attends up to its last visible slot: trailing hidden slots (a shorter row of the batcher's
      // cache, a later token of one sequence fed as several rows) are left out rather than zeroed, so the
      // row's sums run over exactly the slots a one-row step of the same length would see, in the same order.
      int64_t length = full_length;
      if (valid)
        while (length > 1 && !valid[length - 1]) --length;
      int64_t s = 0;
      if (d % 8 == 0)
        for (; s + 8 <= length; s += 8)
          for (int64_t g = 0; g < group; ++g)
            _mm256_storeu_ps(scores.data() + g * length + s,
                             _mm256_mul_ps(dot8(q0 + g * d, kb + s * k.stride_slot, k.stride_slot, d), _mm256_set1_ps(sc)));
      for (; s < length; ++s)
        for (int64_t g = 0; g < group; ++g) scores[g * length + s] = dot(q0 + g * d, kb + s * k.stride_slot, d) * sc;
      if (valid)
        for (int64_t t = 0; t < length; ++t)
          if (!valid[t])
            for (int64_t g = 0; g < group; ++g) scores[g * length + t] = -INFINITY;
      for (int64_t g = 0; g < group; ++g) {
        float* p = scores.data() + g * length;
        float top = -INFINITY;
        for (int64_t s = 0; s < length; ++s) top = std::max(top, p[s]);
        // softmax: e^(score - top) (0 for unseen slots), 8 at a time
        const __m256 top_v = _mm256_set1_ps(top), ninf = _mm256_set1_ps(-INFINITY);
        __m256 sum_v = _mm256_setzero_ps();
        int64_t s = 0;
        for (; s + 8 <= length; s += 8) {
          const __m256 x = _mm256_loadu_ps(p + s);
          const __m256 e = _mm256_andnot_ps(_mm256_cmp_ps(x, ninf, _CMP_EQ_OQ), exp8(_mm256_sub_ps(x, top_v)));
          _mm256_storeu_ps(p + s, e);
          sum_v = _mm256_add_ps(sum_v, e);
        }
        float total = slmkit::hsum(sum_v);
        for (; s < length; ++s) {
          p[s] = p[s] == -INFINITY ? 0.0f : std::exp(p[s] - top);
          total += p[s];
        }
        const float inv_total = 1.0f / total;
        for (s = 0; s < length; ++s) p[s] *= inv_total;
        float* o = op + row * h * d + (kvh * group + g) * d;
        if (d == 64) {
          weighted_sum<64, T>(p, vb, v.stride_slot, length, o);
        } else if (d == 128) {
          weighted_sum<128, T>(p, vb, v.stride_slot, length, o);
        } else {
          std::fill(o, o + d, 0.0f);
          for (s = 0; s < length; ++s)
            if (p[s] != 0.0f) axpy(p[s], vb + s * v.stride_slot, o, d);
        }
      }
    }
  });
}

template void attend_rows<float>(const float*, int64_t, int64_t, int64_t, CacheView<float>, CacheView<float>,
                                 int64_t, int64_t, const bool*, float, float*);
template void attend_rows<uint16_t>(const float*, int64_t, int64_t, int64_t, CacheView<uint16_t>, CacheView<uint16_t>,
                                    int64_t, int64_t, const bool*, float, float*);

}  // namespace slmkit

// y = x / sqrt(mean(x^2) + eps) * weight, over the last dim, in fp32 (Llama's RMSNorm).
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor weight, double eps) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat && x.is_contiguous(), "x: contiguous float32");
  TORCH_CHECK(weight.scalar_type() == torch::kFloat && weight.dim() == 1 && weight.size(0) == x.size(-1),
              "weight: float32 [dim]");
  const int64_t d = x.size(-1);
  auto y = torch::empty_like(x);
  slmkit::rms_norm_rows(x.data_ptr<float>(), x.numel() / d, d, weight.data_ptr<float>(), static_cast<float>(eps),
                        y.data_ptr<float>());
  return y;
}

// gate|up [..., 2h] -> silu(gate) * up [..., h] (SwiGLU's inner product).
torch::Tensor silu_mul(torch::Tensor gate_up) {
  TORCH_CHECK(gate_up.scalar_type() == torch::kFloat && gate_up.is_contiguous(), "gate_up: contiguous float32");
  const int64_t two_h = gate_up.size(-1), h = two_h / 2;
  TORCH_CHECK(two_h % 2 == 0, "gate_up: the last dim must be even");
  auto sizes = gate_up.sizes().vec();
  sizes.back() = h;
  auto y = torch::empty(sizes, gate_up.options());
  slmkit::silu_mul_rows(gate_up.data_ptr<float>(), gate_up.numel() / two_h, h, y.data_ptr<float>());
  return y;
}

// Attention of one new query per row over the cached keys/values: q [B, H, D]; k, v [B, KV, S, D] float32 or float16, any
// strides but the last (views of a larger cache are read in place); valid: optional bool [B, S] (false =
// a slot the row may not see); the query heads of a KV group share it (GQA). Softmax in fp32 as torch
// does. Returns [B, H * D], heads in order, ready for the output projection.
torch::Tensor attend_one(torch::Tensor q, torch::Tensor k, torch::Tensor v, c10::optional<torch::Tensor> valid,
                         double scale) {
  TORCH_CHECK(q.scalar_type() == torch::kFloat && q.is_contiguous() && q.dim() == 3, "q: contiguous float32 [B, H, D]");
  const bool half = k.scalar_type() == torch::kHalf;
  TORCH_CHECK((half || k.scalar_type() == torch::kFloat) && v.scalar_type() == k.scalar_type() && k.dim() == 4 &&
              k.sizes() == v.sizes() && k.stride(3) == 1 && v.stride(3) == 1,
              "k, v: float32 or float16 [B, KV, S, D] of one shape and dtype with unit stride in D");
  const int64_t b = q.size(0), h = q.size(1), d = q.size(2), kv = k.size(1), length = k.size(2);
  TORCH_CHECK(k.size(0) == b && k.size(3) == d && h % kv == 0, "q and k/v shapes disagree");
  const bool* vp = nullptr;
  torch::Tensor valid_c;
  if (valid.has_value()) {
    valid_c = valid->contiguous();
    TORCH_CHECK(valid_c.scalar_type() == torch::kBool && valid_c.numel() == b * length, "valid: bool [B, S]");
    vp = valid_c.data_ptr<bool>();
  }
  auto out = torch::empty({b, h * d}, q.options());
  if (half) {
    const auto* kp = reinterpret_cast<const uint16_t*>(k.data_ptr<at::Half>());
    const auto* vp16 = reinterpret_cast<const uint16_t*>(v.data_ptr<at::Half>());
    slmkit::attend_rows<uint16_t>(q.data_ptr<float>(), b, h, d, {kp, k.stride(0), k.stride(1), k.stride(2)},
                                  {vp16, v.stride(0), v.stride(1), v.stride(2)}, kv, length, vp,
                                  static_cast<float>(scale), out.data_ptr<float>());
  } else {
    slmkit::attend_rows<float>(q.data_ptr<float>(), b, h, d, {k.data_ptr<float>(), k.stride(0), k.stride(1), k.stride(2)},
                               {v.data_ptr<float>(), v.stride(0), v.stride(1), v.stride(2)}, kv, length, vp,
                               static_cast<float>(scale), out.data_ptr<float>());
  }
  return out;
}
