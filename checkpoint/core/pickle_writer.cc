#include "checkpoint/core/pickle_writer.h"

#include <cstring>
#include <map>
#include <utility>

namespace ckptkv::checkpoint::pickle {

namespace {

// Opcodes (Python's pickle module names).
constexpr uint8_t kProto = 0x80, kNone = 'N', kNewTrue = 0x88, kNewFalse = 0x89, kBinInt1 = 'K',
                  kBinInt2 = 'M', kBinInt = 'J', kLong1 = 0x8a, kLong4 = 0x8b, kBinFloat = 'G',
                  kBinUnicode = 'X', kEmptyList = ']', kEmptyDict = '}', kEmptyTuple = ')',
                  kMark = '(', kAppends = 'e', kSetItems = 'u', kTuple1 = 0x85, kTuple2 = 0x86,
                  kTuple3 = 0x87, kTuple = 't', kGlobal = 'c', kReduce = 'R', kNewObj = 0x81,
                  kBuild = 'b', kBinPersId = 'Q', kBinPut = 'q', kLongBinPut = 'r', kBinGet = 'h',
                  kLongBinGet = 'j', kStop = '.';

// Python's encode_long: the shortest little-endian two's complement bytes
// (empty for 0). `twos` holds the value in two's complement with at least
// one sign byte to spare.
std::string TrimSignBytes(std::string twos) {
  while (twos.size() > 1) {
    const auto last = static_cast<uint8_t>(twos.back());
    const auto prev = static_cast<uint8_t>(twos[twos.size() - 2]);
    if ((last == 0x00 && (prev & 0x80) == 0) || (last == 0xFF && (prev & 0x80) != 0)) {
      twos.pop_back();
    } else {
      break;
    }
  }
  if (twos.size() == 1 && twos[0] == 0) twos.clear();
  return twos;
}

// Latin-1 bytes as the UTF-8 text of the code points they are.
std::string Latin1ToUtf8(std::string_view bytes) {
  std::string s;
  s.reserve(bytes.size());
  for (char ch : bytes) {
    const auto c = static_cast<uint8_t>(ch);
    if (c < 0x80) {
      s.push_back(static_cast<char>(c));
    } else {
      s.push_back(static_cast<char>(0xC0 | (c >> 6)));
      s.push_back(static_cast<char>(0x80 | (c & 0x3F)));
    }
  }
  return s;
}

}  // namespace

Writer::Writer() {
  Op(kProto);
  Op(2);
}

void Writer::U32(uint32_t v) {
  for (int i = 0; i < 4; ++i) out_.push_back(static_cast<char>((v >> (8 * i)) & 0xFF));
}

void Writer::None() { Op(kNone); }
void Writer::Bool(bool v) { Op(v ? kNewTrue : kNewFalse); }

void Writer::Int(int64_t v) {
  if (v >= 0 && v < 256) {
    Op(kBinInt1);
    Op(static_cast<uint8_t>(v));
  } else if (v >= 0 && v < 65536) {
    Op(kBinInt2);
    Op(static_cast<uint8_t>(v & 0xFF));
    Op(static_cast<uint8_t>(v >> 8));
  } else if (v >= INT32_MIN && v <= INT32_MAX) {
    Op(kBinInt);
    U32(static_cast<uint32_t>(static_cast<int32_t>(v)));
  } else {
    std::string twos(9, '\0');
    const auto u = static_cast<uint64_t>(v);
    for (int i = 0; i < 8; ++i) twos[i] = static_cast<char>((u >> (8 * i)) & 0xFF);
    twos[8] = v < 0 ? static_cast<char>(0xFF) : '\0';
    const std::string b = TrimSignBytes(std::move(twos));
    Op(kLong1);
    Op(static_cast<uint8_t>(b.size()));
    out_ += b;
  }
}

Status Writer::BigInt(std::string_view decimal) {
  const bool neg = !decimal.empty() && decimal[0] == '-';
  std::string_view digits = neg ? decimal.substr(1) : decimal;
  if (digits.empty() || digits.size() > 4300) {
    return Status::InvalidArgument("big int '" + std::string(decimal.substr(0, 40)) +
                                   "' must be '-'? and 1 to 4300 digits");
  }
  std::vector<uint8_t> dec;
  dec.reserve(digits.size());
  for (char c : digits) {
    if (c < '0' || c > '9') {
      return Status::InvalidArgument("big int '" + std::string(decimal.substr(0, 40)) +
                                     "' holds a character that is not a digit");
    }
    dec.push_back(static_cast<uint8_t>(c - '0'));
  }
  // The magnitude in base 256, little-endian: divide the digits by 256
  // until nothing is left.
  std::string mag;
  size_t start = 0;
  while (start < dec.size()) {
    unsigned rem = 0;
    for (size_t i = start; i < dec.size(); ++i) {
      const unsigned cur = rem * 10 + dec[i];
      dec[i] = static_cast<uint8_t>(cur / 256);
      rem = cur % 256;
    }
    mag.push_back(static_cast<char>(rem));
    while (start < dec.size() && dec[start] == 0) ++start;
  }
  mag.push_back('\0');  // a spare sign byte
  if (neg) {
    unsigned carry = 1;
    for (char& ch : mag) {
      const unsigned v = (~static_cast<unsigned>(static_cast<uint8_t>(ch)) & 0xFF) + carry;
      ch = static_cast<char>(v & 0xFF);
      carry = v >> 8;
    }
  }
  const std::string b = TrimSignBytes(std::move(mag));
  if (b.size() < 256) {
    Op(kLong1);
    Op(static_cast<uint8_t>(b.size()));
  } else {
    Op(kLong4);
    U32(static_cast<uint32_t>(b.size()));
  }
  out_ += b;
  return Status::OK();
}

void Writer::Float(double v) {
  uint64_t u = 0;
  std::memcpy(&u, &v, sizeof u);
  Op(kBinFloat);
  for (int i = 7; i >= 0; --i) out_.push_back(static_cast<char>((u >> (8 * i)) & 0xFF));
}

void Writer::String(std::string_view utf8) {
  Op(kBinUnicode);
  U32(static_cast<uint32_t>(utf8.size()));
  out_.append(utf8.data(), utf8.size());
}

void Writer::Bytes(std::string_view bytes) {
  Global("_codecs", "encode");
  String(Latin1ToUtf8(bytes));
  String("latin1");
  TupleOf(2);
  Reduce();
}

void Writer::Global(std::string_view module, std::string_view name) {
  Op(kGlobal);
  out_.append(module.data(), module.size());
  out_.push_back('\n');
  out_.append(name.data(), name.size());
  out_.push_back('\n');
}

void Writer::Mark() { Op(kMark); }
void Writer::EmptyList() { Op(kEmptyList); }
void Writer::EmptyDict() { Op(kEmptyDict); }
void Writer::EmptyTuple() { Op(kEmptyTuple); }
void Writer::Appends() { Op(kAppends); }
void Writer::SetItems() { Op(kSetItems); }

void Writer::TupleOf(size_t n) {
  switch (n) {
    case 0:
      Op(kEmptyTuple);
      return;
    case 1:
      Op(kTuple1);
      return;
    case 2:
      Op(kTuple2);
      return;
    case 3:
      Op(kTuple3);
      return;
    default:
      Op(kTuple);
  }
}

void Writer::Reduce() { Op(kReduce); }
void Writer::NewObj() { Op(kNewObj); }
void Writer::Build() { Op(kBuild); }
void Writer::BinPersId() { Op(kBinPersId); }

uint32_t Writer::Put() {
  const uint32_t i = memo_++;
  if (i < 256) {
    Op(kBinPut);
    Op(static_cast<uint8_t>(i));
  } else {
    Op(kLongBinPut);
    U32(i);
  }
  return i;
}

void Writer::Get(uint32_t index) {
  if (index < 256) {
    Op(kBinGet);
    Op(static_cast<uint8_t>(index));
  } else {
    Op(kLongBinGet);
    U32(index);
  }
}

void Writer::Stop() { Op(kStop); }

const char* StorageClass(fb::DType dtype) {
  switch (dtype) {
    case fb::DType::Bool:
      return "BoolStorage";
    case fb::DType::UInt8:
      return "ByteStorage";
    case fb::DType::Int8:
      return "CharStorage";
    case fb::DType::Int16:
      return "ShortStorage";
    case fb::DType::Int32:
      return "IntStorage";
    case fb::DType::Int64:
      return "LongStorage";
    case fb::DType::Float16:
      return "HalfStorage";
    case fb::DType::BFloat16:
      return "BFloat16Storage";
    case fb::DType::Float32:
      return "FloatStorage";
    case fb::DType::Float64:
      return "DoubleStorage";
    case fb::DType::ComplexFloat:
      return "ComplexFloatStorage";
    case fb::DType::ComplexDouble:
      return "ComplexDoubleStorage";
  }
  return nullptr;
}

namespace {

// Why an Object's class is not written as a pickle GLOBAL: modules whose
// names run code or reach the interpreter (os.system, builtins.eval,
// subprocess.Popen, importlib, ...), and dunder attributes (__reduce__,
// __globals__). nullptr when it may be written.
const char* RefusedClass(const std::string& module, const std::vector<std::string>& parts) {
  static const char* const kModules[] = {
      "builtins",   "__builtin__", "os",       "posix",           "nt",
      "subprocess", "sys",         "shutil",   "socket",          "importlib",
      "pickle",     "_pickle",     "marshal",  "runpy",           "code",
      "codeop",     "pty",         "ctypes",   "multiprocessing", "signal",
      "io",         "_io",         "pathlib",  "operator",        "functools",
      "types",      "webbrowser",  "pdb",      "commands",        "popen2",
      "platform",   "tempfile",    "glob",     "inspect",         "gc",
      "threading",  "_thread",     "asyncio",  "copyreg",         "copy_reg",
      "ast",        "timeit",      "cProfile", "profile",         "trace",
      "dis",        "bdb",         "site"};
  const std::string top = module.substr(0, module.find('.'));
  for (const char* m : kModules) {
    if (top == m) return "its module runs code";
  }
  if (module.rfind("torch._C", 0) == 0 || module.rfind("torch.jit", 0) == 0 ||
      module.rfind("torch.hub", 0) == 0 || module.rfind("torch.ops", 0) == 0) {
    return "its module runs code";
  }
  for (const std::string& p : parts) {
    if (p.rfind("__", 0) == 0) return "it names a dunder attribute";
  }
  return nullptr;
}

constexpr size_t kBatch = 1000;  // items per APPENDS / SETITEMS, as Python writes
constexpr int kMaxDepth = 1000;

std::string Str(const flatbuffers::String* s) { return s ? s->str() : std::string(); }

size_t Count(const flatbuffers::Vector<flatbuffers::Offset<fb::Node>>* v) {
  return v ? v->size() : 0;
}

bool IsIdentifierPath(std::string_view s) {
  if (s.empty()) return false;
  for (char c : s) {
    if (c == '\n' || c == '\r' || c == '\0' || c == ' ') return false;
  }
  return s.front() != '.' && s.back() != '.' && s.find("..") == std::string_view::npos;
}

class TreePickler {
 public:
  TreePickler(const PickleHooks& hooks, const std::string& where, uint64_t budget)
      : hooks_(hooks), where_(where), budget_(budget) {}

