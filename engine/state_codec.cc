#include "engine/state_codec.h"

#include <ATen/Functions.h>
#include <ATen/core/Dict.h>
#include <ATen/core/List.h>
#include <ATen/core/jit_type.h>

#include <map>
#include <tuple>
#include <unordered_map>
#include <unordered_set>

#include "engine/torch_call.h"
#include "store/record_check.h"
#include "store/names.h"

namespace ckptkv {
namespace {

using flatbuffers::FlatBufferBuilder;
using flatbuffers::Offset;
using NodeOffset = Offset<fb::Node>;

// Nesting deeper than this is refused (the verifier allows twice as much).
constexpr int kMaxNesting = 200;

fb::NodeKind KindOfType(const c10::TypePtr& t) {
  switch (t->kind()) {
    case c10::TypeKind::IntType:
      return fb::NodeKind::Int;
    case c10::TypeKind::FloatType:
      return fb::NodeKind::Double;
    case c10::TypeKind::BoolType:
      return fb::NodeKind::Bool;
    case c10::TypeKind::StringType:
      return fb::NodeKind::String;
    case c10::TypeKind::TensorType:
      return fb::NodeKind::Tensor;
    case c10::TypeKind::ComplexType:
      return fb::NodeKind::ComplexDouble;
    case c10::TypeKind::DeviceObjType:
      return fb::NodeKind::Device;
    default:
      return fb::NodeKind::None;  // Any
  }
}

c10::TypePtr TypeOfKind(fb::NodeKind k) {
  switch (k) {
    case fb::NodeKind::Int:
      return c10::IntType::get();
    case fb::NodeKind::Double:
      return c10::FloatType::get();
    case fb::NodeKind::Bool:
      return c10::BoolType::get();
    case fb::NodeKind::String:
      return c10::StringType::get();
    case fb::NodeKind::Tensor:
      return c10::TensorType::get();
    case fb::NodeKind::ComplexDouble:
      return c10::ComplexType::get();
    case fb::NodeKind::Device:
      return c10::DeviceObjType::get();
    default:
      return c10::AnyType::get();
  }
}

std::string KeyComponent(const c10::IValue& key) {
  if (key.isString()) return StateTreeWriter::EscapeComponent(key.toStringRef());
  if (key.isInt()) return std::to_string(key.toInt());
  if (key.isBool()) return key.toBool() ? "True" : "False";
  if (key.isDouble()) return std::to_string(key.toDouble());
  return "key";
}

class Encoder {
 public:
  explicit Encoder(std::string where) : where_(std::move(where)), w_(where_) {}

  Result<EncodedState> Run(const c10::IValue& state) {
    auto root = Encode(state, "", 0);
    if (!status_.ok()) return status_;
    return w_.Finish(root);
  }

 private:
  void Fail(const std::string& path, const std::string& what) {
    if (status_.ok()) {
      status_ = Status::InvalidArgument(where_ + ": value at '" + (path.empty() ? "/" : path) +
                                        "' " + what);
    }
  }

  static std::string Child(const std::string& path, const std::string& comp) {
    return StateTreeWriter::ChildPath(path, comp);
  }

  NodeOffset EncodeTensor(const at::Tensor& t, const std::string& path) {
    NodeOffset out = 0;
    Status s = w_.Tensor(t, path, &out);
    if (!s.ok() && status_.ok()) status_ = s;
    return out;
  }

