#include "checkpoint/query/torch_import.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cctype>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <string_view>
#include <unordered_map>

#include "checkpoint/core/legacy_archive.h"
#include "checkpoint/core/pickle_machine.h"
#include "checkpoint/core/zip_archive.h"
#include "checkpoint/query/placer.h"
#include "engine/state_codec.h"
#include "engine/torch_call.h"
#include "store/names.h"

namespace ckptkv::checkpoint {
namespace {

namespace fs = std::filesystem;
using NodeOffset = flatbuffers::Offset<fb::Node>;
using pickle::Kind;
using pickle::Value;

constexpr int kMaxDepth = 200;
constexpr uint64_t kMaxPickleBytes = uint64_t{1} << 30;
// numpy arrays up to this many bytes are stored as Bytes, larger ones as a
// 1-D uint8 tensor (as the Python package does).
constexpr uint64_t kInlineArrayBytes = uint64_t{64} << 10;
// The values and bytes written for a pickle are at most this many times its
// size (plus an allowance): memo references to one subtree repeat it, and
// a small pickle of nested shared lists would otherwise expand without end.
constexpr uint64_t kOutputFactor = 16;

// numpy's functions under both module names (numpy 2 renamed numpy.core to
// numpy._core; pickles of either name are read).
bool IsNumpy(const std::string& name, const char* module, const char* member) {
  for (const char* core : {"numpy.core.", "numpy._core."}) {
    if (name == std::string(core) + module + "." + member) return true;
  }
  return false;
}

struct StorageType {
  const char* name;
  fb::DType dtype;
};
constexpr StorageType kStorages[] = {
    {"FloatStorage", fb::DType::Float32},
    {"DoubleStorage", fb::DType::Float64},
    {"HalfStorage", fb::DType::Float16},
    {"BFloat16Storage", fb::DType::BFloat16},
    {"LongStorage", fb::DType::Int64},
    {"IntStorage", fb::DType::Int32},
    {"ShortStorage", fb::DType::Int16},
    {"CharStorage", fb::DType::Int8},
    {"ByteStorage", fb::DType::UInt8},
    {"BoolStorage", fb::DType::Bool},
    {"ComplexFloatStorage", fb::DType::ComplexFloat},
    {"ComplexDoubleStorage", fb::DType::ComplexDouble},
};

// torch's dtype names a GLOBAL may carry (torch.float16 pickles as
// "torch float16").
const std::set<std::string>& DtypeNames() {
  static const std::set<std::string> names{
      "float32",   "float",  "float64",    "double",  "float16",   "half",  "bfloat16", "int64",
      "long",      "int32",  "int",        "int16",   "short",     "int8",  "uint8",    "bool",
      "complex64", "cfloat", "complex128", "cdouble", "complex32", "qint8", "quint8",   "qint32"};
  return names;
}

// DeepSpeed's ZeroStageEnum members.
const std::map<int64_t, std::string>& ZeroStages() {
  static const std::map<int64_t, std::string> m{
      {0, "disabled"}, {1, "optimizer_states"}, {2, "gradients"}, {3, "weights"}, {4, "max_stage"}};
  return m;
}
constexpr const char* kZeroStageEnum = "deepspeed.runtime.zero.config.ZeroStageEnum";

// Classes rebuilt from NEWOBJ + BUILD of their __dict__.
const std::set<std::string>& StateClasses() {
  static const std::set<std::string> s{"deepspeed.utils.tensor_fragment.fragment_address",
                                       "deepspeed.runtime.fp16.loss_scaler.LossScaler",
                                       "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
                                       "deepspeed.checkpoint.universal_checkpoint.SubparamShape"};
  return s;
}

std::string ClassName(const Value* g) { return g->text + ":" + g->name; }

bool ValidUtf8(const std::string& s) {
  size_t i = 0;
  while (i < s.size()) {
    const auto c = static_cast<unsigned char>(s[i]);
    size_t n = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 0;
    if (n == 0 || i + n > s.size()) return false;
    for (size_t k = 1; k < n; ++k) {
      if ((static_cast<unsigned char>(s[i + k]) & 0xC0) != 0x80) return false;
    }
    i += n;
  }
  return true;
}

// Where the storages' bytes of a torch.save file are: the entries of its
// zip, or the records after the legacy format's pickles. One interpreter
// reads both through this.
class StorageSource {
 public:
  virtual ~StorageSource() = default;
  // Items of a storage's persistent id: 5 in zip files, 6 (the view
  // metadata last) in legacy ones.
  virtual size_t IdItems() const = 0;
  // The stored bytes of storage `key` (a handle for Read, and their size);
  // a null handle when the file holds none, `*looked_for` saying where.
  virtual const void* Find(const std::string& key, uint64_t* size,
                           std::string* looked_for) const = 0;
  virtual Status Read(const void* handle, uint64_t offset, uint64_t len, uint8_t* dst) const = 0;
};

class ZipStorages : public StorageSource {
 public:
  explicit ZipStorages(const ZipArchive& zip) : zip_(zip), prefix_(zip.Prefix()) {}
  size_t IdItems() const override { return 5; }
  const void* Find(const std::string& key, uint64_t* size, std::string* looked_for) const override {
    const ZipEntry* e = zip_.Find(prefix_ + "/data/" + key);
    *looked_for = "entry " + prefix_ + "/data/" + key;
    if (e != nullptr) *size = e->size;
    return e;
  }
  Status Read(const void* handle, uint64_t offset, uint64_t len, uint8_t* dst) const override {
    return zip_.ReadRange(*static_cast<const ZipEntry*>(handle), offset, len, dst);
  }

 private:
  const ZipArchive& zip_;
  std::string prefix_;
};

class LegacyStorages : public StorageSource {
 public:
  explicit LegacyStorages(const LegacyArchive& file) : file_(file) {}
  size_t IdItems() const override { return 6; }
  const void* Find(const std::string& key, uint64_t* size, std::string* looked_for) const override {
    const LegacyStorage* s = file_.Find(key);
    *looked_for = "record in the storage list";
    if (s != nullptr) *size = s->size;
    return s;
  }
  Status Read(const void* handle, uint64_t offset, uint64_t len, uint8_t* dst) const override {
    return file_.ReadRange(*static_cast<const LegacyStorage*>(handle), offset, len, dst);
  }

 private:
  const LegacyArchive& file_;
};

// What a tensor's bytes are: a view of one stored storage, or (numpy
// arrays) bytes of the pickle.
struct Source {
  const void* handle = nullptr;       // of the StorageSource
  const std::string* data = nullptr;  // the bytes themselves, when not null
  fb::DType dtype = fb::DType::Float32;
  std::vector<int64_t> shape, strides;
  int64_t offset = 0;  // elements, from the start of the stored bytes
  bool requires_grad = false;
};

class Interpreter {
 public:
  // `pickle_bytes`: the size of the pickle, which bounds the work (values
  // shared through the memo are written once per reference).
  Interpreter(const StorageSource& storages, std::string where, uint64_t pickle_bytes)
      : storages_(storages),
        where_(std::move(where)),
        w_(where_),
        nodes_left_(kOutputFactor * pickle_bytes + (uint64_t{1} << 16)),
        bytes_left_(kOutputFactor * pickle_bytes + (uint64_t{1} << 24)),
        pickle_bytes_(pickle_bytes) {}

  Result<EncodedState> Run(const Value* root) {
    NodeOffset n = 0;
    RETURN_IF_ERROR(Node(root, "", 0, &n));
    return w_.Finish(n);
  }
  const Source* SourceOf(const at::Tensor& t) const {
    auto it = sources_.find(t.unsafeGetTensorImpl());
    return it == sources_.end() ? nullptr : &it->second;
  }

 private:
  Status Refuse(const Value* v, const std::string& what) const {
    return Status::NotSupported(where_ + ": pickle at byte " + std::to_string(v->offset) + ": " +
                                what);
  }
  Status Bad(const Value* v, const std::string& what) const {
    return Status::Corruption(where_ + ": pickle at byte " + std::to_string(v->offset) + ": " +
                              what);
  }
  flatbuffers::FlatBufferBuilder& b() { return w_.fbb(); }

