// A leaf's box as every op takes or returns it: a row (y, x, size) of an int32 [B, N, 3] tensor, in pixels.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/macros/Macros.h>

#include <cstdint>

namespace mixres {

struct Box {
  int32_t y, x, size;
};
static_assert(sizeof(Box) == 3 * sizeof(int32_t) && alignof(Box) == alignof(int32_t),
              "a contiguous [B, N, 3] int32 tensor must be an array of Box");

// The boxes of a contiguous [B, N, 3] int32 tensor, leaf after leaf.
inline const Box* box_data(const at::Tensor& boxes) {
  return reinterpret_cast<const Box*>(boxes.const_data_ptr<int32_t>());
}
inline Box* mutable_box_data(const at::Tensor& boxes) {
  return reinterpret_cast<Box*>(boxes.mutable_data_ptr<int32_t>());
}

// Whether the box is a non-empty square inside a height x width image. In int64: y + size of int32 boxes can
// overflow an int32.
C10_HOST_DEVICE C10_ALWAYS_INLINE bool box_inside(const Box& box, int64_t height, int64_t width) {
  return box.size > 0 && box.y >= 0 && box.x >= 0 && static_cast<int64_t>(box.y) + box.size <= height &&
         static_cast<int64_t>(box.x) + box.size <= width;
}

// The padding box of an adaptive mosaic, (0, 0, 0), which follows an image's leaves up to N_max: extract_patches
// gives it a zero token and its token no gradient to the images. Only this box: any other of size 0 is an error, so
// that a corrupted box is still caught.
C10_HOST_DEVICE C10_ALWAYS_INLINE bool is_padding(const Box& box) {
  return box.size == 0 && box.y == 0 && box.x == 0;
}

}  // namespace mixres
