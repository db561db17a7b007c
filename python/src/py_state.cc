#include "python/src/py_state.h"

#include <torch/csrc/Device.h>
#include <torch/csrc/autograd/python_variable.h>

#include <climits>
#include <unordered_map>
#include <vector>

#include "engine/torch_call.h"
#include "store/names.h"
#include "store/record_check.h"

namespace ckptkv::py {
namespace {

using NodeOffset = flatbuffers::Offset<fb::Node>;

// As the LibTorch encoder: deeper values are refused (a cycle ends here).
constexpr int kMaxNesting = 200;

std::string Str(pyb::handle h) { return pyb::str(h).cast<std::string>(); }

std::string TypeName(pyb::handle h) {
  pyb::handle t = reinterpret_cast<PyObject*>(Py_TYPE(h.ptr()));
  return Str(t.attr("__module__")) + "." + Str(t.attr("__qualname__"));
}

bool IsExactTensor(pyb::handle h) {
  return THPVariableClass != nullptr &&
         Py_TYPE(h.ptr()) == reinterpret_cast<PyTypeObject*>(THPVariableClass);
}

class PyEncoder {
 public:
  PyEncoder(pyb::handle lower, std::string where)
      : lower_(lower), where_(std::move(where)), w_(where_) {}

  EncodedState Run(pyb::handle value) {
    NodeOffset root = Encode(value, "", 0);
    return w_.Finish(root);
  }

 private:
  [[noreturn]] void Fail(const std::string& path, const std::string& what) {
    ThrowIfError(Status::InvalidArgument(where_ + ": value at '" + (path.empty() ? "/" : path) +
                                         "' " + what));
    throw std::logic_error("unreachable");
  }

  flatbuffers::FlatBufferBuilder& b() { return w_.fbb(); }

  NodeOffset Leaf(fb::NodeKind kind) {
    fb::NodeBuilder nb(b());
    nb.add_kind(kind);
    return nb.Finish();
  }

  NodeOffset Text(fb::NodeKind kind, const std::string& s) {
    auto off = b().CreateString(s);
    fb::NodeBuilder nb(b());
    nb.add_kind(kind);
    nb.add_s(off);
    return nb.Finish();
  }

  std::string KeyComponent(pyb::handle key) {
    PyObject* k = key.ptr();
    if (PyUnicode_CheckExact(k)) return StateTreeWriter::EscapeComponent(key.cast<std::string>());
    if (PyBool_Check(k)) return k == Py_True ? "True" : "False";
    if (PyLong_CheckExact(k)) return Str(key);
    if (PyFloat_CheckExact(k)) return std::to_string(PyFloat_AsDouble(k));
    return "key";
  }

  NodeOffset Items(fb::NodeKind kind, pyb::handle seq, const std::string& path, int depth) {
    std::vector<NodeOffset> items;
    const Py_ssize_t n = PySequence_Fast_GET_SIZE(seq.ptr());
    items.reserve(static_cast<size_t>(n));
    PyObject** raw = PySequence_Fast_ITEMS(seq.ptr());
    for (Py_ssize_t i = 0; i < n; ++i) {
      items.push_back(
          Encode(raw[i], StateTreeWriter::ChildPath(path, std::to_string(i)), depth + 1));
    }
    auto vec = b().CreateVector(items);
    fb::NodeBuilder nb(b());
    nb.add_kind(kind);
    nb.add_items(vec);
    return nb.Finish();
  }

  NodeOffset Dict(pyb::handle d, const std::string& path, int depth) {
    std::vector<NodeOffset> keys, items;
    PyObject *k = nullptr, *v = nullptr;
    Py_ssize_t pos = 0;
    // A dict changed while it is walked is the caller's race; PyDict_Next
    // stays memory-safe, and the sizes are checked once more at the end.
    const Py_ssize_t size = PyDict_Size(d.ptr());
    while (PyDict_Next(d.ptr(), &pos, &k, &v)) {
      pyb::handle key(k), value(v);
      keys.push_back(Encode(key, path, depth + 1));
      items.push_back(
          Encode(value, StateTreeWriter::ChildPath(path, KeyComponent(key)), depth + 1));
    }
    if (PyDict_Size(d.ptr()) != size) Fail(path, "is a dict that changed size while it was saved");
    auto kvec = b().CreateVector(keys);
    auto ivec = b().CreateVector(items);
    fb::NodeBuilder nb(b());
    nb.add_kind(fb::NodeKind::Dict);
    nb.add_keys(kvec);
    nb.add_items(ivec);
    return nb.Finish();
  }

