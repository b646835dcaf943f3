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

// sum(a[i] * b[i]) over d floats, 8 lanes at a time where d allows.
inline float dot(const float* a, const float* b, int64_t d) {
  int64_t i = 0;
  float total = 0.0f;
  if (d >= 8) {
    __m256 acc = _mm256_setzero_ps();
    for (; i + 8 <= d; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    total = slmkit::hsum(acc);
  }
  for (; i < d; ++i) total += a[i] * b[i];
  return total;
}

// y[i] += p * x[i] over d floats.
inline void axpy(float p, const float* x, float* y, int64_t d) {
  int64_t i = 0;
  const __m256 pv = _mm256_set1_ps(p);
  for (; i + 8 <= d; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(pv, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
  for (; i < d; ++i) y[i] += p * x[i];
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
      for (int64_t i = 0; i < h; ++i) out[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
    }
  });
}

void attend_rows(const float* qp, int64_t b, int64_t h, int64_t d, CacheView k, CacheView v, int64_t kv,
                 int64_t length, const bool* vp, float sc, float* op) {
  const int64_t group = h / kv;
  at::parallel_for(0, b * h, 1, [&](int64_t lo, int64_t hi) {
    std::vector<float> scores(length);
    for (int64_t bh = lo; bh < hi; ++bh) {
      const int64_t row = bh / h, head = bh % h, kvh = head / group;
      const float* qv = qp + (row * h + head) * d;
      const float* kb = k.base + row * k.stride_row + kvh * k.stride_head;
      const float* vb = v.base + row * v.stride_row + kvh * v.stride_head;
      float top = -INFINITY;
      for (int64_t s = 0; s < length; ++s) {
        if (vp && !vp[row * length + s]) { scores[s] = -INFINITY; continue; }
        scores[s] = dot(qv, kb + s * k.stride_slot, d) * sc;
        top = std::max(top, scores[s]);
      }
      float total = 0.0f;
      for (int64_t s = 0; s < length; ++s) {
        scores[s] = scores[s] == -INFINITY ? 0.0f : std::exp(scores[s] - top);
        total += scores[s];
      }
      float* o = op + row * h * d + head * d;
      std::fill(o, o + d, 0.0f);
      const float inv_total = 1.0f / total;
      for (int64_t s = 0; s < length; ++s) {
        if (scores[s] != 0.0f) axpy(scores[s] * inv_total, vb + s * v.stride_slot, o, d);
      }
    }
  });
}

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

// Attention of one new query per row over the cached keys/values: q [B, H, D]; k, v [B, KV, S, D], any
// strides but the last (views of a larger cache are read in place); valid: optional bool [B, S] (false =
// a slot the row may not see); the query heads of a KV group share it (GQA). Softmax in fp32 as torch
// does. Returns [B, H * D], heads in order, ready for the output projection.
torch::Tensor attend_one(torch::Tensor q, torch::Tensor k, torch::Tensor v, c10::optional<torch::Tensor> valid,
                         double scale) {
  TORCH_CHECK(q.scalar_type() == torch::kFloat && q.is_contiguous() && q.dim() == 3, "q: contiguous float32 [B, H, D]");
  TORCH_CHECK(k.scalar_type() == torch::kFloat && v.scalar_type() == torch::kFloat && k.dim() == 4 &&
              k.sizes() == v.sizes() && k.stride(3) == 1 && v.stride(3) == 1,
              "k, v: float32 [B, KV, S, D] of one shape with unit stride in D");
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
  const slmkit::CacheView kview{k.data_ptr<float>(), k.stride(0), k.stride(1), k.stride(2)};
  const slmkit::CacheView vview{v.data_ptr<float>(), v.stride(0), v.stride(1), v.stride(2)};
  slmkit::attend_rows(q.data_ptr<float>(), b, h, d, kview, vview, kv, length, vp, static_cast<float>(scale),
                      out.data_ptr<float>());
  return out;
}
