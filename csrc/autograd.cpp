// The autograd kernel of the interval ops: a C++ autograd node around the chosen kernel, whose backward runs the
// op's one derivative formula, the Python one in robustkern/ops/interval.py (no second copy of the math here).
//
// A Python torch.autograd.Function costs 5-9 us per call on the CPU before its forward does any work; a C++
// node about 2-4 us (benchmarks/bench_dispatch.py). This kernel, registered at the Autograd key, runs the op below
// autograd and, when a gradient is to be recorded, makes a torch::autograd::Function node that saves every tensor
// argument and output (version-checked SavedVariables) and the other arguments. Its backward hands them, with the
// output gradients and which input gradients are needed, to robustkern.ops._registry.run_saved_backward, which
// runs the op's setup_context and backward as torch.library.register_autograd would: the same formula, and
// under create_graph its differentiable operations are recorded, so double backward works.
#include <Python.h>

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/utils/pybind.h>
#include <torch/library.h>

#include <string>
#include <vector>

namespace robustkern {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// What a node keeps of its call besides the saved tensors: the op's name, its arguments with the tensors taken
// out (they are saved as SavedVariables) and the position of each tensor argument.
struct SavedCall : torch::CustomClassHolder {
  explicit SavedCall(const c10::OperatorHandle& handle) : op(handle) {}
  c10::OperatorHandle op;
  std::vector<c10::IValue> args;
  std::vector<int64_t> positions;
  size_t num_outputs = 0;
};

struct Call {
  c10::intrusive_ptr<SavedCall> saved;
  variable_list outputs;
};

PyObject* to_python(const at::Tensor& t) {
  if (!t.defined()) Py_RETURN_NONE;
  return THPVariable_Wrap(t);
}

// The non-tensor arguments of the ops registered below: None, bool, int, float, int[].
PyObject* to_python(const c10::IValue& v) {
  if (v.isNone()) Py_RETURN_NONE;
  if (v.isBool()) return PyBool_FromLong(v.toBool());
  if (v.isInt()) return PyLong_FromLongLong(v.toInt());
  if (v.isDouble()) return PyFloat_FromDouble(v.toDouble());
  if (v.isIntList()) {
    const auto list = v.toIntList();
    PyObject* out = PyList_New(static_cast<Py_ssize_t>(list.size()));
    for (size_t i = 0; i < list.size(); ++i) PyList_SET_ITEM(out, i, PyLong_FromLongLong(list.get(i)));
    return out;
  }
  TORCH_CHECK(false, "robustkern autograd: an argument of type ", v.tagKind(), " cannot be handed to Python");
}

// robustkern.ops._registry.run_saved_backward, looked up on first use.
PyObject* backward_runner() {
  static PyObject* runner = [] {
    PyObject* module = PyImport_ImportModule("robustkern.ops._registry");
    if (module == nullptr) throw python_error();
    PyObject* fn = PyObject_GetAttrString(module, "run_saved_backward");
    Py_DECREF(module);
    if (fn == nullptr) throw python_error();
    return fn;  // kept for the life of the process
  }();
  return runner;
}

}  // namespace

