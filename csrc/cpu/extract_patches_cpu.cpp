// Resizing every leaf of a mosaic to a p x p token on the CPU, and the gradient back to the images.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <numeric>
#include <utility>
#include <vector>

#include "../box.h"
#include "../op_checks.h"
#include "../resample.h"
#include "warm_cache.h"

namespace mixres {
namespace {

// On the CPU the boxes can be read for free: reject any box outside the image before reading through it. The padding
// box (0, 0, 0) reads nothing.
void check_boxes_inside(const at::Tensor& boxes, int64_t height, int64_t width, const char* op) {
  const auto contiguous = boxes.contiguous();
  const Box* box = box_data(contiguous);
  const int64_t n_leaves = boxes.size(1);
  for (int64_t i = 0; i < contiguous.numel() / 3; ++i) {
    TORCH_CHECK_VALUE(box_inside(box[i], height, width) || is_padding(box[i]), op, ": boxes[", i / n_leaves, ", ",
                      i % n_leaves, "] (y=", box[i].y, ", x=", box[i].x, ", size=", box[i].size,
                      ") is not inside the ", height, "x", width, " image: need size >= 1, 0 <= y <= ", height,
                      " - size and 0 <= x <= ", width, " - size (or the padding box (0, 0, 0))");
  }
}

// Per-axis resampling plan of one leaf size, shared by the rows and the columns of a square leaf. The taps are stored
// as separate arrays so that a row of them loads as vectors.
template <typename acc_t>
struct AxisPlan {
  int32_t size = -1;
  std::vector<int32_t> begin, end;  // area
  std::vector<int32_t> lo, hi;      // bilinear
  std::vector<acc_t> w_lo, w_hi;
  // Bilinear, F when every tap reads columns F * j + F / 2 - 1 and the next one (a power-of-two down-sampling), so
  // that the row loops see constant strides; 0 otherwise.
  int32_t strided = 0;

  void build(int32_t leaf_size, int32_t patch, ResizeMode mode) {
    size = leaf_size;
    begin.resize(patch);
    end.resize(patch);
    lo.resize(patch);
    hi.resize(patch);
    w_lo.resize(patch);
    w_hi.resize(patch);
    for (int32_t i = 0; i < patch; ++i) {
      if (mode == ResizeMode::kArea) {
        begin[i] = area_begin(i, leaf_size, patch);
        end[i] = area_end(i, leaf_size, patch);
      } else {
        const BilinearTap<acc_t> tap = bilinear_tap<acc_t>(i, leaf_size, patch);
        lo[i] = tap.lo;
        hi[i] = tap.hi;
        w_lo[i] = tap.w_lo;
        w_hi[i] = tap.w_hi;
      }
    }
    strided = 0;
    const int32_t factor = leaf_size % patch == 0 ? leaf_size / patch : 0;
    if (mode == ResizeMode::kBilinear && (factor == 2 || factor == 4 || factor == 8)) {
      bool regular = true;
      for (int32_t i = 0; i < patch && regular; ++i) {
        regular = lo[i] == factor * i + factor / 2 - 1 && hi[i] == lo[i] + 1;
      }
      if (regular) strided = factor;
    }
  }
};

// The plans of the last few leaf sizes: a mosaic's leaves take a handful of sizes, in alternation.
template <typename acc_t>
class PlanCache {
 public:
  const AxisPlan<acc_t>& get(int32_t leaf_size, int32_t patch, ResizeMode mode) {
    for (const auto& plan : plans_) {
      if (plan.size == leaf_size) return plan;
    }
    AxisPlan<acc_t>& plan = plans_[next_];
    next_ = (next_ + 1) % kSlots;
    plan.build(leaf_size, patch, mode);
    return plan;
  }

