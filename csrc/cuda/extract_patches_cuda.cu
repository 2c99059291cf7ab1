// Resizing every leaf of a mosaic to a p x p token on CUDA, and the gradient back to the images.
// One thread per token element, or per run of 4 consecutive elements where the leaves are aligned for vector loads.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/Atomic.cuh>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>

#include "../box.h"
#include "../op_checks.h"
#include "../resample.h"
#include "launch.cuh"

namespace mixres {
namespace {

// Threads of the forward take runs of kRun consecutive elements of a token row: kRun = 1, or kVec where the leaves
// are aligned for vector loads. A lone 4-byte load per thread keeps too few bytes in flight to approach the memory
// bandwidth, and an aligned leaf lets each thread read whole vectors instead.
constexpr int kVec = 4;

template <typename scalar_t, int kRun>
struct alignas(sizeof(scalar_t) * kRun) Run {
  scalar_t v[kRun];
};

// Area mode when the leaf side is F times the token side, the kRun token cells that start at `run`: the same
// summation order as the CPU kernel (each column of an F x F cell over its rows, then the column sums), so that the
// results agree bit for bit; with kRun > 1, from vector loads.
template <int F, int kRun, typename scalar_t, typename acc_t>
__device__ __forceinline__ void area_run_multiple(const scalar_t* __restrict__ run, int64_t width,
                                                  acc_t (&out)[kRun]) {
  acc_t column[kRun * F];
#pragma unroll
  for (int dy = 0; dy < F; ++dy) {
    const Run<scalar_t, kRun>* row = reinterpret_cast<const Run<scalar_t, kRun>*>(run + dy * width);
#pragma unroll
    for (int k = 0; k < F; ++k) {
      const Run<scalar_t, kRun> chunk = row[k];
#pragma unroll
      for (int e = 0; e < kRun; ++e) {
        const acc_t value = static_cast<acc_t>(chunk.v[e]);
        column[k * kRun + e] = dy == 0 ? value : column[k * kRun + e] + value;
      }
    }
  }
#pragma unroll
  for (int o = 0; o < kRun; ++o) {
    acc_t sum = column[o * F];
#pragma unroll
    for (int dx = 1; dx < F; ++dx) sum += column[o * F + dx];
    out[o] = F == 1 ? sum : sum * (acc_t(1) / acc_t(F * F));
  }
}

// area_run_multiple for the factors it unrolls: false, and `out` untouched, for any other.
template <int kRun, typename scalar_t, typename acc_t>
__device__ __forceinline__ bool area_run_unrolled(const scalar_t* __restrict__ run, int64_t width, int32_t factor,
                                                  acc_t (&out)[kRun]) {
  switch (factor) {
    case 1: area_run_multiple<1, kRun>(run, width, out); return true;
    case 2: area_run_multiple<2, kRun>(run, width, out); return true;
    case 4: area_run_multiple<4, kRun>(run, width, out); return true;
    case 8: area_run_multiple<8, kRun>(run, width, out); return true;
    default: return false;
  }
}

// Area mode in general, again in the CPU kernel's order: each row of the bin, then the row sums.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t area_cell_any(const scalar_t* __restrict__ leaf, int64_t width, int32_t i,
                                               int32_t j, int32_t size, int32_t patch) {
  const int32_t y_begin = area_begin(i, size, patch), y_end = area_end(i, size, patch);
  const int32_t x_begin = area_begin(j, size, patch), x_end = area_end(j, size, patch);
  acc_t total = 0;
  for (int32_t y = y_begin; y < y_end; ++y) {
    const scalar_t* row = leaf + y * width;
    acc_t sum = 0;
    for (int32_t x = x_begin; x < x_end; ++x) sum += static_cast<acc_t>(row[x]);
    total += sum;
  }
  // int64: the bin of a large leaf can hold more than 2^31 pixels.
  return total / static_cast<acc_t>(static_cast<int64_t>(y_end - y_begin) * (x_end - x_begin));
}

// Bilinear mode, in the order of F.interpolate: blend along x within the two source rows, then along y.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t bilinear_cell(const scalar_t* __restrict__ leaf, int64_t width, int32_t i,
                                               int32_t j, int32_t size, int32_t patch) {
  const BilinearTap<acc_t> ty = bilinear_tap<acc_t>(i, size, patch);
  const BilinearTap<acc_t> tx = bilinear_tap<acc_t>(j, size, patch);
  const scalar_t* lo = leaf + ty.lo * width;
  const scalar_t* hi = leaf + ty.hi * width;
  const acc_t top = tx.w_lo * static_cast<acc_t>(lo[tx.lo]) + tx.w_hi * static_cast<acc_t>(lo[tx.hi]);
  const acc_t bottom = tx.w_lo * static_cast<acc_t>(hi[tx.lo]) + tx.w_hi * static_cast<acc_t>(hi[tx.hi]);
  return ty.w_lo * top + ty.w_hi * bottom;
}

