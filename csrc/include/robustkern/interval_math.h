// Element-wise interval (IBP) arithmetic shared by the CPU and CUDA kernels.
//
// No torch headers: this file is compiled by plain `nvcc -c` as well as by the host compiler. The math is
// the contract of robustkern/reference/interval.py, step for step and in the same order of operations, so
// that the CPU kernels reproduce the reference bit for bit:
//
//   pre-product   s   = rad + 2e |mid|                                  (e = gamma_{K+2}, sound only)
//   after a GEMM  m   = m + b                                           (when the GEMM did not add b)
//                 r   = (r (1 + 3e) + K tiny) + 2e |b|                  (sound only)
//   affine        m1  = m a + c,  r1 = r |a|
//                 r1 += 4u (|m a| + r1 + |c|) + tiny                    (sound only)
//   ReLU          lo, hi = relu(m - r), relu(m + r);  m2 = (hi + lo)/2,  r2 = (hi - lo)/2
//                 r2 += 4u (|m| + r) + tiny                             (sound only)
//   input box     lo = max(x - eps, x_min),  hi = min(x + eps, x_max);  mid = (lo + hi)/2,  rad = (hi - lo)/2
//                 rad += 4u (|mid| + rad) + tiny                        (sound only)
//
// An absent scale is 1 and an absent shift 0: both give exactly the reference's result (x * 1 and x + 0
// are exact; only the sign of a zero centre can differ). Contraction into fused multiply-adds (nvcc's
// default) changes results by rounding only and keeps every bound sound: an FMA rounds once where the
// separate operations round twice.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define RK_HOST_DEVICE __host__ __device__
#else
#define RK_HOST_DEVICE
#endif

namespace robustkern {

RK_HOST_DEVICE inline float abs_(float x) { return fabsf(x); }
RK_HOST_DEVICE inline double abs_(double x) { return fabs(x); }

// max(x, 0) that keeps NaN as NaN (a NaN bound must never become 0).
template <typename T>
RK_HOST_DEVICE inline T relu_nan(T x) {
  return x < T(0) ? T(0) : x;
}

// Rounding-error constants of one op, already rounded to T exactly as the reference rounds its Python
// floats when it multiplies a tensor of dtype T by them.
template <typename T>
struct Widening {
  T two_e;   // 2 gamma_{K+2}
  T grow;    // 1 + 3 gamma_{K+2}
  T k_tiny;  // K * smallest normal number
  T four_u;  // 4 * unit roundoff
  T tiny;    // smallest normal number
};

// Dense tensor with a channel axis, seen as [outer][channels][inner] in memory order. Contiguous (B, C, ...)
// has inner = prod(spatial); channels-last and (B, C) have inner = 1 and outer = numel / C.
struct ChannelLayout {
  int64_t outer;
  int64_t channels;
  int64_t inner;
  RK_HOST_DEVICE int64_t numel() const { return outer * channels * inner; }
};

// Stage before a GEMM: s = rad + 2e |mid| over n elements of equally strided, dense tensors.
template <typename T>
struct PreProduct {
  const T* mid;
  const T* rad;
  T* s;
  int64_t n;
  T two_e;
};

// The element-wise stage after a GEMM (gemm = true) or on its own (interval_affine, gemm = false).
//   gemm:      m, r are the GEMM outputs, updated in place to the widened box (pre_mid, pre_rad); when the
//              op has an epilogue, its result goes to out_mid / out_rad.
//   not gemm:  out = epilogue(m, r); m and r are only read.
// scale, shift: per channel, never null (the glue passes ones / zeros for an absent one).
// bias: per channel (bias_row_stride = 0) or per row of a (B, N) output (bias_row_stride = N); null = none.
template <typename T>
struct BoxEpilogue {
  T* m;
  T* r;
  T* out_mid;
  T* out_rad;
  const T* bias;
  int64_t bias_row_stride;
  const T* scale;
  const T* shift;
  ChannelLayout layout;
  bool gemm;      // widen the GEMM result (when sound) and write it back in place
  bool add_bias;  // add bias to m (the GEMM did not)
  bool affine;    // apply scale / shift
  bool relu;      // apply ReLU
  bool sound;     // add the rounding-error terms
  Widening<T> w;
};

// interval_input_box over x seen as (rows, inner), eps per row (eps_stride 1) or one for all (0).
template <typename T>
struct InputBox {
  const T* x;
  const T* eps;
  int64_t eps_stride;
  T* mid;
  T* rad;
  int64_t rows;
  int64_t inner;
  T x_min;
  T x_max;
  bool sound;
  Widening<T> w;
};

template <typename T>
RK_HOST_DEVICE inline T pre_product(T mid, T rad, T two_e) {
  return rad + two_e * abs_(mid);
}

// The GEMM's result widened by its rounding error; b is the bias (0 when there is none).
template <typename T, bool kSound>
RK_HOST_DEVICE inline void gemm_widen(T& m, T& r, T b, bool add_bias, const Widening<T>& w) {
  if (add_bias) m = m + b;
  if (kSound) r = (r * w.grow + w.k_tiny) + w.two_e * abs_(b);
}

// Per-channel affine y = a x + c, then optionally ReLU, on the box (m, r).
template <typename T, bool kSound, bool kAffine, bool kRelu>
RK_HOST_DEVICE inline void affine_relu(T& m, T& r, T a, T c, const Widening<T>& w) {
  if (kAffine) {
    const T am = m * a;
    T r1 = r * abs_(a);
    if (kSound) r1 = (r1 + w.four_u * ((abs_(am) + r1) + abs_(c))) + w.tiny;
    m = am + c;
    r = r1;
  }
  if (kRelu) {
    const T lo = relu_nan(m - r);
    const T hi = relu_nan(m + r);
    T r2 = (hi - lo) * T(0.5);
    if (kSound) r2 = (r2 + w.four_u * (abs_(m) + r)) + w.tiny;
    m = (hi + lo) * T(0.5);
    r = r2;
  }
}

template <typename T, bool kSound>
RK_HOST_DEVICE inline void input_box(T x, T eps, T x_min, T x_max, const Widening<T>& w, T& mid, T& rad) {
  T lo = x - eps;
  T hi = x + eps;
  lo = lo < x_min ? x_min : lo;  // NaN stays NaN, as torch.clamp
  hi = hi > x_max ? x_max : hi;
  mid = (lo + hi) * T(0.5);
  rad = (hi - lo) * T(0.5);
  if (kSound) rad = (rad + w.four_u * (abs_(mid) + rad)) + w.tiny;
}

}  // namespace robustkern
