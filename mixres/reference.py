"""Plain-PyTorch implementation of the mixres ops: the test oracle, the fallback where no kernel is built, and the
baseline of the benchmarks.

Same signatures and results as ``torch.ops.mixres.*``. It is written for clarity over speed, but batched, as a
competent plain-PyTorch version would be: the greedy loop runs once per split for the whole batch, and leaves are
resized with one ``F.interpolate`` per leaf size.

``mixres.reference.tokenize`` is :func:`mixres.tokenize` run on these ops (``backend=mixres.reference``). This
module holds the ops alone and imports nothing of the tokenizer, which itself runs on :mod:`mixres.ops`, which
falls back to this module; so that function is bound where both are imported, in ``mixres/__init__.py``.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .checks import (check_boxes, check_boxes_inside, check_budget_values, check_budgets, check_float_dtype,
                     check_plain_int, check_resize_mode, check_tensor, check_threshold_values, check_thresholds)
from .pyramid import QuadtreeGeometry, pack_pyramid

__all__ = ["build_quadtree", "build_quadtree_adaptive", "extract_patches", "leaf_centers", "pixel_blur_scores"]

# The C++ ops' limit on a token's side and on a pixel-blur patch's (op_checks.h).
MAX_PATCH_SIDE = 1 << 15
PIXEL_BLUR_NOT_DIFFERENTIABLE = (
    "mixres.pixel_blur_scores is not differentiable (the scores only rank the quadtree's splits, which are "
    "discrete): compute them from images.detach() or under torch.no_grad()")


@functools.lru_cache(maxsize=64)
def _cell_table(geometry: QuadtreeGeometry) -> tuple[Tensor, Tensor, int]:
    """Every cell of every level, coarse to fine, in the order of the packed pyramid (the s_min level last).

    Returns ``cells [Q, 4]`` (y, x, size, canonical order key), ``children [P, 4]`` (indices into the cells) and
    the number of root cells.
    """
    cells, first_index = [], []
    for size in geometry.sizes:
        rows, cols = geometry.grid(size)
        ys, xs = torch.meshgrid(torch.arange(rows) * size, torch.arange(cols) * size, indexing="ij")
        first_index.append(sum(len(c) for c in cells))
        ys, xs = ys.reshape(-1), xs.reshape(-1)
        cells.append(torch.stack([ys, xs, torch.full_like(ys, size), ys * geometry.width + xs], dim=1))
    children = []
    for level, size in enumerate(geometry.splittable_sizes):
        y, x = cells[level][:, 0], cells[level][:, 1]
        half = size // 2
        _, child_cols = geometry.grid(half)
        corner = (y // half) * child_cols + x // half
        children.append(first_index[level + 1] + torch.stack(
            [corner, corner + 1, corner + child_cols, corner + child_cols + 1], dim=1))
    children = torch.cat(children) if children else torch.zeros(0, 4, dtype=torch.long)
    return torch.cat(cells), children, geometry.n_roots


def _check_scores(scores, geometry: QuadtreeGeometry, op: str) -> Tensor:
    """The packed pyramid ``[B, P]``, float32 or float64: the C++ ops' checks. Finiteness is
    :func:`_check_finite_scores`'."""
    check_tensor("scores", scores, op)
    if scores.dim() != 2 or scores.shape[1] != geometry.n_scores:
        raise ValueError(f"scores must be the packed pyramid [B, {geometry.n_scores}], got {list(scores.shape)}")
    if scores.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{op}: scores must be float32 or float64, got {scores.dtype}")
    return scores


def _check_finite_scores(scores: Tensor, op: str) -> Tensor:
    if not torch.isfinite(scores).all():
        raise ValueError(f"{op}: scores must be finite, found NaN or Inf")
    return scores


