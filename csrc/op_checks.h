// Argument checks shared by the CPU and CUDA kernels. They look at shapes, dtypes and sizes only, never at tensor
// data, which on a GPU would cost a synchronisation.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/safe_numerics.h>

#include <algorithm>
#include <initializer_list>
#include <limits>
#include <optional>
#include <string>

#include "quadtree_layout.h"

namespace mixres {

// The side of a token, and of a pixel-blur patch: at most 2^15, so that the s * s pixels of a patch (and the
// index of a token element within its plane) fit an int32.
constexpr int64_t kMaxPatchSide = int64_t{1} << 15;

// Whether a contiguous tensor of these sizes is addressable: its size in bytes, and so every stride and its element
// count, fit an int64. (Whether it can be allocated is the allocator's to say.)
inline bool addressable(std::initializer_list<int64_t> sizes, int64_t element_size) {
  int64_t bytes = element_size;
  for (const int64_t size : sizes) {
    if (c10::mul_overflows(bytes, std::max<int64_t>(size, 1), &bytes)) return false;
  }
  return true;
}

inline bool is_float_image_dtype(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16;
}

// `op` and `budget_name` name the operator and its budget argument in the errors: build_quadtree's n_patches, or
// build_quadtree_adaptive's max_patches.
inline PyramidLayout check_quadtree_args(const at::Tensor& scores, int64_t height, int64_t width,
                                         int64_t min_patch_size, int64_t max_patch_size, int64_t n_patches,
                                         const char* op = "mixres.build_quadtree",
                                         const char* budget_name = "n_patches") {
  const PyramidLayout layout = make_layout(height, width, min_patch_size, max_patch_size);
  check_budget(layout, n_patches, budget_name);
  TORCH_CHECK_VALUE(scores.dim() == 2 && scores.size(1) == layout.n_scores(), op,
                    ": scores must be the packed pyramid [B, ", layout.n_scores(), "], got ", scores.sizes());
  TORCH_CHECK_TYPE(scores.scalar_type() == at::kFloat || scores.scalar_type() == at::kDouble, op,
                   ": scores must be float32 or float64, got ", scores.scalar_type());
  return layout;
}

// The shapes, dtypes and devices of build_quadtree_adaptive's arguments. The values of budgets and thresholds are
// the kernels' to check: on the CPU with an error, on CUDA with a device-side assert (an error would need a host
// synchronisation).
inline PyramidLayout check_adaptive_args(const at::Tensor& scores, int64_t height, int64_t width,
                                         int64_t min_patch_size, int64_t max_patch_size, int64_t max_patches,
                                         const std::optional<at::Tensor>& budgets,
                                         const std::optional<at::Tensor>& thresholds) {
  constexpr const char* op = "mixres.build_quadtree_adaptive";
  const PyramidLayout layout =
      check_quadtree_args(scores, height, width, min_patch_size, max_patch_size, max_patches, op, "max_patches");
  TORCH_CHECK_VALUE(max_patches <= std::numeric_limits<int32_t>::max(), op, ": max_patches must be at most ",
                    std::numeric_limits<int32_t>::max(), " (lengths are int32), got ", max_patches);
  if (budgets.has_value()) {
    TORCH_CHECK_VALUE(budgets->dim() == 1 && budgets->size(0) == scores.size(0), op,
                      ": budgets must be [B] = [", scores.size(0), "], one budget per image, got ", budgets->sizes());
    TORCH_CHECK_TYPE(budgets->scalar_type() == at::kInt || budgets->scalar_type() == at::kLong, op,
                     ": budgets must be int32 or int64, got ", budgets->scalar_type());
    TORCH_CHECK_VALUE(budgets->device() == scores.device(), op, ": budgets is on ", budgets->device(),
                      " but scores are on ", scores.device(), ": put both on one device");
  }
  if (thresholds.has_value()) {
    std::string sizes;
    for (int l = 0; l < layout.n_splittable(); ++l) sizes += (l ? ", " : "") + std::to_string(layout.size(l));
    TORCH_CHECK_VALUE(thresholds->dim() == 1 && thresholds->size(0) == layout.n_splittable(), op,
                      ": thresholds must be [", layout.n_splittable(), "], one per splittable patch size (", sizes,
                      "), got ", thresholds->sizes());
    TORCH_CHECK_TYPE(thresholds->scalar_type() == scores.scalar_type(), op,
                     ": thresholds must have the scores' dtype ", scores.scalar_type(), ", got ",
                     thresholds->scalar_type());
    TORCH_CHECK_VALUE(thresholds->device() == scores.device(), op, ": thresholds is on ", thresholds->device(),
                      " but scores are on ", scores.device(), ": put both on one device");
  }
  return layout;
}

inline void check_boxes(const at::Tensor& boxes, int64_t batch, const char* op) {
  TORCH_CHECK_VALUE(boxes.dim() == 3 && (batch < 0 || boxes.size(0) == batch) && boxes.size(2) == 3, op,
                    ": boxes must be [B", batch < 0 ? "" : "=", batch < 0 ? "" : std::to_string(batch), ", N, 3], got ",
                    boxes.sizes());
  TORCH_CHECK_TYPE(boxes.scalar_type() == at::kInt, op, ": boxes must be int32, got ", boxes.scalar_type());
}

inline void check_extract_args(const at::Tensor& images, const at::Tensor& boxes, int64_t patch_size) {
  constexpr const char* op = "mixres.extract_patches";
  TORCH_CHECK_VALUE(images.dim() == 4, op, ": images must be [B, C, H, W], got ", images.sizes());
  TORCH_CHECK_TYPE(is_float_image_dtype(images.scalar_type()), op,
                   ": images must be float16, bfloat16, float32 or float64, got ", images.scalar_type());
  check_boxes(boxes, images.size(0), op);
  TORCH_CHECK_VALUE(patch_size > 0 && patch_size <= kMaxPatchSide, op, ": patch_size must be in [1, ",
                    kMaxPatchSide, "], got ", patch_size);
  TORCH_CHECK_VALUE(addressable({images.size(0), boxes.size(1), images.size(1), patch_size, patch_size},
                                images.element_size()),
                    op, ": the tokens [B, N, C, p, p] = [", images.size(0), ", ", boxes.size(1), ", ", images.size(1),
                    ", ", patch_size, ", ", patch_size, "] would take more than 2^63 bytes");
}

inline void check_extract_backward_args(const at::Tensor& grad_tokens, const at::Tensor& boxes, int64_t height,
                                        int64_t width) {
  constexpr const char* op = "mixres.extract_patches_backward";
  TORCH_CHECK_VALUE(grad_tokens.dim() == 5 && grad_tokens.size(3) == grad_tokens.size(4), op,
                    ": grad_tokens must be [B, N, C, p, p], got ", grad_tokens.sizes());
  TORCH_CHECK_TYPE(is_float_image_dtype(grad_tokens.scalar_type()), op,
                   ": grad_tokens must be float16, bfloat16, float32 or float64, got ", grad_tokens.scalar_type());
  // The forward's limit on p, which also keeps the kernels' int32 arithmetic on a token in range.
  TORCH_CHECK_VALUE(grad_tokens.size(3) > 0 && grad_tokens.size(3) <= kMaxPatchSide, op,
                    ": grad_tokens' patch side p must be in [1, ", kMaxPatchSide, "], got ", grad_tokens.sizes());
  check_boxes(boxes, grad_tokens.size(0), op);
  TORCH_CHECK_VALUE(boxes.size(1) == grad_tokens.size(1), op, ": boxes has ", boxes.size(1),
                    " leaves but grad_tokens has ", grad_tokens.size(1));
  TORCH_CHECK_VALUE(height >= 0 && width >= 0, op, ": height and width must be non-negative, got ", height, "x",
                    width);
  // The gradient accumulates in float32 or float64: at most 8 bytes an element.
  TORCH_CHECK_VALUE(addressable({grad_tokens.size(0), grad_tokens.size(2), height, width}, 8), op,
                    ": the image gradient [B, C, height, width] = [", grad_tokens.size(0), ", ", grad_tokens.size(2),
                    ", ", height, ", ", width, "] would take more than 2^63 bytes: height and width are too large");
}

// Patch sizes, then the image size, so that each message names what is wrong: `images`, min_patch_size or
// max_patch_size.
inline PyramidLayout check_pixel_blur_args(const at::Tensor& images, int64_t min_patch_size, int64_t max_patch_size) {
  constexpr const char* op = "mixres.pixel_blur_scores";
  TORCH_CHECK_VALUE(images.dim() == 4, op, ": images must be [B, C, H, W], got ", images.sizes());
  TORCH_CHECK_TYPE(is_float_image_dtype(images.scalar_type()), op,
                   ": images must be float16, bfloat16, float32 or float64, got ", images.scalar_type());
  TORCH_CHECK_VALUE(images.size(1) > 0, op, ": images must have at least one channel, got ", images.sizes());
  TORCH_CHECK_VALUE(max_patch_size <= kMaxPatchSide, op, ": max_patch_size must be at most ", kMaxPatchSide,
                    ", got ", max_patch_size);
  make_layout(max_patch_size, max_patch_size, min_patch_size, max_patch_size);  // one root: checks the sizes
  const int64_t height = images.size(2), width = images.size(3);
  TORCH_CHECK_VALUE(height > 0 && width > 0 && height % max_patch_size == 0 && width % max_patch_size == 0, op,
                    ": images height and width must be positive multiples of max_patch_size ", max_patch_size,
                    ", got ", height, "x", width);
  return make_layout(height, width, min_patch_size, max_patch_size);
}

inline void check_centers_args(const at::Tensor& boxes, int64_t min_patch_size) {
  check_boxes(boxes, -1, "mixres.leaf_centers");
  TORCH_CHECK_VALUE(min_patch_size > 0, "mixres.leaf_centers: min_patch_size must be positive, got ",
                    min_patch_size);
}

}  // namespace mixres
