// y = x @ (q * scale[:, None]).T for int8 weights with one scale per output row, on AVX2.
//
// The activation is quantized on the fly to int8 in blocks of 32 (one float scale per block, as
// llama.cpp's Q8_0), so each weight block meets its activation block in one integer dot product:
// |x| (unsigned) times sign(x) * w (signed) with maddubs and madd (one VNNI dpbusd where the CPU has it), then one
// float multiply-add by the block's activation scale. The row's weight scale is applied once at the end.
// Weights are walked once per call: for every tile of output rows, every row of x is taken while the
// tile is in cache, so M rows cost far less than M matrix-vector products. Rows are split over torch's
// intra-op threads. Where the CPU has AVX-512 VNNI (avx512.h), tile4_512 takes two blocks per instruction.
#include <ATen/ATen.h>
#include <torch/types.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cmath>
#include <algorithm>
#include <cstdint>
#include <functional>
#include <utility>
#include <vector>

#include "avx512.h"
#include "common.h"
#include "linear.h"

namespace {

using slmkit::hsum;
using slmkit::kBlock;
using slmkit::quantize_row;

// The 8 int32 partial sums of one activation block (32 int8) times one weight block: sign(x) moves onto w
// so the unsigned operand can be |x|.
inline __m256i dot32(__m256i ax, __m256i xs, __m256i w) {
  return slmkit::dot_u8s8(ax, _mm256_sign_epi8(w, xs));
}

// Four weight rows (from w0, k apart) times all m activation rows with two blocks per instruction (avx512.h);
// xsv holds the activation scales spread to pairs. The sign of x moves onto w by a masked negation (AVX-512
// has no sign_epi8); weights are in -127..127, so negating never overflows.
SLMKIT_AVX512 void tile4_512(const int8_t* w0, const float* wsp, const int8_t* qp, const float* sp, const float* xsv,
                             int64_t m, int64_t k, int64_t nb, float* yp, int64_t n, int64_t r0) {
  const int64_t pairs = nb / 2;
  const __m512i zero = _mm512_setzero_si512();
  for (int64_t i = 0; i < m; ++i) {
    const int8_t* xq = qp + i * k;
    __m512 a[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    for (int64_t p = 0; p < pairs; ++p) {
      const __m512i xv = _mm512_loadu_si512(xq + p * 64);
      const __m512i ax = _mm512_abs_epi8(xv);
      const __mmask64 negative = _mm512_movepi8_mask(xv);
      const __m512 s = _mm512_loadu_ps(xsv + (i * pairs + p) * 16);
      for (int j = 0; j < 4; ++j) {
        const __m512i wv = _mm512_loadu_si512(w0 + j * k + p * 64);
        const __m512i signed_w = _mm512_mask_sub_epi8(wv, negative, zero, wv);
        a[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(zero, ax, signed_w)), s, a[j]);
      }
    }
    float* yr = yp + i * n + r0;
    for (int j = 0; j < 4; ++j) {
      float total = _mm512_reduce_add_ps(a[j]);
      if (nb % 2) {  // the last of an odd number of blocks, the 256-bit way
        const int64_t b = nb - 1;
        const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + b * kBlock));
        const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w0 + j * k + b * kBlock));
        total += hsum(_mm256_cvtepi32_ps(dot32(_mm256_sign_epi8(xv, xv), xv, wv))) * sp[i * nb + b];
      }
      yr[j] = total * wsp[r0 + j];
    }
  }
}

}  // namespace

namespace slmkit {

void int8_matmul(const float* xp, int64_t m, int64_t k, const int8_t* wp, const float* wsp, int64_t n, float* yp) {
  const int64_t nb = k / kBlock;
  int8_t* qp = scratch<int8_t, Scratch::kQuantX>(m * k);
  float* sp = scratch<float, Scratch::kScaleX>(m * nb);
  at::parallel_for(0, m, rows_per_task(k), [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) quantize_row(xp + r * k, k, qp + r * k, sp + r * nb);
  });
  const bool wide = use_avx512();
  float* xsv = wide ? scratch<float, Scratch::kSpread>(m * (nb / 2) * 16) : nullptr;
  if (wide) spread_pair_scales(sp, m, nb, xsv);
  constexpr int64_t kRows = 4;  // output rows per tile, read together
  const int64_t tiles = (n + kRows - 1) / kRows;
  at::parallel_for(0, tiles, 8, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r0 = t * kRows;
      if (wide && r0 + kRows <= n) {
        tile4_512(wp + r0 * k, wsp, qp, sp, xsv, m, k, nb, yp, n, r0);
      } else if (r0 + kRows <= n) {
        const int8_t* w0 = wp + r0 * k;
        for (int64_t i = 0; i < m; ++i) {
          const int8_t* xq = qp + i * k;
          const float* xs = sp + i * nb;
          __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
          for (int64_t b = 0; b < nb; ++b) {
            const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + b * kBlock));
            const __m256i ax = _mm256_sign_epi8(xv, xv);
            const __m256 s = _mm256_set1_ps(xs[b]);
            const int8_t* wb = w0 + b * kBlock;
            a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot32(ax, xv, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb)))), s, a0);
            a1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot32(ax, xv, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + k)))), s, a1);
            a2 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot32(ax, xv, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + 2 * k)))), s, a2);
            a3 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot32(ax, xv, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + 3 * k)))), s, a3);
          }
          float* yr = yp + i * n + r0;
          yr[0] = hsum(a0) * wsp[r0];
          yr[1] = hsum(a1) * wsp[r0 + 1];
          yr[2] = hsum(a2) * wsp[r0 + 2];
          yr[3] = hsum(a3) * wsp[r0 + 3];
        }
      } else {
        for (int64_t r = r0; r < n; ++r) {
          for (int64_t i = 0; i < m; ++i) {
            const int8_t* xq = qp + i * k;
            const float* xs = sp + i * nb;
            __m256 a = _mm256_setzero_ps();
            for (int64_t b = 0; b < nb; ++b) {
              const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + b * kBlock));
              const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp + r * k + b * kBlock));
              a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot32(_mm256_sign_epi8(xv, xv), xv, wv)),
                                  _mm256_set1_ps(xs[b]), a);
            }
            yp[i * n + r] = hsum(a) * wsp[r];
          }
        }
      }
    }
  });
}

}  // namespace slmkit

