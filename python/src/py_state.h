// Python values <-> StateTree records, for the Python package.
//
// EncodePy walks a Python value with the GIL held. Exact built-in types
// become their own node kinds (None, bool, int, big int, float, complex,
// str, bytes, torch.Tensor, torch.device, list, tuple, dict); anything else
// is handed to `lower(obj, path)`, the package's policy (ckptkv/_objects.py),
// which returns (class name "module:qualname", ObjectForm, payload tuple of
// one or two values) or raises. Payloads are encoded like any value, so an
// OrderedDict's tensors get the same param paths a dict's would.
//
// DecodePy rebuilds the value from a verified tree: every tensor is read
// first with the GIL released, then the tree is walked with the GIL held;
// each Object node's payload is decoded and handed to
// `rebuild(cls, form, payload_list)`, which returns the object (or an inert
// ckptkv.Record). Nothing is imported or called otherwise. Corrupt trees are
// Corruption errors (StatusError); exceptions of the hooks propagate.
#ifndef CKPTKV_PYTHON_SRC_PY_STATE_H_
#define CKPTKV_PYTHON_SRC_PY_STATE_H_

#include <pybind11/pybind11.h>

#include <string>

#include "engine/state_codec.h"
#include "store/store.h"

namespace ckptkv::py {

namespace pyb = pybind11;

// InvalidArgument naming `where` and the value's path for values that
// cannot be stored; Python exceptions of `lower` propagate.
EncodedState EncodePy(pyb::handle value, pyb::handle lower, const std::string& where);

struct DecodeHooks {
  pyb::handle rebuild;      // rebuild(cls, form, payload) -> object
  pyb::handle tensor_hook;  // None, or tensor_hook(tensor, saved_device) -> tensor
};

// Loads tag/file of `store` as a Python value.
pyb::object DecodePy(const Store& store, const std::string& tag, const std::string& file,
                     const DecodeHooks& hooks);

}  // namespace ckptkv::py

#endif  // CKPTKV_PYTHON_SRC_PY_STATE_H_
