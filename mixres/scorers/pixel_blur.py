"""The pixel-blur scorer of the Quadformer paper: no network, only the image's own detail."""
from __future__ import annotations

import torch
from torch import Tensor

from .. import ops
from ..pyramid import PackedPyramid
from .base import Scorer

__all__ = ["PixelBlur"]


class PixelBlur(Scorer):
    """The paper's pixel-blur scorer: how much detail a patch loses when stored at ``min_patch_size``.

    For a patch p of side s, ``blur(p) = upsample(downsample(p))``: an area downsample to
    ``min_patch_size x min_patch_size``, then a bilinear upsample back to s x s (``align_corners=False``), each
    patch on its own so that nothing bleeds across patch borders. The score is ``MSE(p, blur(p)) * s`` (mean over
    channels and pixels): weighting by the side length splits a large patch before a small one with the same mean
    error. It measures high-frequency content; flat regions score 0.

    All levels come from one fused op, ``torch.ops.mixres.pixel_blur_scores`` (:func:`mixres.ops.pixel_blur_scores`,
    which falls back to :func:`mixres.reference.pixel_blur_scores` where the extension has no kernel for the
    images' device); it accumulates in float32 (float64 for float64 images). A patch that holds a NaN or Inf pixel
    scores NaN, at every level (its error is NaN; see :class:`Scorer`); pixel values near the dtype's largest can
    overflow the squared error to Inf, which :func:`mixres.tokenize` reports.

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

    @torch.no_grad()
    def __call__(self, images: Tensor) -> list[Tensor]:
        """Scores ``images [B, C, H, W]`` (H, W multiples of max_patch_size).

        Returns:
            The score pyramid: one map ``[B, H/s, W/s]`` per s = max_patch_size, ..., 2*min_patch_size (coarse to
            fine), float32 (float64 for float64 images), on the images' device. Empty if the two sizes are equal.
            The maps are views of one packed ``[B, P]`` tensor, :meth:`packed`'s.
        """
        return self.packed(images).maps()

    @torch.no_grad()
    def packed(self, images: Tensor) -> PackedPyramid:
        """The same scores as they come out of the fused op, packed ``[B, P]`` (the layout of
        :func:`mixres.pack_pyramid`), with their geometry; :func:`mixres.tokenize` takes them without a copy."""
        geometry = self.geometry(images)
        return PackedPyramid(ops.pixel_blur_scores(images, self.min_patch_size, self.max_patch_size), geometry)
