// Process-wide options of the CPU kernels, set from Python with torch.ops.robustkern.cpu_options (the Python
// API: robustkern.cpu_malloc.huge_pages, robustkern.testing.portable_simd); no environment variables.
//   portable_simd  run the portable code paths instead of the AVX2 ones (tests compare the two on one machine)
//   huge_pages     advise transparent huge pages for large kernel outputs (robustkern/alloc.h); on by default
#pragma once

#include <atomic>

namespace robustkern {

struct CpuOptions {
  std::atomic<bool> portable_simd{false};
  std::atomic<bool> huge_pages{true};
};

inline CpuOptions& cpu_options() {
  static CpuOptions options;
  return options;
}

}  // namespace robustkern