  Result<std::string> Run(const fb::Node* root) {
    RETURN_IF_ERROR(Emit(root, 0, "/"));
    w_.Stop();
    return w_.Take();
  }

 private:
  Status Bad(const std::string& path, const std::string& what) const {
    return Status::InvalidArgument(where_ + ": value at '" + path + "' " + what);
  }

  Status Emit(const fb::Node* n, int depth, const std::string& path) {
    if (n == nullptr) return Bad(path, "is missing");
    if (++visited_ > budget_) {
      return Status::Corruption(where_ + ": the state tree visits more than " +
                                std::to_string(budget_) + " nodes");
    }
    if (depth > kMaxDepth) return Bad(path, "nests deeper than " + std::to_string(kMaxDepth));
    switch (n->kind()) {
      case fb::NodeKind::None:
        w_.None();
        return Status::OK();
      case fb::NodeKind::Bool:
        w_.Bool(n->b());
        return Status::OK();
      case fb::NodeKind::Int:
        w_.Int(n->i());
        return Status::OK();
      case fb::NodeKind::Double:
        w_.Float(n->d());
        return Status::OK();
      case fb::NodeKind::ComplexDouble:
        w_.Global("builtins", "complex");
        w_.Float(n->d());
        w_.Float(n->d_imag());
        w_.TupleOf(2);
        w_.Reduce();
        return Status::OK();
      case fb::NodeKind::String:
        w_.String(Str(n->s()));
        return Status::OK();
      case fb::NodeKind::Device:
        w_.Global("torch", "device");
        w_.String(Str(n->s()));
        w_.TupleOf(1);
        w_.Reduce();
        return Status::OK();
      case fb::NodeKind::Tensor:
        return EmitTensor(n, path);
      case fb::NodeKind::List:
        w_.EmptyList();
        return Appends(n->items(), depth, path);
      case fb::NodeKind::Tuple:
        return EmitTuple(n->items(), depth, path);
      case fb::NodeKind::Dict:
        w_.EmptyDict();
        return SetItems(n, depth, path);
      case fb::NodeKind::Bytes:
        w_.Bytes(n->data() ? std::string_view(reinterpret_cast<const char*>(n->data()->data()),
                                              n->data()->size())
                           : std::string_view());
        return Status::OK();
      case fb::NodeKind::BigInt: {
        Status st = w_.BigInt(Str(n->s()));
        if (!st.ok()) return Bad(path, st.message());
        return Status::OK();
      }
      case fb::NodeKind::Object:
        return EmitObject(n, depth, path);
    }
    return Bad(path, "has node kind " + std::to_string(static_cast<int>(n->kind())) +
                         ", which has no pickle form");
  }

