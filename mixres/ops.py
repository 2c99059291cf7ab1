"""The mixres operators: ``torch.ops.mixres.*`` where the C++/CUDA extension has a kernel for the tensors' device,
the pure-PyTorch reference (:mod:`mixres.reference`) elsewhere, with a one-time warning.

This module registers the fake (meta) kernels, which make the ops traceable by ``torch.compile(fullgraph=True)``,
and the autograd formulas:

- ``extract_patches``: differentiable with respect to the images, to any order. Its backward,
  ``extract_patches_backward``, is linear in the token gradient and the adjoint of ``extract_patches``, so its own
  backward is ``extract_patches`` again (double backward, e.g. a gradient penalty, is exact).
- ``pixel_blur_scores``: not differentiable. Where the images require grad, a backward through the scores raises
  ``NotImplementedError``: their gradient exists, and dropping it silently would be wrong.
- ``build_quadtree``, ``build_quadtree_adaptive`` and ``leaf_centers``: the boxes are int32 and the centres come
  from them, so none carries a gradient; scores that require grad reach the boxes only through discrete choices.
"""
from __future__ import annotations

import numbers
import warnings
from collections.abc import Sequence

import torch
from torch import Tensor

from . import reference
from .checks import (check_budget_values, check_budgets, check_tensor, check_threshold_number, check_threshold_values,
                     check_thresholds, is_number)
from .pyramid import QuadtreeGeometry, packed_length

try:
    from . import _C  # noqa: F401  (loading it registers torch.ops.mixres)
except ImportError as error:  # a source checkout that was never built, or a broken build
    _IMPORT_ERROR: ImportError | None = error
else:
    _IMPORT_ERROR = None

__all__ = ["build_quadtree", "build_quadtree_adaptive", "extract_patches", "leaf_centers", "pixel_blur_scores",
           "has_kernel", "cuda_version"]

_OP_NAMES = ("build_quadtree", "build_quadtree_adaptive", "extract_patches", "leaf_centers", "pixel_blur_scores")
_ADAPTIVE_OP = "mixres.build_quadtree_adaptive"
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


def build_quadtree_adaptive(scores: Tensor, height: int, width: int, min_patch_size: int, max_patch_size: int,
                            max_patches: int, budgets: Tensor | Sequence[int] | None = None,
                            thresholds: Tensor | float | Sequence[float] | None = None) -> tuple[Tensor, Tensor]:
    """Greedy quadtree with a budget per image and a stopping rule: the greedy of :func:`build_quadtree`, which image
    b stops before the first split that would take it past ``budgets[b]`` leaves (``max_patches`` without budgets),
    or whose leaf (the best splittable one) scores at or below the threshold of its patch size. So its leaves are
    ``build_quadtree(..., n_patches=lengths[b])``'s for that image (the prefix property), and lie between the roots
    and its budget. No host synchronisation on CUDA when budgets and thresholds are tensors on the scores' device or
    Python numbers; every output shape is static.

    Args:
        scores: the packed pyramid ``[B, P]`` float32 or float64 (:func:`mixres.pyramid.pack_scores`), finite.
        max_patches: N_max, a reachable budget (``n_roots + 3k``, at most one leaf per s_min cell): the width of
            the outputs.
        budgets: ``[B]`` int32 or int64, each reachable and at most ``max_patches`` (a bad one is an error, never
            clamped); or a sequence of ints. On the CPU: on CPU scores the op checks them; for scores on a GPU they
            are checked here, on the host, then copied to the scores' device (``non_blocking=True``: no stream
            synchronisation, though CUDA graphs cannot capture a copy from pageable memory). On the scores' GPU:
            checked on the device, where a bad budget trips a device-side assert (as non-finite scores do), since an
            error would need a host synchronisation.
        thresholds: one per splittable patch size, coarse to fine (s_max, s_max / 2, ..., 2 s_min): a tensor
            ``[L]`` of the scores' dtype, or a sequence of L numbers; or one number (or a 0-dim tensor) for every
            size. Finite (NaN and Inf are errors: on a GPU tensor, a device-side assert); compared with the scores in
            the scores' dtype, so Python numbers are rounded to it (one that overflows it is an error). A tensor on
            the CPU for scores on a GPU is checked and copied as budgets are.

    Returns:
        ``(boxes, lengths)``: boxes ``[B, max_patches, 3]`` int32 (y, x, size), the ``lengths[b]`` leaves of image b
        in raster order of their corners, then padding boxes ``(0, 0, 0)``: size 0, which no leaf has (their centres
        by :func:`leaf_centers` are (-0.5, -0.5), and every leaf's are >= 0); lengths ``[B]`` int32.
    """
    check_tensor("scores", scores, _ADAPTIVE_OP)
    budgets = _budgets_for(scores, budgets, height, width, min_patch_size, max_patch_size, max_patches)
    thresholds = _thresholds_for(scores, thresholds, height, width, min_patch_size, max_patch_size)
    impl = torch.ops.mixres.build_quadtree_adaptive if _use_kernel("scores", scores) else \
        reference.build_quadtree_adaptive
    return impl(scores, height, width, min_patch_size, max_patch_size, max_patches, budgets, thresholds)


