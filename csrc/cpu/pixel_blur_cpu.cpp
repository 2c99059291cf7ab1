// Pixel-blur scores on the CPU: for every s x s patch p of every splittable level,
// MSE(p, bilinear_up(area_down(p, m x m))) * s with m = min_patch_size, written into the packed pyramid [B, P].
//
// One task is a strip of root patches side by side (a band max_patch_size pixels high, a few roots wide) of one
// image. Per channel, every level of every root in it is scored in two sweeps down the strip's pixel rows, each
// row read once per sweep for all levels, so that the strip's pixels come from DRAM once (the first sweep, in
// address order) and from cache the second time:
//   1. area down-sample: per level, the rows of an f-row band are summed column by column (f = s / m), then each
//      f-wide box of the sums gives a cell of the m x m down-sampled patches;
//   2. blur and compare: per level, each pixel row blends two up-sampled cell rows (bilinear along x, computed
//      when the y taps first reach them and kept two at a time), and the squared errors add up column by column;
//      at a patch's last row its columns are summed.
// Every sum runs in the same order as a patch-by-patch computation would (rows of a column, then the columns of a
// box or a patch, then the channels), whatever the strip: the scores do not depend on the thread count.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "../op_checks.h"
#include "../resample.h"

namespace mixres {
namespace {

// A strip is about this many pixels wide (at least one root): one channel of it, a few tens of kB at 64 px roots,
// stays in the core's cache between the two sweeps.
constexpr int64_t kStripPixels = 256;

// Indices are int64_t throughout: Python's build flags include -fwrapv (or -fno-strict-overflow), under which int32
// indices, which the compiler must then let wrap, cost a third of the speed. The inner loops take restrict-qualified
// parameters: GCC trusts those, not restrict locals, and vectorises.
template <typename scalar_t, typename acc_t>
void convert_row(const scalar_t* __restrict__ row, int64_t n, acc_t* __restrict__ out) {
  for (int64_t x = 0; x < n; ++x) out[x] = static_cast<acc_t>(row[x]);
}

template <typename acc_t>
void copy_row(const acc_t* __restrict__ row, int64_t n, acc_t* __restrict__ out) {
  for (int64_t x = 0; x < n; ++x) out[x] = row[x];
}

template <typename acc_t>
void add_row(const acc_t* __restrict__ row, int64_t n, acc_t* __restrict__ sum) {
  for (int64_t x = 0; x < n; ++x) sum[x] += row[x];
}

// cells[j] = (sum of the f column sums of box j) / f^2: the area down-sample of one row of cells.
template <int F, typename acc_t>
void box_sums(const acc_t* __restrict__ column_sums, int64_t n_cells, int64_t f_runtime, acc_t inverse_area,
              acc_t* __restrict__ cells) {
  const int64_t f = F > 0 ? F : f_runtime;
  for (int64_t j = 0; j < n_cells; ++j) {
    acc_t sum = column_sums[j * f];
    for (int64_t dx = 1; dx < f; ++dx) sum += column_sums[j * f + dx];
    cells[j] = sum * inverse_area;
  }
}

// Bilinear up-sample along x of one row of m cells to s pixels. Output x = j * f + r blends cells j - 1 and j
// (r < f / 2) or j and j + 1 (r >= f / 2) with weights that depend on r only, except in the first and last blocks
// where the source index is clamped: those take the general taps, the others the weights of block 1
// (bit-identical: the source index (x + 0.5) / f - 0.5 is exact in floating point).
template <int F, typename acc_t>
void upsample_row(const acc_t* __restrict__ in, int64_t m, int64_t s, const BilinearTap<acc_t>* __restrict__ taps,
                  acc_t* __restrict__ out) {
  const int64_t f = F > 0 ? F : s / m;
  const int64_t half = f / 2;
  const BilinearTap<acc_t>* phase = taps + f;  // block 1, whose taps read cells 0, 1 and 2 (used when m >= 3)
  for (int64_t x = 0; x < f; ++x) out[x] = taps[x].w_lo * in[taps[x].lo] + taps[x].w_hi * in[taps[x].hi];
  for (int64_t j = 1; j < m - 1; ++j) {
    const acc_t left = in[j - 1], centre = in[j], right = in[j + 1];
    acc_t* block = out + j * f;
    for (int64_t r = 0; r < half; ++r) block[r] = phase[r].w_lo * left + phase[r].w_hi * centre;
    for (int64_t r = half; r < f; ++r) block[r] = phase[r].w_lo * centre + phase[r].w_hi * right;
  }
  for (int64_t x = m > 1 ? s - f : s; x < s; ++x) {
    out[x] = taps[x].w_lo * in[taps[x].lo] + taps[x].w_hi * in[taps[x].hi];
  }
}

// sse[x] (+)= (w_top * top[x] + w_bottom * bottom[x] - row[x])^2: one partial sum per column. `first`: the
// patch's first row, which starts the sums (as adding to zero would: d * d is never -0).
template <typename acc_t>
void add_squared_error(const acc_t* __restrict__ top, const acc_t* __restrict__ bottom, acc_t w_top, acc_t w_bottom,
                       const acc_t* __restrict__ row, int64_t n, bool first, acc_t* __restrict__ sse) {
  if (first) {
    for (int64_t x = 0; x < n; ++x) {
      const acc_t d = w_top * top[x] + w_bottom * bottom[x] - row[x];
      sse[x] = d * d;
    }
  } else {
    for (int64_t x = 0; x < n; ++x) {
      const acc_t d = w_top * top[x] + w_bottom * bottom[x] - row[x];
      sse[x] += d * d;
    }
  }
}

// One splittable level's state for a strip `width` pixels wide and `height` (= max_patch_size) high.
template <typename acc_t>
struct LevelScratch {
  int64_t s = 0, f = 0;
  const BilinearTap<acc_t>* taps = nullptr;  // s taps, the same along y and x (patches are square)
  std::vector<acc_t> column_sums;  // [width]: the current f-row band's sums
  std::vector<acc_t> cells;        // [height / f, width / f]: the down-sampled strip
  std::vector<acc_t> upsampled;    // [2, width]: cell rows up-sampled along x, cell row i in slot i % 2
  int64_t held[2] = {-1, -1};      // which cell row each slot holds
  std::vector<acc_t> sse;          // [width]: per-column partial sums of the current patch row
  std::vector<acc_t> totals;       // [height / s, width / s]: per-patch sums over the channels so far

