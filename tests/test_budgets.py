"""mixres.calibrate_threshold (issue 15, item 5): the threshold whose mean token count on a sample is a target.

The oracle of the token counts at a threshold is DESIGN.md's greedy without a threshold (oracles.greedy_order) and
the prefix property: an image stops before the first split whose leaf scores at or below the threshold of its size.
The thresholds a t gives are t * w rounded to the scores' dtype by NumPy. Brute force over every score value gives
every mean a sample can reach (exactly so for weights that are powers of two, where t * w and its rounding commute).
"""
import inspect
import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import mixres
from mixres.pyramid import QuadtreeGeometry

import oracles
from helpers import random_pyramid, small_geometries


def rounded(value: float, dtype: torch.dtype) -> float:
    """``value`` as the scores' dtype holds it (to nearest), clamped to its finite range, as calibrate_threshold
    documents its thresholds."""
    numpy_dtype = np.float32 if dtype == torch.float32 else np.float64
    with np.errstate(over="ignore"):
        value = numpy_dtype(value)
    return float(np.clip(value, np.finfo(numpy_dtype).min, np.finfo(numpy_dtype).max))


def lengths_at(orders, n_roots: int, thresholds: dict) -> list[int]:
    """Each image's leaves under ``thresholds {size: value}``, from its greedy order (see the module's docstring)."""
    lengths = []
    for picks in orders:
        stop = next((k for k, (score, size) in enumerate(picks) if score <= thresholds[size]), len(picks))
        lengths.append(n_roots + 3 * stop)
    return lengths


def thresholds_of(t: float, weights: dict, dtype: torch.dtype) -> dict:
    return {size: rounded(t * weight, dtype) for size, weight in weights.items()}


def achievable_totals(orders, n_roots: int, weights: dict, dtype: torch.dtype) -> set[int]:
    """Every total of leaves over the sample that some threshold gives, for weights that are powers of two and
    scores that are not 0 (nor tiny) where they differ: the counts change only where t * w[size] crosses a picked
    leaf's score, so t = score / w (exact) for every pick, and a t below them all (no image stops) unless a score
    is the dtype's lowest value, give them all. (Near 0, t * w underflows at different t for different w: with
    weights 0.25 and 0.5, t = -2^-148 gives float32 thresholds -0.0 and -2^-149, so only the first stops at 0.)"""
    lowest = float(np.finfo(np.float32 if dtype == torch.float32 else np.float64).min)
    scores = [score for picks in orders for score, _ in picks]
    totals = {sum(n_roots + 3 * len(picks) for picks in orders)} if min(scores, default=0) > lowest else set()
    for ratio in {score / weights[size] for picks in orders for score, size in picks}:
        totals.add(sum(lengths_at(orders, n_roots, {size: ratio * w for size, w in weights.items()})))
    return totals


def nearest(totals, target: float, batch: int) -> int:
    """The total whose mean is nearest the target; of two as near, the smaller."""
    return min(totals, key=lambda total: (abs(total - Fraction(target) * batch), total))


def blank_images(geometry: QuadtreeGeometry, batch: int, device="cpu") -> torch.Tensor:
    return torch.zeros(batch, 1, geometry.height, geometry.width, device=device)


def sizes_of(geometry: QuadtreeGeometry) -> tuple[int, int]:
    return geometry.min_patch_size, geometry.max_patch_size


