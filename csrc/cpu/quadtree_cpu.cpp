// Greedy quadtree on the CPU, with a fixed budget or adaptive: one binary heap per image, images in parallel.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <tuple>
#include <vector>

#include "../box.h"
#include "../op_checks.h"

namespace mixres {
namespace {

struct Leaf {
  int64_t key;  // canonical order key; unique among the leaves of one mosaic
  int32_t y, x;
  int32_t level;
};

template <typename scalar_t>
struct Candidate {
  scalar_t score;
  Leaf leaf;
};

// std::push_heap keeps the element for which no other is "less" on top: the highest score, and among equal
// scores the leaf that comes first in canonical order.
template <typename scalar_t>
bool lower_priority(const Candidate<scalar_t>& a, const Candidate<scalar_t>& b) {
  return a.score < b.score || (a.score == b.score && a.leaf.key > b.leaf.key);
}

template <typename scalar_t>
void check_finite(const scalar_t* scores, const PyramidLayout& layout, int64_t image, const char* op) {
  for (int l = 0; l < layout.n_splittable(); ++l) {
    for (int64_t i = layout.offset[l]; i < layout.offset[l + 1]; ++i) {
      const int64_t cell = i - layout.offset[l];
      TORCH_CHECK_VALUE(std::isfinite(static_cast<double>(scores[i])),
                        op, ": scores must be finite, found ", scores[i], " in image ", image,
                        " at patch size ", layout.size(l), ", cell (", cell / layout.cols(l), ", ",
                        cell % layout.cols(l), ")");
    }
  }
}

// Splits the best leaf n_splits times, or until the best leaf scores at or below its level's threshold (none when
// thresholds is null): the fixed-budget greedy, stopped early, so that its leaves are the fixed budget's for as many
// leaves. Writes the leaves in canonical order, then (0, 0, 0) boxes up to n_boxes; returns the number of leaves.
template <typename scalar_t>
int64_t build_one(const scalar_t* scores, const scalar_t* thresholds, const PyramidLayout& layout, int64_t n_splits,
                  int64_t n_boxes, Box* boxes, std::vector<Candidate<scalar_t>>& heap, std::vector<Leaf>& leaves) {
  heap.clear();
  leaves.clear();
  const int last_level = layout.n_levels - 1;
  auto add = [&](int32_t y, int32_t x, int32_t level) {
    const Leaf leaf{layout.order_key(y, x), y, x, level};
    if (level == last_level) {
      leaves.push_back(leaf);
      return;
    }
    const int64_t size = layout.size(level);
    const scalar_t score = scores[layout.cell_index(level, y / size, x / size)];
    heap.push_back({score, leaf});
    std::push_heap(heap.begin(), heap.end(), lower_priority<scalar_t>);
  };

  // Coordinates are below height and width, which make_layout caps at INT32_MAX: they fit the int32 boxes.
  for (int64_t r = 0; r < layout.rows(0); ++r) {
    for (int64_t c = 0; c < layout.cols(0); ++c) {
      add(static_cast<int32_t>(r * layout.max_size), static_cast<int32_t>(c * layout.max_size), 0);
    }
  }
  // A reachable budget leaves a splittable leaf on the heap at every step.
  for (int64_t step = 0; step < n_splits; ++step) {
    const Candidate<scalar_t>& best = heap.front();
    if (thresholds != nullptr && best.score <= thresholds[best.leaf.level]) break;
    std::pop_heap(heap.begin(), heap.end(), lower_priority<scalar_t>);
    const Leaf parent = heap.back().leaf;
    heap.pop_back();
    const int32_t half = static_cast<int32_t>(layout.size(parent.level + 1));
    add(parent.y, parent.x, parent.level + 1);
    add(parent.y, parent.x + half, parent.level + 1);
    add(parent.y + half, parent.x, parent.level + 1);
    add(parent.y + half, parent.x + half, parent.level + 1);
  }
  for (const auto& candidate : heap) leaves.push_back(candidate.leaf);
  std::sort(leaves.begin(), leaves.end(), [](const Leaf& a, const Leaf& b) { return a.key < b.key; });
  for (const auto& leaf : leaves) *boxes++ = Box{leaf.y, leaf.x, static_cast<int32_t>(layout.size(leaf.level))};
  const int64_t n_leaves = static_cast<int64_t>(leaves.size());
  std::fill_n(boxes, n_boxes - n_leaves, Box{0, 0, 0});
  return n_leaves;
}

// Trees of every image of a contiguous packed pyramid, in parallel. Image b stops at budgets[b] leaves (at n_boxes
// when budgets is null), or earlier at thresholds; its leaf count goes to lengths[b] unless lengths is null. The
// budgets must be reachable and at most n_boxes, and the thresholds finite: checked by the callers. The scores are
// checked here, in errors that name `op`.
void build_quadtrees(const at::Tensor& packed, const PyramidLayout& layout, int64_t n_boxes, const int64_t* budgets,
                     const at::Tensor* thresholds, const at::Tensor& boxes, int32_t* lengths, const char* op) {
  const int64_t batch = packed.size(0);
  AT_DISPATCH_FLOATING_TYPES(packed.scalar_type(), "mixres_build_quadtree_cpu", [&] {
    const scalar_t* scores_ptr = packed.const_data_ptr<scalar_t>();
    const scalar_t* thresholds_ptr = thresholds != nullptr ? thresholds->const_data_ptr<scalar_t>() : nullptr;
    Box* boxes_ptr = mutable_box_data(boxes);
    at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
      std::vector<Candidate<scalar_t>> heap;
      std::vector<Leaf> leaves;
      heap.reserve(n_boxes);
      leaves.reserve(n_boxes);
      for (int64_t b = begin; b < end; ++b) {
        const scalar_t* image_scores = scores_ptr + b * layout.n_scores();
        check_finite(image_scores, layout, b, op);
        const int64_t budget = budgets != nullptr ? budgets[b] : n_boxes;
        const int64_t n_leaves = build_one(image_scores, thresholds_ptr, layout, (budget - layout.n_roots()) / 3,
                                           n_boxes, boxes_ptr + b * n_boxes, heap, leaves);
        if (lengths != nullptr) lengths[b] = static_cast<int32_t>(n_leaves);
      }
    });
  });
}

