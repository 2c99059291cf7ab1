// Pixel-blur scores on the CPU: for every s x s patch p of every splittable level,
// MSE(p, bilinear_up(area_down(p, m x m))) * s with m = min_patch_size, written into the packed pyramid [B, P].
//
// One task is a strip of one image: root patches side by side, max_patch_size pixels high and about kStripPixels
// wide (narrower when the threads need more tasks). Per channel, every level of every root in the strip is scored
// in two sweeps down the strip's pixel rows, each row read once per sweep for all levels, the second from cache:
//   1. Area down-sample: the finest level's cells (f = s / m = 2) are the 2 x 2 averages of the pixels, and each
//      coarser level's the 2 x 2 averages of the next finer level's cells (means of equal means: the mean of the
//      f x f pixels, up to rounding).
//   2. Blur and compare: per level, each pixel row blends two up-sampled cell rows (bilinear along x, computed
//      when the y taps first reach them and kept two at a time), and the squared errors add up column by column,
//      two levels per pass over the row; at a patch's last row its columns are summed.
// While the second sweep runs, the next channel (or strip) is prefetched: the memory traffic overlaps arithmetic.
// Each sum runs in an order fixed by the geometry alone, whatever the strip: the scores do not depend on the thread
// count.
//
// The arithmetic is a few operations per pixel and level, so the vector width sets the speed: on x86-64 CPUs with
// AVX2 the loops run in a copy compiled for AVX2. That copy has no FMA (contraction would round differently) and
// the vectorised loops never reassociate a sum, so both copies give the same bits.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "../op_checks.h"
#include "../resample.h"

#if defined(__GNUC__) && defined(__x86_64__)
#define MIXRES_PIXEL_BLUR_AVX2 1
#endif

// Everything the strip's loops call is inlined into each of the two copies, so that each copy's loops are compiled
// for its instruction set (a call would run the baseline code).
#if defined(__GNUC__)
#define MIXRES_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define MIXRES_ALWAYS_INLINE inline
#endif

// An opaque step in a loop over patches: GCC would vectorise the loop with strided gathers and scatters, slower
// than its few scalar operations per patch.
#if defined(__GNUC__)
#define MIXRES_KEEP_SCALAR(pointer) asm("" : "+r"(pointer))
#else
#define MIXRES_KEEP_SCALAR(pointer)
#endif

