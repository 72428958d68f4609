// Output allocation for large CPU kernel results: transparent huge pages where the kernel allows them.
//
// A fresh tensor of more than a few MB comes from glibc's mmap (above its 32 MB dynamic threshold every time),
// so the first write to each 4 KB page faults and the kernel zeroes it: for the (B, S, N) coefficient tensors
// of CROWN at batch 256 (hundreds of MB) those faults cost more than the kernel's own arithmetic (measured on
// one AMD EPYC core: a 150 MB element-wise output 0.11 s with 4 KB pages, 0.027 s with madvise'd 2 MB pages).
// `empty_huge` asks for 2 MB pages on the 2 MB-aligned interior of the allocation before it is first touched
// (madvise(MADV_HUGEPAGE), which is what PyTorch's own THP_MEM_ALLOC_ENABLE=1 does for every allocation;
// robustkern does it only for its own large outputs and needs no environment variable). Where the system
// has transparent huge pages off, or the call fails, nothing changes: the advice is a hint.
// cpu_options().huge_pages = false (robustkern.cpu_malloc.huge_pages(False)) turns the advice off.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include "robustkern/options.h"

#include <cstdint>
#include <cstdlib>
#include <cstring>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace robustkern {

// Smallest allocation advised (smaller ones are usually recycled by the allocator, already faulted in).
constexpr size_t kHugeAdviseMinBytes = size_t(8) << 20;

inline bool huge_pages_enabled() { return cpu_options().huge_pages.load(std::memory_order_relaxed); }

inline void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const size_t nbytes = t.nbytes();
  if (!t.is_cpu() || nbytes < kHugeAdviseMinBytes || !huge_pages_enabled()) return;
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const uintptr_t p = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t start = (p + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (p + nbytes) & ~(kHuge - 1);
  if (end > start) (void)madvise(reinterpret_cast<void*>(start), end - start, MADV_HUGEPAGE);
#else
  (void)t;
#endif
}

// at::empty(sizes, options), contiguous, with huge pages advised when large (see above).
inline at::Tensor empty_huge(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = at::empty(sizes, options);
  advise_huge_pages(t);
  return t;
}

// A contiguous uninitialised tensor of `like`'s sizes and options, huge pages advised when large.
inline at::Tensor empty_huge_like(const at::Tensor& like) {
  return empty_huge(like.sizes(), like.options().memory_format(at::MemoryFormat::Contiguous));
}

}  // namespace robustkern
