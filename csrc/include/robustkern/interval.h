// The interval (IBP) ops, written once for every device: argument checks, GEMMs and convolutions through
// ATen (IEEE float32), output allocation. The element-wise stages come from the device's IntervalKernels
// (csrc/cpu/interval_cpu.cpp, csrc/cuda/interval_cuda_glue.cpp). Semantics: robustkern/reference/interval.py.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>
#include <type_traits>

#include "robustkern/interval_math.h"

namespace robustkern {

// One device's element-wise stages for one dtype; each runs on the current stream of its device.
template <typename T>
struct KernelSet {
  void (*pre_product)(const PreProduct<T>&);
  void (*box_epilogue)(const BoxEpilogue<T>&);
  void (*input_box)(const InputBox<T>&);
};

struct IntervalKernels {
  KernelSet<float> f32;
  KernelSet<double> f64;

  template <typename T>
  const KernelSet<T>& get() const {
    if constexpr (std::is_same_v<T, float>) {
      return f32;
    } else {
      return f64;
    }
  }
};

using Box = std::tuple<at::Tensor, at::Tensor>;
// (mid, rad, pre_mid, pre_rad): the box after the epilogue and the box after the GEMM alone; the last two
// are empty tensors when there is no epilogue.
using BoxWithPre = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

BoxWithPre interval_linear(const at::Tensor& mid, const at::Tensor& rad, const at::Tensor& weight,
                           const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& scale,
                           const std::optional<at::Tensor>& shift, bool relu, bool sound,
                           const IntervalKernels& kernels);

BoxWithPre interval_conv2d(const at::Tensor& mid, const at::Tensor& rad, const at::Tensor& weight,
                           const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                           at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                           const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& shift,
                           bool relu, bool sound, const IntervalKernels& kernels);

Box interval_affine(const at::Tensor& mid, const at::Tensor& rad, const std::optional<at::Tensor>& scale,
                    const std::optional<at::Tensor>& shift, bool relu, bool sound,
                    const IntervalKernels& kernels);

Box interval_input_box(const at::Tensor& x, const at::Tensor& eps, double x_min, double x_max, bool sound,
                       const IntervalKernels& kernels);

}  // namespace robustkern
