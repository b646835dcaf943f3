// One decoder layer of a compact (int8 / int4) Llama-style model for one new token per row, in one call:
//
//   h = rms_norm(x);  q|k|v = qkv(h);  RoPE on q, k;  k, v -> cache slot;  a = attention over the cache
//   x = x + o(a);     x = x + down(silu(gate) * up),  gate|up = gate_up(rms_norm(x))
//
// Decoding a 135M model runs ~13 small ops per layer per token; from Python each costs a dispatch and a
// tensor allocation that outweigh its arithmetic, so the layer is one C++ call that keeps its temporaries
// in plain buffers. The arithmetic is the same as the eager path's (same kernels, same order); only RoPE's
// cos/sin come from the C library rather than torch's vectorised ones (a float ulp apart).
//
// Layout assumptions (checked by slmkit.models.fused_decode before a layer is built): q/k rows interleaved
// per head so RoPE pairs are (2i, 2i+1), rotary dim = head dim; float32 activations; a float32 or float16 KV cache.
#include <ATen/ATen.h>
#include <torch/extension.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "common.h"
#include "fused.h"
#include "linear.h"

torch::Tensor int4_dequantize(torch::Tensor codes, torch::Tensor scale, torch::Tensor minimum,
                              at::ScalarType dtype);                                    // dequantize.cpp
torch::Tensor int8_dequantize(torch::Tensor weight, torch::Tensor scale, at::ScalarType dtype);  // dequantize.cpp

namespace {

// A quantized linear layer as the Python side hands it over: [int8 weight, float32 scale (, bias)] or
// [uint8 codes, float16 scale, float16 minimum (, bias)].
struct QuantLinear {
  bool int4 = false;
  torch::Tensor weight, scale, minimum, bias;
  int64_t n = 0, k = 0;

  explicit QuantLinear(const std::vector<torch::Tensor>& parts) {
    TORCH_CHECK(parts.size() >= 2, "a quantized linear needs its weight and scale");
    weight = parts[0];
    scale = parts[1];
    int4 = weight.scalar_type() == torch::kByte;
    TORCH_CHECK(int4 || weight.scalar_type() == torch::kChar, "weight: int8 [N, K] or uint8 codes [N, K/2]");
    const size_t base = int4 ? 3 : 2;
    TORCH_CHECK(parts.size() == base || parts.size() == base + 1, "unexpected number of tensors for a linear");
    if (int4) {
      minimum = parts[2];
      TORCH_CHECK(scale.scalar_type() == torch::kHalf && minimum.scalar_type() == torch::kHalf,
                  "int4 scale and minimum must be float16");
    } else {
      TORCH_CHECK(scale.scalar_type() == torch::kFloat, "int8 scale must be float32");
    }
    if (parts.size() == base + 1) bias = parts[base];
    TORCH_CHECK(weight.is_contiguous() && scale.is_contiguous(), "weights must be contiguous");
    n = weight.size(0);
    k = int4 ? weight.size(1) * 2 : weight.size(1);
    TORCH_CHECK(!bias.defined() || (bias.scalar_type() == torch::kFloat && bias.numel() == n), "bias: float32 [N]");
  }

  // y = x @ W.T (+ bias) for m rows: from `dense_rows` rows on, slmkit.nn.quant's dense path (the weight
  // expanded to bfloat16, a bf16 matmul with float32 sums rounded to bf16: oneDNN's where `native_bf16`, else
  // the same steps in float32), else the block kernels -- the choice and arithmetic of CompactLinear.forward.
  void apply(const float* x, int64_t m, float* y, int64_t dense_rows, bool native_bf16) const {
    if (m >= dense_rows) {
      dense(x, m, y, native_bf16);
    } else if (int4) {
      slmkit::int4_matmul(x, m, k, weight.data_ptr<uint8_t>(),
                          reinterpret_cast<const uint16_t*>(scale.data_ptr<at::Half>()),
                          reinterpret_cast<const uint16_t*>(minimum.data_ptr<at::Half>()), n, y);
    } else {
      slmkit::int8_matmul(x, m, k, weight.data_ptr<int8_t>(), scale.data_ptr<float>(), n, y);
    }
    if (bias.defined()) {
      const float* bp = bias.data_ptr<float>();  // added in float32 after the product, as the eager layer does
      for (int64_t r = 0; r < m; ++r)
        for (int64_t j = 0; j < n; ++j) y[r * n + j] += bp[j];
    }
  }

