"""The uniform-grid baseline of a Quadformer: the plain ViT on the whole image resized to a coarser patch grid.

At a budget of N tokens, the fair comparison for a Quadformer is the same ViT, with the same weights, on a regular
grid of about N patches: the image resized (antialiased) to g x g patches, g = round(sqrt(N)), and the position
table resampled to that grid. This is what timm's ViT computes at another input size (``dynamic_img_size=True``).
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import check_int
from ..mosaic import Mosaic, tokenize
from ..scorers import Uniform
from .quadformer import Quadformer, check_vit

__all__ = ["UniformGrid", "grid_for_budget"]


def grid_for_budget(n_patches: int, image_size: tuple[int, int]) -> tuple[int, int]:
    """The patch grid (rows, cols) with the aspect ratio of ``image_size`` (H, W) whose token count is closest to
    ``n_patches`` (the smaller count on a tie): g x g with g = round(sqrt(n_patches)) for a square image.

    Example: ``grid_for_budget(145, (224, 224))`` gives ``(12, 12)``; ``grid_for_budget(100, (256, 384))`` gives
    ``(8, 12)``.
    """
    n_patches = check_int("n_patches", n_patches, low=1)
    aspect = image_size[1] / image_size[0]

    def grid(rows: int) -> tuple[int, int]:
        return rows, max(1, round(rows * aspect))

    # rows * cols grows strictly with the rows: bisect for the first grid of at least n_patches tokens (in
    # O(log n) steps, so that a huge budget does not hang), then take it or the one below, whichever is closer.
    low, high = 1, n_patches  # grid(n_patches) has at least n_patches tokens
    while low < high:
        middle = (low + high) // 2
        if math.prod(grid(middle)) >= n_patches:
            high = middle
        else:
            low = middle + 1
    above = grid(low)
    if low == 1:
        return above
    below = grid(low - 1)
    return below if n_patches - math.prod(below) <= math.prod(above) - n_patches else above


class UniformGrid(nn.Module):
    """The uniform-grid baseline: the ViT of a Quadformer on a regular grid of ``rows x cols`` tokens.

    The images are resized (bilinear, antialiased) to ``rows * s x cols * s`` pixels, s the Quadformer's
    ``min_patch_size``, and cut into s x s leaves, each one token (resized to the ViT's patch size p when s != p).
    The Quadformer then embeds and classifies them as it does any mosaic, so both share one ``vit`` module and its
    weights. Positions, by the Quadformer's ``pos_embed``:

    - ``"resample"``: the ViT's table resampled (bicubically, as timm does) to the rows x cols grid. With s = p this
      is exactly timm's ViT run on the resized images with ``dynamic_img_size=True``;
    - ``"xy"``, ``"xy-learned"``: the centre of the region each token covers in the input image, as the Quadformer
      would place a leaf of that region.

    Args:
        model: a :class:`Quadformer`, or a timm ``VisionTransformer`` (wrapped in a Quadformer with the ``resample``
            table and leaves of its own patch size; the ViT itself is not changed or copied).
        grid: the default grid, ``g`` or ``(rows, cols)``; None: the images' full grid of s x s patches (no resize).
        antialias: antialias the downsampling (the resize of PIL and torchvision's transforms).

    Inputs: images ``[B, C, H, W]`` with the ViT's C input channels, normalised as for the ViT, any H and W, any
    float dtype (float16 and bfloat16 images are resized in float32, which CPUs need for antialiasing, and the
    result rounded back). ``forward(images, grid=...)`` overrides the grid per call; :func:`grid_for_budget` gives
    the grid for a token budget.
    """

    def __init__(self, model: Quadformer | nn.Module, grid: int | tuple[int, int] | None = None,
                 antialias: bool = True):
        super().__init__()
        if not isinstance(model, Quadformer):
            patch_size, _, (height, width) = check_vit(model)
            model = Quadformer(model, n_patches=(height // patch_size) * (width // patch_size),
                               scorer=Uniform(patch_size, patch_size), min_patch_size=patch_size,
                               max_patch_size=patch_size, pos_embed="resample")
        self.quadformer = model
        self.grid = None if grid is None else _as_grid(grid)
        self.antialias = antialias

    @property
    def vit(self) -> nn.Module:
        return self.quadformer.vit

    @property
    def num_classes(self) -> int:
        return self.quadformer.num_classes

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {f"quadformer.{name}" for name in self.quadformer.no_weight_decay()}

    def extra_repr(self) -> str:
        return f"grid={self.grid}, antialias={self.antialias}"

    def tokenize(self, images: Tensor, grid: int | tuple[int, int] | None = None) -> Mosaic:
        """``images [B, C, H, W]`` -> the mosaic of the grid's ``rows * cols`` equal leaves (see the class).

        Its boxes are in the resized image. With the ``xy`` embeddings, its centres and ``image_size`` are the input
        image's instead (where the Quadformer reads positions), so ``mosaic.to_grid`` does not apply to it then."""
        model = self.quadformer
        model.check_images(images)
        side = model.min_patch_size
        grid = _as_grid(grid) if grid is not None else self.grid
        if grid is None:
            grid = (images.shape[-2] // side, images.shape[-1] // side)
        size = (grid[0] * side, grid[1] * side)
        resized = images
        if tuple(images.shape[-2:]) != size:
            # Antialiased resizing has no float16/bfloat16 CPU kernel: in float32 on every device, so that they agree.
            wide = images.float() if images.dtype in (torch.float16, torch.bfloat16) else images
            resized = F.interpolate(wide, size=size, mode="bilinear", align_corners=False,
                                    antialias=self.antialias).to(images.dtype)
        # One leaf size, so there is nothing to score: the root grid is the mosaic.
        mosaic = tokenize(resized, [], grid[0] * grid[1], side, side, model.patch_size, model.resize_mode)
        if model.pos_embed.reads_centers and resized is not images:
            # Centres in the s grid of the input image (not of the resized one), with its size, so that the xy
            # embeddings see each token where its region lies in the image.
            scale = torch.tensor([images.shape[-2] / size[0], images.shape[-1] / size[1]],
                                 device=mosaic.centers.device)
            mosaic = dataclasses.replace(mosaic, centers=(mosaic.centers + 0.5) * scale - 0.5,
                                         image_size=tuple(images.shape[-2:]))
        return mosaic

    def forward(self, images: Tensor, grid: int | tuple[int, int] | None = None) -> Tensor:
        """Images ``[B, C, H, W]`` -> logits ``[B, num_classes]`` on a ``grid`` of tokens (default: ``self.grid``)."""
        return self.quadformer(self.tokenize(images, grid))


def _as_grid(grid: int | tuple[int, int]) -> tuple[int, int]:
    pair = tuple(grid) if isinstance(grid, (tuple, list)) else (grid, grid)
    if len(pair) != 2:
        raise ValueError(f"grid must be a positive int or (rows, cols), got {grid!r}")
    rows, cols = (check_int("grid", side, low=1, valid="a positive int or (rows, cols) of positive ints")
                  for side in pair)
    return rows, cols
