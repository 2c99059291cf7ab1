#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>

namespace mixres {

// Centre of a leaf along one axis, in units of the min_patch_size grid, so that the first grid cell sits at 0.
// Each step is exact or a single IEEE rounding, so every device and the reference agree bit for bit.
C10_HOST_DEVICE inline float leaf_center(int32_t corner, int32_t size, float unit) {
  return (static_cast<float>(corner) + static_cast<float>(size) * 0.5f) / unit - 0.5f;
}

}  // namespace mixres
