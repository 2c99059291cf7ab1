"""The uniform-grid baseline of a Quadformer: the plain ViT on the whole image resized to a coarser patch grid.

At a budget of N tokens, the fair comparison for a Quadformer is the same ViT, with the same weights, on a regular
grid of about N patches: the image resized (antialiased) to g x g patches, g = round(sqrt(N)), and the position
table resampled to that grid. This is what timm's ViT computes at another input size (``dynamic_img_size=True``).
"""
from __future__ import annotations

import dataclasses
import itertools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..mosaic import Mosaic, tokenize
from ..scorers import Uniform
from .quadformer import Quadformer, _check_vit

__all__ = ["UniformGrid", "grid_for_budget"]


def grid_for_budget(n_patches: int, image_size: tuple[int, int]) -> tuple[int, int]:
    """The patch grid (rows, cols) with the aspect ratio of ``image_size`` (H, W) whose token count is closest to
    ``n_patches`` (the smaller count on a tie): g x g with g = round(sqrt(n_patches)) for a square image.

    Example: ``grid_for_budget(145, (224, 224))`` gives ``(12, 12)``; ``grid_for_budget(100, (256, 384))`` gives
    ``(8, 12)``.
    """
    if isinstance(n_patches, bool) or not isinstance(n_patches, int) or n_patches < 1:
        raise ValueError(f"n_patches must be a positive int, got {n_patches!r}")
    aspect = image_size[1] / image_size[0]
    best = (1, max(1, round(aspect)))
    for rows in itertools.count(2):
        cols = max(1, round(rows * aspect))
        if rows * cols - n_patches > abs(best[0] * best[1] - n_patches):
            return best  # rows * cols only grows with the rows: no closer grid is left
        if abs(rows * cols - n_patches) < abs(best[0] * best[1] - n_patches):
            best = (rows, cols)


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

    Inputs: images ``[B, C, H, W]`` normalised as for the ViT, any H and W. ``forward(images, grid=...)`` overrides
    the grid per call; :func:`grid_for_budget` gives the grid for a token budget.
    """

    def __init__(self, model: Quadformer | nn.Module, grid: int | tuple[int, int] | None = None,
                 antialias: bool = True):
        super().__init__()
        if not isinstance(model, Quadformer):
            patch_size, _, (height, width) = _check_vit(model)
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
        side = model.min_patch_size
        grid = _as_grid(grid) if grid is not None else self.grid
        if grid is None:
            grid = (images.shape[-2] // side, images.shape[-1] // side)
        size = (grid[0] * side, grid[1] * side)
        resized = images
        if tuple(images.shape[-2:]) != size:
            resized = F.interpolate(images, size=size, mode="bilinear", align_corners=False,
                                    antialias=self.antialias)
        # One leaf size, so there is nothing to score: the root grid is the mosaic.
        mosaic = tokenize(resized, [], grid[0] * grid[1], side, side, model.patch_size, model.resize_mode)
        if model.pos_embed_kind != "resample" and resized is not images:
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
    rows, cols = (grid, grid) if isinstance(grid, int) else tuple(grid)
    if any(isinstance(g, bool) or not isinstance(g, int) or g < 1 for g in (rows, cols)):
        raise ValueError(f"grid must be a positive int or (rows, cols), got {grid!r}")
    return rows, cols