def _greedy(scores: Tensor, geometry: QuadtreeGeometry, n_splits: int, budgets: Tensor | int | None = None,
            thresholds: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
    """``n_splits`` greedy splits of every image at once. With ``budgets`` (per image ``[B]``, or one int for all),
    an image skips the split that would take it past its budget or, given ``thresholds [L]``, whose leaf scores at
    or below its level's threshold; its tree then stays as it is (the next best leaf is the same one), so it has
    stopped for good. Returns ``is_leaf [B, Q]`` over the cells of :func:`_cell_table`, the cells, and the number of
    leaves of each image (None without budgets, where every image has ``n_roots + 3 n_splits``)."""
    batch, n_scores = scores.shape
    cells, children, n_roots = (t.to(scores.device) if isinstance(t, Tensor) else t
                                for t in _cell_table(geometry))
    rows = torch.arange(batch, device=scores.device)
    is_leaf = torch.zeros(batch, len(cells), dtype=torch.bool, device=scores.device)
    is_leaf[:, :n_roots] = True
    adaptive = budgets is not None
    n_leaves = torch.full((batch,), n_roots, device=scores.device) if adaptive else None
    if thresholds is not None:  # each packed cell's threshold: that of its level
        cell_threshold = torch.cat([thresholds[level:level + 1].expand(n_rows * n_cols) for level, (n_rows, n_cols)
                                    in enumerate(map(geometry.grid, geometry.splittable_sizes))] + [thresholds[:0]])
    unset = torch.iinfo(torch.long).max
    for _ in range(n_splits):
        candidates = torch.where(is_leaf[:, :n_scores], scores, float("-inf"))
        best = candidates.amax(dim=1, keepdim=True)
        # Ties go to the leaf that comes first in raster order of its top-left corner.
        pick = torch.where(candidates == best, cells[:n_scores, 3], unset).argmin(dim=1)
        if not adaptive:
            is_leaf[rows, pick] = False
            is_leaf[rows[:, None], children[pick]] = True
            continue
        split = n_leaves + 3 <= budgets
        if thresholds is not None:
            split &= best[:, 0] > cell_threshold[pick]
        is_leaf[rows, pick] &= ~split
        is_leaf[rows[:, None], children[pick]] |= split[:, None]
        n_leaves += 3 * split
    return is_leaf, cells, n_leaves


def build_quadtree(scores: Tensor, height: int, width: int, min_patch_size: int, max_patch_size: int,
                   n_patches: int) -> Tensor:
    """Greedy quadtree from a packed score pyramid ``[B, P]``. Returns boxes ``[B, n_patches, 3]`` int32."""
    geometry = QuadtreeGeometry(height, width, min_patch_size, max_patch_size)
    geometry.check_n_patches(n_patches)
    _check_finite_scores(_check_scores(scores, geometry, "mixres.build_quadtree"), "mixres.build_quadtree")
    batch = scores.shape[0]
    # The output first, as the C++ op allocates it: a size that cannot be allocated fails here, and an empty batch
    # returns before the cell table, which grows with the image (a leaf per min_patch_size cell), not the batch.
    boxes = torch.empty(batch, n_patches, 3, dtype=torch.int32, device=scores.device)
    if batch == 0:
        return boxes
    is_leaf, cells, _ = _greedy(scores, geometry, (n_patches - geometry.n_roots) // 3)
    order = torch.where(is_leaf, cells[:, 3], torch.iinfo(torch.long).max).argsort(dim=1)[:, :n_patches]
    return boxes.copy_(cells[order][..., :3])


def build_quadtree_adaptive(scores: Tensor, height: int, width: int, min_patch_size: int, max_patch_size: int,
                            max_patches: int, budgets: Tensor | None = None,
                            thresholds: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The greedy of :func:`build_quadtree`, stopped per image at ``budgets [B]`` leaves (``max_patches`` without)
    or before splitting a leaf that scores at or below ``thresholds [L]`` at its level. Returns boxes
    ``[B, max_patches, 3]`` int32 (the leaves in canonical order, then ``(0, 0, 0)``) and lengths ``[B]`` int32."""
    op = "mixres.build_quadtree_adaptive"
    geometry = QuadtreeGeometry(height, width, min_patch_size, max_patch_size)
    geometry.check_n_patches(max_patches, name="max_patches")
    if max_patches > torch.iinfo(torch.int32).max:
        raise ValueError(f"{op}: max_patches must be at most {torch.iinfo(torch.int32).max} (lengths are int32), "
                         f"got {max_patches}")
    _check_scores(scores, geometry, op)
    batch = scores.shape[0]
    sizes = geometry.splittable_sizes
    # In the C++ op's order: shapes, dtypes and devices, then values.
    if budgets is not None:
        check_budgets(budgets, batch, op, scores.device)
    if thresholds is not None:
        check_thresholds(thresholds, sizes, scores.dtype, op, scores.device)
    if budgets is not None:
        check_budget_values(budgets, geometry.n_roots, max_patches, op)
    if thresholds is not None:
        check_threshold_values(thresholds, sizes, op)
    _check_finite_scores(scores, op)
    boxes = torch.empty(batch, max_patches, 3, dtype=torch.int32, device=scores.device)
    lengths = torch.empty(batch, dtype=torch.int32, device=scores.device)
    if batch == 0:
        return boxes, lengths
    is_leaf, cells, n_leaves = _greedy(scores, geometry, (max_patches - geometry.n_roots) // 3,
                                       max_patches if budgets is None else budgets.long(), thresholds)
    order = torch.where(is_leaf, cells[:, 3], torch.iinfo(torch.long).max).argsort(dim=1)[:, :max_patches]
    valid = torch.arange(max_patches, device=scores.device) < n_leaves[:, None]
    boxes.copy_(torch.where(valid[..., None], cells[order][..., :3], 0))
    return boxes, lengths.copy_(n_leaves)


def extract_patches(images: Tensor, boxes: Tensor, patch_size: int, mode: str) -> Tensor:
    """Resizes each leaf ``boxes[b, n] = (y, x, size)`` of ``images [B, C, H, W]`` to ``patch_size``.

    Returns tokens ``[B, N, C, p, p]``: ``F.interpolate(mode="area")``, or ``mode="bilinear"`` with
    ``align_corners=False``; a zero token for the padding box (0, 0, 0), with no gradient to the images.
    Differentiable with respect to the images (to any order). The arguments are checked as the C++ op checks them,
    every box inside the image or padding, before anything is allocated.
    """
    op = "mixres.extract_patches"
    check_resize_mode(mode)
    check_tensor("images", images, op)
    if images.dim() != 4:
        raise ValueError(f"{op}: images must be [B, C, H, W], got {list(images.shape)}")
    check_float_dtype("images", images, op)
    check_boxes(boxes, images.shape[0], op)
    check_plain_int("patch_size", patch_size, op, high=MAX_PATCH_SIDE)
    if boxes.device != images.device:
        raise ValueError(f"{op}: images and boxes must be on the same device, got images on {images.device} and "
                         f"boxes on {boxes.device}")
    batch, n_leaves, _ = boxes.shape
    channels, height, width = images.shape[1:]
    token_shape = [batch, n_leaves, channels, patch_size, patch_size]
    if math.prod(max(size, 1) for size in token_shape) * images.element_size() >= 2**63:
        raise ValueError(f"{op}: the tokens [B, N, C, p, p] = {token_shape} would take more than 2^63 bytes")
    check_boxes_inside(boxes, height, width, op)
    boxes = boxes.long()
    tokens = images.new_zeros(batch, n_leaves, channels, patch_size, patch_size)
    if tokens.numel() == 0:
        return tokens
    # The leaves of a mosaic are disjoint, so the crops of one size hold at most the images' pixels, in one piece.
    # Other boxes may overlap: crop at most that many pixels at a time, so memory stays proportional to the images
    # and the tokens however many leaves share pixels.
    crop_budget = max(images.numel(), 1 << 20)
    channel = torch.arange(channels, device=images.device)[None, :, None, None]
    where_b, where_n, resized = [], [], []
    for size in boxes[..., 2].unique().tolist():
        if size == 0:  # the padding boxes (the check let no other of size 0 through): their tokens stay zero
            continue
        b, n = (boxes[..., 2] == size).nonzero(as_tuple=True)
        offsets = torch.arange(size, device=images.device)
        per_chunk = max(1, crop_budget // (channels * size * size))
        for start in range(0, len(b), per_chunk):
            cb, cn = b[start:start + per_chunk], n[start:start + per_chunk]
            ys = (boxes[cb, cn, 0][:, None] + offsets)[:, None, :, None]
            xs = (boxes[cb, cn, 1][:, None] + offsets)[:, None, None, :]
            crops = images[cb[:, None, None, None], channel, ys, xs]  # [M, C, size, size]
            resized.append(F.interpolate(crops, size=(patch_size, patch_size), mode=mode,
                                         align_corners=False if mode == "bilinear" else None))
            where_b.append(cb)
            where_n.append(cn)
    if not resized:  # every box is padding
        return tokens
    return tokens.index_put((torch.cat(where_b), torch.cat(where_n)), torch.cat(resized))


def leaf_centers(boxes: Tensor, min_patch_size: int) -> Tensor:
    """Leaf centres ``[B, N, 2]`` float32, (y, x) in units of the s_min grid: ``(corner + size/2) / s_min - 0.5``."""
    check_boxes(boxes, None, "mixres.leaf_centers")
    check_plain_int("min_patch_size", min_patch_size, "mixres.leaf_centers")
    corner = boxes[..., :2].float()
    size = boxes[..., 2:].float()
    return (corner + size * 0.5) / float(min_patch_size) - 0.5


def _as_patches(images: Tensor, size: int) -> Tensor:
    """``[B, C, H, W]`` -> ``[B * H/s * W/s, C, s, s]``, the s x s patches of the grid in raster order.

    The result is channels-last in memory: CPU bilinear upsampling runs about 2x faster on it.
    """
    batch, channels, height, width = images.shape
    rows, cols = height // size, width // size
    return (images.reshape(batch, channels, rows, size, cols, size)
            .permute(0, 2, 4, 3, 5, 1)
            .reshape(batch * rows * cols, size, size, channels)
            .permute(0, 3, 1, 2))


def pixel_blur_scores(images: Tensor, min_patch_size: int, max_patch_size: int) -> Tensor:
    """The pixel-blur score pyramid of ``images [B, C, H, W]``, packed ``[B, P]`` (see :class:`mixres.PixelBlur`).

    For each s x s patch p of each splittable size s: ``MSE(p, up(down(p))) * s``, with an area downsample to
    ``min_patch_size`` and a bilinear upsample back (``align_corners=False``), each patch on its own. float32, or
    float64 for float64 images. Not differentiable: where the images require grad, a backward through the scores
    raises ``NotImplementedError`` (as the C++ op's does) rather than dropping their gradient silently.
    """
    op = "mixres.pixel_blur_scores"
    check_tensor("images", images, op)
    if images.dim() != 4:
        raise ValueError(f"images must be [B, C, H, W], got {list(images.shape)}")
    check_float_dtype("images", images)
    if images.shape[1] == 0:
        raise ValueError(f"images must have at least one channel, got {list(images.shape)}")
    if isinstance(max_patch_size, int) and max_patch_size > MAX_PATCH_SIDE:
        raise ValueError(f"{op}: max_patch_size must be at most {MAX_PATCH_SIDE}, got {max_patch_size}")
    geometry = QuadtreeGeometry(images.shape[2], images.shape[3], min_patch_size, max_patch_size)
    return _PixelBlurScores.apply(images, geometry)


class _PixelBlurScores(torch.autograd.Function):
    """The scores, computed without autograd; a backward through them raises instead of returning nothing."""

    @staticmethod
    def forward(ctx, images: Tensor, geometry: QuadtreeGeometry) -> Tensor:
        return _pixel_blur_scores(images, geometry)

    @staticmethod
    def backward(ctx, grad_scores: Tensor):
        raise NotImplementedError(PIXEL_BLUR_NOT_DIFFERENTIABLE)


@torch.no_grad()
def _pixel_blur_scores(images: Tensor, geometry: QuadtreeGeometry) -> Tensor:
    batch = images.shape[0]
    min_patch_size = geometry.min_patch_size
    if images.dtype in (torch.float16, torch.bfloat16):
        # Squared errors of near-equal values underflow and round badly in half precision.
        images = images.float()
    if batch == 0 or geometry.n_scores == 0:  # pack_pyramid would make an empty pyramid float32
        return images.new_zeros(batch, geometry.n_scores)
    maps = []
    for size in geometry.splittable_sizes:
        patches = _as_patches(images, size)
        small = F.interpolate(patches, size=(min_patch_size,) * 2, mode="area")
        blurred = F.interpolate(small, size=(size, size), mode="bilinear", align_corners=False)
        mse = blurred.sub_(patches).square_().mean(dim=(1, 2, 3))  # in place: these are image-sized
        maps.append(mse.reshape(batch, *geometry.grid(size)) * size)
    return pack_pyramid(maps, geometry, batch, images.device)
