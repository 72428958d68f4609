// Fused backward of the interval epilogue y = relu?(scale * x + shift) on a box, CPU.
//
// Given the pre-epilogue box (pm, pr) and the output gradients (gm, gr), one pass per channel computes
//   m1 = a pm + c,  r1 = |a| pr                       (a = scale or 1, c = shift or 0)
//   with ReLU: dhi = (gm + gr)/2 [m1 + r1 > 0],  dlo = (gm - gr)/2 [m1 - r1 > 0],
//              gm1 = dhi + dlo,  gr1 = dhi - dlo      (otherwise gm1 = gm, gr1 = gr)
//   g_pm = a gm1,  g_pr = |a| gr1,  g_shift[c] = sum gm1,  g_scale[c] = sum (gm1 pm + sign(a) gr1 pr),
// the gradient of the unwidened epilogue (the rounding widening is treated as a constant). It replaces about
// twenty element-wise passes of the same formulas written with PyTorch ops; robustkern/ops/interval.py uses
// it when no double backward is being recorded.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <tuple>
#include <vector>

#include "robustkern/alloc.h"
#include "robustkern/check.h"

namespace {

using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// One element of the backward: writes g_pm[i], g_pr[i] and returns (by reference) the element's shares of the
// scale and shift gradients. Branch-free (the ReLU masks are 0/1 factors, as in the PyTorch formulas), so that
// the loops over it vectorise: with data-dependent branches the compiler keeps them scalar, and the masks of a
// ReLU layer are mispredicted about half the time (this pass took ~10x the time of an element-wise add).
template <typename T, bool RELU, bool HAS_SCALE>
inline void epilogue_backward_element(T pmv, T prv, T gmv, T grv, T a, T abs_a, T sign_a, T sh, T& g_pm, T& g_pr,
                                      T& d_scale, T& d_shift) {
  T gm1 = gmv, gr1 = grv;
  if (RELU) {
    const T m1 = a * pmv + sh;
    const T r1 = abs_a * prv;
    const T hi_on = (m1 + r1 > T(0)) ? T(1) : T(0);
    const T lo_on = (m1 - r1 > T(0)) ? T(1) : T(0);
    const T dhi = (gmv + grv) * T(0.5) * hi_on;
    const T dlo = (gmv - grv) * T(0.5) * lo_on;
    gm1 = dhi + dlo;
    gr1 = dhi - dlo;
  }
  d_shift = gm1;
  d_scale = HAS_SCALE ? gm1 * pmv + sign_a * gr1 * prv : T(0);
  g_pm = a * gm1;
  g_pr = abs_a * gr1;
}

template <typename T>
inline T sign_of(T a) {
  return a > T(0) ? T(1) : (a < T(0) ? T(-1) : T(0));
}

// Layout [B][C][S] with S > 1: each task takes a range of channels and walks it in memory order (example by
// example, then channel by channel: one contiguous run of S elements each), so that the six streams are read
// and written sequentially; walking one channel's B runs at a stride of C*S elements first was ~5x slower
// once the tensors exceed the caches. The channel sums are reduced per run in T and accumulated over runs in
// double.
template <typename T, bool RELU, bool HAS_SCALE, bool HAS_SHIFT>
void epilogue_backward_planes(const T* __restrict__ pm, const T* __restrict__ pr, const T* scale, const T* shift,
                              const T* __restrict__ gm, const T* __restrict__ gr, T* __restrict__ g_pm,
                              T* __restrict__ g_pr, T* g_scale, T* g_shift, int64_t B, int64_t C, int64_t S) {
  at::parallel_for(0, C, 1, [&](int64_t c0, int64_t c1) {
    const int64_t n = c1 - c0;
    std::vector<double> sum_scale(n, 0.0), sum_shift(n, 0.0);
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t c = c0; c < c1; ++c) {
        const T a = HAS_SCALE ? scale[c] : T(1);
        const T abs_a = std::abs(a);
        const T sign_a = sign_of(a);
        const T sh = HAS_SHIFT ? shift[c] : T(0);
        const int64_t base = (b * C + c) * S;
        T part_scale = T(0), part_shift = T(0);
#pragma omp simd reduction(+ : part_scale, part_shift)
        for (int64_t s = 0; s < S; ++s) {
          const int64_t i = base + s;
          T d_scale, d_shift;
          epilogue_backward_element<T, RELU, HAS_SCALE>(pm[i], pr[i], gm[i], gr[i], a, abs_a, sign_a, sh, g_pm[i],
                                                        g_pr[i], d_scale, d_shift);
          part_scale += d_scale;
          part_shift += d_shift;
        }
        sum_scale[c - c0] += part_scale;
        sum_shift[c - c0] += part_shift;
      }
    }
    for (int64_t c = c0; c < c1; ++c) {
      g_scale[c] = HAS_SCALE ? static_cast<T>(sum_scale[c - c0]) : T(0);
      g_shift[c] = HAS_SHIFT ? static_cast<T>(sum_shift[c - c0]) : T(0);
    }
  });
}

