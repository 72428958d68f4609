// The interval ops for every device (see robustkern/interval.h): checks, ATen GEMMs / convolutions in
// IEEE float32, and the device's element-wise stages. Math: robustkern/reference/interval.py. Float32 boxes
// with sound=True run the float64 path on their exact float64 values and are rounded outwards once.
#include "robustkern/interval.h"

#include <ATen/Context.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/_convolution.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/full.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/nextafter.h>
#include <ATen/ops/scalar_tensor.h>
#include <ATen/ops/where.h>

#include <limits>
#include <vector>

#include "robustkern/check.h"
#include "robustkern/ieee_fp32.h"

namespace robustkern {
namespace {

template <typename F>
void dispatch_floating(at::ScalarType type, F&& f) {
  if (type == at::kFloat) {
    f(float{});
  } else {
    f(double{});
  }
}

// The rounding-error constants for a GEMM of depth K (element-wise ops pass K = 0 and use only four_u and
// tiny), computed in double and rounded to T as the reference's Python floats are
// (Higham, Lemma 3.1: e = gamma_{K+2}, gamma_k = k u / (1 - k u)).
template <typename T>
Widening<T> widening(const char* op, int64_t K, bool sound) {
  const double u = std::numeric_limits<T>::epsilon() / 2.0;
  const double tiny = std::numeric_limits<T>::min();
  double e = 0.0;
  if (sound) {
    const double ku = static_cast<double>(K + 2) * u;
    TORCH_CHECK(ku < 0.5, op, ": reduction depth ", K, " too large for a rounding-error bound at u=", u);
    e = ku / (1.0 - ku);
  }
  return {static_cast<T>(2.0 * e), static_cast<T>(1.0 + 3.0 * e), static_cast<T>(static_cast<double>(K) * tiny),
          static_cast<T>(4.0 * u), static_cast<T>(tiny)};
}

// a and b as one dense layout with equal strides (copies only when they differ).
void make_dense_pair(at::Tensor& a, at::Tensor& b) {
  if (a.strides() == b.strides() && a.is_non_overlapping_and_dense()) return;
  a = a.contiguous();
  b = b.contiguous();
}

// a and b (same shape, channel axis 1) in one layout the element-wise kernels index directly:
// contiguous, or channels-last for 4-D tensors. Copies only when needed.
ChannelLayout channel_layout(at::Tensor& a, at::Tensor& b) {
  TORCH_INTERNAL_ASSERT(a.dim() >= 2 && a.sizes() == b.sizes());
  const int64_t channels = a.size(1);
  if (a.dim() == 4 && !(a.is_contiguous() && b.is_contiguous()) &&
      a.is_contiguous(at::MemoryFormat::ChannelsLast) && b.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    return {a.size(0) * a.size(2) * a.size(3), channels, 1};
  }
  a = a.contiguous();
  b = b.contiguous();
  int64_t inner = 1;
  for (int64_t d = 2; d < a.dim(); ++d) inner *= a.size(d);
  return {a.size(0), channels, inner};
}

// s = rad + 2e|mid|, the radius that enters the |W| product (Python: _gemm_widen).
template <typename T>
at::Tensor pre_product(at::Tensor mid, at::Tensor rad, const Widening<T>& w, const KernelSet<T>& k) {
  make_dense_pair(mid, rad);
  at::Tensor s = at::empty_like(rad);
  if (s.numel() > 0) {
    k.pre_product({mid.const_data_ptr<T>(), rad.const_data_ptr<T>(), s.mutable_data_ptr<T>(), s.numel(), w.two_e});
  }
  return s;
}

at::Tensor vector_or(const std::optional<at::Tensor>& v, int64_t n, double fill, const at::Tensor& like) {
  return v.has_value() ? v->contiguous() : at::full({n}, fill, like.options());
}

// The GEMM outputs (m, r) widened in place, with the optional epilogue (Python: the end of
// interval_linear / interval_conv2d and _with_epilogue).
BoxWithPre finish_gemm(at::Tensor m, at::Tensor r, const std::optional<at::Tensor>& bias, bool add_bias,
                       const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& shift,
                       bool relu, bool sound, int64_t K, const char* op, const IntervalKernels& kernels) {
  const bool affine = scale.has_value() || shift.has_value();
  const bool epilogue = affine || relu;
  const bool widen = sound || add_bias;
  at::Tensor out_mid, out_rad;
  if (widen || epilogue) {
    const ChannelLayout layout = channel_layout(m, r);
    const int64_t channels = layout.channels;
    if (epilogue) {
      out_mid = at::empty_like(m);
      out_rad = at::empty_like(r);
    }
    const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
    const at::Tensor a = affine ? vector_or(scale, channels, 1.0, m) : at::Tensor();
    const at::Tensor c = affine ? vector_or(shift, channels, 0.0, m) : at::Tensor();
    dispatch_floating(m.scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      BoxEpilogue<T> p{};
      p.m = m.mutable_data_ptr<T>();
      p.r = r.mutable_data_ptr<T>();
      p.out_mid = epilogue ? out_mid.mutable_data_ptr<T>() : nullptr;
      p.out_rad = epilogue ? out_rad.mutable_data_ptr<T>() : nullptr;
      p.bias = b.defined() ? b.const_data_ptr<T>() : nullptr;
      p.bias_row_stride = b.defined() && b.dim() == 2 ? channels : 0;
      p.scale = affine ? a.const_data_ptr<T>() : nullptr;
      p.shift = affine ? c.const_data_ptr<T>() : nullptr;
      p.layout = layout;
      p.gemm = true;
      p.add_bias = add_bias && b.defined();
      p.affine = affine;
      p.relu = relu;
      p.sound = sound;
      p.w = widening<T>(op, K, sound);
      if (layout.numel() > 0) kernels.get<T>().box_epilogue(p);
    });
  }
  if (!epilogue) return {m, r, at::empty({0}, m.options()), at::empty({0}, m.options())};
  return {out_mid, out_rad, m, r};
}

// A float32 box that contains the float64 box (mid, rad): mid rounded to nearest, rad + |mid - mid32| moved
// one float64 ulp up and rounded up to float32 (Python: robustkern._numerics.round_box_outward).
Box round_box_outward(const at::Tensor& mid, const at::Tensor& rad) {
  const at::Tensor m = mid.to(at::kFloat);
  const at::Tensor up64 = at::scalar_tensor(std::numeric_limits<double>::infinity(), rad.options());
  const at::Tensor wide = at::nextafter(rad.add(mid.sub(m.to(at::kDouble)).abs()), up64);
  at::Tensor r = wide.to(at::kFloat);
  const at::Tensor up32 = at::scalar_tensor(std::numeric_limits<float>::infinity(), r.options());
  r = at::where(r.to(at::kDouble).lt(wide), at::nextafter(r, up32), r);
  return {m, r};
}

std::optional<at::Tensor> to_double(const std::optional<at::Tensor>& t) {
  return t.has_value() ? std::optional<at::Tensor>(t->to(at::kDouble)) : std::nullopt;
}

// Float32 boxes with sound=True: the op runs in float64 on the (exact) float64 values of its float32 inputs and
// every returned box is rounded outwards to float32 (Python: reference/interval.py, _wide_accumulation).
BoxWithPre wide_to_float(const BoxWithPre& wide) {
  const auto [m, r] = round_box_outward(std::get<0>(wide), std::get<1>(wide));
  const auto [pm, pr] = round_box_outward(std::get<2>(wide), std::get<3>(wide));  // empty without an epilogue
  return {m, r, pm, pr};
}

std::vector<int64_t> pair_param(const char* op, const char* name, at::IntArrayRef v) {
  TORCH_CHECK(v.size() == 1 || v.size() == 2, op, ": ", name, " must have 1 or 2 entries, got ", v);
  return v.size() == 1 ? std::vector<int64_t>{v[0], v[0]} : std::vector<int64_t>{v[0], v[1]};
}

// The checks both GEMM ops start with (the macros name the argument in their messages).
void check_gemm_args(const char* op, const at::Tensor& mid, const at::Tensor& rad, const at::Tensor& weight,
                     const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& scale,
                     const std::optional<at::Tensor>& shift, int64_t dim) {
  CHECK_FLOATING(op, mid);
  CHECK_LIKE(op, rad, mid);
  CHECK_LIKE(op, weight, mid);
  CHECK_LIKE(op, bias, mid);
  CHECK_LIKE(op, scale, mid);
  CHECK_LIKE(op, shift, mid);
  CHECK_DIM(op, mid, dim);
}

}  // namespace

