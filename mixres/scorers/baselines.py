"""Baseline scorers that do not look at the image content: random scores, equal scores, and a user's own map."""
from __future__ import annotations

import torch
from torch import Tensor

from ..checks import check_batch, check_device, check_floating, check_int, check_map
from ..pyramid import QuadtreeGeometry, pyramid_maps, saliency_to_pyramid
from .base import Scorer

__all__ = ["Random", "Uniform", "Precomputed"]


class Random(Scorer):
    """Uniform random scores in [0, 1): a content-blind baseline that splits random patches.

    With a ``seed``, a fresh ``torch.Generator`` on the images' device is seeded at every call, so images of one
    shape get the same pyramid on every call on that device type; the global random state is left untouched. The
    CPU and CUDA generators draw different numbers, so the same seed gives different pyramids on the two. Without
    a seed, every call draws fresh scores from the device's global generator (which ``torch.manual_seed`` seeds).

    Args:
        min_patch_size, max_patch_size: the tokenizer's smallest and largest leaf side, in pixels; their ratio is a
            power of two.
        seed: an int in [0, 2**64) for reproducible scores (the range of ``torch.Generator.manual_seed``; a NumPy
            integer is fine), or None for fresh ones at every call.

    Its scores do not depend on the pixel values, so NaN and Inf pixels change nothing here (the tokens of the
    leaves that hold them are NaN, as any resize makes them).

    Example:
        >>> images = torch.rand(2, 3, 256, 256)
        >>> first, again = Random(16, 64, seed=0)(images), Random(16, 64, seed=0)(images)
        >>> all(torch.equal(a, b) for a, b in zip(first, again))   # maps [2, 4, 4] and [2, 8, 8], seeded
        True
        >>> mosaic = mixres.tokenize(images, Random(16, 64, seed=0), n_patches=100)
    """

    def __init__(self, min_patch_size: int = 16, max_patch_size: int = 64, seed: int | None = None):
        super().__init__(min_patch_size, max_patch_size)
        # torch also takes negative seeds, as their value modulo 2**64: -1 would be the same seed as 2**64 - 1.
        self.seed = None if seed is None else check_int("seed", seed, 0, 2 ** 64 - 1,
                                                        valid="an int or None (an int in [0, 2**64))")

    def __repr__(self) -> str:
        return f"{super().__repr__()[:-1]}, seed={self.seed!r})"

    @torch.no_grad()
    def __call__(self, images: Tensor) -> list[Tensor]:
        """Scores ``images [B, C, H, W]`` (H, W multiples of max_patch_size); their values are not read.

        Returns:
            The score pyramid: one float32 map ``[B, H/s, W/s]`` per s = max_patch_size, ..., 2*min_patch_size
            (coarse to fine), on the images' device. Empty if the two sizes are equal.
        """
        geometry = self.geometry(images)
        generator = None
        if self.seed is not None:
            generator = torch.Generator(device=images.device).manual_seed(self.seed)
        return [torch.rand(images.shape[0], *geometry.grid(size), generator=generator, device=images.device)
                for size in geometry.splittable_sizes]


class Uniform(Scorer):
    """Every score equal (ones): the tokenizer's tie-break alone decides which patches are split.

    Ties go to the leaf whose top-left corner comes first in raster order, so below the largest budget the splits
    fill the image from the top, row of roots by row of roots, whatever it shows (NaN pixels included). At the
    largest budget, ``n_patches = (H/min_patch_size) * (W/min_patch_size)``, every patch is split and the mosaic is
    the regular grid of ``min_patch_size`` patches in raster order: a plain ViT's tokens.

    Args:
        min_patch_size, max_patch_size: the tokenizer's smallest and largest leaf side, in pixels; their ratio is a
            power of two.

    Example:
        >>> images = torch.rand(2, 3, 256, 256)
        >>> mosaic = mixres.tokenize(images, Uniform(16, 64), n_patches=256)  # the 16 x 16 grid
        >>> bool((mosaic.boxes[..., 2] == 16).all())
        True
    """

    @torch.no_grad()
    def __call__(self, images: Tensor) -> list[Tensor]:
        """Scores ``images [B, C, H, W]`` (H, W multiples of max_patch_size); their values are not read.

        Returns:
            The score pyramid: one float32 map of ones ``[B, H/s, W/s]`` per s = max_patch_size, ...,
            2*min_patch_size (coarse to fine), on the images' device. Empty if the two sizes are equal.
        """
        geometry = self.geometry(images)
        return [torch.ones(images.shape[0], *geometry.grid(size), device=images.device)
                for size in geometry.splittable_sizes]


