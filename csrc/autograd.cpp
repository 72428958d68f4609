// The Autograd kernel of the robustkern ops whose derivative is recorded in C++: a C++ autograd node around the
// chosen kernel, whose backward runs the op's one derivative formula, the Python one beside the op
// (robustkern/ops/<family>.py; no second copy of the math here).
//
// A Python torch.autograd.Function costs 5-9 us per call on the CPU before its forward does any work; this node
// 1-2 us (benchmarks/bench_dispatch.py). The op table (robustkern/ops/_registry.py) attaches the kernel to an op
// with attach_formula_node, naming the tensor arguments and outputs the op's formula reads. The kernel runs the op
// below autograd and, when a gradient is to be recorded, makes a node that keeps those (version-checked
// SavedVariables), the shape, dtype and device of the other tensors, and the other arguments. Its backward hands
// them, with the output gradients and which input gradients are needed, to
// robustkern.ops._registry.run_saved_backward, which runs the op's setup_context and backward as
// torch.library.register_autograd would: the same formula, and under create_graph its differentiable operations
// are recorded, so double backward works.
#include <Python.h>

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>
#include <torch/csrc/DynamicTypes.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/utils/pybind.h>
#include <torch/library.h>

#include <limits>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace robustkern {
namespace {

using torch::autograd::variable_list;

PyObject* to_python(const at::Tensor& t) {
  if (!t.defined()) Py_RETURN_NONE;
  return THPVariable_Wrap(t);
}

// The non-tensor arguments of the ops registered below: None, bool, int, float, str, ScalarType, int[].
PyObject* to_python(const c10::IValue& v) {
  if (v.isNone()) Py_RETURN_NONE;
  if (v.isBool()) return PyBool_FromLong(v.toBool());
  if (v.isInt()) return PyLong_FromLongLong(v.toInt());
  if (v.isString()) return PyUnicode_FromString(v.toStringRef().c_str());
  if (v.isDouble()) return PyFloat_FromDouble(v.toDouble());
  if (v.isIntList()) {
    const auto list = v.toIntList();
    PyObject* out = PyList_New(static_cast<Py_ssize_t>(list.size()));
    for (size_t i = 0; i < list.size(); ++i) PyList_SET_ITEM(out, i, PyLong_FromLongLong(list.get(i)));
    return out;
  }
  TORCH_CHECK(false, "robustkern autograd: an argument of type ", v.tagKind(), " cannot be handed to Python");
}

// An argument as the op's Python formula receives it: a ScalarType (an int in a boxed call) as a torch.dtype.
PyObject* to_python(const c10::IValue& v, const c10::Argument& arg) {
  if (v.isInt() && arg.type()->kind() == c10::TypeKind::ScalarTypeType) {
    PyObject* dtype = reinterpret_cast<PyObject*>(torch::getTHPDtype(static_cast<at::ScalarType>(v.toInt())));
    Py_INCREF(dtype);
    return dtype;
  }
  return to_python(v);
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

// The autograd node pointer type of the torch this is built against (std::shared_ptr before torch 2.13,
// c10::intrusive_ptr since), and a new node of type T.
using NodePtr = decltype(torch::autograd::Edge::function);

template <typename T, typename... Args>
NodePtr make_node(Args&&... args) {
  if constexpr (std::is_same_v<NodePtr, std::shared_ptr<torch::autograd::Node>>) {
    return std::make_shared<T>(std::forward<Args>(args)...);
  } else {
    return c10::make_intrusive<T>(std::forward<Args>(args)...);
  }
}

}  // namespace

// The node (its name shows in autograd graphs): it keeps the call (the op, its non-tensor arguments, the tensor
// arguments and outputs its formula reads, as version-checked SavedVariables, and the shape, dtype and device of
// the others); backward runs the op's Python formula. Written as a torch::autograd::Node directly, as torch's
// generated nodes are: no AutogradContext, no saved_data map, no output wrapping pass.
struct PythonFormulaNode final : public torch::autograd::Node {
  // One tensor argument or output: kept (its SavedVariable), or only described (a stand-in is handed to the
  // formula: one NaN element of the same dtype and device expanded to the same shape, so a formula that read a
  // tensor it did not declare would give NaN gradients, which the tests catch).
  struct Slot {
    torch::autograd::SavedVariable saved;
    std::vector<int64_t> sizes;
    at::TensorOptions options;
    bool kept = false;

