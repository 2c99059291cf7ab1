"""Quadtree geometry and score pyramids: which budgets are reachable, and how scores are laid out.

A score pyramid holds one map per splittable patch size s (s_max, s_max/2, ..., 2*s_min), coarse to fine; the map
of size s is ``[B, H/s, W/s]`` and scores the splitting of each s x s patch. The kernels take it *packed*: every
map flattened row-major and concatenated, ``[B, P]``, P = :func:`packed_length`.

The forms a pyramid takes, each turned into the next by one function here: a dense saliency map ``[B, h, w]``
(:func:`saliency_to_pyramid`), a sequence or dict of maps (:func:`pack_pyramid`), and the packed tensor with its
geometry (:class:`PackedPyramid`, which :meth:`PackedPyramid.maps` splits back into views). :func:`pack_scores`
takes any of them.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .checks import check_batch, check_device, check_floating, check_int, check_map, check_rank, check_tensor

MAX_IMAGE_SIDE = 2**31 - 1  # boxes are int32 (y, x, size)

__all__ = ["QuadtreeGeometry", "PackedPyramid", "valid_n_patches", "default_max_patch_size", "packed_length",
           "pack_pyramid", "pack_scores", "pyramid_maps", "saliency_to_pyramid", "MAX_IMAGE_SIDE"]


def packed_length(height: int, width: int, min_patch_size: int, max_patch_size: int) -> int:
    """P, the length of a packed pyramid: the cells of every splittable level, ``sum (H/s)(W/s)`` over
    s = max_patch_size, max_patch_size/2, ..., 2*min_patch_size. In arithmetic that symbolic sizes support, so the
    ops' fake kernels use it too (under ``torch.compile`` the image sides may be ``SymInt``)."""
    length, size = 0, max_patch_size
    while size > min_patch_size:
        length += (height // size) * (width // size)
        size //= 2
    return length


@dataclass(frozen=True)
class QuadtreeGeometry:
    """Patch sizes of a quadtree over an ``height x width`` image. Raises ``ValueError`` when they do not fit, and
    ``TypeError`` for sizes that are not integers; integer scalars such as ``np.int64`` become Python ints."""

    height: int
    width: int
    min_patch_size: int = 16
    max_patch_size: int = 64

    def __post_init__(self):
        for name in ("height", "width", "min_patch_size", "max_patch_size"):
            object.__setattr__(self, name, check_int(name, getattr(self, name), low=1))
        lo, hi = self.min_patch_size, self.max_patch_size
        if lo > hi:
            raise ValueError(f"min_patch_size {lo} must be at most max_patch_size {hi}")
        if hi % lo or (hi // lo) & (hi // lo - 1):
            raise ValueError(f"max_patch_size / min_patch_size must be a power of two (1, 2, 4, ...), got "
                             f"max_patch_size={hi}, min_patch_size={lo}")
        for name in ("height", "width"):
            value = getattr(self, name)
            if value % hi:
                down, up = value // hi * hi, (value // hi + 1) * hi
                fits = [s for s in (hi // 2, hi // 4) if s >= lo and value % s == 0]
                hint = f"; or max_patch_size={fits[0]}" if fits else ""
                raise ValueError(f"image {name} {value} is not a multiple of max_patch_size {hi}: resize or crop "
                                 f"it to {down or up} or {up}{hint}")
        # The C++ ops' limit (quadtree_layout.h), after the checks that relate the sizes (more telling when they fail),
        # patch sizes first: a scorer's geometry is one max_patch_size root.
        for name in ("min_patch_size", "max_patch_size", "height", "width"):
            if getattr(self, name) > MAX_IMAGE_SIDE:
                raise ValueError(f"{name} must be at most {MAX_IMAGE_SIDE} (boxes hold int32 pixel coordinates), "
                                 f"got {getattr(self, name)}")

    @property
    def sizes(self) -> list[int]:
        """Every patch size, coarse to fine: s_max, s_max/2, ..., s_min."""
        return [self.max_patch_size >> level for level in range(int(math.log2(self.max_patch_size //
                                                                             self.min_patch_size)) + 1)]

    @property
    def splittable_sizes(self) -> list[int]:
        """The patch sizes that have a score map: all but s_min."""
        return self.sizes[:-1]

    def grid(self, size: int) -> tuple[int, int]:
        return self.height // size, self.width // size

    @property
    def n_roots(self) -> int:
        rows, cols = self.grid(self.max_patch_size)
        return rows * cols

    @property
    def max_patches(self) -> int:
        rows, cols = self.grid(self.min_patch_size)
        return rows * cols

    @property
    def n_scores(self) -> int:
        """P, the length of a packed pyramid."""
        return packed_length(self.height, self.width, self.min_patch_size, self.max_patch_size)

    def valid_n_patches(self) -> list[int]:
        return list(range(self.n_roots, self.max_patches + 1, 3))

    def check_n_patches(self, n_patches, name: str = "n_patches") -> int:
        """``n_patches`` as a Python int (integer scalars such as ``np.int64`` are taken), if it is reachable;
        a ``ValueError`` naming the nearest valid budgets otherwise. ``name`` is the argument's name in the errors
        (``max_patches`` for an adaptive budget's cap)."""
        n_patches = check_int(name, n_patches, valid="an int")
        lo, hi = self.n_roots, self.max_patches
        if lo <= n_patches <= hi and (n_patches - lo) % 3 == 0:
            return n_patches
        clamped = min(max(n_patches, lo), hi)
        below = lo + (clamped - lo) // 3 * 3
        nearest = sorted({below, min(below + 3, hi)} - {n_patches})
        raise ValueError(
            f"{name}={n_patches} is unreachable for a {self.height}x{self.width} image with patches of "
            f"{self.min_patch_size} to {self.max_patch_size} px: it must be {lo} + 3k (each split adds 3 leaves) "
            f"and at most {hi}; nearest valid: {' or '.join(map(str, nearest))}")


@dataclass(frozen=True, eq=False)
class PackedPyramid:
    """A score pyramid in the layout the quadtree kernels take: every map flattened row-major and concatenated,
    coarse to fine, ``scores [B, P]`` with P = ``geometry.n_scores``.

    It is what :func:`mixres.ops.pixel_blur_scores` computes and what a scorer's ``packed(images)`` returns, and
    :func:`mixres.tokenize` takes it as it is, where it would concatenate a list of maps. The geometry travels with
    the scores, since P alone does not tell the image's shape: tokenize checks that it is its own.

    Raises:
        TypeError: scores not a floating-point Tensor, or geometry not a :class:`QuadtreeGeometry`.
        ValueError: scores not ``[B, geometry.n_scores]``.
    """

    scores: Tensor
    geometry: QuadtreeGeometry

    def __post_init__(self):
        check_floating("scores", check_tensor("scores", self.scores))
        if not isinstance(self.geometry, QuadtreeGeometry):
            raise TypeError(f"geometry must be a QuadtreeGeometry, got {type(self.geometry).__name__}")
        if self.scores.dim() != 2 or self.scores.shape[1] != self.geometry.n_scores:
            raise ValueError(f"a packed pyramid of {_describe(self.geometry)} must be [B, {self.geometry.n_scores}], "
                             f"got {list(self.scores.shape)}")

    def maps(self) -> list[Tensor]:
        """The pyramid as maps, coarse to fine, the map of patch size s ``[B, H/s, W/s]``: views of ``scores``."""
        grids = [self.geometry.grid(size) for size in self.geometry.splittable_sizes]
        levels = self.scores.split([rows * cols for rows, cols in grids], dim=1)
        return [level.view(self.scores.shape[0], *grid) for level, grid in zip(levels, grids)]


def _describe(geometry: QuadtreeGeometry) -> str:
    return (f"a {geometry.height}x{geometry.width} image with patches of {geometry.min_patch_size} to "
            f"{geometry.max_patch_size} px")


def valid_n_patches(height: int, width: int | None = None, min_patch_size: int = 16,
                    max_patch_size: int = 64) -> list[int]:
    """Every reachable ``n_patches`` for an image of ``height x width`` (square when ``width`` is None).

    Example: ``valid_n_patches(224, min_patch_size=16, max_patch_size=32)`` gives ``[49, 52, ..., 196]``.
    """
    return QuadtreeGeometry(height, height if width is None else width, min_patch_size,
                            max_patch_size).valid_n_patches()


def default_max_patch_size(height: int, width: int, min_patch_size: int) -> int:
    """The largest of 4, 2 and 1 times ``min_patch_size`` that divides both sides: 32 for 224 px and 16 px leaves,
    64 for 256 or 384 px. ``min_patch_size`` when none does, which :class:`QuadtreeGeometry` then rejects with the
    sizes that would fit."""
    return next((min_patch_size * factor for factor in (4, 2) if height % (min_patch_size * factor) == 0
                 and width % (min_patch_size * factor) == 0), min_patch_size)


def _concrete(device: torch.device) -> torch.device:
    """``cuda`` -> ``cuda:<current>``: tensors always carry an index, so ``cuda`` alone would never match them."""
    if device.index is None and device.type == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return device


def pyramid_maps(pyramid, sizes: list[int], name: str) -> list:
    """The maps of a pyramid given as a sequence ordered coarse to fine or as a dict ``{patch_size: map}``, coarse
    to fine; ``sizes`` are the splittable patch sizes, ``name`` the argument's name in the errors."""
    if isinstance(pyramid, Mapping):
        keys = sorted(pyramid, reverse=True)
        if keys != sizes:
            raise ValueError(f"{name} dict must have one map per splittable patch size {sizes}, got keys {keys}")
        return [pyramid[s] for s in sizes]
    if isinstance(pyramid, Sequence) and not isinstance(pyramid, (str, bytes)):
        if len(pyramid) != len(sizes):
            raise ValueError(f"{name} must hold {len(sizes)} maps, one per splittable patch size {sizes} "
                             f"(coarse to fine), got {len(pyramid)}")
        return list(pyramid)
    raise TypeError(f"{name} must be a dense saliency map [B, h, w], a sequence of maps or a dict "
                    f"{{patch_size: map}}, got {type(pyramid).__name__}")


def pack_pyramid(scores, geometry: QuadtreeGeometry, batch: int, device: torch.device) -> Tensor:
    """Checks a score pyramid and packs it into ``[B, P]`` (float32, or float64 if any map is float64).

    ``scores`` is a sequence of maps ordered coarse to fine (patch size s_max first, 2*s_min last), or a dict
    ``{patch_size: map}``; the map of patch size s is ``[B, H/s, W/s]``.
    """
    maps = pyramid_maps(scores, geometry.splittable_sizes, "scores")
    device = _concrete(torch.device(device))
    maps = [check_map(f"scores map of patch size {s}", m, batch, geometry.grid(s), device)
            for s, m in zip(geometry.splittable_sizes, maps)]
    dtype = torch.float64 if any(m.dtype == torch.float64 for m in maps) else torch.float32
    if not maps:
        return torch.zeros(batch, 0, dtype=dtype, device=device)
    return torch.cat([m.flatten(1).to(dtype) for m in maps], dim=1)


def pack_scores(scores, geometry: QuadtreeGeometry, batch: int, device: torch.device) -> Tensor:
    """Scores in any of the forms :func:`mixres.tokenize` takes, packed ``[B, P]`` (float32, or float64 when they are):

    - a :class:`PackedPyramid` of this geometry, taken as it is (converted only from another dtype);
    - a dense saliency map ``[B, h, w]``, summed over each patch by :func:`saliency_to_pyramid`;
    - a sequence or dict of maps, packed by :func:`pack_pyramid`.

    ``batch`` and ``device`` are the images'.
    """
    device = _concrete(torch.device(device))
    if isinstance(scores, PackedPyramid):
        if scores.geometry != geometry:
            raise ValueError(f"scores is a packed pyramid of {_describe(scores.geometry)}, but these images and "
                             f"patch sizes make {_describe(geometry)}")
        packed = check_batch("scores", check_device("scores", scores.scores, device), batch)
        return packed.to(torch.float64 if packed.dtype == torch.float64 else torch.float32)
    if isinstance(scores, Tensor):
        if scores.dim() != 3:
            raise ValueError(f"scores given as a Tensor must be a dense saliency map of rank 3 [B, h, w], got rank "
                             f"{scores.dim()} {list(scores.shape)}; pass a pyramid as a list or dict of maps")
        check_batch("scores", check_device("scores", check_floating("scores", scores), device), batch)
        scores = saliency_to_pyramid(scores, geometry)
    return pack_pyramid(scores, geometry, batch, device)


def saliency_to_pyramid(saliency: Tensor, geometry: QuadtreeGeometry) -> list[Tensor]:
    """Turns a dense saliency map ``[B, h, w]`` into a score pyramid, by **summing** it over each patch.

    A sum, not a mean: a large patch holding much saliency is split before a small one with the same density.
    The map is first brought to the s_min grid ``[B, H/s_min, W/s_min]``: averaged over each cell when it is at
    least that fine and divides evenly, resampled bilinearly otherwise. It must have the image's aspect ratio.
    float16 and bfloat16 maps are summed in float32 (half precision would round the sums, and so the ranking);
    the maps come out float32, or float64 for a float64 map.
    """
    check_floating("saliency", check_rank("saliency", saliency, 3, "[B, h, w]"))
    if saliency.dtype in (torch.float16, torch.bfloat16):
        saliency = saliency.float()
    batch, h, w = saliency.shape
    if h == 0 or w == 0:
        raise ValueError(f"saliency map {h}x{w} is empty: it needs h, w >= 1")
    if h * geometry.width != w * geometry.height:
        raise ValueError(f"saliency map {h}x{w} does not have the image's aspect ratio "
                         f"{geometry.height}x{geometry.width}")
    rows, cols = geometry.grid(geometry.min_patch_size)
    dense = saliency.unsqueeze(1)
    if h % rows == 0 and w % cols == 0:
        cells = F.adaptive_avg_pool2d(dense, (rows, cols))
    else:
        cells = F.interpolate(dense, size=(rows, cols), mode="bilinear", align_corners=False)
    pyramid = []
    for _ in geometry.splittable_sizes:
        cells = F.avg_pool2d(cells, 2) * 4  # sums over 2x2 children
        pyramid.append(cells)
    return [level.squeeze(1) for level in reversed(pyramid)]
