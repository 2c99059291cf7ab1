// Launch shapes and shared-memory budgets common to the CUDA kernels.
#pragma once

#include <c10/cuda/CUDAException.h>

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdint>

namespace mixres {

constexpr int kThreads = 256;  // threads per block (at most, where a kernel sizes its blocks to the work)
constexpr int kWarps = kThreads / 32;
constexpr int64_t kMaxBlocks = int64_t{1} << 20;  // caps the grid; the kernels stride over the rest
constexpr int kDefaultSharedBytes = 48 * 1024;    // what a launch may use without opting in

// The grid of a kernel that gives each thread one of `work` items.
inline unsigned int n_blocks(int64_t work) {
  return static_cast<unsigned int>(std::min(kMaxBlocks, (work + kThreads - 1) / kThreads));
}

// Up to this much work, the grid-stride loops of a capped grid count in int32 without overflow: the index stays
// below work + kMaxBlocks * kThreads.
constexpr int64_t kMax32BitWork = int64_t{1} << 30;
static_assert(kMax32BitWork + kMaxBlocks * kThreads <= int64_t{1} << 31, "int32 grid-stride indices would overflow");

// Calls launch(index_t{}) with index_t = int32_t where `work` allows it (cheaper index arithmetic), else int64_t.
template <typename Launch>
void dispatch_index_type(int64_t work, const Launch& launch) {
  if (work <= kMax32BitWork) {
    launch(int32_t{0});
  } else {
    launch(int64_t{0});
  }
}

// The most shared memory a block may use on the current device, static and dynamic together, once its kernel opts
// in. An attribute query, not a synchronisation.
inline int64_t shared_bytes_limit() {
  int device_index = 0;
  int limit = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device_index));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device_index));
  return limit;
}

// Lets `kernel` launch with `dynamic_bytes` of dynamic shared memory, opting in where that is above the default.
template <typename Kernel>
void allow_dynamic_shared_bytes(Kernel kernel, int64_t dynamic_bytes) {
  if (dynamic_bytes > kDefaultSharedBytes) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(dynamic_bytes)));
  }
}

}  // namespace mixres