  NodeOffset Leaf(fb::NodeKind k) {
    fb::NodeBuilder nb(b());
    nb.add_kind(k);
    return nb.Finish();
  }
  NodeOffset Text(fb::NodeKind k, const std::string& s) {
    auto off = b().CreateString(s);
    fb::NodeBuilder nb(b());
    nb.add_kind(k);
    nb.add_s(off);
    return nb.Finish();
  }
  NodeOffset Bytes(const std::string& s) {
    auto data = b().CreateVector(reinterpret_cast<const uint8_t*>(s.data()), s.size());
    fb::NodeBuilder nb(b());
    nb.add_kind(fb::NodeKind::Bytes);
    nb.add_data(data);
    return nb.Finish();
  }
  NodeOffset Seq(fb::NodeKind k, const std::vector<NodeOffset>& items) {
    auto vec = b().CreateVector(items);
    fb::NodeBuilder nb(b());
    nb.add_kind(k);
    nb.add_items(vec);
    return nb.Finish();
  }
  NodeOffset Dict(const std::vector<NodeOffset>& keys, const std::vector<NodeOffset>& items) {
    auto kv = b().CreateVector(keys);
    auto iv = b().CreateVector(items);
    fb::NodeBuilder nb(b());
    nb.add_kind(fb::NodeKind::Dict);
    nb.add_keys(kv);
    nb.add_items(iv);
    return nb.Finish();
  }
  NodeOffset Object(const std::string& cls, fb::ObjectForm form,
                    const std::vector<NodeOffset>& payload) {
    auto s = b().CreateString(cls);
    auto vec = b().CreateVector(payload);
    fb::NodeBuilder nb(b());
    nb.add_kind(fb::NodeKind::Object);
    nb.add_s(s);
    nb.add_i(static_cast<int64_t>(form));
    nb.add_items(vec);
    return nb.Finish();
  }

  static std::string KeyComponent(const Value* k) {
    if (k->kind == Kind::kString) return StateTreeWriter::EscapeComponent(k->text);
    if (k->kind == Kind::kInt) return std::to_string(k->i);
    if (k->kind == Kind::kBool) return k->b ? "True" : "False";
    return "key";
  }

  // A dict's entries (k, v, k, v, ...) as a Dict node.
  Status Entries(const std::vector<const Value*>& kv, const std::string& path, int depth,
                 NodeOffset* out) {
    std::vector<NodeOffset> keys, items;
    for (size_t i = 0; i + 1 < kv.size(); i += 2) {
      NodeOffset k = 0, v = 0;
      RETURN_IF_ERROR(Node(kv[i], path, depth + 1, &k));
      RETURN_IF_ERROR(
          Node(kv[i + 1], StateTreeWriter::ChildPath(path, KeyComponent(kv[i])), depth + 1, &v));
      keys.push_back(k);
      items.push_back(v);
    }
    *out = Dict(keys, items);
    return Status::OK();
  }
  Status Items(fb::NodeKind kind, const std::vector<const Value*>& xs, const std::string& path,
               int depth, NodeOffset* out) {
    std::vector<NodeOffset> items;
    for (size_t i = 0; i < xs.size(); ++i) {
      NodeOffset n = 0;
      RETURN_IF_ERROR(
          Node(xs[i], StateTreeWriter::ChildPath(path, std::to_string(i)), depth + 1, &n));
      items.push_back(n);
    }
    *out = Seq(kind, items);
    return Status::OK();
  }

  static bool Plain(const Value* v) {
    return v->state == nullptr && v->appended.empty() && v->set_items.empty();
  }
  const Value* Arg(const Value* call, size_t i) const {
    const Value* args = call->items[1];
    return i < args->items.size() ? args->items[i] : nullptr;
  }
  size_t ArgCount(const Value* call) const { return call->items[1]->items.size(); }

  Status IntList(const Value* v, std::vector<int64_t>* out) {
    if (v == nullptr || v->kind != Kind::kTuple)
      return Bad(v, "a shape or stride that is not a tuple");
    if (v->items.size() > 64) return Bad(v, "a tensor of more than 64 dimensions");
    out->clear();
    for (const Value* x : v->items) {
      if (x->kind != Kind::kInt || x->i < 0)
        return Bad(v, "a shape or stride that is not of ints >= 0");
      out->push_back(x->i);
    }
    return Status::OK();
  }

  // torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)
  Status TensorNode(const Value* call, bool requires_grad_arg, const std::string& path,
                    NodeOffset* out) {
    if (ArgCount(call) < 4) return Bad(call, "a tensor rebuild with fewer than 4 arguments");
    const Value* pid = Arg(call, 0);
    const size_t arity = storages_.IdItems();
    const char* id_form = arity == 5 ? "('storage', type, key, location, numel)"
                                     : "('storage', type, key, location, numel, view)";
    if (pid->kind != Kind::kPersistentId || pid->items[0]->kind != Kind::kTuple ||
        pid->items[0]->items.size() != arity) {
      return Bad(call, std::string("a tensor whose storage is not ") + id_form);
    }
    const auto& p = pid->items[0]->items;
    if (p[0]->kind != Kind::kString || p[0]->text != "storage" || p[1]->kind != Kind::kGlobal ||
        p[2]->kind != Kind::kString || p[3]->kind != Kind::kString || p[4]->kind != Kind::kInt ||
        p[4]->i < 0) {
      return Bad(pid, std::string("a storage id that is not ") + id_form);
    }
    const StorageType* st = nullptr;
    for (const auto& s : kStorages) {
      if (p[1]->text == "torch" && p[1]->name == s.name) st = &s;
    }
    if (st == nullptr)
      return Refuse(pid, "storage type " + pickle::QualifiedName(p[1]) + " is not read");
    const std::string& key = p[2]->text;
    uint64_t stored = 0;
    std::string looked_for;
    const void* handle = storages_.Find(key, &stored, &looked_for);
    if (handle == nullptr) return Bad(pid, "storage " + key + " has no " + looked_for);
    auto [it, fresh] = storage_dtypes_.emplace(key, st->dtype);
    if (!fresh && it->second != st->dtype) {
      return Bad(pid, "storage " + key + " is read as two dtypes (" + DTypeName(it->second) +
                          " and " + DTypeName(st->dtype) + ")");
    }
    const uint64_t es = DTypeSize(st->dtype);
    const auto numel = static_cast<uint64_t>(p[4]->i);
    uint64_t bytes = 0;
    if (__builtin_mul_overflow(numel, es, &bytes) || bytes != stored) {
      return Bad(pid, "storage " + key + " of " + std::to_string(numel) + " " +
                          DTypeName(st->dtype) + " elements but a " + looked_for + " of " +
                          std::to_string(stored) + " bytes");
    }
    // A legacy view of the storage: elements [base, base + view numel) of it.
    uint64_t base = 0;
    uint64_t view_numel = numel;
    if (arity == 6 && p[5]->kind != Kind::kNone) {
      const Value* view = p[5];
      if (view->kind != Kind::kTuple || view->items.size() != 3 ||
          view->items[0]->kind != Kind::kString || view->items[1]->kind != Kind::kInt ||
          view->items[2]->kind != Kind::kInt || view->items[1]->i < 0 || view->items[2]->i < 0) {
        return Bad(pid, "a storage view that is not None or (key, offset >= 0, size >= 0)");
      }
      base = static_cast<uint64_t>(view->items[1]->i);
      view_numel = static_cast<uint64_t>(view->items[2]->i);
      uint64_t end = 0;
      if (__builtin_add_overflow(base, view_numel, &end) || end > numel) {
        return Bad(pid, "a view [" + std::to_string(base) + ", +" + std::to_string(view_numel) +
                            ") of storage " + key + " of " + std::to_string(numel) + " elements");
      }
    }
    Source src;
    src.handle = handle;
    src.dtype = st->dtype;
    const Value* off = Arg(call, 1);
    if (off->kind != Kind::kInt || off->i < 0)
      return Bad(call, "a storage offset that is not an int >= 0");
    src.offset = off->i;
    RETURN_IF_ERROR(IntList(Arg(call, 2), &src.shape));
    RETURN_IF_ERROR(IntList(Arg(call, 3), &src.strides));
    if (src.shape.size() != src.strides.size())
      return Bad(call, "sizes and strides of different ranks");
    // Every element inside the storage: offset + sum((size - 1) * stride) < numel.
    uint64_t last = static_cast<uint64_t>(src.offset);
    bool empty = false;
    uint64_t count = 1;
    for (size_t d = 0; d < src.shape.size(); ++d) {
      if (src.shape[d] == 0) empty = true;
      uint64_t span = 0;
      if (src.shape[d] > 0 &&
          (__builtin_mul_overflow(static_cast<uint64_t>(src.shape[d] - 1),
                                  static_cast<uint64_t>(src.strides[d]), &span) ||
           __builtin_add_overflow(last, span, &last))) {
        return Bad(call, "a view whose extent overflows");
      }
      if (__builtin_mul_overflow(count, static_cast<uint64_t>(src.shape[d]), &count)) {
        return Bad(call, "a view whose element count overflows");
      }
    }
    // A stride-0 (expanded) view can name more elements than its storage
    // holds, which would be stored as that many bytes: refused.
    if (count > view_numel) {
      return Refuse(call, "a view of " + std::to_string(count) + " elements over storage " + key +
                              " of " + std::to_string(view_numel) +
                              " (an expanded view); save t.contiguous() instead");
    }
    if (!empty && last >= view_numel) {
      return Bad(call, "a view reaching element " + std::to_string(last) + " of storage " + key +
                           " (" + std::to_string(view_numel) + " elements)");
    }
    // From the start of the stored bytes (an empty view reads none).
    src.offset = empty ? 0 : static_cast<int64_t>(base + static_cast<uint64_t>(src.offset));
    if (requires_grad_arg && ArgCount(call) > 4 && Arg(call, 4)->kind == Kind::kBool) {
      src.requires_grad = Arg(call, 4)->b;
    }
    // Two references to one view are one tensor.
    auto vkey = std::make_tuple(key, src.offset, src.shape, src.strides);
    auto found = views_.find(vkey);
    at::Tensor meta;
    if (found != views_.end()) {
      meta = found->second;
    } else {
      meta = ValueOrThrow(TorchCall(TorchErrorKind::kStoredValue, where_, [&] {
        return Result<at::Tensor>(at::empty(
            src.shape, at::TensorOptions().dtype(ToScalarType(st->dtype)).device(at::kMeta)));
      }));
      views_.emplace(vkey, meta);
      sources_.emplace(meta.unsafeGetTensorImpl(), src);
    }
    return w_.Tensor(meta, path, out);
  }

