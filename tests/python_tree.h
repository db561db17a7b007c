// Builders of state-tree nodes of the Python kinds (Bytes, BigInt, Object)
// for the C++ tests of their checks and of the readers that see an Object
// as its payload.
#ifndef CKPTKV_TESTS_PYTHON_TREE_H_
#define CKPTKV_TESTS_PYTHON_TREE_H_

#include <string>
#include <utility>
#include <vector>

#include "schema/records.h"

namespace ckptkv::testing {

using NodeOffset = flatbuffers::Offset<fb::Node>;

inline NodeOffset IntNode(flatbuffers::FlatBufferBuilder& b, int64_t v) {
  return fb::CreateNode(b, fb::NodeKind::Int, false, v);
}

inline NodeOffset TextNode(flatbuffers::FlatBufferBuilder& b, fb::NodeKind kind,
                           const std::string& s) {
  auto off = b.CreateString(s);
  fb::NodeBuilder nb(b);
  nb.add_kind(kind);
  nb.add_s(off);
  return nb.Finish();
}

inline NodeOffset BytesNode(flatbuffers::FlatBufferBuilder& b, const std::string& bytes) {
  auto data = b.CreateVector(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size());
  fb::NodeBuilder nb(b);
  nb.add_kind(fb::NodeKind::Bytes);
  nb.add_data(data);
  return nb.Finish();
}

inline NodeOffset ObjectNode(flatbuffers::FlatBufferBuilder& b, const std::string& cls,
                             int64_t form, const std::vector<NodeOffset>& payload) {
  auto s = b.CreateString(cls);
  auto items = b.CreateVector(payload);
  fb::NodeBuilder nb(b);
  nb.add_kind(fb::NodeKind::Object);
  nb.add_s(s);
  nb.add_i(form);
  nb.add_items(items);
  return nb.Finish();
}

// A List or Tuple of `items`.
inline NodeOffset SeqNode(flatbuffers::FlatBufferBuilder& b, fb::NodeKind kind,
                          const std::vector<NodeOffset>& items) {
  auto v = b.CreateVector(items);
  fb::NodeBuilder nb(b);
  nb.add_kind(kind);
  nb.add_items(v);
  return nb.Finish();
}

inline NodeOffset DictNode(flatbuffers::FlatBufferBuilder& b,
                           const std::vector<std::pair<std::string, NodeOffset>>& entries) {
  std::vector<NodeOffset> keys, items;
  for (const auto& [k, v] : entries) {
    keys.push_back(TextNode(b, fb::NodeKind::String, k));
    items.push_back(v);
  }
  auto kv = b.CreateVector(keys);
  auto iv = b.CreateVector(items);
  fb::NodeBuilder nb(b);
  nb.add_kind(fb::NodeKind::Dict);
  nb.add_keys(kv);
  nb.add_items(iv);
  return nb.Finish();
}

inline std::string FinishTree(flatbuffers::FlatBufferBuilder& b, NodeOffset root) {
  b.Finish(fb::CreateStateTree(b, root));
  return std::string(reinterpret_cast<const char*>(b.GetBufferPointer()), b.GetSize());
}

// A DeepSpeed model file as the Python package saves it: module an
// OrderedDict holding a tensor, param_shapes a list of OrderedDicts of
// torch.Size, sparse_tensor_module_names a set, zero_stage an enum, a
// dataclass, bytes and a big int.
inline std::string PythonModelTree() {
  flatbuffers::FlatBufferBuilder b;
  auto tensor = [&](const std::string& param) {
    auto s = b.CreateString(param);
    fb::NodeBuilder nb(b);
    nb.add_kind(fb::NodeKind::Tensor);
    nb.add_s(s);
    return nb.Finish();
  };
  auto module =
      ObjectNode(b, "collections:OrderedDict", 0, {DictNode(b, {{"w", tensor("module/w")}})});
  std::vector<NodeOffset> dims{IntNode(b, 4), IntNode(b, 8)};
  auto size_tuple = fb::CreateNode(b, fb::NodeKind::Tuple, false, 0, 0, 0, 0, b.CreateVector(dims));
  auto shapes = ObjectNode(b, "collections:OrderedDict", 0,
                           {DictNode(b, {{"w", ObjectNode(b, "torch:Size", 0, {size_tuple})}})});
  std::vector<NodeOffset> groups{shapes};
  auto shape_list =
      fb::CreateNode(b, fb::NodeKind::List, false, 0, 0, 0, 0, b.CreateVector(groups));
  std::vector<NodeOffset> none;
  auto empty_list = fb::CreateNode(b, fb::NodeKind::List, false, 0, 0, 0, 0, b.CreateVector(none));
  auto root = DictNode(
      b,
      {{"module", module},
       {"param_shapes", shape_list},
       {"sparse_tensor_module_names", ObjectNode(b, "builtins:set", 0, {empty_list})},
       {"zero_stage", ObjectNode(b, "deepspeed.runtime.zero.config:ZeroStageEnum", 1,
                                 {IntNode(b, 2), TextNode(b, fb::NodeKind::String, "gradients")})},
       {"frag", ObjectNode(b, "deepspeed.utils.tensor_fragment:fragment_address", 2,
                           {DictNode(b, {{"numel", IntNode(b, 32)}, {"start", IntNode(b, 0)}})})},
       {"raw", BytesNode(b, std::string("\0\1x", 3))},
       {"big", TextNode(b, fb::NodeKind::BigInt, "-123456789012345678901234567890")},
       {"dp_world_size", IntNode(b, 1)}});
  return FinishTree(b, root);
}

}  // namespace ckptkv::testing

#endif  // CKPTKV_TESTS_PYTHON_TREE_H_