 private:
  static constexpr int kSlots = 8;
  AxisPlan<acc_t> plans_[kSlots];
  int next_ = 0;
};

// Indices are int64_t in the loops below: Python's build flags include -fwrapv, under which int32 indices, which the
// compiler must then let wrap, keep the loops from vectorising (the box sums ran scalar). The loops take
// restrict-qualified parameters: GCC trusts those, not restrict locals.

// sum[x] = rows[0][x] + rows[1][x] + ... + rows[F - 1][x], added in row order.
template <int F, typename scalar_t, typename acc_t>
void sum_rows(const scalar_t* __restrict__ row, int64_t width, int64_t n, acc_t* __restrict__ sum) {
  for (int64_t x = 0; x < n; ++x) {
    acc_t total = static_cast<acc_t>(row[x]);
    for (int64_t dy = 1; dy < F; ++dy) total += static_cast<acc_t>(row[dy * width + x]);
    sum[x] = total;
  }
}

// token[j] = (row_sum[F j] + row_sum[F j + 1] + ... + row_sum[F j + F - 1]) / F^2, added left to right.
template <int F, typename scalar_t, typename acc_t>
void sum_boxes(const acc_t* __restrict__ row_sum, int64_t patch, scalar_t* __restrict__ token) {
  const acc_t inverse_area = acc_t(1) / acc_t(F * F);  // a power of two: as exact as dividing
  for (int64_t j = 0; j < patch; ++j) {
    acc_t total = row_sum[j * F];
    for (int64_t dx = 1; dx < F; ++dx) total += row_sum[j * F + dx];
    token[j] = static_cast<scalar_t>(total * inverse_area);
  }
}

// Area mode when the leaf side is F times the token side, the common case: each token cell is an F x F box, summed
// column by column over its rows, then across the column sums (the CUDA kernel adds in the same order, and agrees
// bit for bit). F is a compile-time constant so that the loops vectorise and unroll. F = 1 is a copy.
template <int F, typename scalar_t, typename acc_t>
void area_leaf_channel(const scalar_t* leaf, int64_t width, int64_t patch, acc_t* row_sum, scalar_t* token) {
  for (int64_t i = 0; i < patch; ++i, token += patch) {
    const scalar_t* row = leaf + i * F * width;
    if constexpr (F == 1) {
      std::memcpy(token, row, patch * sizeof(scalar_t));
    } else {
      sum_rows<F>(row, width, patch * F, row_sum);
      sum_boxes<F>(row_sum, patch, token);
    }
  }
}

// Area mode in general (a leaf side that is not a power-of-two multiple of the token side, or smaller than it).
template <typename scalar_t, typename acc_t>
void area_leaf_channel_any(const scalar_t* leaf, int64_t width, int64_t patch, const AxisPlan<acc_t>& plan,
                           acc_t* row_sum, scalar_t* token) {
  for (int64_t i = 0; i < patch; ++i, token += patch) {
    std::fill(row_sum, row_sum + patch, acc_t(0));
    for (int64_t y = plan.begin[i]; y < plan.end[i]; ++y) {
      const scalar_t* row = leaf + y * width;
      for (int64_t j = 0; j < patch; ++j) {
        acc_t sum = 0;
        for (int64_t x = plan.begin[j]; x < plan.end[j]; ++x) sum += static_cast<acc_t>(row[x]);
        row_sum[j] += sum;
      }
    }
    const int64_t rows = plan.end[i] - plan.begin[i];  // an int32 rows * cols can overflow for a large leaf
    for (int64_t j = 0; j < patch; ++j) {
      token[j] = static_cast<scalar_t>(row_sum[j] / static_cast<acc_t>(rows * (plan.end[j] - plan.begin[j])));
    }
  }
}

// One token row in bilinear mode when the column taps are strided (AxisPlan::strided == F): the arithmetic of the
// general loop in bilinear_leaf_channel, with the tap columns known to the compiler.
template <int F, typename scalar_t, typename acc_t>
void bilinear_row_strided(const scalar_t* __restrict__ lo, const scalar_t* __restrict__ hi,
                          const acc_t* __restrict__ w_lo, const acc_t* __restrict__ w_hi, acc_t wy_lo, acc_t wy_hi,
                          int64_t patch, scalar_t* __restrict__ token) {
  constexpr int64_t offset = F / 2 - 1;
  for (int64_t j = 0; j < patch; ++j) {
    const int64_t x = F * j + offset;
    const acc_t top = w_lo[j] * static_cast<acc_t>(lo[x]) + w_hi[j] * static_cast<acc_t>(lo[x + 1]);
    const acc_t bottom = w_lo[j] * static_cast<acc_t>(hi[x]) + w_hi[j] * static_cast<acc_t>(hi[x + 1]);
    token[j] = static_cast<scalar_t>(wy_lo * top + wy_hi * bottom);
  }
}

// Bilinear mode, in the order of F.interpolate: blend along x within the two source rows, then along y.
template <typename scalar_t, typename acc_t>
void bilinear_leaf_channel(const scalar_t* leaf, int64_t width, int64_t patch, const AxisPlan<acc_t>& plan,
                           scalar_t* token) {
  const acc_t* w_lo = plan.w_lo.data();
  const acc_t* w_hi = plan.w_hi.data();
  for (int64_t i = 0; i < patch; ++i, token += patch) {
    const scalar_t* lo = leaf + plan.lo[i] * width;
    const scalar_t* hi = leaf + plan.hi[i] * width;
    switch (plan.strided) {
      case 2: bilinear_row_strided<2>(lo, hi, w_lo, w_hi, w_lo[i], w_hi[i], patch, token); continue;
      case 4: bilinear_row_strided<4>(lo, hi, w_lo, w_hi, w_lo[i], w_hi[i], patch, token); continue;
      case 8: bilinear_row_strided<8>(lo, hi, w_lo, w_hi, w_lo[i], w_hi[i], patch, token); continue;
      default: break;
    }
    for (int64_t j = 0; j < patch; ++j) {
      const acc_t top = w_lo[j] * static_cast<acc_t>(lo[plan.lo[j]]) + w_hi[j] * static_cast<acc_t>(lo[plan.hi[j]]);
      const acc_t bottom = w_lo[j] * static_cast<acc_t>(hi[plan.lo[j]]) + w_hi[j] * static_cast<acc_t>(hi[plan.hi[j]]);
      token[j] = static_cast<scalar_t>(w_lo[i] * top + w_hi[i] * bottom);
    }
  }
}

template <typename scalar_t, typename acc_t>
void resize_leaf(const scalar_t* image, int64_t channels, int64_t height, int64_t width, const Box& box,
                 int32_t patch, ResizeMode mode, PlanCache<acc_t>& plans, std::vector<acc_t>& row_sum,
                 scalar_t* token) {
  const int32_t factor = box.size % patch == 0 ? box.size / patch : 0;
  const bool unrolled = factor == 1 || factor == 2 || factor == 4 || factor == 8;
  // A leaf of the token's size is copied in either mode, as F.interpolate copies: blending would multiply a
  // neighbour by its weight 0, which turns an Inf pixel next to the sample into NaN.
  const bool bilinear = mode == ResizeMode::kBilinear && box.size != patch;
  const AxisPlan<acc_t>* plan = bilinear || !unrolled ? &plans.get(box.size, patch, mode) : nullptr;
  if (row_sum.size() < static_cast<size_t>(std::max(box.size, patch))) row_sum.resize(std::max(box.size, patch));
  const int64_t token_stride = static_cast<int64_t>(patch) * patch;
  for (int64_t c = 0; c < channels; ++c, token += token_stride) {
    const scalar_t* leaf = image + (c * height + box.y) * width + box.x;
    if (bilinear) {
      bilinear_leaf_channel(leaf, width, patch, *plan, token);
      continue;
    }
    switch (factor) {
      case 1: area_leaf_channel<1>(leaf, width, patch, row_sum.data(), token); break;
      case 2: area_leaf_channel<2>(leaf, width, patch, row_sum.data(), token); break;
      case 4: area_leaf_channel<4>(leaf, width, patch, row_sum.data(), token); break;
      case 8: area_leaf_channel<8>(leaf, width, patch, row_sum.data(), token); break;
      default: area_leaf_channel_any(leaf, width, patch, *plan, row_sum.data(), token);
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
        acc_t* lo = leaf + plan.lo[i] * width;
        acc_t* hi = leaf + plan.hi[i] * width;
        const acc_t wy_lo = plan.w_lo[i], wy_hi = plan.w_hi[i];
        for (int32_t j = 0; j < patch; ++j) {
          const acc_t g = static_cast<acc_t>(grad_token[j]);
          lo[plan.lo[j]] += wy_lo * plan.w_lo[j] * g;
          lo[plan.hi[j]] += wy_lo * plan.w_hi[j] * g;
          hi[plan.lo[j]] += wy_hi * plan.w_lo[j] * g;
          hi[plan.hi[j]] += wy_hi * plan.w_hi[j] * g;
        }
      }
    }
  }
}

// How many pieces each image's leaves are cut into, one task each: one when the images alone keep every thread
// busy, otherwise enough that the tasks split evenly among the threads (a single image into one piece per thread),
// but no more than keep a piece worth a task (a thread's start costs microseconds).
int64_t pieces_per_image(int64_t batch, int64_t n_leaves, int64_t image_numel) {
  constexpr int64_t kMinPiecePixels = 16384;
  const int64_t threads = at::get_num_threads();
  if (batch >= 8 * threads) return 1;
  const int64_t even = threads / std::gcd(batch, threads);
  return std::max<int64_t>(1, std::min({even, n_leaves, image_numel / kMinPiecePixels}));
}

// The leaves of one image by their top row, so that a task reads the image from top to bottom: the quadtree's
// canonical order already is, other boxes are sorted (stably: the order changes no token). Padding boxes are left
// out: they read no pixel (zero_padding_tokens writes their tokens).
void order_by_top_row(const Box* boxes, int64_t n_leaves, std::vector<int64_t>& order) {
  order.clear();
  for (int64_t n = 0; n < n_leaves; ++n) {
    if (!is_padding(boxes[n])) order.push_back(n);
  }
  bool sorted = true;
  for (size_t k = 1; k < order.size() && sorted; ++k) sorted = boxes[order[k - 1]].y <= boxes[order[k]].y;
  if (!sorted) {
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return boxes[a].y < boxes[b].y; });
  }
}