  Status CallNode(const Value* v, const std::string& path, int depth, NodeOffset* out) {
    const Value* fn = v->items[0];
    if (fn->kind != Kind::kGlobal) return Refuse(v, "a call of a value that is not a global");
    const std::string name = pickle::QualifiedName(fn);
    const bool plain = Plain(v);
    if ((name == "torch._utils._rebuild_tensor_v2" || name == "torch._utils._rebuild_tensor") &&
        plain) {
      return TensorNode(v, name == "torch._utils._rebuild_tensor_v2", path, out);
    }
    if (IsNumpy(name, "multiarray", "_reconstruct")) return NumpyReconstruct(v, name, path, out);
    if (IsNumpy(name, "multiarray", "scalar")) return NumpyScalar(v, name, out);
    if (IsNumpy(name, "numeric", "_frombuffer")) return NumpyFromBuffer(v, name, path, out);
    if (name == "numpy.dtype") {
      std::string dtype;
      uint64_t itemsize = 0;
      RETURN_IF_ERROR(NumpyDtype(v, &dtype, &itemsize));
      *out = Object("numpy:dtype", fb::ObjectForm::Builtin, {Text(fb::NodeKind::String, dtype)});
      return Status::OK();
    }
    if ((name == "torch._utils._rebuild_parameter" ||
         name == "torch._utils._rebuild_parameter_with_state") &&
        plain && ArgCount(v) >= 2) {
      const Value* t = Arg(v, 0);
      const Value* grad = Arg(v, 1);
      // The tensor must be a tensor rebuild itself (so a chain of parameter
      // rebuilds cannot recurse).
      const std::string inner = t->kind == Kind::kCall ? pickle::QualifiedName(t->items[0]) : "";
      if ((inner != "torch._utils._rebuild_tensor_v2" && inner != "torch._utils._rebuild_tensor") ||
          !Plain(t) || grad->kind != Kind::kBool) {
        return Bad(v, "a parameter rebuild without (tensor, requires_grad)");
      }
      NodeOffset tn = 0;
      RETURN_IF_ERROR(TensorNode(t, inner == "torch._utils._rebuild_tensor_v2", path, &tn));
      fb::NodeBuilder nb(b());
      nb.add_kind(fb::NodeKind::Bool);
      nb.add_b(grad->b);
      NodeOffset g = nb.Finish();
      *out = Object("torch.nn:Parameter", fb::ObjectForm::Builtin, {tn, g});
      return Status::OK();
    }
    if (name == "collections.OrderedDict" && v->appended.empty()) {
      std::vector<const Value*> kv;
      if (ArgCount(v) == 1 && Arg(v, 0)->kind == Kind::kList) {
        for (const Value* pair : Arg(v, 0)->items) {
          if ((pair->kind != Kind::kTuple && pair->kind != Kind::kList) ||
              pair->items.size() != 2) {
            return Bad(v, "an OrderedDict item that is not a (key, value) pair");
          }
          kv.push_back(pair->items[0]);
          kv.push_back(pair->items[1]);
        }
      } else if (ArgCount(v) != 0) {
        return Bad(v, "an OrderedDict built from " + std::to_string(ArgCount(v)) + " arguments");
      }
      kv.insert(kv.end(), v->set_items.begin(), v->set_items.end());
      NodeOffset entries = 0;
      RETURN_IF_ERROR(Entries(kv, path, depth, &entries));
      std::vector<NodeOffset> payload{entries};
      if (v->state != nullptr) {
        if (v->state->kind != Kind::kDict)
          return Bad(v, "an OrderedDict whose state is not a dict");
        NodeOffset attrs = 0;
        RETURN_IF_ERROR(
            Entries(v->state->items, StateTreeWriter::ChildPath(path, "@attrs"), depth, &attrs));
        payload.push_back(attrs);
      }
      *out = Object("collections:OrderedDict", fb::ObjectForm::Builtin, payload);
      return Status::OK();
    }
    if ((name == "builtins.set" || name == "builtins.frozenset") && plain && ArgCount(v) <= 1) {
      const Value* arg = ArgCount(v) ? Arg(v, 0) : nullptr;
      if (arg != nullptr && arg->kind != Kind::kList) return Bad(v, "a set built from a non-list");
      NodeOffset list = 0;
      RETURN_IF_ERROR(Items(fb::NodeKind::List, arg ? arg->items : std::vector<const Value*>{},
                            path, depth, &list));
      *out = Object(name == "builtins.set" ? "builtins:set" : "builtins:frozenset",
                    fb::ObjectForm::Builtin, {list});
      return Status::OK();
    }
    if (name == "torch.Size" && plain && ArgCount(v) == 1 && Arg(v, 0)->kind == Kind::kTuple) {
      std::vector<int64_t> dims;
      RETURN_IF_ERROR(IntList(Arg(v, 0), &dims));
      NodeOffset t = 0;
      RETURN_IF_ERROR(Items(fb::NodeKind::Tuple, Arg(v, 0)->items, path, depth, &t));
      *out = Object("torch:Size", fb::ObjectForm::Builtin, {t});
      return Status::OK();
    }
    if (name == "torch.device" && plain && ArgCount(v) >= 1 && Arg(v, 0)->kind == Kind::kString) {
      std::string dev = Arg(v, 0)->text;
      if (ArgCount(v) == 2 && Arg(v, 1)->kind == Kind::kInt)
        dev += ":" + std::to_string(Arg(v, 1)->i);
      if (!ParseDevice(dev)) return Bad(v, "device '" + dev + "' is not a device");
      *out = Text(fb::NodeKind::Device, dev);
      return Status::OK();
    }
    if (name == "_codecs.encode" && plain && ArgCount(v) == 2 && Arg(v, 0)->kind == Kind::kString &&
        Arg(v, 1)->kind == Kind::kString && Arg(v, 1)->text == "latin1") {
      std::string bytes;
      RETURN_IF_ERROR(Latin1(v, Arg(v, 0)->text, &bytes));
      *out = Bytes(bytes);
      return Status::OK();
    }
    if (IsEmptyBytes(v)) {
      *out = Bytes("");
      return Status::OK();
    }
    if (name == "builtins.bytearray" && plain) {
      // bytearray(b"..."), or as protocol 2 writes it: bytearray("...", "latin-1").
      std::string bytes;
      if (ArgCount(v) == 1 && BytesOf(Arg(v, 0), &bytes).ok()) {
        // bytes, or _codecs.encode(str, "latin1") as protocol 2 writes bytes
      } else if (ArgCount(v) == 2 && Arg(v, 0)->kind == Kind::kString &&
                 Arg(v, 1)->kind == Kind::kString &&
                 (Arg(v, 1)->text == "latin-1" || Arg(v, 1)->text == "latin1")) {
        RETURN_IF_ERROR(Latin1(v, Arg(v, 0)->text, &bytes));
      } else if (ArgCount(v) != 0) {
        return Bad(v, "a bytearray built from other arguments than bytes or a latin-1 str");
      }
      *out = Object("builtins:bytearray", fb::ObjectForm::Builtin, {Bytes(bytes)});
      return Status::OK();
    }
    if (name == kZeroStageEnum && plain && ArgCount(v) == 1 && Arg(v, 0)->kind == Kind::kInt) {
      auto it = ZeroStages().find(Arg(v, 0)->i);
      if (it == ZeroStages().end())
        return Bad(v, "ZeroStageEnum has no member of value " + std::to_string(Arg(v, 0)->i));
      return Enum(fn, it->first, it->second, out);
    }
    if (name == "builtins.getattr" && plain && ArgCount(v) == 2 &&
        Arg(v, 0)->kind == Kind::kGlobal && pickle::QualifiedName(Arg(v, 0)) == kZeroStageEnum &&
        Arg(v, 1)->kind == Kind::kString) {
      for (const auto& [value, member] : ZeroStages()) {
        if (member == Arg(v, 1)->text) return Enum(Arg(v, 0), value, member, out);
      }
      return Bad(v, "ZeroStageEnum has no member " + Arg(v, 1)->text);
    }
    return Refuse(v, name +
                         " is not allowed (allowed: tensor and parameter rebuilds, "
                         "OrderedDict, set, frozenset, torch.Size, torch.device, dtypes, "
                         "bytes, bytearray, argparse.Namespace, numpy arrays, scalars and "
                         "dtypes, and DeepSpeed's classes)");
  }