  NodeOffset Encode(const c10::IValue& v, const std::string& path, int depth) {
    if (!status_.ok()) return 0;
    if (depth > kMaxNesting) {
      Fail(path, "is nested more than " + std::to_string(kMaxNesting) + " levels deep");
      return 0;
    }
    if (v.isTensor()) return EncodeTensor(v.toTensor(), path);
    if (v.isNone()) {
      fb::NodeBuilder nb(w_.fbb());
      nb.add_kind(fb::NodeKind::None);
      return nb.Finish();
    }
    if (v.isBool()) {
      fb::NodeBuilder nb(w_.fbb());
      nb.add_kind(fb::NodeKind::Bool);
      nb.add_b(v.toBool());
      return nb.Finish();
    }
    if (v.isInt()) {
      fb::NodeBuilder nb(w_.fbb());
      nb.add_kind(fb::NodeKind::Int);
      nb.add_i(v.toInt());
      return nb.Finish();
    }
    if (v.isDouble()) {
      fb::NodeBuilder nb(w_.fbb());
      nb.add_kind(fb::NodeKind::Double);
      nb.add_d(v.toDouble());
      return nb.Finish();
    }
    if (v.isComplexDouble()) {
      auto c = v.toComplexDouble();
      fb::NodeBuilder nb(w_.fbb());
      nb.add_kind(fb::NodeKind::ComplexDouble);
      nb.add_d(c.real());
      nb.add_d_imag(c.imag());
      return nb.Finish();
    }
    if (v.isString()) {
      auto s = w_.fbb().CreateString(v.toStringRef());
      fb::NodeBuilder nb(w_.fbb());
      nb.add_kind(fb::NodeKind::String);
      nb.add_s(s);
      return nb.Finish();
    }
    if (v.isDevice()) {
      auto s = w_.fbb().CreateString(v.toDevice().str());
      fb::NodeBuilder nb(w_.fbb());
      nb.add_kind(fb::NodeKind::Device);
      nb.add_s(s);
      return nb.Finish();
    }
    if (v.isList()) {
      auto list = v.toListRef();
      std::vector<NodeOffset> items;
      items.reserve(list.size());
      for (size_t i = 0; i < list.size(); ++i) {
        items.push_back(Encode(list[i], Child(path, std::to_string(i)), depth + 1));
      }
      auto vec = w_.fbb().CreateVector(items);
      fb::NodeBuilder nb(w_.fbb());
      nb.add_kind(fb::NodeKind::List);
      nb.add_items(vec);
      nb.add_elem_kind(KindOfType(v.type()->containedType(0)));
      return nb.Finish();
    }
    if (v.isTuple()) {
      const auto& elems = v.toTupleRef().elements();
      std::vector<NodeOffset> items;
      items.reserve(elems.size());
      for (size_t i = 0; i < elems.size(); ++i) {
        items.push_back(Encode(elems[i], Child(path, std::to_string(i)), depth + 1));
      }
      auto vec = w_.fbb().CreateVector(items);
      fb::NodeBuilder nb(w_.fbb());
      nb.add_kind(fb::NodeKind::Tuple);
      nb.add_items(vec);
      return nb.Finish();
    }
    if (v.isGenericDict()) {
      auto dict = v.toGenericDict();
      std::vector<NodeOffset> keys, items;
      keys.reserve(dict.size());
      items.reserve(dict.size());
      for (const auto& entry : dict) {
        const c10::IValue& k = entry.key();
        if (!(k.isString() || k.isInt() || k.isBool() || k.isDouble())) {
          Fail(path,
               "is a dict with a " + k.tagKind() + " key; keys must be str, int, bool or float");
          return 0;
        }
        keys.push_back(Encode(k, path, depth + 1));
        items.push_back(Encode(entry.value(), Child(path, KeyComponent(k)), depth + 1));
      }
      auto kvec = w_.fbb().CreateVector(keys);
      auto ivec = w_.fbb().CreateVector(items);
      fb::NodeBuilder nb(w_.fbb());
      nb.add_kind(fb::NodeKind::Dict);
      nb.add_keys(kvec);
      nb.add_items(ivec);
      nb.add_key_kind(KindOfType(dict.keyType()));
      nb.add_elem_kind(KindOfType(dict.valueType()));
      return nb.Finish();
    }
    Fail(path, "is of type " + v.tagKind() +
                   "; storable values are tensors, dicts, lists, tuples, int, float, "
                   "complex, bool, str, device and None");
    return 0;
  }

  std::string where_;
  Status status_;
  StateTreeWriter w_;
};

class Decoder {
 public:
  Decoder(const TensorLoader& loader, std::string where, size_t node_budget)
      : loader_(loader), where_(std::move(where)), budget_(node_budget) {}