// Where token element o lives: o = ((leaf * channels + c) * patch + i) * patch + j.
template <typename index_t>
struct TokenIndex {
  index_t leaf, c;
  int32_t i, j;
};

template <typename index_t>
__device__ __forceinline__ TokenIndex<index_t> token_index(index_t o, index_t channels, int32_t patch) {
  const index_t plane_numel = static_cast<index_t>(patch) * patch;
  const index_t plane = o / plane_numel;
  const int32_t t = static_cast<int32_t>(o - plane * plane_numel);
  TokenIndex<index_t> index;
  index.leaf = plane / channels;
  index.c = plane - index.leaf * channels;
  index.i = t / patch;
  index.j = t - index.i * patch;
  return index;
}

// The top-left pixel, in `plane_origin`'s layout [B, C, H, W], of the leaf that token element `idx` belongs to;
// nullptr if its box is not inside the image, which trips the device assert first where asserts are compiled in (the
// kernels test for the padding box (0, 0, 0) before they call this).
// The host cannot read the boxes without a sync, so the kernels check them here; a failed assert stops the kernel
// before any read or write outside the image.
template <typename T, typename index_t>
__device__ __forceinline__ T* leaf_origin(T* plane_origin, const Box& box, const TokenIndex<index_t>& idx,
                                          index_t n_leaves, index_t channels, int64_t height, int64_t width) {
  const bool inside = box_inside(box, height, width);
  CUDA_KERNEL_ASSERT(inside && "mixres.extract_patches: every box must lie inside the image");
  if (!inside) return nullptr;
  const int64_t image = idx.leaf / n_leaves;
  return plane_origin + ((image * channels + idx.c) * height + box.y) * width + box.x;
}

// The value of token element (i, j) of a leaf whose top-left pixel is `leaf`.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t token_value(const scalar_t* __restrict__ leaf, int64_t width, int32_t i, int32_t j,
                                             int32_t size, int32_t patch, ResizeMode mode) {
  // A leaf of the token's size is copied in either mode, as F.interpolate copies (see the CPU kernel).
  if (mode == ResizeMode::kBilinear && size != patch) {
    return bilinear_cell<scalar_t, acc_t>(leaf, width, i, j, size, patch);
  }
  const int32_t factor = size % patch == 0 ? size / patch : 0;
  const scalar_t* cell = leaf + static_cast<int64_t>(i) * factor * width + j * factor;
  acc_t value[1];
  if (area_run_unrolled<1>(cell, width, factor, value)) return value[0];
  return area_cell_any<scalar_t, acc_t>(leaf, width, i, j, size, patch);
}

// One thread per run of kRun elements. With kRun = kVec the host guarantees patch and width multiples of kVec, and
// images and tokens aligned to a Run; leaves whose x is not a multiple of kVec, or whose side is not F x patch, then
// take token_value element by element, as every leaf does with kRun = 1.
template <int kRun, typename scalar_t, typename index_t>
__global__ void __launch_bounds__(kThreads)
extract_patches_kernel(const scalar_t* __restrict__ images, const Box* __restrict__ boxes,
                       scalar_t* __restrict__ tokens, index_t n_runs, index_t n_leaves, index_t channels,
                       int64_t height, int64_t width, int32_t patch, ResizeMode mode) {
  using acc_t = at::opmath_type<scalar_t>;
  const index_t stride = static_cast<index_t>(gridDim.x) * blockDim.x;
  for (index_t r = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; r < n_runs; r += stride) {
    const TokenIndex<index_t> idx = token_index(r * kRun, channels, patch);
    const Box box = boxes[idx.leaf];
    // A run lies within one token row (kRun divides patch): a padding box's runs are all zeros.
    const bool padding = is_padding(box);
    const scalar_t* leaf = padding ? nullptr : leaf_origin(images, box, idx, n_leaves, channels, height, width);
    acc_t value[kRun];
    if (padding) {
#pragma unroll
      for (int e = 0; e < kRun; ++e) value[e] = acc_t(0);
    } else if (leaf == nullptr) {
#pragma unroll
      for (int e = 0; e < kRun; ++e) value[e] = std::numeric_limits<acc_t>::quiet_NaN();
    } else {
      const int32_t factor = kRun > 1 && mode == ResizeMode::kArea && box.size % patch == 0 && box.x % kRun == 0
                                 ? box.size / patch
                                 : 0;
      const scalar_t* run = leaf + static_cast<int64_t>(idx.i) * factor * width + idx.j * factor;
      if (!area_run_unrolled<kRun>(run, width, factor, value)) {
#pragma unroll
        for (int e = 0; e < kRun; ++e) {
          value[e] = token_value<scalar_t, acc_t>(leaf, width, idx.i, idx.j + e, box.size, patch, mode);
        }
      }
    }
    Run<scalar_t, kRun> out;
#pragma unroll
    for (int e = 0; e < kRun; ++e) out.v[e] = static_cast<scalar_t>(value[e]);
    reinterpret_cast<Run<scalar_t, kRun>*>(tokens)[r] = out;
  }
}