  // A bytes value: BINBYTES, or _codecs.encode(str, "latin1").
  Status BytesOf(const Value* v, std::string* out) {
    if (v->kind == Kind::kBytes) {
      RETURN_IF_ERROR(Charge(v, 0, v->text.size()));
      *out = v->text;
      return Status::OK();
    }
    if (v->kind == Kind::kCall && v->items[0]->kind == Kind::kGlobal &&
        pickle::QualifiedName(v->items[0]) == "_codecs.encode" && Plain(v) && ArgCount(v) == 2 &&
        Arg(v, 0)->kind == Kind::kString && Arg(v, 1)->kind == Kind::kString &&
        Arg(v, 1)->text == "latin1") {
      return Latin1(v, Arg(v, 0)->text, out);
    }
    if (IsEmptyBytes(v)) {
      out->clear();
      return Status::OK();
    }
    return Bad(v, "a value that is not bytes");
  }

  // builtins.bytes(): b"" as protocol 2 writes it.
  static bool IsEmptyBytes(const Value* v) {
    return v->kind == Kind::kCall && pickle::QualifiedName(v->items[0]) == "builtins.bytes" &&
           Plain(v) && v->items[1]->items.empty();
  }

  Status Latin1(const Value* v, const std::string& utf8, std::string* out) {
    RETURN_IF_ERROR(Charge(v, 0, utf8.size()));
    out->clear();
    for (size_t i = 0; i < utf8.size(); ++i) {
      const auto c = static_cast<unsigned char>(utf8[i]);
      if (c < 0x80) {
        out->push_back(static_cast<char>(c));
      } else if ((c == 0xC2 || c == 0xC3) && i + 1 < utf8.size()) {
        out->push_back(
            static_cast<char>(((c & 0x03) << 6) | (static_cast<unsigned char>(utf8[++i]) & 0x3F)));
      } else {
        return Bad(v, "bytes encoded as latin1 hold a character beyond U+00FF");
      }
    }
    return Status::OK();
  }

  Status Enum(const Value* cls, int64_t value, const std::string& member, NodeOffset* out) {
    fb::NodeBuilder nb(b());
    nb.add_kind(fb::NodeKind::Int);
    nb.add_i(value);
    NodeOffset v = nb.Finish();
    *out = Object(ClassName(cls), fb::ObjectForm::Enum, {v, Text(fb::NodeKind::String, member)});
    return Status::OK();
  }

  // --- numpy --------------------------------------------------------------
  // The dtype of numpy.dtype(code, align, copy) with its BUILD state, as
  // numpy's dtype.str spells it ("<f8", "|b1", "<U5", "<M8[10s]"), and its
  // itemsize. Object, structured and subarray dtypes and dtypes with
  // metadata are refused.
  Status NumpyDtype(const Value* v, std::string* str, uint64_t* itemsize) {
    if (v->kind != Kind::kCall || pickle::QualifiedName(v->items[0]) != "numpy.dtype" ||
        !v->appended.empty() || !v->set_items.empty() || ArgCount(v) != 3 ||
        Arg(v, 0)->kind != Kind::kString || Arg(v, 1)->kind != Kind::kBool ||
        Arg(v, 2)->kind != Kind::kBool) {
      return Bad(v, "a numpy dtype that is not numpy.dtype(str, bool, bool)");
    }
    const std::string& code = Arg(v, 0)->text;
    const std::string shown = "numpy.dtype('" + code.substr(0, 32) + "')";
    if (code.empty()) return Bad(v, "numpy.dtype of an empty code");
    const char kind = code[0];
    if (kind == 'O') {
      return Refuse(v, shown +
                           " is an object dtype, which is not read (its arrays hold pickled "
                           "objects)");
    }
    if (std::string_view("biufcSUVMm").find(kind) == std::string_view::npos) {
      return Refuse(v, shown + " is not read (numbers, bools, bytes, str, void and dates are)");
    }
    uint64_t n = 0;
    if (code.size() < 2 || code.size() > 11) return Bad(v, shown + " has no valid size");
    for (size_t i = 1; i < code.size(); ++i) {
      if (!std::isdigit(static_cast<unsigned char>(code[i])))
        return Bad(v, shown + " has no valid size");
      n = n * 10 + static_cast<uint64_t>(code[i] - '0');
    }
    if (n == 0 && (kind == 'S' || kind == 'U' || kind == 'V')) {
      // np.str_("") and np.bytes_(b""): numpy cannot rebuild them from bytes.
      return Refuse(v, shown + " has itemsize 0 (an empty numpy string scalar), which is not read");
    }
    if (n == 0 || n > (uint64_t{1} << 31)) return Bad(v, shown + " has no valid size");
    auto one_of = [n](std::initializer_list<uint64_t> sizes) {
      return std::find(sizes.begin(), sizes.end(), n) != sizes.end();
    };
    const bool size_ok = kind == 'b'                  ? n == 1
                         : kind == 'i' || kind == 'u' ? one_of({1, 2, 4, 8})
                         : kind == 'f'                ? one_of({2, 4, 8, 12, 16})
                         : kind == 'c'                ? one_of({8, 16, 24, 32})
                         : kind == 'M' || kind == 'm' ? n == 8
                                                      : true;
    if (!size_ok) return Bad(v, shown + " has no valid size");
    *itemsize = kind == 'U' ? 4 * n : n;
    char order = '<';
    std::string unit;
    if (v->state != nullptr) {
      const Value* st = v->state;
      if (st->kind != Kind::kTuple || (st->items.size() != 8 && st->items.size() != 9) ||
          st->items[0]->kind != Kind::kInt || st->items[1]->kind != Kind::kString ||
          st->items[1]->text.size() != 1 || st->items[5]->kind != Kind::kInt ||
          st->items[6]->kind != Kind::kInt || st->items[7]->kind != Kind::kInt) {
        return Bad(v, shown + " with a state that is not numpy's (version, byteorder, ...)");
      }
      const auto& it = st->items;
      if (it[0]->i != 3 && it[0]->i != 4)
        return Bad(v, shown + " with a state of version " + std::to_string(it[0]->i));
      if (std::string_view("<>|=").find(it[1]->text[0]) == std::string_view::npos)
        return Bad(v, shown + " with byte order '" + it[1]->text + "'");
      order = it[1]->text[0];
      if (it[2]->kind != Kind::kNone)
        return Refuse(v, shown + " is a subarray dtype, which is not read");
      if (it[3]->kind != Kind::kNone || it[4]->kind != Kind::kNone)
        return Refuse(v, shown + " is a structured dtype, which is not read");
      if ((it[7]->i & 1) != 0)  // NPY_ITEM_HASOBJECT
        return Refuse(v, shown + " holds objects, which are not read");
      if (it[5]->i != -1 && static_cast<uint64_t>(it[5]->i) != *itemsize)
        return Bad(v, shown + " with an itemsize of " + std::to_string(it[5]->i));
      const Value* meta = it.size() == 9 ? it[8] : nullptr;
      const Value* datetime = nullptr;
      if (meta != nullptr && (kind == 'M' || kind == 'm') && meta->kind == Kind::kTuple &&
          meta->items.size() == 2) {
        datetime = meta->items[1];
        meta = meta->items[0];
      }
      if (meta != nullptr && meta->kind != Kind::kNone &&
          (meta->kind != Kind::kDict || !meta->items.empty())) {
        return Refuse(v, shown + " carries metadata, which is not read");
      }
      if (datetime != nullptr) {
        std::string u;
        if (datetime->kind != Kind::kTuple || datetime->items.size() != 4 ||
            !BytesOf(datetime->items[0], &u).ok() || datetime->items[1]->kind != Kind::kInt ||
            datetime->items[1]->i < 1 || datetime->items[2]->kind != Kind::kInt ||
            datetime->items[2]->i != 1 || datetime->items[3]->kind != Kind::kInt ||
            datetime->items[3]->i != 1) {
          return Bad(v, shown + " with a date unit that is not (unit, count, 1, 1)");
        }
        static const std::set<std::string> kUnits{"Y",  "M",  "W",  "D",  "h",  "m",  "s",
                                                  "ms", "us", "ns", "ps", "fs", "as", "generic"};
        if (kUnits.count(u) == 0) return Bad(v, shown + " with an unknown date unit");
        const int64_t count = datetime->items[1]->i;
        if (u != "generic") unit = "[" + (count == 1 ? "" : std::to_string(count)) + u + "]";
      }
    }
    // numpy spells one-byte and byte-string dtypes '|', the rest '<' or '>'.
    const bool no_order =
        kind == 'b' || kind == 'S' || kind == 'V' || ((kind == 'i' || kind == 'u') && n == 1);
    order = no_order ? '|' : (order == '>' ? '>' : '<');
    *str = std::string(1, order) + kind + std::to_string(n) + unit;
    return Status::OK();
  }

