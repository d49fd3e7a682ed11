// thinkrec-score DIR [ROWS] [--batch-size N] > scores.jsonl
//
// Scores ROWS (default DIR/rows.safetensors, written by `python -m thinkrec.export aoti`) with the run
// exported to DIR and prints one JSON line per row in input order: {"pos", "user_id", "item_id", "label",
// "score"}. Load and scoring times go to stderr.
#include <ATen/ATen.h>

#include <chrono>
#include <cstdio>
#include <iostream>
#include <string>

#include "thinkrec_scorer.h"

namespace {

std::string json_string(const std::string& s) {
  std::string out = "\"";
  for (char c : s) {
    if (c == '"' || c == '\\') out += '\\';
    out += c;
  }
  return out + "\"";
}

double seconds_since(std::chrono::steady_clock::time_point t) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
}

}  // namespace

int main(int argc, char** argv) {
  std::string dir, rows_path;
  int64_t batch_size = 32;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--batch-size" && i + 1 < argc) {
      batch_size = std::stoll(argv[++i]);
    } else if (a == "-h" || a == "--help") {
      std::cout << "usage: thinkrec-score DIR [ROWS] [--batch-size N] > scores.jsonl\n";
      return 0;
    } else if (dir.empty()) {
      dir = a;
    } else if (rows_path.empty()) {
      rows_path = a;
    } else {
      std::cerr << "thinkrec-score: unexpected argument " << a << "\n";
      return 2;
    }
  }
  if (dir.empty() || batch_size < 1) {
    std::cerr << "usage: thinkrec-score DIR [ROWS] [--batch-size N] > scores.jsonl\n";
    return 2;
  }
  if (rows_path.empty()) rows_path = dir + "/rows.safetensors";
  try {
    auto t0 = std::chrono::steady_clock::now();
    thinkrec::Scorer scorer(dir);
    thinkrec::TensorMap rows = thinkrec::read_safetensors(rows_path);
    const double load_s = seconds_since(t0);
    auto t1 = std::chrono::steady_clock::now();
    at::Tensor scores = scorer.score_rows(rows, batch_size);
    const double score_s = seconds_since(t1);
    const int64_t n = scores.size(0);
    at::Tensor pos = rows.at("pos"), user = rows.at("user"), item = rows.at("item"), label = rows.at("label");
    std::vector<int64_t> order(n);  // print in input order
    for (int64_t r = 0; r < n; ++r) order[pos[r].item<int64_t>()] = r;
    for (int64_t r : order) {
      const int64_t lab = label[r].item<int64_t>();
      std::printf("{\"pos\": %lld, \"user_id\": %s, \"item_id\": %s, \"label\": %s, \"score\": %.9g}\n",
                  static_cast<long long>(pos[r].item<int64_t>()),
                  json_string(scorer.user_ids().at(user[r].item<int64_t>())).c_str(),
                  json_string(scorer.item_ids().at(item[r].item<int64_t>())).c_str(),
                  lab < 0 ? "null" : std::to_string(lab).c_str(), scores[r].item<float>());
    }
    std::fprintf(stderr, "{\"rows\": %lld, \"load_seconds\": %.3f, \"score_seconds\": %.3f, \"rows_per_s\": %.2f}\n",
                 static_cast<long long>(n), load_s, score_s, n / score_s);
  } catch (const c10::Error& e) {
    std::cerr << "thinkrec-score: error: " << e.what_without_backtrace() << "\n";
    return 1;
  } catch (const std::exception& e) {
    std::cerr << "thinkrec-score: error: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
