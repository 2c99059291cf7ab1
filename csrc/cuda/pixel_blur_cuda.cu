// Pixel-blur scores on CUDA: for every s x s patch p of every splittable level,
// MSE(p, bilinear_up(area_down(p, m x m))) * s with m = min_patch_size, written into the packed pyramid [B, P].
//
// One thread block per packed score, i.e. per (image, cell of a level), all levels in one launch: block w writes
// scores[w]. A block per root patch covering all levels would read each pixel from DRAM once rather than once per
// level, but small batches would give too few blocks (16 for one 256 x 256 image at 64 px, against 132 SMs on an
// H100), and its shared memory would have to hold a whole root or re-read it anyway. A block per cell gives B * P
// blocks (80 per 256 x 256 image at 16-64 px); the re-reads of a pixel by the finer levels mostly hit L2.
//
// Per channel, a block
//   1. area-downsamples its patch to m x m into shared memory. Consecutive threads read consecutive pixels of a
//      row: a group of min(f, 32) lanes covers the f columns of one down-sampled cell (f = s / m), each lane
//      summing its column over the f rows (and, when f > 32, every 32nd column), then the group sums its lanes
//      with shuffles;
//   2. after a barrier, gives each thread pixels of the patch in raster order (coalesced again), which it blurs
//      from the m x m cells in shared memory (F.interpolate's bilinear arithmetic, resample.h) and compares.
// The cells are double-buffered by channel parity, so one barrier per channel suffices: a thread writes the
// buffer of channel c + 1 only after the barrier of channel c, which every thread reaches only after it has read
// the buffer of channel c - 1. The squared errors are summed per thread, then over the block (warp shuffles, then
// the warp sums), in a fixed order: the result is deterministic.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "../op_checks.h"
#include "../resample.h"
#include "launch.cuh"

