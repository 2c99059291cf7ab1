"""Fitting any image and budget to a quadtree, for ``mixres mosaic`` and the demo: each side resized to a multiple
of the largest patch, and the reachable ``n_patches`` nearest to the one wanted."""
from __future__ import annotations

import math
from fractions import Fraction

import torch.nn.functional as F
from torch import Tensor

from ..pyramid import QuadtreeGeometry

__all__ = ["fitted_size", "fit_to_multiple", "nearest_valid_n_patches"]


def fitted_size(height: int, width: int, multiple: int, short_side: int | None = None) -> tuple[int, int]:
    """The size that :func:`fit_to_multiple` gives an ``height x width`` image."""
    scale = 1 if short_side is None else short_side / min(height, width)
    return tuple(max(multiple, math.floor(side * scale / multiple + 0.5) * multiple) for side in (height, width))


def fit_to_multiple(image: Tensor, multiple: int, short_side: int | None = None) -> Tensor:
    """``[C, H, W]`` in [0, 1] -> resized so that both sides are multiples of ``multiple``: each side becomes the
    nearest multiple (halves round up, at least ``multiple``) of its length, or, given ``short_side``, of its
    length once the image is scaled to that short side (a multiple of ``multiple``, so kept exactly). Bilinear with
    antialiasing; an image that already fits is returned as it is."""
    size = fitted_size(*image.shape[-2:], multiple, short_side)
    if size == tuple(image.shape[-2:]):
        return image
    resized = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False, antialias=True)
    return resized[0].clamp_(0, 1)  # in place: the resized image is new, and may be large


def nearest_valid_n_patches(geometry: QuadtreeGeometry, n_patches: float) -> int:
    """The reachable budget closest to ``n_patches`` (the smaller one on a tie). Computed, not searched: the
    budgets are ``n_roots + 3k`` up to ``max_patches``, millions of them for a large image and small leaves."""
    lowest, highest = geometry.n_roots, geometry.max_patches
    target = Fraction(n_patches)  # exact, for an int or a float
    if target <= lowest:
        return lowest
    if target >= highest:
        return highest
    below = lowest + (math.floor(target) - lowest) // 3 * 3
    above = below + 3  # at most highest: highest - lowest is a multiple of 3
    return below if target - below <= above - target else above