  // A numpy:ndarray node: (dtype, shape, bytes), the bytes as Bytes up to
  // kInlineArrayBytes, else as a 1-D uint8 tensor at path/2; the array
  // pickled as `v` referenced again (a memo GET) is that one tensor again,
  // so its bytes are held and stored once.
  Status NumpyArray(const Value* v, const std::string& dtype, const std::vector<int64_t>& shape,
                    std::string data, const std::string& path, NodeOffset* out) {
    std::vector<NodeOffset> dims;
    for (int64_t d : shape) {
      fb::NodeBuilder nb(b());
      nb.add_kind(fb::NodeKind::Int);
      nb.add_i(d);
      dims.push_back(nb.Finish());
    }
    const NodeOffset shape_node = Seq(fb::NodeKind::Tuple, dims);
    NodeOffset data_node = 0;
    if (data.size() <= kInlineArrayBytes) {
      data_node = Bytes(data);
    } else if (auto seen = arrays_.find(v); seen != arrays_.end()) {
      RETURN_IF_ERROR(w_.Tensor(seen->second, StateTreeWriter::ChildPath(path, "2"), &data_node));
    } else {
      owned_.push_back(std::make_unique<std::string>(std::move(data)));
      Source src;
      src.data = owned_.back().get();
      src.dtype = fb::DType::UInt8;
      src.shape = {static_cast<int64_t>(src.data->size())};
      src.strides = {1};
      at::Tensor meta = ValueOrThrow(TorchCall(TorchErrorKind::kStoredValue, where_, [&] {
        return Result<at::Tensor>(
            at::empty(src.shape, at::TensorOptions().dtype(at::kByte).device(at::kMeta)));
      }));
      sources_.emplace(meta.unsafeGetTensorImpl(), src);
      arrays_.emplace(v, meta);
      RETURN_IF_ERROR(w_.Tensor(meta, StateTreeWriter::ChildPath(path, "2"), &data_node));
    }
    const NodeOffset t =
        Seq(fb::NodeKind::Tuple, {Text(fb::NodeKind::String, dtype), shape_node, data_node});
    *out = Object("numpy:ndarray", fb::ObjectForm::Builtin, {t});
    return Status::OK();
  }

  // The bytes of an array of `shape` and `itemsize` from `raw` (in Fortran
  // order when `fortran`), checked and put in C order.
  Status ArrayBytes(const Value* v, const std::string& name, const std::vector<int64_t>& shape,
                    uint64_t itemsize, bool fortran, std::string raw, std::string* out) {
    uint64_t count = 1;
    uint64_t bytes = 0;
    for (int64_t d : shape) {
      if (__builtin_mul_overflow(count, static_cast<uint64_t>(d), &count))
        return Bad(v, name + " of an array whose element count overflows");
    }
    if (__builtin_mul_overflow(count, itemsize, &bytes) || bytes != raw.size()) {
      return Bad(v, name + " of " + std::to_string(count) + " elements of " +
                        std::to_string(itemsize) + " bytes holding " + std::to_string(raw.size()) +
                        " bytes");
    }
    if (!fortran || shape.size() < 2 || count == 0) {
      *out = std::move(raw);
      return Status::OK();
    }
    // Element (i0, ..., ik) is at sum(i_d * prod(shape[:d])) in Fortran order.
    out->assign(raw.size(), '\0');
    std::vector<int64_t> idx(shape.size(), 0);
    std::vector<uint64_t> fstride(shape.size(), 1);
    for (size_t d = 1; d < shape.size(); ++d)
      fstride[d] = fstride[d - 1] * static_cast<uint64_t>(shape[d - 1]);
    for (uint64_t n = 0; n < count; ++n) {
      uint64_t at = 0;
      for (size_t d = 0; d < idx.size(); ++d) at += static_cast<uint64_t>(idx[d]) * fstride[d];
      std::memcpy(out->data() + n * itemsize, raw.data() + at * itemsize, itemsize);
      for (size_t d = idx.size(); d-- > 0;) {
        if (++idx[d] < shape[d]) break;
        idx[d] = 0;
      }
    }
    return Status::OK();
  }

  Status NumpyShape(const Value* v, const std::string& name, const Value* t,
                    std::vector<int64_t>* shape) {
    if (t == nullptr || t->kind != Kind::kTuple || t->items.size() > 64)
      return Bad(v, name + " of a shape that is not a tuple of at most 64 ints");
    shape->clear();
    for (const Value* x : t->items) {
      if (x->kind != Kind::kInt || x->i < 0)
        return Bad(v, name + " of a shape that is not of ints >= 0");
      shape->push_back(x->i);
    }
    return Status::OK();
  }

  // numpy.core.multiarray._reconstruct(numpy.ndarray, (0,), b'b') + BUILD
  // of (1, shape, dtype, is_fortran, bytes): an ndarray.
  Status NumpyReconstruct(const Value* v, const std::string& name, const std::string& path,
                          NodeOffset* out) {
    if (!v->appended.empty() || !v->set_items.empty() || ArgCount(v) != 3 ||
        Arg(v, 0)->kind != Kind::kGlobal) {
      return Bad(v, name + " with other arguments than (numpy.ndarray, shape, code)");
    }
    if (pickle::QualifiedName(Arg(v, 0)) != "numpy.ndarray") {
      return Refuse(v, name + " of " + pickle::QualifiedName(Arg(v, 0)) +
                           " (an ndarray subclass) is not allowed; only numpy.ndarray is read");
    }
    const Value* st = v->state;
    if (st == nullptr || st->kind != Kind::kTuple ||
        (st->items.size() != 5 && st->items.size() != 4)) {
      return Bad(v, name + " without the state (version, shape, dtype, is_fortran, data)");
    }
    const size_t o = st->items.size() == 5 ? 1 : 0;
    if (o == 1 && (st->items[0]->kind != Kind::kInt || st->items[0]->i != 1))
      return Bad(v, name + " with a state of another version than 1");
    std::vector<int64_t> shape;
    RETURN_IF_ERROR(NumpyShape(v, name, st->items[o], &shape));
    std::string dtype;
    uint64_t itemsize = 0;
    RETURN_IF_ERROR(NumpyDtype(st->items[o + 1], &dtype, &itemsize));
    if (st->items[o + 2]->kind != Kind::kBool)
      return Bad(v, name + " with an is_fortran that is not a bool");
    std::string raw;
    if (!BytesOf(st->items[o + 3], &raw).ok()) {
      return Refuse(v, name +
                           " of an array whose data are not bytes (an object array?) "
                           "is not read");
    }
    std::string data;
    RETURN_IF_ERROR(
        ArrayBytes(v, name, shape, itemsize, st->items[o + 2]->b, std::move(raw), &data));
    // numpy's unpickler gives a big-endian array in native order (protocol
    // 5's _frombuffer keeps it): the same here.
    if (dtype[0] == '>') {
      const uint64_t unit = dtype[1] == 'c' ? itemsize / 2 : dtype[1] == 'U' ? 4 : itemsize;
      for (uint64_t at = 0; at + unit <= data.size(); at += unit) {
        std::reverse(data.begin() + static_cast<std::ptrdiff_t>(at),
                     data.begin() + static_cast<std::ptrdiff_t>(at + unit));
      }
      dtype[0] = '<';
    }
    return NumpyArray(v, dtype, shape, std::move(data), path, out);
  }