BoxWithPre interval_linear(const at::Tensor& mid, const at::Tensor& rad, const at::Tensor& weight,
                           const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& scale,
                           const std::optional<at::Tensor>& shift, bool relu, bool sound,
                           const IntervalKernels& kernels) {
  const char* op = "interval_linear";
  check_gemm_args(op, mid, rad, weight, bias, scale, shift, 2);
  CHECK_SAME_SHAPE(op, rad, mid);
  const int64_t B = mid.size(0);
  const int64_t K = mid.size(1);
  const bool per_example = weight.dim() == 3;
  TORCH_CHECK(weight.dim() == 2 || per_example, op, ": weight must be (N, K) or (B, N, K), got shape ",
              weight.sizes());
  const int64_t N = weight.size(-2);
  if (per_example) {
    CHECK_SHAPE(op, weight, B, N, K);
    TORCH_CHECK(!bias.has_value() || bias->sizes() == at::IntArrayRef({N}) ||
                    bias->sizes() == at::IntArrayRef({B, N}),
                op, ": bias must have shape [", N, "] or [", B, ", ", N, "], got ", bias->sizes());
  } else {
    CHECK_SHAPE(op, weight, N, K);
    CHECK_SHAPE(op, bias, N);
  }
  CHECK_SHAPE(op, scale, N);
  CHECK_SHAPE(op, shift, N);
  if (sound && mid.scalar_type() == at::kFloat) {
    return wide_to_float(interval_linear(mid.to(at::kDouble), rad.to(at::kDouble), weight.to(at::kDouble),
                                         to_double(bias), to_double(scale), to_double(shift), relu, true, kernels));
  }

  const IeeeFp32Scope ieee(mid.scalar_type() == at::kFloat);
  at::Tensor s = rad;
  if (sound) {
    dispatch_floating(mid.scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      s = pre_product<T>(mid, rad, widening<T>(op, K, sound), kernels.get<T>());
    });
  }
  const at::Tensor abs_weight = weight.abs();
  at::Tensor m, r;
  if (per_example) {
    m = at::bmm(weight, mid.unsqueeze(-1)).squeeze(-1);
    r = at::bmm(abs_weight, s.unsqueeze(-1)).squeeze(-1);
  } else {
    m = bias.has_value() ? at::addmm(*bias, mid, weight.t()) : at::mm(mid, weight.t());
    r = at::mm(s, abs_weight.t());
  }
  return finish_gemm(m, r, bias, /*add_bias=*/per_example, scale, shift, relu, sound, K, op, kernels);
}

