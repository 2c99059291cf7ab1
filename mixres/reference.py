"""Plain-PyTorch implementation of the mixres ops: the test oracle, the fallback where no kernel is built, and the
baseline of the benchmarks.

Same signatures and results as ``torch.ops.mixres.*``. It is written for clarity over speed, but batched, as a
competent plain-PyTorch version would be: the greedy loop runs once per split for the whole batch, and leaves are
resized with one ``F.interpolate`` per leaf size.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from .pyramid import QuadtreeGeometry, pack_pyramid

__all__ = ["build_quadtree", "extract_patches", "leaf_centers", "pixel_blur_scores"]


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


def build_quadtree(scores: Tensor, height: int, width: int, min_patch_size: int, max_patch_size: int,
                   n_patches: int) -> Tensor:
    """Greedy quadtree from a packed score pyramid ``[B, P]``. Returns boxes ``[B, n_patches, 3]`` int32."""
    geometry = QuadtreeGeometry(height, width, min_patch_size, max_patch_size)
    geometry.check_n_patches(n_patches)
    if scores.dim() != 2 or scores.shape[1] != geometry.n_scores:
        raise ValueError(f"scores must be the packed pyramid [B, {geometry.n_scores}], got {list(scores.shape)}")
    if not torch.isfinite(scores).all():
        raise ValueError("mixres.build_quadtree: scores must be finite, found NaN or Inf")
    cells, children, n_roots = (t.to(scores.device) if isinstance(t, Tensor) else t
                                for t in _cell_table(geometry))
    batch, n_scores = scores.shape
    rows = torch.arange(batch, device=scores.device)
    is_leaf = torch.zeros(batch, len(cells), dtype=torch.bool, device=scores.device)
    is_leaf[:, :n_roots] = True
    unset = torch.iinfo(torch.long).max
    for _ in range((n_patches - n_roots) // 3):
        candidates = torch.where(is_leaf[:, :n_scores], scores, float("-inf"))
        best = candidates.amax(dim=1, keepdim=True)
        # Ties go to the leaf that comes first in raster order of its top-left corner.
        pick = torch.where(candidates == best, cells[:n_scores, 3], unset).argmin(dim=1)
        is_leaf[rows, pick] = False
        is_leaf[rows[:, None], children[pick]] = True
    order = torch.where(is_leaf, cells[:, 3], unset).argsort(dim=1)[:, :n_patches]
    return cells[order][..., :3].to(torch.int32)


def extract_patches(images: Tensor, boxes: Tensor, patch_size: int, mode: str) -> Tensor:
    """Resizes each leaf ``boxes[b, n] = (y, x, size)`` of ``images [B, C, H, W]`` to ``patch_size``.

    Returns tokens ``[B, N, C, p, p]``: ``F.interpolate(mode="area")``, or ``mode="bilinear"`` with
    ``align_corners=False``. Differentiable with respect to the images.
    """
    if mode not in ("area", "bilinear"):
        raise ValueError(f"mode must be 'area' or 'bilinear', got {mode!r}")
    batch, n_leaves, _ = boxes.shape
    channels = images.shape[1]
    boxes = boxes.long()
    tokens = images.new_zeros(batch, n_leaves, channels, patch_size, patch_size)
    for size in boxes[..., 2].unique().tolist():
        b, n = (boxes[..., 2] == size).nonzero(as_tuple=True)
        offsets = torch.arange(size, device=images.device)
        ys = (boxes[b, n, 0][:, None] + offsets)[:, None, :, None]
        xs = (boxes[b, n, 1][:, None] + offsets)[:, None, None, :]
        channel = torch.arange(channels, device=images.device)[None, :, None, None]
        crops = images[b[:, None, None, None], channel, ys, xs]  # [M, C, size, size]
        resized = F.interpolate(crops, size=(patch_size, patch_size), mode=mode,
                                align_corners=False if mode == "bilinear" else None)
        tokens = tokens.index_put((b, n), resized)
    return tokens


def leaf_centers(boxes: Tensor, min_patch_size: int) -> Tensor:
    """Leaf centres ``[B, N, 2]`` float32, (y, x) in units of the s_min grid: ``(corner + size/2) / s_min - 0.5``."""
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


@torch.no_grad()
def pixel_blur_scores(images: Tensor, min_patch_size: int, max_patch_size: int) -> Tensor:
    """The pixel-blur score pyramid of ``images [B, C, H, W]``, packed ``[B, P]`` (see :class:`mixres.PixelBlur`).

    For each s x s patch p of each splittable size s: ``MSE(p, up(down(p))) * s``, with an area downsample to
    ``min_patch_size`` and a bilinear upsample back (``align_corners=False``), each patch on its own. float32, or
    float64 for float64 images. Not differentiable.
    """
    if images.dim() != 4:
        raise ValueError(f"images must be [B, C, H, W], got {list(images.shape)}")
    if images.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise TypeError(f"images must be float16, bfloat16, float32 or float64, got {images.dtype}")
    if images.shape[1] == 0:
        raise ValueError(f"images must have at least one channel, got {list(images.shape)}")
    batch, _, height, width = images.shape
    geometry = QuadtreeGeometry(height, width, min_patch_size, max_patch_size)
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


def tokenize(images: Tensor, scores, n_patches: int = 100, min_patch_size: int | None = None,
             max_patch_size: int | None = None, patch_size: int | None = None, mode: str = "area"):
    """:func:`mixres.tokenize` computed with the functions of this module only."""
    import sys

    from .mosaic import _tokenize

    return _tokenize(sys.modules[__name__], images, scores, n_patches, min_patch_size, max_patch_size, patch_size,
                     mode)