namespace mixres {
namespace {

// A strip is at most this many pixels wide, or one root: what the comparison holds per row (a pixel row, and per
// level two up-sampled rows and a row of squared errors) then stays in the L1 cache.
constexpr int64_t kStripPixels = 256;
// Tasks per thread to aim at: enough that threads finishing early find work.
constexpr int64_t kTasksPerThread = 4;

// Indices are int64_t throughout: Python's build flags include -fwrapv (or -fno-strict-overflow), under which int32
// indices, which the compiler must then let wrap, cost a third of the speed. The inner loops take restrict-qualified
// parameters: GCC trusts those, not restrict locals, and vectorises.
template <typename scalar_t, typename acc_t>
MIXRES_ALWAYS_INLINE void convert_row(const scalar_t* __restrict__ row, int64_t n, acc_t* __restrict__ out) {
  for (int64_t x = 0; x < n; ++x) out[x] = static_cast<acc_t>(row[x]);
}

// cells[j] = ((top[2j] + bottom[2j]) + (top[2j + 1] + bottom[2j + 1])) / 4: the 2 x 2 box averages of two rows
// (of pixels, or of a finer level's cells).
template <typename acc_t>
MIXRES_ALWAYS_INLINE void average_2x2(const acc_t* __restrict__ top, const acc_t* __restrict__ bottom,
                                      int64_t n_cells, acc_t* __restrict__ cells) {
  int64_t j = 0;
#if defined(__GNUC__)
  if constexpr (std::is_same_v<acc_t, float>) {
    // 8 cells at a time, their 16 column sums split into even and odd columns by two shuffles, in GCC's (and
    // Clang's) vector extensions: the loop below, vectorised by the compiler, takes 4 permutes and 2 blends to
    // split the columns of each row, and the whole op runs about 10% slower. The same additions: the same bits.
    typedef float Floats __attribute__((vector_size(32)));
    for (; j + 8 <= n_cells; j += 8) {
      Floats top_lo, top_hi, bottom_lo, bottom_hi;
      __builtin_memcpy(&top_lo, top + 2 * j, sizeof(Floats));
      __builtin_memcpy(&top_hi, top + 2 * j + 8, sizeof(Floats));
      __builtin_memcpy(&bottom_lo, bottom + 2 * j, sizeof(Floats));
      __builtin_memcpy(&bottom_hi, bottom + 2 * j + 8, sizeof(Floats));
      const Floats lo = top_lo + bottom_lo, hi = top_hi + bottom_hi;  // the column sums 2j .. 2j + 15
#if defined(__clang__)
      const Floats even = __builtin_shufflevector(lo, hi, 0, 2, 4, 6, 8, 10, 12, 14);
      const Floats odd = __builtin_shufflevector(lo, hi, 1, 3, 5, 7, 9, 11, 13, 15);
#else
      typedef int Ints __attribute__((vector_size(32)));
      const Floats even = __builtin_shuffle(lo, hi, Ints{0, 2, 4, 6, 8, 10, 12, 14});
      const Floats odd = __builtin_shuffle(lo, hi, Ints{1, 3, 5, 7, 9, 11, 13, 15});
#endif
      const Floats average = (even + odd) * 0.25f;
      __builtin_memcpy(cells + j, &average, sizeof(Floats));
    }
  }
#endif
  for (; j < n_cells; ++j) {
    cells[j] = ((top[2 * j] + bottom[2 * j]) + (top[2 * j + 1] + bottom[2 * j + 1])) * acc_t(0.25);
  }
}

// Bilinear up-sample along x of a row of cells, patch after patch. Output x = j * f + r of block j blends cells
// j - 1 and j (r < f / 2) or j and j + 1 (r >= f / 2) with weights that depend on r only, those of block 1 of a
// patch (`phase_lo`, `phase_hi`): bit-identical to the general taps, since the source index (x + 0.5) / f - 0.5 is
// exact in floating point. Right everywhere but in the first half of each patch's block 0 and the second half of
// its last block, where the taps clamp: the caller overwrites those (upsample_patch_edges). `in` has a cell of
// padding on either side.
template <int F, typename acc_t>
MIXRES_ALWAYS_INLINE void upsample_blocks(const acc_t* __restrict__ in, int64_t n_cells, int64_t f_runtime,
                                          const acc_t* __restrict__ phase_lo, const acc_t* __restrict__ phase_hi,
                                          acc_t* __restrict__ out) {
  const int64_t f = F > 0 ? F : f_runtime;
  const int64_t half = f / 2;
  for (int64_t j = 0; j < n_cells; ++j) {
    const acc_t left = in[j - 1], centre = in[j], right = in[j + 1];
    acc_t* block = out + j * f;
    for (int64_t r = 0; r < half; ++r) block[r] = phase_lo[r] * left + phase_hi[r] * centre;
    for (int64_t r = half; r < f; ++r) block[r] = phase_lo[r] * centre + phase_hi[r] * right;
  }
}

// Where the taps of a patch of m cells clamp: the first f / 2 pixels, which take cell 0 alone (the general taps'
// weights 1 and 0 on cells 0 and min(1, m - 1), `first_lo`, `first_hi`), and the last f / 2 pixels, which blend
// cell m - 1 with itself (when m >= 2; when m = 1 the first taps cover the whole patch).
template <int F, typename acc_t>
MIXRES_ALWAYS_INLINE void upsample_patch_edges(const acc_t* __restrict__ in, int64_t n_patches, int64_t m,
                                               int64_t f_runtime, const acc_t* __restrict__ first_lo,
                                               const acc_t* __restrict__ first_hi,
                                               const acc_t* __restrict__ phase_lo,
                                               const acc_t* __restrict__ phase_hi, acc_t* __restrict__ out) {
  const int64_t f = F > 0 ? F : f_runtime;
  const int64_t s = m * f, half = f / 2;
  if (m == 1) {
    for (int64_t patch = 0; patch < n_patches; ++patch) {
      acc_t* block = out + patch * s;
      MIXRES_KEEP_SCALAR(block);
      for (int64_t r = 0; r < f; ++r) block[r] = first_lo[r] * in[patch] + first_hi[r] * in[patch];
    }
    return;
  }
  for (int64_t patch = 0; patch < n_patches; ++patch) {
    const acc_t* cells = in + patch * m;
    acc_t* first = out + patch * s;
    MIXRES_KEEP_SCALAR(first);
    acc_t* last = first + s - f;
    for (int64_t r = 0; r < half; ++r) first[r] = first_lo[r] * cells[0] + first_hi[r] * cells[1];
    for (int64_t r = half; r < f; ++r) last[r] = phase_lo[r] * cells[m - 1] + phase_hi[r] * cells[m - 1];
  }
}

// sse[x] (+)= (w_top * top[x] + w_bottom * bottom[x] - row[x])^2: one partial sum per column. `first`: the
// patch's first row, which starts the sums (as adding to zero would: d * d is never -0).
template <typename acc_t>
MIXRES_ALWAYS_INLINE void add_squared_error(const acc_t* __restrict__ top, const acc_t* __restrict__ bottom,
                                            acc_t w_top, acc_t w_bottom, const acc_t* __restrict__ row, int64_t n,
                                            bool first, acc_t* __restrict__ sse) {
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

// One splittable level's buffers for a strip up to `width` pixels wide and `height` (= max_patch_size) high.
template <typename acc_t>
struct LevelBuffers {
  std::vector<acc_t> cells;        // [height / f, width / f + 2]: the down-sampled strip, a cell of padding each side
  std::vector<acc_t> upsampled;    // [2, width]: cell rows up-sampled along x, cell row i in slot i % 2
  std::vector<acc_t> sse;          // [width]: per-column partial sums of the current patch row
  std::vector<acc_t> totals;       // [height / s, width / s]: per-patch sums over the channels so far
  std::vector<acc_t> first_lo, first_hi;  // [f]: the x weights of a patch's block 0, on its cells 0 and 1
  std::vector<acc_t> phase_lo, phase_hi;  // [f]: the x weights of a patch's block 1 (when m >= 2), and of those after

  LevelBuffers(int64_t s, int64_t m, int64_t height, int64_t width, const BilinearTap<acc_t>* taps)
      : cells((height / (s / m)) * (width / (s / m) + 2)), upsampled(2 * width), sse(width),
        totals((height / s) * (width / s)) {
    for (int64_t r = 0; r < s / m; ++r) {
      first_lo.push_back(taps[r].w_lo);  // taps[r].lo is 0 and .hi min(1, m - 1)
      first_hi.push_back(taps[r].w_hi);
    }
    if (m < 2) return;  // every block is a block 0
    for (int64_t r = 0; r < s / m; ++r) {
      phase_lo.push_back(taps[s / m + r].w_lo);
      phase_hi.push_back(taps[s / m + r].w_hi);
    }
  }
};

// What the strip's loops see of a level: raw pointers only (see MIXRES_ALWAYS_INLINE), and counters and shifts
// rather than divisions by runtime values on the way down the rows.
template <typename acc_t>
struct Level {
  int64_t s, f, f_shift;           // f = s / m = 1 << f_shift
  const BilinearTap<acc_t>* taps;  // s taps, the same along y and x (patches are square)
  const acc_t* first_lo;
  const acc_t* first_hi;
  const acc_t* phase_lo;
  const acc_t* phase_hi;
  acc_t* cells;
  acc_t* upsampled;
  acc_t* sse;
  acc_t* totals;
  // Per strip: cells per row, patches per row; per channel: the row of patches being compared, and the row in
  // them; which cell row each slot of `upsampled` holds.
  int64_t n_cells, n_patches, patch_row, row_in_patch, held[2];
};

struct Strip {
  int64_t channels, plane, image_width;  // plane: the pixels of one channel of the image
  int64_t width, height, min_size;       // the strip's width; height = max_patch_size
};

// Cell row i of the level: n_cells cells, with a cell of padding on either side (upsample_blocks reads them; they
// are 0, so that nothing they touch is NaN).
template <typename acc_t>
MIXRES_ALWAYS_INLINE acc_t* cell_row(Level<acc_t>& level, int64_t i) {
  return level.cells + i * (level.n_cells + 2) + 1;
}

// Area down-sample of one channel of the strip into each level's cells: the finest level's (f = 2) from the pixels,
// each coarser level's from the next finer one's, each cell the average of 2 x 2 finer cells (a mean of equal
// means: the mean of its f x f pixels). `scratch`: 2 rows of the strip.
template <typename scalar_t, typename acc_t>
MIXRES_ALWAYS_INLINE void down_sample(const scalar_t* pixels, const Strip& strip, Level<acc_t>* levels, int n_levels,
                                      acc_t* scratch) {
  Level<acc_t>& finest = levels[n_levels - 1];
  for (int64_t y = 0; y < strip.height; y += 2) {
    const acc_t* top;
    const acc_t* bottom;
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      top = pixels + y * strip.image_width;
      bottom = top + strip.image_width;
    } else {
      convert_row(pixels + y * strip.image_width, strip.width, scratch);
      convert_row(pixels + (y + 1) * strip.image_width, strip.width, scratch + strip.width);
      top = scratch;
      bottom = scratch + strip.width;
    }
    average_2x2(top, bottom, finest.n_cells, cell_row(finest, y / 2));
  }
  for (int l = n_levels - 2; l >= 0; --l) {
    Level<acc_t>& level = levels[l];
    for (int64_t i = 0; i < strip.height >> level.f_shift; ++i) {
      average_2x2(cell_row(levels[l + 1], 2 * i), cell_row(levels[l + 1], 2 * i + 1), level.n_cells,
                  cell_row(level, i));
    }
  }
}

// Cell row i of the level's strip up-sampled along x, patch by patch; computed once per channel.
template <typename acc_t>
MIXRES_ALWAYS_INLINE const acc_t* upsampled_row(Level<acc_t>& level, int64_t i, int64_t m, int64_t width) {
  acc_t* out = level.upsampled + (i & 1) * width;
  if (level.held[i & 1] == i) return out;
  level.held[i & 1] = i;
  const acc_t* in = cell_row(level, i);
#define MIXRES_UPSAMPLE(F)                                                                                        \
  if (m >= 2) upsample_blocks<F>(in, level.n_cells, level.f, level.phase_lo, level.phase_hi, out);               \
  upsample_patch_edges<F>(in, level.n_patches, m, level.f, level.first_lo, level.first_hi, level.phase_lo,      \
                          level.phase_hi, out)
  switch (level.f) {
    case 2: MIXRES_UPSAMPLE(2); break;
    case 4: MIXRES_UPSAMPLE(4); break;
    case 8: MIXRES_UPSAMPLE(8); break;
    default: MIXRES_UPSAMPLE(0); break;
  }
#undef MIXRES_UPSAMPLE
  return out;
}

// The squared errors of two levels' blurs against one pixel row: add_squared_error for both, in one pass over the
// row. FIRST_A, FIRST_B: whether the row is the first of its patch in each level.
template <bool FIRST_A, bool FIRST_B, typename acc_t>
MIXRES_ALWAYS_INLINE void add_squared_errors(const acc_t* __restrict__ top_a, const acc_t* __restrict__ bottom_a,
                                             acc_t w_top_a, acc_t w_bottom_a, const acc_t* __restrict__ top_b,
                                             const acc_t* __restrict__ bottom_b, acc_t w_top_b, acc_t w_bottom_b,
                                             const acc_t* __restrict__ row, int64_t n, acc_t* __restrict__ sse_a,
                                             acc_t* __restrict__ sse_b) {
  for (int64_t x = 0; x < n; ++x) {
    const acc_t pixel = row[x];
    const acc_t d_a = w_top_a * top_a[x] + w_bottom_a * bottom_a[x] - pixel;
    const acc_t d_b = w_top_b * top_b[x] + w_bottom_b * bottom_b[x] - pixel;
    sse_a[x] = FIRST_A ? d_a * d_a : sse_a[x] + d_a * d_a;
    sse_b[x] = FIRST_B ? d_b * d_b : sse_b[x] + d_b * d_b;
  }
}

// Blur and compare, step 1: the up-sampled cell rows that the level's blur of the next pixel row blends.
template <typename acc_t>
struct Blend {
  const acc_t* top;
  const acc_t* bottom;
  acc_t w_top, w_bottom;
  bool first;  // the row is the first of its patch
};

template <typename acc_t>
MIXRES_ALWAYS_INLINE Blend<acc_t> next_blend(const Strip& strip, Level<acc_t>& level) {
  const int64_t r = level.row_in_patch, first_cell_row = level.patch_row * strip.min_size;
  const BilinearTap<acc_t> tap = level.taps[r];
  const acc_t* top = upsampled_row(level, first_cell_row + tap.lo, strip.min_size, strip.width);
  const acc_t* bottom = upsampled_row(level, first_cell_row + tap.hi, strip.min_size, strip.width);
  return {top, bottom, tap.w_lo, tap.w_hi, r == 0};
}

// Step 3, once the row's squared errors are in: the per-patch sums at the patches' last rows.
template <typename acc_t>
MIXRES_ALWAYS_INLINE void finish_row(Level<acc_t>& level) {
  if (++level.row_in_patch < level.s) return;
  acc_t* totals = level.totals + level.patch_row * level.n_patches;
  for (int64_t patch = 0; patch < level.n_patches; ++patch) {
    acc_t total = 0;
    for (int64_t x = patch * level.s; x < (patch + 1) * level.s; ++x) total += level.sse[x];
    totals[patch] += total;
  }
  level.row_in_patch = 0;
  ++level.patch_row;
}

// Blur and compare a pixel row for every level, two levels per pass over the row.
template <typename acc_t>
MIXRES_ALWAYS_INLINE void compare_row(const acc_t* row, const Strip& strip, Level<acc_t>* levels, int n_levels) {
  int l = 0;
  for (; l + 1 < n_levels; l += 2) {
    const Blend<acc_t> a = next_blend(strip, levels[l]), b = next_blend(strip, levels[l + 1]);
#define MIXRES_ADD_SQUARED_ERRORS(FIRST_A, FIRST_B)                                                                \
  add_squared_errors<FIRST_A, FIRST_B>(a.top, a.bottom, a.w_top, a.w_bottom, b.top, b.bottom, b.w_top,             \
                                       b.w_bottom, row, strip.width, levels[l].sse, levels[l + 1].sse)
    if (a.first) {
      if (b.first) MIXRES_ADD_SQUARED_ERRORS(true, true); else MIXRES_ADD_SQUARED_ERRORS(true, false);
    } else {
      if (b.first) MIXRES_ADD_SQUARED_ERRORS(false, true); else MIXRES_ADD_SQUARED_ERRORS(false, false);
    }
#undef MIXRES_ADD_SQUARED_ERRORS
    finish_row(levels[l]);
    finish_row(levels[l + 1]);
  }
  if (l < n_levels) {
    const Blend<acc_t> a = next_blend(strip, levels[l]);
    add_squared_error(a.top, a.bottom, a.w_top, a.w_bottom, row, strip.width, a.first, levels[l].sse);
    finish_row(levels[l]);
  }
}

// Asks for the `width` pixels of a row to be brought into cache, without waiting for them.
template <typename scalar_t>
MIXRES_ALWAYS_INLINE void prefetch_row(const scalar_t* row, int64_t width) {
  const char* bytes = reinterpret_cast<const char*>(row);
  for (int64_t offset = 0; offset < width * static_cast<int64_t>(sizeof(scalar_t)); offset += 64) {
    __builtin_prefetch(bytes + offset, 0, 3);
  }
}

// The sums of squared errors of every patch of the strip (`pixels`: its top-left pixel in channel 0), over the
// channels, into each level's totals. While it compares a channel, it prefetches the next one (row for row), or
// the next strip's first (`next`, when not null): the down-sample then reads from cache, and the memory traffic
// overlaps the arithmetic.
template <typename scalar_t, typename acc_t>
MIXRES_ALWAYS_INLINE void score_strip(const scalar_t* pixels, const scalar_t* next, const Strip& strip,
                                      Level<acc_t>* levels, int n_levels, acc_t* scratch) {
  for (int l = 0; l < n_levels; ++l) {
    Level<acc_t>& level = levels[l];
    level.n_cells = strip.width >> level.f_shift;
    level.n_patches = strip.width / level.s;
    const int64_t n = (strip.height / level.s) * level.n_patches;
    for (int64_t i = 0; i < n; ++i) level.totals[i] = 0;
    for (int64_t i = 0; i < strip.height >> level.f_shift; ++i) {
      acc_t* cells = cell_row(level, i);
      cells[-1] = cells[level.n_cells] = 0;
    }
  }
  for (int64_t ch = 0; ch < strip.channels; ++ch) {
    const scalar_t* channel = pixels + ch * strip.plane;
    const scalar_t* upcoming = ch + 1 < strip.channels ? channel + strip.plane : next;
    down_sample(channel, strip, levels, n_levels, scratch);
    for (int l = 0; l < n_levels; ++l) {
      levels[l].patch_row = levels[l].row_in_patch = 0;
      levels[l].held[0] = levels[l].held[1] = -1;
    }
    for (int64_t y = 0; y < strip.height; ++y) {
      if (upcoming != nullptr) prefetch_row(upcoming + y * strip.image_width, strip.width);
      const acc_t* row;
      if constexpr (std::is_same_v<scalar_t, acc_t>) {
        row = channel + y * strip.image_width;
      } else {
        convert_row(channel + y * strip.image_width, strip.width, scratch);
        row = scratch;
      }
      compare_row(row, strip, levels, n_levels);
    }
  }
}

template <typename scalar_t, typename acc_t>
void score_strip_baseline(const scalar_t* pixels, const scalar_t* next, const Strip& strip, Level<acc_t>* levels,
                          int n_levels, acc_t* scratch) {
  score_strip(pixels, next, strip, levels, n_levels, scratch);
}

#ifdef MIXRES_PIXEL_BLUR_AVX2
template <typename scalar_t, typename acc_t>
__attribute__((target("avx2"))) void score_strip_avx2(const scalar_t* pixels, const scalar_t* next,
                                                      const Strip& strip, Level<acc_t>* levels, int n_levels,
                                                      acc_t* scratch) {
  score_strip(pixels, next, strip, levels, n_levels, scratch);
}

// AVX2 where the CPU (and the OS) supports it, unless ATen was told to stay on the baseline
// (ATEN_CPU_CAPABILITY=default): the scores are the same either way, the time is not.
bool use_avx2() {
  static const bool avx2 = __builtin_cpu_supports("avx2") && at::get_cpu_capability() != "DEFAULT";
  return avx2;
}
#endif

at::Tensor pixel_blur_scores_cpu(const at::Tensor& images, int64_t min_patch_size, int64_t max_patch_size) {
  const PyramidLayout layout = check_pixel_blur_args(images, min_patch_size, max_patch_size);
  const int64_t batch = images.size(0), channels = images.size(1), height = images.size(2), width = images.size(3);
  const int64_t n_scores = layout.n_scores();
  auto scores = at::empty({batch, n_scores}, images.options().dtype(at::toOpMathType(images.scalar_type())));
  if (scores.numel() == 0) return scores;  // no image, or min_patch_size == max_patch_size
  const auto src = images.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "mixres_pixel_blur_scores_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto score_strip_fn = &score_strip_baseline<scalar_t, acc_t>;
#ifdef MIXRES_PIXEL_BLUR_AVX2
    if (use_avx2()) score_strip_fn = &score_strip_avx2<scalar_t, acc_t>;
#endif
    const int n_levels = layout.n_splittable();
    // The taps depend only on the level: one table each, shared by all threads.
    std::vector<std::vector<BilinearTap<acc_t>>> taps(n_levels);
    for (int l = 0; l < n_levels; ++l) {
      const int32_t s = static_cast<int32_t>(layout.size(l));  // check_pixel_blur_args: at most 32768
      const int32_t m = static_cast<int32_t>(min_patch_size);
      for (int32_t i = 0; i < s; ++i) taps[l].push_back(bilinear_tap<acc_t>(i, m, s));
    }
    const scalar_t* src_ptr = src.const_data_ptr<scalar_t>();
    acc_t* out_ptr = scores.mutable_data_ptr<acc_t>();
    const int64_t bands = layout.rows(0), roots_per_band = layout.cols(0);
    const int64_t narrow_strips = (roots_per_band * max_patch_size + kStripPixels - 1) / kStripPixels;
    const int64_t wanted_tasks = kTasksPerThread * at::get_num_threads();
    const int64_t strips_per_band = std::min(
        roots_per_band, std::max(narrow_strips, (wanted_tasks + batch * bands - 1) / (batch * bands)));
    const int64_t roots_per_strip = (roots_per_band + strips_per_band - 1) / strips_per_band;
    const int64_t n_strips = (roots_per_band + roots_per_strip - 1) / roots_per_strip;  // per band
    at::parallel_for(0, batch * bands * n_strips, 1, [&](int64_t begin, int64_t end) {
      const int64_t scratch_width = roots_per_strip * max_patch_size;
      std::vector<LevelBuffers<acc_t>> buffers;
      std::vector<Level<acc_t>> levels;
      for (int l = 0; l < n_levels; ++l) {
        const int64_t s = layout.size(l);
        auto& b = buffers.emplace_back(s, min_patch_size, max_patch_size, scratch_width, taps[l].data());
        const int64_t f = s / min_patch_size;
        int64_t f_shift = 0;
        while ((int64_t{1} << f_shift) < f) ++f_shift;
        levels.push_back({s, f, f_shift, taps[l].data(), b.first_lo.data(), b.first_hi.data(),
                          b.phase_lo.data(), b.phase_hi.data(), b.cells.data(),
                          b.upsampled.data(), b.sse.data(), b.totals.data(), 0, 0, 0, 0, {-1, -1}});
      }
      // Rows in acc_t when the images are not: 2 for the down-sample, then 1 for the comparison.
      std::vector<acc_t> scratch(std::is_same_v<scalar_t, acc_t> ? 0 : 2 * scratch_width);
      // The pixels of task t's strip, top-left, channel 0.
      auto strip_pixels = [&](int64_t task) {
        const int64_t b = task / (bands * n_strips);
        const int64_t band = (task / n_strips) % bands, first_root = (task % n_strips) * roots_per_strip;
        return src_ptr + (b * channels * height + band * max_patch_size) * width + first_root * max_patch_size;
      };
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / (bands * n_strips);
        const int64_t band = (task / n_strips) % bands, first_root = (task % n_strips) * roots_per_strip;
        const int64_t n_roots = std::min(roots_per_strip, roots_per_band - first_root);
        const Strip strip{channels, height * width, width, n_roots * max_patch_size, max_patch_size, min_patch_size};
        score_strip_fn(strip_pixels(task), task + 1 < end ? strip_pixels(task + 1) : nullptr, strip, levels.data(),
                       n_levels, scratch.data());
        acc_t* out = out_ptr + b * n_scores;
        for (int l = 0; l < n_levels; ++l) {
          const int64_t s = layout.size(l), per_side = max_patch_size / s, strip_cols = n_roots * per_side;
          const acc_t normaliser = static_cast<acc_t>(channels * s * s);
          for (int64_t a = 0; a < per_side; ++a) {
            for (int64_t c = 0; c < strip_cols; ++c) {
              out[layout.cell_index(l, band * per_side + a, first_root * per_side + c)] =
                  levels[l].totals[a * strip_cols + c] / normaliser * static_cast<acc_t>(s);
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