// The adjoint of the forward kernel, one thread per token element. Leaves of a mosaic are disjoint, but boxes in
// general may overlap and upsampled leaves share pixels between cells, hence the atomics.
template <typename scalar_t, typename index_t>
__global__ void __launch_bounds__(kThreads)
extract_patches_backward_kernel(const scalar_t* __restrict__ grad_tokens, const Box* __restrict__ boxes,
                                at::opmath_type<scalar_t>* __restrict__ grad_images, index_t total,
                                index_t n_leaves, index_t channels, int64_t height, int64_t width, int32_t patch,
                                ResizeMode mode) {
  using acc_t = at::opmath_type<scalar_t>;
  const index_t stride = static_cast<index_t>(gridDim.x) * blockDim.x;
  for (index_t o = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; o < total; o += stride) {
    const TokenIndex<index_t> idx = token_index(o, channels, patch);
    const Box box = boxes[idx.leaf];
    if (is_padding(box)) continue;  // its token is a constant zero: no gradient
    acc_t* leaf = leaf_origin(grad_images, box, idx, n_leaves, channels, height, width);
    if (leaf == nullptr) continue;
    const acc_t g = static_cast<acc_t>(grad_tokens[o]);
    if (mode == ResizeMode::kBilinear && box.size == patch) {  // a copy, as in the forward
      gpuAtomicAdd(leaf + static_cast<int64_t>(idx.i) * width + idx.j, g);
    } else if (mode == ResizeMode::kBilinear) {
      const BilinearTap<acc_t> ty = bilinear_tap<acc_t>(idx.i, box.size, patch);
      const BilinearTap<acc_t> tx = bilinear_tap<acc_t>(idx.j, box.size, patch);
      acc_t* lo = leaf + ty.lo * width;
      acc_t* hi = leaf + ty.hi * width;
      gpuAtomicAdd(lo + tx.lo, ty.w_lo * tx.w_lo * g);
      gpuAtomicAdd(lo + tx.hi, ty.w_lo * tx.w_hi * g);
      gpuAtomicAdd(hi + tx.lo, ty.w_hi * tx.w_lo * g);
      gpuAtomicAdd(hi + tx.hi, ty.w_hi * tx.w_hi * g);
    } else {
      const int32_t y_begin = area_begin(idx.i, box.size, patch), y_end = area_end(idx.i, box.size, patch);
      const int32_t x_begin = area_begin(idx.j, box.size, patch), x_end = area_end(idx.j, box.size, patch);
      const acc_t share = g / static_cast<acc_t>(static_cast<int64_t>(y_end - y_begin) * (x_end - x_begin));
      for (int32_t y = y_begin; y < y_end; ++y) {
        acc_t* row = leaf + y * width;
        for (int32_t x = x_begin; x < x_end; ++x) gpuAtomicAdd(row + x, share);
      }
    }
  }
}

// The forward's grid: one thread per run of kRun elements of the `total` token elements.
template <int kRun, typename scalar_t>
void launch_extract_patches(const scalar_t* images, const Box* boxes, scalar_t* tokens, int64_t total,
                            int64_t n_leaves, int64_t channels, int64_t height, int64_t width, int32_t patch,
                            ResizeMode mode, cudaStream_t stream) {
  const int64_t n_runs = total / kRun;
  dispatch_index_type(total, [&](auto index) {
    using index_t = decltype(index);
    extract_patches_kernel<kRun, scalar_t, index_t><<<n_blocks(n_runs), kThreads, 0, stream>>>(
        images, boxes, tokens, static_cast<index_t>(n_runs), static_cast<index_t>(n_leaves),
        static_cast<index_t>(channels), height, width, patch, mode);
  });
}