 private:
  void dense(const float* x, int64_t m, float* y, bool native_bf16) const {
    const auto w = int4 ? int4_dequantize(weight, scale, minimum, torch::kBFloat16)
                        : int8_dequantize(weight, scale, torch::kBFloat16);
    const auto xb = torch::from_blob(const_cast<float*>(x), {m, k}, torch::kFloat).to(torch::kBFloat16);
    const auto product = native_bf16 ? at::linear(xb, w) : at::linear(xb.to(torch::kFloat), w.to(torch::kFloat)).to(torch::kBFloat16);
    torch::from_blob(y, {m, n}, torch::kFloat).copy_(product);
  }
};

}  // namespace

class DecodeLayer {
 public:
  DecodeLayer(torch::Tensor attn_norm, torch::Tensor ffn_norm, double eps, std::vector<torch::Tensor> qkv,
              std::vector<torch::Tensor> o, std::vector<torch::Tensor> gate_up, std::vector<torch::Tensor> down,
              int64_t heads, int64_t kv_heads, int64_t head_dim, torch::Tensor inv_freq, double scale,
              bool native_bf16)
      : attn_norm_(attn_norm), ffn_norm_(ffn_norm), eps_(static_cast<float>(eps)), qkv_(qkv), o_(o),
        gate_up_(gate_up), down_(down), heads_(heads), kv_heads_(kv_heads), head_dim_(head_dim),
        inv_freq_(inv_freq.contiguous()), scale_(static_cast<float>(scale)),
        native_bf16_(native_bf16) {
    dim_ = attn_norm.numel();
    hidden_ = gate_up_.n / 2;
    TORCH_CHECK(attn_norm.scalar_type() == torch::kFloat && ffn_norm.scalar_type() == torch::kFloat,
                "norm weights: float32");
    TORCH_CHECK(heads % kv_heads == 0 && head_dim % 2 == 0, "heads must be a multiple of kv_heads, head_dim even");
    TORCH_CHECK(qkv_.k == dim_ && qkv_.n == (heads + 2 * kv_heads) * head_dim, "qkv shape");
    TORCH_CHECK(o_.k == heads * head_dim && o_.n == dim_, "o shape");
    TORCH_CHECK(gate_up_.k == dim_ && down_.k == hidden_ && down_.n == dim_, "gate_up / down shapes");
    TORCH_CHECK(inv_freq_.scalar_type() == torch::kFloat && inv_freq_.numel() == head_dim / 2,
                "inv_freq: float32 [head_dim / 2]");
  }

