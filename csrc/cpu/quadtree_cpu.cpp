// Greedy quadtree on the CPU: one binary heap per image, images in parallel.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
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
void check_finite(const scalar_t* scores, const PyramidLayout& layout, int64_t image) {
  for (int l = 0; l < layout.n_splittable(); ++l) {
    for (int64_t i = layout.offset[l]; i < layout.offset[l + 1]; ++i) {
      const int64_t cell = i - layout.offset[l];
      TORCH_CHECK_VALUE(std::isfinite(static_cast<double>(scores[i])),
                        "mixres.build_quadtree: scores must be finite, found ", scores[i], " in image ", image,
                        " at patch size ", layout.size(l), ", cell (", cell / layout.cols(l), ", ",
                        cell % layout.cols(l), ")");
    }
  }
}

template <typename scalar_t>
void build_one(const scalar_t* scores, const PyramidLayout& layout, int64_t n_splits, Box* boxes,
               std::vector<Candidate<scalar_t>>& heap, std::vector<Leaf>& leaves) {
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
  for (int64_t step = 0; step < n_splits; ++step) {
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
}

at::Tensor build_quadtree_cpu(const at::Tensor& scores, int64_t height, int64_t width, int64_t min_patch_size,
                              int64_t max_patch_size, int64_t n_patches) {
  const PyramidLayout layout =
      check_quadtree_args(scores, height, width, min_patch_size, max_patch_size, n_patches);
  const int64_t batch = scores.size(0);
  const int64_t n_splits = (n_patches - layout.n_roots()) / 3;
  auto boxes = at::empty({batch, n_patches, 3}, scores.options().dtype(at::kInt));
  if (batch == 0) return boxes;
  const auto packed = scores.contiguous();
  AT_DISPATCH_FLOATING_TYPES(packed.scalar_type(), "mixres_build_quadtree_cpu", [&] {
    const scalar_t* scores_ptr = packed.const_data_ptr<scalar_t>();
    Box* boxes_ptr = mutable_box_data(boxes);
    at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
      std::vector<Candidate<scalar_t>> heap;
      std::vector<Leaf> leaves;
      heap.reserve(n_patches);
      leaves.reserve(n_patches);
      for (int64_t b = begin; b < end; ++b) {
        const scalar_t* image_scores = scores_ptr + b * layout.n_scores();
        check_finite(image_scores, layout, b);
        build_one(image_scores, layout, n_splits, boxes_ptr + b * n_patches, heap, leaves);
      }
    });
  });
  return boxes;
}

}  // namespace

TORCH_LIBRARY_IMPL(mixres, CPU, m) { m.impl("build_quadtree", &build_quadtree_cpu); }

}  // namespace mixres