  NodeOffset Object(pyb::handle v, const std::string& path, int depth) {
    pyb::object lowered = lower_(v, path);
    pyb::tuple t = lowered.cast<pyb::tuple>();
    if (t.size() != 3) Fail(path, "was lowered to " + Str(lowered) + ", not (cls, form, payload)");
    const std::string cls = t[0].cast<std::string>();
    const int form = t[1].cast<int>();
    pyb::tuple payload = t[2].cast<pyb::tuple>();
    if (cls.find(':') == std::string::npos || form < 0 ||
        form > static_cast<int>(fb::ObjectForm::MAX) || payload.size() < 1 || payload.size() > 2) {
      Fail(path,
           "was lowered to an invalid object (" + cls + ", form " + std::to_string(form) + ")");
    }
    std::vector<NodeOffset> items;
    items.push_back(Encode(payload[0], path, depth + 1));
    if (payload.size() == 2) {
      items.push_back(Encode(payload[1], StateTreeWriter::ChildPath(path, "@attrs"), depth + 1));
    }
    auto s = b().CreateString(cls);
    auto vec = b().CreateVector(items);
    fb::NodeBuilder nb(b());
    nb.add_kind(fb::NodeKind::Object);
    nb.add_s(s);
    nb.add_i(form);
    nb.add_items(vec);
    return nb.Finish();
  }

  NodeOffset Encode(pyb::handle v, const std::string& path, int depth) {
    if (depth > kMaxNesting) {
      Fail(path, "is nested more than " + std::to_string(kMaxNesting) +
                     " levels deep (a container that holds itself?)");
    }
    PyObject* o = v.ptr();
    if (o == Py_None) return Leaf(fb::NodeKind::None);
    if (PyBool_Check(o)) {
      fb::NodeBuilder nb(b());
      nb.add_kind(fb::NodeKind::Bool);
      nb.add_b(o == Py_True);
      return nb.Finish();
    }
    if (PyLong_CheckExact(o)) {
      int overflow = 0;
      const long long x = PyLong_AsLongLongAndOverflow(o, &overflow);
      if (overflow == 0) {
        if (x == -1 && PyErr_Occurred()) throw pyb::error_already_set();
        fb::NodeBuilder nb(b());
        nb.add_kind(fb::NodeKind::Int);
        nb.add_i(x);
        return nb.Finish();
      }
      std::string digits = Str(v);  // ValueError beyond Python's digit limit
      if (!IsDecimalInteger(digits)) {
        Fail(path, "is an int of more than " + std::to_string(kMaxBigIntDigits) + " digits");
      }
      return Text(fb::NodeKind::BigInt, digits);
    }
    if (PyFloat_CheckExact(o)) {
      fb::NodeBuilder nb(b());
      nb.add_kind(fb::NodeKind::Double);
      nb.add_d(PyFloat_AS_DOUBLE(o));
      return nb.Finish();
    }
    if (PyComplex_CheckExact(o)) {
      fb::NodeBuilder nb(b());
      nb.add_kind(fb::NodeKind::ComplexDouble);
      nb.add_d(PyComplex_RealAsDouble(o));
      nb.add_d_imag(PyComplex_ImagAsDouble(o));
      return nb.Finish();
    }
    if (PyUnicode_CheckExact(o)) {
      Py_ssize_t n = 0;
      const char* s = PyUnicode_AsUTF8AndSize(o, &n);
      if (s == nullptr) throw pyb::error_already_set();  // lone surrogates
      auto off = b().CreateString(s, static_cast<size_t>(n));
      fb::NodeBuilder nb(b());
      nb.add_kind(fb::NodeKind::String);
      nb.add_s(off);
      return nb.Finish();
    }
    if (PyBytes_CheckExact(o)) {
      auto data = b().CreateVector(reinterpret_cast<const uint8_t*>(PyBytes_AS_STRING(o)),
                                   static_cast<size_t>(PyBytes_GET_SIZE(o)));
      fb::NodeBuilder nb(b());
      nb.add_kind(fb::NodeKind::Bytes);
      nb.add_data(data);
      return nb.Finish();
    }
    if (IsExactTensor(v)) {
      NodeOffset out = 0;
      ThrowIfError(w_.Tensor(THPVariable_Unpack(o), path, &out));
      return out;
    }
    if (THPDevice_Check(o)) return Text(fb::NodeKind::Device, Str(v));
    if (PyList_CheckExact(o)) return Items(fb::NodeKind::List, v, path, depth);
    if (PyTuple_CheckExact(o)) return Items(fb::NodeKind::Tuple, v, path, depth);
    if (PyDict_CheckExact(o)) return Dict(v, path, depth);
    return Object(v, path, depth);
  }

