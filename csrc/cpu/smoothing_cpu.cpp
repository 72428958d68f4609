// CPU kernels of the randomized-smoothing ops (robustkern_ext::smoothing_noise / smoothing_count), bit-identical
// to the pure-PyTorch specification in robustkern/reference/smoothing.py:
//
//   (o0, o1, _, _) = Philox4x32-10(counter = (e, sample[r], image[r], stream[r]), key = (seed_lo, seed_hi))
//   u1 = (o0 + 1/2) 2^-32, u2 = (o1 + 1/2) 2^-32                    (float64, exact)
//   z  = fp32( sqrt(-2 log u1) cos(2 pi u2) )                        (float64, rounded once)
//   v  = fp32(x[src[r], e]) + fp32(sigma) * z                        (fp32: a product, then a sum)
//   out[r, e] = cast_out( (v - mean[c]) / std[c] )                   (fp32; cast with round-to-nearest-even)
//
// Rows (one noisy copy each) are split across threads with at::parallel_for; each row is processed in chunks:
// the Philox rounds run as a plain loop over 32-bit lanes (vectorised: 32x32->64-bit products), then the
// float64 Box-Muller (log / cos by ATen's own float64 CPU kernels, as in the reference), then the fused
// noise + normalisation + cast.
// No -ffast-math and no FMA contraction (the x86-64 baseline has no FMA): the fp32 product and sum round
// separately, as in the reference.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <vector>

#include "robustkern/check.h"

namespace robustkern {
namespace {

constexpr uint32_t kM0 = 0xD2511F53u;  // Philox4x32 multipliers
constexpr uint32_t kM1 = 0xCD9E8D57u;
constexpr uint32_t kW0 = 0x9E3779B9u;  // Weyl key increments
constexpr uint32_t kW1 = 0xBB67AE85u;
constexpr double kTwoPi = 6.283185307179586;  // 2.0 * math.pi (float64)
constexpr double kInv2to32 = 1.0 / 4294967296.0;
constexpr int64_t kChunk = 2048;      // elements of one row per Philox / Box-Muller pass
constexpr int64_t kGrain = 32768;     // elements per parallel task

// The first two output words of Philox4x32-10 for counters (e[i], c1, c2, c3), i in [0, n).
inline void philox_chunk(const uint32_t e0, const int64_t n, const uint32_t c1_, const uint32_t c2_,
                         const uint32_t c3_, const uint32_t key0, const uint32_t key1, uint32_t* __restrict__ out0,
                         uint32_t* __restrict__ out1) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    uint32_t c0 = e0 + static_cast<uint32_t>(i), c1 = c1_, c2 = c2_, c3 = c3_;
    uint32_t k0 = key0, k1 = key1;
    for (int round = 0; round < 10; ++round) {
      const uint64_t p0 = static_cast<uint64_t>(kM0) * c0;
      const uint64_t p1 = static_cast<uint64_t>(kM1) * c2;
      const uint32_t hi0 = static_cast<uint32_t>(p0 >> 32), lo0 = static_cast<uint32_t>(p0);
      const uint32_t hi1 = static_cast<uint32_t>(p1 >> 32), lo1 = static_cast<uint32_t>(p1);
      c0 = hi1 ^ c1 ^ k0;
      c1 = lo1;
      c2 = hi0 ^ c3 ^ k1;
      c3 = lo0;
      k0 += kW0;
      k1 += kW1;
    }
    out0[i] = c0;
    out1[i] = c1;
  }
}

template <typename Out>
inline Out cast_out(float v) {
  return static_cast<Out>(v);  // c10::BFloat16 / c10::Half round to nearest even, as Tensor.to does
}

struct NoiseArgs {
  const float* x;          // (I, d) fp32, contiguous
  const int64_t* src;      // (R,)
  const int64_t* counter;  // (R, 3): image key, sample index, stream
  const float* mean;       // (C,) or nullptr
  const float* std;        // (C,) or nullptr
  float sigma;
  uint32_t key0, key1;
  int64_t rows, d, hw;     // hw: elements per channel
};