// The tokens of one image's padding boxes: zeros.
template <typename scalar_t>
void zero_padding_tokens(const Box* boxes, int64_t n_leaves, int64_t token_numel, scalar_t* tokens) {
  for (int64_t n = 0; n < n_leaves; ++n) {
    if (is_padding(boxes[n])) std::fill_n(tokens + n * token_numel, token_numel, scalar_t(0));
  }
}

// The range [first, last) of `order` that makes piece `piece` of `pieces`: pieces of about equal work, a leaf
// costing about max(size, patch)^2 (the pixels it reads, or the token it writes when it is smaller).
std::pair<int64_t, int64_t> piece_range(const Box* boxes, const std::vector<int64_t>& order, int32_t patch,
                                        int64_t piece, int64_t pieces) {
  const int64_t n_leaves = static_cast<int64_t>(order.size());
  if (pieces == 1) return {0, n_leaves};
  auto cost = [&](int64_t n) {
    const double side = std::max(boxes[order[n]].size, patch);
    return side * side;
  };
  double total = 0;
  for (int64_t n = 0; n < n_leaves; ++n) total += cost(n);
  int64_t first = n_leaves, last = n_leaves;
  double before = 0;
  for (int64_t n = 0; n < n_leaves; ++n) {
    const int64_t owner = std::min(pieces - 1, static_cast<int64_t>(before * static_cast<double>(pieces) / total));
    if (owner == piece && first == n_leaves) first = n;
    if (owner > piece) {
      last = n;
      break;
    }
    before += cost(n);
  }
  return {std::min(first, last), last};
}

