// The `npid` operator library: its schemas (include/npid/schemas.h) and the Python module
// that loads it, whose one function reports the CPU kernels' scratch memory (cpu/scratch.h).
#include <Python.h>
#include <torch/library.h>

#include "cpu/scratch.h"
#include "npid/autograd.h"
#include "npid/schemas.h"

namespace {
// cpu_scratch_bytes(reset_peak=False) -> (live, peak): the bytes the CPU kernels hold in scratch
// now and at most since the last reset (read before resetting). A plain module function, not an
// operator: it reads a process-wide counter and takes no tensor.
PyObject* cpu_scratch_bytes(PyObject*, PyObject* args) {
  int reset_peak = 0;
  if (!PyArg_ParseTuple(args, "|p:cpu_scratch_bytes", &reset_peak)) return nullptr;
  using npid::cpu::ScratchBytes;
  const long long live = ScratchBytes::live().load(), peak = ScratchBytes::peak().load();
  if (reset_peak) ScratchBytes::reset_peak();
  return Py_BuildValue("(LL)", live, peak);
}

PyMethodDef methods[] = {
    {"cpu_scratch_bytes", cpu_scratch_bytes, METH_VARARGS,
     "cpu_scratch_bytes(reset_peak=False) -> (live, peak) bytes of the CPU kernels' scratch memory"},
    {nullptr, nullptr, 0, nullptr}};
}  // namespace

extern "C" {
// `import npid_kernels._C` loads this library, whose static initialisers register the operators
// below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(npid, m) { npid::define_schemas(m); }
TORCH_LIBRARY_IMPL(npid, Autograd, m) { npid::register_fused_loss_autograd(m); }