template <typename Out, bool kNorm>
void noise_rows(const NoiseArgs& a, Out* __restrict__ out, int64_t begin, int64_t end) {
  alignas(64) uint32_t o0[kChunk];
  alignas(64) uint32_t o1[kChunk];
  alignas(64) double u1[kChunk];
  alignas(64) double u2[kChunk];
  alignas(64) float z[kChunk];
  // log and cos run as ATen's own (vectorised) float64 kernels, the ones the reference calls; serial here
  // (inside at::parallel_for)
  const auto dopt = at::TensorOptions().dtype(at::kDouble);
  at::Tensor t1 = at::from_blob(u1, {kChunk}, dopt);
  at::Tensor t2 = at::from_blob(u2, {kChunk}, dopt);
  const float sigma = a.sigma;
  for (int64_t r = begin; r < end; ++r) {
    const float* __restrict__ xr = a.x + a.src[r] * a.d;
    Out* __restrict__ orow = out + r * a.d;
    const uint32_t image = static_cast<uint32_t>(a.counter[3 * r + 0]);
    const uint32_t sample = static_cast<uint32_t>(a.counter[3 * r + 1]);
    const uint32_t stream = static_cast<uint32_t>(a.counter[3 * r + 2]);
    for (int64_t e0 = 0; e0 < a.d; e0 += kChunk) {
      const int64_t n = std::min(kChunk, a.d - e0);
      philox_chunk(static_cast<uint32_t>(e0), n, sample, image, stream, a.key0, a.key1, o0, o1);
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) {
        u1[i] = (static_cast<double>(o0[i]) + 0.5) * kInv2to32;
        u2[i] = kTwoPi * ((static_cast<double>(o1[i]) + 0.5) * kInv2to32);
      }
      if (n == kChunk) {
        at::log_(t1);
        at::cos_(t2);
      } else {
        at::Tensor s1 = t1.narrow(0, 0, n), s2 = t2.narrow(0, 0, n);
        at::log_(s1);
        at::cos_(s2);
      }
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) z[i] = static_cast<float>(std::sqrt(-2.0 * u1[i]) * u2[i]);
      if constexpr (kNorm) {
        // runs of one channel inside the chunk
        int64_t i = 0;
        while (i < n) {
          const int64_t e = e0 + i;
          const int64_t c = e / a.hw;
          const int64_t stop = std::min(n, (c + 1) * a.hw - e0);
          const float m = a.mean[c], s = a.std[c];
#pragma omp simd
          for (int64_t j = i; j < stop; ++j) {
            const float noise = sigma * z[j];
            const float v = xr[e0 + j] + noise;
            orow[e0 + j] = cast_out<Out>((v - m) / s);
          }
          i = stop;
        }
      } else {
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) {
          const float noise = sigma * z[i];
          orow[e0 + i] = cast_out<Out>(xr[e0 + i] + noise);
        }
      }
    }
  }
}

template <typename Out>
void noise_launch(const NoiseArgs& a, Out* out) {
  const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(1, a.d));
  at::parallel_for(0, a.rows, grain, [&](int64_t begin, int64_t end) {
    if (a.mean != nullptr) {
      noise_rows<Out, true>(a, out, begin, end);
    } else {
      noise_rows<Out, false>(a, out, begin, end);
    }
  });
}