  Result<c10::IValue> Decode(const fb::Node* n, int depth) {
    if (n == nullptr) return Corrupt("missing node");
    if (budget_ == 0) return Corrupt("more nodes than the record's size allows (shared subtrees?)");
    --budget_;
    if (depth > 2 * kMaxNesting) return Corrupt("nesting too deep");
    switch (n->kind()) {
      case fb::NodeKind::None:
        return c10::IValue();
      case fb::NodeKind::Bool:
        return c10::IValue(n->b());
      case fb::NodeKind::Int:
        return c10::IValue(static_cast<int64_t>(n->i()));
      case fb::NodeKind::Double:
        return c10::IValue(n->d());
      case fb::NodeKind::ComplexDouble:
        return c10::IValue(c10::complex<double>(n->d(), n->d_imag()));
      case fb::NodeKind::String:
        if (!n->s()) return Corrupt("string node without a value");
        return c10::IValue(n->s()->str());
      case fb::NodeKind::Device:
        if (!n->s()) return Corrupt("device node without a value");
        if (std::optional<c10::Device> d = ParseDevice(n->s()->str())) return c10::IValue(*d);
        return Corrupt("device node holds an invalid device string");
      case fb::NodeKind::Bytes:
        // LibTorch has no bytes value: a std::string holds them as they are.
        return c10::IValue(n->data() ? std::string(reinterpret_cast<const char*>(n->data()->data()),
                                                   n->data()->size())
                                     : std::string());
      case fb::NodeKind::BigInt:
        if (!n->s() || !IsDecimalInteger(n->s()->string_view())) {
          return Corrupt("big-int node does not hold decimal digits");
        }
        return c10::IValue(n->s()->str());
      case fb::NodeKind::Object:
        // A Python object (saved by the Python package) reads as its
        // payload: a set as its list, an OrderedDict as its dict, an enum as
        // its value, a dataclass as the dict of its fields.
        if (!n->items() || n->items()->size() == 0) return Corrupt("object node without a payload");
        return Decode(n->items()->Get(0), depth + 1);
      case fb::NodeKind::Tensor: {
        if (!n->s()) return Corrupt("tensor node without a param path");
        std::string param = n->s()->str();
        auto it = loaded_.find(param);
        if (it != loaded_.end()) return c10::IValue(it->second);
        ASSIGN_OR_RETURN(at::Tensor t, loader_(param, n->device() ? n->device()->str() : "cpu"));
        loaded_.emplace(param, t);
        return c10::IValue(t);
      }
      case fb::NodeKind::List: {
        c10::impl::GenericList list(TypeOfKind(n->elem_kind()));
        if (n->items()) {
          list.reserve(n->items()->size());
          for (const auto* c : *n->items()) {
            ASSIGN_OR_RETURN(c10::IValue v, Decode(c, depth + 1));
            list.push_back(std::move(v));
          }
        }
        return c10::IValue(list);
      }
      case fb::NodeKind::Tuple: {
        std::vector<c10::IValue> elems;
        if (n->items()) {
          for (const auto* c : *n->items()) {
            ASSIGN_OR_RETURN(c10::IValue v, Decode(c, depth + 1));
            elems.push_back(std::move(v));
          }
        }
        return c10::IValue(c10::ivalue::Tuple::create(std::move(elems)));
      }
      case fb::NodeKind::Dict: {
        c10::impl::GenericDict dict(TypeOfKind(n->key_kind()), TypeOfKind(n->elem_kind()));
        size_t nk = n->keys() ? n->keys()->size() : 0;
        size_t ni = n->items() ? n->items()->size() : 0;
        if (nk != ni)
          return Corrupt("dict node has " + std::to_string(nk) + " keys and " + std::to_string(ni) +
                         " values");
        for (size_t i = 0; i < nk; ++i) {
          const fb::Node* key = n->keys()->Get(i);
          const fb::Node* key_value = ValueOf(key);
          switch (key_value ? key_value->kind() : fb::NodeKind::None) {
            case fb::NodeKind::Int:
            case fb::NodeKind::String:
            case fb::NodeKind::Double:
            case fb::NodeKind::Bool:
            case fb::NodeKind::ComplexDouble:
            case fb::NodeKind::Tensor:
            case fb::NodeKind::Bytes:
            case fb::NodeKind::BigInt:
              break;
            default:
              return Corrupt("dict key " + std::to_string(i) +
                             " is not of a hashable kind (int, str, float, bool, complex, tensor, "
                             "bytes)");
          }
          ASSIGN_OR_RETURN(c10::IValue k, Decode(key, depth + 1));
          ASSIGN_OR_RETURN(c10::IValue v, Decode(n->items()->Get(i), depth + 1));
          dict.insert_or_assign(std::move(k), std::move(v));
        }
        return c10::IValue(dict);
      }
    }
    return Corrupt("unknown node kind " + std::to_string(static_cast<int>(n->kind())));
  }

