"""What every scorer shares: the patch sizes it scores for, the check of the images, and what non-finite pixels and
images of the wrong channel count do."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from ..checks import check_images
from ..pyramid import PackedPyramid, QuadtreeGeometry, pack_scores

__all__ = ["Scorer"]


class Scorer:
    """A callable ``scorer(images [B, C, H, W]) -> pyramid`` for the tokenizer's ``min_patch_size`` and
    ``max_patch_size``, which :func:`mixres.tokenize` reads off the scorer when it is passed one.

    Subclasses implement ``__call__``; it returns one map ``[B, H/s, W/s]`` per splittable patch size
    s = max_patch_size, ..., 2*min_patch_size (coarse to fine), on the images' device. :meth:`packed` gives the same
    scores packed, which is what :func:`mixres.tokenize` asks a Scorer for; a scorer that computes the packed
    layout itself overrides it (:class:`PixelBlur`), and ``__call__`` then splits it.

    Non-finite pixels: a scorer that reads pixel values gives NaN to every patch, of every level, that holds a NaN
    or Inf pixel (in any channel), and scores the other patches from the finite pixels; :func:`mixres.tokenize`'s
    ``nan_policy`` then decides what NaN scores do. Checking the pixels and raising in the scorer would need a host
    synchronisation on CUDA.
    """

    def __init__(self, min_patch_size: int = 16, max_patch_size: int = 64):
        # A one-root geometry checks the sizes now rather than at the first call (and makes them Python ints).
        geometry = QuadtreeGeometry(max_patch_size, max_patch_size, min_patch_size, max_patch_size)
        self.min_patch_size = geometry.min_patch_size
        self.max_patch_size = geometry.max_patch_size

    def __repr__(self) -> str:
        return f"{type(self).__name__}(min_patch_size={self.min_patch_size}, max_patch_size={self.max_patch_size})"

    def geometry(self, images: Tensor) -> QuadtreeGeometry:
        """Validates ``images [B, C, H, W]`` as :func:`mixres.tokenize` does and returns their quadtree geometry."""
        check_images(images)
        return QuadtreeGeometry(images.shape[-2], images.shape[-1], self.min_patch_size, self.max_patch_size)

    def __call__(self, images: Tensor) -> list[Tensor]:
        raise NotImplementedError

    def packed(self, images: Tensor) -> PackedPyramid:
        """The pyramid of ``images`` packed ``[B, P]`` with its geometry (float32, or float64 when the maps are):
        ``self(images)``, flattened and concatenated."""
        geometry = self.geometry(images)
        return PackedPyramid(pack_scores(self(images), geometry, images.shape[0], images.device), geometry)


def without_non_finite(images: Tensor) -> Tensor:
    """``images`` with NaN and Inf replaced by 0, for the networks of the scorers: one bad pixel would otherwise
    spread through the network's receptive fields (and, for Grad-CAM, through the logits to the whole image). The
    patches that hold one get NaN scores by :func:`nan_where_pixels_are_not_finite`."""
    return torch.nan_to_num(images, nan=0.0, posinf=0.0, neginf=0.0)


def nan_where_pixels_are_not_finite(pyramid: list[Tensor], images: Tensor,
                                    geometry: QuadtreeGeometry) -> list[Tensor]:
    """The pyramid with NaN in every patch that holds a NaN or Inf pixel of ``images`` (in any channel).

    Elementwise ops and reductions only: no host synchronisation."""
    if not pyramid:
        return pyramid
    batch, channels, height, width = images.shape
    masked = []
    for level, size in zip(reversed(pyramid), reversed(geometry.splittable_sizes)):
        if not masked:  # the finest level, from the pixels
            # 0 * x is 0 for finite x and NaN for NaN and Inf, and a sum of zeros cannot overflow: the cell's sum is
            # NaN exactly when it holds a non-finite value. Several times faster than isfinite(images).all(...).
            zeros = images.mul(0).reshape(batch, channels, height // size, size, width // size, size)
            bad = zeros.sum(dim=(1, 3, 5)).isnan()
        else:  # each coarser cell holds 2 x 2 finer ones
            rows, cols = bad.shape[1:]
            bad = bad.reshape(batch, rows // 2, 2, cols // 2, 2).any(dim=4).any(dim=2)
        masked.append(level.masked_fill(bad, float("nan")))
    return masked[::-1]


def first_conv_channels(network: nn.Module) -> tuple[str, int] | None:
    """(name, in_channels) of the first ``Conv2d`` registered in ``network`` (a CNN's stem, a ViT's patch
    embedding), or None."""
    return next(((name, module.in_channels) for name, module in network.named_modules()
                 if isinstance(module, nn.Conv2d)), None)


@contextmanager
def explaining_channel_mismatch(network: nn.Module, images: Tensor, what: str) -> Iterator[None]:
    """Runs a network on ``images``; if it fails while its first convolution takes another number of channels than
    the images have, the error says so in terms of ``images``. Nothing is checked before the network runs: a
    network whose first registered convolution is not its input layer still works."""
    try:
        yield
    except RuntimeError as error:
        first = first_conv_channels(network)
        if first is None or first[1] == images.shape[1]:
            raise
        name, channels = first
        raise ValueError(f"images have {images.shape[1]} channels, but {what} takes {channels} (its first "
                         f"convolution, {name!r}, has in_channels={channels}): pass images [B, {channels}, H, W]"
                         ) from error
