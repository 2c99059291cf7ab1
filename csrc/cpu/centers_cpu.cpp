// Leaf centres on the CPU: (corner + size / 2) / min_patch_size - 0.5, per axis.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "../box.h"
#include "../leaf_center.h"
#include "../op_checks.h"

namespace mixres {
namespace {

at::Tensor leaf_centers_cpu(const at::Tensor& boxes, int64_t min_patch_size) {
  check_centers_args(boxes, min_patch_size);
  auto centers = at::empty({boxes.size(0), boxes.size(1), 2}, boxes.options().dtype(at::kFloat));
  const auto src = boxes.contiguous();
  const Box* box = box_data(src);
  float* out = centers.mutable_data_ptr<float>();
  const float unit = static_cast<float>(min_patch_size);
  at::parallel_for(0, boxes.size(0) * boxes.size(1), 4096, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      out[2 * i] = leaf_center(box[i].y, box[i].size, unit);
      out[2 * i + 1] = leaf_center(box[i].x, box[i].size, unit);
    }
  });
  return centers;
}

}  // namespace

TORCH_LIBRARY_IMPL(mixres, CPU, m) { m.impl("leaf_centers", &leaf_centers_cpu); }

}  // namespace mixres