constexpr int64_t kRowBlock = 64;

// Layout [B][C] (S == 1: a linear layer, or a channels-last box as [B*H*W][C]): rows of C channels in memory
// order, the vector loop over channels. Tasks take blocks of kRowBlock rows; each block's channel sums are
// reduced in T, stored in double, and the blocks' sums are added in block order afterwards (the same result
// whatever the number of threads).
template <typename T, bool RELU, bool HAS_SCALE, bool HAS_SHIFT>
void epilogue_backward_rows(const T* __restrict__ pm, const T* __restrict__ pr, const T* scale, const T* shift,
                            const T* __restrict__ gm, const T* __restrict__ gr, T* __restrict__ g_pm,
                            T* __restrict__ g_pr, T* g_scale, T* g_shift, int64_t B, int64_t C) {
  std::vector<T> a(C), abs_a(C), sign_a(C), sh(C);
  for (int64_t j = 0; j < C; ++j) {
    a[j] = HAS_SCALE ? scale[j] : T(1);
    abs_a[j] = std::abs(a[j]);
    sign_a[j] = sign_of(a[j]);
    sh[j] = HAS_SHIFT ? shift[j] : T(0);
  }
  const int64_t blocks = (B + kRowBlock - 1) / kRowBlock;
  std::vector<double> block_scale(HAS_SCALE ? blocks * C : 0), block_shift(HAS_SHIFT ? blocks * C : 0);
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, kRowBlock * C));
  at::parallel_for(0, blocks, grain, [&](int64_t k0, int64_t k1) {
    const T* __restrict__ pa = a.data();
    const T* __restrict__ pabs = abs_a.data();
    const T* __restrict__ psign = sign_a.data();
    const T* __restrict__ psh = sh.data();
    std::vector<T> part_scale(C), part_shift(C);
    T* __restrict__ psc = part_scale.data();
    T* __restrict__ pst = part_shift.data();
    for (int64_t k = k0; k < k1; ++k) {
      std::fill(part_scale.begin(), part_scale.end(), T(0));
      std::fill(part_shift.begin(), part_shift.end(), T(0));
      const int64_t b1 = std::min(B, (k + 1) * kRowBlock);
      for (int64_t b = k * kRowBlock; b < b1; ++b) {
        const int64_t base = b * C;
#pragma omp simd
        for (int64_t j = 0; j < C; ++j) {
          const int64_t i = base + j;
          T d_scale, d_shift;
          epilogue_backward_element<T, RELU, HAS_SCALE>(pm[i], pr[i], gm[i], gr[i], pa[j], pabs[j], psign[j],
                                                        psh[j], g_pm[i], g_pr[i], d_scale, d_shift);
          if (HAS_SCALE) psc[j] += d_scale;
          if (HAS_SHIFT) pst[j] += d_shift;
        }
      }
      for (int64_t j = 0; j < C; ++j) {
        if (HAS_SCALE) block_scale[k * C + j] = static_cast<double>(psc[j]);
        if (HAS_SHIFT) block_shift[k * C + j] = static_cast<double>(pst[j]);
      }
    }
  });
  for (int64_t j = 0; j < C; ++j) {
    double sum_scale = 0.0, sum_shift = 0.0;
    for (int64_t k = 0; k < blocks; ++k) {
      if (HAS_SCALE) sum_scale += block_scale[k * C + j];
      if (HAS_SHIFT) sum_shift += block_shift[k * C + j];
    }
    g_scale[j] = static_cast<T>(sum_scale);
    g_shift[j] = static_cast<T>(sum_shift);
  }
}

template <typename T, bool RELU, bool HAS_SCALE, bool HAS_SHIFT>
void epilogue_backward_typed(const T* pm, const T* pr, const T* scale, const T* shift, const T* gm, const T* gr,
                             T* g_pm, T* g_pr, T* g_scale, T* g_shift, int64_t B, int64_t C, int64_t S) {
  if (S == 1) {
    epilogue_backward_rows<T, RELU, HAS_SCALE, HAS_SHIFT>(pm, pr, scale, shift, gm, gr, g_pm, g_pr, g_scale,
                                                          g_shift, B, C);
  } else {
    epilogue_backward_planes<T, RELU, HAS_SCALE, HAS_SHIFT>(pm, pr, scale, shift, gm, gr, g_pm, g_pr, g_scale,
                                                            g_shift, B, C, S);
  }
}

