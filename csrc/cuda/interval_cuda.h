// Launchers of the CUDA element-wise stages of the interval ops. No torch headers: interval_cuda.cu
// compiles with plain `nvcc -c`; the torch glue is interval_cuda_glue.cpp. Each launcher enqueues one
// kernel on `stream` and returns cudaGetLastError().
#pragma once

#include <cuda_runtime_api.h>

#include "robustkern/interval_math.h"

namespace robustkern::cuda {

template <typename T>
cudaError_t launch_pre_product(const PreProduct<T>& p, cudaStream_t stream);

template <typename T>
cudaError_t launch_box_epilogue(const BoxEpilogue<T>& p, cudaStream_t stream);

template <typename T>
cudaError_t launch_input_box(const InputBox<T>& p, cudaStream_t stream);

}  // namespace robustkern::cuda
