// Cache warming for the CPU kernels that read short rows far apart (leaves, patches), which DRAM serves slowly.
#pragma once

#include <cstdint>

namespace mixres {

// Reads one byte per cache line, in address order, so that the hardware prefetcher streams the whole range in.
inline void warm_cache(const void* data, int64_t bytes) {
  const unsigned char* begin = static_cast<const unsigned char*>(data);
  unsigned char sink = 0;
  for (int64_t offset = 0; offset < bytes; offset += 64) sink ^= begin[offset];
  asm volatile("" : : "r"(sink));  // keeps the loads
}

}  // namespace mixres