  std::string Child(const std::string& path, size_t i) const {
    return (path == "/" ? "" : path) + "/" + std::to_string(i);
  }

  Status Appends(const flatbuffers::Vector<flatbuffers::Offset<fb::Node>>* items, int depth,
                 const std::string& path) {
    const size_t n = Count(items);
    for (size_t at = 0; at < n; at += kBatch) {
      w_.Mark();
      for (size_t i = at; i < n && i < at + kBatch; ++i) {
        RETURN_IF_ERROR(
            Emit(items->Get(static_cast<flatbuffers::uoffset_t>(i)), depth + 1, Child(path, i)));
      }
      w_.Appends();
    }
    return Status::OK();
  }

  Status EmitTuple(const flatbuffers::Vector<flatbuffers::Offset<fb::Node>>* items, int depth,
                   const std::string& path) {
    const size_t n = Count(items);
    if (Writer::TupleNeedsMark(n)) w_.Mark();
    for (size_t i = 0; i < n; ++i) {
      RETURN_IF_ERROR(
          Emit(items->Get(static_cast<flatbuffers::uoffset_t>(i)), depth + 1, Child(path, i)));
    }
    w_.TupleOf(n);
    return Status::OK();
  }

  // SETITEMS of a Dict node's entries into the dict on the stack.
  Status SetItems(const fb::Node* dict, int depth, const std::string& path) {
    if (dict == nullptr || dict->kind() != fb::NodeKind::Dict) {
      return Bad(path, "should be a dict");
    }
    const size_t n = Count(dict->items());
    if (Count(dict->keys()) != n) return Bad(path, "is a dict with unequal keys and values");
    for (size_t at = 0; at < n; at += kBatch) {
      w_.Mark();
      for (size_t i = at; i < n && i < at + kBatch; ++i) {
        const auto k = static_cast<flatbuffers::uoffset_t>(i);
        RETURN_IF_ERROR(Emit(dict->keys()->Get(k), depth + 1, Child(path, i) + "(key)"));
        RETURN_IF_ERROR(Emit(dict->items()->Get(k), depth + 1, Child(path, i)));
      }
      w_.SetItems();
    }
    return Status::OK();
  }

