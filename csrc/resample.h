// How a leaf of side `size` maps onto a token of side `patch`: the same arithmetic as F.interpolate, so that the
// CPU and CUDA kernels and the pure-PyTorch reference agree. Every function works on one axis; leaves are square.
#pragma once

#include <c10/macros/Macros.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>

namespace mixres {

enum class ResizeMode : int { kArea = 0, kBilinear = 1 };

inline ResizeMode parse_mode(c10::string_view mode) {
  if (mode == "area") return ResizeMode::kArea;
  if (mode == "bilinear") return ResizeMode::kBilinear;
  TORCH_CHECK_VALUE(false, "mixres: mode must be 'area' or 'bilinear', got '", std::string(mode), "'");
}

// Area mode is adaptive average pooling: token cell i averages leaf pixels [area_begin, area_end).
C10_HOST_DEVICE inline int32_t area_begin(int32_t i, int32_t size, int32_t patch) {
  return static_cast<int32_t>((static_cast<int64_t>(i) * size) / patch);
}
C10_HOST_DEVICE inline int32_t area_end(int32_t i, int32_t size, int32_t patch) {
  return static_cast<int32_t>((static_cast<int64_t>(i + 1) * size + patch - 1) / patch);
}

// Bilinear mode, align_corners=False and no antialiasing: token cell i blends leaf pixels lo and hi.
template <typename acc_t>
struct BilinearTap {
  int32_t lo, hi;
  acc_t w_lo, w_hi;
};

template <typename acc_t>
C10_HOST_DEVICE inline BilinearTap<acc_t> bilinear_tap(int32_t i, int32_t size, int32_t patch) {
  const acc_t scale = static_cast<acc_t>(size) / static_cast<acc_t>(patch);
  acc_t src = scale * (static_cast<acc_t>(i) + static_cast<acc_t>(0.5)) - static_cast<acc_t>(0.5);
  if (src < 0) src = 0;
  int32_t lo = static_cast<int32_t>(floor(src));
  if (lo > size - 1) lo = size - 1;
  acc_t w_hi = src - static_cast<acc_t>(lo);
  w_hi = w_hi < 0 ? acc_t(0) : (w_hi > 1 ? acc_t(1) : w_hi);
  BilinearTap<acc_t> tap;
  tap.lo = lo;
  tap.hi = lo < size - 1 ? lo + 1 : lo;
  tap.w_lo = static_cast<acc_t>(1) - w_hi;
  tap.w_hi = w_hi;
  return tap;
}

}  // namespace mixres
