// Linear-relaxation (CROWN) kernels on the CPU: the fused ReLU step of backward bound propagation, the
// concretisation over the input set, and the backward passes of both (the math, the float64 ground truth:
// robustkern/reference/crown.py; the ops with autograd: robustkern/ops/crown.py).
//
// ReLU relaxation of a pre-activation in [l, u] (L = min(l, 0), U = max(max(u, 0), L + 1e-8)):
//   upper line d_u = U / (U - L), b_u = -L d_u;  lower slope d_l by mode (0 adaptive 1[U > -L], 1 zero
//   1[l >= 0], 2 one 1[u > 0], 3 same-slope d_u).
// crown_relu_backward (A (B, S, N), lower/upper (B, N)): lower side A' = d_l A+ + d_u A-, bias = sum A- b_u;
//   upper side A' = d_u A+ + d_l A-, bias = sum A+ b_u. Per example the slopes are computed once (B x N), then
//   every row (b, s) is one pass: A' and the row's bias sum.
// crown_relu_backward_grad: given g_A' and g_bias, grad_A = g_A' d(A) + g_bias b(A) (the slopes each entry
//   took) and, when asked, the gradients of lower/upper through d_u(l, u), b_u(l, u) (and d_l = d_u in
//   mode 3); the other lower slopes are piecewise constant. One pass per (example, block of N): the sums over
//   S of g_A' A and g_bias A by sign stay in registers/local buffers, the slopes are recomputed from (l, u).
// crown_concretize: A mid + bias -/+ |A| rad over the box and, with (center, eps), also A center + bias -/+
//   eps ||A||_2 over the L2 ball, the tighter of the two; one pass per row, sums in double.
// crown_concretize_grad (box only): grad_A = g (mid +/- sign(A) rad), g_mid = sum_S g A, g_rad = +/- sum_S g |A|.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros_like.h>
#include <ATen/AccumulateType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "robustkern/alloc.h"
#include "robustkern/check.h"

