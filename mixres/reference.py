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

from .pyramid import QuadtreeGeometry

__all__ = ["build_quadtree", "extract_patches", "leaf_centers"]


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


def tokenize(images: Tensor, scores, n_patches: int = 100, min_patch_size: int | None = None,
             max_patch_size: int | None = None, patch_size: int | None = None, mode: str = "area"):
    """:func:`mixres.tokenize` computed with the functions of this module only."""
    import sys

    from .mosaic import _tokenize

    return _tokenize(sys.modules[__name__], images, scores, n_patches, min_patch_size, max_patch_size, patch_size,
                     mode)