at::Tensor smoothing_noise_cpu(const at::Tensor& x, const at::Tensor& src, const at::Tensor& counter,
                               const at::Tensor& seed, double sigma, const std::optional<at::Tensor>& mean,
                               const std::optional<at::Tensor>& stdev, at::ScalarType out_dtype) {
  constexpr const char* op = "smoothing_noise";
  TORCH_CHECK(x.is_floating_point(), op, ": x must be a floating tensor, got ", x.scalar_type());
  TORCH_CHECK(x.dim() >= 2, op, ": x must be (I, C, ...), got shape ", x.sizes());
  TORCH_CHECK(out_dtype == at::kFloat || out_dtype == at::kDouble || out_dtype == at::kBFloat16 ||
                  out_dtype == at::kHalf,
              op, ": out_dtype must be float32, bfloat16, float16 or float64, got ", out_dtype);
  TORCH_CHECK(src.dim() == 1 && src.scalar_type() == at::kLong, op, ": src must be (R,) int64, got ",
              src.sizes(), " ", src.scalar_type());
  const int64_t rows = src.size(0);
  TORCH_CHECK(counter.scalar_type() == at::kLong && counter.dim() == 2 && counter.size(0) == rows &&
                  counter.size(1) == 3,
              op, ": counter must be (", rows, ", 3) int64, got ", counter.sizes(), " ", counter.scalar_type());
  TORCH_CHECK(seed.scalar_type() == at::kLong && seed.numel() >= 1, op, ": seed must be a (1,) int64 tensor");
  TORCH_CHECK(mean.has_value() == stdev.has_value(), op, ": give both mean and std, or neither");
  CHECK_DEVICE_TYPE(op, x, at::kCPU);
  CHECK_DEVICE_TYPE(op, src, at::kCPU);
  CHECK_DEVICE_TYPE(op, counter, at::kCPU);
  CHECK_DEVICE_TYPE(op, seed, at::kCPU);

  std::vector<int64_t> shape{rows};
  int64_t d = 1;
  for (int64_t k = 1; k < x.dim(); ++k) {
    shape.push_back(x.size(k));
    d *= x.size(k);
  }
  at::Tensor out = at::empty(shape, x.options().dtype(out_dtype));
  if (rows == 0 || d == 0) return out;
  TORCH_CHECK(d < (int64_t(1) << 32), op, ": an image may have at most 2^32 - 1 elements");
  const int64_t images = x.size(0);
  const int64_t channels = x.size(1);

  at::Tensor xf = x.to(at::kFloat).contiguous();
  at::Tensor srcc = src.contiguous();
  at::Tensor cnt = counter.contiguous();
  const int64_t* sp = srcc.data_ptr<int64_t>();
  for (int64_t r = 0; r < rows; ++r) {
    TORCH_CHECK(sp[r] >= 0 && sp[r] < images, op, ": src[", r, "] = ", sp[r], " is out of range [0, ", images,
                ")");
  }
  const int64_t* cp = cnt.data_ptr<int64_t>();
  for (int64_t i = 0; i < 3 * rows; ++i) {
    TORCH_CHECK(cp[i] >= 0 && cp[i] <= int64_t(0xFFFFFFFF), op, ": counter entries must be in [0, 2^32), got ",
                cp[i]);
  }
  const uint64_t seed_bits = static_cast<uint64_t>(seed.reshape(-1)[0].item<int64_t>());

  at::Tensor mean_f, std_f;
  NoiseArgs a{};
  if (mean.has_value()) {
    CHECK_DEVICE_TYPE(op, *mean, at::kCPU);
    CHECK_DEVICE_TYPE(op, *stdev, at::kCPU);
    TORCH_CHECK(mean->numel() == channels && stdev->numel() == channels, op, ": mean and std must have ",
                channels, " entries (one per channel)");
    mean_f = mean->to(at::kFloat).contiguous();
    std_f = stdev->to(at::kFloat).contiguous();
    a.mean = mean_f.data_ptr<float>();
    a.std = std_f.data_ptr<float>();
  }
  a.x = xf.data_ptr<float>();
  a.src = sp;
  a.counter = cp;
  a.sigma = static_cast<float>(sigma);  // torch.tensor(sigma, dtype=float32): round to nearest even
  a.key0 = static_cast<uint32_t>(seed_bits);
  a.key1 = static_cast<uint32_t>(seed_bits >> 32);
  a.rows = rows;
  a.d = d;
  a.hw = d / channels;

  switch (out_dtype) {
    case at::kFloat:
      noise_launch<float>(a, out.data_ptr<float>());
      break;
    case at::kDouble:
      noise_launch<double>(a, out.data_ptr<double>());
      break;
    case at::kBFloat16:
      noise_launch<c10::BFloat16>(a, out.data_ptr<c10::BFloat16>());
      break;
    case at::kHalf:
      noise_launch<c10::Half>(a, out.data_ptr<c10::Half>());
      break;
    default:
      TORCH_CHECK(false, op, ": unsupported out_dtype ", out_dtype);
  }
  return out;
}

