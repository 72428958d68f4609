// Every schema of the robustkern ops that have C++ kernels, once. The kernels are registered per device in
// csrc/cpu/*_cpu.cpp (CPU) and csrc/cuda/*_glue.cpp (CUDA). Their fake (meta) kernels and autograd formulas are
// written in Python beside the public functions (robustkern/ops/<family>.py) and registered through the op table
// robustkern/ops/_registry.py, which also holds the ops that have no C++ kernel (Triton and reference only); the
// Autograd kernel of the ops whose table entry declares `keeps` is csrc/autograd.cpp, a C++ node that runs the
// Python formula.
#include <Python.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>

#include "robustkern/options.h"

#ifndef ROBUSTKERN_WITH_CUDA
#define ROBUSTKERN_WITH_CUDA 0
#endif

extern "C" {
// `import robustkern._C` only loads this library, which runs the registrations below; no Python API.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",  // name
      nullptr,  // documentation
      -1,  // no per-interpreter state
      nullptr,  // methods
      nullptr,  // slots
      nullptr,  // traverse
      nullptr,  // clear
      nullptr,  // free
  };
  return PyModule_Create(&module_def);
}
}

namespace {

// The device kernels compiled in, comma-separated: "cpu" or "cpu,cuda".
std::string build_info() { return ROBUSTKERN_WITH_CUDA ? "cpu,cuda" : "cpu"; }

// Set the CPU kernels' process-wide options that are given (robustkern/options.h); returns the previous values.
std::tuple<bool, bool> cpu_options(std::optional<bool> portable_simd, std::optional<bool> huge_pages) {
  auto& o = robustkern::cpu_options();
  const std::tuple<bool, bool> before{o.portable_simd.load(), o.huge_pages.load()};
  if (portable_simd) o.portable_simd.store(*portable_simd);
  if (huge_pages) o.huge_pages.store(*huge_pages);
  return before;
}

}  // namespace

// Defines the operators.
TORCH_LIBRARY(robustkern, m) {
  m.def(
      "interval_linear(Tensor mid, Tensor rad, Tensor weight, Tensor? bias, Tensor? scale, Tensor? shift, "
      "bool relu, bool sound) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "interval_conv2d(Tensor mid, Tensor rad, Tensor weight, Tensor? bias, int[] stride, int[] padding, "
      "int[] dilation, int groups, Tensor? scale, Tensor? shift, bool relu, bool sound) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "interval_affine(Tensor mid, Tensor rad, Tensor? scale, Tensor? shift, bool relu, bool sound) "
      "-> (Tensor, Tensor)");
  m.def("interval_input_box(Tensor x, Tensor eps, float x_min, float x_max, bool sound) -> (Tensor, Tensor)");
  m.def(
      "interval_epilogue_backward(Tensor pm, Tensor pr, Tensor? scale, Tensor? shift, bool relu, Tensor gm, "
      "Tensor gr) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "smoothing_noise(Tensor x, Tensor src, Tensor counter, Tensor seed, float sigma, Tensor? mean, "
      "Tensor? std, ScalarType out_dtype) -> Tensor");
  m.def("crown_relu_backward(Tensor A, Tensor lower, Tensor upper, int mode, bool upper_side) -> (Tensor, Tensor)");
  m.def(
      "crown_relu_backward_grad(Tensor A, Tensor lower, Tensor upper, int mode, bool upper_side, Tensor g_A, "
      "Tensor g_bias, bool need_lu) -> (Tensor, Tensor, Tensor)");
  m.def(
      "crown_concretize(Tensor A, Tensor bias, Tensor mid, Tensor rad, Tensor? center, Tensor? eps, "
      "bool upper_side) -> Tensor");
  m.def("crown_concretize_grad(Tensor A, Tensor mid, Tensor rad, Tensor g, bool upper_side) -> (Tensor, Tensor, Tensor)");
  m.def("smoothing_count(Tensor logits, Tensor group, int num_groups) -> Tensor");
  m.def("pgd_step(Tensor x_adv, Tensor grad, Tensor x_orig, Tensor eps, Tensor alpha, str norm) -> Tensor");
  m.def("build_info() -> str", &build_info);
  m.def("cpu_options(bool? portable_simd=None, bool? huge_pages=None) -> (bool, bool)", &cpu_options);
}
