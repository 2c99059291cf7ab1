"""``mixres.tokenize``: images and patch scores in, a mixed-resolution mosaic of tokens out."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from . import ops
from .checks import NAN_POLICIES, check_images, check_int, check_nan_policy, check_resize_mode
from .grid import tokens_to_grid
from .pyramid import QuadtreeGeometry, pack_scores
from .scorers.base import Scorer

__all__ = ["Mosaic", "tokenize", "Backend", "NAN_POLICIES"]


class Backend(Protocol):
    """The ops :func:`tokenize` runs on, with the signatures of ``torch.ops.mixres.*``: :mod:`mixres.ops` (the
    compiled kernels, falling back to the reference where there are none) or :mod:`mixres.reference` (plain
    PyTorch). A module that defines the three functions is one."""

    def build_quadtree(self, scores: Tensor, height: int, width: int, min_patch_size: int, max_patch_size: int,
                       n_patches: int) -> Tensor: ...

    def extract_patches(self, images: Tensor, boxes: Tensor, patch_size: int, mode: str) -> Tensor: ...

    def leaf_centers(self, boxes: Tensor, min_patch_size: int) -> Tensor: ...


@dataclass
class Mosaic:
    """A batch of mixed-resolution mosaics. Leaves are in canonical order: raster order of their top-left corner.

    Attributes:
        tokens: ``[B, N, C, p, p]``, each leaf resized to p x p (the images' dtype and device).
        boxes: ``[B, N, 3]`` int32, each leaf's (y, x, size) in pixels.
        centers: ``[B, N, 2]`` float32, each leaf's centre (y, x) in units of the s_min grid, so that the first
            s_min cell sits at 0.0: ``(corner + size / 2) / min_patch_size - 0.5``.
        min_patch_size: s_min, the unit of ``centers``.
        image_size: (H, W) of the tokenized images.
        lengths: ``[B]`` int64, the number of valid leaves of each image (<= N), or None for a fixed budget (every
            leaf valid, no padding). In a padded mosaic each image's valid leaves come first, in canonical order;
            the rest is padding: tokens 0, boxes (0, 0, 0), centres (-0.5, -0.5).
    """

    tokens: Tensor
    boxes: Tensor
    centers: Tensor
    min_patch_size: int
    image_size: tuple[int, int]
    lengths: Tensor | None = None

    @property
    def is_padded(self) -> bool:
        """Whether some images may have fewer valid leaves than N (``lengths`` is set)."""
        return self.lengths is not None

    @property
    def valid(self) -> Tensor:
        """``[B, N]`` bool, True at valid leaves: ``arange(N) < lengths[:, None]``; all True when lengths is None."""
        batch, n_leaves = self.tokens.shape[:2]
        if self.lengths is None:
            return torch.ones(batch, n_leaves, dtype=torch.bool, device=self.tokens.device)
        return torch.arange(n_leaves, device=self.lengths.device) < self.lengths[:, None]

    @property
    def n_patches(self) -> int:
        return self.tokens.shape[1]

    @property
    def patch_size(self) -> int:
        return self.tokens.shape[-1]

    @property
    def tokens_channels_last(self) -> Tensor:
        """``[B, N, p, p, C]``, a view of ``tokens`` (no copy)."""
        return self.tokens.permute(0, 1, 3, 4, 2)

    def flat_tokens(self) -> Tensor:
        """``[B, N, C * p * p]``, a view in the (C, p, p) order of a ViT's ``Conv2d`` patch-embedding weight, so
        ``flat_tokens() @ weight.flatten(1).T`` embeds each token."""
        return self.tokens.flatten(2)

    def to_grid(self, features: Tensor) -> Tensor:
        """Paints per-leaf ``features [B, N, D]`` over the min_patch_size cells each leaf covers:
        ``[B, D, H / min_patch_size, W / min_patch_size]``, differentiable. See :func:`mixres.tokens_to_grid`."""
        return tokens_to_grid(features, self.boxes, self.min_patch_size, self.image_size)


def _rank_non_finite_lowest(packed: Tensor) -> Tensor:
    """``nan_policy="lowest"``: NaN and -Inf scores become the lowest finite value of the scores' dtype, +Inf the
    highest. Elementwise, so no host synchronisation, and the same on every device."""
    extremes = torch.finfo(packed.dtype)
    return torch.nan_to_num(packed, nan=extremes.min, posinf=extremes.max, neginf=extremes.min)


def _first_non_finite_pixel(images: Tensor) -> str | None:
    """Where ``images`` (on the CPU) hold NaN or Inf, in words; None if they are finite."""
    bad = ~torch.isfinite(images)
    if not bad.any():
        return None
    batch, channel, y, x = bad.nonzero()[0].tolist()
    return (f"{int(bad.sum())} NaN or Inf values (the first, {images[batch, channel, y, x].item()}, in image "
            f"{batch}, channel {channel}, at (y, x) = ({y}, {x}))")


def _patch_sizes(scores, min_patch_size: int | None, max_patch_size: int | None) -> tuple[int, int]:
    """The tokenizer's patch sizes: the arguments, else the scorer's own (its ``min_patch_size`` and
    ``max_patch_size`` attributes), else 16 and 64. A scorer whose sizes contradict the arguments is an error."""
    sizes = []
    for name, given, default in (("min_patch_size", min_patch_size, 16), ("max_patch_size", max_patch_size, 64)):
        own = getattr(scores, name, None) if _is_scorer(scores) else None
        if given is not None and own is not None and given != own:
            raise ValueError(f"{name}={given} but the scorer {scores!r} scores patches for {name}={own}: pass "
                             f"the same sizes to both, or leave {name} out of tokenize")
        sizes.append(next(size for size in (given, own, default) if size is not None))
    return sizes[0], sizes[1]


def _is_scorer(scores) -> bool:
    return callable(scores) and not isinstance(scores, Tensor)


def _build_quadtree(backend: Backend, packed: Tensor, images: Tensor, geometry: QuadtreeGeometry,
                    n_patches: int, scorer) -> Tensor:
    """The backend's quadtree; when it rejects non-finite scores on the CPU, the error says where they come from."""
    try:
        return backend.build_quadtree(packed, geometry.height, geometry.width, geometry.min_patch_size,
                                      geometry.max_patch_size, n_patches)
    except ValueError as error:
        # Only on the CPU: on CUDA, non-finite scores trip a device-side assert instead (checking would need a
        # host synchronisation), and the arguments were checked before.
        if packed.device.type != "cpu" or bool(torch.isfinite(packed).all()):
            raise
        pixels = _first_non_finite_pixel(images)
        if pixels is not None:
            raise ValueError(f"images hold {pixels}, and the scores are not finite there: scorers need finite "
                             f"pixels. Replace them (e.g. torch.nan_to_num), or pass nan_policy='lowest' to split "
                             f"the patches with NaN scores last ({error})") from error
        if scorer is not None:
            largest = images.abs().amax().item()
            raise ValueError(f"{error}; the images are finite (largest |value| {largest:.3g}), so the scorer "
                             f"{scorer!r} made them: its arithmetic may overflow for values this large (scorers "
                             f"expect images in [0, 1])") from error
        raise


def tokenize(images: Tensor, scores, n_patches: int = 100, min_patch_size: int | None = None,
             max_patch_size: int | None = None, patch_size: int | None = None, mode: str = "area",
             nan_policy: str = "raise", *, backend: Backend = ops) -> Mosaic:
    """Splits each image into a quadtree of ``n_patches`` square leaves, greedily by score, and resizes every leaf
    to one token size.

    Starting from the grid of ``max_patch_size`` roots, each step splits the leaf with the highest score into its 4
    quadrants, until there are ``n_patches`` leaves. Ties go to the leaf whose top-left corner comes first in
    raster order. The result is identical on every device and in :mod:`mixres.reference`.

    Args:
        images: ``[B, C, H, W]`` float16, bfloat16, float32 or float64, B >= 1. H and W must be multiples of
            ``max_patch_size`` (non-square images are fine).
        scores: the split priority, higher splits first, on the images' device, in one of four forms:

            - a score pyramid: a list of maps ordered coarse to fine, one per splittable patch size
              s = max_patch_size, max_patch_size/2, ..., 2*min_patch_size, the map of size s being ``[B, H/s, W/s]``;
              or a dict ``{s: map}``;
            - a packed pyramid, :class:`mixres.PackedPyramid`: the maps flattened and concatenated, ``[B, P]``,
              with the geometry they were computed for (which must be this one). Taken as it is, without a copy;
            - a dense saliency map ``[B, h, w]`` with the images' aspect ratio (e.g. Grad-CAM). Each patch's score
              is the **sum** of the map over its area (after the map is brought to the min_patch_size grid: cell
              averages when it divides evenly, bilinear resampling otherwise);
            - a scorer: a callable ``scorer(images) -> pyramid``, such as :class:`mixres.scorers.PixelBlur`. A
              :class:`mixres.scorers.Scorer` is asked for its packed pyramid, ``scorer.packed(images)``, which
              PixelBlur computes directly.

            Scores must be finite (but see ``nan_policy``). float16/bfloat16 maps are compared (and a dense one
            summed) as float32.
        n_patches: leaves per image, N = (H/s_max)(W/s_max) + 3k, at most (H/s_min)(W/s_min). See
            :func:`mixres.valid_n_patches`. This and the sizes below take Python ints or integer scalars such as
            ``np.int64`` (not bools, floats or Tensors).
        min_patch_size, max_patch_size: the smallest and largest leaf side, in pixels; their ratio is a power of 2.
            Default: the scorer's own sizes when ``scores`` is a scorer that has them, else 16 and 64.
        patch_size: token side p; default ``min_patch_size``.
        mode: how a leaf is resized to p x p: ``"area"`` (exact box averaging, ``F.interpolate(mode="area")``) or
            ``"bilinear"`` (``align_corners=False``, no antialiasing).
        nan_policy: what NaN and infinite scores do:

            - ``"raise"`` (default): they are an error. On the CPU a ``ValueError`` that names the first one, and
              the images' first NaN or Inf pixel when there is one. **On CUDA they trip a device-side assert**,
              which ends the process's CUDA context (every later CUDA call fails): raising an exception would need
              a host synchronisation, which tokenize never does.
            - ``"lowest"``: they are ranked instead, so a pipeline keeps running: NaN and -Inf count as the lowest
              finite value of the packed scores' dtype (``torch.finfo(torch.float32).min``, or float64's), +Inf
              as the highest, so patches with NaN scores are split last; ties go to raster order as always. It
              costs one elementwise pass over the packed scores (no synchronisation) and gives the same leaves
              on every device.
        backend: the ops that build the quadtree and compute the tokens and centres (:class:`Backend`): the default
            :mod:`mixres.ops`, or :mod:`mixres.reference` for plain PyTorch (what ``mixres.reference.tokenize``
            does). Both give the same mosaic.

    Non-finite pixels: tokenize itself resizes them like any other value (a leaf that holds a NaN gives NaN
    tokens, as ``F.interpolate`` would). The scorers that read pixel values (PixelBlur, Entropy, FeatureBased,
    GradCAM) give NaN scores to every patch that holds a NaN or Inf pixel, so ``nan_policy`` decides: on the CPU
    ``"raise"`` names the pixel, and ``"lowest"`` splits those patches last. Random, Uniform and Precomputed do not
    read pixel values. On CUDA, check the images yourself if they may hold NaN (``torch.isfinite(images).all()``
    synchronises once), or use ``"lowest"``.

    Returns:
        :class:`Mosaic` with ``tokens [B, N, C, p, p]`` (differentiable w.r.t. ``images``), ``boxes [B, N, 3]``
        int32 (y, x, size) and ``centers [B, N, 2]`` float32.

    Raises:
        TypeError: images or scores not floating point, or n_patches or a size not an integer.
        ValueError: patch sizes that contradict the scorer's, a wrong rank or shape, an empty batch or image, images
            and scores on different devices, H or W not a multiple of max_patch_size, a patch-size ratio that is
            not a power of two, an unreachable n_patches (the message names the nearest valid ones), NaN or Inf
            scores with ``nan_policy="raise"`` (on the CPU; see above for CUDA), an unknown mode or nan_policy, a
            packed pyramid of another geometry.

    Example:
        >>> images = torch.rand(2, 3, 256, 256)
        >>> pyramid = [torch.rand(2, 4, 4), torch.rand(2, 8, 8)]  # patch sizes 64 and 32
        >>> mosaic = mixres.tokenize(images, pyramid, n_patches=100)
        >>> mosaic.tokens.shape, mosaic.boxes.shape
        (torch.Size([2, 100, 3, 16, 16]), torch.Size([2, 100, 3]))
        >>> mosaic = mixres.tokenize(images, mixres.PixelBlur(16, 32), n_patches=100)  # sizes from the scorer
    """
    check_images(images)
    min_patch_size, max_patch_size = _patch_sizes(scores, min_patch_size, max_patch_size)
    height, width = images.shape[-2:]
    geometry = QuadtreeGeometry(height, width, min_patch_size, max_patch_size)
    n_patches = geometry.check_n_patches(n_patches)
    patch_size = geometry.min_patch_size if patch_size is None else check_int(
        "patch_size", patch_size, low=1, valid="a positive int or None (= min_patch_size)")
    check_resize_mode(mode)
    check_nan_policy(nan_policy)
    scorer = scores if _is_scorer(scores) else None
    if scorer is not None:
        # A Scorer packs its own pyramid, without a list of maps in between where it computes the packed layout.
        scores = scorer.packed(images) if isinstance(scorer, Scorer) else scorer(images)
    packed = pack_scores(scores, geometry, images.shape[0], images.device)
    if nan_policy == "lowest":
        packed = _rank_non_finite_lowest(packed)
    boxes = _build_quadtree(backend, packed, images, geometry, n_patches, scorer)
    return Mosaic(
        tokens=backend.extract_patches(images, boxes, patch_size, mode),
        boxes=boxes,
        centers=backend.leaf_centers(boxes, geometry.min_patch_size),
        min_patch_size=geometry.min_patch_size,
        image_size=(height, width),
    )
