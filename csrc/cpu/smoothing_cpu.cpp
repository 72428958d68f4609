// CPU kernels of the randomized-smoothing ops (robustkern::smoothing_noise / smoothing_count), bit-identical
// to the pure-PyTorch specification in robustkern/reference/smoothing.py: for block j = e / 4 of row r,
//
//   (o0, o1, o2, o3) = Philox4x32-10(counter = (j, sample[r], image[r], stream[r]), key = (seed_lo, seed_hi))
//   U(o) = (o + 1/2) 2^-32; rho = sqrt(-2 log U(o0|o2)), theta = fl(2 pi U(o1|o3))   (float64, exact U)
//   z[4j..4j+3] = fp32(rho_A cos theta_A, rho_A sin theta_A, rho_B cos theta_B, rho_B sin theta_B)
//   v  = fp32(x[src[r], e]) + fp32(sigma) * z[e]                     (fp32: a product, then a sum)
//   out[r, e] = cast_out( (v - mean[c]) / std[c] )                   (fp32; cast with round-to-nearest-even)
//
// Rows (one noisy copy each) are split across threads with at::parallel_for; each row is processed in chunks
// of kChunk elements: the normals (on AVX2 + FMA CPUs by csrc/cpu/smoothing_normal_avx2.cpp, with its own
// float64 log / sin / cos; elsewhere by the portable path below: the Philox rounds as a plain loop, log / cos /
// sin by ATen's own float64 CPU kernels, as in the reference), then the fused noise + normalisation + cast.
// A channels-last output of an image with 2-4 channels is written pixel-major instead (noise_rows_pixel_major).
// This file is compiled without -ffast-math and without FMA (the x86-64 baseline has none): the fp32 product
// and sum round separately, as in the reference.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/cos.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/log.h>
#include <ATen/ops/sin.h>
#include <ATen/ops/zeros.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <optional>
#include <vector>

#include "robustkern/check.h"
#include "robustkern/options.h"

namespace robustkern {
namespace smoothing_detail {  // csrc/cpu/smoothing_normal_avx2.cpp
bool have_avx2_fma();
// z[i] = the fp32 normal of counter (e0 + i, c1, c2, c3) for i < n, rounded up to a multiple of 16 (z must
// hold that many); e0 a multiple of 4
void normal_chunk_avx2(uint32_t e0, int64_t n, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t key0,
                       uint32_t key1, float* z);
}  // namespace smoothing_detail

namespace {

constexpr uint32_t kM0 = 0xD2511F53u;  // Philox4x32 multipliers
constexpr uint32_t kM1 = 0xCD9E8D57u;
constexpr uint32_t kW0 = 0x9E3779B9u;  // Weyl key increments
constexpr uint32_t kW1 = 0xBB67AE85u;
constexpr double kTwoPi = 6.283185307179586;  // 2.0 * math.pi (float64)
constexpr double kInv2to32 = 1.0 / 4294967296.0;
constexpr int64_t kChunk = 2048;      // elements of one row per Philox / Box-Muller pass
constexpr int64_t kGrain = 32768;     // elements per parallel task

// The four output words of Philox4x32-10 for counters (j0 + i, c1, c2, c3), i in [0, n).
inline void philox_chunk(const uint32_t j0, const int64_t n, const uint32_t c1_, const uint32_t c2_,
                         const uint32_t c3_, const uint32_t key0, const uint32_t key1, uint32_t* __restrict__ out0,
                         uint32_t* __restrict__ out1, uint32_t* __restrict__ out2, uint32_t* __restrict__ out3) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    uint32_t c0 = j0 + static_cast<uint32_t>(i), c1 = c1_, c2 = c2_, c3 = c3_;
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
    out2[i] = c2;
    out3[i] = c3;
  }
}

// cpu_options().portable_simd forces the portable path (tests compare the two on the same machine).
inline bool portable_forced() { return robustkern::cpu_options().portable_simd.load(std::memory_order_relaxed); }

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
  bool vector;             // use the AVX2 + FMA normals
  bool channels_last;      // write out (R, C, H, W) in channels-last memory
  int64_t channels;
  int64_t rows, d, hw;     // hw: elements per channel
};

// The counter words of row r: (image key, sample index, stream).
struct RowKey {
  uint32_t image, sample, stream;
};
inline RowKey row_key(const NoiseArgs& a, int64_t r) {
  return {static_cast<uint32_t>(a.counter[3 * r + 0]), static_cast<uint32_t>(a.counter[3 * r + 1]),
          static_cast<uint32_t>(a.counter[3 * r + 2])};
}

