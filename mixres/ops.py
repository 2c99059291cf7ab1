"""The mixres operators: ``torch.ops.mixres.*`` where the C++/CUDA extension has a kernel for the tensors' device,
the pure-PyTorch reference (:mod:`mixres.reference`) elsewhere, with a one-time warning.

This module registers the fake (meta) kernels, which make the ops traceable by ``torch.compile(fullgraph=True)``,
and the autograd formulas:

- ``extract_patches``: differentiable with respect to the images, to any order. Its backward,
  ``extract_patches_backward``, is linear in the token gradient and the adjoint of ``extract_patches``, so its own
  backward is ``extract_patches`` again (double backward, e.g. a gradient penalty, is exact).
- ``pixel_blur_scores``: not differentiable. Where the images require grad, a backward through the scores raises
  ``NotImplementedError``: their gradient exists, and dropping it silently would be wrong.
- ``build_quadtree`` and ``leaf_centers``: the boxes are int32 and the centres come from them, so neither carries a
  gradient; scores that require grad reach the boxes only through discrete choices.
"""
from __future__ import annotations

import warnings

import torch
from torch import Tensor

from . import reference
from .checks import check_tensor
from .pyramid import packed_length

try:
    from . import _C  # noqa: F401  (loading it registers torch.ops.mixres)
except ImportError as error:  # a source checkout that was never built, or a broken build
    _IMPORT_ERROR: ImportError | None = error
else:
    _IMPORT_ERROR = None

__all__ = ["build_quadtree", "extract_patches", "leaf_centers", "pixel_blur_scores", "has_kernel", "cuda_version"]

_OP_NAMES = ("build_quadtree", "extract_patches", "leaf_centers", "pixel_blur_scores")
_warned: set[str] = set()


def cuda_version() -> int:
    """The CUDA version the extension's GPU kernels were built with (e.g. 13000), or 0 without them."""
    return torch.ops.mixres.cuda_version() if _IMPORT_ERROR is None else 0


def _kernel_devices() -> frozenset[str]:
    if _IMPORT_ERROR is not None:
        return frozenset()
    return frozenset(device for device, key in (("cpu", "CPU"), ("cuda", "CUDA")) if all(
        torch._C._dispatch_has_kernel_for_dispatch_key(f"mixres::{name}", key) for name in _OP_NAMES))


# Looked up once: a plain set membership test is free under torch.compile, a dispatcher query is not.
_KERNEL_DEVICES = _kernel_devices()


def has_kernel(device: torch.device | str) -> bool:
    """Whether the compiled extension has kernels for ``device`` (otherwise the reference is used)."""
    return torch.device(device).type in _KERNEL_DEVICES


def _use_kernel(name: str, tensor: Tensor) -> bool:
    """Whether the compiled kernel runs on ``tensor``'s device (else the reference, with a one-time warning)."""
    device = check_tensor(name, tensor).device
    if has_kernel(device):
        return True
    if device.type not in _warned:
        _warned.add(device.type)
        reason = f"the extension failed to import ({_IMPORT_ERROR})" if _IMPORT_ERROR else \
            f"the extension was built without {device.type} kernels"
        warnings.warn(f"mixres: {reason}; using the pure-PyTorch reference on {device.type}, which is much slower. "
                      f"Reinstall with `pip install --no-build-isolation .` to build the kernels.", stacklevel=3)
    return False


def build_quadtree(scores: Tensor, height: int, width: int, min_patch_size: int, max_patch_size: int,
                   n_patches: int) -> Tensor:
    """Greedy quadtree. ``scores [B, P]`` packed pyramid (:func:`mixres.pyramid.pack_scores`) -> boxes
    ``[B, n_patches, 3]`` int32 (y, x, size), in raster order of the corners."""
    impl = torch.ops.mixres.build_quadtree if _use_kernel("scores", scores) else reference.build_quadtree
    return impl(scores, height, width, min_patch_size, max_patch_size, n_patches)


def extract_patches(images: Tensor, boxes: Tensor, patch_size: int, mode: str = "area") -> Tensor:
    """``images [B, C, H, W]``, ``boxes [B, N, 3]`` int32 -> tokens ``[B, N, C, p, p]``; differentiable with respect
    to the images, to any order. Every box must be a square of side >= 1 inside the image (on CUDA a box outside
    trips a device-side assert: checking on the host would need a synchronisation)."""
    impl = torch.ops.mixres.extract_patches if _use_kernel("images", images) else reference.extract_patches
    return impl(images, boxes, patch_size, mode)


