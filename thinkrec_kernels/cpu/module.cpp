// The Python module of the C++ CPU kernels (thinkrec_kernels/_cpu_ext.py builds this file with the others
// in this folder into one extension).

#include <torch/extension.h>

#include <vector>

std::vector<at::Tensor> attention_bwd(at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor o, at::Tensor dout,
                                      at::Tensor lse, at::Tensor cu, double scale_d);
std::vector<at::Tensor> attention_fwd(at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor cu, double scale_d);
bool brgemm_bf16_available();
at::Tensor philox_dropout(const at::Tensor& x, int64_t seed, int64_t cut, double scale);
std::vector<int64_t> philox4x32_10(const std::vector<int64_t>& ctr, const std::vector<int64_t>& key);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("attention_bwd", &attention_bwd, "causal packed attention backward (bf16, brgemm)");
  m.def("attention_fwd", &attention_fwd, "causal packed attention forward (bf16, brgemm) -> o, lse");
  m.def("brgemm_bf16_available", &brgemm_bf16_available, "oneDNN can pack bf16 B operands (VNNI) here");
  m.def("philox_dropout", &philox_dropout, "x * (Philox mask >= cut) * scale, the mask from (seed, index)");
  m.def("philox4x32_10", &philox4x32_10, "one Philox4x32-10 block (for known-answer tests)");
}