// The portable path: the Philox rounds as a plain (auto-vectorised) loop, log / cos / sin by ATen's own
// float64 kernels (the ones the reference calls; serial here, inside at::parallel_for). Buffers: o (4 kBlk
// words), rho (2 kBlk: A then B), theta, cos, sin (2 kBlk each); t_* wrap them.
constexpr int64_t kBlk = kChunk / 4;  // Philox blocks per chunk
struct PortableBuffers {
  std::vector<uint32_t> o = std::vector<uint32_t>(4 * kBlk);
  std::vector<double> f = std::vector<double>(8 * kBlk);
  at::Tensor rho, theta, cs, sn;
  PortableBuffers() {
    const auto dopt = at::TensorOptions().dtype(at::kDouble);
    rho = at::from_blob(f.data(), {2 * kBlk}, dopt);
    theta = at::from_blob(f.data() + 2 * kBlk, {2 * kBlk}, dopt);
    cs = at::from_blob(f.data() + 4 * kBlk, {2 * kBlk}, dopt);
    sn = at::from_blob(f.data() + 6 * kBlk, {2 * kBlk}, dopt);
  }
};

inline void normal_chunk_portable(uint32_t e0, int64_t n, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t key0,
                                  uint32_t key1, PortableBuffers& b, float* z) {
  const int64_t nb = (n + 3) / 4;
  uint32_t* o = b.o.data();
  philox_chunk(e0 / 4, nb, c1, c2, c3, key0, key1, o, o + kBlk, o + 2 * kBlk, o + 3 * kBlk);
  double* rho = b.f.data();
  double* theta = rho + 2 * kBlk;
  for (int p = 0; p < 2; ++p) {  // pair A: words 0, 1; pair B: words 2, 3
    const uint32_t* orho = o + (2 * p) * kBlk;
    const uint32_t* otheta = o + (2 * p + 1) * kBlk;
#pragma omp simd
    for (int64_t i = 0; i < nb; ++i) {
      rho[p * kBlk + i] = (static_cast<double>(orho[i]) + 0.5) * kInv2to32;
      theta[p * kBlk + i] = kTwoPi * ((static_cast<double>(otheta[i]) + 0.5) * kInv2to32);
    }
  }
  at::log_(b.rho);
  at::cos_out(b.cs, b.theta);
  at::sin_out(b.sn, b.theta);
  const double* cs = rho + 4 * kBlk;
  const double* sn = rho + 6 * kBlk;
  for (int64_t i = 0; i < nb; ++i) {
    const double ra = std::sqrt(-2.0 * rho[i]), rb = std::sqrt(-2.0 * rho[kBlk + i]);
    const double v[4] = {ra * cs[i], ra * sn[i], rb * cs[kBlk + i], rb * sn[kBlk + i]};
    for (int w = 0; w < 4 && 4 * i + w < n; ++w) z[4 * i + w] = static_cast<float>(v[w]);
  }
}