    Slot(const at::Tensor& t, bool keep, bool is_output) : kept(keep) {
      if (keep) {
        saved = torch::autograd::SavedVariable(t, is_output);
      } else {
        sizes = t.sizes().vec();
        options = t.options();
      }
    }

    at::Tensor get(const NodePtr& owner) const {
      if (kept) return saved.unpack(owner);
      const double nan = std::numeric_limits<double>::quiet_NaN();
      const auto stand_in = at::isFloatingType(options.dtype().toScalarType()) ? at::full({1}, nan, options)
                                                                                : at::zeros({1}, options);
      return stand_in.expand(sizes);
    }
  };

  PythonFormulaNode(const c10::OperatorHandle& handle, torch::autograd::edge_list&& edges)
      : Node(std::move(edges)), op(handle) {}

  std::string name() const override { return "robustkern::PythonFormulaNode"; }

  void release_variables() override {
    for (auto& s : inputs) s.saved.reset_data();
    for (auto& s : outputs) s.saved.reset_data();
  }

  variable_list apply(variable_list&& grads) override;

  c10::OperatorHandle op;
  std::vector<c10::IValue> args;          // the arguments, None where a tensor was
  std::vector<int64_t> positions;         // the argument position of each tensor argument
  std::vector<Slot> inputs;
  std::vector<Slot> outputs;
};

variable_list PythonFormulaNode::apply(variable_list&& grads) {
  const auto& schema = op.schema();
  const size_t num_args = args.size();
  const size_t num_inputs = positions.size();
  const size_t num_outputs = outputs.size();
  const auto self = getptr();
  variable_list saved_in, saved_out;
  saved_in.reserve(num_inputs);
  saved_out.reserve(num_outputs);
  for (const auto& s : inputs) saved_in.push_back(s.get(self));
  for (const auto& s : outputs) saved_out.push_back(s.get(self));
  std::vector<bool> needs(num_args, false);
  for (size_t k = 0; k < num_inputs; ++k) needs[positions[k]] = task_should_compute_output(k);

  pybind11::gil_scoped_acquire gil;
  PyObject* runner = backward_runner();
  PyObject* py_args = PyTuple_New(static_cast<Py_ssize_t>(num_args));
  for (size_t i = 0, k = 0; i < num_args; ++i) {
    const bool tensor = k < num_inputs && positions[k] == static_cast<int64_t>(i);
    PyTuple_SET_ITEM(py_args, i, tensor ? to_python(saved_in[k++]) : to_python(args[i], schema.arguments()[i]));
  }
  PyObject* py_outputs = PyTuple_New(static_cast<Py_ssize_t>(num_outputs));
  for (size_t j = 0; j < num_outputs; ++j) PyTuple_SET_ITEM(py_outputs, j, to_python(saved_out[j]));
  PyObject* py_grads = PyTuple_New(static_cast<Py_ssize_t>(grads.size()));
  for (size_t j = 0; j < grads.size(); ++j) PyTuple_SET_ITEM(py_grads, j, to_python(grads[j]));
  PyObject* py_needs = PyTuple_New(static_cast<Py_ssize_t>(num_args));
  for (size_t i = 0; i < num_args; ++i) PyTuple_SET_ITEM(py_needs, i, PyBool_FromLong(needs[i]));
  PyObject* py_op = PyUnicode_FromString(schema.name().c_str());
  PyObject* result = PyObject_CallFunctionObjArgs(runner, py_op, py_args, py_outputs, py_grads, py_needs, nullptr);
  Py_DECREF(py_op);
  Py_DECREF(py_args);
  Py_DECREF(py_outputs);
  Py_DECREF(py_grads);
  Py_DECREF(py_needs);
  if (result == nullptr) throw python_error();

  variable_list out;
  out.reserve(num_inputs);
  const bool ok = PyTuple_Check(result) && PyTuple_GET_SIZE(result) == static_cast<Py_ssize_t>(num_args);
  for (size_t k = 0; ok && k < num_inputs; ++k) {
    PyObject* g = PyTuple_GET_ITEM(result, positions[k]);
    if (g != Py_None && !THPVariable_Check(g)) {
      Py_DECREF(result);
      TORCH_CHECK(false, "robustkern autograd: the backward formula of ", schema.name(),
                  " returned a non-tensor gradient for argument ", positions[k]);
    }
    out.emplace_back(g == Py_None ? at::Tensor() : THPVariable_Unpack(g));
  }
  Py_DECREF(result);
  TORCH_CHECK(ok, "robustkern autograd: the backward formula of ", schema.name(),
              " must return one gradient (or None) per argument, ", num_args, " here");
  return out;
}

namespace {

// The Autograd kernel of one op: run the op below autograd; record a PythonFormulaNode when a gradient is to be
// recorded, keeping the tensor arguments and outputs that the op's formula reads (keep_args / keep_outputs, by
// argument position and output index).
class FormulaNodeKernel final : public c10::OperatorKernel {
 public:
  FormulaNodeKernel(std::vector<bool> keep_args, std::vector<bool> keep_outputs)
      : keep_args_(std::move(keep_args)), keep_outputs_(std::move(keep_outputs)) {}

