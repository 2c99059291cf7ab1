// Operator schemas of torch.ops.mixres. The kernels live in cpu/ and cuda/, one file per op and device.
#include <Python.h>
#include <torch/library.h>

#ifdef MIXRES_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

// An importable, empty Python module: loading mixres._C runs the registrations below.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace mixres {

// CUDA_VERSION the CUDA kernels were built with, or 0 when they were not built.
int64_t cuda_version() {
#ifdef MIXRES_WITH_CUDA
  return CUDART_VERSION;
#else
  return 0;
#endif
}

TORCH_LIBRARY(mixres, m) {
  // scores: [B, P] the packed pyramid (see quadtree_layout.h). Returns boxes [B, n_patches, 3] int32 (y, x, size).
  m.def("build_quadtree(Tensor scores, int height, int width, int min_patch_size, int max_patch_size, "
        "int n_patches) -> Tensor");
  // The greedy of build_quadtree, stopped per image: image b stops before the first split that would take it past
  // budgets[b] leaves (max_patches without budgets), or whose leaf scores at or below thresholds[level of the leaf]
  // (levels coarse to fine, one per splittable patch size; no threshold without them). Its leaves are then
  // build_quadtree's for n_patches = lengths[b]. budgets: [B] int32 or int64, reachable budgets <= max_patches;
  // thresholds: [L] finite, the scores' dtype; both on the scores' device. Returns boxes [B, max_patches, 3] int32,
  // the lengths[b] leaves of image b in canonical order then (0, 0, 0) boxes (size 0: no leaf has it), and
  // lengths [B] int32.
  m.def("build_quadtree_adaptive(Tensor scores, int height, int width, int min_patch_size, int max_patch_size, "
        "int max_patches, Tensor? budgets, Tensor? thresholds) -> (Tensor boxes, Tensor lengths)");
  // images: [B, C, H, W], boxes: [B, N, 3] int32. Returns tokens [B, N, C, p, p]; mode is "area" or "bilinear".
  m.def("extract_patches(Tensor images, Tensor boxes, int patch_size, str mode) -> Tensor");
  // grad_tokens: [B, N, C, p, p]. Returns the gradient of the images, [B, C, height, width].
  m.def("extract_patches_backward(Tensor grad_tokens, Tensor boxes, int height, int width, str mode) -> Tensor");
  // boxes: [B, N, 3] int32. Returns centres [B, N, 2] float32 (y, x) in units of the min_patch_size grid.
  m.def("leaf_centers(Tensor boxes, int min_patch_size) -> Tensor");
  // images: [B, C, H, W]. Returns the packed pixel-blur score pyramid [B, P], float32 (float64 for float64 images).
  m.def("pixel_blur_scores(Tensor images, int min_patch_size, int max_patch_size) -> Tensor");
  m.def("cuda_version() -> int", &cuda_version);
}

}  // namespace mixres
