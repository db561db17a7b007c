#include "checkpoint/deepspeed/merge_state.h"

#include <ATen/ATen.h>

#include "engine/torch_call.h"

namespace ckptkv::checkpoint {
namespace {

std::string KeyString(const c10::IValue& key) {
  if (key.isString()) return key.toStringRef();
  if (key.isInt()) return std::to_string(key.toInt());
  if (key.isBool()) return key.toBool() ? "True" : "False";
  return "<" + PyTypeName(key) + " key>";
}

std::string Where(const std::vector<std::string>& path) {
  if (path.empty()) return "<root>";
  std::string s;
  for (const auto& p : path) s += (s.empty() ? "" : ".") + p;
  return s;
}

std::vector<std::string> With(const std::vector<std::string>& path, std::string key) {
  std::vector<std::string> out = path;
  out.push_back(std::move(key));
  return out;
}

}  // namespace

std::string PyTypeName(const c10::IValue& v) {
  if (v.isNone()) return "NoneType";
  if (v.isTensor()) return "Tensor";
  if (v.isBool()) return "bool";
  if (v.isInt()) return "int";
  if (v.isDouble()) return "float";
  if (v.isComplexDouble()) return "complex";
  if (v.isString()) return "str";
  if (v.isList()) return "list";
  if (v.isTuple()) return "tuple";
  if (v.isGenericDict()) return "dict";
  if (v.isDevice()) return "device";
  return v.tagKind();
}

Result<c10::IValue> MergeState(const c10::IValue& a, const c10::IValue& b,
                               const MergeOptions& options, const std::vector<std::string>& path) {
  const std::string ta = PyTypeName(a), tb = PyTypeName(b);
  if (ta != tb) {
    return Status::InvalidArgument("merge_state at " + Where(path) +
                                   ": cannot merge two states of types " + ta + " and " + tb +
                                   "; both files must hold the same type there");
  }
  if (a.isGenericDict()) {
    const c10::impl::GenericDict da = a.toGenericDict();
    const c10::impl::GenericDict db = b.toGenericDict();
    const bool same_types = *da.keyType() == *db.keyType() && *da.valueType() == *db.valueType();
    c10::impl::GenericDict out(same_types ? da.keyType() : c10::AnyType::get(),
                               same_types ? da.valueType() : c10::AnyType::get());
    if (options.keep_first_only_keys) {
      // Later revision: a's keys first (merged when b has them), then b-only keys.
      for (const auto& e : da) {
        auto it = db.find(e.key());
        if (it == db.end()) {
          out.insert(e.key(), e.value());
        } else {
          ASSIGN_OR_RETURN(auto merged, MergeState(e.value(), it->value(), options,
                                                   With(path, KeyString(e.key()))));
          out.insert(e.key(), std::move(merged));
        }
      }
      for (const auto& e : db) {
        if (da.find(e.key()) == da.end()) out.insert(e.key(), e.value());
      }
      return c10::IValue(out);
    }
    for (const auto& e : db) {
      auto it = da.find(e.key());
      if (it == da.end()) {
        out.insert(e.key(), e.value());
      } else {
        ASSIGN_OR_RETURN(auto merged, MergeState(it->value(), e.value(), options,
                                                 With(path, KeyString(e.key()))));
        out.insert(e.key(), std::move(merged));
      }
    }
    return c10::IValue(out);
  }
  if (a.isList() || a.isTuple()) {
    const std::vector<c10::IValue> ea =
        a.isList() ? a.toListRef().vec() : a.toTupleRef().elements().vec();
    const std::vector<c10::IValue> eb =
        b.isList() ? b.toListRef().vec() : b.toTupleRef().elements().vec();
    if (ea.size() != eb.size()) {
      return Status::InvalidArgument(
          "merge_state at " + Where(path) + ": cannot merge lists of different lengths, a = " +
          std::to_string(ea.size()) + " b = " + std::to_string(eb.size()));
    }
    std::vector<c10::IValue> merged;
    merged.reserve(ea.size());
    for (size_t i = 0; i < ea.size(); ++i) {
      // DeepSpeed passes the list's own key path to its elements.
      ASSIGN_OR_RETURN(auto m, MergeState(ea[i], eb[i], options, path));
      merged.push_back(std::move(m));
    }
    if (a.isTuple()) return c10::IValue(c10::ivalue::Tuple::create(std::move(merged)));
    c10::impl::GenericList out(a.toList().elementType());
    out.reserve(merged.size());
    for (auto& m : merged) out.push_back(std::move(m));
    return c10::IValue(out);
  }
  if (a.isTensor()) {
    const at::Tensor& x = a.toTensor();
    const at::Tensor& y = b.toTensor();
    if (x.dim() == 0 && options.scalar_tensors_from_first) return a;
    if (x.dim() == 0 || y.dim() == 0) {
      return Status::InvalidArgument(
          "merge_state at " + Where(path) +
          ": a 0-dim tensor cannot be concatenated (DeepSpeed's torch.cat fails the same way); "
          "set MergeOptions::scalar_tensors_from_first to take it from the first file");
    }
    return TorchCall(TorchErrorKind::kUserValue,
                     "merge_state at " + Where(path) + ": cannot cat tensors of shapes " +
                         c10::str(x.sizes()) + " and " + c10::str(y.sizes()) + " on dim 0",
                     [&]() -> Result<c10::IValue> {
                       return c10::IValue(at::cat({x, y}, 0));
                     });
  }
  return a;
}

}  // namespace ckptkv::checkpoint
