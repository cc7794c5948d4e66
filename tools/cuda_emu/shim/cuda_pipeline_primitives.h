// cp.async emulation: copies are queued per thread and land at __pipeline_wait_prior (late, the default) or at
// once (EMU_ASYNC=early), so code that reads before waiting and synchronising sees stale data.
#pragma once
#include <cstddef>
#include "emu.h"
namespace emu {
void async_copy(void* dst, const void* src, size_t n);
void async_commit();
void async_wait(size_t prior);
}  // namespace emu
inline void __pipeline_memcpy_async(void* dst, const void* src, size_t n, size_t zfill = 0) {
  if (zfill) std::abort();
  emu::async_copy(dst, src, n);
}
inline void __pipeline_commit() { emu::async_commit(); }
inline void __pipeline_wait_prior(size_t n) { emu::async_wait(n); }