def leaf_centers(boxes: Tensor, min_patch_size: int) -> Tensor:
    """``boxes [B, N, 3]`` int32 -> centres ``[B, N, 2]`` float32 (y, x) in units of the s_min grid. Not
    differentiable (the boxes are integers)."""
    impl = torch.ops.mixres.leaf_centers if _use_kernel("boxes", boxes) else reference.leaf_centers
    return impl(boxes, min_patch_size)


def pixel_blur_scores(images: Tensor, min_patch_size: int, max_patch_size: int) -> Tensor:
    """``images [B, C, H, W]`` -> the packed pixel-blur score pyramid ``[B, P]``, float32 (float64 for float64
    images); see :class:`mixres.PixelBlur`. Not differentiable: a backward through the scores of images that require
    grad raises ``NotImplementedError``."""
    impl = torch.ops.mixres.pixel_blur_scores if _use_kernel("images", images) else reference.pixel_blur_scores
    return impl(images, min_patch_size, max_patch_size)


if _IMPORT_ERROR is None:

    @torch.library.register_fake("mixres::build_quadtree")
    def _(scores, height, width, min_patch_size, max_patch_size, n_patches):
        torch._check(scores.dim() == 2, lambda: "scores must be [B, P]")
        return scores.new_empty(scores.shape[0], n_patches, 3, dtype=torch.int32)

    @torch.library.register_fake("mixres::extract_patches")
    def _(images, boxes, patch_size, mode):
        torch._check(images.dim() == 4 and boxes.dim() == 3, lambda: "images [B, C, H, W], boxes [B, N, 3]")
        return images.new_empty(images.shape[0], boxes.shape[1], images.shape[1], patch_size, patch_size)

    @torch.library.register_fake("mixres::extract_patches_backward")
    def _(grad_tokens, boxes, height, width, mode):
        return grad_tokens.new_empty(grad_tokens.shape[0], grad_tokens.shape[2], height, width)

    @torch.library.register_fake("mixres::leaf_centers")
    def _(boxes, min_patch_size):
        return boxes.new_empty(boxes.shape[0], boxes.shape[1], 2, dtype=torch.float32)

    @torch.library.register_fake("mixres::pixel_blur_scores")
    def _(images, min_patch_size, max_patch_size):
        torch._check(images.dim() == 4, lambda: "images must be [B, C, H, W]")
        torch._check(0 < min_patch_size <= max_patch_size, lambda: "need 0 < min_patch_size <= max_patch_size")
        n_scores = packed_length(images.shape[-2], images.shape[-1], min_patch_size, max_patch_size)
        dtype = torch.float64 if images.dtype == torch.float64 else torch.float32
        return images.new_empty(images.shape[0], n_scores, dtype=dtype)

    def _extract_patches_setup_context(ctx, inputs, output):
        images, boxes, _, mode = inputs
        ctx.save_for_backward(boxes)
        ctx.image_size = images.shape[-2:]
        ctx.mode = mode

    def _extract_patches_backward(ctx, grad_tokens):
        (boxes,) = ctx.saved_tensors
        grad_images = torch.ops.mixres.extract_patches_backward(grad_tokens, boxes, ctx.image_size[0],
                                                               ctx.image_size[1], ctx.mode)
        return grad_images, None, None, None

    torch.library.register_autograd("mixres::extract_patches", _extract_patches_backward,
                                    setup_context=_extract_patches_setup_context)

    # extract_patches_backward(g) = A^T g for the linear map A = extract_patches: its gradient with respect to g is
    # A applied to the incoming gradient. Without this, autograd's fallback would give grad_tokens no gradient.
    def _extract_patches_backward_setup_context(ctx, inputs, output):
        grad_tokens, boxes, _, _, mode = inputs
        ctx.save_for_backward(boxes)
        ctx.patch_size = grad_tokens.shape[-1]
        ctx.mode = mode

    def _extract_patches_backward_backward(ctx, grad_grad_images):
        (boxes,) = ctx.saved_tensors
        grad_grad_tokens = torch.ops.mixres.extract_patches(grad_grad_images, boxes, ctx.patch_size, ctx.mode)
        return grad_grad_tokens, None, None, None, None

    torch.library.register_autograd("mixres::extract_patches_backward", _extract_patches_backward_backward,
                                    setup_context=_extract_patches_backward_setup_context)

    def _pixel_blur_scores_backward(ctx, grad_scores):
        raise NotImplementedError(reference.PIXEL_BLUR_NOT_DIFFERENTIABLE)

    torch.library.register_autograd("mixres::pixel_blur_scores", _pixel_blur_scores_backward)