at::Tensor build_quadtree_cpu(const at::Tensor& scores, int64_t height, int64_t width, int64_t min_patch_size,
                              int64_t max_patch_size, int64_t n_patches) {
  const PyramidLayout layout =
      check_quadtree_args(scores, height, width, min_patch_size, max_patch_size, n_patches);
  auto boxes = at::empty({scores.size(0), n_patches, 3}, scores.options().dtype(at::kInt));
  if (scores.size(0) == 0) return boxes;
  build_quadtrees(scores.contiguous(), layout, n_patches, nullptr, nullptr, boxes, nullptr, "mixres.build_quadtree");
  return boxes;
}

constexpr const char* kAdaptiveOp = "mixres.build_quadtree_adaptive";

// Every budget reachable and at most max_patches, checked in image order so that the error names the first bad one
// whatever the thread count.
void check_budget_values(const int64_t* budgets, int64_t batch, const PyramidLayout& layout, int64_t max_patches) {
  const int64_t n_roots = layout.n_roots();
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK_VALUE(budgets[b] <= max_patches && reachable(layout, budgets[b]), kAdaptiveOp, ": budgets[", b,
                      "] = ", budgets[b], " is unreachable: each budget must be ", n_roots, " + 3k, from ", n_roots,
                      " to max_patches = ", max_patches);
  }
}

template <typename scalar_t>
void check_threshold_values(const scalar_t* thresholds, const PyramidLayout& layout) {
  for (int l = 0; l < layout.n_splittable(); ++l) {
    TORCH_CHECK_VALUE(std::isfinite(static_cast<double>(thresholds[l])), kAdaptiveOp,
                      ": thresholds must be finite, got ", thresholds[l], " for patch size ", layout.size(l),
                      " (thresholds[", l, "])");
  }
}

std::tuple<at::Tensor, at::Tensor> build_quadtree_adaptive_cpu(const at::Tensor& scores, int64_t height,
                                                               int64_t width, int64_t min_patch_size,
                                                               int64_t max_patch_size, int64_t max_patches,
                                                               const std::optional<at::Tensor>& budgets,
                                                               const std::optional<at::Tensor>& thresholds) {
  const PyramidLayout layout = check_adaptive_args(scores, height, width, min_patch_size, max_patch_size,
                                                   max_patches, budgets, thresholds);
  const int64_t batch = scores.size(0);
  at::Tensor budget_values;
  if (budgets.has_value()) {
    budget_values = budgets->to(at::kLong).contiguous();
    check_budget_values(budget_values.const_data_ptr<int64_t>(), batch, layout, max_patches);
  }
  at::Tensor threshold_values;
  if (thresholds.has_value()) {
    threshold_values = thresholds->contiguous();
    AT_DISPATCH_FLOATING_TYPES(threshold_values.scalar_type(), "mixres_check_thresholds", [&] {
      check_threshold_values(threshold_values.const_data_ptr<scalar_t>(), layout);
    });
  }
  auto boxes = at::empty({batch, max_patches, 3}, scores.options().dtype(at::kInt));
  auto lengths = at::empty({batch}, scores.options().dtype(at::kInt));
  if (batch == 0) return {boxes, lengths};
  build_quadtrees(scores.contiguous(), layout, max_patches,
                  budget_values.defined() ? budget_values.const_data_ptr<int64_t>() : nullptr,
                  threshold_values.defined() ? &threshold_values : nullptr, boxes,
                  lengths.mutable_data_ptr<int32_t>(), kAdaptiveOp);
  return {boxes, lengths};
}

}  // namespace

TORCH_LIBRARY_IMPL(mixres, CPU, m) {
  m.impl("build_quadtree", &build_quadtree_cpu);
  m.impl("build_quadtree_adaptive", &build_quadtree_adaptive_cpu);
}

}  // namespace mixres