Grads interval_epilogue_backward_cpu(const at::Tensor& pm_in, const at::Tensor& pr_in,
                                     const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& shift,
                                     bool relu, const at::Tensor& gm_in, const at::Tensor& gr_in) {
  const char* op = "interval_epilogue_backward";
  CHECK_FLOATING(op, pm_in);
  CHECK_SAME_SHAPE(op, pr_in, pm_in);
  CHECK_SAME_SHAPE(op, gm_in, pm_in);
  CHECK_SAME_SHAPE(op, gr_in, pm_in);
  CHECK_LIKE(op, pr_in, pm_in);
  CHECK_LIKE(op, gm_in, pm_in);
  CHECK_LIKE(op, gr_in, pm_in);
  TORCH_CHECK(pm_in.dim() >= 2, op, ": pm must have a batch and a channel dimension, got ", pm_in.dim(), " dims");
  const int64_t B = pm_in.size(0), C = pm_in.size(1);
  const int64_t S = C == 0 || B == 0 ? 0 : pm_in.numel() / (B * C);
  if (scale) {
    CHECK_LIKE(op, *scale, pm_in);
    CHECK_SHAPE(op, *scale, C);
  }
  if (shift) {
    CHECK_LIKE(op, *shift, pm_in);
    CHECK_SHAPE(op, *shift, C);
  }
  // Channels-last 4-D boxes (all four alike) are [B*H*W][C] rows: the S == 1 kernel, no layout copies.
  const auto cl = at::MemoryFormat::ChannelsLast;
  const bool channels_last = pm_in.dim() == 4 && !pm_in.is_contiguous() && pm_in.is_contiguous(cl) &&
                             pr_in.is_contiguous(cl) && gm_in.is_contiguous(cl) && gr_in.is_contiguous(cl);
  const auto fmt = channels_last ? cl : at::MemoryFormat::Contiguous;
  const at::Tensor pm = pm_in.contiguous(fmt), pr = pr_in.contiguous(fmt), gm = gm_in.contiguous(fmt),
                   gr = gr_in.contiguous(fmt);
  const int64_t rows = channels_last ? B * S : B;
  const int64_t run_len = channels_last ? 1 : S;
  const at::Tensor sc = scale ? scale->contiguous() : at::Tensor();
  const at::Tensor sh = shift ? shift->contiguous() : at::Tensor();
  at::Tensor g_pm = at::empty_like(pm), g_pr = at::empty_like(pr);
  robustkern::advise_huge_pages(g_pm);
  robustkern::advise_huge_pages(g_pr);
  at::Tensor g_scale = at::zeros({C}, pm.options()), g_shift = at::zeros({C}, pm.options());
  AT_DISPATCH_FLOATING_TYPES(pm.scalar_type(), "interval_epilogue_backward_cpu", [&] {
    const scalar_t* s_ptr = scale ? sc.data_ptr<scalar_t>() : nullptr;
    const scalar_t* t_ptr = shift ? sh.data_ptr<scalar_t>() : nullptr;
    using Fn = decltype(&epilogue_backward_typed<scalar_t, true, true, true>);
    static const Fn table[8] = {
        &epilogue_backward_typed<scalar_t, false, false, false>, &epilogue_backward_typed<scalar_t, false, false, true>,
        &epilogue_backward_typed<scalar_t, false, true, false>,  &epilogue_backward_typed<scalar_t, false, true, true>,
        &epilogue_backward_typed<scalar_t, true, false, false>,  &epilogue_backward_typed<scalar_t, true, false, true>,
        &epilogue_backward_typed<scalar_t, true, true, false>,   &epilogue_backward_typed<scalar_t, true, true, true>};
    const Fn run = table[(relu ? 4 : 0) + (scale ? 2 : 0) + (shift ? 1 : 0)];
    run(pm.data_ptr<scalar_t>(), pr.data_ptr<scalar_t>(), s_ptr, t_ptr, gm.data_ptr<scalar_t>(),
        gr.data_ptr<scalar_t>(), g_pm.data_ptr<scalar_t>(), g_pr.data_ptr<scalar_t>(), g_scale.data_ptr<scalar_t>(),
        g_shift.data_ptr<scalar_t>(), rows, C, run_len);
  });
  return {g_pm, g_pr, g_scale, g_shift};
}

}  // namespace

TORCH_LIBRARY_IMPL(robustkern, CPU, m) {
  m.impl("interval_epilogue_backward", &interval_epilogue_backward_cpu);
}
