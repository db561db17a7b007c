// The checkpoint submodule of ckptkv._ckptkv (DeepSpeed's reshape maps,
// tag layouts and the reshape / universal queries over store tags).
#ifndef CKPTKV_PYTHON_SRC_PY_CHECKPOINT_H_
#define CKPTKV_PYTHON_SRC_PY_CHECKPOINT_H_

#include <pybind11/pybind11.h>

namespace ckptkv::py {

namespace pyb = pybind11;

void BindCheckpoint(pyb::module_& parent);

}  // namespace ckptkv::py

#endif  // CKPTKV_PYTHON_SRC_PY_CHECKPOINT_H_