template <typename Out, bool kNorm, bool kCL>
void noise_rows(const NoiseArgs& a, Out* __restrict__ out, int64_t begin, int64_t end) {
  // AVX2 + FMA: Philox and Box-Muller with csrc/cpu/smoothing_normal_avx2.cpp's own float64 log / cos;
  // otherwise the portable path. The buffers of the portable path are only touched there.
  const bool vector = a.vector;
  alignas(64) float z[kChunk];
  std::optional<PortableBuffers> pb;
  if (!vector) pb.emplace();
  const float sigma = a.sigma;
  for (int64_t r = begin; r < end; ++r) {
    const float* __restrict__ xr = a.x + a.src[r] * a.d;
    Out* __restrict__ orow = out + r * a.d;
    const RowKey k = row_key(a, r);
    const uint32_t image = k.image, sample = k.sample, stream = k.stream;
    for (int64_t e0 = 0; e0 < a.d; e0 += kChunk) {
      const int64_t n = std::min(kChunk, a.d - e0);
      if (vector) {
        smoothing_detail::normal_chunk_avx2(static_cast<uint32_t>(e0), n, sample, image, stream, a.key0, a.key1,
                                            z);
      } else {
        normal_chunk_portable(static_cast<uint32_t>(e0), n, sample, image, stream, a.key0, a.key1, *pb, z);
      }
      if constexpr (kNorm || kCL) {
        // runs of one channel inside the chunk; channels-last output: element (c, p) of the row at p C + c
        int64_t i = 0;
        while (i < n) {
          const int64_t e = e0 + i;
          const int64_t c = e / a.hw;
          const int64_t stop = std::min(n, (c + 1) * a.hw - e0);
          const float m = kNorm ? a.mean[c] : 0.0f, s = kNorm ? a.std[c] : 1.0f;
          Out* __restrict__ ob = kCL ? orow + c - (c * a.hw) * a.channels : orow;
          const int64_t step = kCL ? a.channels : 1;
#pragma omp simd
          for (int64_t j = i; j < stop; ++j) {
            const float noise = sigma * z[j];
            const float v = xr[e0 + j] + noise;
            ob[(e0 + j) * step] = cast_out<Out>(kNorm ? (v - m) / s : v);
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

// Channels-last output with few channels (images: C <= kPixelMajorMaxC): pixel-major, so that the output row is
// written in order. For a block of kPixelBlock pixels the normals of each channel's run (elements c * hw + p, a
// multiple of 4 as the generator needs: hw % 4 == 0) are drawn first, then out[p * C + c] is written for every
// pixel and channel. The same normals and the same fp32 expression as noise_rows, so the same bits. The
// channel-by-channel path writes with stride C: 6.1 ms against 5.3 ms here for 400 3x32x32 images (1 thread).
constexpr int64_t kPixelMajorMaxC = 4;
constexpr int64_t kPixelBlock = 512;  // a multiple of 16 (the generator's rounding)

inline bool pixel_major(const NoiseArgs& a) {
  return a.channels_last && a.channels <= kPixelMajorMaxC && a.hw % 4 == 0;
}

template <typename Out, bool kNorm>
void noise_rows_pixel_major(const NoiseArgs& a, Out* __restrict__ out, int64_t begin, int64_t end) {
  const int64_t C = a.channels, hw = a.hw;
  alignas(64) float z[kPixelMajorMaxC][kPixelBlock];
  std::optional<PortableBuffers> pb;
  if (!a.vector) pb.emplace();
  const float sigma = a.sigma;
  float m[kPixelMajorMaxC], sd[kPixelMajorMaxC];
  for (int64_t c = 0; c < C; ++c) {
    m[c] = kNorm ? a.mean[c] : 0.0f;
    sd[c] = kNorm ? a.std[c] : 1.0f;
  }
  for (int64_t r = begin; r < end; ++r) {
    const float* __restrict__ xr = a.x + a.src[r] * a.d;
    Out* __restrict__ orow = out + r * a.d;
    const RowKey k = row_key(a, r);
    const uint32_t image = k.image, sample = k.sample, stream = k.stream;
    for (int64_t p0 = 0; p0 < hw; p0 += kPixelBlock) {
      const int64_t np = std::min(kPixelBlock, hw - p0);
      for (int64_t c = 0; c < C; ++c) {
        const uint32_t e0 = static_cast<uint32_t>(c * hw + p0);
        if (a.vector) {
          smoothing_detail::normal_chunk_avx2(e0, np, sample, image, stream, a.key0, a.key1, z[c]);
        } else {
          normal_chunk_portable(e0, np, sample, image, stream, a.key0, a.key1, *pb, z[c]);
        }
      }
      Out* __restrict__ ob = orow + p0 * C;
      for (int64_t j = 0; j < np; ++j) {
        for (int64_t c = 0; c < C; ++c) {
          const float noise = sigma * z[c][j];
          const float v = xr[c * hw + p0 + j] + noise;
          ob[j * C + c] = cast_out<Out>(kNorm ? (v - m[c]) / sd[c] : v);
        }
      }
    }
  }
}

template <typename Out>
void noise_launch(const NoiseArgs& a, Out* out) {
  const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(1, a.d));
  at::parallel_for(0, a.rows, grain, [&](int64_t begin, int64_t end) {
    if (pixel_major(a)) {
      if (a.mean != nullptr) {
        noise_rows_pixel_major<Out, true>(a, out, begin, end);
      } else {
        noise_rows_pixel_major<Out, false>(a, out, begin, end);
      }
      return;
    }
    if (a.mean != nullptr) {
      if (a.channels_last) {
        noise_rows<Out, true, true>(a, out, begin, end);
      } else {
        noise_rows<Out, true, false>(a, out, begin, end);
      }
    } else if (a.channels_last) {
      noise_rows<Out, false, true>(a, out, begin, end);
    } else {
      noise_rows<Out, false, false>(a, out, begin, end);
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
  // the output takes x's memory format: channels-last when x is (strictly) channels-last contiguous
  const bool channels_last = x.dim() == 4 && !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
  at::Tensor out = at::empty(shape, x.options().dtype(out_dtype).memory_format(
                                        channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous));
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
  a.vector = smoothing_detail::have_avx2_fma() && !portable_forced();
  a.key0 = static_cast<uint32_t>(seed_bits);
  a.key1 = static_cast<uint32_t>(seed_bits >> 32);
  a.rows = rows;
  a.d = d;
  a.hw = d / channels;
  a.channels = channels;
  a.channels_last = channels_last;

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

TORCH_LIBRARY_IMPL(robustkern, CPU, m) {
  m.impl("smoothing_noise", &smoothing_noise_cpu);
  m.impl("smoothing_count", &smoothing_count_cpu);
}

}  // namespace robustkern
