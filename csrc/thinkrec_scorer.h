// thinkrec_scorer: score rows with a ThinkRec run exported by `python -m thinkrec.export aoti`, from C++.
//
//   thinkrec::Scorer scorer("DIR");                      // loads DIR/scorer.pt2, gate, ids
//   auto rows = thinkrec::read_safetensors("DIR/rows.safetensors");
//   at::Tensor scores = scorer.score_rows(rows);         // Yes logits [N], float32
//
// The package's inputs (see thinkrec/export.py): input_ids, attention_mask, slot_kind, slot_index [B, T]
// int64 (right-padded), weights [B, E] float32 (each row its user's adapter weights, `gate`).
#pragma once

#include <ATen/Tensor.h>

#include <map>
#include <memory>
#include <string>
#include <vector>

namespace torch::inductor {
class AOTIModelPackageLoader;
}

namespace thinkrec {

using TensorMap = std::map<std::string, at::Tensor>;

// Every tensor of a .safetensors file (I64, I32, F32, F64, BF16, BOOL), on the CPU. Throws
// std::runtime_error naming the file on a malformed one.
TensorMap read_safetensors(const std::string& path);

// The lines of a text file (without their newline).
std::vector<std::string> read_lines(const std::string& path);

class Scorer {
 public:
  explicit Scorer(const std::string& dir);
  ~Scorer();

  // Adapter weights [B, E] of user indices [B] (the gate's table; a user past it gets the global adapter).
  at::Tensor gate(const at::Tensor& users) const;

  // Yes logits [B] of one batch.
  at::Tensor score(const at::Tensor& input_ids, const at::Tensor& attention_mask, const at::Tensor& slot_kind,
                   const at::Tensor& slot_index, const at::Tensor& weights);

  // Yes logits [N] of a rows.safetensors map (input_ids, attention_mask, slot_kind, slot_index, user), in
  // batches of batch_size consecutive rows, each cut to its longest row.
  at::Tensor score_rows(const TensorMap& rows, int64_t batch_size = 32);

  const std::vector<std::string>& user_ids() const { return users_; }
  const std::vector<std::string>& item_ids() const { return items_; }

 private:
  std::unique_ptr<torch::inductor::AOTIModelPackageLoader> loader_;
  at::Tensor gate_;
  std::vector<std::string> users_, items_;
};

}  // namespace thinkrec
