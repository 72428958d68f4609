// CPU kernel of the projected-gradient attack step robustkern::pgd_step (Madry et al. 2018, Eq. 2; the L2
// variant as torchattacks' PGDL2), the same function as robustkern/reference/attacks.py pgd_step. Per row b
// (example) with radius e = eps[b] and step a = alpha[b], in the input precision T (float or double):
//
//   L-inf:  s = (g > 0) - (g < 0)                                   (torch.sign: sign(0) = sign(NaN) = 0)
//           y = x + a s;  y = min(max(y, x0 - e), x0 + e);  out = clamp(y, 0, 1)
//   L2:     gn = |g|_2 + 1e-10;  d = (x + a (g / gn)) - x0;  out = clamp(x0 + d f, 0, 1),
//           f = e / |d|_2 if |d|_2 > e else 1
//
// L-inf is element-wise: one pass over the flattened batch (split across threads with at::parallel_for, a
// task covering whole or partial rows), reading x, g, x0 once and writing out once. The loops are plain C++
// that GCC vectorises (-O3, omp simd), compiled twice: for the x86-64 baseline and, selected at run time,
// for AVX2 (about 2x faster here; the portable_simd option forces the baseline). Each operation is the
// reference's, in its order, and each max / min / clamp propagates NaN as torch.maximum / minimum / clamp do
// (ties of +0 and -0 as below), so the result is bit-identical to the reference in float32 and float64 (NaN
// payloads aside): a s is exact (s in {-1, 0, 1}), so even a fused multiply-add cannot change x + a s. This
// file is compiled without -ffast-math, and neither copy enables FMA.
//
// L2 needs |g| before d exists, and |d| before anything can be written: per row (rows split across threads)
// pass 1 sums g^2, pass 2 forms d element-wise exactly as the reference, stores it into out and sums d^2,
// pass 3 rescales out in place and clamps. A row (784 values for MNIST, 3072 for CIFAR) stays in the L1/L2
// cache between passes, so this reads no more memory than a two-pass scheme expanding
// |d|^2 = |x - x0|^2 + 2c <x - x0, g> + c^2 |g|^2 (c = a / gn) would, and it avoids that expansion's
// cancellation when d is small (e.g. eps = 0 must give x0 whenever d != 0). As in torch.linalg.vector_norm,
// the squares are taken in T and the norm is the square root in T of the sum rounded to T, so a float32 sum of
// squares above FLT_MAX gives an infinite norm and squares that underflow in T count 0, as in the reference;
// the sum itself runs in double in several lanes (omp simd reductions) where torch sums in T, so
// |g| and |d| differ from the reference's by rounding only: L2 results agree to a few ulps, not bitwise.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>

#include "robustkern/check.h"
#include "robustkern/options.h"