// Brings the rows that a task's leaves read into cache just before them, band by band, in a sequential sweep: a
// leaf reads short rows far apart, which DRAM serves slowly, while a sweep over whole rows streams at full bandwidth
// (about twice as fast overall for images larger than the cache). Only where the leaves cover at least half of the
// rectangle they span, as a mosaic's do: for a few scattered boxes, a sweep would read far more than the leaves.
template <typename scalar_t>
class RowSweep {
 public:
  // `begin` to `end`: the indices of the task's leaves in `boxes`, by top row.
  RowSweep(const scalar_t* image, int64_t channels, int64_t plane, int64_t width, const Box* boxes,
           const int64_t* begin, const int64_t* end)
      : image_(image), channels_(channels), plane_(plane), width_(width) {
    if (begin == end) return;
    int64_t left = width, right = 0, top = boxes[*begin].y, bottom = 0;
    double covered = 0;
    for (const int64_t* n = begin; n != end; ++n) {
      const Box& box = boxes[*n];
      left = std::min<int64_t>(left, box.x);
      right = std::max<int64_t>(right, static_cast<int64_t>(box.x) + box.size);
      bottom = std::max<int64_t>(bottom, static_cast<int64_t>(box.y) + box.size);
      covered += static_cast<double>(box.size) * box.size;
    }
    enabled_ = 2 * covered >= static_cast<double>(right - left) * static_cast<double>(bottom - top);
    left_ = left;
    columns_ = right - left;
  }

