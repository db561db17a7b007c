// ckptkv._ckptkv: the C++ store under the Python package (ckptkv/).
//
// The package's Python code is the API (ckptkv/__init__.py); this module is
// its engine room: a Store handle whose calls release the GIL while bytes
// are hashed, written, committed and read, and the value codecs of
// py_state.h. Status errors become the package's exception classes
// (registered by ckptkv/errors.py at import), one per Status code.
#include <array>

#include "python/src/py_checkpoint.h"
#include "python/src/py_store.h"

namespace ckptkv::py {
namespace {

constexpr size_t kCodes = static_cast<size_t>(Status::Code::kResourceExhausted) + 1;
std::array<PyObject*, kCodes> g_error_classes{};

void SetErrorClasses(const pyb::dict& classes) {
  for (size_t c = 1; c < kCodes; ++c) {
    const char* name = CodeName(static_cast<Status::Code>(c));
    if (!classes.contains(name)) {
      throw std::invalid_argument(std::string("no exception class for Status code ") + name);
    }
    PyObject* cls = classes[name].ptr();
    Py_INCREF(cls);
    g_error_classes[c] = cls;
  }
}

}  // namespace
}  // namespace ckptkv::py

PYBIND11_MODULE(_ckptkv, m) {
  using ckptkv::py::PyStore;
  namespace pyb = pybind11;
  m.doc() = "ckptkv's C++ store; use the ckptkv package, not this module";
  pyb::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const ckptkv::StatusError& e) {
      const auto code = static_cast<size_t>(e.status().code());
      PyObject* cls =
          code < ckptkv::py::g_error_classes.size() ? ckptkv::py::g_error_classes[code] : nullptr;
      PyErr_SetString(cls ? cls : PyExc_RuntimeError, e.status().message().c_str());
    }
  });
  m.def("_set_error_classes", &ckptkv::py::SetErrorClasses);
  ckptkv::py::BindCheckpoint(m);
  pyb::class_<PyStore>(m, "Store")
      .def(pyb::init<const std::string&, bool, bool, uint32_t, const std::string&, size_t, uint64_t,
                     int, int, double>(),
           pyb::arg("path"), pyb::arg("create"), pyb::arg("read_only"), pyb::arg("chunk_size") = 0,
           pyb::arg("compression") = "", pyb::arg("threads") = 0,
           pyb::arg("async_buffer_bytes") = 0, pyb::arg("rank") = 0, pyb::arg("world_size") = 0,
           pyb::arg("commit_timeout") = 600.0)
      .def_property_readonly("through_node_writer",
                             [](PyStore& s) { return s.Hold()->store().through_node_writer(); })
      .def("close", &PyStore::Close)
      .def_property_readonly("closed", &PyStore::closed)
      .def_property_readonly("path", &PyStore::Dir)
      .def_property_readonly("read_only", &PyStore::ReadOnly)
      .def("tags_json",
           [](PyStore& s) {
             return s.Json([](ckptkv::kvb::Browser& b) { return ckptkv::kvb::TagsReport(b); });
           })
      .def("tag", &PyStore::Tag)
      .def("latest", &PyStore::Latest)
      .def("files", &PyStore::Files)
      .def("params", &PyStore::Params)
      .def("begin", &PyStore::Begin, pyb::arg("tag"), pyb::arg("overwrite") = false,
           pyb::arg("compression") = std::nullopt)
      .def("save", &PyStore::Save, pyb::arg("tag"), pyb::arg("file"), pyb::arg("value"),
           pyb::arg("lower"), pyb::arg("place") = false, pyb::arg("background") = false)
      .def("commit", &PyStore::Commit, pyb::arg("tag"), pyb::arg("set_latest") = true,
           pyb::arg("overwrite") = false)
      .def("abort", &PyStore::Abort)
      .def("delete", &PyStore::Delete)
      .def("gc_json", &PyStore::Gc, pyb::arg("dry_run") = false)
      .def("verify_json", &PyStore::Verify, pyb::arg("tag") = std::nullopt)
      .def("load", &PyStore::Load, pyb::arg("tag"), pyb::arg("file"), pyb::arg("rebuild"),
           pyb::arg("tensor_hook") = pyb::none())
      .def("tensor_info", &PyStore::TensorInfo)
      .def("read_tensor", &PyStore::ReadTensor)
      .def("read_elements", &PyStore::ReadElements)
      .def("block_bytes_read", &PyStore::BlockBytesRead)
      .def("disk_bytes", &PyStore::DiskBytes);
}