  pyb::handle lower_;
  std::string where_;
  StateTreeWriter w_;
};

class PyDecoder {
 public:
  PyDecoder(const DecodeHooks& hooks, std::string where, size_t budget,
            std::unordered_map<std::string, pyb::object> tensors)
      : hooks_(hooks), where_(std::move(where)), budget_(budget), tensors_(std::move(tensors)) {}

  pyb::object Decode(const fb::Node* n, int depth) {
    if (n == nullptr) Corrupt("missing node");
    if (budget_ == 0) Corrupt("more nodes than the record's size allows (shared subtrees?)");
    --budget_;
    if (depth > 2 * kMaxNesting) Corrupt("nesting too deep");
    switch (n->kind()) {
      case fb::NodeKind::None:
        return pyb::none();
      case fb::NodeKind::Bool:
        return pyb::bool_(n->b());
      case fb::NodeKind::Int:
        return pyb::int_(static_cast<long long>(n->i()));
      case fb::NodeKind::Double:
        return pyb::float_(n->d());
      case fb::NodeKind::ComplexDouble:
        return pyb::reinterpret_steal<pyb::object>(PyComplex_FromDoubles(n->d(), n->d_imag()));
      case fb::NodeKind::String: {
        if (!n->s()) Corrupt("string node without a value");
        PyObject* s = PyUnicode_DecodeUTF8(n->s()->data(), n->s()->size(), "strict");
        if (s == nullptr) {
          PyErr_Clear();
          Corrupt("string node is not valid UTF-8");
        }
        return pyb::reinterpret_steal<pyb::object>(s);
      }
      case fb::NodeKind::Bytes:
        return n->data()
                   ? pyb::bytes(reinterpret_cast<const char*>(n->data()->data()), n->data()->size())
                   : pyb::bytes("");
      case fb::NodeKind::BigInt: {
        if (!n->s() || !IsDecimalInteger(n->s()->string_view())) {
          Corrupt("big-int node does not hold decimal digits");
        }
        PyObject* x = PyLong_FromString(n->s()->c_str(), nullptr, 10);
        if (x == nullptr) throw pyb::error_already_set();
        return pyb::reinterpret_steal<pyb::object>(x);
      }
      case fb::NodeKind::Device: {
        if (!n->s()) Corrupt("device node without a value");
        std::optional<c10::Device> d = ParseDevice(n->s()->str());
        if (!d) Corrupt("device node holds an invalid device string");
        return pyb::reinterpret_steal<pyb::object>(THPDevice_New(*d));
      }
      case fb::NodeKind::Tensor: {
        if (!n->s()) Corrupt("tensor node without a param path");
        auto it = tensors_.find(n->s()->str());
        if (it == tensors_.end()) Corrupt("tensor node names an unread param");
        return it->second;
      }
      case fb::NodeKind::List:
      case fb::NodeKind::Tuple: {
        const size_t count = n->items() ? n->items()->size() : 0;
        pyb::list out(count);
        for (size_t i = 0; i < count; ++i) out[i] = Decode(n->items()->Get(i), depth + 1);
        if (n->kind() == fb::NodeKind::List) return std::move(out);
        return pyb::tuple(out);
      }
      case fb::NodeKind::Dict: {
        const size_t nk = n->keys() ? n->keys()->size() : 0;
        const size_t ni = n->items() ? n->items()->size() : 0;
        if (nk != ni) {
          Corrupt("dict node has " + std::to_string(nk) + " keys and " + std::to_string(ni) +
                  " values");
        }
        pyb::dict out;
        for (size_t i = 0; i < nk; ++i) {
          pyb::object k = Decode(n->keys()->Get(i), depth + 1);
          pyb::object v = Decode(n->items()->Get(i), depth + 1);
          if (PyDict_SetItem(out.ptr(), k.ptr(), v.ptr()) != 0) {
            if (!PyErr_ExceptionMatches(PyExc_TypeError)) throw pyb::error_already_set();
            PyErr_Clear();
            Corrupt("dict key " + std::to_string(i) + " is not hashable");
          }
        }
        return std::move(out);
      }
      case fb::NodeKind::Object: {
        if (!n->s() || n->s()->size() == 0) Corrupt("object node without a class name");
        const size_t count = n->items() ? n->items()->size() : 0;
        if (count < 1 || count > 2)
          Corrupt("object node with " + std::to_string(count) + " payload values");
        if (n->i() < 0 || n->i() > static_cast<int64_t>(fb::ObjectForm::MAX)) {
          Corrupt("object node of unknown form " + std::to_string(n->i()));
        }
        pyb::list payload(count);
        for (size_t i = 0; i < count; ++i) payload[i] = Decode(n->items()->Get(i), depth + 1);
        return hooks_.rebuild(n->s()->str(), static_cast<int>(n->i()), payload);
      }
    }
    Corrupt("unknown node kind " + std::to_string(static_cast<int>(n->kind())));
  }

