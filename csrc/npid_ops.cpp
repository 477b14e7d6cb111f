// The `npid` operator library: its schemas (include/npid/schemas.h) and the Python module
// shell that loads it.
#include <Python.h>
#include <torch/library.h>

#include "npid/autograd.h"
#include "npid/schemas.h"

extern "C" {
// `import npid_kernels._C` loads this library, whose static initialisers
// register the operators below; the module itself is empty.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(npid, m) { npid::define_schemas(m); }
TORCH_LIBRARY_IMPL(npid, Autograd, m) { npid::register_fused_loss_autograd(m); }
