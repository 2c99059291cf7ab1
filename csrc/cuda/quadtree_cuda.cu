// Greedy quadtree on CUDA, with a fixed budget or adaptive: one thread block per image, the image's leaves in
// shared memory.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>

#include "../box.h"
#include "../op_checks.h"
#include "launch.cuh"

namespace mixres {
namespace {

// A leaf is one int64: its canonical order key shifted left, its level in the low bits. Keys are unique within a
// mosaic, so comparing packed leaves compares keys, and the final sort is a plain integer sort.
constexpr int kLevelBits = 4;
constexpr int64_t kLevelMask = (int64_t{1} << kLevelBits) - 1;
static_assert(kMaxLevels <= (1 << kLevelBits), "the level must fit in the low bits of a packed leaf");
constexpr int64_t kPadLeaf = std::numeric_limits<int64_t>::max();  // sorts after every real leaf

template <typename scalar_t>
struct Best {
  scalar_t score;
  int64_t leaf;
  int32_t slot;  // -1: no candidate
};

// The greedy order: highest score first, then smallest key. (score, key) is a total order on candidates because
// keys are unique, so the reduction's shape cannot change which leaf wins.
template <typename scalar_t>
__device__ __forceinline__ bool beats(const Best<scalar_t>& a, const Best<scalar_t>& b) {
  return a.slot >= 0 && (b.slot < 0 || a.score > b.score || (a.score == b.score && a.leaf < b.leaf));
}

template <typename scalar_t>
__device__ __forceinline__ Best<scalar_t> shuffle_down(const Best<scalar_t>& v, int delta) {
  Best<scalar_t> out;
  out.score = __shfl_down_sync(0xffffffffu, v.score, delta);
  out.leaf = __shfl_down_sync(0xffffffffu, v.leaf, delta);
  out.slot = __shfl_down_sync(0xffffffffu, v.slot, delta);
  return out;
}

__device__ __forceinline__ int64_t pack_leaf(const PyramidLayout& layout, int64_t y, int64_t x, int32_t level) {
  return (layout.order_key(y, x) << kLevelBits) | level;
}

__device__ __forceinline__ bool is_finite_score(float v) { return isfinite(v); }
__device__ __forceinline__ bool is_finite_score(double v) { return isfinite(v); }

// Shared (or workspace) memory of one image: leaves[sort_size] | leaf_scores[n_patches] | staged pyramid[n_scores].
// Slot s holds a leaf and, when it can still be split, its score. sort_size is n_patches rounded up to a power of
// two, for the bitonic sort at the end.
//
// Image b stops before the split that would take it past budgets[b] leaves (n_patches when budgets is null), or
// before splitting a leaf that scores at or below thresholds[its level] (never when thresholds is null). Its leaves
// go to boxes in canonical order, then (0, 0, 0) boxes up to n_patches; their count to lengths[b] (unless null).
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
build_quadtree_kernel(const scalar_t* __restrict__ scores, const PyramidLayout layout, int32_t n_patches,
                      const int64_t* __restrict__ budgets, const scalar_t* __restrict__ thresholds,
                      int32_t sort_size, bool stage_pyramid, unsigned char* __restrict__ workspace,
                      int64_t workspace_stride, Box* __restrict__ boxes, int32_t* __restrict__ lengths) {
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  __shared__ scalar_t warp_score[kWarps];
  __shared__ int64_t warp_leaf[kWarps];
  __shared__ int32_t warp_slot[kWarps];
  __shared__ scalar_t level_threshold[kMaxLevels];

  const int64_t image = blockIdx.x;
  unsigned char* memory = workspace != nullptr ? workspace + image * workspace_stride : shared_bytes;
  int64_t* leaves = reinterpret_cast<int64_t*>(memory);
  scalar_t* leaf_scores = reinterpret_cast<scalar_t*>(leaves + sort_size);
  scalar_t* staged = leaf_scores + n_patches;

  const int tid = threadIdx.x;
  const int n_threads = blockDim.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int n_warps = n_threads >> 5;
  const int last_level = layout.n_levels - 1;
  const int64_t width = layout.width;

  // The CPU op rejects a non-finite score anywhere in the pyramid, read or not; without a host sync the closest
  // equivalent is a device assert over every score. The same pass stages the pyramid in shared memory, so that
  // the serial split loop below never waits on global memory.
  const scalar_t* image_scores = scores + image * layout.n_scores();
  for (int64_t i = tid; i < layout.n_scores(); i += n_threads) {
    const scalar_t v = image_scores[i];
    CUDA_KERNEL_ASSERT(is_finite_score(v) && "mixres.build_quadtree: scores must be finite");
    if (stage_pyramid) staged[i] = v;
  }
  const scalar_t* pyramid = stage_pyramid ? staged : image_scores;
  // The thresholds, finite as the CPU op requires, staged for the split loop (n_splittable < kMaxLevels <= 32
  // threads); the barrier after the roots publishes them.
  if (thresholds != nullptr && tid < layout.n_splittable()) {
    const scalar_t threshold = thresholds[tid];
    CUDA_KERNEL_ASSERT(is_finite_score(threshold) && "mixres.build_quadtree_adaptive: thresholds must be finite");
    level_threshold[tid] = threshold;
  }

  const int32_t n_roots = static_cast<int32_t>(layout.n_roots());
  // The CPU op rejects an unreachable budget; here a device assert, like non-finite scores. Where asserts are
  // compiled out, the image gets no leaf at all (lengths 0, every box padding), which no valid budget gives.
  const int64_t budget = budgets != nullptr ? budgets[image] : n_patches;
  const bool budget_ok = budget <= n_patches && reachable(layout, budget);
  CUDA_KERNEL_ASSERT(budget_ok && "mixres.build_quadtree_adaptive: budgets must be n_roots + 3k <= max_patches");
  const int32_t n_splits = budget_ok ? static_cast<int32_t>((budget - n_roots) / 3) : 0;
  const int64_t root_cols = layout.cols(0);
  for (int32_t i = tid; i < n_roots; i += n_threads) {
    const int64_t y = (i / root_cols) * layout.max_size;
    const int64_t x = (i % root_cols) * layout.max_size;
    leaves[i] = pack_leaf(layout, y, x, 0);
    // Root i is cell i of the level-0 map.
    leaf_scores[i] = last_level > 0 ? image_scores[i] : scalar_t(0);
  }
  __syncthreads();

  int32_t count = n_roots;
  for (int32_t step = 0; step < n_splits; ++step, count += 3) {
    Best<scalar_t> best{scalar_t(0), kPadLeaf, -1};
    for (int32_t s = tid; s < count; s += n_threads) {
      const int64_t leaf = leaves[s];
      if ((leaf & kLevelMask) < last_level) {
        const Best<scalar_t> candidate{leaf_scores[s], leaf, s};
        if (beats(candidate, best)) best = candidate;
      }
    }
#pragma unroll
    for (int delta = 16; delta > 0; delta >>= 1) {
      const Best<scalar_t> other = shuffle_down(best, delta);
      if (beats(other, best)) best = other;
    }
    if (lane == 0) {
      warp_score[warp] = best.score;
      warp_leaf[warp] = best.leaf;
      warp_slot[warp] = best.slot;
    }
    __syncthreads();
    // Every thread reduces the few warp winners itself: no second barrier to broadcast the result.
    best = Best<scalar_t>{warp_score[0], warp_leaf[0], warp_slot[0]};
    for (int w = 1; w < n_warps; ++w) {
      const Best<scalar_t> other{warp_score[w], warp_leaf[w], warp_slot[w]};
      if (beats(other, best)) best = other;
    }
    // check_budget guarantees a candidate at every step; only NaN scores (already asserted on) can leave none.
    if (best.slot < 0) break;  // uniform: every thread read the same winners
    // The stopping rule, uniform too. The winners stay unread from here on, so no barrier is missing.
    if (thresholds != nullptr && best.score <= level_threshold[best.leaf & kLevelMask]) break;
    if (tid < 4) {
      const int64_t key = best.leaf >> kLevelBits;
      const int32_t level = static_cast<int32_t>(best.leaf & kLevelMask) + 1;
      const int64_t half = layout.size(level);
      const int64_t y = key / width + (tid >> 1) * half;
      const int64_t x = key % width + (tid & 1) * half;
      // The first quadrant takes the parent's slot, the others are appended.
      const int32_t slot = tid == 0 ? best.slot : count + tid - 1;
      leaves[slot] = pack_leaf(layout, y, x, level);
      if (level < last_level) {
        leaf_scores[slot] = pyramid[layout.cell_index(level, y / half, x / half)];
      }
    }
    // Publishes the children before the next scan, and keeps the warp winners until everyone has read them.
    __syncthreads();
  }

  // Slots [0, count) hold the leaves; an early stop leaves the slots after them unwritten.
  if (!budget_ok) count = 0;
  // Bitonic sort of the packed leaves, padded to a power of two.
  for (int32_t i = count + tid; i < sort_size; i += n_threads) leaves[i] = kPadLeaf;
  __syncthreads();
  for (int32_t k = 2; k <= sort_size; k <<= 1) {
    for (int32_t j = k >> 1; j > 0; j >>= 1) {
      for (int32_t i = tid; i < sort_size / 2; i += n_threads) {
        const int32_t lo = ((i & ~(j - 1)) << 1) | (i & (j - 1));
        const int32_t hi = lo | j;
        const int64_t a = leaves[lo];
        const int64_t b = leaves[hi];
        if ((a > b) == ((lo & k) == 0)) {
          leaves[lo] = b;
          leaves[hi] = a;
        }
      }
      __syncthreads();
    }
  }

  Box* out = boxes + image * n_patches;
  for (int32_t i = tid; i < n_patches; i += n_threads) {
    if (i < count) {
      const int64_t leaf = leaves[i];
      const int64_t key = leaf >> kLevelBits;
      out[i] = Box{static_cast<int32_t>(key / width), static_cast<int32_t>(key % width),
                   static_cast<int32_t>(layout.size(static_cast<int>(leaf & kLevelMask)))};
    } else {
      out[i] = Box{0, 0, 0};  // padding: no leaf has size 0
    }
  }
  if (lengths != nullptr && tid == 0) lengths[image] = count;
}

int64_t round_up_pow2(int64_t v) {
  int64_t p = 1;
  while (p < v) p <<= 1;
  return p;
}

// The limits of the kernel's packed leaves (y * width + x above the level bits) and int32 slots and sort indices.
void check_cuda_limits(const at::Tensor& scores, int64_t height, int64_t width, int64_t n_patches, const char* op) {
  TORCH_CHECK_VALUE(scores.is_cuda(), op, ": scores must be a CUDA tensor, got ", scores.device());
  TORCH_CHECK_VALUE(height * width < (int64_t{1} << (62 - kLevelBits)) && n_patches <= (int64_t{1} << 29), op,
                    ": a ", height, "x", width, " image with ", n_patches, " patches is too large for the CUDA kernel");
  TORCH_CHECK_VALUE(scores.size(0) <= std::numeric_limits<int32_t>::max(), op, ": batch too large: ",
                    scores.size(0));
}

// Runs the kernel over every image of a non-empty batch on the current device. budgets (int64, contiguous),
// thresholds (contiguous) and lengths may be undefined: see build_quadtree_kernel.
void launch_build_quadtree(const at::Tensor& scores, const PyramidLayout& layout, int64_t n_patches,
                           const at::Tensor& budgets, const at::Tensor& thresholds, const at::Tensor& boxes,
                           const at::Tensor& lengths) {
  const int64_t batch = scores.size(0);
  const int64_t sort_size = round_up_pow2(n_patches);
  const int threads = static_cast<int>(std::min<int64_t>(kThreads, std::max<int64_t>(32, sort_size / 2)));

  const auto packed = scores.contiguous();
  const int64_t shared_limit = shared_bytes_limit();
  const auto stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES(packed.scalar_type(), "mixres_build_quadtree_cuda", [&] {
    const int64_t static_bytes = kWarps * static_cast<int64_t>(sizeof(scalar_t) + sizeof(int64_t) + sizeof(int32_t)) +
                                 kMaxLevels * static_cast<int64_t>(sizeof(scalar_t));
    const int64_t dynamic_limit = shared_limit - static_bytes;
    const int64_t leaf_bytes = sort_size * static_cast<int64_t>(sizeof(int64_t)) +
                               n_patches * static_cast<int64_t>(sizeof(scalar_t));
    const int64_t staged_bytes = leaf_bytes + layout.n_scores() * static_cast<int64_t>(sizeof(scalar_t));
    bool stage_pyramid = true;
    int64_t shared_bytes = staged_bytes;
    if (shared_bytes > dynamic_limit) {
      stage_pyramid = false;
      shared_bytes = leaf_bytes;
    }
    // Too many leaves for shared memory: the same kernel runs on a global-memory workspace (slower, but the
    // shapes stay static and nothing waits on the host).
    at::Tensor workspace;
    int64_t workspace_stride = 0;
    if (shared_bytes > dynamic_limit) {
      workspace_stride = (leaf_bytes + 15) / 16 * 16;
      workspace = at::empty({batch * workspace_stride}, packed.options().dtype(at::kByte));
      shared_bytes = 0;
    }
    auto kernel = build_quadtree_kernel<scalar_t>;
    allow_dynamic_shared_bytes(kernel, shared_bytes);
    kernel<<<static_cast<unsigned int>(batch), threads, static_cast<size_t>(shared_bytes), stream>>>(
        packed.const_data_ptr<scalar_t>(), layout, static_cast<int32_t>(n_patches),
        budgets.defined() ? budgets.const_data_ptr<int64_t>() : nullptr,
        thresholds.defined() ? thresholds.const_data_ptr<scalar_t>() : nullptr, static_cast<int32_t>(sort_size),
        stage_pyramid, workspace.defined() ? static_cast<unsigned char*>(workspace.mutable_data_ptr()) : nullptr,
        workspace_stride, mutable_box_data(boxes),
        lengths.defined() ? lengths.mutable_data_ptr<int32_t>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

at::Tensor build_quadtree_cuda(const at::Tensor& scores, int64_t height, int64_t width, int64_t min_patch_size,
                               int64_t max_patch_size, int64_t n_patches) {
  const PyramidLayout layout =
      check_quadtree_args(scores, height, width, min_patch_size, max_patch_size, n_patches);
  check_cuda_limits(scores, height, width, n_patches, "mixres.build_quadtree");
  const c10::cuda::CUDAGuard guard(scores.device());
  auto boxes = at::empty({scores.size(0), n_patches, 3}, scores.options().dtype(at::kInt));
  if (scores.size(0) == 0) return boxes;
  launch_build_quadtree(scores, layout, n_patches, at::Tensor(), at::Tensor(), boxes, at::Tensor());
  return boxes;
}

std::tuple<at::Tensor, at::Tensor> build_quadtree_adaptive_cuda(const at::Tensor& scores, int64_t height,
                                                                int64_t width, int64_t min_patch_size,
                                                                int64_t max_patch_size, int64_t max_patches,
                                                                const std::optional<at::Tensor>& budgets,
                                                                const std::optional<at::Tensor>& thresholds) {
  const PyramidLayout layout = check_adaptive_args(scores, height, width, min_patch_size, max_patch_size,
                                                   max_patches, budgets, thresholds);
  check_cuda_limits(scores, height, width, max_patches, "mixres.build_quadtree_adaptive");
  const c10::cuda::CUDAGuard guard(scores.device());
  const int64_t batch = scores.size(0);
  auto boxes = at::empty({batch, max_patches, 3}, scores.options().dtype(at::kInt));
  auto lengths = at::empty({batch}, scores.options().dtype(at::kInt));
  if (batch == 0) return {boxes, lengths};
  // Converted on the device (no host synchronisation); the kernel asserts on their values.
  const at::Tensor budget_values = budgets.has_value() ? budgets->to(at::kLong).contiguous() : at::Tensor();
  const at::Tensor threshold_values = thresholds.has_value() ? thresholds->contiguous() : at::Tensor();
  launch_build_quadtree(scores, layout, max_patches, budget_values, threshold_values, boxes, lengths);
  return {boxes, lengths};
}

}  // namespace

TORCH_LIBRARY_IMPL(mixres, CUDA, m) {
  m.impl("build_quadtree", &build_quadtree_cuda);
  m.impl("build_quadtree_adaptive", &build_quadtree_adaptive_cuda);
}

}  // namespace mixres