def check_calibration(result, pyramid, geometry: QuadtreeGeometry, target: float, weights, max_patches,
                      exact_weights: bool):
    """The result against the oracle: its thresholds, counts, range and (for exact weights) nearness."""
    batch = pyramid[0].shape[0] if pyramid else 1
    dtype = pyramid[0].dtype if pyramid else torch.float32
    cap = geometry.max_patches if max_patches is None else max_patches
    weights = {size: 1.0 for size in geometry.splittable_sizes} if weights is None else weights
    orders = oracles.greedy_order(pyramid, geometry.height, geometry.width, *sizes_of(geometry),
                                  (cap - geometry.n_roots) // 3, batch)
    roots = geometry.n_roots
    assert result.max_patches == cap and result.target == target
    assert result.thresholds == thresholds_of(result.threshold, weights, dtype)
    lengths = lengths_at(orders, roots, result.thresholds)
    total = sum(lengths)
    assert (result.mean_tokens, result.min_tokens, result.max_tokens) == (total / batch, min(lengths), max(lengths))

    # Every t in the range gives that total, and the t just outside give others.
    def total_at(t):
        return sum(lengths_at(orders, roots, thresholds_of(t, weights, dtype)))

    low, high = result.threshold_range
    assert low <= result.threshold < high
    if math.isfinite(low):
        assert total_at(low) == total and total_at(math.nextafter(low, -math.inf)) > total
    if math.isfinite(high):
        assert total_at(high) < total and total_at(math.nextafter(high, -math.inf)) == total
    if exact_weights:
        assert total == nearest(achievable_totals(orders, roots, weights, dtype), target, batch)
    if set(weights.values()) == {1.0}:
        # t is the middle, by rank, of the score values in the range, with "below them all" first when the range
        # is open below and a threshold can be below them all (none is the dtype's lowest value).
        scores = {value for m in pyramid for value in m.flatten().tolist()}
        values = sorted(value for value in scores if low <= value < high)
        below_all = low == -math.inf and min(scores, default=0) > rounded(-math.inf, dtype)
        middle = ([-math.inf] if below_all else []) + values
        middle = middle[(len(middle) - 1) // 2]
        assert result.threshold == middle or (middle == -math.inf and result.threshold < min(values, default=high))
    return total


# ------------------------------------------------------------------------------------------------------ properties
POWERS_OF_TWO = st.sampled_from([0.25, 0.5, 1.0, 2.0, 4.0])


@st.composite
def samples(draw):
    geometry = draw(small_geometries())
    valid = geometry.valid_n_patches()
    max_patches = draw(st.one_of(st.none(), st.sampled_from(valid)))
    cap = geometry.max_patches if max_patches is None else max_patches
    batch = draw(st.integers(1, 4))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    pyramid = random_pyramid(geometry, batch, draw(st.integers(0, 2 ** 31)), ties=draw(st.booleans()), dtype=dtype)
    kind = draw(st.sampled_from(["none", "powers of two", "any"]))
    weight = POWERS_OF_TWO if kind == "powers of two" else st.floats(0.01, 100)
    weights = None if kind == "none" else {size: draw(weight) for size in geometry.splittable_sizes}
    if kind == "powers of two":  # no score of 0, for achievable_totals (ties from {1, 2, 3})
        pyramid = [m + 1 for m in pyramid]
    target = draw(st.floats(geometry.n_roots, cap))
    return geometry, max_patches, pyramid, weights, target, kind != "any"


@settings(max_examples=150, deadline=None)
@given(samples())
def test_the_mean_is_the_achievable_one_nearest_the_target(sample):
    geometry, max_patches, pyramid, weights, target, exact_weights = sample
    batch = pyramid[0].shape[0] if pyramid else 1
    result = mixres.calibrate_threshold(pyramid, blank_images(geometry, batch), target, max_patches,
                                        *sizes_of(geometry), level_weights=weights)
    check_calibration(result, pyramid, geometry, target, weights, max_patches, exact_weights)


@settings(max_examples=30, deadline=None)
@given(samples(), st.integers(1, 5))
def test_results_do_not_depend_on_the_chunks(sample, batch_size):
    geometry, max_patches, pyramid, weights, target, _ = sample
    batch = pyramid[0].shape[0] if pyramid else 1
    args = (pyramid, blank_images(geometry, batch), target, max_patches, *sizes_of(geometry))
    whole = mixres.calibrate_threshold(*args, level_weights=weights, batch_size=batch)
    assert mixres.calibrate_threshold(*args, level_weights=weights, batch_size=batch_size) == whole


def test_more_tokens_asked_for_never_give_a_higher_threshold_or_fewer_tokens():
    geometry = QuadtreeGeometry(128, 192, 16, 64)
    for ties, weights in ((False, None), (True, None), (False, {64: 0.5, 32: 3.0})):
        pyramid = random_pyramid(geometry, 6, seed=4, ties=ties)
        images = blank_images(geometry, 6)
        results = [mixres.calibrate_threshold(pyramid, images, target, level_weights=weights)
                   for target in np.linspace(geometry.n_roots, geometry.max_patches, 25)]
        means = [result.mean_tokens for result in results]
        thresholds = [result.threshold for result in results]
        assert means == sorted(means) and thresholds == sorted(thresholds, reverse=True)
        assert means[0] == geometry.n_roots and means[-1] == geometry.max_patches
        assert len(set(means)) > (3 if ties else 10)  # the targets do not all land on a few steps


def test_the_oracle_of_counts_is_the_greedy_with_a_threshold():
    """lengths_at (the greedy order and the prefix property) against oracles.greedy_leaves' own stopping rule."""
    geometry = QuadtreeGeometry(128, 192, 8, 64)
    pyramid = random_pyramid(geometry, 3, seed=9, ties=True)
    n_splits = (geometry.max_patches - geometry.n_roots) // 3
    orders = oracles.greedy_order(pyramid, 128, 192, 8, 64, n_splits)
    for thresholds in ([0.0, 1.0, 2.0], [1.0, 0.0, 1.0], [2.0, 2.0, 2.0], [-1.0, -1.0, -1.0], [1.0, 2.0, 0.0]):
        expected = oracles.quadtree_adaptive(pyramid, 128, 192, 8, 64, geometry.max_patches,
                                             thresholds=thresholds)[1].tolist()
        assert lengths_at(orders, geometry.n_roots, dict(zip([64, 32, 16], thresholds))) == expected


# ----------------------------------------------------------------------------------------------- hand-computed
def hand_pyramid(dtype=torch.float32):
    """test_quadtree_adaptive.test_hand_computed_stops' tree, 128 x 128 with 16-64 px leaves: the greedy splits
    root (0, 64) (score 5), its quadrant (32, 96) (4), root (64, 0) (3), then leaves that score 1, 0 and -1."""
    level64 = torch.tensor([[[0.0, 5.0], [3.0, 1.0]]], dtype=dtype)
    level32 = torch.zeros(1, 4, 4, dtype=dtype)
    level32[0, 1, 3] = 4.0
    level32[0, 0, 2] = -1.0
    return QuadtreeGeometry(128, 128, 16, 64), [level64, level32]


def starts_at(bound: float, score: float, dtype: torch.dtype) -> bool:
    """Whether ``bound`` is the smallest float64 that the dtype rounds to ``score`` (or above): ``score`` itself in
    float64; in float32, the midpoint below it, which rounds to it (ties to even)."""
    return rounded(bound, dtype) == score and rounded(math.nextafter(bound, -math.inf), dtype) < score


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("target, mean, low, high", [
    (7, 7, 4.0, 5.0),  # at t in [4, 5) the split of (32, 96), scoring 4, is the first at or below t
    (8.5, 7, 4.0, 5.0),  # 7 and 10 are as near: fewer tokens
    (8.6, 10, 3.0, 4.0),
    (4, 4, 5.0, math.inf),  # the roots alone from the highest score on
    # Every split for t below 0, the lowest score the 8 splits reach (-1 is never reached); t is the middle of the
    # candidates: just below -1, or -1 itself.
    (28, 28, -math.inf, 0.0),
])
def test_hand_computed_calibrations(target, mean, low, high, dtype):
    geometry, pyramid = hand_pyramid(dtype)
    result = mixres.calibrate_threshold(pyramid, blank_images(geometry, 1), target, max_patches=28)
    assert result.mean_tokens == mean and result.min_tokens == result.max_tokens == mean
    for bound, score in zip(result.threshold_range, (low, high)):
        assert bound == score if not math.isfinite(score) or dtype == torch.float64 else starts_at(bound, score, dtype)
    if math.isfinite(low):
        assert result.threshold == low  # the one score value in the range: itself
    else:  # the first of the two: just below -1 in the dtype
        below = np.nextafter(-1.0, -math.inf, dtype=np.float32 if dtype == torch.float32 else np.float64)
        assert rounded(result.threshold, dtype) == below
    check_calibration(result, pyramid, geometry, target, None, 28, True)


def test_equal_scores_reach_the_roots_or_every_leaf_only():
    """Uniform: every score is equal, so an image either stops at once (t at or above it) or never."""
    images = torch.rand(3, 3, 128, 128)
    scorer = mixres.Uniform(16, 64)
    for target, mean in ((4, 4), (33, 4), (34, 4), (35, 64), (64, 64)):  # 34 is halfway: fewer tokens
        result = mixres.calibrate_threshold(scorer, images, target)
        assert result.mean_tokens == result.min_tokens == result.max_tokens == mean


def test_level_weights_scale_the_threshold_of_each_size():
    geometry, pyramid = hand_pyramid(torch.float64)
    images = blank_images(geometry, 1)
    # With the 32 px threshold 4 t: the split of (32, 96) (score 4) stops for t >= 1, and root (0, 64) (score 5)
    # splits for t < 5, so 7 leaves for every t in [1, 5) (in [4, 5) without weights).
    result = mixres.calibrate_threshold(pyramid, images, 7, max_patches=28, level_weights={64: 1, 32: 4})
    assert result.mean_tokens == 7 and result.threshold_range == (1.0, 5.0)
    assert result.threshold == 1.0 and result.thresholds == {64: 1.0, 32: 4.0}  # the middle of t = 1 and 3
    check_calibration(result, pyramid, geometry, 7, {64: 1.0, 32: 4.0}, 28, True)


def test_a_score_over_its_weight_past_its_own_interval():
    """s / w can lie above the smallest t whose t * w reaches s, and be where another level's step starts: the
    threshold must stay inside the interval it stands for. float64: s = 1 + 2^-12 at weight 0.75, where
    (s / 0.75) * 0.75 >= s already one float64 below s / 0.75; the other level's score is s / 0.75 itself."""
    score = 1 + 2 ** -12
    ratio = score / 0.75
    assert math.nextafter(ratio, -math.inf) * 0.75 >= score  # the premise
    geometry = QuadtreeGeometry(64, 128, 16, 64)
    # Root (0, 64) (100) splits first, then root (0, 0) (ratio, weight 1), then (0, 64)'s quadrant at (0, 64)
    # (score, weight 0.75): 11 leaves for t below the quadrant's step, 8 from there up to ratio, 5 up to 100.
    level64 = torch.tensor([[[ratio, 100.0]]], dtype=torch.float64)
    level32 = torch.full((1, 2, 4), -100.0, dtype=torch.float64)
    level32[0, 0, 2] = score
    weights = {64: 1.0, 32: 0.75}
    result = mixres.calibrate_threshold([level64, level32], blank_images(geometry, 1), 8, max_patches=11,
                                        level_weights=weights)
    low, high = result.threshold_range
    assert result.mean_tokens == 8 and high == ratio and low < ratio
    assert low * 0.75 >= score and math.nextafter(low, -math.inf) * 0.75 < score
    check_calibration(result, [level64, level32], geometry, 8, weights, 11, False)


def test_steps_that_underflow_makes_near_zero():
    """Scores of 0 at weights 0.25 and 0.5 (float32): for t just below 0, t * 0.25 rounds to -0.0, which stops at
    0, while t * 0.5 is still below 0. So a step lies between -2^-148 and 0 that no t = score / w shows: here
    the only mean as near 17 as 17.5 (hypothesis found it)."""
    geometry = QuadtreeGeometry(32, 32, 4, 32)
    pyramid = [torch.tensor([[[2.0]], [[0.0]]]),
               torch.tensor([[[2.0, 0.0], [1.0, 0.0]], [[1.0, 1.0], [1.0, 0.0]]]),
               torch.tensor([[[2.0, 2.0, 0.0, 0.0], [1.0, 2.0, 0.0, 0.0], [2.0, 0.0, 2.0, 2.0], [2.0, 2.0, 2.0, 2.0]],
                             [[1.0, 2.0, 0.0, 0.0], [1.0, 0.0, 2.0, 0.0], [1.0, 0.0, 1.0, 2.0], [2.0, 1.0, 2.0, 0.0]]])]
    weights = {32: 0.25, 16: 0.5, 8: 0.25}
    result = mixres.calibrate_threshold(pyramid, blank_images(geometry, 2), 17, None, 4, 32, level_weights=weights)
    assert result.mean_tokens == 17.5 and -2 ** -148 <= result.threshold < 0
    assert result.thresholds[32] == result.thresholds[8] == 0.0 and result.thresholds[16] < 0
    check_calibration(result, pyramid, geometry, 17, weights, None, False)


def test_the_range_is_exact_where_t_times_w_rounds():
    """Weights that are not powers of two, in float32: the range's ends are where the rounded t * w crosses a
    score, and a Python float t * w gives tokenize's thresholds."""
    geometry = QuadtreeGeometry(64, 128, 8, 32)
    for seed in range(8):
        pyramid = random_pyramid(geometry, 3, seed=seed)
        weights = {32: 0.1, 16: 3.0}
        for target in (10, 20, 30, 40):
            result = mixres.calibrate_threshold(pyramid, blank_images(geometry, 3), target, None, 8, 32,
                                                level_weights=weights)
            check_calibration(result, pyramid, geometry, target, weights, None, False)


def test_thresholds_past_the_dtypes_range_are_clamped():
    """t * w past float32's range for one level while t steps through another's scores: the thresholds passed to
    the quadtree (and returned) are float32's largest value there, not inf, which the op would refuse."""
    geometry = QuadtreeGeometry(128, 128, 16, 64)
    pyramid = random_pyramid(geometry, 3, seed=1)
    pyramid[1] = pyramid[1] * 1e10
    weights = {64: 1e30, 32: 1.0}
    for target in (4, 7, 30, 60):
        result = mixres.calibrate_threshold(pyramid, blank_images(geometry, 3), target, level_weights=weights)
        assert all(map(math.isfinite, result.thresholds.values()))
        check_calibration(result, pyramid, geometry, target, weights, None, False)
    result = mixres.calibrate_threshold(pyramid, blank_images(geometry, 3), 4, level_weights=weights)
    assert result.thresholds[64] == float(np.finfo(np.float32).max)


def test_a_score_no_finite_t_reaches_never_stops():
    """float64, nan_policy="lowest": the root's +inf becomes the largest float64, which t * 0.5 never reaches, so
    the root always splits; its quadrants (score 0) stop for t >= 0: 4 leaves at least, even for a target of 1."""
    geometry = QuadtreeGeometry(64, 64, 16, 64)
    pyramid = [torch.tensor([[[math.inf]]], dtype=torch.float64), torch.zeros(1, 2, 2, dtype=torch.float64)]
    weights = {64: 0.5, 32: 1.0}
    for target, mean in ((1, 4), (4, 4), (10, 4), (10.1, 16), (16, 16)):
        result = mixres.calibrate_threshold(pyramid, blank_images(geometry, 1), target, nan_policy="lowest",
                                            level_weights=weights)
        assert result.mean_tokens == mean and math.isfinite(result.threshold)
        ranked = [pyramid[0].nan_to_num(posinf=torch.finfo(torch.float64).max), pyramid[1]]
        check_calibration(result, ranked, geometry, target, weights, None, False)


# ---------------------------------------------------------------------------------------------- every scores form
def test_every_scores_form_gives_the_same_calibration():
    geometry = QuadtreeGeometry(128, 192, 16, 64)
    images = torch.rand(5, 3, 128, 192, generator=torch.Generator().manual_seed(0))
    scorer = mixres.PixelBlur(16, 64)
    pyramid = scorer(images)
    packed = oracles.pack(pyramid, 5)
    expected = mixres.calibrate_threshold(pyramid, images, 40)
    check_calibration(expected, pyramid, geometry, 40, None, None, True)
    forms = {
        "dict": dict(zip(geometry.splittable_sizes, pyramid)),
        "tuple": tuple(pyramid),
        "packed": mixres.PackedPyramid(packed, geometry),
        "Scorer": scorer,  # its sizes from itself
        "callable": lambda chunk: scorer(chunk),
        "float64 maps": [m.double() for m in pyramid],  # float32 values: the same comparisons in float64
    }
    for name, scores in forms.items():
        sizes = {} if name == "Scorer" else {"min_patch_size": 16, "max_patch_size": 64}
        result = mixres.calibrate_threshold(scores, images, 40, batch_size=2, **sizes)
        assert (result.threshold, result.mean_tokens, result.min_tokens, result.max_tokens) == (
            expected.threshold, expected.mean_tokens, expected.min_tokens, expected.max_tokens), name
        assert result.threshold_range[0] <= expected.threshold < result.threshold_range[1], name


def test_a_dense_saliency_map_is_summed_per_patch():
    # Integers on the 16 px grid: every patch's sum is exact, so the oracle's pyramid is mixres's.
    geometry = QuadtreeGeometry(128, 192, 16, 64)
    saliency = torch.randint(0, 50, (4, 8, 12), generator=torch.Generator().manual_seed(1)).float()
    pyramid = oracles.saliency_pyramid(saliency, 128, 192, 16, 64)
    images = blank_images(geometry, 4)
    for target in (6, 30.5, 61, 96):
        result = mixres.calibrate_threshold(saliency, images, target)
        check_calibration(result, pyramid, geometry, target, None, None, True)


def test_nan_scores_ranked_lowest():
    geometry = QuadtreeGeometry(128, 128, 16, 64)
    pyramid = random_pyramid(geometry, 2, seed=3)
    pyramid[1][1, 2, 3] = math.nan
    pyramid[0][0, 0, 1] = math.inf
    finfo = torch.finfo(torch.float32)
    ranked = [m.nan_to_num(nan=finfo.min, posinf=finfo.max, neginf=finfo.min) for m in pyramid]
    # The NaN, ranked float32's lowest value, stops at every finite t (the lowest threshold is that value): image 1
    # never gets all 64 leaves, and the largest mean is 62.5.
    for target, mean in ((30, None), (64, 62.5)):
        result = mixres.calibrate_threshold(pyramid, blank_images(geometry, 2), target, nan_policy="lowest")
        assert math.isfinite(result.threshold) and result.mean_tokens == (mean or result.mean_tokens)
        check_calibration(result, ranked, geometry, target, None, None, True)


@pytest.mark.skipif("threshold" not in inspect.signature(mixres.tokenize).parameters,
                    reason="needs tokenize(threshold=...), the adaptive tokenize (issue 15, items 1-2)")
@pytest.mark.parametrize("weights", [None, {64: 0.5, 32: 1.5}], ids=["one threshold", "weights"])
def test_tokenize_at_the_thresholds_gives_the_calibrated_counts(weights):
    images = torch.rand(9, 3, 128, 192, generator=torch.Generator().manual_seed(5))
    scorer = mixres.PixelBlur(16, 64)
    result = mixres.calibrate_threshold(scorer, images, 41.5, level_weights=weights, batch_size=4)
    forms = [result.thresholds] + ([result.threshold] if weights is None else [])
    for threshold in forms:
        lengths = mixres.tokenize(images, scorer, n_patches=result.max_patches, threshold=threshold).lengths
        assert (lengths.double().mean().item(), lengths.min().item(), lengths.max().item()) == (
            result.mean_tokens, result.min_tokens, result.max_tokens)


# ------------------------------------------------------------------------------------------------------- bad input
GEOMETRY = QuadtreeGeometry(128, 192, 16, 64)  # 6 roots, 96 leaves at most


def bad_call(scores=None, images=None, **kwargs):
    images = blank_images(GEOMETRY, 2) if images is None else images
    scores = random_pyramid(GEOMETRY, 2) if scores is None else scores
    kwargs = {"mean_tokens": 30, **kwargs}
    return lambda: mixres.calibrate_threshold(scores, images, **kwargs)


def nan_pyramid():
    pyramid = random_pyramid(GEOMETRY, 2)
    pyramid[1][1, 2, 5] = math.nan
    return pyramid


BAD_INPUTS = [
    ("target below the roots", bad_call(mean_tokens=5.9), ValueError,
     r"mean_tokens must be from 6 \(the roots alone, no split\) to max_patches = 96, got 5.9"),
    ("target above max_patches", bad_call(mean_tokens=40, max_patches=30), ValueError,
     r"mean_tokens must be from 6 .* to max_patches = 30, got 40"),
    ("target nan", bad_call(mean_tokens=math.nan), ValueError, r"mean_tokens must be from 6 .*got nan"),
    ("target inf", bad_call(mean_tokens=math.inf), ValueError, r"mean_tokens must be from 6 .*got inf"),
    ("target str", bad_call(mean_tokens="30"), TypeError, r"mean_tokens must be a real number .*str '30'"),
    ("target bool", bad_call(mean_tokens=True), TypeError, r"mean_tokens must be a real number"),
    ("target tensor", bad_call(mean_tokens=torch.tensor(30.0)), TypeError, r"mean_tokens must be a real number"),
    ("max_patches unreachable", bad_call(max_patches=31), ValueError, r"max_patches=31 is unreachable.*30 or 33"),
    ("max_patches float", bad_call(max_patches=30.0), TypeError, r"max_patches must be an int"),
    ("nan score", bad_call(scores=nan_pyramid()), ValueError,
     r"scores must be finite, but the score of image 1's 32 px patch at \(row, column\) = \(2, 5\) is nan.*"
     r"nan_policy='lowest'"),
    ("unknown nan_policy", bad_call(nan_policy="ignore"), ValueError, r"nan_policy must be one of 'raise', 'lowest'"),
    ("weights keys", bad_call(level_weights={64: 1.0}), ValueError,
     r"level_weights must have one weight per splittable patch size, keys \[64, 32\].*got keys \[64\]"),
    ("weights with s_min", bad_call(level_weights={64: 1.0, 32: 1.0, 16: 1.0}), ValueError,
     r"the smallest size, 16, is never split"),
    ("weight zero", bad_call(level_weights={64: 1.0, 32: 0.0}), ValueError,
     r"level_weights\[32\] must be positive and finite, got 0.0"),
    ("weight negative", bad_call(level_weights={64: -1.0, 32: 1.0}), ValueError, r"level_weights\[64\] must be pos"),
    ("weight inf", bad_call(level_weights={64: math.inf, 32: 1.0}), ValueError, r"level_weights\[64\] must be pos"),
    ("weight nan", bad_call(level_weights={64: math.nan, 32: 1.0}), ValueError, r"level_weights\[64\] must be pos"),
    ("weight str", bad_call(level_weights={64: "1", 32: 1.0}), TypeError, r"level_weights\[64\] must be a number"),
    ("weights list", bad_call(level_weights=[1.0, 1.0]), TypeError, r"level_weights must be a dict"),
    ("weights str keys", bad_call(level_weights={"64": 1.0, "32": 1.0}), ValueError,
     r"level_weights must have one weight per splittable patch size, keys \[64, 32\].*got keys \['64', '32'\]"),
    ("batch_size zero", bad_call(batch_size=0), ValueError, r"batch_size must be a positive int, got 0"),
    ("batch_size float", bad_call(batch_size=2.0), TypeError, r"batch_size must be a positive int"),
    ("empty batch", bad_call(images=blank_images(GEOMETRY, 0), scores=random_pyramid(GEOMETRY, 0)), ValueError,
     r"images is an empty batch \(B=0\): calibrate_threshold needs a sample of at least one image"),
    ("images not a tensor", bad_call(images=[[0.0]]), TypeError, r"images must be a Tensor"),
    ("images uint8", bad_call(images=torch.zeros(2, 3, 128, 192, dtype=torch.uint8)), TypeError,
     r"images must be float16, bfloat16, float32 or float64"),
    ("scores on another device", bad_call(scores=[m.to("meta") for m in random_pyramid(GEOMETRY, 2)]), ValueError,
     r"scores map of patch size 64 is on meta but images are on cpu"),
    ("dense map on another device", bad_call(scores=torch.rand(2, 8, 12, device="meta")), ValueError,
     r"scores is on meta but images are on cpu"),
    ("scores batch", bad_call(scores=random_pyramid(GEOMETRY, 3)), ValueError, r"must have shape \[B, H/s, W/s\]"),
    ("scores a string", bad_call(scores="pixel-blur"), TypeError, r"scores must be a dense saliency map"),
    ("scores int maps", bad_call(scores=[torch.zeros(2, 2, 3, dtype=torch.long), torch.zeros(2, 4, 6)]), TypeError,
     r"must be floating point"),
    ("scorer sizes", bad_call(scores=mixres.PixelBlur(16, 32), max_patch_size=64), ValueError,
     r"max_patch_size=64 but the scorer .* leave max_patch_size out of calibrate_threshold"),
    ("image size", bad_call(images=torch.zeros(2, 3, 100, 192)), ValueError, r"image height 100 is not a multiple"),
]


@pytest.mark.parametrize("what, call, error, pattern", BAD_INPUTS, ids=[case[0] for case in BAD_INPUTS])
def test_bad_input_gets_a_clear_error(what, call, error, pattern):
    with pytest.raises(error, match=pattern):
        call()


def test_non_finite_pixels_are_named_by_their_scores():
    images = torch.rand(3, 3, 128, 128)
    images[2, 1, 70, 5] = math.inf  # PixelBlur gives NaN to every patch that holds it: the first is root (1, 0)
    with pytest.raises(ValueError, match=r"image 2's 64 px patch at \(row, column\) = \(1, 0\) is nan"):
        mixres.calibrate_threshold(mixres.PixelBlur(16, 64), images, 20, batch_size=2)


# ------------------------------------------------------------------------------------------------------------ CUDA
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_gives_the_cpu_calibration():
    geometry = QuadtreeGeometry(256, 256, 16, 64)
    for ties, weights in ((False, None), (True, None), (False, {64: 0.3, 32: 2.5})):
        pyramid = random_pyramid(geometry, 40, seed=2, ties=ties)
        cpu = mixres.calibrate_threshold(pyramid, blank_images(geometry, 40), 70.5, level_weights=weights)
        cuda = mixres.calibrate_threshold([m.cuda() for m in pyramid], blank_images(geometry, 40, "cuda"), 70.5,
                                          level_weights=weights, batch_size=16)
        assert cuda == cpu


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_nan_scores_raise_instead_of_a_device_assert():
    pyramid = [m.cuda() for m in nan_pyramid()]
    with pytest.raises(ValueError, match=r"image 1's 32 px patch at \(row, column\) = \(2, 5\) is nan"):
        mixres.calibrate_threshold(pyramid, blank_images(GEOMETRY, 2, "cuda"), 30)
    torch.cuda.synchronize()  # the context is still usable: no device-side assert was tripped
