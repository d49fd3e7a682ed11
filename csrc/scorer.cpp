#include <ATen/ATen.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>

#include <fstream>
#include <stdexcept>

#include "thinkrec_scorer.h"

namespace thinkrec {

namespace {

// `dir`, after checking that it holds every file of an export (libtorch's own error would not name them).
const std::string& checked(const std::string& dir) {
  for (const char* name : {"scorer.pt2", "gate.safetensors", "users.txt", "items.txt"}) {
    if (!std::ifstream(dir + "/" + name))
      throw std::runtime_error(dir + "/" + name + ": not found; write the directory with "
                               "`python -m thinkrec.export aoti --run-dir RUN --out " + dir + "`");
  }
  return dir;
}

}  // namespace

Scorer::Scorer(const std::string& dir)
    : loader_(std::make_unique<torch::inductor::AOTIModelPackageLoader>(checked(dir) + "/scorer.pt2")),
      gate_(read_safetensors(dir + "/gate.safetensors").at("weights")),
      users_(read_lines(dir + "/users.txt")),
      items_(read_lines(dir + "/items.txt")) {}

Scorer::~Scorer() = default;

at::Tensor Scorer::gate(const at::Tensor& users) const {
  const int64_t n_users = gate_.size(0), n_adapters = gate_.size(1);
  at::Tensor known = users.lt(n_users).logical_and(users.ge(0));
  at::Tensor w = gate_.index_select(0, at::where(known, users, at::zeros_like(users)));
  at::Tensor global = at::zeros({n_adapters}, gate_.options());
  global[0] = 1.0;
  return at::where(known.unsqueeze(1), w, global.expand_as(w));
}

at::Tensor Scorer::score(const at::Tensor& input_ids, const at::Tensor& attention_mask, const at::Tensor& slot_kind,
                         const at::Tensor& slot_index, const at::Tensor& weights) {
  std::vector<at::Tensor> out = loader_->run({input_ids.contiguous(), attention_mask.contiguous(),
                                              slot_kind.contiguous(), slot_index.contiguous(),
                                              weights.contiguous()});
  return out.at(0);
}

at::Tensor Scorer::score_rows(const TensorMap& rows, int64_t batch_size) {
  for (const char* key : {"input_ids", "attention_mask", "slot_kind", "slot_index", "user"})
    if (!rows.count(key)) throw std::runtime_error(std::string("rows: missing tensor \"") + key + "\"");
  const at::Tensor& mask = rows.at("attention_mask");
  const int64_t n = mask.size(0);
  at::Tensor lengths = mask.sum(1);
  at::Tensor scores = at::empty({n}, at::kFloat);
  for (int64_t start = 0; start < n; start += batch_size) {
    const int64_t end = std::min(n, start + batch_size);
    const int64_t T = lengths.slice(0, start, end).max().item<int64_t>();
    auto cut = [&](const char* key) { return rows.at(key).slice(0, start, end).slice(1, 0, T); };
    at::Tensor w = gate(rows.at("user").slice(0, start, end));
    scores.slice(0, start, end).copy_(score(cut("input_ids"), cut("attention_mask"), cut("slot_kind"),
                                            cut("slot_index"), w));
  }
  return scores;
}

}  // namespace thinkrec