 private:
  Status Corrupt(const std::string& what) {
    return Status::Corruption("state tree of " + where_ + ": " + what);
  }
  const TensorLoader& loader_;
  std::string where_;
  size_t budget_;
  std::unordered_map<std::string, at::Tensor> loaded_;
};

}  // namespace

std::string StateTreeWriter::EscapeComponent(const std::string& s) {
  std::string out;
  out.reserve(s.size());
  for (char c : s) {
    if (c == '%') {
      out += "%25";
    } else if (c == '/') {
      out += "%2F";
    } else {
      out.push_back(c);
    }
  }
  return out;
}

std::string StateTreeWriter::ChildPath(const std::string& path, const std::string& component) {
  return path.empty() ? component : path + "/" + component;
}

std::string StateTreeWriter::UniqueParam(std::string path) {
  if (path.empty()) path = "tensor";
  std::string p = path;
  for (int n = 1; used_params_.count(p); ++n) p = path + "~" + std::to_string(n);
  used_params_.insert(p);
  return p;
}

Status StateTreeWriter::Tensor(const at::Tensor& t, const std::string& path,
                               flatbuffers::Offset<fb::Node>* out) {
  auto fail = [&](const std::string& what) {
    return Status::InvalidArgument(where_ + ": value at '" + (path.empty() ? "/" : path) + "' " +
                                   what);
  };
  if (!t.defined()) {
    fb::NodeBuilder nb(b_);
    nb.add_kind(fb::NodeKind::None);
    *out = nb.Finish();
    return Status::OK();
  }
  if (t.layout() != c10::kStrided) {
    return fail("is a " + std::string(c10::toString(t.layout())) +
                " tensor; only dense (strided) tensors can be saved");
  }
  if (t.is_quantized()) return fail("is a quantized tensor; dequantize it before saving");
  ASSIGN_OR_RETURN(fb::DType dtype, ToDType(t.scalar_type(), where_ + ":" + path));
  (void)dtype;
  // Two references to the same tensor view are stored once.
  auto key = std::make_tuple(static_cast<const void*>(t.storage().unsafeGetStorageImpl()),
                             t.storage_offset(), t.sizes().vec(), t.strides().vec(),
                             static_cast<int>(t.scalar_type()));
  std::string param;
  auto it = aliases_.find(key);
  if (it != aliases_.end() && t.storage().unsafeGetStorageImpl() != nullptr && t.numel() > 0) {
    param = it->second;
  } else {
    param = UniqueParam(path);
    aliases_[key] = param;
    tensors_.push_back(StateTensor{param, t});
  }
  auto s = b_.CreateString(param);
  // A meta tensor stands for a tensor whose bytes are stored separately
  // (planned files of a reshape); it loads on the CPU.
  auto dev = b_.CreateString(t.is_meta() ? std::string("cpu") : t.device().str());
  fb::NodeBuilder nb(b_);
  nb.add_kind(fb::NodeKind::Tensor);
  nb.add_s(s);
  nb.add_device(dev);
  *out = nb.Finish();
  return Status::OK();
}

EncodedState StateTreeWriter::Finish(flatbuffers::Offset<fb::Node> root) {
  uint64_t logical = 0;
  for (const auto& t : tensors_) logical += t.tensor.numel() * t.tensor.element_size();
  b_.Finish(fb::CreateStateTree(b_, root, static_cast<uint32_t>(tensors_.size()), logical));
  EncodedState out;
  out.tree.assign(reinterpret_cast<const char*>(b_.GetBufferPointer()), b_.GetSize());
  out.tensors = std::move(tensors_);
  return out;
}

Result<EncodedState> EncodeState(const c10::IValue& state, const std::string& where) {
  return TorchCall(TorchErrorKind::kUserValue, where, [&] { return Encoder(where).Run(state); });
}

Result<c10::IValue> DecodeState(const fb::StateTree& tree, const TensorLoader& tensor_for,
                                const std::string& where) {
  return DecodeNode(tree.root(), tensor_for, where);
}

Result<c10::IValue> DecodeState(std::string_view tree_bytes, const TensorLoader& tensor_for,
                                const std::string& where) {
  const fb::StateTree* tree = VerifiedStateTree(tree_bytes);
  if (tree == nullptr) return Status::Corruption("state tree of " + where + " fails verification");
  return DecodeNode(tree->root(), tensor_for, where, StateTreeNodeBudget(tree_bytes.size()));
}

Result<c10::IValue> DecodeNode(const fb::Node* node, const TensorLoader& tensor_for,
                               const std::string& where, size_t node_budget) {
  // LibTorch's containers also throw std::runtime_error (e.g. a key type
  // the dict cannot hash, or keys of mixed types): TorchCall maps both.
  return TorchCall(TorchErrorKind::kStoredValue, where + ": cannot rebuild the saved value", [&] {
    Decoder d(tensor_for, where, node_budget);
    return d.Decode(node, 0);
  });
}

const c10::IValue* DictField(const c10::IValue& dict, const std::string& key) {
  if (!dict.isGenericDict()) return nullptr;
  const auto d = dict.toGenericDict();
  auto it = d.find(key);
  return it == d.end() ? nullptr : &it->value();
}

std::optional<int64_t> DictInt(const c10::IValue& dict, const std::string& key) {
  const c10::IValue* v = DictField(dict, key);
  if (v == nullptr || !v->isInt()) return std::nullopt;
  return v->toInt();
}

Result<at::Tensor> ReadStoredTensor(const Store& store, const std::string& tag,
                                    const std::string& file, const std::string& param) {
  ASSIGN_OR_RETURN(std::vector<at::Tensor> t, ReadStoredTensors(store, tag, file, {param}));
  return std::move(t[0]);
}

Result<std::vector<at::Tensor>> ReadStoredTensors(const Store& store, const std::string& tag,
                                                  const std::string& file,
                                                  const std::vector<std::string>& params) {
  std::vector<TensorRecordRef> records;
  std::vector<at::Tensor> out;
  std::vector<TensorRead> reads;
  records.reserve(params.size());
  out.reserve(params.size());
  reads.reserve(params.size());
  for (const std::string& param : params) {
    ASSIGN_OR_RETURN(TensorRecordRef rec, store.GetTensorRecord(tag, file, param));
    std::vector<int64_t> shape;
    if (rec->shape()) shape.assign(rec->shape()->begin(), rec->shape()->end());
    // The record passed its checks: shape x dtype = byte_length, no overflow.
    at::Tensor t = at::empty(shape, at::TensorOptions().dtype(ToScalarType(rec->dtype())));
    records.push_back(std::move(rec));
    out.push_back(std::move(t));
  }
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& t = out[i];
    reads.push_back(
        TensorRead{records[i].get(), 0, static_cast<uint64_t>(t.numel()) * t.element_size(),
                   static_cast<uint8_t*>(t.data_ptr()), TensorName(tag, file, params[i])});
  }
  RETURN_IF_ERROR(store.ReadTensors(reads));
  for (size_t i = 0; i < params.size(); ++i) {
    if (records[i]->requires_grad() && out[i].is_floating_point()) out[i].set_requires_grad(true);
  }
  return out;
}