  // Sweeps the rows of the box's span that no earlier box reached.
  void reach(const Box& box) {
    const int64_t bottom = static_cast<int64_t>(box.y) + box.size;
    if (!enabled_ || bottom <= swept_end_) return;
    const int64_t top = std::max<int64_t>(swept_end_, box.y);
    for (int64_t c = 0; c < channels_; ++c) {
      const scalar_t* rows = image_ + c * plane_ + top * width_ + left_;
      if (columns_ == width_) {  // the rows are contiguous: one stream
        warm_cache(rows, (bottom - top) * width_ * sizeof(scalar_t));
        continue;
      }
      for (int64_t y = top; y < bottom; ++y, rows += width_) warm_cache(rows, columns_ * sizeof(scalar_t));
    }
    swept_end_ = bottom;
  }

 private:
  const scalar_t* image_;
  int64_t channels_, plane_, width_;
  bool enabled_ = false;
  int64_t left_ = 0, columns_ = 0, swept_end_ = 0;
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
    const int64_t plane = height * width, image_numel = channels * plane;
    const int64_t pieces = pieces_per_image(batch, n_leaves, image_numel);
    at::parallel_for(0, batch * pieces, 1, [&](int64_t begin, int64_t end) {
      PlanCache<acc_t> plans;
      std::vector<acc_t> row_sum;
      std::vector<int64_t> order;
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / pieces;
        const Box* image_boxes = box_ptr + b * n_leaves;
        const scalar_t* image = src_ptr + b * image_numel;
        scalar_t* image_tokens = token_ptr + b * n_leaves * token_numel;
        if (task % pieces == 0) zero_padding_tokens(image_boxes, n_leaves, token_numel, image_tokens);
        order_by_top_row(image_boxes, n_leaves, order);
        const auto [first, last] = piece_range(image_boxes, order, patch, task % pieces, pieces);
        RowSweep<scalar_t> sweep(image, channels, plane, width, image_boxes, order.data() + first,
                                 order.data() + last);
        for (int64_t n = first; n < last; ++n) {
          const Box& box = image_boxes[order[n]];
          sweep.reach(box);
          resize_leaf(image, channels, height, width, box, patch, mode, plans, row_sum,
                      image_tokens + order[n] * token_numel);
        }
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
          if (is_padding(box)) continue;  // its token is a constant zero
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
