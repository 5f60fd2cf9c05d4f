// Makes the built library importable as a Python module: salsa_fused._C (setup.py) or the JIT
// build's module (salsa_fused/_ext.py); importing it runs the TORCH_LIBRARY registrations of the
// other sources (torch.ops.salsa_fused.*). Both builds define TORCH_EXTENSION_NAME as the module's
// name, which names the init function Python looks for.
// It also holds two host-side helpers of the optimizer's bucket cache (salsa_fused/buckets.py):
// reading a param group's gradients and what identifies its tensors, and the identities of the
// optimizer state's moments, each in one loop, where Python needs one interpreted pass per
// attribute; and the C++ backend's count of a plain step that changed nothing, on CPU tensors.
#include <Python.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include <torch/csrc/Exceptions.h>
#include "tensor_layout.h"
#include <torch/csrc/autograd/python_variable.h>

#ifndef TORCH_EXTENSION_NAME
#error "TORCH_EXTENSION_NAME (the module's name) is defined by torch.utils.cpp_extension's builds"
#endif
// The expansion of TORCH_EXTENSION_NAME as a string, and PyInit_<it>.
#define SALSA_FUSED_STRING(name) SALSA_FUSED_STRING_OF(name)
#define SALSA_FUSED_STRING_OF(name) #name
#define SALSA_FUSED_INIT(name) SALSA_FUSED_INIT_OF(name)
#define SALSA_FUSED_INIT_OF(name) PyInit_##name