Result<std::vector<std::string>> StoredTensorPaths(std::string_view tree_bytes,
                                                   const std::string& where) {
  std::vector<std::string> paths;
  RETURN_IF_ERROR(VerifyStateTreeBytes(tree_bytes, where,
                                       "state tree of " + where + " fails verification", &paths));
  std::unordered_set<std::string> seen;
  std::vector<std::string> out;
  for (auto& p : paths) {
    if (seen.insert(p).second) out.push_back(std::move(p));
  }
  return out;
}

Result<fb::DType> ToDType(c10::ScalarType type, const std::string& where) {
  switch (type) {
    case c10::ScalarType::Bool:
      return fb::DType::Bool;
    case c10::ScalarType::Byte:
      return fb::DType::UInt8;
    case c10::ScalarType::Char:
      return fb::DType::Int8;
    case c10::ScalarType::Short:
      return fb::DType::Int16;
    case c10::ScalarType::Int:
      return fb::DType::Int32;
    case c10::ScalarType::Long:
      return fb::DType::Int64;
    case c10::ScalarType::Half:
      return fb::DType::Float16;
    case c10::ScalarType::BFloat16:
      return fb::DType::BFloat16;
    case c10::ScalarType::Float:
      return fb::DType::Float32;
    case c10::ScalarType::Double:
      return fb::DType::Float64;
    case c10::ScalarType::ComplexFloat:
      return fb::DType::ComplexFloat;
    case c10::ScalarType::ComplexDouble:
      return fb::DType::ComplexDouble;
    default:
      return Status::InvalidArgument(where + ": dtype " + std::string(c10::toString(type)) +
                                     " cannot be saved; supported: bool, uint8, int8, int16, "
                                     "int32, int64, float16, bfloat16, float32, float64, "
                                     "complex64, complex128");
  }
}

c10::ScalarType ToScalarType(fb::DType dtype) {
  switch (dtype) {
    case fb::DType::Bool:
      return c10::ScalarType::Bool;
    case fb::DType::UInt8:
      return c10::ScalarType::Byte;
    case fb::DType::Int8:
      return c10::ScalarType::Char;
    case fb::DType::Int16:
      return c10::ScalarType::Short;
    case fb::DType::Int32:
      return c10::ScalarType::Int;
    case fb::DType::Int64:
      return c10::ScalarType::Long;
    case fb::DType::Float16:
      return c10::ScalarType::Half;
    case fb::DType::BFloat16:
      return c10::ScalarType::BFloat16;
    case fb::DType::Float32:
      return c10::ScalarType::Float;
    case fb::DType::Float64:
      return c10::ScalarType::Double;
    case fb::DType::ComplexFloat:
      return c10::ScalarType::ComplexFloat;
    case fb::DType::ComplexDouble:
      return c10::ScalarType::ComplexDouble;
  }
  return c10::ScalarType::Undefined;
}

}  // namespace ckptkv
