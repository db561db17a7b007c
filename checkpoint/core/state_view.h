// Reading a stored state tree (the StateTree of one saved file) without
// LibTorch: find a value by its key path, read scalars, walk dicts.
//
// A path is a list of components. At a Dict a component matches a String
// key, or an Int key when it is a decimal integer; at a List or Tuple it is
// an index. So {"checkpoint_parallel_dimensions", "tp_degree"} or
// {"optimizer_state_dict", "base_optimizer_state", "state", "0", "step"}.
// Tensors are not read: a Tensor node names its record (TensorParam).
//
// Node pointers point into the bytes of the StoredState they came from and
// live as long as it does. Torch-free.
#ifndef CKPTKV_CHECKPOINT_CORE_STATE_VIEW_H_
#define CKPTKV_CHECKPOINT_CORE_STATE_VIEW_H_

#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "schema/records.h"
#include "store/status.h"

namespace ckptkv {
class Store;
}

namespace ckptkv::checkpoint {

using KeyPath = std::vector<std::string>;

// The verified state tree of one committed file.
class StoredState {
 public:
  // NotFound when the tag or file does not exist; Corruption when the
  // record fails verification.
  static Result<StoredState> Read(const Store& store, const std::string& tag,
                                  const std::string& file);
  // Takes verified StateTree bytes (Store::GetFileTree's result). `where`
  // names the file in messages ("tag/file").
  static Result<StoredState> FromBytes(std::string bytes, std::string where);

  const fb::StateTree* tree() const;
  const fb::Node* root() const;
  const std::string& where() const { return where_; }

  // The node at `path`, or nullptr.
  const fb::Node* Find(const KeyPath& path) const;
  // Typed reads: NotFound naming the path when absent, InvalidArgument
  // naming the kind found when the node is of another kind. GetDouble
  // accepts Int nodes.
  Result<int64_t> GetInt(const KeyPath& path) const;
  Result<double> GetDouble(const KeyPath& path) const;
  Result<std::string> GetString(const KeyPath& path) const;
  Result<bool> GetBool(const KeyPath& path) const;

 private:
  StoredState(std::string bytes, std::string where)
      : bytes_(std::move(bytes)), where_(std::move(where)) {}
  std::string bytes_;
  std::string where_;
};

// Kind name for messages ("Dict", "Int", ...); "absent" for nullptr.
std::string KindName(const fb::Node* node);
// "a/b/0".
std::string PathString(const KeyPath& path);

// Every function below sees a Python Object node (an OrderedDict, set,
// torch.Size, enum, dataclass; docs/format.md) as its payload, ValueOf.

// The child of a Dict (by key), List or Tuple (by index); nullptr if none.
const fb::Node* Child(const fb::Node* node, const std::string& component);
// The node at `path` below `node`; nullptr if any step is missing.
const fb::Node* FindPath(const fb::Node* node, const KeyPath& path);

// Scalar reads; nullopt when the node is absent or of another kind.
std::optional<int64_t> AsInt(const fb::Node* node);
std::optional<double> AsDouble(const fb::Node* node);  // Double or Int
std::optional<std::string> AsString(const fb::Node* node);
std::optional<bool> AsBool(const fb::Node* node);
bool IsNone(const fb::Node* node);  // absent or None
// A Tensor node's param path (the key of its TensorRecord); nullopt otherwise.
std::optional<std::string> TensorParam(const fb::Node* node);
// A dict key as text: a String key as is, an Int key in decimal, a Bool
// key "True"/"False"; other kinds their kind name.
std::string KeyText(const fb::Node* key);

// The (key, value) entries of a Dict in insertion order; empty for other kinds.
std::vector<std::pair<const fb::Node*, const fb::Node*>> DictEntries(const fb::Node* node);
// The items of a List or Tuple; empty for other kinds.
std::vector<const fb::Node*> Items(const fb::Node* node);

}  // namespace ckptkv::checkpoint

#endif  // CKPTKV_CHECKPOINT_CORE_STATE_VIEW_H_