namespace {

// Per param: the Python object, the weight's data pointer, its gradient's data pointer, its
// gradient's dtype plus one, its layout against the weight's (gradient_layout; these three 0
// without a gradient), and a hash of the weight's dtype, sizes and strides.
constexpr int kWordsPerParam = 6;

// 1 when the gradient puts every element where the weight does (its strides, or strides apart on
// size-1 dimensions only, which the kernels take as they are: tensor_layout.h); 2 for the weight's
// sizes in another layout (a transpose: the Python path copies it, and never remembers the
// signature); 3 for other sizes (the Python path refuses it by shape).
int64_t gradient_layout(const at::Tensor& grad, const at::Tensor& param) {
  if (grad.sizes() != param.sizes()) return 3;
  return salsa_layout::same_element_offsets(grad, param) ? 1 : 2;
}

// FNV-1a over the dtype, the sizes, then the strides: ``p.data = p.data.view(...)`` (``.t()``,
// ``[:n]``) keeps the weight's address but not its layout, which its moments must follow, and a
// weight of another dtype can land on the old address.
int64_t layout_hash(const at::Tensor& t) {
  uint64_t hash = 14695981039346656037ull;
  hash = (hash ^ static_cast<uint64_t>(t.scalar_type())) * 1099511628211ull;
  for (const int64_t size : t.sizes()) hash = (hash ^ static_cast<uint64_t>(size)) * 1099511628211ull;
  hash = (hash ^ 0xffull) * 1099511628211ull;  // between the two lists
  for (const int64_t stride : t.strides()) hash = (hash ^ static_cast<uint64_t>(stride)) * 1099511628211ull;
  return static_cast<int64_t>(hash);
}

// group_signature(params: list[Tensor]) -> (grads: list[Tensor | None], signature: bytes) | None
//
// ``grads[i]`` is ``params[i].grad``; ``signature`` packs, per param, ``id(param)``,
// ``param.data_ptr()``, the gradient's ``data_ptr()``, dtype and layout against the weight's
// (zeros without one), and the weight's layout. Two equal signatures mean the same param
// objects on the same storage in the same layouts, with gradients at the same addresses of the
// same dtypes, each laid out as its weight or not as before (a gradient at a seen address with a
// transpose's strides is new). None when ``params`` is not a list, or some entry is not a tensor or
// has no storage (a DTensor's wrapper, a sparse gradient): the caller then takes its Python path,
// which handles and names those.
PyObject* group_signature(PyObject* /*module*/, PyObject* params) {
  HANDLE_TH_ERRORS
  if (!PyList_Check(params)) Py_RETURN_NONE;
  const Py_ssize_t count = PyList_GET_SIZE(params);
  std::vector<int64_t> words(static_cast<size_t>(count) * kWordsPerParam, 0);
  PyObject* grads = PyList_New(count);
  if (grads == nullptr) return nullptr;
  for (Py_ssize_t i = 0; i < count; ++i) {
    PyObject* item = PyList_GET_ITEM(params, i);
    if (!THPVariable_Check(item)) {
      Py_DECREF(grads);
      Py_RETURN_NONE;
    }
    const at::Tensor& param = THPVariable_Unpack(item);
    int64_t* word = words.data() + i * kWordsPerParam;
    if (!param.has_storage()) {
      Py_DECREF(grads);
      Py_RETURN_NONE;
    }
    word[0] = reinterpret_cast<int64_t>(item);
    word[1] = reinterpret_cast<int64_t>(param.unsafeGetTensorImpl()->data());
    word[5] = layout_hash(param);
    const at::Tensor& grad = param.grad();
    if (!grad.defined()) {
      Py_INCREF(Py_None);
      PyList_SET_ITEM(grads, i, Py_None);
      continue;
    }
    if (grad.layout() != at::kStrided || !grad.has_storage()) {
      Py_DECREF(grads);
      Py_RETURN_NONE;
    }
    word[2] = reinterpret_cast<int64_t>(grad.unsafeGetTensorImpl()->data());
    word[3] = static_cast<int64_t>(grad.scalar_type()) + 1;
    word[4] = gradient_layout(grad, param);
    PyList_SET_ITEM(grads, i, THPVariable_Wrap(grad));
  }
  PyObject* signature = PyBytes_FromStringAndSize(reinterpret_cast<const char*>(words.data()),
                                                  static_cast<Py_ssize_t>(words.size() * sizeof(int64_t)));
  if (signature == nullptr) {
    Py_DECREF(grads);
    return nullptr;
  }
  PyObject* result = PyTuple_Pack(2, grads, signature);
  Py_DECREF(grads);
  Py_DECREF(signature);
  return result;
  END_HANDLE_TH_ERRORS
}

// Interned keys of an optimizer state entry (set once at module init).
PyObject* exp_avg_key = nullptr;
PyObject* exp_avg_sq_key = nullptr;

// moments_signature(state: dict) -> bytes | None
//
// Per entry of ``state`` (an optimizer's ``opt.state``, in its order): the addresses of its
// ``"exp_avg"`` and ``"exp_avg_sq"`` objects (0 where one is missing). Equal signatures mean the
// same moment objects in the same order, while the caller holds references to the ones it
// compares against (an address is then not reused). None when ``state`` is not a dict or an entry
// is not a dict: the caller takes its Python path.
PyObject* moments_signature(PyObject* /*module*/, PyObject* state) {
  if (!PyDict_Check(state)) Py_RETURN_NONE;
  const Py_ssize_t count = PyDict_Size(state);
  PyObject* signature = PyBytes_FromStringAndSize(nullptr, count * 2 * static_cast<Py_ssize_t>(sizeof(int64_t)));
  if (signature == nullptr) return nullptr;
  int64_t* word = reinterpret_cast<int64_t*>(PyBytes_AS_STRING(signature));
  Py_ssize_t position = 0;
  Py_ssize_t index = 0;
  PyObject* key = nullptr;
  PyObject* entry = nullptr;
  while (PyDict_Next(state, &position, &key, &entry)) {
    if (!PyDict_Check(entry) || index >= count) {
      Py_DECREF(signature);
      Py_RETURN_NONE;
    }
    word[2 * index] = reinterpret_cast<int64_t>(PyDict_GetItem(entry, exp_avg_key));
    word[2 * index + 1] = reinterpret_cast<int64_t>(PyDict_GetItem(entry, exp_avg_sq_key));
    ++index;
  }
  return signature;
}

// moments_unchanged(state: dict, signature: bytes) -> bool | None
//
// Whether ``moments_signature(state)`` would equal ``signature``, read without building it: stops
// at the first entry that differs. None where ``moments_signature`` would be None.
PyObject* moments_unchanged(PyObject* /*module*/, PyObject* args) {
  PyObject* state = nullptr;
  PyObject* signature = nullptr;
  if (!PyArg_ParseTuple(args, "OO!", &state, &PyBytes_Type, &signature)) return nullptr;
  if (!PyDict_Check(state)) Py_RETURN_NONE;
  const Py_ssize_t count = PyDict_Size(state);
  if (PyBytes_GET_SIZE(signature) != count * 2 * static_cast<Py_ssize_t>(sizeof(int64_t))) Py_RETURN_FALSE;
  const int64_t* word = reinterpret_cast<const int64_t*>(PyBytes_AS_STRING(signature));
  Py_ssize_t position = 0;
  Py_ssize_t index = 0;
  PyObject* key = nullptr;
  PyObject* entry = nullptr;
  bool same = true;
  while (PyDict_Next(state, &position, &key, &entry)) {
    if (!PyDict_Check(entry) || index >= count) Py_RETURN_NONE;
    if (same && (word[2 * index] != reinterpret_cast<int64_t>(PyDict_GetItem(entry, exp_avg_key)) ||
                 word[2 * index + 1] != reinterpret_cast<int64_t>(PyDict_GetItem(entry, exp_avg_sq_key)))) {
      same = false;  // the rest is still read: an entry that is not a dict means None, as for the signature
    }
    ++index;
  }
  if (same) Py_RETURN_TRUE;
  Py_RETURN_FALSE;
}

// The value of a one-element CPU tensor of a floating dtype (exact in a double); false for any other tensor.
bool cpu_value(const at::Tensor& t, double* value) {
  if (!t.device().is_cpu() || t.numel() != 1 || !t.has_storage() || t.key_set().has(c10::DispatchKey::Python)) {
    return false;
  }
  switch (t.scalar_type()) {
    case at::kFloat: *value = *t.const_data_ptr<float>(); return true;
    case at::kDouble: *value = *t.const_data_ptr<double>(); return true;
    case at::kBFloat16: *value = static_cast<float>(*t.const_data_ptr<c10::BFloat16>()); return true;
    case at::kHalf: *value = static_cast<float>(*t.const_data_ptr<c10::Half>()); return true;
    default: return false;
  }
}

// count_plain_step(step_counts: Tensor, loss: Tensor, found_inf: Tensor | None) -> bool
//
// salsa_fused.backends.base.count_step read and written on the host, for CPU tensors: ``step_counts +=
// [loss is NaN/inf (as fp32) and found_inf == 0, found_inf != 0]`` (one in-place add each, as the torch
// form's, its version counter bumped alike). Seven dispatched torch ops there, a few loads and stores
// here. False, with nothing written, where it does not apply (another device, dtype or shape, a tensor
// subclass): the caller runs the torch form, which also names what is wrong.
PyObject* count_plain_step(PyObject* /*module*/, PyObject* args) {
  HANDLE_TH_ERRORS
  PyObject* counts_object = nullptr;
  PyObject* loss_object = nullptr;
  PyObject* found_inf_object = nullptr;
  if (!PyArg_ParseTuple(args, "OOO", &counts_object, &loss_object, &found_inf_object)) return nullptr;
  if (!THPVariable_Check(counts_object) || !THPVariable_Check(loss_object) ||
      (found_inf_object != Py_None && !THPVariable_Check(found_inf_object))) {
    Py_RETURN_FALSE;
  }
  const at::Tensor& counts = THPVariable_Unpack(counts_object);
  if (!counts.device().is_cpu() || counts.scalar_type() != at::kLong || counts.dim() != 1 || counts.numel() != 2 ||
      !counts.has_storage() || counts.key_set().has(c10::DispatchKey::Python)) {
    Py_RETURN_FALSE;
  }
  double loss = 0.0;
  double found_inf = 0.0;
  if (!cpu_value(THPVariable_Unpack(loss_object), &loss) ||
      (found_inf_object != Py_None && !cpu_value(THPVariable_Unpack(found_inf_object), &found_inf))) {
    Py_RETURN_FALSE;
  }
  int64_t* data = counts.data_ptr<int64_t>();
  const int64_t stride = counts.stride(0);
  const bool skipped = found_inf != 0.0;  // NaN too, as found_inf != 0 is
  // the loss as fp32, as torch's .to(torch.float32): a double beyond fp32's range is inf there
  data[0] += (!std::isfinite(static_cast<float>(loss)) && !skipped) ? 1 : 0;
  counts.unsafeGetTensorImpl()->bump_version();
  if (found_inf_object != Py_None) {
    data[stride] += skipped ? 1 : 0;
    counts.unsafeGetTensorImpl()->bump_version();
  }
  Py_RETURN_TRUE;
  END_HANDLE_TH_ERRORS
}

PyMethodDef methods[] = {
    {"group_signature", group_signature, METH_O,
     "group_signature(params) -> (grads, signature bytes) | None: a param group's gradients and "
     "what identifies its tensors, read in one loop (salsa_fused/buckets.py)"},
    {"moments_signature", moments_signature, METH_O,
     "moments_signature(state) -> bytes | None: the addresses of each state entry's exp_avg and "
     "exp_avg_sq, read in one loop (salsa_fused/buckets.py)"},
    {"moments_unchanged", moments_unchanged, METH_VARARGS,
     "moments_unchanged(state, signature) -> bool | None: whether moments_signature(state) equals "
     "signature, read in one loop without building it (salsa_fused/buckets.py)"},
    {"count_plain_step", count_plain_step, METH_VARARGS,
     "count_plain_step(step_counts, loss, found_inf) -> bool: base.count_step on CPU tensors, read and written "
     "on the host (salsa_fused/backends/cpp_backend.py); False where it does not apply"},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef salsa_fused_c_module = {PyModuleDef_HEAD_INIT, SALSA_FUSED_STRING(TORCH_EXTENSION_NAME),
                                    "salsa_fused's compiled torch ops", -1, methods};

}  // namespace

PyMODINIT_FUNC SALSA_FUSED_INIT(TORCH_EXTENSION_NAME)(void) {
  exp_avg_key = PyUnicode_InternFromString("exp_avg");
  exp_avg_sq_key = PyUnicode_InternFromString("exp_avg_sq");
  if (exp_avg_key == nullptr || exp_avg_sq_key == nullptr) return nullptr;
  return PyModule_Create(&salsa_fused_c_module);
}
