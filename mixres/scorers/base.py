"""What every scorer shares: the patch sizes it scores for and the check of the images."""
from __future__ import annotations

from torch import Tensor

from ..mosaic import _check_images
from ..pyramid import QuadtreeGeometry

__all__ = ["Scorer"]


class Scorer:
    """A callable ``scorer(images [B, C, H, W]) -> pyramid`` for the tokenizer's ``min_patch_size`` and
    ``max_patch_size``, which :func:`mixres.tokenize` reads off the scorer when it is passed one.

    Subclasses implement ``__call__``; it returns one map ``[B, H/s, W/s]`` per splittable patch size
    s = max_patch_size, ..., 2*min_patch_size (coarse to fine), on the images' device.
    """

    def __init__(self, min_patch_size: int = 16, max_patch_size: int = 64):
        # A one-root geometry checks the sizes now rather than at the first call.
        QuadtreeGeometry(max_patch_size, max_patch_size, min_patch_size, max_patch_size)
        self.min_patch_size = min_patch_size
        self.max_patch_size = max_patch_size

    def __repr__(self) -> str:
        return f"{type(self).__name__}(min_patch_size={self.min_patch_size}, max_patch_size={self.max_patch_size})"

    def geometry(self, images: Tensor) -> QuadtreeGeometry:
        """Validates ``images [B, C, H, W]`` as :func:`mixres.tokenize` does and returns their quadtree geometry."""
        _check_images(images)
        return QuadtreeGeometry(images.shape[-2], images.shape[-1], self.min_patch_size, self.max_patch_size)

    def __call__(self, images: Tensor) -> list[Tensor]:
        raise NotImplementedError

