// The raw forms of the fused element-wise ops (fused_ops.cpp), shared with the fused decoder layer.
#pragma once
#include <cstdint>

namespace slmkit {

// y = x / sqrt(mean(x^2) + eps) * weight for each of `rows` rows of width d.
void rms_norm_rows(const float* x, int64_t rows, int64_t d, const float* weight, float eps, float* y);

// y[r] = silu(gate[r]) * up[r], where row r of gate_up is gate (h floats) then up (h floats).
void silu_mul_rows(const float* gate_up, int64_t rows, int64_t h, float* y);

// One query per row over cached keys/values. q [b, heads, d] contiguous; k and v: row r, KV head g, slot s
// at base + r * stride_row + g * stride_head + s * stride_slot (d contiguous elements: float, or float16 bits
// as uint16_t -- the compact models' cache); valid: null or [b, length] (false = a slot the row may not
// see); heads of a KV group share it. out [b, heads * d].
template <typename T>
struct CacheView {
  const T* base;
  int64_t stride_row, stride_head, stride_slot;
};
template <typename T>
void attend_rows(const float* q, int64_t b, int64_t heads, int64_t d, CacheView<T> k, CacheView<T> v, int64_t kv_heads,
                 int64_t length, const bool* valid, float scale, float* out);

}  // namespace slmkit