 private:
  [[noreturn]] void Corrupt(const std::string& what) {
    ThrowIfError(Status::Corruption("state tree of " + where_ + ": " + what));
    throw std::logic_error("unreachable");
  }

  const DecodeHooks& hooks_;
  std::string where_;
  size_t budget_;
  std::unordered_map<std::string, pyb::object> tensors_;
};

}  // namespace

EncodedState EncodePy(pyb::handle value, pyb::handle lower, const std::string& where) {
  return PyEncoder(lower, where).Run(value);
}

pyb::object DecodePy(const Store& store, const std::string& tag, const std::string& file,
                     const DecodeHooks& hooks) {
  const std::string where = FileName(tag, file);
  std::string bytes;
  std::vector<std::string> params;
  std::vector<at::Tensor> loaded;
  {
    pyb::gil_scoped_release nogil;
    bytes = ValueOrThrow(store.GetFileTree(tag, file));
    // In the tree's order, the order they were saved: one batch of block
    // reads for all of them.
    params = ValueOrThrow(StoredTensorPaths(bytes, where));
    loaded = ValueOrThrow(TorchCall(TorchErrorKind::kUserValue, where,
                                    [&] { return ReadStoredTensors(store, tag, file, params); }));
  }
  std::unordered_map<std::string, pyb::object> tensors;
  for (size_t i = 0; i < params.size(); ++i) {
    // The saved device is the first Tensor node's; tensors are read on the
    // CPU and the hook (map_location) moves them.
    pyb::object t = pyb::reinterpret_steal<pyb::object>(THPVariable_Wrap(loaded[i]));
    tensors.emplace(params[i], std::move(t));
  }
  if (!hooks.tensor_hook.is_none()) {
    // Saved devices, from the tree: one walk collecting (param, device).
    std::unordered_map<std::string, std::string> devices;
    std::vector<const fb::Node*> stack{VerifiedStateTree(bytes)->root()};
    size_t budget = StateTreeNodeBudget(bytes.size());
    while (!stack.empty() && budget-- > 0) {
      const fb::Node* n = stack.back();
      stack.pop_back();
      if (n == nullptr) continue;
      if (n->kind() == fb::NodeKind::Tensor && n->s()) {
        devices.emplace(n->s()->str(), n->device() ? n->device()->str() : "cpu");
      }
      if (n->items()) stack.insert(stack.end(), n->items()->begin(), n->items()->end());
      if (n->keys()) stack.insert(stack.end(), n->keys()->begin(), n->keys()->end());
    }
    for (auto& [param, t] : tensors) {
      auto d = devices.find(param);
      t = hooks.tensor_hook(t, d == devices.end() ? std::string("cpu") : d->second);
    }
  }
  PyDecoder dec(hooks, where, StateTreeNodeBudget(bytes.size()), std::move(tensors));
  return dec.Decode(VerifiedStateTree(bytes)->root(), 0);
}

}  // namespace ckptkv::py
