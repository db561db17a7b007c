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