BoxWithPre interval_conv2d(const at::Tensor& mid, const at::Tensor& rad, const at::Tensor& weight,
                           const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                           at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                           const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& shift,
                           bool relu, bool sound, const IntervalKernels& kernels) {
  const char* op = "interval_conv2d";
  check_gemm_args(op, mid, rad, weight, bias, scale, shift, 4);
  CHECK_SAME_SHAPE(op, rad, mid);
  CHECK_DIM(op, weight, 4);
  TORCH_CHECK(groups >= 1, op, ": groups must be >= 1, got ", groups);
  const int64_t O = weight.size(0);
  TORCH_CHECK(O % groups == 0, op, ": weight has ", O, " output channels, not divisible by groups=", groups);
  TORCH_CHECK(mid.size(1) == weight.size(1) * groups, op, ": mid has ", mid.size(1),
              " channels but weight of shape ", weight.sizes(), " with groups=", groups, " expects ",
              weight.size(1) * groups);
  CHECK_SHAPE(op, bias, O);
  CHECK_SHAPE(op, scale, O);
  CHECK_SHAPE(op, shift, O);
  const auto stride2 = pair_param(op, "stride", stride);
  const auto padding2 = pair_param(op, "padding", padding);
  const auto dilation2 = pair_param(op, "dilation", dilation);
  const int64_t K = weight.size(1) * weight.size(2) * weight.size(3);
  if (sound && mid.scalar_type() == at::kFloat) {
    return wide_to_float(interval_conv2d(mid.to(at::kDouble), rad.to(at::kDouble), weight.to(at::kDouble),
                                         to_double(bias), stride, padding, dilation, groups, to_double(scale),
                                         to_double(shift), relu, true, kernels));
  }

  const IeeeFp32Scope ieee(mid.scalar_type() == at::kFloat, /*conv=*/true);
  at::Tensor s = rad;
  if (sound) {
    dispatch_floating(mid.scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      s = pre_product<T>(mid, rad, widening<T>(op, K, sound), kernels.get<T>());
    });
  }
  // Direct call so that cuDNN gets allow_tf32=false whatever torch.backends.cudnn.allow_tf32 says.
  const auto conv = [&](const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b) {
    return at::_convolution(x, w, b, stride2, padding2, dilation2, /*transposed=*/false, /*output_padding=*/{0, 0},
                            groups, /*benchmark=*/false, /*deterministic=*/true,
                            /*cudnn_enabled=*/at::globalContext().userEnabledCuDNN(), /*allow_tf32=*/false);
  };
  at::Tensor m = conv(mid, weight, bias);
  at::Tensor r = conv(s, weight.abs(), std::nullopt);
  return finish_gemm(m, r, bias, /*add_bias=*/false, scale, shift, relu, sound, K, op, kernels);
}

