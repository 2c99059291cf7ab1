// The packed score pyramid and the quadtree geometry, shared by the CPU and CUDA kernels.
#pragma once

#include <c10/macros/Macros.h>
#include <c10/util/Exception.h>

#include <cstdint>

namespace mixres {

// Levels are numbered coarse to fine: level l holds patches of side max_size >> l.
// Levels 0 .. n_splittable-1 have a score map; the last level (min_size) is never split.
// The scores of one image are packed level after level, each map row-major, so that
// one pointer and a few offsets address the whole pyramid on either device.
constexpr int kMaxLevels = 16;
constexpr int64_t kMaxImageSide = 2147483647;  // INT32_MAX

struct PyramidLayout {
  int64_t height = 0;
  int64_t width = 0;
  int64_t min_size = 0;
  int64_t max_size = 0;
  int n_levels = 0;  // including the unsplittable min_size level
  int64_t offset[kMaxLevels + 1] = {};  // offset[l]: first packed score of level l

  C10_HOST_DEVICE int n_splittable() const { return n_levels - 1; }
  C10_HOST_DEVICE int64_t size(int level) const { return max_size >> level; }
  C10_HOST_DEVICE int64_t rows(int level) const { return height / size(level); }
  C10_HOST_DEVICE int64_t cols(int level) const { return width / size(level); }
  C10_HOST_DEVICE int64_t n_scores() const { return offset[n_splittable()]; }  // the packed length P
  // Where the score of cell (row, col) of level l's map is packed.
  C10_HOST_DEVICE int64_t cell_index(int level, int64_t row, int64_t col) const {
    return offset[level] + row * cols(level) + col;
  }
  C10_HOST_DEVICE int64_t n_roots() const { return rows(0) * cols(0); }
  C10_HOST_DEVICE int64_t max_leaves() const { return rows(n_levels - 1) * cols(n_levels - 1); }
  // Canonical order: raster order of the top-left corner, in pixels. Leaves never share a corner.
  C10_HOST_DEVICE int64_t order_key(int64_t y, int64_t x) const { return y * width + x; }
};

inline PyramidLayout make_layout(int64_t height, int64_t width, int64_t min_size, int64_t max_size) {
  TORCH_CHECK_VALUE(min_size > 0 && max_size >= min_size,
                    "mixres: need 0 < min_patch_size <= max_patch_size, got ", min_size, " and ", max_size);
  const int64_t ratio = max_size / min_size;
  TORCH_CHECK_VALUE(max_size % min_size == 0 && (ratio & (ratio - 1)) == 0,
                    "mixres: max_patch_size / min_patch_size must be a power of two, got ", max_size, " / ",
                    min_size);
  TORCH_CHECK_VALUE(height > 0 && width > 0 && height % max_size == 0 && width % max_size == 0,
                    "mixres: height and width must be positive multiples of max_patch_size ", max_size, ", got ",
                    height, "x", width);
  // Boxes hold int32 pixel coordinates; with sides below 2^31, order keys y * width + x (and the CUDA kernel's
  // key << 4) fit an int64, and so do the products rows * cols of every level.
  TORCH_CHECK_VALUE(height <= kMaxImageSide && width <= kMaxImageSide, "mixres: height and width must be at most ",
                    kMaxImageSide, " (boxes hold int32 pixel coordinates), got ", height, "x", width);
  PyramidLayout layout;
  layout.height = height;
  layout.width = width;
  layout.min_size = min_size;
  layout.max_size = max_size;
  while ((max_size >> layout.n_levels) >= min_size) ++layout.n_levels;
  TORCH_CHECK_VALUE(layout.n_levels <= kMaxLevels, "mixres: at most ", kMaxLevels, " patch sizes are supported");
  for (int l = 0; l < layout.n_splittable(); ++l) {
    layout.offset[l + 1] = layout.offset[l] + layout.rows(l) * layout.cols(l);
  }
  return layout;
}

// Whether a tree of n_leaves leaves is reachable: the roots plus 3 leaves a split, at most one leaf per min_size cell.
C10_HOST_DEVICE inline bool reachable(const PyramidLayout& layout, int64_t n_leaves) {
  const int64_t n_roots = layout.n_roots();
  return n_leaves >= n_roots && n_leaves <= layout.max_leaves() && (n_leaves - n_roots) % 3 == 0;
}

// `name` is the budget's argument: n_patches, or max_patches for the adaptive op.
inline void check_budget(const PyramidLayout& layout, int64_t n_patches, const char* name = "n_patches") {
  const int64_t n_roots = layout.n_roots();
  TORCH_CHECK_VALUE(reachable(layout, n_patches),
                    "mixres: ", name, " must be ", n_roots, " + 3k and at most ", layout.max_leaves(), " for a ",
                    layout.height, "x", layout.width, " image with patches of ", layout.min_size, " to ",
                    layout.max_size, " px, got ", n_patches);
}

}  // namespace mixres
