// CUDA registration of the interval ops: the shared driver (csrc/interval.cpp: checks, cuBLAS / cuDNN in
// IEEE float32) with the element-wise stages of interval_cuda.cu on the current stream. Compiled only in
// CUDA builds (ROBUSTKERN_WITH_CUDA).
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "interval_cuda.h"
#include "robustkern/check.h"
#include "robustkern/interval.h"

namespace robustkern {
namespace {

template <typename T>
void pre_product_cuda(const PreProduct<T>& p) {
  C10_CUDA_CHECK(cuda::launch_pre_product(p, c10::cuda::getCurrentCUDAStream()));
}

template <typename T>
void box_epilogue_cuda(const BoxEpilogue<T>& p) {
  C10_CUDA_CHECK(cuda::launch_box_epilogue(p, c10::cuda::getCurrentCUDAStream()));
}

template <typename T>
void input_box_cuda(const InputBox<T>& p) {
  C10_CUDA_CHECK(cuda::launch_input_box(p, c10::cuda::getCurrentCUDAStream()));
}

const IntervalKernels& cuda_kernels() {
  static const IntervalKernels kernels{
      {&pre_product_cuda<float>, &box_epilogue_cuda<float>, &input_box_cuda<float>},
      {&pre_product_cuda<double>, &box_epilogue_cuda<double>, &input_box_cuda<double>},
  };
  return kernels;
}

BoxWithPre interval_linear_cuda(const at::Tensor& mid, const at::Tensor& rad, const at::Tensor& weight,
                                const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& scale,
                                const std::optional<at::Tensor>& shift, bool relu, bool sound) {
  CHECK_DEVICE_TYPE("interval_linear", mid, at::kCUDA);
  const c10::cuda::CUDAGuard guard(mid.device());
  return interval_linear(mid, rad, weight, bias, scale, shift, relu, sound, cuda_kernels());
}

BoxWithPre interval_conv2d_cuda(const at::Tensor& mid, const at::Tensor& rad, const at::Tensor& weight,
                                const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                                const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& shift,
                                bool relu, bool sound) {
  CHECK_DEVICE_TYPE("interval_conv2d", mid, at::kCUDA);
  const c10::cuda::CUDAGuard guard(mid.device());
  return interval_conv2d(mid, rad, weight, bias, stride, padding, dilation, groups, scale, shift, relu, sound,
                         cuda_kernels());
}

Box interval_affine_cuda(const at::Tensor& mid, const at::Tensor& rad, const std::optional<at::Tensor>& scale,
                         const std::optional<at::Tensor>& shift, bool relu, bool sound) {
  CHECK_DEVICE_TYPE("interval_affine", mid, at::kCUDA);
  const c10::cuda::CUDAGuard guard(mid.device());
  return interval_affine(mid, rad, scale, shift, relu, sound, cuda_kernels());
}

Box interval_input_box_cuda(const at::Tensor& x, const at::Tensor& eps, double x_min, double x_max,
                            bool sound) {
  CHECK_DEVICE_TYPE("interval_input_box", x, at::kCUDA);
  const c10::cuda::CUDAGuard guard(x.device());
  return interval_input_box(x, eps, x_min, x_max, sound, cuda_kernels());
}

}  // namespace

// Registers the CUDA implementations.
TORCH_LIBRARY_IMPL(robustkern, CUDA, m) {
  m.impl("interval_linear", &interval_linear_cuda);
  m.impl("interval_conv2d", &interval_conv2d_cuda);
  m.impl("interval_affine", &interval_affine_cuda);
  m.impl("interval_input_box", &interval_input_box_cuda);
}

}  // namespace robustkern