// The node (its name shows in autograd graphs): forward saves the call, backward runs the op's Python formula.
struct PythonFormulaNode : public torch::autograd::Function<PythonFormulaNode> {
  static variable_list forward(AutogradContext* ctx, const Call& call, const at::TensorList& inputs) {
    variable_list to_save(inputs.begin(), inputs.end());
    to_save.insert(to_save.end(), call.outputs.begin(), call.outputs.end());
    ctx->save_for_backward(std::move(to_save));
    ctx->saved_data["call"] = c10::IValue::make_capsule(call.saved);
    ctx->set_materialize_grads(false);
    return call.outputs;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const auto holder = ctx->saved_data["call"].toCapsule();
    const auto& call = *static_cast<const SavedCall*>(holder.get());
    const size_t num_args = call.args.size();
    const size_t num_inputs = call.positions.size();
    std::vector<bool> needs(num_args, false);
    for (size_t k = 0; k < num_inputs; ++k) needs[call.positions[k]] = ctx->needs_input_grad(k);

    pybind11::gil_scoped_acquire gil;
    PyObject* runner = backward_runner();
    PyObject* py_args = PyTuple_New(static_cast<Py_ssize_t>(num_args));
    for (size_t i = 0, k = 0; i < num_args; ++i) {
      const bool tensor = k < num_inputs && call.positions[k] == static_cast<int64_t>(i);
      PyTuple_SET_ITEM(py_args, i, tensor ? to_python(saved[k++]) : to_python(call.args[i]));
    }
    PyObject* py_outputs = PyTuple_New(static_cast<Py_ssize_t>(call.num_outputs));
    for (size_t j = 0; j < call.num_outputs; ++j) PyTuple_SET_ITEM(py_outputs, j, to_python(saved[num_inputs + j]));
    PyObject* py_grads = PyTuple_New(static_cast<Py_ssize_t>(grads.size()));
    for (size_t j = 0; j < grads.size(); ++j) PyTuple_SET_ITEM(py_grads, j, to_python(grads[j]));
    PyObject* py_needs = PyTuple_New(static_cast<Py_ssize_t>(num_args));
    for (size_t i = 0; i < num_args; ++i) PyTuple_SET_ITEM(py_needs, i, PyBool_FromLong(needs[i]));
    PyObject* py_op = PyUnicode_FromString(call.op.schema().name().c_str());
    PyObject* result = PyObject_CallFunctionObjArgs(runner, py_op, py_args, py_outputs, py_grads, py_needs, nullptr);
    Py_DECREF(py_op);
    Py_DECREF(py_args);
    Py_DECREF(py_outputs);
    Py_DECREF(py_grads);
    Py_DECREF(py_needs);
    if (result == nullptr) throw python_error();

    variable_list out;
    out.reserve(num_inputs + 1);
    out.emplace_back();  // the Call argument has no gradient
    const bool ok = PyTuple_Check(result) && PyTuple_GET_SIZE(result) == static_cast<Py_ssize_t>(num_args);
    for (size_t k = 0; ok && k < num_inputs; ++k) {
      PyObject* g = PyTuple_GET_ITEM(result, call.positions[k]);
      if (g != Py_None && !THPVariable_Check(g)) {
        Py_DECREF(result);
        TORCH_CHECK(false, "robustkern autograd: the backward formula of ", call.op.schema().name(),
                    " returned a non-tensor gradient for argument ", call.positions[k]);
      }
      out.emplace_back(g == Py_None ? at::Tensor() : THPVariable_Unpack(g));
    }
    Py_DECREF(result);
    TORCH_CHECK(ok, "robustkern autograd: the backward formula of ", call.op.schema().name(),
                " must return one gradient (or None) "
                "per argument, ", num_args, " here");
    return out;
  }
};

namespace {

// The Autograd kernel: run the op below autograd; record a PythonFormulaNode when a gradient is to be recorded.
void autograd_kernel(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  const auto& schema = op.schema();
  const size_t num_args = schema.arguments().size();
  const size_t num_outputs = schema.returns().size();
  auto args = torch::jit::last(*stack, num_args);
  std::vector<at::Tensor> inputs;
  std::vector<int64_t> positions;
  bool requires_grad = false;
  for (size_t i = 0; i < num_args; ++i) {
    if (args[i].isTensor()) {
      inputs.push_back(args[i].toTensor());
      positions.push_back(static_cast<int64_t>(i));
      requires_grad = requires_grad || inputs.back().requires_grad();
    }
  }
  const bool record = requires_grad && at::GradMode::is_enabled();
  c10::intrusive_ptr<SavedCall> saved;
  if (record) {
    saved = c10::make_intrusive<SavedCall>(op);
    saved->args.reserve(num_args);
    for (size_t i = 0; i < num_args; ++i) saved->args.push_back(args[i].isTensor() ? c10::IValue() : args[i]);
    saved->positions = positions;
    saved->num_outputs = num_outputs;
  }
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
  }
  if (!record) return;
  Call call{std::move(saved), {}};
  call.outputs.reserve(num_outputs);
  for (const auto& v : torch::jit::last(*stack, num_outputs)) call.outputs.push_back(v.toTensor());
  variable_list outputs = PythonFormulaNode::apply(call, at::TensorList(inputs));
  torch::jit::drop(*stack, num_outputs);
  for (auto& t : outputs) stack->emplace_back(std::move(t));
}

}  // namespace

TORCH_LIBRARY_IMPL(robustkern, Autograd, m) {
  for (const char* name : {"interval_linear", "interval_conv2d", "interval_affine", "interval_input_box"}) {
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&autograd_kernel>());
  }
}

}  // namespace robustkern
