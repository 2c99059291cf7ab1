"""Patch scorers: a scorer maps images ``[B, C, H, W]`` to a score pyramid.

The pyramid is what :func:`mixres.tokenize` takes: a list of maps ordered coarse to fine, one per splittable patch
size s = max_patch_size, max_patch_size/2, ..., 2*min_patch_size, the map of size s being ``[B, H/s, W/s]``; a
higher score splits that s x s patch first. Scorers run without gradients, on the images' device.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .mosaic import _check_images
from .pyramid import QuadtreeGeometry

__all__ = ["PixelBlur"]


def _geometry(images: Tensor, min_patch_size: int, max_patch_size: int) -> QuadtreeGeometry:
    """Validates ``images [B, C, H, W]`` as :func:`mixres.tokenize` does and returns their quadtree geometry."""
    _check_images(images)
    return QuadtreeGeometry(images.shape[-2], images.shape[-1], min_patch_size, max_patch_size)


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


class PixelBlur:
    """The paper's pixel-blur scorer: how much detail a patch loses when stored at ``min_patch_size``.

    For a patch p of side s, ``blur(p) = upsample(downsample(p))``: an area downsample to
    ``min_patch_size x min_patch_size``, then a bilinear upsample back to s x s (``align_corners=False``), each
    patch on its own so that nothing bleeds across patch borders. The score is ``MSE(p, blur(p)) * s`` (mean over
    channels and pixels): weighting by the side length splits a large patch before a small one with the same mean
    error. It measures high-frequency content; flat regions score 0.

    Args:
        min_patch_size, max_patch_size: the tokenizer's smallest and largest leaf side, in pixels; their ratio is a
            power of two.

    Example:
        >>> scorer = PixelBlur(16, 64)
        >>> images = torch.rand(2, 3, 256, 256)
        >>> [m.shape for m in scorer(images)]      # patch sizes 64, 32
        [torch.Size([2, 4, 4]), torch.Size([2, 8, 8])]
        >>> mosaic = mixres.tokenize(images, scorer(images), n_patches=100)
    """

    def __init__(self, min_patch_size: int = 16, max_patch_size: int = 64):
        # A one-root geometry checks the sizes now rather than at the first call.
        QuadtreeGeometry(max_patch_size, max_patch_size, min_patch_size, max_patch_size)
        self.min_patch_size = min_patch_size
        self.max_patch_size = max_patch_size

    def __repr__(self) -> str:
        return f"PixelBlur(min_patch_size={self.min_patch_size}, max_patch_size={self.max_patch_size})"

    @torch.no_grad()
    def __call__(self, images: Tensor) -> list[Tensor]:
        """Scores ``images [B, C, H, W]`` (H, W multiples of max_patch_size).

        Returns:
            The score pyramid: one map ``[B, H/s, W/s]`` per s = max_patch_size, ..., 2*min_patch_size (coarse to
            fine), float32 (float64 for float64 images), on the images' device. Empty if the two sizes are equal.
        """
        geometry = _geometry(images, self.min_patch_size, self.max_patch_size)
        if images.dtype in (torch.float16, torch.bfloat16):
            # Squared errors of near-equal values underflow and round badly in half precision.
            images = images.float()
        pyramid = []
        for size in geometry.splittable_sizes:
            patches = _as_patches(images, size)
            small = F.interpolate(patches, size=(self.min_patch_size,) * 2, mode="area")
            blurred = F.interpolate(small, size=(size, size), mode="bilinear", align_corners=False)
            mse = blurred.sub_(patches).square_().mean(dim=(1, 2, 3))  # in place: these are image-sized
            pyramid.append(mse.reshape(images.shape[0], *geometry.grid(size)) * size)
        return pyramid