  void EmptyOrderedDict() {
    w_.Global("collections", "OrderedDict");
    w_.EmptyTuple();
    w_.Reduce();
  }

  Status EmitTensor(const fb::Node* n, const std::string& path) {
    const std::string param = Str(n->s());
    if (auto it = tensor_memo_.find(param); it != tensor_memo_.end()) {
      w_.Get(it->second);
      return Status::OK();
    }
    if (!hooks_.tensor) return Bad(path, "is a tensor, and no tensor hook was given");
    ASSIGN_OR_RETURN(PickledTensor t, hooks_.tensor(param, Str(n->device())));
    const char* storage = StorageClass(t.dtype);
    if (storage == nullptr) return Bad(path, "is a tensor of an unknown dtype");
    int64_t numel = 1;
    std::vector<int64_t> strides(t.shape.size());
    for (size_t i = t.shape.size(); i-- > 0;) {
      strides[i] = numel;
      numel *= t.shape[i] > 0 ? t.shape[i] : 1;
    }
    numel = 1;
    for (int64_t d : t.shape) numel *= d;
    w_.Global("torch._utils", "_rebuild_tensor_v2");
    w_.Mark();
    {
      w_.Mark();
      w_.String("storage");
      w_.Global("torch", storage);
      w_.String(t.key);
      w_.String(t.location);
      w_.Int(numel);
      w_.TupleOf(5);
      w_.BinPersId();
    }
    w_.Int(0);
    if (Writer::TupleNeedsMark(t.shape.size())) w_.Mark();
    for (int64_t d : t.shape) w_.Int(d);
    w_.TupleOf(t.shape.size());
    if (Writer::TupleNeedsMark(strides.size())) w_.Mark();
    for (int64_t s : strides) w_.Int(s);
    w_.TupleOf(strides.size());
    w_.Bool(t.requires_grad);
    EmptyOrderedDict();
    w_.TupleOf(6);
    w_.Reduce();
    tensor_memo_[param] = w_.Put();
    return Status::OK();
  }

