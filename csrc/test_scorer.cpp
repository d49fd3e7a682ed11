// ctest: the C++ scores of an exported run's rows equal the scores infer.py wrote for them (within 1e-4),
// and the gate gives an unknown user the global adapter.
#include <ATen/ATen.h>

#include <cstdio>

#include "thinkrec_scorer.h"

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: test_scorer EXPORT_DIR\n");
    return 2;
  }
  const std::string dir = argv[1];
  thinkrec::Scorer scorer(dir);
  thinkrec::TensorMap rows = thinkrec::read_safetensors(dir + "/rows.safetensors");
  at::Tensor want = thinkrec::read_safetensors(dir + "/expected.safetensors").at("score");
  int failures = 0;
  for (int64_t batch : {1, 7, 64}) {
    at::Tensor got = scorer.score_rows(rows, batch).to(at::kDouble);
    const double diff = (got - want).abs().max().item<double>();
    std::printf("batch %lld: %lld rows, max |C++ - Python| = %.3g\n", static_cast<long long>(batch),
                static_cast<long long>(got.size(0)), diff);
    if (!(diff <= 1e-4)) ++failures;
  }
  at::Tensor w = scorer.gate(at::tensor({int64_t(1) << 40}));
  if (w[0][0].item<float>() != 1.0f || w.sum().item<float>() != 1.0f) {
    std::printf("an unknown user is not routed to the global adapter\n");
    ++failures;
  }
  return failures == 0 ? 0 : 1;
}
