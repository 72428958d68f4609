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
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <tuple>

#include "robustkern/check.h"

namespace {

using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

template <typename T, bool RELU, bool HAS_SCALE, bool HAS_SHIFT>
void epilogue_backward_typed(const T* pm, const T* pr, const T* scale, const T* shift, const T* gm, const T* gr,
                             T* g_pm, T* g_pr, T* g_scale, T* g_shift, int64_t B, int64_t C, int64_t S) {
  at::parallel_for(0, C, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const T a = HAS_SCALE ? scale[c] : T(1);
      const T abs_a = std::abs(a);
      const T sign_a = a > T(0) ? T(1) : (a < T(0) ? T(-1) : T(0));
      const T sh = HAS_SHIFT ? shift[c] : T(0);
      double sum_scale = 0.0, sum_shift = 0.0;
      for (int64_t b = 0; b < B; ++b) {
        const int64_t base = (b * C + c) * S;
        T part_scale = T(0), part_shift = T(0);
#pragma omp simd reduction(+ : part_scale, part_shift)
        for (int64_t s = 0; s < S; ++s) {
          const int64_t i = base + s;
          T gm1 = gm[i], gr1 = gr[i];
          if (RELU) {
            const T m1 = a * pm[i] + sh;
            const T r1 = abs_a * pr[i];
            const T dhi = (m1 + r1 > T(0)) ? (gm1 + gr1) * T(0.5) : T(0);
            const T dlo = (m1 - r1 > T(0)) ? (gm1 - gr1) * T(0.5) : T(0);
            gm1 = dhi + dlo;
            gr1 = dhi - dlo;
          }
          if (HAS_SHIFT) part_shift += gm1;
          if (HAS_SCALE) part_scale += gm1 * pm[i] + sign_a * gr1 * pr[i];
          g_pm[i] = a * gm1;
          g_pr[i] = abs_a * gr1;
        }
        sum_scale += part_scale;
        sum_shift += part_shift;
      }
      g_scale[c] = static_cast<T>(sum_scale);
      g_shift[c] = static_cast<T>(sum_shift);
    }
  });
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
  const at::Tensor pm = pm_in.contiguous(), pr = pr_in.contiguous(), gm = gm_in.contiguous(), gr = gr_in.contiguous();
  const at::Tensor sc = scale ? scale->contiguous() : at::Tensor();
  const at::Tensor sh = shift ? shift->contiguous() : at::Tensor();
  at::Tensor g_pm = at::empty_like(pm), g_pr = at::empty_like(pr);
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
        g_shift.data_ptr<scalar_t>(), B, C, S);
  });
  return {g_pm, g_pr, g_scale, g_shift};
}

}  // namespace

TORCH_LIBRARY_IMPL(robustkern_ext, CPU, m) {
  m.impl("interval_epilogue_backward", &interval_epilogue_backward_cpu);
}
