// CUDA element-wise stages of the interval ops: grid-stride loops over memory order, one thread per element,
// the math from robustkern/interval_math.h (shared with the CPU kernels). GEMMs and convolutions are
// cuBLAS / cuDNN through ATen (interval_cuda_glue.cpp). No torch headers; no --use_fast_math (the
// rounding-error bounds need IEEE arithmetic; nvcc's default FMA contraction keeps them, see interval_math.h).
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "interval_cuda.h"
#include "robustkern/dispatch.h"
#include "robustkern/interval_math.h"

namespace robustkern::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = int64_t{1} << 20;  // grid-stride loops cover the rest

unsigned blocks_for(int64_t n) {
  return static_cast<unsigned>(std::min<int64_t>((n + kThreads - 1) / kThreads, kMaxBlocks));
}

__device__ inline int64_t first_index() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}

__device__ inline int64_t grid_stride() { return static_cast<int64_t>(gridDim.x) * blockDim.x; }

template <typename T>
__global__ void pre_product_kernel(const PreProduct<T> p) {
  for (int64_t i = first_index(); i < p.n; i += grid_stride()) p.s[i] = pre_product(p.mid[i], p.rad[i], p.two_e);
}

template <typename T, bool kSound, bool kGemm, bool kAddBias, bool kAffine, bool kRelu>
__global__ void box_epilogue_kernel(const BoxEpilogue<T> p) {
  const int64_t n = p.layout.numel();
  const int64_t C = p.layout.channels;
  const int64_t inner = p.layout.inner;
  for (int64_t i = first_index(); i < n; i += grid_stride()) {
    const int64_t plane = i / inner;
    const int64_t c = plane % C;
    T m = p.m[i];
    T r = p.r[i];
    if constexpr (kGemm) {
      const T b = p.bias != nullptr ? p.bias[(plane / C) * p.bias_row_stride + c] : T(0);
      gemm_widen<T, kSound>(m, r, b, kAddBias, p.w);
      if constexpr (kAddBias) p.m[i] = m;
      if constexpr (kSound) p.r[i] = r;
    }
    if constexpr (kAffine || kRelu) {
      const T a = kAffine ? p.scale[c] : T(1);
      const T sh = kAffine ? p.shift[c] : T(0);
      affine_relu<T, kSound, kAffine, kRelu>(m, r, a, sh, p.w);
      p.out_mid[i] = m;
      p.out_rad[i] = r;
    }
  }
}

template <typename T, bool kSound>
__global__ void input_box_kernel(const InputBox<T> p) {
  const int64_t n = p.rows * p.inner;
  for (int64_t i = first_index(); i < n; i += grid_stride()) {
    const T eps = p.eps[(i / p.inner) * p.eps_stride];
    input_box<T, kSound>(p.x[i], eps, p.x_min, p.x_max, p.w, p.mid[i], p.rad[i]);
  }
}

}  // namespace

template <typename T>
cudaError_t launch_pre_product(const PreProduct<T>& p, cudaStream_t stream) {
  if (p.n > 0) pre_product_kernel<T><<<blocks_for(p.n), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_box_epilogue(const BoxEpilogue<T>& p, cudaStream_t stream) {
  const int64_t n = p.layout.numel();
  if (n == 0) return cudaGetLastError();
  epilogue_switch(p, [&](auto sound, auto gemm, auto add_bias, auto affine, auto relu) {
    box_epilogue_kernel<T, decltype(sound)::value, decltype(gemm)::value, decltype(add_bias)::value,
                        decltype(affine)::value, decltype(relu)::value><<<blocks_for(n), kThreads, 0, stream>>>(p);
  });
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_input_box(const InputBox<T>& p, cudaStream_t stream) {
  const int64_t n = p.rows * p.inner;
  if (n > 0) {
    bool_switch(p.sound, [&](auto sound) {
      input_box_kernel<T, decltype(sound)::value><<<blocks_for(n), kThreads, 0, stream>>>(p);
    });
  }
  return cudaGetLastError();
}

template cudaError_t launch_pre_product<float>(const PreProduct<float>&, cudaStream_t);
template cudaError_t launch_pre_product<double>(const PreProduct<double>&, cudaStream_t);
template cudaError_t launch_box_epilogue<float>(const BoxEpilogue<float>&, cudaStream_t);
template cudaError_t launch_box_epilogue<double>(const BoxEpilogue<double>&, cudaStream_t);
template cudaError_t launch_input_box<float>(const InputBox<float>&, cudaStream_t);
template cudaError_t launch_input_box<double>(const InputBox<double>&, cudaStream_t);

}  // namespace robustkern::cuda
