// Resizing every leaf of a mosaic to a p x p token on the CPU, and the gradient back to the images.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <vector>

#include "../box.h"
#include "../op_checks.h"
#include "../resample.h"
#include "warm_cache.h"

namespace mixres {
namespace {

// On the CPU the boxes can be read for free: reject any box outside the image before reading through it.
void check_boxes_inside(const at::Tensor& boxes, int64_t height, int64_t width, const char* op) {
  const auto contiguous = boxes.contiguous();
  const Box* box = box_data(contiguous);
  const int64_t n_leaves = boxes.size(1);
  for (int64_t i = 0; i < contiguous.numel() / 3; ++i) {
    TORCH_CHECK_VALUE(box_inside(box[i], height, width), op, ": boxes[", i / n_leaves, ", ", i % n_leaves,
                      "] (y=", box[i].y, ", x=", box[i].x, ", size=", box[i].size, ") is not inside the ", height,
                      "x", width, " image: need size >= 1, 0 <= y <= ", height, " - size and 0 <= x <= ", width,
                      " - size");
  }
}

// Per-axis resampling plan of one leaf size, shared by the rows and the columns of a square leaf.
template <typename acc_t>
struct AxisPlan {
  std::vector<int32_t> begin, end;       // area
  std::vector<BilinearTap<acc_t>> taps;  // bilinear