namespace {

constexpr int64_t kBlock = 2048;  // entries of N per task in the blocked passes

// The relaxation of one neuron: lower slope, upper slope and upper intercept (NaN-propagating like the
// reference's clamp/maximum).
template <typename T>
struct Relaxation {
  T d_l, d_u, b_u;
};

template <typename T, int MODE>
inline Relaxation<T> relax(T l, T u) {
  // min/max in the argument order whose SSE semantics (second operand on NaN) propagate NaN from l, u:
  // branch-free, vectorisable
  const T lm = std::min(l, T(0));
  const T up0 = std::max(u, T(0));
  const T floor = lm + T(1e-8);
  const T up = std::max(up0, floor);
  const T d_u = up / (up - lm);
  const T b_u = -lm * d_u;
  T d_l;
  if constexpr (MODE == 0) {
    d_l = static_cast<T>(up > -lm);
  } else if constexpr (MODE == 1) {
    d_l = static_cast<T>(l >= T(0));
  } else if constexpr (MODE == 2) {
    d_l = static_cast<T>(u > T(0));
  } else {
    d_l = d_u;
  }
  return {d_l, d_u, b_u};
}

// The lower-slope mode as a template parameter (the per-neuron loops then have no branch to vectorise around).
template <typename F>
inline void mode_switch(int64_t mode, F&& f) {
  switch (mode) {
    case 0: f(std::integral_constant<int, 0>{}); break;
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    default: f(std::integral_constant<int, 3>{}); break;
  }
}

void check_relu_args(const char* op, const at::Tensor& A, const at::Tensor& lower, const at::Tensor& upper,
                     int64_t mode) {
  CHECK_FLOATING(op, A);
  CHECK_DIM(op, A, 3);
  CHECK_LIKE(op, lower, A);
  CHECK_LIKE(op, upper, A);
  CHECK_SHAPE(op, lower, A.size(0), A.size(2));
  CHECK_SHAPE(op, upper, A.size(0), A.size(2));
  TORCH_CHECK(mode >= 0 && mode <= 3, op, ": mode must be 0..3, got ", mode);
}

// ------------------------------------------------------------------------------------------- relu step
template <typename T>
void relu_backward_typed(const T* A, const T* lower, const T* upper, int64_t mode, bool upper_side, T* out, T* bias,
                         T* coef, int64_t B, int64_t S, int64_t N) {
  // coef (B, 4, N): slope for A > 0, slope for A <= 0, intercept for A > 0, intercept for A <= 0
  at::parallel_for(0, B * N, 4096, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / N, n = i % N;
      Relaxation<T> r;
      mode_switch(mode, [&](auto m) { r = relax<T, decltype(m)::value>(lower[i], upper[i]); });
      T* c = coef + b * 4 * N + n;
      c[0] = upper_side ? r.d_u : r.d_l;
      c[N] = upper_side ? r.d_l : r.d_u;
      c[2 * N] = upper_side ? r.b_u : T(0);
      c[3 * N] = upper_side ? T(0) : r.b_u;
    }
  });
  using acc_t = at::acc_type<T, false>;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(N, 1));
  at::parallel_for(0, B * S, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t row = r0; row < r1; ++row) {
      const int64_t b = row / S;
      const T* __restrict__ a = A + row * N;
      T* __restrict__ o = out + row * N;
      const T* __restrict__ dp = coef + b * 4 * N;
      const T* __restrict__ dn = dp + N;
      const T* __restrict__ bp = dn + N;
      const T* __restrict__ bn = bp + N;
      acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
      for (int64_t n = 0; n < N; ++n) {
        // branch-free (the signs of A are random: a branch per entry mispredicts half the time)
        const T v = a[n];
        const T pos = std::max(v, T(0)), neg = std::min(v, T(0));
        o[n] = pos * dp[n] + neg * dn[n];
        sum += static_cast<acc_t>(pos * bp[n] + neg * bn[n]);
      }
      bias[row] = static_cast<T>(sum);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> crown_relu_backward_cpu(const at::Tensor& A_in, const at::Tensor& lower_in,
                                                           const at::Tensor& upper_in, int64_t mode,
                                                           bool upper_side) {
  const char* op = "crown_relu_backward";
  check_relu_args(op, A_in, lower_in, upper_in, mode);
  const at::Tensor A = A_in.contiguous(), lower = lower_in.contiguous(), upper = upper_in.contiguous();
  const int64_t B = A.size(0), S = A.size(1), N = A.size(2);
  at::Tensor out = robustkern::empty_huge_like(A);
  at::Tensor bias = at::empty({B, S}, A.options());
  if (B * S == 0) return {out, bias};
  if (N == 0) return {out, bias.zero_()};
  at::Tensor coef = robustkern::empty_huge({B, 4, N}, A.options());
  AT_DISPATCH_FLOATING_TYPES(A.scalar_type(), "crown_relu_backward_cpu", [&] {
    relu_backward_typed<scalar_t>(A.data_ptr<scalar_t>(), lower.data_ptr<scalar_t>(), upper.data_ptr<scalar_t>(),
                                  mode, upper_side, out.data_ptr<scalar_t>(), bias.data_ptr<scalar_t>(),
                                  coef.data_ptr<scalar_t>(), B, S, N);
  });
  return {out, bias};
}

// ------------------------------------------------------------------------------------------- relu step, backward
template <typename T>
void relu_backward_grad_typed(const T* A, const T* lower, const T* upper, int64_t mode, bool upper_side,
                              const T* gA, const T* gb, bool need_lu, T* grad_A, T* grad_l, T* grad_u, int64_t B,
                              int64_t S, int64_t N) {
  using acc_t = at::acc_type<T, false>;
  const int64_t blocks = (N + kBlock - 1) / kBlock;
  at::parallel_for(0, B * blocks, 1, [&](int64_t t0, int64_t t1) {
    std::vector<T> dp(kBlock), dn(kBlock), bp(kBlock), bn(kBlock);
    std::vector<acc_t> s_du(kBlock), s_bu(kBlock), s_dl(kBlock);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / blocks;
      const int64_t n0 = (t % blocks) * kBlock;
      const int64_t len = std::min(kBlock, N - n0);
      const T* lo = lower + b * N + n0;
      const T* hi = upper + b * N + n0;
      mode_switch(mode, [&](auto m) {
        constexpr int M = decltype(m)::value;
        const T up_side = static_cast<T>(upper_side), lo_side = T(1) - up_side;
        T* __restrict__ dpp = dp.data();
        T* __restrict__ dnp = dn.data();
        T* __restrict__ bpp = bp.data();
        T* __restrict__ bnp = bn.data();
#pragma omp simd
        for (int64_t j = 0; j < len; ++j) {
          const Relaxation<T> r = relax<T, M>(lo[j], hi[j]);
          dpp[j] = up_side * r.d_u + lo_side * r.d_l;
          dnp[j] = up_side * r.d_l + lo_side * r.d_u;
          bpp[j] = up_side * r.b_u;
          bnp[j] = lo_side * r.b_u;
        }
      });
      std::fill(s_du.begin(), s_du.begin() + len, acc_t(0));
      std::fill(s_bu.begin(), s_bu.begin() + len, acc_t(0));
      std::fill(s_dl.begin(), s_dl.begin() + len, acc_t(0));
      for (int64_t s = 0; s < S; ++s) {
        const int64_t off = (b * S + s) * N + n0;
        const T* a = A + off;
        const T* g = gA + off;
        T* o = grad_A + off;
        const T gbs = gb[b * S + s];
        const T* dpp = dp.data();
        const T* dnp = dn.data();
        const T* bpp = bp.data();
        const T* bnp = bn.data();
#pragma omp simd
        for (int64_t j = 0; j < len; ++j) {
          // 0/1 masks instead of branches or selects (which gcc leaves as control flow): exact, since one
          // of the two products is zero times a finite slope
          const T pos = static_cast<T>(a[j] > T(0)), neg = T(1) - pos;
          o[j] = g[j] * (pos * dpp[j] + neg * dnp[j]) + gbs * (pos * bpp[j] + neg * bnp[j]);
        }
        if (need_lu) {
          acc_t* du = s_du.data();
          acc_t* bu = s_bu.data();
          acc_t* dl = s_dl.data();
#pragma omp simd
          for (int64_t j = 0; j < len; ++j) {
            const T v = a[j];
            // the entries that took the upper line: A+ on the upper side, A- (A <= 0) on the lower side
            const T pos = static_cast<T>(v > T(0));
            const acc_t on_upper = static_cast<acc_t>(upper_side ? pos : T(1) - pos);
            const acc_t ga = static_cast<acc_t>(g[j] * v);
            du[j] += on_upper * ga;
            bu[j] += on_upper * static_cast<acc_t>(gbs * v);
            dl[j] += (acc_t(1) - on_upper) * ga;
          }
        }
      }
      if (!need_lu) continue;
      T* gl = grad_l + b * N + n0;
      T* gu = grad_u + b * N + n0;
      const T same_slope = static_cast<T>(mode == 3);
#pragma omp simd
      for (int64_t j = 0; j < len; ++j) {
        const T l = lo[j], u = hi[j];
        const T g_du = static_cast<T>(s_du[j]) + same_slope * static_cast<T>(s_dl[j]);
        const T g_bu = static_cast<T>(s_bu[j]);
        // gradients of d_u = U/(U-L), b_u = -L d_u with respect to l, u (ops/crown.py _upper_line_grads)
        const T L = l > T(0) ? T(0) : l;
        const T up0 = u < T(0) ? T(0) : u;
        const T guard = static_cast<T>(up0 < L + T(1e-8));
        const T U = std::max(up0, L + T(1e-8));
        const T den = U - L;
        const T inv = T(1) / (den * den);
        const T d_u = U / den;
        const T gU = g_du * (-L * inv) + g_bu * (L * L * inv);
        const T gL = g_du * (U * inv) + g_bu * (-d_u - L * U * inv) + guard * gU;
        // masks by selection, not multiplication: gU, gL may be inf/NaN where they are masked out
        gu[j] = (guard == T(0) && u > T(0)) ? gU : T(0);
        gl[j] = l < T(0) ? gL : T(0);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> crown_relu_backward_grad_cpu(
    const at::Tensor& A_in, const at::Tensor& lower_in, const at::Tensor& upper_in, int64_t mode, bool upper_side,
    const at::Tensor& g_A_in, const at::Tensor& g_bias_in, bool need_lu) {
  const char* op = "crown_relu_backward_grad";
  check_relu_args(op, A_in, lower_in, upper_in, mode);
  CHECK_LIKE(op, g_A_in, A_in);
  CHECK_LIKE(op, g_bias_in, A_in);
  CHECK_SAME_SHAPE(op, g_A_in, A_in);
  CHECK_SHAPE(op, g_bias_in, A_in.size(0), A_in.size(1));
  const at::Tensor A = A_in.contiguous(), lower = lower_in.contiguous(), upper = upper_in.contiguous();
  const at::Tensor gA = g_A_in.contiguous(), gb = g_bias_in.contiguous();
  const int64_t B = A.size(0), S = A.size(1), N = A.size(2);
  at::Tensor grad_A = robustkern::empty_huge_like(A);
  // without need_lu the gradients of lower/upper are not computed (returned empty)
  at::Tensor grad_l = need_lu ? at::zeros_like(lower) : at::empty({0}, A.options());
  at::Tensor grad_u = need_lu ? at::zeros_like(upper) : at::empty({0}, A.options());
  if (B * N == 0) return {grad_A, grad_l, grad_u};
  AT_DISPATCH_FLOATING_TYPES(A.scalar_type(), "crown_relu_backward_grad_cpu", [&] {
    relu_backward_grad_typed<scalar_t>(
        A.data_ptr<scalar_t>(), lower.data_ptr<scalar_t>(), upper.data_ptr<scalar_t>(), mode, upper_side,
        gA.data_ptr<scalar_t>(), gb.data_ptr<scalar_t>(), need_lu, grad_A.data_ptr<scalar_t>(),
        need_lu ? grad_l.data_ptr<scalar_t>() : nullptr, need_lu ? grad_u.data_ptr<scalar_t>() : nullptr, B, S, N);
  });
  return {grad_A, grad_l, grad_u};
}

// ------------------------------------------------------------------------------------------- concretize
template <typename T, bool L2>
void concretize_typed(const T* A, const T* bias, const T* mid, const T* rad, const T* center, const T* eps,
                      bool upper_side, T* out, int64_t B, int64_t S, int64_t N) {
  using acc_t = at::acc_type<T, false>;
  const acc_t sign = upper_side ? acc_t(1) : acc_t(-1);
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(N, 1));
  at::parallel_for(0, B * S, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t row = r0; row < r1; ++row) {
      const int64_t b = row / S;
      const T* a = A + row * N;
      const T* m = mid + b * N;
      const T* r = rad + b * N;
      const T* c = L2 ? center + b * N : nullptr;
      acc_t s_mid = 0, s_rad = 0, s_cen = 0, s_sq = 0;
#pragma omp simd reduction(+ : s_mid, s_rad, s_cen, s_sq)
      for (int64_t n = 0; n < N; ++n) {
        const acc_t v = static_cast<acc_t>(a[n]);
        s_mid += v * static_cast<acc_t>(m[n]);
        s_rad += std::abs(v) * static_cast<acc_t>(r[n]);
        if (L2) {
          s_cen += v * static_cast<acc_t>(c[n]);
          s_sq += v * v;
        }
      }
      const acc_t bs = static_cast<acc_t>(bias[row]);
      acc_t val = s_mid + bs + sign * s_rad;
      if (L2) {
        const acc_t ball = s_cen + bs + sign * static_cast<acc_t>(eps[b]) * std::sqrt(s_sq);
        // the tighter of the two (NaN-propagating like torch.minimum/maximum)
        if (std::isnan(ball) || std::isnan(val)) {
          val = std::isnan(val) ? val : ball;
        } else {
          val = upper_side ? std::min(val, ball) : std::max(val, ball);
        }
      }
      out[row] = static_cast<T>(val);
    }
  });
}

at::Tensor crown_concretize_cpu(const at::Tensor& A_in, const at::Tensor& bias_in, const at::Tensor& mid_in,
                                const at::Tensor& rad_in, const std::optional<at::Tensor>& center_in,
                                const std::optional<at::Tensor>& eps_in, bool upper_side) {
  const char* op = "crown_concretize";
  CHECK_FLOATING(op, A_in);
  CHECK_DIM(op, A_in, 3);
  const int64_t B = A_in.size(0), S = A_in.size(1), N = A_in.size(2);
  CHECK_LIKE(op, bias_in, A_in);
  CHECK_LIKE(op, mid_in, A_in);
  CHECK_LIKE(op, rad_in, A_in);
  CHECK_LIKE(op, center_in, A_in);
  CHECK_LIKE(op, eps_in, A_in);
  CHECK_SHAPE(op, bias_in, B, S);
  CHECK_SHAPE(op, mid_in, B, N);
  CHECK_SHAPE(op, rad_in, B, N);
  CHECK_SHAPE(op, center_in, B, N);
  CHECK_SHAPE(op, eps_in, B);
  TORCH_CHECK(center_in.has_value() == eps_in.has_value(), op, ": give both center and eps (an L2 ball) or neither");
  const at::Tensor A = A_in.contiguous(), bias = bias_in.contiguous(), mid = mid_in.contiguous(),
                   rad = rad_in.contiguous();
  const bool l2 = center_in.has_value();
  const at::Tensor center = l2 ? center_in->contiguous() : at::Tensor();
  const at::Tensor eps = l2 ? eps_in->contiguous() : at::Tensor();
  at::Tensor out = at::empty({B, S}, A.options());
  if (B * S == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(A.scalar_type(), "crown_concretize_cpu", [&] {
    const scalar_t* c = l2 ? center.data_ptr<scalar_t>() : nullptr;
    const scalar_t* e = l2 ? eps.data_ptr<scalar_t>() : nullptr;
    auto run = l2 ? &concretize_typed<scalar_t, true> : &concretize_typed<scalar_t, false>;
    run(A.data_ptr<scalar_t>(), bias.data_ptr<scalar_t>(), mid.data_ptr<scalar_t>(), rad.data_ptr<scalar_t>(), c, e,
        upper_side, out.data_ptr<scalar_t>(), B, S, N);
  });
  return out;
}

// ------------------------------------------------------------------------------------------- concretize, backward
template <typename T>
void concretize_grad_typed(const T* A, const T* mid, const T* rad, const T* g, bool upper_side, T* grad_A, T* g_mid,
                           T* g_rad, int64_t B, int64_t S, int64_t N) {
  using acc_t = at::acc_type<T, false>;
  const T sign = upper_side ? T(1) : T(-1);
  const int64_t blocks = (N + kBlock - 1) / kBlock;
  at::parallel_for(0, B * blocks, 1, [&](int64_t t0, int64_t t1) {
    std::vector<acc_t> sm(kBlock), sr(kBlock);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / blocks;
      const int64_t n0 = (t % blocks) * kBlock;
      const int64_t len = std::min(kBlock, N - n0);
      const T* m = mid + b * N + n0;
      const T* r = rad + b * N + n0;
      acc_t* smp = sm.data();
      acc_t* srp = sr.data();
      std::fill(sm.begin(), sm.begin() + len, acc_t(0));
      std::fill(sr.begin(), sr.begin() + len, acc_t(0));
      for (int64_t s = 0; s < S; ++s) {
        const int64_t off = (b * S + s) * N + n0;
        const T* a = A + off;
        T* o = grad_A + off;
        const T gs = g[b * S + s];
        const T gr = gs * sign;
#pragma omp simd
        for (int64_t j = 0; j < len; ++j) {
          const T v = a[j];
          const T sg = static_cast<T>(v > T(0)) - static_cast<T>(v < T(0));
          o[j] = gs * m[j] + gr * sg * r[j];
          smp[j] += static_cast<acc_t>(gs * v);
          srp[j] += static_cast<acc_t>(gs * std::abs(v));
        }
      }
      for (int64_t j = 0; j < len; ++j) {
        g_mid[b * N + n0 + j] = static_cast<T>(smp[j]);
        g_rad[b * N + n0 + j] = sign * static_cast<T>(srp[j]);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> crown_concretize_grad_cpu(const at::Tensor& A_in,
                                                                         const at::Tensor& mid_in,
                                                                         const at::Tensor& rad_in,
                                                                         const at::Tensor& g_in, bool upper_side) {
  const char* op = "crown_concretize_grad";
  CHECK_FLOATING(op, A_in);
  CHECK_DIM(op, A_in, 3);
  const int64_t B = A_in.size(0), S = A_in.size(1), N = A_in.size(2);
  CHECK_LIKE(op, mid_in, A_in);
  CHECK_LIKE(op, rad_in, A_in);
  CHECK_LIKE(op, g_in, A_in);
  CHECK_SHAPE(op, mid_in, B, N);
  CHECK_SHAPE(op, rad_in, B, N);
  CHECK_SHAPE(op, g_in, B, S);
  const at::Tensor A = A_in.contiguous(), mid = mid_in.contiguous(), rad = rad_in.contiguous(), g = g_in.contiguous();
  at::Tensor grad_A = robustkern::empty_huge_like(A);
  at::Tensor g_mid = at::zeros_like(mid), g_rad = at::zeros_like(rad);
  if (B * N == 0) return {grad_A, g_mid, g_rad};
  AT_DISPATCH_FLOATING_TYPES(A.scalar_type(), "crown_concretize_grad_cpu", [&] {
    concretize_grad_typed<scalar_t>(A.data_ptr<scalar_t>(), mid.data_ptr<scalar_t>(), rad.data_ptr<scalar_t>(),
                                    g.data_ptr<scalar_t>(), upper_side, grad_A.data_ptr<scalar_t>(),
                                    g_mid.data_ptr<scalar_t>(), g_rad.data_ptr<scalar_t>(), B, S, N);
  });
  return {grad_A, g_mid, g_rad};
}

}  // namespace

TORCH_LIBRARY_IMPL(robustkern, CPU, m) {
  m.impl("crown_relu_backward", &crown_relu_backward_cpu);
  m.impl("crown_relu_backward_grad", &crown_relu_backward_grad_cpu);
  m.impl("crown_concretize", &crown_concretize_cpu);
  m.impl("crown_concretize_grad", &crown_concretize_grad_cpu);
}
