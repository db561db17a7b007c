// Conversion between LibTorch values and ckptkv records.
//
// EncodeState walks a c10::IValue and builds its StateTree record; every
// tensor becomes a Tensor node naming a param path ("module/layer.weight",
// "optimizer/state/0/exp_avg": dict keys and list indices joined by '/',
// with '%' and '/' inside keys escaped as %25 and %2F). A tensor that appears
// twice (same storage, offset, sizes, strides, dtype) is stored once and
// both nodes name the same path, so load returns one shared tensor.
//
// Meta-device tensors are recorded as CPU tensors: writers that plan a file
// first and store each tensor's bytes later encode placeholders.
//
// DecodeState rebuilds the IValue from a verified tree, asking `tensor_for`
// for each distinct param path once.
#ifndef CKPTKV_ENGINE_STATE_CODEC_H_
#define CKPTKV_ENGINE_STATE_CODEC_H_

#include <ATen/core/ivalue.h>

#include <cstdint>
#include <functional>
#include <map>
#include <set>
#include <tuple>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "schema/records.h"
#include "store/status.h"
#include "store/store.h"

namespace ckptkv {

struct StateTensor {
  std::string param;
  at::Tensor tensor;
};

struct EncodedState {
  std::string tree;                  // StateTree record bytes
  std::vector<StateTensor> tensors;  // distinct tensors to store
};

// Builds one StateTree record: the node builder every encoder of saved
// values shares (EncodeState here, the Python package's encoder), with the
// rules for tensors: param paths made unique ("~1", "~2", ...), one record
// per distinct view (same storage, offset, sizes, strides, dtype), dense
// tensors of a storable dtype only.
class StateTreeWriter {
 public:
  explicit StateTreeWriter(std::string where) : where_(std::move(where)) {}

  flatbuffers::FlatBufferBuilder& fbb() { return b_; }
  // A Tensor node for `t` found at `path` (an undefined tensor is None).
  // InvalidArgument naming `where` and `path` for a tensor that cannot be
  // stored (sparse, quantized, an unsupported dtype).
  Status Tensor(const at::Tensor& t, const std::string& path, flatbuffers::Offset<fb::Node>* out);
  // Finishes the record with `root`; the writer is spent afterwards.
  EncodedState Finish(flatbuffers::Offset<fb::Node> root);

  // A dict key or index as one component of a param path ('%' and '/'
  // escaped as %25 and %2F), and a path joined with one.
  static std::string EscapeComponent(const std::string& s);
  static std::string ChildPath(const std::string& path, const std::string& component);

 private:
  std::string UniqueParam(std::string path);

  std::string where_;
  flatbuffers::FlatBufferBuilder b_{4096};
  std::vector<StateTensor> tensors_;
  std::set<std::string> used_params_;
  std::map<std::tuple<const void*, int64_t, std::vector<int64_t>, std::vector<int64_t>, int>,
           std::string>
      aliases_;
};

// `where` names the file in error messages. Fails with InvalidArgument for
// values that cannot be stored (objects, futures, sparse tensors, ...).
Result<EncodedState> EncodeState(const c10::IValue& state, const std::string& where);

using TensorLoader =
    std::function<Result<at::Tensor>(const std::string& param, const std::string& saved_device)>;
Result<c10::IValue> DecodeState(const fb::StateTree& tree, const TensorLoader& tensor_for,
                                const std::string& where);
// The same from the tree's bytes: verified, then decoded within a node
// budget tied to their size (StateTreeNodeBudget), so a small record of
// shared subtrees cannot cost time or memory out of proportion.
Result<c10::IValue> DecodeState(std::string_view tree_bytes, const TensorLoader& tensor_for,
                                const std::string& where);
// One node of a state tree (a subtree), the same way; at most
// `node_budget` nodes are visited.
Result<c10::IValue> DecodeNode(const fb::Node* node, const TensorLoader& tensor_for,
                               const std::string& where, size_t node_budget = SIZE_MAX);

// The stored tensor `param` of `tag`/`file`, read whole into host memory
// (requires_grad as saved). Errors name tag/file:param.
Result<at::Tensor> ReadStoredTensor(const Store& store, const std::string& tag,
                                    const std::string& file, const std::string& param);

// The stored tensors `params` of `tag`/`file` (each as ReadStoredTensor
// gives it, in the order of `params`): their records first, then all their
// bytes in one Store::ReadTensors, so that many blocks are in flight. Give
// them in the order of the file's state tree, the order they were saved.
Result<std::vector<at::Tensor>> ReadStoredTensors(const Store& store, const std::string& tag,
                                                  const std::string& file,
                                                  const std::vector<std::string>& params);

// The distinct tensor paths of a file's verified state tree bytes, in the
// order of the tree (the order a save wrote them).
Result<std::vector<std::string>> StoredTensorPaths(std::string_view tree_bytes,
                                                   const std::string& where);

// The value under `key` of a dict with string keys (nullptr when `dict` is
// not a dict or lacks the key; the pointer lives as long as `dict`), and
// the same when it is an int.
const c10::IValue* DictField(const c10::IValue& dict, const std::string& key);
std::optional<int64_t> DictInt(const c10::IValue& dict, const std::string& key);

// Stable dtype codes <-> LibTorch scalar types.
Result<fb::DType> ToDType(c10::ScalarType type, const std::string& where);
c10::ScalarType ToScalarType(fb::DType dtype);

}  // namespace ckptkv

#endif  // CKPTKV_ENGINE_STATE_CODEC_H_
