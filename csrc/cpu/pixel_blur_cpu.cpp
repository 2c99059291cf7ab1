// Pixel-blur scores on the CPU: for every s x s patch p of every splittable level,
// MSE(p, bilinear_up(area_down(p, m x m))) * s with m = min_patch_size, written into the packed pyramid [B, P].
//
// One task is one image row of root patches (a band max_patch_size pixels high): a sequential sweep first brings the
// band into cache at streaming bandwidth (patches read short rows far apart, which DRAM serves slowly), then every
// level of every root in it is scored from cache. Per patch and channel the work is three passes over small
// per-thread buffers: area down-sample (row sums, then box sums), bilinear up-sample along x of the m down-sampled
// rows, then the blend along y fused with the squared error against the patch. No temporary grows with the image.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../op_checks.h"
#include "../resample.h"
#include "warm_cache.h"

namespace mixres {
namespace {

// Per-thread buffers, sized for the largest patch: row_sum[s], small[m * m], rows[m * s], sse[s].
template <typename acc_t>
struct Scratch {
  std::vector<acc_t> row_sum, small, rows, sse;
  Scratch(int64_t min_size, int64_t max_size)
      : row_sum(max_size), small(min_size * min_size), rows(min_size * max_size), sse(max_size) {}
};

// Indices are int64_t throughout: Python's build flags include -fwrapv (or -fno-strict-overflow), under which int32
// indices, which the compiler must then let wrap, cost a third of the speed. The inner loops take restrict-qualified
// parameters: GCC trusts those, not restrict locals, and vectorises.
template <typename scalar_t, typename acc_t>
void add_row(const scalar_t* __restrict__ row, int64_t n, acc_t* __restrict__ sum) {
  for (int64_t x = 0; x < n; ++x) sum[x] += static_cast<acc_t>(row[x]);
}

template <typename scalar_t, typename acc_t>
void copy_row(const scalar_t* __restrict__ row, int64_t n, acc_t* __restrict__ out) {
  for (int64_t x = 0; x < n; ++x) out[x] = static_cast<acc_t>(row[x]);
}

// sse[x] += (w_top * top[x] + w_bottom * bottom[x] - row[x])^2: one partial sum per column.
template <typename scalar_t, typename acc_t>
void add_squared_error(const acc_t* __restrict__ top, const acc_t* __restrict__ bottom, acc_t w_top, acc_t w_bottom,
                       const scalar_t* __restrict__ row, int64_t n, acc_t* __restrict__ sse) {
  for (int64_t x = 0; x < n; ++x) {
    const acc_t d = w_top * top[x] + w_bottom * bottom[x] - static_cast<acc_t>(row[x]);
    sse[x] += d * d;
  }
}

// Sum over the pixels of one channel of one s x s patch of (blur(p) - p)^2. `taps[i]` is the bilinear tap of
// output row (and column: patches are square) i from m to s, in F.interpolate's arithmetic. F is the scale factor
// s / m when it is a compile-time constant (the short loops over it then unroll), 0 otherwise.
template <int F, typename scalar_t, typename acc_t>
acc_t blur_error(const scalar_t* patch, int64_t width, int64_t s, int64_t m, const BilinearTap<acc_t>* taps,
                 Scratch<acc_t>& scratch) {
  const int64_t f = F > 0 ? F : s / m;  // a power of two, at least 2
  const acc_t inverse_area = acc_t(1) / acc_t(f * f);  // a power of two: as exact as dividing
  acc_t* row_sum = scratch.row_sum.data();
  acc_t* small = scratch.small.data();
  acc_t* rows = scratch.rows.data();
  acc_t* sse = scratch.sse.data();

  // Area down-sample to m x m: the f rows of a band summed column by column, then each f-wide box of the sums.
  for (int64_t i = 0; i < m; ++i) {
    const scalar_t* row = patch + i * f * width;
    copy_row(row, s, row_sum);
    for (int64_t dy = 1; dy < f; ++dy) add_row(row + dy * width, s, row_sum);
    for (int64_t j = 0; j < m; ++j) {
      acc_t sum = row_sum[j * f];
      for (int64_t dx = 1; dx < f; ++dx) sum += row_sum[j * f + dx];
      small[i * m + j] = sum * inverse_area;
    }
  }
  // Bilinear up-sample along x of each down-sampled row: rows[i * s + x]. Output x = j * f + r blends input
  // columns j - 1 and j (r < f / 2) or j and j + 1 (r >= f / 2) with weights that depend on r only, except in the
  // first and last blocks where the source index is clamped: those take the general taps, the others the weights
  // of block 1 (bit-identical: the source index (x + 0.5) / f - 0.5 is exact in floating point).
  const int64_t half = f / 2;
  const BilinearTap<acc_t>* phase = taps + f;  // block 1, whose taps read columns 0, 1 and 2 (used when m >= 3)
  for (int64_t i = 0; i < m; ++i) {
    const acc_t* in = small + i * m;
    acc_t* out = rows + i * s;
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
  // Blend along y and compare with the patch.
  std::fill(sse, sse + s, acc_t(0));
  for (int64_t y = 0; y < s; ++y) {
    const BilinearTap<acc_t> ty = taps[y];
    add_squared_error(rows + ty.lo * s, rows + ty.hi * s, ty.w_lo, ty.w_hi, patch + y * width, s, sse);
  }
  acc_t total = 0;
  for (int64_t x = 0; x < s; ++x) total += sse[x];
  return total;
}

template <typename scalar_t, typename acc_t>
acc_t blur_error_any(const scalar_t* patch, int64_t width, int64_t s, int64_t m, const BilinearTap<acc_t>* taps,
                     Scratch<acc_t>& scratch) {
  switch (s / m) {
    case 2: return blur_error<2>(patch, width, s, m, taps, scratch);
    case 4: return blur_error<4>(patch, width, s, m, taps, scratch);
    case 8: return blur_error<8>(patch, width, s, m, taps, scratch);
    default: return blur_error<0>(patch, width, s, m, taps, scratch);
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
    const int64_t plane = height * width;
    at::parallel_for(0, batch * bands, 1, [&](int64_t begin, int64_t end) {
      Scratch<acc_t> scratch(min_patch_size, max_patch_size);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / bands, band = task % bands;
        const scalar_t* image = src_ptr + b * channels * plane;
        acc_t* out = out_ptr + b * n_scores;
        for (int64_t ch = 0; ch < channels; ++ch) {
          warm_cache(image + ch * plane + band * max_patch_size * width, max_patch_size * width * sizeof(scalar_t));
        }
        for (int64_t root = 0; root < roots_per_band; ++root) {
          for (int l = 0; l < layout.n_splittable(); ++l) {
            const int64_t s = layout.size(l), per_side = max_patch_size / s;
            const acc_t normaliser = static_cast<acc_t>(channels * s * s);
            for (int64_t a = 0; a < per_side; ++a) {
              for (int64_t c = 0; c < per_side; ++c) {
                const int64_t row = band * per_side + a, col = root * per_side + c;  // the cell in level l
                const scalar_t* patch = image + row * s * width + col * s;
                acc_t total = 0;
                for (int64_t ch = 0; ch < channels; ++ch) {
                  total += blur_error_any(patch + ch * plane, width, s, min_patch_size, taps[l].data(), scratch);
                }
                out[layout.cell_index(l, row, col)] = total / normaliser * static_cast<acc_t>(s);
              }
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