  // x [B, D] float32; positions [B] int64 (RoPE); keys / values: the layer's whole cache [rows, KV, slots, Dh]
  // (row r of the batch is cache row r); slots [B] int64: where each row's new key/value goes; the
  // attention covers slots 0 .. span-1, minus those `valid` [B, span] marks false. The linears take the dense
  // path from `dense_rows` rows on (QuantLinear::apply). Returns the new x.
  torch::Tensor forward(torch::Tensor x, torch::Tensor positions, torch::Tensor keys, torch::Tensor values,
                        torch::Tensor slots, int64_t span, c10::optional<torch::Tensor> valid, int64_t dense_rows) {
    TORCH_CHECK(x.is_cpu() && keys.is_cpu() && values.is_cpu() && positions.is_cpu() && slots.is_cpu(),
                "DecodeLayer runs on the CPU: x, positions, keys, values and slots must be CPU tensors");
    TORCH_CHECK(x.dim() == 2 && x.size(1) == dim_ && x.scalar_type() == torch::kFloat && x.is_contiguous(),
                "x: contiguous float32 [B, D]");
    const int64_t b = x.size(0);
    TORCH_CHECK(positions.scalar_type() == torch::kLong && positions.numel() == b && positions.is_contiguous(),
                "positions: int64 [B]");
    TORCH_CHECK(slots.scalar_type() == torch::kLong && slots.numel() == b && slots.is_contiguous(), "slots: int64 [B]");
    const bool half = keys.scalar_type() == torch::kHalf;
    TORCH_CHECK((half || keys.scalar_type() == torch::kFloat) && values.scalar_type() == keys.scalar_type() &&
                keys.dim() == 4 &&
                keys.sizes() == values.sizes() && keys.size(0) >= b && keys.size(1) == kv_heads_ &&
                keys.size(3) == head_dim_ && keys.stride(3) == 1 && values.stride(3) == 1 && span <= keys.size(2),
                "keys, values: float32 or float16, one dtype, [rows >= B, KV, slots >= span, head_dim]");
    const bool* vp = nullptr;
    torch::Tensor valid_c;
    if (valid.has_value()) {
      valid_c = valid->contiguous();
      TORCH_CHECK(valid_c.scalar_type() == torch::kBool && valid_c.numel() == b * span, "valid: bool [B, span]");
      vp = valid_c.data_ptr<bool>();
    }
    const int64_t* pos = positions.data_ptr<int64_t>();
    const int64_t* slot = slots.data_ptr<int64_t>();
    for (int64_t r = 0; r < b; ++r)
      TORCH_CHECK(slot[r] >= 0 && slot[r] < span, "a slot lies outside the attended span");

    const int64_t q_width = heads_ * head_dim_, kv_width = kv_heads_ * head_dim_;
    const int64_t qkv_width = q_width + 2 * kv_width;
    using slmkit::Scratch;
    using slmkit::scratch;
    float* h = scratch<float, Scratch::kHidden>(b * dim_);
    float* qkv = scratch<float, Scratch::kQkv>(b * qkv_width);
    float* q = scratch<float, Scratch::kQuery>(b * q_width);
    float* attn = scratch<float, Scratch::kAttention>(b * q_width);
    float* gu = scratch<float, Scratch::kGateUp>(b * 2 * hidden_);
    float* act = scratch<float, Scratch::kActivation>(b * hidden_);
    auto out = torch::empty_like(x);
    float* y = out.data_ptr<float>();
    const float* xp = x.data_ptr<float>();

    slmkit::rms_norm_rows(xp, b, dim_, attn_norm_.data_ptr<float>(), eps_, h);
    qkv_.apply(h, b, qkv, dense_rows, native_bf16_);
    rope(qkv, b, qkv_width, pos);
    for (int64_t r = 0; r < b; ++r) std::copy_n(qkv + r * qkv_width, q_width, q + r * q_width);
    if (half) {
      auto* kp = reinterpret_cast<uint16_t*>(keys.data_ptr<at::Half>());
      auto* vp16 = reinterpret_cast<uint16_t*>(values.data_ptr<at::Half>());
      store(qkv, b, qkv_width, q_width, kp, keys.strides(), vp16, values.strides(), slot);
      slmkit::attend_rows<uint16_t>(q, b, heads_, head_dim_, {kp, keys.stride(0), keys.stride(1), keys.stride(2)},
                                    {vp16, values.stride(0), values.stride(1), values.stride(2)}, kv_heads_, span, vp,
                                    scale_, attn);
    } else {
      float* kp = keys.data_ptr<float>();
      float* vp32 = values.data_ptr<float>();
      store(qkv, b, qkv_width, q_width, kp, keys.strides(), vp32, values.strides(), slot);
      slmkit::attend_rows<float>(q, b, heads_, head_dim_, {kp, keys.stride(0), keys.stride(1), keys.stride(2)},
                                 {vp32, values.stride(0), values.stride(1), values.stride(2)}, kv_heads_, span, vp,
                                 scale_, attn);
    }

    o_.apply(attn, b, y, dense_rows, native_bf16_);  // y = o(attn), then the residual
    for (int64_t i = 0; i < b * dim_; ++i) y[i] += xp[i];

    slmkit::rms_norm_rows(y, b, dim_, ffn_norm_.data_ptr<float>(), eps_, h);
    gate_up_.apply(h, b, gu, dense_rows, native_bf16_);
    slmkit::silu_mul_rows(gu, b, hidden_, act);
    down_.apply(act, b, h, dense_rows, native_bf16_);
    for (int64_t i = 0; i < b * dim_; ++i) y[i] += h[i];
    return out;
  }