// ------------------------------------------------------------------------------------------------ count
// torch.argmax's rule: the first maximum; a NaN counts as the maximum (the first NaN wins).
template <typename T>
inline int64_t argmax_row(const T* __restrict__ row, int64_t k) {
  float best = static_cast<float>(row[0]);
  int64_t idx = 0;
  if (std::isnan(best)) return 0;
  for (int64_t j = 1; j < k; ++j) {
    const float v = static_cast<float>(row[j]);
    if (std::isnan(v)) return j;
    if (v > best) {
      best = v;
      idx = j;
    }
  }
  return idx;
}

template <>
inline int64_t argmax_row<double>(const double* __restrict__ row, int64_t k) {
  double best = row[0];
  int64_t idx = 0;
  if (std::isnan(best)) return 0;
  for (int64_t j = 1; j < k; ++j) {
    const double v = row[j];
    if (std::isnan(v)) return j;
    if (v > best) {
      best = v;
      idx = j;
    }
  }
  return idx;
}

at::Tensor smoothing_count_cpu(const at::Tensor& logits, const at::Tensor& group, int64_t num_groups) {
  constexpr const char* op = "smoothing_count";
  TORCH_CHECK(logits.dim() == 2 && logits.is_floating_point(), op,
              ": logits must be a 2-D float tensor (samples, classes), got ", logits.sizes(), " ",
              logits.scalar_type());
  const int64_t r = logits.size(0), k = logits.size(1);
  TORCH_CHECK(group.dim() == 1 && group.size(0) == r && group.scalar_type() == at::kLong, op, ": group must be (",
              r, ",) int64, got ", group.sizes(), " ", group.scalar_type());
  TORCH_CHECK(num_groups >= 1 && k >= 1, op, ": need num_groups >= 1 and at least one class");
  CHECK_DEVICE_TYPE(op, logits, at::kCPU);
  CHECK_DEVICE_TYPE(op, group, at::kCPU);
  at::Tensor counts = at::zeros({num_groups, k}, logits.options().dtype(at::kLong));
  if (r == 0) return counts;
  at::Tensor lg = logits.contiguous();
  at::Tensor gr = group.contiguous();
  const int64_t* gp = gr.data_ptr<int64_t>();
  for (int64_t i = 0; i < r; ++i) {
    TORCH_CHECK(gp[i] >= 0 && gp[i] < num_groups, op, ": group[", i, "] = ", gp[i], " is out of range [0, ",
                num_groups, ")");
  }
  std::vector<int64_t> best(static_cast<size_t>(r));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, lg.scalar_type(), "smoothing_count_cpu", [&] {
    const scalar_t* p = lg.data_ptr<scalar_t>();
    int64_t* bp = best.data();
    at::parallel_for(0, r, std::max<int64_t>(1, kGrain / k), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) bp[i] = argmax_row<scalar_t>(p + i * k, k);
    });
  });
  int64_t* cp = counts.data_ptr<int64_t>();
  for (int64_t i = 0; i < r; ++i) ++cp[gp[i] * k + best[i]];
  return counts;
}

}  // namespace

TORCH_LIBRARY_IMPL(robustkern_ext, CPU, m) {
  m.impl("smoothing_noise", &smoothing_noise_cpu);
  m.impl("smoothing_count", &smoothing_count_cpu);
}

}  // namespace robustkern