  // GLOBAL of a class "module:qualname"; a nested qualname is reached with
  // builtins.getattr, since protocol 2's GLOBAL names one attribute.
  Status GlobalClass(const std::string& cls, const std::string& path) {
    const size_t colon = cls.find(':');
    const std::string module = colon == std::string::npos ? "" : cls.substr(0, colon);
    const std::string qual = colon == std::string::npos ? "" : cls.substr(colon + 1);
    if (!IsIdentifierPath(module) || !IsIdentifierPath(qual)) {
      return Bad(path, "is an object of class '" + cls + "', not a module:qualname");
    }
    std::vector<std::string> parts;
    for (size_t at = 0;;) {
      const size_t dot = qual.find('.', at);
      parts.push_back(qual.substr(at, dot == std::string::npos ? std::string::npos : dot - at));
      if (dot == std::string::npos) break;
      at = dot + 1;
    }
    // A stored record names its class; the file written calls it on
    // torch.load. Never a name that runs code or reaches one.
    if (const char* why = RefusedClass(module, parts)) {
      return Bad(path, "is an object of class '" + cls + "', which export does not write (" + why +
                           "); a store written by ckptkv holds no such object");
    }
    for (size_t i = 1; i < parts.size(); ++i) w_.Global("builtins", "getattr");
    w_.Global(module, parts[0]);
    for (size_t i = 1; i < parts.size(); ++i) {
      w_.String(parts[i]);
      w_.TupleOf(2);
      w_.Reduce();
    }
    return Status::OK();
  }

  // The attributes of an object, BUILD when there are any.
  Status BuildAttrs(const fb::Node* attrs, int depth, const std::string& path) {
    if (attrs == nullptr) return Status::OK();
    if (attrs->kind() != fb::NodeKind::Dict) return Bad(path, "has attributes that are not a dict");
    if (Count(attrs->items()) == 0) return Status::OK();
    RETURN_IF_ERROR(Emit(attrs, depth + 1, path + "(attrs)"));
    w_.Build();
    return Status::OK();
  }

  void NumpyDtype(const std::string& descr) {
    w_.Global("numpy", "dtype");
    w_.String(descr);
    w_.Bool(false);
    w_.Bool(true);
    w_.TupleOf(3);
    w_.Reduce();
  }

