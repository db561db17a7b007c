#include "checkpoint/core/state_view.h"

#include <charconv>

#include "store/store.h"
#include "store/names.h"

namespace ckptkv::checkpoint {
namespace {

std::optional<int64_t> ParseInt(const std::string& s) {
  int64_t v = 0;
  const char* end = s.data() + s.size();
  auto [p, ec] = std::from_chars(s.data(), end, v);
  if (ec != std::errc() || p != end || s.empty()) return std::nullopt;
  return v;
}

}  // namespace

Result<StoredState> StoredState::Read(const Store& store, const std::string& tag,
                                      const std::string& file) {
  ASSIGN_OR_RETURN(std::string bytes, store.GetFileTree(tag, file));
  return FromBytes(std::move(bytes), FileName(tag, file));
}

Result<StoredState> StoredState::FromBytes(std::string bytes, std::string where) {
  if (VerifiedStateTree(bytes) == nullptr) {
    return Status::Corruption(where + ": state tree fails verification");
  }
  return StoredState(std::move(bytes), std::move(where));
}

const fb::StateTree* StoredState::tree() const {
  return flatbuffers::GetRoot<fb::StateTree>(bytes_.data());
}

const fb::Node* StoredState::root() const { return tree()->root(); }

const fb::Node* StoredState::Find(const KeyPath& path) const { return FindPath(root(), path); }

namespace {

template <typename T>
Result<T> Typed(const StoredState& s, const KeyPath& path, std::optional<T> (*as)(const fb::Node*),
                const char* want) {
  const fb::Node* n = s.Find(path);
  if (n == nullptr) {
    return Status::NotFound(s.where() + ": no value at '" + PathString(path) + "'");
  }
  std::optional<T> v = as(n);
  if (!v) {
    return Status::InvalidArgument(s.where() + ": value at '" + PathString(path) + "' is " +
                                   KindName(n) + ", expected " + want);
  }
  return *v;
}

}  // namespace

Result<int64_t> StoredState::GetInt(const KeyPath& path) const {
  return Typed<int64_t>(*this, path, &AsInt, "Int");
}
Result<double> StoredState::GetDouble(const KeyPath& path) const {
  return Typed<double>(*this, path, &AsDouble, "Double or Int");
}
Result<std::string> StoredState::GetString(const KeyPath& path) const {
  return Typed<std::string>(*this, path, &AsString, "String");
}
Result<bool> StoredState::GetBool(const KeyPath& path) const {
  return Typed<bool>(*this, path, &AsBool, "Bool");
}

std::string KindName(const fb::Node* node) {
  if (node == nullptr) return "absent";
  const char* name = fb::EnumNameNodeKind(node->kind());
  return name && *name ? name : "kind " + std::to_string(static_cast<int>(node->kind()));
}

std::string PathString(const KeyPath& path) {
  std::string s;
  for (const auto& c : path) {
    if (!s.empty()) s += '/';
    s += c;
  }
  return s;
}

const fb::Node* Child(const fb::Node* node, const std::string& component) {
  node = ValueOf(node);
  if (node == nullptr) return nullptr;
  switch (node->kind()) {
    case fb::NodeKind::Dict: {
      const auto* keys = node->keys();
      const auto* items = node->items();
      if (keys == nullptr || items == nullptr) return nullptr;
      const std::optional<int64_t> as_int = ParseInt(component);
      const size_t n = std::min(keys->size(), items->size());
      for (size_t i = 0; i < n; ++i) {
        const fb::Node* k = keys->Get(i);
        if (k->kind() == fb::NodeKind::String && k->s() && k->s()->string_view() == component) {
          return items->Get(i);
        }
        if (k->kind() == fb::NodeKind::Int && as_int && k->i() == *as_int) return items->Get(i);
      }
      return nullptr;
    }
    case fb::NodeKind::List:
    case fb::NodeKind::Tuple: {
      const auto* items = node->items();
      const std::optional<int64_t> idx = ParseInt(component);
      if (items == nullptr || !idx || *idx < 0 || *idx >= static_cast<int64_t>(items->size())) {
        return nullptr;
      }
      return items->Get(static_cast<flatbuffers::uoffset_t>(*idx));
    }
    default:
      return nullptr;
  }
}

const fb::Node* FindPath(const fb::Node* node, const KeyPath& path) {
  for (const auto& c : path) {
    node = Child(node, c);
    if (node == nullptr) return nullptr;
  }
  return node;
}

std::optional<int64_t> AsInt(const fb::Node* node) {
  node = ValueOf(node);
  if (node == nullptr || node->kind() != fb::NodeKind::Int) return std::nullopt;
  return node->i();
}

std::optional<double> AsDouble(const fb::Node* node) {
  node = ValueOf(node);
  if (node == nullptr) return std::nullopt;
  if (node->kind() == fb::NodeKind::Double) return node->d();
  if (node->kind() == fb::NodeKind::Int) return static_cast<double>(node->i());
  return std::nullopt;
}

std::optional<std::string> AsString(const fb::Node* node) {
  node = ValueOf(node);
  if (node == nullptr || node->kind() != fb::NodeKind::String) return std::nullopt;
  return node->s() ? node->s()->str() : std::string();
}

std::optional<bool> AsBool(const fb::Node* node) {
  node = ValueOf(node);
  if (node == nullptr || node->kind() != fb::NodeKind::Bool) return std::nullopt;
  return node->b();
}

bool IsNone(const fb::Node* node) {
  node = ValueOf(node);
  return node == nullptr || node->kind() == fb::NodeKind::None;
}

std::optional<std::string> TensorParam(const fb::Node* node) {
  node = ValueOf(node);
  if (node == nullptr || node->kind() != fb::NodeKind::Tensor || node->s() == nullptr) {
    return std::nullopt;
  }
  return node->s()->str();
}

std::string KeyText(const fb::Node* key) {
  if (key == nullptr) return "absent";
  switch (key->kind()) {
    case fb::NodeKind::String:
      return key->s() ? key->s()->str() : std::string();
    case fb::NodeKind::Int:
      return std::to_string(key->i());
    case fb::NodeKind::Bool:
      return key->b() ? "True" : "False";
    default:
      return KindName(key);
  }
}

std::vector<std::pair<const fb::Node*, const fb::Node*>> DictEntries(const fb::Node* node) {
  node = ValueOf(node);
  std::vector<std::pair<const fb::Node*, const fb::Node*>> out;
  if (node == nullptr || node->kind() != fb::NodeKind::Dict || node->keys() == nullptr ||
      node->items() == nullptr) {
    return out;
  }
  const size_t n = std::min(node->keys()->size(), node->items()->size());
  out.reserve(n);
  for (size_t i = 0; i < n; ++i) out.emplace_back(node->keys()->Get(i), node->items()->Get(i));
  return out;
}

std::vector<const fb::Node*> Items(const fb::Node* node) {
  node = ValueOf(node);
  std::vector<const fb::Node*> out;
  if (node == nullptr ||
      (node->kind() != fb::NodeKind::List && node->kind() != fb::NodeKind::Tuple) ||
      node->items() == nullptr) {
    return out;
  }
  out.reserve(node->items()->size());
  for (const fb::Node* n : *node->items()) out.push_back(n);
  return out;
}

}  // namespace ckptkv::checkpoint
