// Small fused element-wise ops for the decode path, where each torch op costs more in dispatch than in
// arithmetic (a 576-wide RMSNorm is eight ops in eager torch).
#include <ATen/ATen.h>
#include <torch/types.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <vector>

// y = x / sqrt(mean(x^2) + eps) * weight, over the last dim, in fp32 (Llama's RMSNorm).
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor weight, double eps) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat && x.is_contiguous(), "x: contiguous float32");
  TORCH_CHECK(weight.scalar_type() == torch::kFloat && weight.dim() == 1 && weight.size(0) == x.size(-1),
              "weight: float32 [dim]");
  const int64_t d = x.size(-1), rows = x.numel() / d;
  auto y = torch::empty_like(x);
  const float* xp = x.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, rows, 64, [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      const float* xr = xp + r * d;
      float* yr = yp + r * d;
      float ss = 0.0f;
      for (int64_t i = 0; i < d; ++i) ss += xr[i] * xr[i];
      const float inv = 1.0f / std::sqrt(ss / static_cast<float>(d) + static_cast<float>(eps));
      for (int64_t i = 0; i < d; ++i) yr[i] = xr[i] * inv * wp[i];
    }
  });
  return y;
}

// gate|up [..., 2h] -> silu(gate) * up [..., h] (SwiGLU's inner product).
torch::Tensor silu_mul(torch::Tensor gate_up) {
  TORCH_CHECK(gate_up.scalar_type() == torch::kFloat && gate_up.is_contiguous(), "gate_up: contiguous float32");
  const int64_t two_h = gate_up.size(-1), h = two_h / 2, rows = gate_up.numel() / two_h;
  TORCH_CHECK(two_h % 2 == 0, "gate_up: the last dim must be even");
  auto sizes = gate_up.sizes().vec();
  sizes.back() = h;
  auto y = torch::empty(sizes, gate_up.options());
  const float* gp = gate_up.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, rows, 16, [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      const float* g = gp + r * two_h;
      const float* u = g + h;
      float* out = yp + r * h;
      for (int64_t i = 0; i < h; ++i) out[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
    }
  });
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
  const float* qp = q.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* vcp = v.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t group = h / kv;
  const int64_t ks0 = k.stride(0), ks1 = k.stride(1), ks2 = k.stride(2);
  const int64_t vs0 = v.stride(0), vs1 = v.stride(1), vs2 = v.stride(2);
  const float sc = static_cast<float>(scale);
  at::parallel_for(0, b * h, 1, [&](int64_t lo, int64_t hi) {
    std::vector<float> scores(length);
    for (int64_t bh = lo; bh < hi; ++bh) {
      const int64_t row = bh / h, head = bh % h, kvh = head / group;
      const float* qv = qp + (row * h + head) * d;
      const float* kb = kp + row * ks0 + kvh * ks1;
      const float* vb = vcp + row * vs0 + kvh * vs1;
      float top = -INFINITY;
      for (int64_t s = 0; s < length; ++s) {
        if (vp && !vp[row * length + s]) { scores[s] = -INFINITY; continue; }
        const float* kr = kb + s * ks2;
        float dot = 0.0f;
        for (int64_t i = 0; i < d; ++i) dot += qv[i] * kr[i];
        scores[s] = dot * sc;
        top = std::max(top, scores[s]);
      }
      float total = 0.0f;
      for (int64_t s = 0; s < length; ++s) {
        scores[s] = scores[s] == -INFINITY ? 0.0f : std::exp(scores[s] - top);
        total += scores[s];
      }
      float* o = op + row * h * d + head * d;
      for (int64_t i = 0; i < d; ++i) o[i] = 0.0f;
      for (int64_t s = 0; s < length; ++s) {
        if (scores[s] == 0.0f) continue;
        const float p = scores[s] / total;
        const float* vr = vb + s * vs2;
        for (int64_t i = 0; i < d; ++i) o[i] += p * vr[i];
      }
    }
  });
  return out;
}