  void build(int32_t size, int32_t patch, ResizeMode mode) {
    begin.resize(patch);
    end.resize(patch);
    taps.resize(patch);
    for (int32_t i = 0; i < patch; ++i) {
      if (mode == ResizeMode::kArea) {
        begin[i] = area_begin(i, size, patch);
        end[i] = area_end(i, size, patch);
      } else {
        taps[i] = bilinear_tap<acc_t>(i, size, patch);
      }
    }
  }
};

// Area mode when the leaf side is F times the token side, the common case: each token cell is an F x F box.
// F is a compile-time constant so that the row sums vectorise and the box sums unroll.
template <int F, typename scalar_t, typename acc_t>
void area_leaf_channel(const scalar_t* __restrict__ leaf, int64_t width, int32_t patch, acc_t* __restrict__ row_sum,
                       scalar_t* __restrict__ token) {
  const int32_t size = patch * F;
  const acc_t inverse_area = acc_t(1) / acc_t(F * F);  // a power of two: as exact as dividing
  for (int32_t i = 0; i < patch; ++i, token += patch) {
    const scalar_t* row = leaf + static_cast<int64_t>(i) * F * width;
    for (int32_t x = 0; x < size; ++x) row_sum[x] = static_cast<acc_t>(row[x]);
    for (int dy = 1; dy < F; ++dy) {
      row += width;
      for (int32_t x = 0; x < size; ++x) row_sum[x] += static_cast<acc_t>(row[x]);
    }
    for (int32_t j = 0; j < patch; ++j) {
      acc_t sum = row_sum[j * F];
      for (int dx = 1; dx < F; ++dx) sum += row_sum[j * F + dx];
      token[j] = static_cast<scalar_t>(sum * inverse_area);
    }
  }
}

// Area mode in general (a leaf side that is not a power-of-two multiple of the token side, or smaller than it).
template <typename scalar_t, typename acc_t>
void area_leaf_channel_any(const scalar_t* leaf, int64_t width, int32_t patch, const AxisPlan<acc_t>& plan,
                           acc_t* row_sum, scalar_t* token) {
  for (int32_t i = 0; i < patch; ++i, token += patch) {
    std::fill(row_sum, row_sum + patch, acc_t(0));
    for (int32_t y = plan.begin[i]; y < plan.end[i]; ++y) {
      const scalar_t* row = leaf + y * width;
      for (int32_t j = 0; j < patch; ++j) {
        acc_t sum = 0;
        for (int32_t x = plan.begin[j]; x < plan.end[j]; ++x) sum += static_cast<acc_t>(row[x]);
        row_sum[j] += sum;
      }
    }
    const int64_t rows = plan.end[i] - plan.begin[i];  // an int32 rows * cols can overflow for a large leaf
    for (int32_t j = 0; j < patch; ++j) {
      token[j] = static_cast<scalar_t>(row_sum[j] / static_cast<acc_t>(rows * (plan.end[j] - plan.begin[j])));
    }
  }
}

// Bilinear mode, in the order of F.interpolate: blend along x within the two source rows, then along y.
template <typename scalar_t, typename acc_t>
void bilinear_leaf_channel(const scalar_t* leaf, int64_t width, int32_t patch, const AxisPlan<acc_t>& plan,
                           scalar_t* token) {
  for (int32_t i = 0; i < patch; ++i, token += patch) {
    const auto& ty = plan.taps[i];
    const scalar_t* lo = leaf + ty.lo * width;
    const scalar_t* hi = leaf + ty.hi * width;
    for (int32_t j = 0; j < patch; ++j) {
      const auto& tx = plan.taps[j];
      const acc_t top = tx.w_lo * static_cast<acc_t>(lo[tx.lo]) + tx.w_hi * static_cast<acc_t>(lo[tx.hi]);
      const acc_t bottom = tx.w_lo * static_cast<acc_t>(hi[tx.lo]) + tx.w_hi * static_cast<acc_t>(hi[tx.hi]);
      token[j] = static_cast<scalar_t>(ty.w_lo * top + ty.w_hi * bottom);
    }
  }
}

template <typename scalar_t, typename acc_t>
void resize_leaf(const scalar_t* image, int64_t channels, int64_t height, int64_t width, const Box& box,
                 int32_t patch, ResizeMode mode, const AxisPlan<acc_t>& plan, std::vector<acc_t>& row_sum,
                 scalar_t* token) {
  const int32_t factor = box.size % patch == 0 ? box.size / patch : 0;
  const int64_t token_stride = static_cast<int64_t>(patch) * patch;
  if (row_sum.size() < static_cast<size_t>(std::max(box.size, patch))) row_sum.resize(std::max(box.size, patch));
  for (int64_t c = 0; c < channels; ++c, token += token_stride) {
    const scalar_t* leaf = image + (c * height + box.y) * width + box.x;
    // A leaf of the token's size is copied in either mode, as F.interpolate copies: blending would multiply a
    // neighbour by its weight 0, which turns an Inf pixel next to the sample into NaN.
    if (mode == ResizeMode::kBilinear && box.size != patch) {
      bilinear_leaf_channel(leaf, width, patch, plan, token);
      continue;
    }
    switch (factor) {
      case 1: area_leaf_channel<1>(leaf, width, patch, row_sum.data(), token); break;
      case 2: area_leaf_channel<2>(leaf, width, patch, row_sum.data(), token); break;
      case 4: area_leaf_channel<4>(leaf, width, patch, row_sum.data(), token); break;
      case 8: area_leaf_channel<8>(leaf, width, patch, row_sum.data(), token); break;
      default: area_leaf_channel_any(leaf, width, patch, plan, row_sum.data(), token);
    }
  }
}

// The adjoint of resize_leaf: adds the token gradient back onto the leaf's pixels.
template <typename scalar_t, typename acc_t>
void resize_leaf_backward(const scalar_t* grad_token, int64_t channels, int64_t height, int64_t width,
                          const Box& box, int32_t patch, ResizeMode mode, const AxisPlan<acc_t>& plan,
                          acc_t* grad_image) {
  for (int64_t c = 0; c < channels; ++c) {
    acc_t* leaf = grad_image + (c * height + box.y) * width + box.x;
    for (int32_t i = 0; i < patch; ++i, grad_token += patch) {
      if (mode == ResizeMode::kBilinear && box.size == patch) {  // a copy, as in the forward
        acc_t* row = leaf + static_cast<int64_t>(i) * width;
        for (int32_t j = 0; j < patch; ++j) row[j] += static_cast<acc_t>(grad_token[j]);
      } else if (mode == ResizeMode::kArea) {
        const int64_t rows = plan.end[i] - plan.begin[i];  // int64: rows * cols can overflow an int32
        for (int32_t y = plan.begin[i]; y < plan.end[i]; ++y) {
          acc_t* row = leaf + y * width;
          for (int32_t j = 0; j < patch; ++j) {
            const acc_t g = static_cast<acc_t>(grad_token[j]) /
                            static_cast<acc_t>(rows * (plan.end[j] - plan.begin[j]));
            for (int32_t x = plan.begin[j]; x < plan.end[j]; ++x) row[x] += g;
          }
        }
      } else {
        const auto& ty = plan.taps[i];
        acc_t* lo = leaf + ty.lo * width;
        acc_t* hi = leaf + ty.hi * width;
        for (int32_t j = 0; j < patch; ++j) {
          const auto& tx = plan.taps[j];
          const acc_t g = static_cast<acc_t>(grad_token[j]);
          lo[tx.lo] += ty.w_lo * tx.w_lo * g;
          lo[tx.hi] += ty.w_lo * tx.w_hi * g;
          hi[tx.lo] += ty.w_hi * tx.w_lo * g;
          hi[tx.hi] += ty.w_hi * tx.w_hi * g;
        }
      }
    }
  }
}

// Plans depend only on the leaf size, and a mosaic has a handful of sizes: cache the last one.
template <typename acc_t>
struct PlanCache {
  AxisPlan<acc_t> plan;
  int32_t size = -1;
  const AxisPlan<acc_t>& get(int32_t leaf_size, int32_t patch, ResizeMode mode) {
    if (leaf_size != size) {
      plan.build(leaf_size, patch, mode);
      size = leaf_size;
    }
    return plan;
  }
};

at::Tensor extract_patches_cpu(const at::Tensor& images, const at::Tensor& boxes, int64_t patch_size,
                               c10::string_view mode_name) {
  const ResizeMode mode = parse_mode(mode_name);
  check_extract_args(images, boxes, patch_size);
  const int64_t batch = images.size(0), channels = images.size(1), height = images.size(2), width = images.size(3);
  check_boxes_inside(boxes, height, width, "mixres.extract_patches");
  const int64_t n_leaves = boxes.size(1);
  const int32_t patch = static_cast<int32_t>(patch_size);
  auto tokens = at::empty({batch, n_leaves, channels, patch_size, patch_size}, images.options());
  if (tokens.numel() == 0) return tokens;
  const auto src = images.contiguous();
  const auto leaf_boxes = boxes.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "mixres_extract_patches_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* src_ptr = src.const_data_ptr<scalar_t>();
    const Box* box_ptr = box_data(leaf_boxes);
    scalar_t* token_ptr = tokens.mutable_data_ptr<scalar_t>();
    const int64_t token_numel = channels * patch_size * patch_size;
    const int64_t image_numel = channels * height * width;
    auto resize_leaves = [&](int64_t begin, int64_t end) {
      PlanCache<acc_t> plans;
      std::vector<acc_t> row_sum;
      for (int64_t leaf = begin; leaf < end; ++leaf) {
        const Box& box = box_ptr[leaf];
        const scalar_t* image = src_ptr + (leaf / n_leaves) * image_numel;
        resize_leaf(image, channels, height, width, box, patch, mode, plans.get(box.size, patch, mode), row_sum,
                    token_ptr + leaf * token_numel);
      }
    };
    if (batch < at::get_num_threads()) {
      at::parallel_for(0, batch * n_leaves, 16, resize_leaves);
      return;
    }
    // A leaf reads short rows far apart, which DRAM serves slowly; a sequential sweep over the image first brings
    // it into cache at streaming bandwidth (3-5x faster overall for images larger than the cache).
    at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        warm_cache(src_ptr + b * image_numel, image_numel * sizeof(scalar_t));
        resize_leaves(b * n_leaves, (b + 1) * n_leaves);
      }
    });
  });
  return tokens;
}

