#include "tests/tools/kv_browser_fixture.h"

#include <cmath>
#include <cstring>
#include <limits>
#include <map>
#include <utility>

#include "store/store.h"

namespace ckptkv::testing {

namespace {

using NodeOffset = flatbuffers::Offset<fb::Node>;

struct Tensor {
  fb::DType dtype;
  std::vector<int64_t> shape;
  std::vector<uint8_t> bytes;
};

template <typename T>
Tensor Make(fb::DType dtype, std::vector<int64_t> shape, const std::vector<T>& values) {
  Tensor t{dtype, std::move(shape), std::vector<uint8_t>(values.size() * sizeof(T))};
  std::memcpy(t.bytes.data(), values.data(), t.bytes.size());
  return t;
}

uint16_t ToBFloat16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  return static_cast<uint16_t>(bits >> 16);  // values are exact in bfloat16
}

NodeOffset Leaf(flatbuffers::FlatBufferBuilder& b, fb::NodeKind kind, int64_t i, double d,
                const std::string& s) {
  auto str = s.empty() ? 0 : b.CreateString(s);
  fb::NodeBuilder nb(b);
  nb.add_kind(kind);
  nb.add_i(i);
  nb.add_d(d);
  if (!s.empty()) nb.add_s(str);
  return nb.Finish();
}

NodeOffset Dict(flatbuffers::FlatBufferBuilder& b,
                const std::vector<std::pair<std::string, NodeOffset>>& entries) {
  std::vector<NodeOffset> keys, items;
  for (const auto& [k, v] : entries) {
    keys.push_back(Leaf(b, fb::NodeKind::String, 0, 0, k));
    items.push_back(v);
  }
  auto kv = b.CreateVector(keys);
  auto iv = b.CreateVector(items);
  fb::NodeBuilder nb(b);
  nb.add_kind(fb::NodeKind::Dict);
  nb.add_keys(kv);
  nb.add_items(iv);
  nb.add_key_kind(fb::NodeKind::String);
  return nb.Finish();
}

std::string Tree(const std::map<std::string, Tensor>& tensors, const std::string& group,
                 int64_t iteration, bool with_meta) {
  flatbuffers::FlatBufferBuilder b;
  std::vector<std::pair<std::string, NodeOffset>> module;
  uint64_t bytes = 0;
  for (const auto& [param, t] : tensors) {
    module.emplace_back(param.substr(group.size() + 1), Leaf(b, fb::NodeKind::Tensor, 0, 0, param));
    bytes += t.bytes.size();
  }
  std::vector<std::pair<std::string, NodeOffset>> root;
  root.emplace_back(group, Dict(b, module));
  if (with_meta) {
    root.emplace_back("iteration", Leaf(b, fb::NodeKind::Int, iteration, 0, ""));
    root.emplace_back("args", Dict(b, {{"lr", Leaf(b, fb::NodeKind::Double, 0, 0.001, "")},
                                       {"name", Leaf(b, fb::NodeKind::String, 0, 0, "tiny")}}));
    root.emplace_back("ds_config",
                      Dict(b, {{"train_batch_size", Leaf(b, fb::NodeKind::Int, 8, 0, "")}}));
  }
  auto r = Dict(b, root);
  b.Finish(fb::CreateStateTree(b, r, static_cast<uint32_t>(tensors.size()), bytes));
  return std::string(reinterpret_cast<const char*>(b.GetBufferPointer()), b.GetSize());
}

Status SaveFile(Store& s, const std::string& tag, const std::string& file,
                const std::map<std::string, Tensor>& tensors, const std::string& group,
                int64_t iteration, bool with_meta) {
  for (const auto& [param, t] : tensors) {
    TensorMeta meta;
    meta.dtype = t.dtype;
    meta.shape = t.shape;
    ByteSource src;
    src.length = t.bytes.size();
    src.data = t.bytes.data();
    auto r = s.PutTensor(tag, file, param, meta, src);
    if (!r.ok()) return r.status();
  }
  return s.PutFile(tag, file, Tree(tensors, group, iteration, with_meta));
}

}  // namespace

std::vector<float> LayerWeight(int layer) {
  std::vector<float> v(64 * 32);
  for (size_t i = 0; i < v.size(); ++i) {
    v[i] = static_cast<float>(static_cast<int>((i * 7 + layer * 13) % 97) - 48) * 0.25f;
  }
  return v;
}

std::vector<float> EmbedWeight() {
  std::vector<float> v(256 * 16);
  for (size_t i = 0; i < v.size(); ++i) v[i] = static_cast<float>(static_cast<int>(i % 64) - 32);
  return v;
}

std::vector<float> ExpAvg() {
  std::vector<float> v(1024);
  for (size_t i = 0; i < v.size(); ++i) v[i] = static_cast<float>(i) / 1024.0f;
  return v;
}

Status WriteFixtureStore(const std::string& dir) {
  StoreOptions o;
  o.chunk_size = kFixtureChunk;
  o.inline_threshold = 256;
  auto store_or = Store::Open(dir, o);
  if (!store_or.ok()) return store_or.status();
  Store& s = **store_or;

  std::vector<uint16_t> embed;
  for (float f : EmbedWeight()) embed.push_back(ToBFloat16(f));
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float inf = std::numeric_limits<float>::infinity();
  std::map<std::string, Tensor> model = {
      {"module/embed.weight", Make(fb::DType::BFloat16, {256, 16}, embed)},
      {"module/layers.0.weight", Make(fb::DType::Float32, {64, 32}, LayerWeight(0))},
      {"module/layers.1.weight", Make(fb::DType::Float32, {64, 32}, LayerWeight(1))},
      {"module/layers.0.bias", Make(fb::DType::Float32, {32}, std::vector<float>(32, 0.5f))},
      {"module/layers.1.bias", Make(fb::DType::Float32, {32}, std::vector<float>(32, 0.5f))},
      {"module/special",
       Make(fb::DType::Float32, {8}, std::vector<float>{nan, inf, 0, 0, 1, -1, 2, 3})},
      {"module/steps", Make(fb::DType::Int64, {4}, std::vector<int64_t>{1, 2, 3, 4})}};
  std::map<std::string, Tensor> optim = {
      {"optimizer/state/0/exp_avg", Make(fb::DType::Float32, {1024}, ExpAvg())}};

  auto commit = [&](const std::string& tag, int64_t iteration) -> Status {
    RETURN_IF_ERROR(s.BeginTag(tag));
    RETURN_IF_ERROR(SaveFile(s, tag, kModelFile, model, "module", iteration, true));
    RETURN_IF_ERROR(SaveFile(s, tag, kOptimFile, optim, "optimizer", iteration, false));
    CommitOptions co;
    co.layout = Layout{1, 1, 2, 1};
    return s.CommitTag(tag, co).status();
  };
  RETURN_IF_ERROR(commit("step1", 100));

  std::vector<float> w1 = LayerWeight(1);
  w1[5] += 1.0f;
  w1[2000] += 0.5f;
  model["module/layers.1.weight"] = Make(fb::DType::Float32, {64, 32}, w1);
  model.erase("module/special");
  // float16 bits of 1, 0.5, -2, 65504.
  model["module/head.weight"] =
      Make(fb::DType::Float16, {4}, std::vector<uint16_t>{0x3c00, 0x3800, 0xc000, 0x7bff});
  model["module/steps"].shape = {2, 2};
  RETURN_IF_ERROR(commit("step2", 200));
  RETURN_IF_ERROR(commit("step3", 300));
  return Status::OK();
}

}  // namespace ckptkv::testing
