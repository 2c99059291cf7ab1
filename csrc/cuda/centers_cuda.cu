// Leaf centres on CUDA: (corner + size / 2) / min_patch_size - 0.5, per axis, one thread per leaf.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>

#include "../box.h"
#include "../leaf_center.h"
#include "../op_checks.h"
#include "launch.cuh"

namespace mixres {
namespace {

__global__ void __launch_bounds__(kThreads)
leaf_centers_kernel(const Box* __restrict__ boxes, float* __restrict__ centers, int64_t n_leaves, float unit) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n_leaves; i += stride) {
    const Box box = boxes[i];
    // Writing both coordinates as one float2 keeps the stores coalesced.
    reinterpret_cast<float2*>(centers)[i] =
        make_float2(leaf_center(box.y, box.size, unit), leaf_center(box.x, box.size, unit));
  }
}

at::Tensor leaf_centers_cuda(const at::Tensor& boxes, int64_t min_patch_size) {
  check_centers_args(boxes, min_patch_size);
  TORCH_CHECK_VALUE(boxes.is_cuda(), "mixres.leaf_centers: boxes must be a CUDA tensor, got ", boxes.device());
  const c10::cuda::CUDAGuard guard(boxes.device());
  auto centers = at::empty({boxes.size(0), boxes.size(1), 2}, boxes.options().dtype(at::kFloat));
  const int64_t n_leaves = boxes.size(0) * boxes.size(1);
  if (n_leaves == 0) return centers;
  const auto src = boxes.contiguous();
  leaf_centers_kernel<<<n_blocks(n_leaves), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      box_data(src), centers.mutable_data_ptr<float>(), n_leaves,
      static_cast<float>(min_patch_size));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return centers;
}

}  // namespace

TORCH_LIBRARY_IMPL(mixres, CUDA, m) { m.impl("leaf_centers", &leaf_centers_cuda); }

}  // namespace mixres