  void operator()(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
    const size_t num_args = keep_args_.size();
    const size_t num_outputs = keep_outputs_.size();
    bool record = false;
    if (at::GradMode::is_enabled()) {
      for (const auto& a : torch::jit::last(*stack, num_args)) {
        if (a.isTensor() && a.toTensor().requires_grad()) {
          record = true;
          break;
        }
      }
    }
    if (!record) {
      at::AutoDispatchBelowADInplaceOrView guard;
      op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
      return;
    }
    // the call, before the kernel takes its arguments off the stack
    variable_list tensors;
    std::vector<int64_t> positions;
    std::vector<c10::IValue> args;
    args.reserve(num_args);
    size_t i = 0;
    for (const auto& a : torch::jit::last(*stack, num_args)) {
      if (a.isTensor()) {
        tensors.push_back(a.toTensor());
        positions.push_back(static_cast<int64_t>(i));
        args.emplace_back();
      } else {
        args.push_back(a);
      }
      ++i;
    }
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
    }
    auto node = make_node<PythonFormulaNode>(op, torch::autograd::collect_next_edges(tensors));
    auto* formula = static_cast<PythonFormulaNode*>(node.get());
    formula->args = std::move(args);
    formula->inputs.reserve(tensors.size());
    for (size_t k = 0; k < tensors.size(); ++k) {
      formula->inputs.emplace_back(tensors[k], keep_args_[positions[k]], /*is_output=*/false);
    }
    formula->positions = std::move(positions);
    formula->outputs.reserve(num_outputs);
    size_t j = 0;
    for (auto& v : torch::jit::last(*stack, num_outputs)) {
      const at::Tensor& out = v.toTensor();
      torch::autograd::set_history(out, node);
      formula->outputs.emplace_back(out, keep_outputs_[j++], /*is_output=*/true);
    }
  }

 private:
  std::vector<bool> keep_args_;
  std::vector<bool> keep_outputs_;
};

// Registers the Autograd kernel above for robustkern::<name> (called once per op by the op table,
// robustkern/ops/_registry.py, which declares what each formula keeps). A second call for the same op changes
// nothing.
void attach_formula_node(const std::string& name, const std::vector<int64_t>& keep_args,
                         const std::vector<int64_t>& keep_outputs) {
  static std::mutex mutex;
  static std::vector<std::unique_ptr<torch::Library>> libraries;
  static std::set<std::string> attached;
  std::lock_guard<std::mutex> lock(mutex);
  if (attached.count(name)) return;
  const auto handle = c10::Dispatcher::singleton().findSchemaOrThrow(("robustkern::" + name).c_str(), "");
  const auto& schema = handle.schema();
  std::vector<bool> args(schema.arguments().size(), false), outputs(schema.returns().size(), false);
  for (const int64_t i : keep_args) {
    const bool valid = i >= 0 && i < static_cast<int64_t>(args.size());
    TORCH_CHECK(valid && schema.arguments()[i].type()->isSubtypeOf(*c10::OptionalType::ofTensor()),
                "attach_formula_node: ", name, " has no tensor argument ", i);
    args[i] = true;
  }
  for (const int64_t j : keep_outputs) {
    TORCH_CHECK(j >= 0 && j < static_cast<int64_t>(outputs.size()), "attach_formula_node: ", name,
                " has no output ", j);
    outputs[j] = true;
  }
  auto library = std::make_unique<torch::Library>(torch::Library::IMPL, "robustkern",
                                                  std::make_optional(c10::DispatchKey::Autograd), __FILE__, __LINE__);
  library->impl(name.c_str(), torch::CppFunction::makeFromBoxedFunctor(
                                  std::make_unique<FormulaNodeKernel>(std::move(args), std::move(outputs))));
  libraries.push_back(std::move(library));
  attached.insert(name);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(robustkern, m) {
  m.def("attach_formula_node(str name, int[] keep_args, int[] keep_outputs) -> ()", &attach_formula_node);
}

}  // namespace robustkern