  LevelScratch(int64_t size, int64_t m, int64_t height, int64_t width, const BilinearTap<acc_t>* level_taps)
      : s(size), f(size / m), taps(level_taps), column_sums(width), cells((height / f) * (width / f)),
        upsampled(2 * width), sse(width), totals((height / size) * (width / size)) {}

  void down_sample_row(const acc_t* row, int64_t y, int64_t width) {
    const int64_t r = y % f;
    if (r == 0) {
      copy_row(row, width, column_sums.data());
    } else {
      add_row(row, width, column_sums.data());
    }
    if (r != f - 1) return;
    const acc_t inverse_area = acc_t(1) / acc_t(f * f);  // a power of two: as exact as dividing
    acc_t* out = cells.data() + (y / f) * (width / f);
    switch (f) {
      case 2: return box_sums<2>(column_sums.data(), width / f, f, inverse_area, out);
      case 4: return box_sums<4>(column_sums.data(), width / f, f, inverse_area, out);
      case 8: return box_sums<8>(column_sums.data(), width / f, f, inverse_area, out);
      default: return box_sums<0>(column_sums.data(), width / f, f, inverse_area, out);
    }
  }

  // Cell row i of the strip up-sampled along x, patch by patch.
  const acc_t* upsampled_row(int64_t i, int64_t m, int64_t width) {
    acc_t* out = upsampled.data() + (i % 2) * width;
    if (held[i % 2] == i) return out;
    held[i % 2] = i;
    const acc_t* in = cells.data() + i * (width / f);
    for (int64_t patch = 0; patch < width / s; ++patch) {
      switch (f) {
        case 2: upsample_row<2>(in + patch * m, m, s, taps, out + patch * s); break;
        case 4: upsample_row<4>(in + patch * m, m, s, taps, out + patch * s); break;
        case 8: upsample_row<8>(in + patch * m, m, s, taps, out + patch * s); break;
        default: upsample_row<0>(in + patch * m, m, s, taps, out + patch * s); break;
      }
    }
    return out;
  }