namespace robustkern {
namespace {

constexpr double kL2DivEps = 1e-10;  // robustkern.reference.attacks.L2_DIV_EPS (torchattacks' PGDL2)
constexpr int64_t kGrain = 32768;    // elements per parallel task

#if (defined(__x86_64__) || defined(_M_X64)) && defined(__GNUC__)
#define RK_X86_AVX2 1
#define RK_TARGET_AVX2 __attribute__((target("avx2")))
#else
#define RK_X86_AVX2 0
#define RK_TARGET_AVX2
#endif
#define RK_INLINE __attribute__((always_inline)) inline

// torch.maximum(a, b) / torch.minimum(a, b) as ATen's vectorised loop computes them (x86 max / min plus a NaN
// mask): a NaN in either operand gives NaN; when the two compare equal (+0 and -0) the second operand. ATen's
// scalar remainder loop (the last < 2 vector widths of elements) returns the first operand there instead, so
// only the sign of a zero result can differ from the reference, and only at those positions.
template <typename T>
RK_INLINE T max_nan(T a, T b) {
  return (a > b || a != a) ? a : b;
}
template <typename T>
RK_INLINE T min_nan(T a, T b) {
  return (a < b || a != a) ? a : b;
}
// clamp(y, 0, 1): NaN stays NaN
template <typename T>
RK_INLINE T clamp01(T y) {
  y = (y < T(0)) ? T(0) : y;
  return (T(1) < y) ? T(1) : y;
}

template <typename T>
struct StepArgs {
  const T* x;      // x_adv (B, n), contiguous
  const T* g;      // grad
  const T* x0;     // x_orig
  const T* eps;    // (B,)
  const T* alpha;  // (B,)
  T* out;          // (B, n)
  int64_t rows, n;
};

// out[i] for i in [begin, end) of row r (all offsets into the flattened batch)
template <typename T>
RK_INLINE void linf_span(const StepArgs<T>& p, int64_t r, int64_t begin, int64_t end) {
  const T a = p.alpha[r], e = p.eps[r];
  const T* __restrict__ x = p.x;
  const T* __restrict__ g = p.g;
  const T* __restrict__ x0 = p.x0;
  T* __restrict__ out = p.out;
#pragma omp simd
  for (int64_t i = begin; i < end; ++i) {
    const T gi = g[i];
    const T s = static_cast<T>(gi > T(0)) - static_cast<T>(gi < T(0));
    T y = x[i] + a * s;
    y = min_nan(max_nan(y, x0[i] - e), x0[i] + e);
    out[i] = clamp01(y);
  }
}

// Rows r of [begin, end) of the flattened batch.
template <typename T>
RK_INLINE void linf_task(const StepArgs<T>& p, int64_t begin, int64_t end) {
  int64_t i = begin;
  while (i < end) {
    const int64_t r = i / p.n;
    const int64_t stop = std::min(end, (r + 1) * p.n);
    linf_span(p, r, i, stop);
    i = stop;
  }
}

template <typename T>
RK_INLINE void l2_row(const StepArgs<T>& p, int64_t r) {
  const int64_t n = p.n, off = r * n;
  const T* __restrict__ x = p.x + off;
  const T* __restrict__ g = p.g + off;
  const T* __restrict__ x0 = p.x0 + off;
  T* __restrict__ out = p.out + off;
  const T a = p.alpha[r], e = p.eps[r];

  double gg = 0;
#pragma omp simd reduction(+ : gg)
  for (int64_t i = 0; i < n; ++i) gg += static_cast<double>(g[i] * g[i]);
  const T gn = std::sqrt(static_cast<T>(gg)) + static_cast<T>(kL2DivEps);

  double dd = 0;
#pragma omp simd reduction(+ : dd)
  for (int64_t i = 0; i < n; ++i) {
    const T d = (x[i] + a * (g[i] / gn)) - x0[i];
    out[i] = d;
    dd += static_cast<double>(d * d);
  }
  const T dn = std::sqrt(static_cast<T>(dd));
  const T f = (dn > e) ? e / dn : T(1);

#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = clamp01(x0[i] + out[i] * f);
}

template <typename T>
RK_INLINE void l2_task(const StepArgs<T>& p, int64_t begin, int64_t end) {
  for (int64_t r = begin; r < end; ++r) l2_row(p, r);
}

// One task of a parallel_for, compiled for the x86-64 baseline (SSE2) and, on x86 with GCC / Clang, for AVX2
// (8 float lanes and blends instead of and / andnot / or); the AVX2 copy runs when the CPU has AVX2. Neither
// enables FMA, so every product and sum rounds as in the reference.
template <typename T, bool kLinf>
void task_baseline(const StepArgs<T>& p, int64_t begin, int64_t end) {
  if constexpr (kLinf) {
    linf_task(p, begin, end);
  } else {
    l2_task(p, begin, end);
  }
}

template <typename T, bool kLinf>
RK_TARGET_AVX2 void task_avx2(const StepArgs<T>& p, int64_t begin, int64_t end) {
  if constexpr (kLinf) {
    linf_task(p, begin, end);
  } else {
    l2_task(p, begin, end);
  }
}

inline bool have_avx2() {
#if RK_X86_AVX2
  static const bool ok = __builtin_cpu_supports("avx2");
  return ok;
#else
  return false;
#endif
}

// cpu_options().portable_simd forces the baseline copy (tests compare the two on the same machine).
inline bool portable_forced() { return robustkern::cpu_options().portable_simd.load(std::memory_order_relaxed); }

template <typename T, bool kLinf>
void launch(const StepArgs<T>& p) {
  auto* task = have_avx2() && !portable_forced() ? &task_avx2<T, kLinf> : &task_baseline<T, kLinf>;
  // L-inf: tasks of kGrain elements (whole or partial rows); L2: of whole rows, about kGrain elements.
  const int64_t end = kLinf ? p.rows * p.n : p.rows;
  const int64_t grain = kLinf ? kGrain : std::max<int64_t>(1, kGrain / std::max<int64_t>(1, p.n));
  at::parallel_for(0, end, grain, [&](int64_t begin, int64_t stop) { task(p, begin, stop); });
}

at::Tensor pgd_step_cpu(const at::Tensor& x_adv, const at::Tensor& grad, const at::Tensor& x_orig,
                        const at::Tensor& eps, const at::Tensor& alpha, c10::string_view norm) {
  constexpr const char* op = "pgd_step";
  const bool linf = norm == "linf";
  TORCH_CHECK(linf || norm == "l2", op, ": norm must be 'linf' or 'l2', got '", norm, "'");
  CHECK_FLOATING(op, x_adv);
  TORCH_CHECK(x_adv.dim() >= 1, op, ": inputs need a batch dimension, got a 0-d x_adv");
  CHECK_DEVICE_TYPE(op, x_adv, at::kCPU);
  CHECK_LIKE(op, grad, x_adv);
  CHECK_LIKE(op, x_orig, x_adv);
  CHECK_LIKE(op, eps, x_adv);
  CHECK_LIKE(op, alpha, x_adv);
  CHECK_SAME_SHAPE(op, grad, x_adv);
  CHECK_SAME_SHAPE(op, x_orig, x_adv);
  const int64_t rows = x_adv.size(0);
  CHECK_SHAPE(op, eps, rows);
  CHECK_SHAPE(op, alpha, rows);

  at::Tensor out = at::empty(x_adv.sizes(), x_adv.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  const at::Tensor xc = x_adv.contiguous(), gc = grad.contiguous(), x0c = x_orig.contiguous();
  const at::Tensor ec = eps.contiguous(), ac = alpha.contiguous();
  AT_DISPATCH_FLOATING_TYPES(x_adv.scalar_type(), "pgd_step_cpu", [&] {
    StepArgs<scalar_t> p{xc.data_ptr<scalar_t>(), gc.data_ptr<scalar_t>(), x0c.data_ptr<scalar_t>(),
                         ec.data_ptr<scalar_t>(), ac.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                         rows, out.numel() / rows};
    if (linf) {
      launch<scalar_t, true>(p);
    } else {
      launch<scalar_t, false>(p);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(robustkern, CPU, m) { m.impl("pgd_step", &pgd_step_cpu); }

}  // namespace robustkern