  // numpy.core.numeric._frombuffer(buffer, dtype, shape, order), as
  // protocol 5 writes arrays (the buffer in-band).
  Status NumpyFromBuffer(const Value* v, const std::string& name, const std::string& path,
                         NodeOffset* out) {
    if (!Plain(v) || ArgCount(v) != 4 || Arg(v, 3)->kind != Kind::kString ||
        (Arg(v, 3)->text != "C" && Arg(v, 3)->text != "F")) {
      return Bad(v, name + " with other arguments than (buffer, dtype, shape, 'C' or 'F')");
    }
    std::string raw;
    if (Arg(v, 0)->kind == Kind::kByteArray) {
      RETURN_IF_ERROR(Charge(v, 0, Arg(v, 0)->text.size()));
      raw = Arg(v, 0)->text;
    } else if (!BytesOf(Arg(v, 0), &raw).ok()) {
      return Bad(v, name + " of a buffer that is not bytes");
    }
    std::string dtype;
    uint64_t itemsize = 0;
    RETURN_IF_ERROR(NumpyDtype(Arg(v, 1), &dtype, &itemsize));
    std::vector<int64_t> shape;
    RETURN_IF_ERROR(NumpyShape(v, name, Arg(v, 2), &shape));
    std::string data;
    RETURN_IF_ERROR(
        ArrayBytes(v, name, shape, itemsize, Arg(v, 3)->text == "F", std::move(raw), &data));
    return NumpyArray(v, dtype, shape, std::move(data), path, out);
  }

  // numpy.core.multiarray.scalar(dtype, bytes): a numpy scalar.
  Status NumpyScalar(const Value* v, const std::string& name, NodeOffset* out) {
    if (!Plain(v) || ArgCount(v) != 2)
      return Bad(v, name + " with other arguments than (dtype, bytes)");
    std::string dtype;
    uint64_t itemsize = 0;
    RETURN_IF_ERROR(NumpyDtype(Arg(v, 0), &dtype, &itemsize));
    std::string raw;
    if (!BytesOf(Arg(v, 1), &raw).ok())
      return Refuse(v, name + " of a value that is not bytes is not read");
    if (raw.size() != itemsize) {
      return Bad(v, name + " of " + std::to_string(raw.size()) + " bytes for a " +
                        std::to_string(itemsize) + "-byte " + dtype);
    }
    const NodeOffset t = Seq(fb::NodeKind::Tuple, {Text(fb::NodeKind::String, dtype), Bytes(raw)});
    *out = Object("numpy:scalar", fb::ObjectForm::Builtin, {t});
    return Status::OK();
  }

  Status NewObjNode(const Value* v, const std::string& path, int depth, NodeOffset* out) {
    const Value* cls = v->items[0];
    if (cls->kind != Kind::kGlobal) return Refuse(v, "NEWOBJ of a value that is not a class");
    const std::string name = pickle::QualifiedName(cls);
    const bool known = name == "argparse.Namespace" || StateClasses().count(name) > 0;
    if (!known)
      return Refuse(v,
                    name + " is not allowed (objects: argparse.Namespace and DeepSpeed's classes)");
    if (ArgCount(v) != 0 || v->items.size() != 2 || !v->appended.empty() || !v->set_items.empty()) {
      return Refuse(v, name + " made with arguments; only NEWOBJ(cls, ()) + BUILD(dict) is read");
    }
    if (v->state != nullptr && v->state->kind != Kind::kDict) {
      return Refuse(v, name + " built from a state that is not a dict");
    }
    NodeOffset state = 0;
    RETURN_IF_ERROR(
        Entries(v->state ? v->state->items : std::vector<const Value*>{}, path, depth, &state));
    if (name == "argparse.Namespace") {
      *out = Object("argparse:Namespace", fb::ObjectForm::Builtin, {state});
    } else {
      *out = Object(ClassName(cls), fb::ObjectForm::State, {state});
    }
    return Status::OK();
  }

  // Counts a value and the bytes it writes against the output budget.
  Status Charge(const Value* v, uint64_t nodes, uint64_t bytes) {
    if (nodes > nodes_left_ || bytes > bytes_left_) {
      return Bad(v, "values shared through the memo expand beyond " +
                        std::to_string(kOutputFactor) + " times the pickle's " +
                        std::to_string(pickle_bytes_) + " bytes (and a fixed allowance)");
    }
    nodes_left_ -= nodes;
    bytes_left_ -= bytes;
    return Status::OK();
  }

  Status Node(const Value* v, const std::string& path, int depth, NodeOffset* out) {
    if (depth > kMaxDepth)
      return Bad(v, "values nested more than " + std::to_string(kMaxDepth) + " deep");
    RETURN_IF_ERROR(Charge(v, 1, v->text.size() + v->name.size()));
    switch (v->kind) {
      case Kind::kNone:
        *out = Leaf(fb::NodeKind::None);
        return Status::OK();
      case Kind::kBool: {
        fb::NodeBuilder nb(b());
        nb.add_kind(fb::NodeKind::Bool);
        nb.add_b(v->b);
        *out = nb.Finish();
        return Status::OK();
      }
      case Kind::kInt: {
        fb::NodeBuilder nb(b());
        nb.add_kind(fb::NodeKind::Int);
        nb.add_i(v->i);
        *out = nb.Finish();
        return Status::OK();
      }
      case Kind::kFloat: {
        fb::NodeBuilder nb(b());
        nb.add_kind(fb::NodeKind::Double);
        nb.add_d(v->d);
        *out = nb.Finish();
        return Status::OK();
      }
      case Kind::kBigInt:
        *out = Text(fb::NodeKind::BigInt, v->text);
        return Status::OK();
      case Kind::kString:
        if (!ValidUtf8(v->text)) return Bad(v, "a str that is not UTF-8");
        *out = Text(fb::NodeKind::String, v->text);
        return Status::OK();
      case Kind::kBytes:
        *out = Bytes(v->text);
        return Status::OK();
      case Kind::kByteArray:
        *out = Object("builtins:bytearray", fb::ObjectForm::Builtin, {Bytes(v->text)});
        return Status::OK();
      case Kind::kList:
      case Kind::kTuple:
        if (!Plain(v)) return Refuse(v, "a built list or tuple");
        return Items(v->kind == Kind::kList ? fb::NodeKind::List : fb::NodeKind::Tuple, v->items,
                     path, depth, out);
      case Kind::kDict:
        if (!Plain(v)) return Refuse(v, "a built dict");
        return Entries(v->items, path, depth, out);
      case Kind::kSet:
      case Kind::kFrozenSet: {
        NodeOffset list = 0;
        RETURN_IF_ERROR(Items(fb::NodeKind::List, v->items, path, depth, &list));
        *out = Object(v->kind == Kind::kSet ? "builtins:set" : "builtins:frozenset",
                      fb::ObjectForm::Builtin, {list});
        return Status::OK();
      }
      case Kind::kGlobal:
        if (v->text == "torch" && DtypeNames().count(v->name)) {
          *out =
              Object("torch:dtype", fb::ObjectForm::Builtin, {Text(fb::NodeKind::String, v->name)});
          return Status::OK();
        }
        return Refuse(v, pickle::QualifiedName(v) + " is not allowed as a value");
      case Kind::kCall:
        return CallNode(v, path, depth, out);
      case Kind::kNewObj:
        return NewObjNode(v, path, depth, out);
      case Kind::kPersistentId:
        return Refuse(v, "a persistent id outside a tensor rebuild");
    }
    return Bad(v, "an unknown value");
  }

