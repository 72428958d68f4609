// CPU element-wise stages of the interval ops (GEMMs and convolutions are ATen's: MKL / oneDNN) and their
// registration. Each stage is one pass over memory, split across threads with at::parallel_for; the inner
// loops are plain loops over contiguous memory that the compiler vectorises (no -ffast-math: the
// rounding-error bounds need IEEE arithmetic).
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "robustkern/dispatch.h"
#include "robustkern/interval.h"
#include "robustkern/interval_math.h"

namespace robustkern {
namespace {

constexpr int64_t kGrain = 32768;  // elements per task

template <typename T>
void pre_product_cpu(const PreProduct<T>& p) {
  at::parallel_for(0, p.n, kGrain, [&](int64_t begin, int64_t end) {
    const T* __restrict__ mid = p.mid;
    const T* __restrict__ rad = p.rad;
    T* __restrict__ s = p.s;
    const T two_e = p.two_e;
    for (int64_t i = begin; i < end; ++i) s[i] = pre_product(mid[i], rad[i], two_e);
  });
}

// One element: (m, r) -> the widened GEMM box, written back in place (gemm), and the epilogue's box.
template <typename T, bool kSound, bool kGemm, bool kAddBias, bool kAffine, bool kRelu>
struct EpilogueStep {
  static constexpr bool kReadsScale = kAffine;

  T* __restrict__ m;
  T* __restrict__ r;
  T* __restrict__ out_mid;
  T* __restrict__ out_rad;
  Widening<T> w;

