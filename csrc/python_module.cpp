// Makes the built library importable as the Python module salsa_fused._C; importing it
// runs the TORCH_LIBRARY registrations of the other sources (torch.ops.salsa_fused.*).
#include <Python.h>

static PyModuleDef salsa_fused_c_module = {PyModuleDef_HEAD_INIT, "_C", "salsa_fused's compiled torch ops", -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&salsa_fused_c_module); }