namespace mixres {
namespace {

// When the m x m cells of two channels do not fit in shared memory (m above ~170 in float), they live in a
// global-memory workspace, one slice per block; fewer blocks then keep the workspace small.
constexpr int64_t kMaxWorkspaceBlocks = 1024;

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
#pragma unroll
  for (int delta = 16; delta > 0; delta >>= 1) v += __shfl_xor_sync(0xffffffffu, v, delta);
  return v;
}

// Block w of the grid-stride loop scores packed entry w = image * n_scores + q of `scores` [B, P].
// `cells` is 2 * m * m accumulators per block: dynamic shared memory, or the block's slice of `workspace`.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
pixel_blur_kernel(const scalar_t* __restrict__ images, const PyramidLayout layout, int64_t channels, int64_t n_work,
                  at::opmath_type<scalar_t>* __restrict__ workspace, at::opmath_type<scalar_t>* __restrict__ scores) {
  using acc_t = at::opmath_type<scalar_t>;
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  __shared__ acc_t warp_sums[kWarps];

  const int32_t m = static_cast<int32_t>(layout.min_size);
  const int32_t cells_per_channel = m * m;  // at most 2^30: check_pixel_blur_args caps the sides at 2^15
  acc_t* cells = workspace != nullptr ? workspace + static_cast<int64_t>(blockIdx.x) * 2 * cells_per_channel
                                      : reinterpret_cast<acc_t*>(shared_bytes);
  const int64_t n_scores = layout.n_scores();
  const int64_t height = layout.height, width = layout.width;
  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;

  for (int64_t w = blockIdx.x; w < n_work; w += gridDim.x) {
    // Which cell: the level from the packed offsets (at most kMaxLevels of them), then row and column.
    const int64_t image = w / n_scores;
    const int64_t q = w - image * n_scores;
    int level = 0;
    while (q >= layout.offset[level + 1]) ++level;
    const int64_t cell = q - layout.offset[level];
    const int64_t cols = layout.cols(level);
    const int32_t s = static_cast<int32_t>(layout.size(level));
    const int64_t y0 = (cell / cols) * s;
    const int64_t x0 = (cell % cols) * s;

    const int32_t f = s / m;                     // a power of two, at least 2
    const int32_t group = f < 32 ? f : 32;       // lanes per down-sampled cell, a power of two dividing 32
    const int group_shift = __ffs(group) - 1;    // log2(group)
    const int32_t columns_per_lane = f / group;  // 1 unless f > 32
    const int32_t down_tasks = cells_per_channel * group;  // = m * s when f <= 32
    // Every thread runs the same number of rounds, so that the shuffles below always see all 32 lanes.
    const int32_t down_rounds = (down_tasks + kThreads - 1) / kThreads;
    const acc_t inverse_area = acc_t(1) / static_cast<acc_t>(static_cast<int64_t>(f) * f);  // a power of two
    const int32_t pixels = s * s;

    acc_t sse = 0;
    for (int64_t c = 0; c < channels; ++c) {
      const scalar_t* patch = images + ((image * channels + c) * height + y0) * width + x0;
      acc_t* small = cells + (c & 1) * cells_per_channel;

      // 1. Area down-sample. Task t: cell t / group, lane t % group of it. kThreads is a multiple of 32 and 32 of
      // group, so a group is lanes [k * group, (k + 1) * group) of one warp, all valid or all past down_tasks
      // (a multiple of group).
      for (int32_t round = 0; round < down_rounds; ++round) {
        const int32_t t = round * kThreads + tid;
        acc_t sum = 0;
        if (t < down_tasks) {
          const int32_t index = t >> group_shift;
          const int32_t i = index / m;
          const int32_t j = index - i * m;
          const int32_t column = j * f + (t & (group - 1));
          const scalar_t* p = patch + static_cast<int64_t>(i) * f * width + column;
          for (int32_t dy = 0; dy < f; ++dy, p += width) {
            for (int32_t k = 0; k < columns_per_lane; ++k) sum += static_cast<acc_t>(p[k * group]);
          }
        }
        for (int32_t delta = group >> 1; delta > 0; delta >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, delta);
        if (t < down_tasks && (t & (group - 1)) == 0) small[t >> group_shift] = sum * inverse_area;
      }
      __syncthreads();

      // 2. Bilinear up-sample (rows blended along x, then along y, as F.interpolate) and squared error.
      for (int32_t t = tid; t < pixels; t += kThreads) {
        const int32_t y = t / s;
        const int32_t x = t - y * s;
        const BilinearTap<acc_t> ty = bilinear_tap<acc_t>(y, m, s);
        const BilinearTap<acc_t> tx = bilinear_tap<acc_t>(x, m, s);
        const acc_t* lo = small + ty.lo * m;
        const acc_t* hi = small + ty.hi * m;
        const acc_t top = tx.w_lo * lo[tx.lo] + tx.w_hi * lo[tx.hi];
        const acc_t bottom = tx.w_lo * hi[tx.lo] + tx.w_hi * hi[tx.hi];
        const acc_t pixel = static_cast<acc_t>(patch[static_cast<int64_t>(y) * width + x]);
        const acc_t d = ty.w_lo * top + ty.w_hi * bottom - pixel;
        sse += d * d;
      }
      // No barrier here: the next channel writes the other buffer (see the top of the file).
    }

    // Block sum: each warp's, then the warp sums by warp 0.
    sse = warp_sum(sse);
    if (lane == 0) warp_sums[warp] = sse;
    __syncthreads();  // also: every thread is done reading `cells` before the next work item writes buffer 0
    if (warp == 0) {
      acc_t total = lane < kWarps ? warp_sums[lane] : acc_t(0);
      total = warp_sum(total);
      if (lane == 0) {
        scores[w] = total / static_cast<acc_t>(channels * pixels) * static_cast<acc_t>(s);
      }
    }
    // No barrier here either: warp_sums is written again only after the next item's first channel barrier,
    // which warp 0 reaches after reading it.
  }
}

at::Tensor pixel_blur_scores_cuda(const at::Tensor& images, int64_t min_patch_size, int64_t max_patch_size) {
  const PyramidLayout layout = check_pixel_blur_args(images, min_patch_size, max_patch_size);
  TORCH_CHECK_VALUE(images.is_cuda(), "mixres.pixel_blur_scores: images must be a CUDA tensor, got ",
                    images.device());
  const c10::cuda::CUDAGuard guard(images.device());
  const int64_t batch = images.size(0), channels = images.size(1);
  auto scores = at::empty({batch, layout.n_scores()},
                          images.options().dtype(at::toOpMathType(images.scalar_type())));
  const int64_t n_work = scores.numel();
  if (n_work == 0) return scores;  // no image, or min_patch_size == max_patch_size: nothing to launch
  const auto src = images.contiguous();
  const int64_t shared_limit = shared_bytes_limit();
  const auto stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "mixres_pixel_blur_scores_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t cell_bytes = 2 * min_patch_size * min_patch_size * static_cast<int64_t>(sizeof(acc_t));
    const int64_t dynamic_limit = shared_limit - kWarps * static_cast<int64_t>(sizeof(acc_t));
    int64_t blocks = std::min(n_work, kMaxBlocks);
    int64_t shared_bytes = cell_bytes;
    at::Tensor workspace;
    if (cell_bytes > dynamic_limit) {
      blocks = std::min(n_work, kMaxWorkspaceBlocks);
      workspace = at::empty({blocks * 2 * min_patch_size * min_patch_size}, src.options().dtype(scores.dtype()));
      shared_bytes = 0;
    }
    auto kernel = pixel_blur_kernel<scalar_t>;
    allow_dynamic_shared_bytes(kernel, shared_bytes);
    kernel<<<static_cast<unsigned int>(blocks), kThreads, static_cast<size_t>(shared_bytes), stream>>>(
        src.const_data_ptr<scalar_t>(), layout, channels, n_work,
        workspace.defined() ? workspace.mutable_data_ptr<acc_t>() : nullptr, scores.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return scores;
}

}  // namespace

TORCH_LIBRARY_IMPL(mixres, CUDA, m) { m.impl("pixel_blur_scores", &pixel_blur_scores_cuda); }

}  // namespace mixres