 private:
  // Interleaved RoPE over the q and k heads of each row: pair (2i, 2i+1) turns by position * inv_freq[i].
  void rope(float* qkv, int64_t b, int64_t width, const int64_t* pos) const {
    const int64_t half = head_dim_ / 2, rotated_heads = heads_ + kv_heads_;
    const float* inv = inv_freq_.data_ptr<float>();
    std::vector<float> c(half), s(half);
    for (int64_t r = 0; r < b; ++r) {
      const float p = static_cast<float>(pos[r]);
      for (int64_t i = 0; i < half; ++i) {
        const float angle = p * inv[i];
        c[i] = std::cos(angle);
        s[i] = std::sin(angle);
      }
      for (int64_t head = 0; head < rotated_heads; ++head) {
        float* v = qkv + r * width + head * head_dim_;
        for (int64_t i = 0; i < half; ++i) {
          const float re = v[2 * i], im = v[2 * i + 1];
          v[2 * i] = re * c[i] - im * s[i];
          v[2 * i + 1] = re * s[i] + im * c[i];
        }
      }
    }
  }

  // Each row's new key and value into its cache slot: copied, or rounded to float16 (to nearest even, as
  // torch's casts do, so an eager prefill and this write store the same bits).
  static void put(const float* src, int64_t d, float* dst) { std::copy_n(src, d, dst); }
  static void put(const float* src, int64_t d, uint16_t* dst) {
    int64_t i = 0;
    for (; i + 8 <= d; i += 8)
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
    for (; i < d; ++i) dst[i] = _cvtss_sh(src[i], _MM_FROUND_TO_NEAREST_INT);
  }

  template <typename T>
  void store(const float* qkv, int64_t b, int64_t width, int64_t q_width, T* kp, at::IntArrayRef k_strides, T* vp,
             at::IntArrayRef v_strides, const int64_t* slot) const {
    const int64_t kv_width = kv_heads_ * head_dim_;
    for (int64_t r = 0; r < b; ++r) {
      for (int64_t g = 0; g < kv_heads_; ++g) {
        const float* k_src = qkv + r * width + q_width + g * head_dim_;
        const float* v_src = k_src + kv_width;
        put(k_src, head_dim_, kp + r * k_strides[0] + g * k_strides[1] + slot[r] * k_strides[2]);
        put(v_src, head_dim_, vp + r * v_strides[0] + g * v_strides[1] + slot[r] * v_strides[2]);
      }
    }
  }

  torch::Tensor attn_norm_, ffn_norm_;
  float eps_;
  QuantLinear qkv_, o_, gate_up_, down_;
  int64_t heads_, kv_heads_, head_dim_, dim_ = 0, hidden_ = 0;
  torch::Tensor inv_freq_;
  float scale_;
  bool native_bf16_;
};

void bind_decode_layer(py::module_& mod) {
  py::class_<DecodeLayer>(mod, "DecodeLayer")
      .def(py::init<torch::Tensor, torch::Tensor, double, std::vector<torch::Tensor>, std::vector<torch::Tensor>,
                    std::vector<torch::Tensor>, std::vector<torch::Tensor>, int64_t, int64_t, int64_t, torch::Tensor,
                    double, bool>(),
           py::arg("attn_norm"), py::arg("ffn_norm"), py::arg("eps"), py::arg("qkv"), py::arg("o"),
           py::arg("gate_up"), py::arg("down"), py::arg("heads"), py::arg("kv_heads"), py::arg("head_dim"),
           py::arg("inv_freq"), py::arg("scale"), py::arg("native_bf16"))
      .def("forward", &DecodeLayer::forward, py::arg("x"), py::arg("positions"), py::arg("keys"), py::arg("values"),
           py::arg("slots"), py::arg("span"), py::arg("valid"), py::arg("dense_rows"),
           "one decoder layer for one new token per row; writes the new key/value into the cache",
           py::call_guard<py::gil_scoped_release>());  // a server's HTTP thread runs meanwhile
}
