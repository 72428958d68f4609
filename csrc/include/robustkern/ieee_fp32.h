// Scope in which float32 GEMMs and convolutions run in IEEE float32: no TF32 (cuBLAS, cuBLASLt, oneDNN),
// no bfloat16 (oneDNN's "medium" matmul precision), no NNPACK (Winograd / FFT convolutions on CPU).
// The rounding-error bounds of the interval ops hold only for IEEE products (robustkern/reference/interval.py).
//
// cuBLAS honours the thread-local at::NoTF32Guard; cuBLASLt (addmm with bias, bmm) and oneDNN read the
// process-wide settings, so those are switched to IEEE for the scope and restored exactly afterwards. That
// is not thread-safe against another thread changing or reading the settings at the same moment (the same
// holds for torch.backends flags in Python). Convolutions additionally pass allow_tf32=false to
// at::_convolution, which is what cuDNN reads.
//
// Autocast is excluded for the scope too: a kernel called inside the user's torch.autocast region runs its
// products on the dtypes it was given, so the caller needs no Python-side context around a compiled kernel.
//
// Needs the Float32Backend / Float32Op precision API of torch >= 2.10.
#pragma once

#include <ATen/Context.h>
#include <c10/core/DispatchKeySet.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

namespace robustkern {

class IeeeFp32Scope {
 public:
  // active = false: only autocast is excluded (float64 inputs). conv: also keep NNPACK off. Settings are
  // touched only when they allow reduced precision.
  explicit IeeeFp32Scope(bool active, bool conv = false) {
    if (!active) return;
    auto& ctx = at::globalContext();
    using B = at::Float32Backend;
    using O = at::Float32Op;
    legacy_ = ctx.float32MatmulPrecision();
    cuda_mm_ = ctx.float32Precision(B::CUDA, O::MATMUL);
    onednn_mm_ = ctx.float32Precision(B::MKLDNN, O::MATMUL);
    onednn_conv_ = ctx.float32Precision(B::MKLDNN, O::CONV);
    // Entries left at "none" inherit from these.
    const bool inherited = reduced(ctx.float32Precision(B::MKLDNN, O::ALL)) ||
                           reduced(ctx.float32Precision(B::GENERIC, O::ALL));
    precision_changed_ = legacy_ != at::Float32MatmulPrecision::HIGHEST || reduced(cuda_mm_) ||
                         reduced(onednn_mm_) || reduced(onednn_conv_) || inherited;
    if (precision_changed_) {
      ctx.setFloat32MatmulPrecision("highest");  // legacy flag, CUDA and oneDNN matmul -> IEEE
      ctx.setFloat32Precision(B::CUDA, O::MATMUL, at::Float32Precision::IEEE);
      ctx.setFloat32Precision(B::MKLDNN, O::MATMUL, at::Float32Precision::IEEE);
      ctx.setFloat32Precision(B::MKLDNN, O::CONV, at::Float32Precision::IEEE);
    }
    nnpack_changed_ = conv && ctx.userEnabledNNPACK();
    if (nnpack_changed_) ctx.setUserEnabledNNPACK(false);
  }

  ~IeeeFp32Scope() {
    auto& ctx = at::globalContext();
    using B = at::Float32Backend;
    using O = at::Float32Op;
    if (precision_changed_) {
      ctx.setFloat32MatmulPrecision(legacy_ == at::Float32MatmulPrecision::HIGHEST ? "highest"
                                    : legacy_ == at::Float32MatmulPrecision::HIGH  ? "high"
                                                                                   : "medium");
      ctx.setFloat32Precision(B::CUDA, O::MATMUL, cuda_mm_);
      ctx.setFloat32Precision(B::MKLDNN, O::MATMUL, onednn_mm_);
      ctx.setFloat32Precision(B::MKLDNN, O::CONV, onednn_conv_);
    }
    if (nnpack_changed_) ctx.setUserEnabledNNPACK(true);
  }

  IeeeFp32Scope(const IeeeFp32Scope&) = delete;
  IeeeFp32Scope& operator=(const IeeeFp32Scope&) = delete;

 private:
  static bool reduced(at::Float32Precision p) {
    return p == at::Float32Precision::TF32 || p == at::Float32Precision::BF16;
  }

  at::NoTF32Guard no_tf32_;
  c10::impl::ExcludeDispatchKeyGuard no_autocast_{c10::autocast_dispatch_keyset};
  bool precision_changed_ = false;
  bool nnpack_changed_ = false;
  at::Float32MatmulPrecision legacy_ = at::Float32MatmulPrecision::HIGHEST;
  at::Float32Precision cuda_mm_ = at::Float32Precision::NONE;
  at::Float32Precision onednn_mm_ = at::Float32Precision::NONE;
  at::Float32Precision onednn_conv_ = at::Float32Precision::NONE;
};

}  // namespace robustkern