void check_same_device(const at::Tensor& a, const char* a_name, const at::Tensor& b, const char* b_name,
                       const char* op) {
  TORCH_CHECK_VALUE(a.is_cuda() && a.device() == b.device(), op, ": ", a_name, " and ", b_name,
                    " must be on the same CUDA device, got ", a_name, " on ", a.device(), " and ", b_name, " on ",
                    b.device());
}

at::Tensor extract_patches_cuda(const at::Tensor& images, const at::Tensor& boxes, int64_t patch_size,
                                c10::string_view mode_name) {
  constexpr const char* op = "mixres.extract_patches";
  const ResizeMode mode = parse_mode(mode_name);
  check_extract_args(images, boxes, patch_size);
  const int64_t batch = images.size(0), channels = images.size(1), height = images.size(2), width = images.size(3);
  check_same_device(images, "images", boxes, "boxes", op);
  const c10::cuda::CUDAGuard guard(images.device());
  const int64_t n_leaves = boxes.size(1);
  auto tokens = at::empty({batch, n_leaves, channels, patch_size, patch_size}, images.options());
  const int64_t total = tokens.numel();
  if (total == 0) return tokens;
  const auto src = images.contiguous();
  const auto leaf_boxes = boxes.contiguous();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "mixres_extract_patches_cuda", [&] {
    const Box* box_ptr = box_data(leaf_boxes);
    const scalar_t* image_ptr = src.const_data_ptr<scalar_t>();
    scalar_t* token_ptr = tokens.mutable_data_ptr<scalar_t>();
    const bool vectorise = patch_size % kVec == 0 && width % kVec == 0 &&
                           reinterpret_cast<std::uintptr_t>(image_ptr) % sizeof(Run<scalar_t, kVec>) == 0 &&
                           reinterpret_cast<std::uintptr_t>(token_ptr) % sizeof(Run<scalar_t, kVec>) == 0;
    const auto launch = vectorise ? launch_extract_patches<kVec, scalar_t> : launch_extract_patches<1, scalar_t>;
    launch(image_ptr, box_ptr, token_ptr, total, n_leaves, channels, height, width, static_cast<int32_t>(patch_size),
           mode, stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return tokens;
}

at::Tensor extract_patches_backward_cuda(const at::Tensor& grad_tokens, const at::Tensor& boxes, int64_t height,
                                         int64_t width, c10::string_view mode_name) {
  constexpr const char* op = "mixres.extract_patches_backward";
  const ResizeMode mode = parse_mode(mode_name);
  check_extract_backward_args(grad_tokens, boxes, height, width);
  const int64_t batch = grad_tokens.size(0), n_leaves = grad_tokens.size(1), channels = grad_tokens.size(2);
  const int64_t patch_size = grad_tokens.size(3);
  check_same_device(grad_tokens, "grad_tokens", boxes, "boxes", op);
  const c10::cuda::CUDAGuard guard(grad_tokens.device());
  // Accumulates in opmath precision (float for half and bfloat16), like the CPU kernel.
  const auto acc_dtype = at::toOpMathType(grad_tokens.scalar_type());
  auto grad_images = at::zeros({batch, channels, height, width}, grad_tokens.options().dtype(acc_dtype));
  const int64_t total = grad_tokens.numel();
  if (total == 0) return grad_images.to(grad_tokens.scalar_type());
  const auto grad = grad_tokens.contiguous();
  const auto leaf_boxes = boxes.contiguous();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "mixres_extract_patches_bwd_cuda",
                                  [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Box* box_ptr = box_data(leaf_boxes);
    acc_t* out = grad_images.mutable_data_ptr<acc_t>();
    dispatch_index_type(total, [&](auto index) {
      using index_t = decltype(index);
      extract_patches_backward_kernel<scalar_t, index_t><<<n_blocks(total), kThreads, 0, stream>>>(
          grad.const_data_ptr<scalar_t>(), box_ptr, out, static_cast<index_t>(total), static_cast<index_t>(n_leaves),
          static_cast<index_t>(channels), height, width, static_cast<int32_t>(patch_size), mode);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad_images.to(grad_tokens.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(mixres, CUDA, m) {
  m.impl("extract_patches", &extract_patches_cuda);
  m.impl("extract_patches_backward", &extract_patches_backward_cuda);
}

}  // namespace mixres