Box interval_affine(const at::Tensor& mid, const at::Tensor& rad, const std::optional<at::Tensor>& scale,
                    const std::optional<at::Tensor>& shift, bool relu, bool sound,
                    const IntervalKernels& kernels) {
  const char* op = "interval_affine";
  CHECK_FLOATING(op, mid);
  CHECK_LIKE(op, rad, mid);
  CHECK_LIKE(op, scale, mid);
  CHECK_LIKE(op, shift, mid);
  CHECK_SAME_SHAPE(op, rad, mid);
  const bool affine = scale.has_value() || shift.has_value();
  if (!affine && !relu) return {mid.clone(), rad.clone()};  // fresh outputs: an op's outputs never alias its inputs

  at::Tensor m = mid;
  at::Tensor r = rad;
  ChannelLayout layout{};
  if (affine) {
    TORCH_CHECK(mid.dim() >= 2, op, ": with scale or shift, mid must be (B, C, ...), got shape ", mid.sizes());
    const int64_t C = mid.size(1);
    CHECK_SHAPE(op, scale, C);
    CHECK_SHAPE(op, shift, C);
    layout = channel_layout(m, r);
  } else {
    make_dense_pair(m, r);  // ReLU alone: element-wise over memory order
    layout = {1, 1, m.numel()};
  }
  at::Tensor out_mid = at::empty_like(m);
  at::Tensor out_rad = at::empty_like(r);
  const at::Tensor a = vector_or(scale, layout.channels, 1.0, m);
  const at::Tensor c = vector_or(shift, layout.channels, 0.0, m);
  dispatch_floating(m.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    BoxEpilogue<T> p{};
    p.m = m.mutable_data_ptr<T>();  // read only (gemm = false)
    p.r = r.mutable_data_ptr<T>();
    p.out_mid = out_mid.mutable_data_ptr<T>();
    p.out_rad = out_rad.mutable_data_ptr<T>();
    p.scale = a.const_data_ptr<T>();
    p.shift = c.const_data_ptr<T>();
    p.layout = layout;
    p.affine = affine;
    p.relu = relu;
    p.sound = sound;
    p.w = widening<T>(op, 0, sound);
    if (layout.numel() > 0) kernels.get<T>().box_epilogue(p);
  });
  return {out_mid, out_rad};
}

Box interval_input_box(const at::Tensor& x, const at::Tensor& eps, double x_min, double x_max, bool sound,
                       const IntervalKernels& kernels) {
  const char* op = "interval_input_box";
  CHECK_FLOATING(op, x);
  CHECK_LIKE(op, eps, x);
  TORCH_CHECK(x.dim() >= 1, op, ": x must be (B, ...), got a scalar");
  const int64_t B = x.size(0);
  TORCH_CHECK(eps.numel() == B || eps.numel() == 1, op, ": eps must hold one radius per example (", B,
              ") or a single one, got shape ", eps.sizes());
  TORCH_CHECK(x_min <= x_max, op, ": x_min (", x_min, ") must not exceed x_max (", x_max, ")");
  // Batch-major dense layout (contiguous or channels-last): each example is one block of memory.
  at::Tensor xd = x;
  const int64_t inner = B > 0 ? x.numel() / B : 0;
  if (!(x.is_non_overlapping_and_dense() && (B <= 1 || x.stride(0) == inner))) xd = x.contiguous();
  const at::Tensor e = eps.contiguous();
  at::Tensor mid = at::empty_like(xd);
  at::Tensor rad = at::empty_like(xd);
  dispatch_floating(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    InputBox<T> p{};
    p.x = xd.const_data_ptr<T>();
    p.eps = e.const_data_ptr<T>();
    p.eps_stride = e.numel() == 1 ? 0 : 1;
    p.mid = mid.mutable_data_ptr<T>();
    p.rad = rad.mutable_data_ptr<T>();
    p.rows = B;
    p.inner = inner;
    p.x_min = static_cast<T>(x_min);
    p.x_max = static_cast<T>(x_max);
    p.sound = sound;
    p.w = widening<T>(op, 0, sound);
    if (x.numel() > 0) kernels.get<T>().input_box(p);
  });
  return {mid, rad};
}

}  // namespace robustkern