  Status EmitObject(const fb::Node* n, int depth, const std::string& path) {
    const std::string cls = Str(n->s());
    const size_t np = Count(n->items());
    if (np < 1 || np > 2) return Bad(path, "is an object of " + cls + " without 1 or 2 payloads");
    const fb::Node* p0 = n->items()->Get(0);
    const fb::Node* p1 = np == 2 ? n->items()->Get(1) : nullptr;
    if (p0 == nullptr) return Bad(path, "is an object of " + cls + " without a payload");
    auto kind_is = [](const fb::Node* x, fb::NodeKind k) { return x && x->kind() == k; };
    if (n->i() < 0 || n->i() > static_cast<int64_t>(fb::ObjectForm::List)) {
      return Bad(path, "is an object of " + cls + " with unknown form " + std::to_string(n->i()));
    }
    const auto form = static_cast<fb::ObjectForm>(n->i());
    if (form == fb::ObjectForm::Builtin) {
      if (cls == "builtins:set" || cls == "builtins:frozenset") {
        if (!kind_is(p0, fb::NodeKind::List)) return Bad(path, "is a set without a list");
        w_.Global("builtins", cls == "builtins:set" ? "set" : "frozenset");
        w_.EmptyList();
        RETURN_IF_ERROR(Appends(p0->items(), depth, path));
        w_.TupleOf(1);
        w_.Reduce();
        return Status::OK();
      }
      if (cls == "builtins:bytearray") {
        if (!kind_is(p0, fb::NodeKind::Bytes)) return Bad(path, "is a bytearray without bytes");
        w_.Global("builtins", "bytearray");
        w_.String(Latin1ToUtf8(
            p0->data() ? std::string_view(reinterpret_cast<const char*>(p0->data()->data()),
                                          p0->data()->size())
                       : std::string_view()));
        w_.String("latin-1");
        w_.TupleOf(2);
        w_.Reduce();
        return Status::OK();
      }
      if (cls == "builtins:slice" || cls == "builtins:range") {
        if (!kind_is(p0, fb::NodeKind::Tuple) || Count(p0->items()) != 3) {
          return Bad(path, "is a " + cls.substr(9) + " without (start, stop, step)");
        }
        w_.Global("builtins", cls.substr(9));
        RETURN_IF_ERROR(Emit(p0, depth + 1, path));
        w_.Reduce();
        return Status::OK();
      }
      if (cls == "collections:OrderedDict") {
        EmptyOrderedDict();
        RETURN_IF_ERROR(SetItems(p0, depth, path));
        return BuildAttrs(p1, depth, path);
      }
      if (cls == "torch:Size") {
        if (!kind_is(p0, fb::NodeKind::Tuple)) return Bad(path, "is a torch.Size without a tuple");
        w_.Global("torch", "Size");
        RETURN_IF_ERROR(Emit(p0, depth + 1, path));
        w_.TupleOf(1);
        w_.Reduce();
        return Status::OK();
      }
      if (cls == "torch:dtype") {
        const std::string name = kind_is(p0, fb::NodeKind::String) ? Str(p0->s()) : "";
        bool ok = !name.empty();
        for (char c : name)
          ok = ok && ((c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_');
        if (!ok) return Bad(path, "is a torch.dtype without a dtype name");
        w_.Global("torch", name);
        return Status::OK();
      }
      if (cls == "torch.nn:Parameter") {
        if (!kind_is(p0, fb::NodeKind::Tensor)) return Bad(path, "is a Parameter without a tensor");
        const bool grad = p1 == nullptr || (p1->kind() == fb::NodeKind::Bool && p1->b());
        const std::string key = Str(p0->s()) + std::string(1, grad ? '1' : '0');
        if (auto it = param_memo_.find(key); it != param_memo_.end()) {
          w_.Get(it->second);
          return Status::OK();
        }
        w_.Global("torch._utils", "_rebuild_parameter");
        RETURN_IF_ERROR(EmitTensor(p0, path));
        w_.Bool(grad);
        EmptyOrderedDict();
        w_.TupleOf(3);
        w_.Reduce();
        param_memo_[key] = w_.Put();
        return Status::OK();
      }
      if (cls == "argparse:Namespace") {
        if (!kind_is(p0, fb::NodeKind::Dict)) return Bad(path, "is a Namespace without a dict");
        w_.Global("argparse", "Namespace");
        w_.EmptyTuple();
        w_.NewObj();
        return BuildAttrs(p0, depth, path);
      }
      if (cls == "numpy:dtype") {
        if (!kind_is(p0, fb::NodeKind::String)) return Bad(path, "is a numpy dtype without a name");
        NumpyDtype(Str(p0->s()));
        return Status::OK();
      }
      if (cls == "numpy:scalar") {
        if (!kind_is(p0, fb::NodeKind::Tuple) || Count(p0->items()) != 2 ||
            !kind_is(p0->items()->Get(0), fb::NodeKind::String) ||
            !kind_is(p0->items()->Get(1), fb::NodeKind::Bytes)) {
          return Bad(path, "is a numpy scalar without (dtype, bytes)");
        }
        w_.Global("numpy.core.multiarray", "scalar");
        NumpyDtype(Str(p0->items()->Get(0)->s()));
        RETURN_IF_ERROR(Emit(p0->items()->Get(1), depth + 1, path));
        w_.TupleOf(2);
        w_.Reduce();
        return Status::OK();
      }
      if (cls == "numpy:ndarray") return EmitArray(p0, depth, path);
      return Bad(path, "is a built-in object of class '" + cls +
                           "', which ckptkv does not know how to pickle");
    }
    RETURN_IF_ERROR(GlobalClass(cls, path));
    switch (form) {
      case fb::ObjectForm::Enum:
        RETURN_IF_ERROR(Emit(p0, depth + 1, path));
        w_.TupleOf(1);
        w_.Reduce();
        return Status::OK();
      case fb::ObjectForm::State:
        w_.EmptyTuple();
        w_.NewObj();
        return BuildAttrs(p0, depth, path);
      case fb::ObjectForm::Tuple:
        if (!kind_is(p0, fb::NodeKind::Tuple)) return Bad(path, "is a tuple object without items");
        RETURN_IF_ERROR(EmitTuple(p0->items(), depth, path));
        w_.NewObj();
        return BuildAttrs(p1, depth, path);
      case fb::ObjectForm::Dict:
        w_.EmptyTuple();
        w_.NewObj();
        RETURN_IF_ERROR(SetItems(p0, depth, path));
        return BuildAttrs(p1, depth, path);
      case fb::ObjectForm::List:
        if (!kind_is(p0, fb::NodeKind::List)) return Bad(path, "is a list object without items");
        w_.EmptyTuple();
        w_.NewObj();
        RETURN_IF_ERROR(Appends(p0->items(), depth, path));
        return BuildAttrs(p1, depth, path);
      default:
        break;
    }
    return Bad(path, "is an object of " + cls + " with an unknown form");
  }

  // numpy's own form: _reconstruct(ndarray, (0,), b'b') then BUILD of
  // (1, shape, dtype, is_fortran, raw bytes).
  Status EmitArray(const fb::Node* p0, int depth, const std::string& path) {
    if (p0 == nullptr || p0->kind() != fb::NodeKind::Tuple || Count(p0->items()) != 3) {
      return Bad(path, "is a numpy array without (dtype, shape, data)");
    }
    const fb::Node* dt = p0->items()->Get(0);
    const fb::Node* shape = p0->items()->Get(1);
    const fb::Node* data = p0->items()->Get(2);
    if (dt == nullptr || dt->kind() != fb::NodeKind::String || shape == nullptr ||
        shape->kind() != fb::NodeKind::Tuple || data == nullptr) {
      return Bad(path, "is a numpy array without (dtype, shape, data)");
    }
    std::string raw;
    if (data->kind() == fb::NodeKind::Bytes) {
      if (data->data())
        raw.assign(reinterpret_cast<const char*>(data->data()->data()), data->data()->size());
    } else if (data->kind() == fb::NodeKind::Tensor) {
      if (!hooks_.tensor_bytes) return Bad(path, "is a numpy array held in a tensor; no hook");
      ASSIGN_OR_RETURN(raw, hooks_.tensor_bytes(Str(data->s())));
    } else {
      return Bad(path, "is a numpy array whose data is neither bytes nor a tensor");
    }
    w_.Global("numpy.core.multiarray", "_reconstruct");
    w_.Global("numpy", "ndarray");
    w_.Int(0);
    w_.TupleOf(1);
    w_.Bytes("b");
    w_.TupleOf(3);
    w_.Reduce();
    w_.Mark();
    w_.Int(1);
    RETURN_IF_ERROR(Emit(shape, depth + 1, path));
    NumpyDtype(Str(dt->s()));
    w_.Bool(false);
    w_.Bytes(raw);
    w_.TupleOf(5);
    w_.Build();
    return Status::OK();
  }

  const PickleHooks& hooks_;
  const std::string& where_;
  uint64_t budget_;
  uint64_t visited_ = 0;
  Writer w_;
  std::map<std::string, uint32_t> tensor_memo_;
  std::map<std::string, uint32_t> param_memo_;
};

}  // namespace

Result<std::string> PickleStateTree(const fb::Node* root, const PickleHooks& hooks,
                                    const std::string& where, uint64_t node_budget) {
  TreePickler p(hooks, where, node_budget);
  return p.Run(root);
}

}  // namespace ckptkv::checkpoint::pickle
