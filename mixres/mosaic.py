"""``mixres.tokenize``: images and patch scores in, a mixed-resolution mosaic of tokens out."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from . import ops
from .checks import (NAN_POLICIES, check_budget_values, check_budgets, check_floating, check_images, check_int,
                     check_nan_policy, check_per_size_keys, check_resize_mode, check_threshold_number,
                     check_threshold_values, is_number)
from .grid import tokens_to_grid
from .pyramid import QuadtreeGeometry
from .scoring import is_scorer, packed_scores, scorer_patch_sizes

__all__ = ["Mosaic", "tokenize", "Backend", "NAN_POLICIES"]


class Backend(Protocol):
    """The ops :func:`tokenize` runs on, with the signatures of ``torch.ops.mixres.*``: :mod:`mixres.ops` (the
    compiled kernels, falling back to the reference where there are none) or :mod:`mixres.reference` (plain
    PyTorch). A module that defines the four functions is one. tokenize hands ``build_quadtree_adaptive`` its
    budgets and thresholds as tensors on the scores' device (thresholds in the scores' dtype), or None."""

    def build_quadtree(self, scores: Tensor, height: int, width: int, min_patch_size: int, max_patch_size: int,
                       n_patches: int) -> Tensor: ...

    def build_quadtree_adaptive(self, scores: Tensor, height: int, width: int, min_patch_size: int,
                                max_patch_size: int, max_patches: int, budgets: Tensor | None,
                                thresholds: Tensor | None) -> tuple[Tensor, Tensor]: ...

    def extract_patches(self, images: Tensor, boxes: Tensor, patch_size: int, mode: str) -> Tensor: ...

    def leaf_centers(self, boxes: Tensor, min_patch_size: int) -> Tensor: ...


@dataclass
class Mosaic:
    """A batch of mixed-resolution mosaics. Leaves are in canonical order: raster order of their top-left corner.

    A mosaic of an adaptive budget (:func:`tokenize` with ``threshold`` or per-image ``n_patches``) is *padded*:
    image b has ``lengths[b]`` leaves, which come first, and N - lengths[b] padding entries after them, whose values
    no leaf can have: tokens exactly 0, boxes (0, 0, 0) (size 0) and centres (-0.5, -0.5) (every leaf's are >= 0).
    ``valid`` masks them. Padding tokens carry no gradient to the images.

    Attributes:
        tokens: ``[B, N, C, p, p]``, each leaf resized to p x p (the images' dtype and device).
        boxes: ``[B, N, 3]`` int32, each leaf's (y, x, size) in pixels.
        centers: ``[B, N, 2]`` float32, each leaf's centre (y, x) in units of the s_min grid, so that the first
            s_min cell sits at 0.0: ``(corner + size / 2) / min_patch_size - 0.5``.
        min_patch_size: s_min, the unit of ``centers``.
        image_size: (H, W) of the tokenized images.
        lengths: ``[B]`` int32 on the mosaic's device, each image's number of leaves, for a padded mosaic; None for
            a fixed budget, where every one of the N entries is a leaf. In a padded mosaic each image's leaves come
            first, in canonical order; the rest is padding: tokens 0, boxes (0, 0, 0), centres (-0.5, -0.5).
    """

    tokens: Tensor
    boxes: Tensor
    centers: Tensor
    min_patch_size: int
    image_size: tuple[int, int]
    lengths: Tensor | None = None

    @property
    def n_patches(self) -> int:
        """N, the entries per image: the leaves of a fixed budget, or N_max, leaves and padding, of a padded
        mosaic."""
        return self.tokens.shape[1]

    @property
    def is_padded(self) -> bool:
        """Whether the mosaic has per-image lengths (an adaptive budget), so that entries past them are padding."""
        return self.lengths is not None

    @property
    def valid(self) -> Tensor:
        """``[B, N]`` bool on the mosaic's device, True for leaves and False for padding: entry n of image b is a
        leaf when n < lengths[b]. Computed on the device, without a host synchronisation; all True for a mosaic that
        is not padded."""
        batch, n_entries = self.boxes.shape[:2]
        if self.lengths is None:
            return torch.ones(batch, n_entries, dtype=torch.bool, device=self.boxes.device)
        return torch.arange(n_entries, device=self.lengths.device) < self.lengths[:, None]

    def image_leaves(self, index: int) -> Tensor:
        """``[n, 3]`` int32: the boxes of image ``index``'s leaves, without its padding, ``boxes[index, :n]`` with
        n = ``lengths[index]`` (all N for a mosaic that is not padded). Reading n synchronises with a GPU: for
        pictures and reports, not for a training loop."""
        boxes = self.boxes[index]
        return boxes if self.lengths is None else boxes[:int(self.lengths[index])]

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
        ``[B, D, H / min_patch_size, W / min_patch_size]``, differentiable; padding entries paint nothing (and get
        a zero gradient). See :func:`mixres.tokens_to_grid`."""
        return tokens_to_grid(features, self.boxes, self.min_patch_size, self.image_size)


def _first_non_finite_pixel(images: Tensor) -> str | None:
    """Where ``images`` (on the CPU) hold NaN or Inf, in words; None if they are finite."""
    bad = ~torch.isfinite(images)
    if not bad.any():
        return None
    batch, channel, y, x = bad.nonzero()[0].tolist()
    return (f"{int(bad.sum())} NaN or Inf values (the first, {images[batch, channel, y, x].item()}, in image "
            f"{batch}, channel {channel}, at (y, x) = ({y}, {x}))")


def _budgets(n_patches, max_patches, threshold, geometry: QuadtreeGeometry,
             images: Tensor) -> tuple[int, Tensor | None]:
    """(N, budgets): the width of the outputs, and the per-image budgets ``[B]`` on the images' device (None for one
    budget for all). Their values are checked here where that is free (Python ints, CPU tensors outside
    torch.compile); on a GPU the op checks them on the device."""
    # A 0-dim tensor is no per-image budget: check_int asks for int(value).
    per_image = (isinstance(n_patches, Tensor) and n_patches.dim() > 0) or (
        isinstance(n_patches, Sequence) and not isinstance(n_patches, str))
    if not per_image:
        n_patches = geometry.check_n_patches(n_patches)
        if max_patches is not None:
            raise ValueError(f"max_patches={max_patches} is the padded length of per-image budgets (n_patches a "
                             f"Tensor [B] or a list of ints); with one n_patches for every image"
                             f"{' and a threshold, n_patches itself is the cap N_max' if threshold is not None else ''}"
                             f": leave max_patches out")
        return n_patches, None
    batch = images.shape[0]
    if isinstance(n_patches, Tensor):
        check_budgets(n_patches, batch, None, images.device, name="n_patches", holder="images are")
        if max_patches is None:
            raise ValueError("n_patches is a Tensor of per-image budgets: pass max_patches=N_max, the padded length "
                             "of the outputs (at least the largest budget); taking the largest budget from the "
                             "tensor would synchronise with its device and make the output shapes depend on the data")
        max_patches = geometry.check_n_patches(max_patches, name="max_patches")
        if n_patches.device.type == "cpu" and not torch.compiler.is_compiling():  # free here; else the op checks
            check_budget_values(n_patches, geometry.n_roots, max_patches, None, name="n_patches")
        return max_patches, n_patches
    budgets = [check_int(f"n_patches[{image}]", budget, valid="an int") for image, budget in enumerate(n_patches)]
    if len(budgets) != batch:
        raise ValueError(f"n_patches must hold one budget per image, [B] = [{batch}], got {len(budgets)}")
    max_patches = geometry.check_n_patches(max(budgets) if max_patches is None else max_patches, name="max_patches")
    check_budget_values(budgets, geometry.n_roots, max_patches, None, name="n_patches")
    # non_blocking: a blocking copy to a GPU would synchronise the stream (a CUDA graph captures neither).
    return max_patches, torch.tensor(budgets, dtype=torch.int64).to(images.device, non_blocking=True)


def _threshold_values(threshold, geometry: QuadtreeGeometry) -> list | Tensor:
    """``threshold`` as one entry per splittable patch size, coarse to fine: a list of numbers, or a Tensor (its
    dtype and shape checked; its values are the op's)."""
    sizes = geometry.splittable_sizes
    if isinstance(threshold, Mapping):
        check_per_size_keys("threshold as a dict", threshold, sizes, geometry.min_patch_size)
        threshold = [threshold[size] for size in sizes]
    if isinstance(threshold, Tensor):
        check_floating("threshold", threshold)
        if threshold.dim() == 0:
            threshold = threshold.reshape(1).expand(len(sizes))
        if tuple(threshold.shape) != (len(sizes),):
            raise ValueError(f"threshold must be one number (0-dim) or [{len(sizes)}], one per splittable patch size "
                             f"{sizes}, got shape {list(threshold.shape)}")
        return threshold
    if is_number(threshold):
        threshold = [threshold] * len(sizes)
    if isinstance(threshold, str) or not isinstance(threshold, Sequence) or not all(map(is_number, threshold)):
        raise TypeError(f"threshold must be a number, a dict {{patch size: number}}, a sequence of numbers (one per "
                        f"splittable patch size {sizes}, coarse to fine) or a Tensor, got {threshold!r}")
    if len(threshold) != len(sizes):
        raise ValueError(f"threshold must hold one number per splittable patch size {sizes}, coarse to fine, got "
                         f"{len(threshold)} numbers")
    return list(threshold)


def check_threshold(threshold, geometry: QuadtreeGeometry) -> None:
    """The errors :func:`tokenize` raises for ``threshold`` in ``geometry``, before any images: its form, and each
    number finite (in float32, the scorers' dtype). A tensor's values are checked where they are used."""
    values = _threshold_values(threshold, geometry)
    if not isinstance(values, Tensor):
        _rounded_thresholds(values, geometry.splittable_sizes, torch.float32)


def _rounded_thresholds(values: list, sizes: list[int], dtype: torch.dtype) -> list[float]:
    """Threshold numbers, one per size, checked finite and rounded to the scores' ``dtype``."""
    return [check_threshold_number(value, dtype, None, "threshold", f" for patch size {size} (threshold[{level}])")
            for level, (value, size) in enumerate(zip(values, sizes, strict=True))]


def _thresholds(values: list | Tensor, geometry: QuadtreeGeometry, packed: Tensor) -> Tensor:
    """The thresholds as the op takes them: ``[L]`` in the packed scores' dtype, on their device. Numbers are
    checked and rounded to the dtype here, and each filled in on the device (a fill is a kernel, which CUDA graphs
    capture; a copy from the host's memory is not); a tensor is converted (no synchronisation)."""
    sizes = geometry.splittable_sizes
    if isinstance(values, Tensor):
        if values.device != packed.device and values.device.type != "cpu":
            raise ValueError(f"threshold is on {values.device} but images are on {packed.device}: put both on one "
                             f"device")
        if values.device.type == "cpu" and not torch.compiler.is_compiling():  # free here; else the op checks
            check_threshold_values(values, sizes, None, name="threshold")
        return values.to(device=packed.device, dtype=packed.dtype, non_blocking=True).contiguous()
    rounded = _rounded_thresholds(values, sizes, packed.dtype)
    if not rounded:
        return packed.new_empty(0)
    return torch.stack([torch.full((), value, dtype=packed.dtype, device=packed.device) for value in rounded])


def _build_quadtree(backend: Backend, packed: Tensor, images: Tensor, geometry: QuadtreeGeometry,
                    n_patches: int, scorer, budgets: Tensor | None = None,
                    thresholds: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """The backend's quadtree, ``(boxes, lengths)``: lengths None for a fixed budget (no budgets, no thresholds),
    else the adaptive op's. When the op rejects non-finite scores on the CPU, the error says where they come
    from."""
    args = (packed, geometry.height, geometry.width, geometry.min_patch_size, geometry.max_patch_size, n_patches)
    try:
        if budgets is None and thresholds is None:
            return backend.build_quadtree(*args), None
        return backend.build_quadtree_adaptive(*args, budgets, thresholds)
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


def tokenize(images: Tensor, scores, n_patches: int | Tensor | Sequence[int] = 100, min_patch_size: int | None = None,
             max_patch_size: int | None = None, patch_size: int | None = None, mode: str = "area",
             nan_policy: str = "raise", *, threshold=None, max_patches: int | None = None,
             backend: Backend = ops) -> Mosaic:
    """Splits each image into a quadtree of ``n_patches`` square leaves, greedily by score, and resizes every leaf
    to one token size.

    Starting from the grid of ``max_patch_size`` roots, each step splits the leaf with the highest score into its 4
    quadrants, until there are ``n_patches`` leaves. Ties go to the leaf whose top-left corner comes first in
    raster order. The result is identical on every device and in :mod:`mixres.reference`.

    **Adaptive budgets** give each image its own number of leaves, in a *padded* mosaic of static shape:

    - ``threshold=t``: an image also stops splitting when its best leaf (the one the greedy would split next)
      scores at or below t, so a flat image gets fewer leaves than a busy one; ``n_patches`` is then the cap N_max.
    - ``n_patches`` a Tensor ``[B]`` of int32 or int64 on the images' device (or a list of ints): a budget per
      image, each reachable; ``max_patches=N_max`` (required for a Tensor, the largest budget for a list) is the
      padded length. A threshold may stop an image before its budget.

    Image b's leaves are then exactly those of ``tokenize(images[b:b+1], ..., n_patches=lengths[b])`` (tokens,
    boxes and centres: the greedy order does not depend on where it stops), followed by padding: tokens 0, boxes
    (0, 0, 0), centres (-0.5, -0.5), values no leaf has. ``mosaic.lengths [B]`` int32 counts each image's leaves and
    ``mosaic.valid [B, N_max]`` masks them. Every shape is static and no step reads a value on the host, so the
    adaptive tokenize runs without host synchronisation on CUDA, in CUDA graphs (with a threshold of Python
    numbers or tensors on the device, and budgets on the device) and under ``torch.compile(fullgraph=True)``.
    The tokens take ``[B, N_max, C, p, p]`` whatever the lengths: choose N_max near the longest length expected (a
    cap 3x the mean tripled a CPU tokenize at 256 px, B=64, N_max=190: the 37 MB of fresh pages the tokens take, not
    the work), or :func:`mixres.pack` the mosaic.

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
            ``np.int64`` (not bools or floats). With ``threshold``, the cap N_max. Per-image budgets: a Tensor
            ``[B]`` int32 or int64 on the images' device, or a list of B ints, each a valid N (see above). A bad
            budget in a GPU tensor trips a device-side assert (raising would need a host synchronisation).
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
        threshold: the stopping rule of an adaptive budget (default None: none): a number for every patch size;
            a dict ``{patch size: number}`` with one entry per splittable size (s_max, s_max/2, ..., 2*s_min; the
            score of a leaf of that size is compared with it), as APT sets one per size; a sequence of those
            numbers, coarse to fine; or a floating-point Tensor, 0-dim or ``[L]`` in that order, on the images'
            device or the CPU. Compared with the packed scores in their dtype (float32, or float64 for float64
            maps), so numbers are rounded to it. Finite: NaN and Inf are errors (in a GPU tensor, a device-side
            assert).
        max_patches: N_max, the padded length, for per-image budgets (see ``n_patches``); None otherwise.
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
        int32 (y, x, size) and ``centers [B, N, 2]`` float32; for an adaptive budget N = N_max, with ``lengths
        [B]`` int32 and padding after each image's leaves (see above); otherwise ``lengths`` is None.

    Raises:
        TypeError: images or scores not floating point, n_patches or a size not an integer, per-image budgets not
            int32 or int64, a threshold of another type.
        ValueError: patch sizes that contradict the scorer's, a wrong rank or shape, an empty batch or image, images
            and scores on different devices, H or W not a multiple of max_patch_size, a patch-size ratio that is
            not a power of two, an unreachable n_patches (the message names the nearest valid ones), NaN or Inf
            scores with ``nan_policy="raise"`` (on the CPU; see above for CUDA), an unknown mode or nan_policy, a
            packed pyramid of another geometry; per-image budgets of the wrong shape or device, unreachable or past
            max_patches, or without max_patches; max_patches without per-image budgets; a threshold that is not
            finite (or overflows the scores' dtype), of the wrong length or device, or a dict whose keys are not
            the splittable patch sizes.

    Example:
        >>> images = torch.rand(2, 3, 256, 256)
        >>> pyramid = [torch.rand(2, 4, 4), torch.rand(2, 8, 8)]  # patch sizes 64 and 32
        >>> mosaic = mixres.tokenize(images, pyramid, n_patches=100)
        >>> mosaic.tokens.shape, mosaic.boxes.shape
        (torch.Size([2, 100, 3, 16, 16]), torch.Size([2, 100, 3]))
        >>> mosaic = mixres.tokenize(images, mixres.PixelBlur(16, 32), n_patches=100)  # sizes from the scorer
        >>> mosaic = mixres.tokenize(images, pyramid, n_patches=100, threshold={64: 0.5, 32: 0.9})
        >>> mosaic.tokens.shape  # padded to N_max = 100: image b's lengths[b] leaves first, then zeros
        torch.Size([2, 100, 3, 16, 16])
        >>> mosaic = mixres.tokenize(images, pyramid, n_patches=torch.tensor([16, 100]), max_patches=100)
        >>> mosaic.lengths.tolist(), mosaic.valid.sum(dim=1).tolist()
        ([16, 100], [16, 100])
    """
    check_images(images)
    min_patch_size, max_patch_size = scorer_patch_sizes(scores, min_patch_size, max_patch_size)
    height, width = images.shape[-2:]
    geometry = QuadtreeGeometry(height, width, min_patch_size, max_patch_size)
    n_patches, budgets = _budgets(n_patches, max_patches, threshold, geometry, images)
    threshold = None if threshold is None else _threshold_values(threshold, geometry)
    patch_size = geometry.min_patch_size if patch_size is None else check_int(
        "patch_size", patch_size, low=1, valid="a positive int or None (= min_patch_size)")
    check_resize_mode(mode)
    check_nan_policy(nan_policy)
    scorer = scores if is_scorer(scores) else None
    packed = packed_scores(images, scores, geometry, nan_policy)
    thresholds = None if threshold is None else _thresholds(threshold, geometry, packed)
    boxes, lengths = _build_quadtree(backend, packed, images, geometry, n_patches, scorer, budgets, thresholds)
    return Mosaic(
        tokens=backend.extract_patches(images, boxes, patch_size, mode),
        boxes=boxes,
        centers=backend.leaf_centers(boxes, geometry.min_patch_size),
        min_patch_size=geometry.min_patch_size,
        image_size=(height, width),
        lengths=lengths,
    )