  const StorageSource& storages_;
  std::string where_;
  StateTreeWriter w_;
  std::map<std::string, fb::DType> storage_dtypes_;
  std::map<std::tuple<std::string, int64_t, std::vector<int64_t>, std::vector<int64_t>>, at::Tensor>
      views_;
  std::map<const Value*, at::Tensor> arrays_;  // numpy arrays stored as tensors, by pickle node
  std::unordered_map<const c10::TensorImpl*, Source> sources_;
  std::vector<std::unique_ptr<std::string>> owned_;  // numpy arrays' bytes
  uint64_t nodes_left_;
  uint64_t bytes_left_;
  uint64_t pickle_bytes_;
};

bool Contiguous(const Source& s) {
  int64_t expect = 1;
  for (size_t d = s.shape.size(); d-- > 0;) {
    if (s.shape[d] == 0) return true;
    if (s.shape[d] != 1 && s.strides[d] != expect) return false;
    expect *= s.shape[d];
  }
  return true;
}

// The view's elements, in row-major order, read from its storage.
Status Gather(const StorageSource& storages, const Source& s, uint64_t numel,
              std::vector<uint8_t>* out) {
  const uint64_t es = DTypeSize(s.dtype);
  uint64_t last = static_cast<uint64_t>(s.offset);
  for (size_t d = 0; d < s.shape.size(); ++d)
    last += static_cast<uint64_t>(s.shape[d] - 1) * s.strides[d];
  const uint64_t first = static_cast<uint64_t>(s.offset);
  std::vector<uint8_t> span((last - first + 1) * es);
  RETURN_IF_ERROR(storages.Read(s.handle, first * es, span.size(), span.data()));
  out->resize(numel * es);
  std::vector<int64_t> idx(s.shape.size(), 0);
  for (uint64_t n = 0; n < numel; ++n) {
    uint64_t at = 0;
    for (size_t d = 0; d < idx.size(); ++d) at += static_cast<uint64_t>(idx[d] * s.strides[d]);
    std::memcpy(out->data() + n * es, span.data() + at * es, es);
    for (size_t d = idx.size(); d-- > 0;) {
      if (++idx[d] < s.shape[d]) break;
      idx[d] = 0;
    }
  }
  return Status::OK();
}

std::string Head(const std::string& path, size_t n) {
  std::ifstream in(path, std::ios::binary);
  std::string head(n, '\0');
  in.read(head.data(), static_cast<std::streamsize>(head.size()));
  head.resize(static_cast<size_t>(in.gcount()));
  return head;
}

// What a file that is not a torch.save file is, for the message.
std::string WhatIsIt(const std::string& head) {
  if (head.size() >= 262 && head.compare(257, 5, "ustar") == 0) {
    return "a tar archive (the pre-0.4 torch.save format), which is not read; torch.load reads "
           "it: save it again with torch.save";
  }
  return "not a torch.save file (neither a zip file nor the legacy format)";
}

// The interpreted tree of a file and its tensors' bytes into `file` of `tag`.
Result<SaveReport> SaveInterpreted(Store& store, const std::string& tag, const std::string& file,
                                   const std::string& where, const StorageSource& storages,
                                   const Value* root, uint64_t pickle_bytes, TensorPlacer* placer,
                                   const ImportBytesRead& on_read) {
  Interpreter in(storages, where, pickle_bytes);
  ASSIGN_OR_RETURN(EncodedState enc,
                   TorchCall(TorchErrorKind::kStoredValue, where, [&] { return in.Run(root); }));
  TensorPlacer::Placements placements;
  if (placer != nullptr) {
    std::unordered_map<std::string, at::Tensor> by_param;
    for (const auto& t : enc.tensors) by_param.emplace(t.param, t.tensor);
    TensorLoader loader = [&](const std::string& param, const std::string&) -> Result<at::Tensor> {
      return by_param.at(param);
    };
    auto view = DecodeState(std::string_view(enc.tree), loader, FileName(tag, file));
    if (view.ok()) placements = placer->Place(tag, file, *view);
  }
  RETURN_IF_ERROR(store.ClearFile(tag, file));
  SaveReport report;
  for (const auto& st : enc.tensors) {
    const Source* src = in.SourceOf(st.tensor);
    if (src == nullptr)
      return Status::Corruption(where + ": tensor " + st.param + " has no storage");
    TensorMeta meta;
    meta.dtype = src->dtype;
    meta.shape = src->shape;
    meta.requires_grad = src->requires_grad;
    auto pl = placements.find(st.tensor.unsafeGetTensorImpl());
    if (pl != placements.end()) meta.placement = pl->second;
    const uint64_t es = DTypeSize(src->dtype);
    const auto numel = static_cast<uint64_t>(st.tensor.numel());
    ByteSource bytes_src;
    bytes_src.length = numel * es;
    std::vector<uint8_t> gathered;
    if (src->data != nullptr) {
      bytes_src.data = reinterpret_cast<const uint8_t*>(src->data->data());
    } else if (Contiguous(*src)) {
      const uint64_t base = static_cast<uint64_t>(src->offset) * es;
      const void* handle = src->handle;
      bytes_src.fill = [&storages, handle, base, &on_read](uint64_t off, uint64_t len,
                                                           uint8_t* dst) {
        Status read = storages.Read(handle, base + off, len, dst);
        if (read.ok() && on_read) on_read(len);
        return read;
      };
    } else {
      RETURN_IF_ERROR(Gather(storages, *src, numel, &gathered));
      bytes_src.data = gathered.data();
    }
    const bool streamed = bytes_src.data == nullptr;
    ASSIGN_OR_RETURN(WriteStats stats, store.PutTensor(tag, file, st.param, meta, bytes_src));
    if (!streamed && on_read) on_read(bytes_src.length);
    report.stats.Add(stats);
    report.tensors++;
  }
  RETURN_IF_ERROR(store.PutFile(tag, file, std::move(enc.tree)));
  return report;
}

Result<SaveReport> ImportLegacyFile(Store& store, const std::string& tag, const std::string& file,
                                    const std::string& path, TensorPlacer* placer,
                                    const ImportBytesRead& on_read) {
  ASSIGN_OR_RETURN(auto legacy, LegacyArchive::Open(path, kMaxPickleBytes));
  LegacyStorages storages(*legacy);
  return SaveInterpreted(store, tag, file, path, storages, legacy->tree().root(),
                         legacy->pickle_size(), placer, on_read);
}

}  // namespace

Result<SaveReport> ImportTorchFile(Store& store, const std::string& tag, const std::string& file,
                                   const std::string& path, TensorPlacer* placer,
                                   const ImportBytesRead& on_read) {
  const std::string head = Head(path, 512);
  if (LegacyArchive::LooksLegacy(head)) {
    return ImportLegacyFile(store, tag, file, path, placer, on_read);
  }
  auto opened = ZipArchive::Open(path);
  if (!opened.ok()) {
    if (opened.status().IsCorruption() && head.compare(0, 4, "PK\x03\x04") != 0) {
      return Status::InvalidArgument("'" + path + "' is " + WhatIsIt(head));
    }
    return opened.status();
  }
  const ZipArchive& zip = **opened;
  const std::string prefix = zip.Prefix();
  const bool torchscript =
      std::any_of(zip.entries().begin(), zip.entries().end(), [&](const ZipEntry& e) {
        return e.name == prefix + "/constants.pkl" || e.name.rfind(prefix + "/code/", 0) == 0;
      });
  if (torchscript) {
    return Status::InvalidArgument("'" + path +
                                   "' is a TorchScript archive (torch.jit.save); it holds code, "
                                   "and only torch.save files are imported");
  }
  const ZipEntry* pkl = zip.Find(prefix + "/data.pkl");
  if (pkl == nullptr) {
    return Status::InvalidArgument("'" + path + "' is a zip file without " + prefix +
                                   "/data.pkl: not a torch.save file");
  }
  ASSIGN_OR_RETURN(std::string bytes, zip.Read(*pkl, kMaxPickleBytes));
  ASSIGN_OR_RETURN(auto tree, pickle::Parse(bytes, path + " (" + pkl->name + ")",
                                            pickle::Limits::ForSize(bytes.size())));
  ZipStorages storages(zip);
  return SaveInterpreted(store, tag, file, path, storages, tree->root(), bytes.size(), placer,
                         on_read);
}

Result<TagInfo> ImportPath(Store& store, const std::string& path, const std::string& tag_arg,
                           bool overwrite, ImportReport* report, const ImportProgress& progress) {
  std::error_code ec;
  if (!fs::exists(path, ec)) return Status::NotFound("'" + path + "' does not exist");
  std::vector<std::pair<std::string, std::string>> files;  // (file name in the tag, path)
  std::string tag = tag_arg;
  if (fs::is_regular_file(path, ec)) {
    const fs::path p(path);
    if (tag.empty()) tag = p.stem().string();
    files.emplace_back(p.filename().string(), path);
  } else if (fs::is_directory(path, ec)) {
    fs::path dir(path);
    std::ifstream latest(dir / "latest");
    std::string named;
    if (latest && std::getline(latest, named)) {
      while (!named.empty() &&
             (named.back() == '\n' || named.back() == '\r' || named.back() == ' ')) {
        named.pop_back();
      }
      if (named.empty() || !fs::is_directory(dir / named, ec)) {
        return Status::InvalidArgument("'" + (dir / "latest").string() + "' names '" + named +
                                       "', which is not a directory beside it");
      }
      if (tag.empty()) tag = named;
      dir /= named;
    } else if (tag.empty()) {
      tag = fs::path(path).lexically_normal().filename().string();
      if (tag.empty()) tag = fs::path(path).lexically_normal().parent_path().filename().string();
    }
    for (auto it = fs::recursive_directory_iterator(dir, ec);
         !ec && it != fs::recursive_directory_iterator(); it.increment(ec)) {
      if (it->is_regular_file()) {
        files.emplace_back(fs::relative(it->path(), dir).generic_string(), it->path().string());
      }
    }
    if (ec) return Status::IOError("cannot list '" + dir.string() + "': " + ec.message());
    std::sort(files.begin(), files.end());
    // Model-state files before layer and optimizer files, which are placed
    // from them (bf16_zero_* sorts before mp_rank_* by name).
    std::stable_sort(files.begin(), files.end(),
                     [](const auto& a, const auto& b) { return PlacedBefore(a.first, b.first); });
    if (files.empty()) return Status::InvalidArgument("'" + dir.string() + "' holds no files");
  } else {
    return Status::InvalidArgument("'" + path + "' is neither a file nor a directory");
  }
  RETURN_IF_ERROR(ValidateTag(tag));
  for (const auto& f : files) RETURN_IF_ERROR(ValidateFile(f.first));
  RETURN_IF_ERROR(store.BeginTag(tag, overwrite));
  uint64_t total = 0;
  // Sizes for the progress bar only (0 when unreadable: the read says why).
  auto size_of = [](const std::string& p) {
    std::error_code size_ec;
    const uintmax_t n = fs::file_size(p, size_ec);
    return size_ec ? uint64_t{0} : static_cast<uint64_t>(n);
  };
  for (const auto& f : files) total += size_of(f.second);
  uint64_t done = 0;
  ImportBytesRead on_read;
  if (progress) {
    progress(tag, 0, total);
    on_read = [&](uint64_t n) { progress(tag, done = std::min(total, done + n), total); };
  }
  DeepSpeedPlacer placer;
  ImportReport r;
  uint64_t files_done = 0;
  for (const auto& [file, p] : files) {
    auto saved = ImportTorchFile(store, tag, file, p, &placer, on_read);
    files_done += size_of(p);
    if (progress) progress(tag, done = std::max(done, files_done), total);
    if (!saved.ok()) {
      store.AbortTag(tag);
      placer.EndTag(tag);
      return saved.status();
    }
    r.files++;
    r.tensors += saved->tensors;
    r.logical_bytes += saved->stats.logical_bytes;
    r.new_bytes += saved->stats.new_bytes;
  }
  CommitOptions options;
  options.overwrite = overwrite;
  auto info = store.CommitTag(tag, options);
  placer.EndTag(tag);
  if (!info.ok()) {
    store.AbortTag(tag);
    return info.status();
  }
  if (report != nullptr) *report = r;
  return info;
}

namespace {

std::string JoinedNames(const std::vector<std::string>& names) {
  if (names.empty()) return "(none)";
  std::string out;
  for (const auto& n : names) out += (out.empty() ? "" : ", ") + n;
  return out;
}

// Natural order: runs of digits compare as numbers.
bool NaturalLess(const std::string& a, const std::string& b) {
  size_t i = 0, j = 0;
  while (i < a.size() && j < b.size()) {
    const bool da = std::isdigit(static_cast<unsigned char>(a[i])) != 0;
    const bool db = std::isdigit(static_cast<unsigned char>(b[j])) != 0;
    if (da && db) {
      size_t ie = i, je = j;
      while (ie < a.size() && std::isdigit(static_cast<unsigned char>(a[ie]))) ++ie;
      while (je < b.size() && std::isdigit(static_cast<unsigned char>(b[je]))) ++je;
      std::string_view x(a.data() + i, ie - i), y(b.data() + j, je - j);
      while (x.size() > 1 && x.front() == '0') x.remove_prefix(1);
      while (y.size() > 1 && y.front() == '0') y.remove_prefix(1);
      if (x.size() != y.size()) return x.size() < y.size();
      if (x != y) return x < y;
      i = ie;
      j = je;
    } else {
      if (a[i] != b[j]) return a[i] < b[j];
      ++i;
      ++j;
    }
  }
  return a.size() - i < b.size() - j;
}

}  // namespace

Result<std::vector<ImportedTag>> ImportSaveDir(Store& store, const std::string& save_dir,
                                               bool overwrite, const ImportProgress& progress) {
  std::error_code ec;
  if (!fs::is_directory(save_dir, ec)) {
    return Status::InvalidArgument("--all-tags needs a DeepSpeed save_dir; '" + save_dir +
                                   "' is not a directory");
  }
  std::string latest;
  {
    std::ifstream f(fs::path(save_dir) / "latest");
    if (f) std::getline(f, latest);
    while (!latest.empty() && (latest.back() == '\r' || latest.back() == ' ')) latest.pop_back();
  }
  std::vector<std::string> tags;
  for (auto it = fs::directory_iterator(save_dir, ec); !ec && it != fs::directory_iterator();
       it.increment(ec)) {
    if (!it->is_directory()) continue;
    bool has_file = false;
    for (auto f = fs::recursive_directory_iterator(it->path(), ec);
         !ec && f != fs::recursive_directory_iterator(); f.increment(ec)) {
      if (f->is_regular_file()) {
        has_file = true;
        break;
      }
    }
    // A store kept inside the save_dir (the Python engine's default) is
    // not a tag.
    if (has_file && !fs::exists(it->path() / "CURRENT")) {
      tags.push_back(it->path().filename().string());
    }
  }
  if (ec) return Status::IOError("cannot list '" + save_dir + "': " + ec.message());
  if (tags.empty()) {
    return Status::InvalidArgument("'" + save_dir + "' holds no tag directory with files");
  }
  std::sort(tags.begin(), tags.end(), NaturalLess);
  if (!latest.empty()) {
    auto it = std::find(tags.begin(), tags.end(), latest);
    if (it == tags.end()) {
      return Status::InvalidArgument("'" + (fs::path(save_dir) / "latest").string() + "' names '" +
                                     latest +
                                     "', which is not a tag directory "
                                     "beside it; tag directories: " +
                                     JoinedNames(tags));
    }
    std::rotate(it, it + 1, tags.end());  // the latest goes last
  }
  std::vector<ImportedTag> out;
  for (const std::string& tag : tags) {
    ImportedTag t;
    auto info =
        ImportPath(store, (fs::path(save_dir) / tag).string(), tag, overwrite, &t.report, progress);
    if (!info.ok()) {
      std::vector<std::string> done;
      for (const auto& d : out) done.push_back(d.info.tag);
      return info.status().WithContext("importing tag directory '" + tag + "' of '" + save_dir +
                                       "' (imported before it: " + JoinedNames(done) + ")");
    }
    t.info = std::move(*info);
    out.push_back(std::move(t));
  }
  return out;
}

}  // namespace ckptkv::checkpoint