torch::Tensor int8_linear(torch::Tensor x, torch::Tensor weight, torch::Tensor scale) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat && x.is_contiguous(), "x: contiguous float32 [M, K]");
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == torch::kChar && weight.is_contiguous(), "weight: int8 [N, K]");
  TORCH_CHECK(scale.scalar_type() == torch::kFloat && scale.numel() == weight.size(0), "scale: float32 [N]");
  const int64_t m = x.size(0), k = x.size(1), n = weight.size(0);
  TORCH_CHECK(weight.size(1) == k && k % kBlock == 0, "K must match and be a multiple of 32");
  auto y = torch::empty({m, n}, torch::kFloat);
  slmkit::int8_matmul(x.data_ptr<float>(), m, k, weight.data_ptr<int8_t>(), scale.data_ptr<float>(), n,
                      y.data_ptr<float>());
  return y;
}

// The output head's exact top: in each row of logits [R, V] (float32, changed in place) the `count` largest
// entries are recomputed in fp32 from x [R, K] and the int8 rows they came from, sum_k x[k] * (q[v, k] *
// scale[v]) (+ bias[v]). The kernel above rounds the activation to int8 blocks, so near-ties could swap; the
// true maximum lies among the approximate top few. One call instead of topk, gather, einsum and scatter.
void refine_top(torch::Tensor logits, torch::Tensor x, torch::Tensor weight, torch::Tensor scale,
                c10::optional<torch::Tensor> bias, int64_t count) {
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == torch::kFloat && logits.is_contiguous(),
              "logits: contiguous float32 [R, V]");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat && x.is_contiguous() && x.size(0) == logits.size(0),
              "x: contiguous float32 [R, K]");
  TORCH_CHECK(weight.scalar_type() == torch::kChar && weight.is_contiguous() && weight.size(0) == logits.size(1) &&
              weight.size(1) == x.size(1), "weight: int8 [V, K]");
  TORCH_CHECK(scale.scalar_type() == torch::kFloat && scale.numel() == weight.size(0), "scale: float32 [V]");
  const float* bp = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == torch::kFloat && bias->is_contiguous() && bias->numel() == weight.size(0),
                "bias: float32 [V]");
    bp = bias->data_ptr<float>();
  }
  const int64_t rows = logits.size(0), v = logits.size(1), k = x.size(1);
  const int64_t top = std::min<int64_t>(count, v);
  float* lp = logits.data_ptr<float>();
  const float* xp = x.data_ptr<float>();
  const int8_t* wp = weight.data_ptr<int8_t>();
  const float* sp = scale.data_ptr<float>();
  at::parallel_for(0, rows, 1, [&](int64_t lo, int64_t hi) {
    std::vector<std::pair<float, int64_t>> heap;  // min-heap of the best `top` so far
    for (int64_t r = lo; r < hi; ++r) {
      float* row = lp + r * v;
      heap.clear();
      for (int64_t j = 0; j < v; ++j) {
        if (static_cast<int64_t>(heap.size()) < top) {
          heap.emplace_back(row[j], j);
          std::push_heap(heap.begin(), heap.end(), std::greater<>());
        } else if (row[j] > heap.front().first) {
          std::pop_heap(heap.begin(), heap.end(), std::greater<>());
          heap.back() = {row[j], j};
          std::push_heap(heap.begin(), heap.end(), std::greater<>());
        }
      }
      const float* xr = xp + r * k;
      for (const auto& entry : heap) {
        const int64_t col = entry.second;
        const int8_t* w = wp + col * k;
        const float s = sp[col];
        float total = 0.0f;
        for (int64_t i = 0; i < k; ++i) total += xr[i] * (static_cast<float>(w[i]) * s);
        row[col] = bp ? total + bp[col] : total;
      }
    }
  });
}
