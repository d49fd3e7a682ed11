// A reader for the safetensors format: 8 bytes little-endian header length N, N bytes of JSON
// {"name": {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, "__metadata__": {..}}, then the
// data. The JSON is parsed by a small recursive-descent parser that knows the subset the format uses.
#include <ATen/ATen.h>

#include <cstdint>
#include <cstring>
#include <fstream>
#include <sstream>
#include <stdexcept>

#include "thinkrec_scorer.h"

namespace thinkrec {
namespace {

struct Json {
  enum Kind { Null, Number, String, Array, Object } kind = Null;
  double number = 0;
  std::string string;
  std::vector<Json> items;
  std::vector<std::pair<std::string, Json>> fields;

  const Json& at(const std::string& key) const {
    for (const auto& f : fields)
      if (f.first == key) return f.second;
    throw std::runtime_error("missing key \"" + key + "\"");
  }
};

class Parser {
 public:
  explicit Parser(const std::string& text) : s_(text) {}

  Json parse() {
    Json v = value();
    space();
    if (i_ != s_.size()) fail("trailing characters");
    return v;
  }

 private:
  const std::string& s_;
  size_t i_ = 0;

  [[noreturn]] void fail(const std::string& why) {
    throw std::runtime_error("header JSON: " + why + " at byte " + std::to_string(i_));
  }
  void space() {
    while (i_ < s_.size() && (s_[i_] == ' ' || s_[i_] == '\n' || s_[i_] == '\r' || s_[i_] == '\t')) ++i_;
  }
  void expect(char c) {
    space();
    if (i_ >= s_.size() || s_[i_] != c) fail(std::string("expected '") + c + "'");
    ++i_;
  }
  Json value() {
    space();
    if (i_ >= s_.size()) fail("unexpected end");
    char c = s_[i_];
    Json v;
    if (c == '{') {
      v.kind = Json::Object;
      ++i_;
      space();
      if (s_[i_] == '}') return ++i_, v;
      for (;;) {
        std::string key = str();
        expect(':');
        v.fields.emplace_back(key, value());
        space();
        if (s_[i_] == ',') { ++i_; continue; }
        expect('}');
        return v;
      }
    }
    if (c == '[') {
      v.kind = Json::Array;
      ++i_;
      space();
      if (s_[i_] == ']') return ++i_, v;
      for (;;) {
        v.items.push_back(value());
        space();
        if (s_[i_] == ',') { ++i_; continue; }
        expect(']');
        return v;
      }
    }
    if (c == '"') {
      v.kind = Json::String;
      v.string = str();
      return v;
    }
    size_t start = i_;
    while (i_ < s_.size() && std::string("+-0123456789.eE").find(s_[i_]) != std::string::npos) ++i_;
    if (start == i_) fail("unexpected character");
    v.kind = Json::Number;
    v.number = std::stod(s_.substr(start, i_ - start));
    return v;
  }
  std::string str() {
    expect('"');
    std::string out;
    while (i_ < s_.size() && s_[i_] != '"') {
      if (s_[i_] == '\\') {
        ++i_;
        if (i_ >= s_.size()) fail("bad escape");
        char e = s_[i_];
        out += e == 'n' ? '\n' : e == 't' ? '\t' : e;  // names and dtypes are plain ASCII
      } else {
        out += s_[i_];
      }
      ++i_;
    }
    expect('"');
    return out;
  }
};

at::ScalarType dtype_of(const std::string& name) {
  if (name == "I64") return at::kLong;
  if (name == "I32") return at::kInt;
  if (name == "F32") return at::kFloat;
  if (name == "F64") return at::kDouble;
  if (name == "BF16") return at::kBFloat16;
  if (name == "BOOL") return at::kBool;
  throw std::runtime_error("unsupported dtype " + name);
}

}  // namespace

TensorMap read_safetensors(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error(path + ": cannot open");
  try {
    uint8_t len_bytes[8];
    if (!f.read(reinterpret_cast<char*>(len_bytes), 8)) throw std::runtime_error("shorter than 8 bytes");
    uint64_t n = 0;
    for (int k = 7; k >= 0; --k) n = (n << 8) | len_bytes[k];
    if (n > (uint64_t(1) << 30)) throw std::runtime_error("header length " + std::to_string(n));
    std::string header(n, '\0');
    if (!f.read(header.data(), static_cast<std::streamsize>(n))) throw std::runtime_error("truncated header");
    std::stringstream rest;
    rest << f.rdbuf();
    const std::string data = rest.str();
    TensorMap out;
    Json root = Parser(header).parse();
    for (const auto& [name, info] : root.fields) {
      if (name == "__metadata__") continue;
      std::vector<int64_t> shape;
      for (const auto& d : info.at("shape").items) shape.push_back(static_cast<int64_t>(d.number));
      const auto& off = info.at("data_offsets").items;
      auto begin = static_cast<size_t>(off.at(0).number), end = static_cast<size_t>(off.at(1).number);
      at::Tensor t = at::empty(shape, at::TensorOptions().dtype(dtype_of(info.at("dtype").string)));
      if (end < begin || end > data.size() || end - begin != t.nbytes())
        throw std::runtime_error("tensor " + name + ": data offsets do not match its shape");
      std::memcpy(t.data_ptr(), data.data() + begin, end - begin);  // little-endian hosts, as the format
      out.emplace(name, t);
    }
    return out;
  } catch (const std::exception& e) {
    throw std::runtime_error(path + ": not a readable safetensors file (" + e.what() + ")");
  }
}

std::vector<std::string> read_lines(const std::string& path) {
  std::ifstream f(path);
  if (!f) throw std::runtime_error(path + ": cannot open");
  std::vector<std::string> out;
  for (std::string line; std::getline(f, line);) out.push_back(line);
  return out;
}

}  // namespace thinkrec