class Precomputed(Scorer):
    """A saliency the user computed beforehand (Grad-CAM, human gaze, a detector's boxes...), checked against the
    images it is used with.

    ``saliency`` is either
      - a dense map ``[B, h, w]`` with the images' aspect ratio, turned into a pyramid at each call by
        :func:`mixres.saliency_to_pyramid`: each patch scores the **sum** of the map over its area (so a large patch
        holding much saliency is split before a small one of the same density); or
      - a ready pyramid: a list of maps ``[B, H/s, W/s]`` for s = max_patch_size, ..., 2*min_patch_size (coarse to
        fine), or a dict ``{s: map}``.

    The tensors are kept, not copied. The saliency's values are the scores: NaN or Inf in it are what
    :func:`mixres.tokenize`'s ``nan_policy`` is about; the images' pixel values are not read.

    Args:
        saliency: the dense map or the pyramid, floating point, on the device of the images it will score.
        min_patch_size, max_patch_size: the tokenizer's smallest and largest leaf side, in pixels; their ratio is a
            power of two.

    Example:
        >>> images = torch.rand(2, 3, 256, 256)
        >>> scorer = Precomputed(torch.rand(2, 32, 32), 16, 64)   # e.g. a Grad-CAM map
        >>> [m.shape for m in scorer(images)]                     # patch sizes 64, 32
        [torch.Size([2, 4, 4]), torch.Size([2, 8, 8])]
        >>> mosaic = mixres.tokenize(images, scorer, n_patches=100)
    """

    def __init__(self, saliency, min_patch_size: int = 16, max_patch_size: int = 64):
        super().__init__(min_patch_size, max_patch_size)
        # The sizes the pyramid must have do not depend on the image size: a one-root geometry lists them.
        sizes = QuadtreeGeometry(max_patch_size, max_patch_size, min_patch_size, max_patch_size).splittable_sizes
        if isinstance(saliency, Tensor):
            if saliency.dim() != 3:
                raise ValueError(f"saliency given as a Tensor must be a dense map of rank 3 [B, h, w], got rank "
                                 f"{saliency.dim()} {list(saliency.shape)}; pass a pyramid as a list or dict of maps")
            maps = [saliency]
        else:
            maps = pyramid_maps(saliency, sizes, "saliency")
        for value in maps:
            if not isinstance(value, Tensor):
                raise TypeError(f"saliency maps must be Tensors, got {type(value).__name__}")
            check_floating("saliency", value)
            if value.dim() != 3:
                raise ValueError(f"saliency maps of a pyramid must have rank 3 [B, H/s, W/s], got rank {value.dim()} "
                                 f"{list(value.shape)}")
        self.saliency = saliency if isinstance(saliency, Tensor) else maps

    def __repr__(self) -> str:
        if isinstance(self.saliency, Tensor):
            held = f"dense map {list(self.saliency.shape)}"
        else:
            held = f"pyramid of {len(self.saliency)} maps"
        return f"{super().__repr__()[:-1]}, saliency={held})"

    @torch.no_grad()
    def __call__(self, images: Tensor) -> list[Tensor]:
        """The pyramid of the saliency for ``images [B, C, H, W]`` (H, W multiples of max_patch_size).

        Returns:
            One map ``[B, H/s, W/s]`` per s = max_patch_size, ..., 2*min_patch_size (coarse to fine), on the
            images' device: float32, or float64 when the saliency is float64. Empty if the two sizes are equal.

        Raises:
            ValueError: the saliency's batch size or device differs from the images', or a map has the wrong shape.
        """
        geometry = self.geometry(images)
        batch = images.shape[0]
        maps = [self.saliency] if isinstance(self.saliency, Tensor) else self.saliency
        for value in maps:
            check_batch("saliency", check_device("saliency", value, images.device), batch)
        # float16/bfloat16 saliency is summed and compared in float32: half precision would round the sums.
        maps = [value if value.dtype == torch.float64 else value.float() for value in maps]
        if isinstance(self.saliency, Tensor):
            return saliency_to_pyramid(maps[0], geometry)
        return [check_map(f"saliency map of patch size {size}", value, batch, geometry.grid(size), images.device)
                for size, value in zip(geometry.splittable_sizes, maps)]