at::Tensor extract_patches_backward_cpu(const at::Tensor& grad_tokens, const at::Tensor& boxes, int64_t height,
                                        int64_t width, c10::string_view mode_name) {
  const ResizeMode mode = parse_mode(mode_name);
  check_extract_backward_args(grad_tokens, boxes, height, width);
  const int64_t batch = grad_tokens.size(0), n_leaves = grad_tokens.size(1), channels = grad_tokens.size(2);
  const int64_t patch_size = grad_tokens.size(3);
  check_boxes_inside(boxes, height, width, "mixres.extract_patches_backward");
  const auto acc_dtype = at::toOpMathType(grad_tokens.scalar_type());
  auto grad_images = at::zeros({batch, channels, height, width}, grad_tokens.options().dtype(acc_dtype));
  if (grad_tokens.numel() == 0) return grad_images.to(grad_tokens.scalar_type());
  const auto grad = grad_tokens.contiguous();
  const auto leaf_boxes = boxes.contiguous();
  const int32_t patch = static_cast<int32_t>(patch_size);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "mixres_extract_patches_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* grad_ptr = grad.const_data_ptr<scalar_t>();
    const Box* box_ptr = box_data(leaf_boxes);
    acc_t* out_ptr = grad_images.mutable_data_ptr<acc_t>();
    const int64_t token_numel = channels * patch_size * patch_size;
    // One image per task: leaves of an image may share pixels (upsampling, overlapping boxes), images never do.
    at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
      PlanCache<acc_t> plans;
      for (int64_t b = begin; b < end; ++b) {
        for (int64_t n = 0; n < n_leaves; ++n) {
          const int64_t leaf = b * n_leaves + n;
          const Box& box = box_ptr[leaf];
          resize_leaf_backward(grad_ptr + leaf * token_numel, channels, height, width, box, patch, mode,
                               plans.get(box.size, patch, mode), out_ptr + b * channels * height * width);
        }
      }
    });
  });
  return grad_images.to(grad_tokens.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(mixres, CPU, m) {
  m.impl("extract_patches", &extract_patches_cpu);
  m.impl("extract_patches_backward", &extract_patches_backward_cpu);
}

}  // namespace mixres