  inline void operator()(int64_t i, T a, T c, T b) const {
    T mi = m[i];
    T ri = r[i];
    if constexpr (kGemm) {
      gemm_widen<T, kSound>(mi, ri, b, kAddBias, w);
      if constexpr (kAddBias) m[i] = mi;
      if constexpr (kSound) r[i] = ri;
    }
    if constexpr (kAffine || kRelu) {
      affine_relu<T, kSound, kAffine, kRelu>(mi, ri, a, c, w);
      out_mid[i] = mi;
      out_rad[i] = ri;
    }
  }
};

// Walks [begin, end) of the [outer][channels][inner] layout in runs of one channel (inner > 1) or one row
// of channels (inner == 1), so that the innermost loop is a plain loop over contiguous memory.
template <typename T, typename Step>
void box_epilogue_range(const BoxEpilogue<T>& p, const Step& step, int64_t begin, int64_t end) {
  constexpr bool kScale = Step::kReadsScale;
  const int64_t C = p.layout.channels;
  const int64_t inner = p.layout.inner;
  const T* __restrict__ scale = p.scale;
  const T* __restrict__ shift = p.shift;
  const T one(1), zero(0);
  int64_t i = begin;
  while (i < end) {
    if (inner == 1) {  // rows of C channels: scale / shift / bias vary along the run
      const int64_t row = i / C;
      const int64_t stop = std::min(end, (row + 1) * C);
      const int64_t offset = row * C;  // index of channel 0 of this row
      const T* __restrict__ bias = p.bias != nullptr ? p.bias + row * p.bias_row_stride : nullptr;
      const auto run = [&](auto has_bias) {
        constexpr bool kBias = decltype(has_bias)::value;
        // omp simd: the iterations are independent; without it the compiler must assume that the stores
        // to the box may alias the per-channel constants read along the run, and keeps the loop scalar
        // (channels-last boxes take this path: it ran ~4x slower than the channel-plane path below).
#pragma omp simd
        for (int64_t j = i; j < stop; ++j) {
          const int64_t c = j - offset;
          step(j, kScale ? scale[c] : one, kScale ? shift[c] : zero, kBias ? bias[c] : zero);
        }
      };
      bool_switch(bias != nullptr, run);
      i = stop;
    } else {  // one channel plane: the constants are fixed along the run
      const int64_t plane = i / inner;
      const int64_t c = plane % C;
      const int64_t stop = std::min(end, (plane + 1) * inner);
      const T a = kScale ? scale[c] : one;
      const T sh = kScale ? shift[c] : zero;
      const T b = p.bias != nullptr ? p.bias[(plane / C) * p.bias_row_stride + c] : zero;
#pragma omp simd
      for (int64_t j = i; j < stop; ++j) step(j, a, sh, b);
      i = stop;
    }
  }
}

template <typename T, bool kSound, bool kGemm, bool kAddBias, bool kAffine, bool kRelu>
void box_epilogue_typed(const BoxEpilogue<T>& p) {
  const EpilogueStep<T, kSound, kGemm, kAddBias, kAffine, kRelu> step{p.m, p.r, p.out_mid, p.out_rad, p.w};
  at::parallel_for(0, p.layout.numel(), kGrain,
                   [&](int64_t begin, int64_t end) { box_epilogue_range(p, step, begin, end); });
}

template <typename T>
void box_epilogue_cpu(const BoxEpilogue<T>& p) {
  epilogue_switch(p, [&](auto sound, auto gemm, auto add_bias, auto affine, auto relu) {
    box_epilogue_typed<T, decltype(sound)::value, decltype(gemm)::value, decltype(add_bias)::value,
                       decltype(affine)::value, decltype(relu)::value>(p);
  });
}

template <typename T, bool kSound>
void input_box_typed(const InputBox<T>& p) {
  at::parallel_for(0, p.rows * p.inner, kGrain, [&](int64_t begin, int64_t end) {
    const T* __restrict__ x = p.x;
    T* __restrict__ mid = p.mid;
    T* __restrict__ rad = p.rad;
    const Widening<T> w = p.w;
    int64_t i = begin;
    while (i < end) {
      const int64_t row = i / p.inner;
      const int64_t stop = std::min(end, (row + 1) * p.inner);
      const T eps = p.eps[row * p.eps_stride];
      for (int64_t j = i; j < stop; ++j) input_box<T, kSound>(x[j], eps, p.x_min, p.x_max, w, mid[j], rad[j]);
      i = stop;
    }
  });
}

template <typename T>
void input_box_cpu(const InputBox<T>& p) {
  bool_switch(p.sound, [&](auto sound) { input_box_typed<T, decltype(sound)::value>(p); });
}

const IntervalKernels& cpu_kernels() {
  static const IntervalKernels kernels{
      {&pre_product_cpu<float>, &box_epilogue_cpu<float>, &input_box_cpu<float>},
      {&pre_product_cpu<double>, &box_epilogue_cpu<double>, &input_box_cpu<double>},
  };
  return kernels;
}

BoxWithPre interval_linear_cpu(const at::Tensor& mid, const at::Tensor& rad, const at::Tensor& weight,
                               const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& scale,
                               const std::optional<at::Tensor>& shift, bool relu, bool sound) {
  return interval_linear(mid, rad, weight, bias, scale, shift, relu, sound, cpu_kernels());
}

BoxWithPre interval_conv2d_cpu(const at::Tensor& mid, const at::Tensor& rad, const at::Tensor& weight,
                               const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                               at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                               const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& shift,
                               bool relu, bool sound) {
  return interval_conv2d(mid, rad, weight, bias, stride, padding, dilation, groups, scale, shift, relu, sound,
                         cpu_kernels());
}

Box interval_affine_cpu(const at::Tensor& mid, const at::Tensor& rad, const std::optional<at::Tensor>& scale,
                        const std::optional<at::Tensor>& shift, bool relu, bool sound) {
  return interval_affine(mid, rad, scale, shift, relu, sound, cpu_kernels());
}

Box interval_input_box_cpu(const at::Tensor& x, const at::Tensor& eps, double x_min, double x_max, bool sound) {
  return interval_input_box(x, eps, x_min, x_max, sound, cpu_kernels());
}

}  // namespace

// Registers the CPU implementations.
TORCH_LIBRARY_IMPL(robustkern, CPU, m) {
  m.impl("interval_linear", &interval_linear_cpu);
  m.impl("interval_conv2d", &interval_conv2d_cpu);
  m.impl("interval_affine", &interval_affine_cpu);
  m.impl("interval_input_box", &interval_input_box_cpu);
}

}  // namespace robustkern