  void compare_row(const acc_t* row, int64_t y, int64_t m, int64_t width) {
    const int64_t patch_row = y / s, r = y % s;
    const BilinearTap<acc_t> tap = taps[r];
    const acc_t* top = upsampled_row(patch_row * m + tap.lo, m, width);
    const acc_t* bottom = upsampled_row(patch_row * m + tap.hi, m, width);
    add_squared_error(top, bottom, tap.w_lo, tap.w_hi, row, width, r == 0, sse.data());
    if (r != s - 1) return;
    acc_t* patch_totals = totals.data() + patch_row * (width / s);
    for (int64_t patch = 0; patch < width / s; ++patch) {
      acc_t total = 0;
      for (int64_t x = patch * s; x < (patch + 1) * s; ++x) total += sse[x];
      patch_totals[patch] += total;
    }
  }
};

template <typename scalar_t, typename acc_t>
void score_strip(const scalar_t* strip, int64_t channels, int64_t plane, int64_t image_width, int64_t width,
                 int64_t min_size, int64_t max_size, std::vector<LevelScratch<acc_t>>& levels,
                 std::vector<acc_t>& converted) {
  for (auto& level : levels) std::fill(level.totals.begin(), level.totals.end(), acc_t(0));
  for (int64_t ch = 0; ch < channels; ++ch) {
    const scalar_t* pixels = strip + ch * plane;
    // A row in acc_t: the pixels themselves when they are acc_t already.
    auto row_at = [&](int64_t y) -> const acc_t* {
      if constexpr (std::is_same_v<scalar_t, acc_t>) {
        return pixels + y * image_width;
      } else {
        convert_row(pixels + y * image_width, width, converted.data());
        return converted.data();
      }
    };
    for (int64_t y = 0; y < max_size; ++y) {
      const acc_t* row = row_at(y);
      for (auto& level : levels) level.down_sample_row(row, y, width);
    }
    for (auto& level : levels) level.held[0] = level.held[1] = -1;
    for (int64_t y = 0; y < max_size; ++y) {
      const acc_t* row = row_at(y);
      for (auto& level : levels) level.compare_row(row, y, min_size, width);
    }
  }
}

at::Tensor pixel_blur_scores_cpu(const at::Tensor& images, int64_t min_patch_size, int64_t max_patch_size) {
  const PyramidLayout layout = check_pixel_blur_args(images, min_patch_size, max_patch_size);
  const int64_t batch = images.size(0), channels = images.size(1), height = images.size(2), width = images.size(3);
  const int64_t n_scores = layout.n_scores();
  auto scores = at::empty({batch, n_scores}, images.options().dtype(at::toOpMathType(images.scalar_type())));
  if (scores.numel() == 0) return scores;  // no image, or min_patch_size == max_patch_size
  const auto src = images.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "mixres_pixel_blur_scores_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    // The taps depend only on the level: one table each, shared by all threads.
    std::vector<std::vector<BilinearTap<acc_t>>> taps(layout.n_splittable());
    for (int l = 0; l < layout.n_splittable(); ++l) {
      const int32_t s = static_cast<int32_t>(layout.size(l));  // check_pixel_blur_args: at most 32768
      const int32_t m = static_cast<int32_t>(min_patch_size);
      for (int32_t i = 0; i < s; ++i) taps[l].push_back(bilinear_tap<acc_t>(i, m, s));
    }
    const scalar_t* src_ptr = src.const_data_ptr<scalar_t>();
    acc_t* out_ptr = scores.mutable_data_ptr<acc_t>();
    const int64_t bands = layout.rows(0), roots_per_band = layout.cols(0);
    const int64_t roots_per_strip = std::min(roots_per_band, std::max<int64_t>(1, kStripPixels / max_patch_size));
    const int64_t strips_per_band = (roots_per_band + roots_per_strip - 1) / roots_per_strip;
    const int64_t plane = height * width;
    at::parallel_for(0, batch * bands * strips_per_band, 1, [&](int64_t begin, int64_t end) {
      std::vector<LevelScratch<acc_t>> levels;
      const int64_t scratch_width = roots_per_strip * max_patch_size;
      for (int l = 0; l < layout.n_splittable(); ++l) {
        levels.emplace_back(layout.size(l), min_patch_size, max_patch_size, scratch_width, taps[l].data());
      }
      std::vector<acc_t> converted(std::is_same_v<scalar_t, acc_t> ? 0 : scratch_width);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / (bands * strips_per_band);
        const int64_t band = (task / strips_per_band) % bands, strip = task % strips_per_band;
        const int64_t first_root = strip * roots_per_strip;
        const int64_t n_roots = std::min(roots_per_strip, roots_per_band - first_root);
        const scalar_t* pixels = src_ptr + b * channels * plane + band * max_patch_size * width +
                                 first_root * max_patch_size;
        score_strip(pixels, channels, plane, width, n_roots * max_patch_size, min_patch_size, max_patch_size,
                    levels, converted);
        acc_t* out = out_ptr + b * n_scores;
        for (int l = 0; l < layout.n_splittable(); ++l) {
          const int64_t s = layout.size(l), per_side = max_patch_size / s, strip_cols = n_roots * per_side;
          const acc_t normaliser = static_cast<acc_t>(channels * s * s);
          for (int64_t a = 0; a < per_side; ++a) {
            for (int64_t c = 0; c < strip_cols; ++c) {
              const acc_t total = levels[l].totals[a * strip_cols + c];
              out[layout.cell_index(l, band * per_side + a, first_root * per_side + c)] =
                  total / normaliser * static_cast<acc_t>(s);
            }
          }
        }
      }
    });
  });
  return scores;
}

}  // namespace

TORCH_LIBRARY_IMPL(mixres, CPU, m) { m.impl("pixel_blur_scores", &pixel_blur_scores_cpu); }

}  // namespace mixres
