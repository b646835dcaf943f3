// The raw forms of slmkit's weight-only matmuls, shared by the torch ops (int8_linear.cpp,
// int4_linear.cpp) and the fused decoder layer (decode_layer.cpp): y[m, n] = x[m, k] @ W.T.
#pragma once
#include <cstdint>

namespace slmkit {

// int8 weights [n, k], one float scale per output row.
void int8_matmul(const float* x, int64_t m, int64_t k, const int8_t* weight, const float* scale, int64_t n,
                 float* y);

// 4-bit weights in groups of 32 along k: codes [n, k/2] in block layout (byte i of a group = code i |
// code i+16 << 4), float16 scale and minimum [n, k/32] (w = code * scale + minimum).
void int4_matmul(const float* x, int64_t m, int64_t k, const uint8_t* codes, const uint16_t* scale,
                 const uint16_t* minimum, int64_t n, float* y);

}  // namespace slmkit
