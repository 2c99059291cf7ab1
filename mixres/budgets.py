"""Setting the stopping threshold of an adaptive budget.

With a threshold t, an image stops splitting when its best leaf scores at or below t, so busy images get more
tokens than flat ones (:func:`mixres.ops.build_quadtree_adaptive`, ``tokenize(..., threshold=t)``). Scores have no
natural unit, so t is hard to choose by hand: :func:`calibrate_threshold` finds the t whose mean token count on a
sample of images is a given number.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from fractions import Fraction

import torch
from torch import Tensor

from . import ops
from .checks import check_images, check_int, check_nan_policy, check_per_size_keys, is_number
from .pyramid import QuadtreeGeometry
from .scoring import is_scorer, packed_scores, scorer_patch_sizes

__all__ = ["ThresholdCalibration", "calibrate_threshold"]

# Masks the 63 bits of a float64's magnitude: see _ordered.
_MAGNITUDE_BITS = 0x7FFFFFFFFFFFFFFF


@dataclass(frozen=True)
class ThresholdCalibration:
    """What :func:`calibrate_threshold` found on its sample.

    Attributes:
        threshold: t, the calibrated number.
        thresholds: ``{patch size: threshold}``, one per splittable size: t * ``level_weights[size]`` (t without
            weights), rounded to the scores' dtype and clamped to its finite range, exactly as the quadtree compared
            them. Pass it as ``tokenize(..., threshold=calibration.thresholds)``.
        mean_tokens: the sample's mean number of leaves per image at t: the achievable mean nearest the target.
        min_tokens, max_tokens: the fewest and the most leaves an image of the sample gets at t.
        threshold_range: ``(low, high)``: every t with low <= t < high gives the sample the same mean (low may be
            -inf, high +inf); t lies inside, at the middle of the sample's score values in between.
        target: the mean that was asked for.
        max_patches: N_max, the cap on every image's leaves the calibration ran with: tokenize's ``n_patches``.
    """

    threshold: float
    thresholds: dict[int, float]
    mean_tokens: float
    min_tokens: int
    max_tokens: int
    threshold_range: tuple[float, float]
    target: float
    max_patches: int


def calibrate_threshold(scores, images: Tensor, mean_tokens: float, max_patches: int | None = None,
                        min_patch_size: int | None = None, max_patch_size: int | None = None,
                        level_weights: Mapping[int, float] | None = None, nan_policy: str = "raise",
                        batch_size: int = 256) -> ThresholdCalibration:
    """The stopping threshold t whose mean token count on a sample of images is ``mean_tokens``.

    Every image of the sample is tokenized greedily up to ``max_patches`` leaves, stopping when its best leaf scores
    at or below the threshold of its size, ``thresholds[s]`` = t * ``level_weights[s]`` rounded to the scores' dtype
    (and clamped to its finite range), as the quadtree compares them. Its number of leaves is a non-increasing step
    function of t, which changes only where a level's threshold crosses one of that level's score values; so is the
    sample's mean. The search bisects over those values (sorted, distinct, per level): about 2 log2(K) quadtree
    runs over the sample for K distinct scores (K <= B * P), and no loop over leaves in Python. It is exact:

    - the mean at the returned t is, of every mean the sample can reach with any t, the one nearest
      ``mean_tokens``; between two equally near, the smaller one (fewer tokens);
    - every t in ``threshold_range`` gives that mean. The returned one lies in the middle of that range by rank of
      the score values in it, not at one of its ends, where a slightly different image would change the count.
      Without weights it is one of the scores (with weights, a score divided by its weight, where that lands in
      the range); t at or above every score / weight gives the roots alone, t below every one ``max_patches``.

    ``tokenize(images, scores, n_patches=calibration.max_patches, threshold=calibration.thresholds)`` then gives
    these images ``calibration.mean_tokens`` leaves on average, and other images like them about as many. Without
    weights, ``threshold=calibration.threshold`` is the same.

    The sample's scores are packed once and kept (``[B, P]`` floats); the scorer and each quadtree run take
    ``batch_size`` images at a time, so memory holds one chunk's activations and boxes ``[batch_size, N_max, 3]``.
    The result is the same for every ``batch_size`` (given a scorer that scores each image alike in any batch).
    Works on the CPU and on CUDA. Not for the hot path: each step of the search reads one triple of integers on the
    host (the sum, least and most of the sample's lengths), and a few reads more come before and after it (the
    finiteness of each chunk's scores, the candidate thresholds, the result).

    Args:
        scores: every form :func:`mixres.tokenize` takes, for ``images``: a pyramid (a list of maps ``[B, H/s, W/s]``
            coarse to fine, or a dict ``{s: map}``), a dense saliency map ``[B, h, w]`` (summed per patch), a
            :class:`mixres.PackedPyramid` ``[B, P]``, or a scorer (called on chunks of ``batch_size`` images).
        images: the sample, ``[B, C, H, W]``, B >= 1, on the scores' device: the images the scores are for (a
            scorer reads them; the other forms take their size, batch and device from them).
        mean_tokens: the target mean number of leaves per image, a real number from the roots' count
            ``(H / max_patch_size)(W / max_patch_size)`` to ``max_patches``.
        max_patches: N_max, the cap on each image's leaves (``roots + 3k``); default: one leaf per
            ``min_patch_size`` cell, ``(H / min_patch_size)(W / min_patch_size)``, where no cap binds before the
            threshold.
        min_patch_size, max_patch_size: as in :func:`mixres.tokenize` (default: the scorer's, else 16 and 64).
        level_weights: ``{patch size: w}``, one positive finite weight per splittable size (max_patch_size, ...,
            2 * min_patch_size): the threshold of leaves of size s is t * w[s], as APT sets one threshold per size
            with fixed ratios between them; default: t for every size.
        nan_policy: ``"raise"`` (default): NaN or Inf scores are a ValueError that names the first one (on every
            device: the calibration reads the scores anyway); ``"lowest"``: ranked as :func:`mixres.tokenize`
            ranks them.
        batch_size: images per chunk (a positive int).

    Returns:
        :class:`ThresholdCalibration`: the threshold t, the per-size ``thresholds`` to pass to tokenize, and the
        mean, least and most leaves per image that the sample gets at t.

    Raises:
        TypeError: images or scores of the wrong type or dtype; mean_tokens not a real number; max_patches,
            batch_size or a size not an int; level_weights not a dict of numbers.
        ValueError: an empty batch, a wrong shape or device (images and scores on different devices), sizes that do
            not fit, an unreachable max_patches, mean_tokens outside [roots, max_patches] (the error names the
            range) or not finite, level_weights whose keys are not the splittable sizes or whose weights are not
            positive and finite, NaN or Inf scores with nan_policy="raise", an unknown nan_policy.

    Example:
        >>> images = torch.rand(64, 3, 224, 224)  # a sample of the data set, 49 to 196 leaves of 16-32 px
        >>> calibration = mixres.calibrate_threshold(mixres.PixelBlur(16, 32), images, mean_tokens=100)
        >>> calibration.mean_tokens, calibration.min_tokens, calibration.max_tokens  # e.g. (100.0, 76, 130)
        >>> mosaic = mixres.tokenize(images, mixres.PixelBlur(16, 32), n_patches=calibration.max_patches,
        ...                          threshold=calibration.thresholds)
    """
    if isinstance(images, Tensor) and images.dim() == 4 and images.shape[0] == 0:
        raise ValueError("images is an empty batch (B=0): calibrate_threshold needs a sample of at least one image")
    check_images(images)
    min_patch_size, max_patch_size = scorer_patch_sizes(scores, min_patch_size, max_patch_size,
                                                        "calibrate_threshold")
    geometry = QuadtreeGeometry(images.shape[-2], images.shape[-1], min_patch_size, max_patch_size)
    max_patches = geometry.max_patches if max_patches is None else geometry.check_n_patches(max_patches,
                                                                                             name="max_patches")
    target = _check_mean_tokens(mean_tokens, geometry.n_roots, max_patches)
    weights = _check_level_weights(level_weights, geometry)
    batch_size = check_int("batch_size", batch_size, low=1)
    check_nan_policy(nan_policy)
    with torch.no_grad():  # the scores hold no autograd graph across the sample
        chunks = _packed_chunks(images, scores, geometry, nan_policy, batch_size)
        return _search(chunks, geometry, max_patches, target, weights)


def _check_mean_tokens(mean_tokens, n_roots: int, max_patches: int) -> float:
    if not is_number(mean_tokens):
        raise TypeError(f"mean_tokens must be a real number (leaves per image), got {type(mean_tokens).__name__} "
                        f"{mean_tokens!r}")
    value = float(mean_tokens)
    if not n_roots <= value <= max_patches:  # also refuses NaN
        raise ValueError(f"mean_tokens must be from {n_roots} (the roots alone, no split) to max_patches = "
                         f"{max_patches}, got {mean_tokens}")
    return value


def _check_level_weights(level_weights, geometry: QuadtreeGeometry) -> list[float]:
    """The weights as a list, one per splittable size coarse to fine (all 1 for None)."""
    sizes = geometry.splittable_sizes
    if level_weights is None:
        return [1.0] * len(sizes)
    if not isinstance(level_weights, Mapping):
        raise TypeError(f"level_weights must be a dict {{patch size: weight}} or None, got "
                        f"{type(level_weights).__name__}")
    check_per_size_keys("level_weights", level_weights, sizes, geometry.min_patch_size, what="weight")
    weights = []
    for size in sizes:
        weight = level_weights[size]
        if not is_number(weight):
            raise TypeError(f"level_weights[{size}] must be a number, got {type(weight).__name__} {weight!r}")
        if not (math.isfinite(weight) and weight > 0):
            # A zero or negative weight would make the token count grow with t, or not depend on it.
            raise ValueError(f"level_weights[{size}] must be positive and finite, got {weight}")
        weights.append(float(weight))
    return weights


def _packed_chunks(images: Tensor, scores, geometry: QuadtreeGeometry, nan_policy: str,
                   batch_size: int) -> list[Tensor]:
    """The sample's packed scores, ``[b, P]`` per chunk of at most ``batch_size`` images, in one dtype."""
    if is_scorer(scores):  # a scorer's activations are what chunks bound
        chunks = [packed_scores(images[start:start + batch_size], scores, geometry, nan_policy)
                  for start in range(0, images.shape[0], batch_size)]
    else:
        chunks = list(packed_scores(images, scores, geometry, nan_policy).split(batch_size))
    dtype = torch.float64 if any(chunk.dtype == torch.float64 for chunk in chunks) else torch.float32
    chunks = [chunk.to(dtype) for chunk in chunks]
    if nan_policy == "raise":
        _check_finite(chunks, geometry)
    return chunks


def _check_finite(chunks: list[Tensor], geometry: QuadtreeGeometry):
    """A ValueError naming the sample's first NaN or Inf score: its image, patch size and cell."""
    first_image = 0
    for packed in chunks:
        bad = ~torch.isfinite(packed)
        if bad.any():
            image, index = bad.nonzero()[0].tolist()
            value = packed[image, index].item()
            for size in geometry.splittable_sizes:
                rows, cols = geometry.grid(size)
                if index < rows * cols:
                    break
                index -= rows * cols
            raise ValueError(f"scores must be finite, but the score of image {first_image + image}'s {size} px patch "
                             f"at (row, column) = ({index // cols}, {index % cols}) is {value} (scorers that read "
                             f"pixels give NaN to patches that hold NaN or Inf pixels); pass nan_policy='lowest' to "
                             f"rank them lowest, as tokenize would")
        first_image += packed.shape[0]


def _ordered(bits: Tensor) -> Tensor:
    """Maps float64 bit patterns (viewed as int64) to int64 keys in the order of the numbers, and back: the map is
    its own inverse. Non-negative numbers keep their bits; a negative one (sign bit set, so a negative int64) gets
    its magnitude bits flipped, so that a larger magnitude gives a smaller key. -inf < finite < +inf, and no NaN
    lies between the keys of -inf and +inf."""
    return bits ^ ((bits >> 63) & _MAGNITUDE_BITS)


def _level_thresholds(t: Tensor, weights: Tensor, dtype: torch.dtype) -> Tensor:
    """The thresholds the quadtree compares with, for t (float64) and weights (float64), broadcast: t * w rounded
    to the scores' dtype and clamped to its finite range. Non-decreasing in t, so the token count is non-increasing;
    clamping changes no comparison with a finite score (each is within the range), and the op takes only finite
    thresholds."""
    extremes = torch.finfo(dtype)
    return (t * weights).to(dtype).clamp(extremes.min, extremes.max)


def _lowest_stopping_t(values: Tensor, weights: Tensor) -> Tensor:
    """For each score s ``[Q]`` (the scores' dtype) and the weight of its level ``[Q]`` (float64): the smallest
    float64 t at which the level's threshold reaches s, ``_level_thresholds(t, w) >= s``, by bisection over the
    float64 numbers in their order (:func:`_ordered`). Always finite: at t = +-inf the clamped threshold is the
    dtype's largest or lowest finite value, so the search returns at most the largest finite float64 and at least
    the lowest (where every t stops at s)."""
    low = _ordered(torch.full_like(weights, -math.inf).view(torch.int64))
    high = _ordered(torch.full_like(weights, math.inf).view(torch.int64))
    # Invariant: high stops, and low does not or is -inf (where the clamped threshold may stop, but t must be
    # finite). The keys span less than 2^64, so 64 halvings leave high = low + 1: the smallest key that stops.
    for _ in range(64):
        middle = (low >> 1) + (high >> 1) + (low & high & 1)  # floor((low + high) / 2), without overflow
        stops = _level_thresholds(_ordered(middle).view(torch.float64), weights, values.dtype) >= values
        stops &= middle != low  # middle is low once high = low + 1
        high = torch.where(stops, middle, high)
        low = torch.where(stops, low, middle)
    return _ordered(high).view(torch.float64)


def _candidates(chunks: list[Tensor], geometry: QuadtreeGeometry, weights: list[float]) -> tuple[Tensor, Tensor]:
    """``(starts [K], representatives [K])``, float64, on the scores' device: the finite thresholds t where the
    sample's token counts can change, sorted and distinct, so that each image's count is the same for every t in
    [starts[k], starts[k + 1]). ``representatives[k]`` is a t in that interval: a score divided by its level's
    weight where one lands there (always, without weights), else starts[k]."""
    device = chunks[0].device
    lengths = [rows * cols for rows, cols in map(geometry.grid, geometry.splittable_sizes)]
    levels = [torch.cat([chunk.split(lengths, dim=1)[level].flatten() for chunk in chunks]).unique()
              for level in range(len(lengths))]
    values = torch.cat(levels) if levels else chunks[0].new_empty(0)
    value_weights = torch.cat([torch.full(level.shape, weight, dtype=torch.float64, device=device)
                               for level, weight in zip(levels, weights)] +
                              [torch.zeros(0, dtype=torch.float64, device=device)])
    stopping_t = _lowest_stopping_t(values, value_weights)
    # A level whose threshold never reaches a score (t * w < s for every finite t) never stops there.
    reachable = stopping_t.isfinite()
    values, value_weights, stopping_t = values[reachable], value_weights[reachable], stopping_t[reachable]
    starts, group = torch.unique(stopping_t, sorted=True, return_inverse=True)
    ends = torch.cat([starts[1:], torch.full((1,), math.inf, dtype=torch.float64, device=device)])
    ratios = values.double() / value_weights
    fits = (ratios >= starts[group]) & (ratios < ends[group])
    nearest = torch.full_like(starts, math.inf).scatter_reduce(0, group, torch.where(fits, ratios, math.inf), "amin")
    return starts, torch.where(nearest.isinf(), starts, nearest)


def _search(chunks: list[Tensor], geometry: QuadtreeGeometry, max_patches: int, target: float,
            weights: list[float]) -> ThresholdCalibration:
    """The bisection of :func:`calibrate_threshold` over the candidate thresholds, in order: the token counts are
    non-increasing along them."""
    device, dtype = chunks[0].device, chunks[0].dtype
    starts, representatives = _candidates(chunks, geometry, weights)
    inf = torch.full((1,), math.inf, dtype=torch.float64, device=device)
    below = torch.nextafter(starts[:1], -inf)  # below every start, no level stops at any score
    if len(starts) == 0:  # no threshold changes a count: any t will do
        candidates, lows = torch.zeros(1, dtype=torch.float64, device=device), -inf
    elif below.isfinite().item():
        candidates, lows = torch.cat([below, representatives]), torch.cat([-inf, starts])
    else:  # the lowest start is the lowest finite float64, so its counts hold for every t below the next start
        candidates, lows = representatives, torch.cat([-inf, starts[1:]])
    bounds = torch.cat([lows, inf]).tolist()  # candidate i gives its counts to every t in [bounds[i], bounds[i+1])
    weight_tensor = torch.tensor(weights, dtype=torch.float64, device=device)
    n_images = sum(chunk.shape[0] for chunk in chunks)
    goal = Fraction(target) * n_images  # the target's total of leaves, exact
    counts: dict[int, tuple[int, int, int]] = {}

    def count(i: int) -> tuple[int, int, int]:
        """(total, least, most) leaves of the sample's images at candidate i: one host read for the whole sample."""
        if i not in counts:
            thresholds = _level_thresholds(candidates[i], weight_tensor, dtype)
            per_chunk = []
            for packed in chunks:
                _, lengths = ops.build_quadtree_adaptive(packed, geometry.height, geometry.width,
                                                         geometry.min_patch_size, geometry.max_patch_size,
                                                         max_patches, None, thresholds)
                lengths = lengths.long()
                per_chunk.append(torch.stack([lengths.sum(), lengths.min(), lengths.max()]))
            per_chunk = torch.stack(per_chunk)
            counts[i] = tuple(torch.stack([per_chunk[:, 0].sum(), per_chunk[:, 1].min(),
                                           per_chunk[:, 2].max()]).tolist())
        return counts[i]

    def first(condition, low: int, high: int) -> int:
        """The smallest i in [low, high) where ``condition(i)`` holds, high if none; it must hold from there on."""
        while low < high:
            middle = (low + high) // 2
            if condition(middle):
                high = middle
            else:
                low = middle + 1
        return low

    n = len(candidates)
    at_or_below = first(lambda i: count(i)[0] <= goal, 0, n)
    nearest = min((i for i in (at_or_below, at_or_below - 1) if 0 <= i < n),
                  key=lambda i: (abs(count(i)[0] - goal), count(i)[0]))  # ties: fewer tokens
    total = count(nearest)[0]
    if nearest == at_or_below:  # every candidate before it has more tokens than the target, so more than it
        lowest, highest = nearest, first(lambda i: count(i)[0] < total, nearest, n) - 1
    else:  # every candidate after it has at most the target, so fewer tokens than it
        lowest, highest = first(lambda i: count(i)[0] <= total, 0, nearest), nearest
    chosen = (lowest + highest) // 2
    total, least, most = count(chosen)
    thresholds = _level_thresholds(candidates[chosen], weight_tensor, dtype).tolist()
    return ThresholdCalibration(
        threshold=candidates[chosen].item(),
        thresholds=dict(zip(geometry.splittable_sizes, thresholds, strict=True)),
        mean_tokens=total / n_images,
        min_tokens=least,
        max_tokens=most,
        threshold_range=(bounds[lowest], bounds[highest + 1]),
        target=target,
        max_patches=max_patches,
    )
