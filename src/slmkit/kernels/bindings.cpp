// The Python module of slmkit's CPU kernels (built by slmkit/kernels/__init__.py).
#include <torch/extension.h>

#include "avx512.h"

torch::Tensor int8_linear(torch::Tensor x, torch::Tensor weight, torch::Tensor scale);  // int8_linear.cpp
void refine_top(torch::Tensor logits, torch::Tensor x, torch::Tensor weight, torch::Tensor scale,
                c10::optional<torch::Tensor> bias, int64_t count);                     // int8_linear.cpp
torch::Tensor int4_linear(torch::Tensor x, torch::Tensor codes, torch::Tensor scale,
                          torch::Tensor minimum);                                       // int4_linear.cpp
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor weight, double eps);              // fused_ops.cpp
torch::Tensor silu_mul(torch::Tensor gate_up);                                          // fused_ops.cpp
torch::Tensor attend_one(torch::Tensor q, torch::Tensor k, torch::Tensor v, c10::optional<torch::Tensor> valid,
                         double scale);                                                 // fused_ops.cpp
torch::Tensor int4_dequantize(torch::Tensor codes, torch::Tensor scale, torch::Tensor minimum,
                              at::ScalarType dtype);                                    // dequantize.cpp
torch::Tensor int8_dequantize(torch::Tensor weight, torch::Tensor scale, at::ScalarType dtype);  // dequantize.cpp
void bind_decode_layer(py::module_& mod);                                               // decode_layer.cpp

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  // The compute-heavy calls let go of the GIL: a server's HTTP thread keeps answering while a decode step runs.
  using release = py::call_guard<py::gil_scoped_release>;
  mod.def("int8_linear", &int8_linear, "x[M,K] float32 @ (int8 weight[N,K] * scale[N]).T -> float32 [M,N]", release());
  mod.def("int4_linear", &int4_linear,
          "x[M,K] float32 @ 4-bit weight (codes [N,K/2], float16 scale/minimum [N,K/32]).T -> float32 [M,N]", release());
  mod.def("refine_top", &refine_top, "the output head's top entries per row recomputed exactly (in place)",
          py::arg("logits"), py::arg("x"), py::arg("weight"), py::arg("scale"), py::arg("bias"), py::arg("count"),
          release());
  mod.def("int4_dequantize", &int4_dequantize, "the dense [N,K] float32/bfloat16 weight of int4_linear's operands",
          py::arg("codes"), py::arg("scale"), py::arg("minimum"), py::arg("dtype"), release());
  mod.def("int8_dequantize", &int8_dequantize, "the dense [N,K] float32/bfloat16 weight of int8_linear's operands",
          py::arg("weight"), py::arg("scale"), py::arg("dtype"), release());
  mod.def("rms_norm", &rms_norm, "RMSNorm over the last dim, float32");
  mod.def("attend_one", &attend_one, "one query per row over cached keys/values (GQA), float32 -> [B, H*D]",
          py::arg("q"), py::arg("k"), py::arg("v"), py::arg("valid"), py::arg("scale"), release());
  mod.def("silu_mul", &silu_mul, "silu(gate) * up from gate|up [..., 2h] -> [..., h], float32");
  mod.def("cpu_has_avx512", &slmkit::cpu_has_avx512, "whether the CPU has the AVX-512 variants' instructions");
  mod.def("use_avx512", &slmkit::use_avx512, "whether the matmuls take their AVX-512 variants now");
  mod.def("set_avx512", &slmkit::set_avx512, "switch the AVX-512 variants on or off; returns the previous setting",
          py::arg("enabled"));
  bind_decode_layer(mod);
}