def _budgets_for(scores: Tensor, budgets, height, width, min_patch_size, max_patch_size, max_patches):
    """``budgets`` as the op takes them: a tensor on the scores' device. A sequence of ints is checked here and
    becomes an int64 tensor; a tensor on the CPU for scores elsewhere is checked here (free on the host) and copied
    with ``non_blocking=True``."""
    if budgets is None:
        return None
    if not isinstance(budgets, Tensor):
        if isinstance(budgets, str) or not isinstance(budgets, Sequence) or not all(
                isinstance(b, numbers.Integral) and not isinstance(b, bool) for b in budgets):
            raise TypeError(f"{_ADAPTIVE_OP}: budgets must be a Tensor [B] or a sequence of ints, got {budgets!r}")
        geometry = QuadtreeGeometry(height, width, min_patch_size, max_patch_size)
        geometry.check_n_patches(max_patches, name="max_patches")
        # Before the conversion, which would overflow on an int past int64.
        check_budget_values(budgets, geometry.n_roots, max_patches, _ADAPTIVE_OP)
        budgets = torch.tensor(budgets, dtype=torch.int64)
    if budgets.device == scores.device or scores.dim() != 2:  # the op's to check (a bad scores first)
        return budgets
    _check_on_cpu("budgets", budgets, scores)
    geometry = QuadtreeGeometry(height, width, min_patch_size, max_patch_size)
    geometry.check_n_patches(max_patches, name="max_patches")
    check_budgets(budgets, scores.shape[0], _ADAPTIVE_OP)
    check_budget_values(budgets, geometry.n_roots, max_patches, _ADAPTIVE_OP)
    return budgets.to(scores.device, non_blocking=True)


def _check_on_cpu(name: str, value: Tensor, scores: Tensor):
    """Off the scores' device, ``value`` may be on the CPU only (to be checked on the host and copied)."""
    if value.device.type != "cpu":
        raise ValueError(f"{_ADAPTIVE_OP}: {name} is on {value.device} but scores are on {scores.device}: put it "
                         f"on the scores' device or on the CPU")


def _thresholds_for(scores: Tensor, thresholds, height, width, min_patch_size, max_patch_size):
    """``thresholds`` as the op takes them: a tensor ``[L]`` on the scores' device. Numbers are checked and rounded
    to the scores' dtype here; a tensor on the CPU for scores elsewhere is checked here and copied with
    ``non_blocking=True``."""
    if thresholds is None:
        return None
    if isinstance(thresholds, Tensor) and thresholds.dim() > 0 and thresholds.device == scores.device:
        return thresholds  # the op's to check
    sizes = QuadtreeGeometry(height, width, min_patch_size, max_patch_size).splittable_sizes
    if isinstance(thresholds, Tensor):
        if thresholds.dim() == 0:
            thresholds = thresholds.expand(len(sizes))
        if thresholds.device == scores.device:
            return thresholds
        _check_on_cpu("thresholds", thresholds, scores)
        check_thresholds(thresholds, sizes, scores.dtype, _ADAPTIVE_OP)
        check_threshold_values(thresholds, sizes, _ADAPTIVE_OP)
        return thresholds.to(scores.device, non_blocking=True)
    dtype = scores.dtype if scores.dtype in (torch.float32, torch.float64) else torch.float64  # else the op refuses
    if is_number(thresholds):
        return torch.full((len(sizes),), _rounded_threshold(thresholds, dtype), dtype=dtype, device=scores.device)
    if not isinstance(thresholds, Sequence) or isinstance(thresholds, str) or not all(map(is_number, thresholds)):
        raise TypeError(f"{_ADAPTIVE_OP}: thresholds must be a number, a sequence of numbers or a Tensor, got "
                        f"{thresholds!r}")
    if len(thresholds) != len(sizes):
        raise ValueError(f"{_ADAPTIVE_OP}: thresholds must be [{len(sizes)}], one per splittable patch size "
                         f"({', '.join(map(str, sizes))}), got {len(thresholds)} numbers")
    values = [_rounded_threshold(t, dtype, f" for patch size {s} (thresholds[{i}])")
              for i, (t, s) in enumerate(zip(thresholds, sizes))]
    return torch.tensor(values, dtype=dtype).to(scores.device, non_blocking=True)


def _rounded_threshold(value, dtype: torch.dtype, where: str = "") -> float:
    """A finite Python number as the scores' ``dtype`` holds it (rounded to nearest), or a ValueError."""
    return check_threshold_number(value, dtype, _ADAPTIVE_OP, "thresholds", where)


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

    def _check_one_device(op: str, first: tuple[str, Tensor], *others: tuple[str, Tensor | None]) -> None:
        """A meta tensor among real ones sends the call to the fake kernel: without this check, it would return
        uninitialised memory on the real tensors' device."""
        name, tensor = first
        for other_name, other in others:
            if other is not None and other.device != tensor.device:
                raise ValueError(f"mixres.{op}: {other_name} is on {other.device} but {name} are on {tensor.device}: "
                                 f"put both on one device")

    @torch.library.register_fake("mixres::build_quadtree_adaptive")
    def _(scores, height, width, min_patch_size, max_patch_size, max_patches, budgets, thresholds):
        torch._check(scores.dim() == 2, lambda: "scores must be [B, P]")
        _check_one_device("build_quadtree_adaptive", ("scores", scores), ("budgets", budgets),
                          ("thresholds", thresholds))
        return (scores.new_empty(scores.shape[0], max_patches, 3, dtype=torch.int32),
                scores.new_empty(scores.shape[0], dtype=torch.int32))

    @torch.library.register_fake("mixres::extract_patches")
    def _(images, boxes, patch_size, mode):
        torch._check(images.dim() == 4 and boxes.dim() == 3, lambda: "images [B, C, H, W], boxes [B, N, 3]")
        _check_one_device("extract_patches", ("images", images), ("boxes", boxes))
        return images.new_empty(images.shape[0], boxes.shape[1], images.shape[1], patch_size, patch_size)

    @torch.library.register_fake("mixres::extract_patches_backward")
    def _(grad_tokens, boxes, height, width, mode):
        _check_one_device("extract_patches_backward", ("grad_tokens", grad_tokens), ("boxes", boxes))
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
