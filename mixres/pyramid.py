"""Quadtree geometry and score pyramids: which budgets are reachable, and how scores are laid out.

A score pyramid holds one map per splittable patch size s (s_max, s_max/2, ..., 2*s_min), coarse to fine; the map
of size s is ``[B, H/s, W/s]`` and scores the splitting of each s x s patch. The kernels take it *packed*: every
map flattened row-major and concatenated, ``[B, P]``.
"""
from __future__ import annotations

import math
import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

MAX_IMAGE_SIDE = 2**31 - 1  # boxes are int32 (y, x, size)

__all__ = ["QuadtreeGeometry", "valid_n_patches", "default_max_patch_size", "pack_pyramid", "saliency_to_pyramid",
           "check_int", "MAX_IMAGE_SIDE"]


def check_int(name: str, value, low: int | None = None, high: int | None = None, valid: str | None = None) -> int:
    """``value`` as a Python int, for the sizes, counts and seeds of mixres: a Python int or any integer scalar
    that implements ``__index__`` (NumPy's ``np.int64(100)``), within ``[low, high]``.

    A bool is not a count, and a Tensor is refused too: reading its value would synchronise with its device (and
    specialise a compiled graph on it); pass ``int(t)``. ``valid`` describes the valid values in the errors
    (default: from ``low`` and ``high``).

    Raises:
        TypeError: not an integer (a float, a str, a bool, a Tensor...), naming ``name``.
        ValueError: outside ``[low, high]``, naming ``name`` and the range.
    """
    if valid is None:
        valid = ("a positive int" if low == 1 and high is None else
                 f"an int >= {low}" if high is None else f"an int from {low} to {high}")
    if isinstance(value, bool) or isinstance(value, Tensor) or not hasattr(type(value), "__index__"):
        hint = ": pass int(value)" if isinstance(value, Tensor) else ""
        raise TypeError(f"{name} must be {valid}, got {type(value).__name__} {value!r}{hint}")
    try:
        number = operator.index(value)
    except TypeError:  # NumPy's bool has __index__ but refuses to be an index
        raise TypeError(f"{name} must be {valid}, got {type(value).__name__} {value!r}") from None
    if (low is not None and number < low) or (high is not None and number > high):
        raise ValueError(f"{name} must be {valid}, got {number}")
    return number


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
        return sum(math.prod(self.grid(s)) for s in self.splittable_sizes)

    def valid_n_patches(self) -> list[int]:
        return list(range(self.n_roots, self.max_patches + 1, 3))

    def check_n_patches(self, n_patches) -> int:
        """``n_patches`` as a Python int (integer scalars such as ``np.int64`` are taken), if it is reachable;
        a ``ValueError`` naming the nearest valid budgets otherwise."""
        n_patches = check_int("n_patches", n_patches, valid="an int")
        lo, hi = self.n_roots, self.max_patches
        if lo <= n_patches <= hi and (n_patches - lo) % 3 == 0:
            return n_patches
        clamped = min(max(n_patches, lo), hi)
        below = lo + (clamped - lo) // 3 * 3
        nearest = sorted({below, min(below + 3, hi)} - {n_patches})
        raise ValueError(
            f"n_patches={n_patches} is unreachable for a {self.height}x{self.width} image with patches of "
            f"{self.min_patch_size} to {self.max_patch_size} px: it must be {lo} + 3k (each split adds 3 leaves) "
            f"and at most {hi}; nearest valid: {' or '.join(map(str, nearest))}")


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


def _check_map(name: str, value, batch: int, shape: tuple[int, int], device: torch.device) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(value).__name__}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {value.dtype}")
    if value.device != device:
        raise ValueError(f"{name} is on {value.device} but images are on {device}: put both on one device")
    if tuple(value.shape) != (batch, *shape):
        raise ValueError(f"{name} must have shape [B, H/s, W/s] = {[batch, *shape]}, got {list(value.shape)}")
    return value


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
    maps = [_check_map(f"scores map of patch size {s}", m, batch, geometry.grid(s), device)
            for s, m in zip(geometry.splittable_sizes, maps)]
    dtype = torch.float64 if any(m.dtype == torch.float64 for m in maps) else torch.float32
    if not maps:
        return torch.zeros(batch, 0, dtype=dtype, device=device)
    return torch.cat([m.flatten(1).to(dtype) for m in maps], dim=1)


def saliency_to_pyramid(saliency: Tensor, geometry: QuadtreeGeometry) -> list[Tensor]:
    """Turns a dense saliency map ``[B, h, w]`` into a score pyramid, by **summing** it over each patch.

    A sum, not a mean: a large patch holding much saliency is split before a small one with the same density.
    The map is first brought to the s_min grid ``[B, H/s_min, W/s_min]``: averaged over each cell when it is at
    least that fine and divides evenly, resampled bilinearly otherwise. It must have the image's aspect ratio.
    float16 and bfloat16 maps are summed in float32 (half precision would round the sums, and so the ranking);
    the maps come out float32, or float64 for a float64 map.
    """
    if not isinstance(saliency, Tensor):
        raise TypeError(f"saliency must be a Tensor [B, h, w], got {type(saliency).__name__}")
    if saliency.dim() != 3:
        raise ValueError(f"saliency must have rank 3 [B, h, w], got rank {saliency.dim()} {list(saliency.shape)}")
    if not saliency.is_floating_point():
        raise TypeError(f"saliency must be floating point, got {saliency.dtype}")
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
