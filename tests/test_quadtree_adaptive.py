"""build_quadtree_adaptive (the quadtree with per-image budgets and a stopping threshold): the C++ op, the reference and
the mixres.ops wrapper against the independent oracle (oracles.quadtree_adaptive), hand-computed trees, the prefix
property against build_quadtree, and bad input."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import mixres
from mixres import reference
from mixres.pyramid import QuadtreeGeometry

import oracles
from helpers import coverage, random_pyramid, small_geometries

OP = "mixres.build_quadtree_adaptive"
IMPLS = {"cpp": torch.ops.mixres.build_quadtree_adaptive, "reference": reference.build_quadtree_adaptive,
         "wrapper": mixres.ops.build_quadtree_adaptive}
# (height, width, min_patch_size, max_patch_size): square, non-square, one level, four levels, a single size.
GEOMETRIES = [(256, 256, 16, 64), (224, 224, 16, 32), (128, 320, 16, 64), (64, 64, 8, 64), (96, 64, 32, 32)]


def geometry_args(geometry: QuadtreeGeometry) -> tuple[int, int, int, int]:
    return geometry.height, geometry.width, geometry.min_patch_size, geometry.max_patch_size


def random_budgets(geometry: QuadtreeGeometry, batch: int, max_patches: int, seed: int) -> torch.Tensor:
    """A reachable budget per image, at most max_patches, int64."""
    n_budgets = (max_patches - geometry.n_roots) // 3 + 1
    k = torch.randint(0, n_budgets, (batch,), generator=torch.Generator().manual_seed(seed))
    return geometry.n_roots + 3 * k


def run_all(pyramid, geometry: QuadtreeGeometry, max_patches: int, budgets=None, thresholds=None, batch=None):
    """The C++ op's (boxes, lengths), after checking that they, the reference's and the wrapper's equal the oracle's.
    The ops take the pyramid packed by the oracle, so that mixres's own packing is not on both sides."""
    batch = pyramid[0].shape[0] if batch is None else batch
    packed = oracles.pack(pyramid, batch)
    args = (*geometry_args(geometry), max_patches)
    expected = oracles.quadtree_adaptive(pyramid, *args, budgets=budgets, thresholds=thresholds, batch=batch)
    results = {name: impl(packed, *args, budgets, thresholds) for name, impl in IMPLS.items()}
    for name, (boxes, lengths) in results.items():
        assert boxes.dtype == torch.int32 and boxes.shape == (batch, max_patches, 3), name
        assert lengths.dtype == torch.int32 and lengths.shape == (batch,), name
        assert torch.equal(lengths, expected[1]), name
        assert torch.equal(boxes, expected[0]), name
    return results["cpp"]


def level_thresholds(pyramid, quantile: float) -> torch.Tensor:
    """One threshold per level: the level's ``quantile`` over the batch, so that some images stop early and others
    do not; in the scores' dtype."""
    return torch.stack([m.flatten().double().quantile(quantile).to(m.dtype) for m in pyramid])


# ------------------------------------------------------------------------------------------------ against the oracle
@pytest.mark.parametrize("ties", [False, True], ids=["random", "ties"])
@pytest.mark.parametrize("shape", GEOMETRIES, ids=lambda g: "x".join(map(str, g)))
def test_cpp_reference_and_wrapper_match_the_oracle(shape, ties):
    geometry = QuadtreeGeometry(*shape)
    valid = geometry.valid_n_patches()
    batch = 5
    for seed, max_patches in enumerate(sorted({valid[len(valid) // 2], valid[-1]})):
        pyramid = random_pyramid(geometry, batch, seed=seed, ties=ties)
        budgets = random_budgets(geometry, batch, max_patches, seed)
        thresholds = level_thresholds(pyramid, 0.7) if pyramid else torch.zeros(0)
        one_threshold = thresholds[:1].expand(len(pyramid)).contiguous() if pyramid else thresholds
        for kwargs in ({}, {"budgets": budgets}, {"thresholds": thresholds}, {"thresholds": one_threshold},
                       {"budgets": budgets.int(), "thresholds": thresholds}):
            run_all(pyramid, geometry, max_patches, batch=batch, **kwargs)


def test_float64_scores_and_thresholds_are_compared_in_float64():
    geometry = QuadtreeGeometry(128, 128, 32, 64)
    # Root (0, 64) scores just above the threshold, beyond what float32 resolves: it alone is split.
    level0 = torch.tensor([[[1.0, 1.0 + 1e-12], [0.0, 0.0]]], dtype=torch.float64)
    boxes, lengths = run_all([level0], geometry, 13, thresholds=torch.tensor([1.0], dtype=torch.float64))
    assert lengths.tolist() == [7] and boxes[0, :7, 2].tolist().count(32) == 4


def test_hand_computed_stops():
    # 128 x 128, sizes 16..64 (test_quadtree.test_hand_computed_tree): the greedy splits root (0, 64) (score 5),
    # then its quadrant (32, 96) (4), then root (64, 0) (3), then (0, 0) and (64, 64)'s quadrants...
    geometry = QuadtreeGeometry(128, 128, 16, 64)
    level64 = torch.tensor([[[0.0, 5.0], [3.0, 1.0]]])
    level32 = torch.zeros(1, 4, 4)
    level32[0, 1, 3] = 4.0
    level32[0, 0, 2] = -1.0
    pyramid = [level64, level32]
    cases = [
        ([3.0, 4.0], 7),  # (32, 96) scores exactly its threshold: "at or below" stops before it
        ([4.0, 3.99], 10),  # (32, 96) splits; root (64, 0) scores 3 <= 4
        ([5.0, -10.0], 4),  # the best root scores exactly its threshold: the roots only
        ([-10.0, 10.0], 7),  # every 32 px leaf is at or below 10: after the first root, the best leaf is one
    ]
    for thresholds, length in cases:
        boxes, lengths = run_all(pyramid, geometry, 28, thresholds=torch.tensor(thresholds))
        assert lengths.tolist() == [length], thresholds
        fixed = torch.ops.mixres.build_quadtree(oracles.pack(pyramid, 1), 128, 128, 16, 64, length)
        assert torch.equal(boxes[0, :length], fixed[0])
    boxes, lengths = run_all(pyramid, geometry, 28, thresholds=torch.tensor([3.0, 4.0]), budgets=torch.tensor([4]))
    assert lengths.tolist() == [4]  # the budget stops it first


def test_budgets_alone_give_build_quadtree_per_image():
    geometry = QuadtreeGeometry(128, 192, 16, 64)
    pyramid = random_pyramid(geometry, 6, seed=3)
    budgets = torch.tensor([6, 96, 9, 30, 6, 51])
    boxes, lengths = run_all(pyramid, geometry, 96, budgets=budgets)
    assert torch.equal(lengths, budgets.int())
    packed = oracles.pack(pyramid, 6)
    for b, n in enumerate(budgets.tolist()):
        assert torch.equal(boxes[b, :n], torch.ops.mixres.build_quadtree(packed[b:b + 1], 128, 192, 16, 64, n)[0])
        assert not boxes[b, n:].any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("ties", [False, True], ids=["random", "ties"])
def test_extreme_thresholds(dtype, ties):
    """Below every score and without budgets: build_quadtree(max_patches) exactly. At the highest score (or above):
    the root grid."""
    geometry = QuadtreeGeometry(128, 192, 16, 64)
    pyramid = random_pyramid(geometry, 4, seed=5, ties=ties, dtype=dtype)
    packed = oracles.pack(pyramid, 4)
    args = (128, 192, 16, 64, 60)
    below = torch.nextafter(packed.min(), torch.tensor(-math.inf, dtype=dtype))
    for name, impl in IMPLS.items():
        for threshold in (below.expand(2), torch.full((2,), torch.finfo(dtype).min, dtype=dtype)):
            boxes, lengths = impl(packed, *args, None, threshold)
            assert (lengths == 60).all() and torch.equal(boxes, torch.ops.mixres.build_quadtree(packed, *args)), name
        for threshold in (packed.max().expand(2), torch.full((2,), torch.finfo(dtype).max, dtype=dtype)):
            boxes, lengths = impl(packed, *args, None, threshold)
            roots = torch.ops.mixres.build_quadtree(packed, 128, 192, 16, 64, geometry.n_roots)
            assert (lengths == geometry.n_roots).all() and torch.equal(boxes[:, :geometry.n_roots], roots), name
            assert not boxes[:, geometry.n_roots:].any(), name


@pytest.mark.parametrize("batch", [0, 1])
def test_empty_and_single_image_batches(batch):
    geometry = QuadtreeGeometry(128, 192, 16, 64)
    pyramid = random_pyramid(geometry, batch, seed=batch)
    boxes, lengths = run_all(pyramid, geometry, 30, budgets=torch.full((batch,), 15),
                             thresholds=torch.tensor([0.0, 0.5]))
    if batch == 0:
        assert boxes.shape == (0, 30, 3) and lengths.shape == (0,)
    for name, impl in IMPLS.items():
        assert torch.equal(impl(oracles.pack(pyramid, batch), 128, 192, 16, 64, 30, None, None)[0],
                           torch.ops.mixres.build_quadtree(oracles.pack(pyramid, batch), 128, 192, 16, 64, 30)), name


def test_padding_centres_are_negative_and_no_leaf_has_them():
    geometry = QuadtreeGeometry(128, 192, 16, 64)
    pyramid = random_pyramid(geometry, 3, seed=2)
    boxes, lengths = run_all(pyramid, geometry, 60, budgets=torch.tensor([6, 33, 60]))
    for leaf_centers in (torch.ops.mixres.leaf_centers, reference.leaf_centers, mixres.ops.leaf_centers):
        centers = leaf_centers(boxes, 16)
        for b, n in enumerate(lengths.tolist()):
            assert (centers[b, :n] >= 0).all() and (centers[b, n:] == -0.5).all()


# --------------------------------------------------------------------------------------- the wrapper's conveniences
def test_the_wrapper_takes_numbers_sequences_and_0_dim_thresholds():
    geometry = QuadtreeGeometry(128, 192, 16, 64)
    packed = oracles.pack(random_pyramid(geometry, 4, seed=7), 4)
    args = (packed, 128, 192, 16, 64, 60)
    budgets = torch.tensor([6, 60, 30, 18])
    expected = torch.ops.mixres.build_quadtree_adaptive(*args, budgets, torch.tensor([0.25, 0.25]))
    per_level = torch.ops.mixres.build_quadtree_adaptive(*args, budgets, torch.tensor([0.75, -0.25]))
    assert not torch.equal(expected[1], per_level[1])  # the per-level case tells the levels apart
    for budget_form in (budgets, budgets.tolist(), tuple(np.array(budgets.tolist()))):
        for threshold, want in ((0.25, expected), (np.float64(0.25), expected), (torch.tensor(0.25), expected),
                                ([0.25, 0.25], expected), ((0.75, -0.25), per_level)):
            got = mixres.ops.build_quadtree_adaptive(*args, budget_form, threshold)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_a_python_threshold_is_rounded_to_the_scores_dtype():
    # 0.1 is not a float32: rounded to nearest, it is just above 0.1, and a score of float32(0.1) is at it: stops.
    # In float64, the same score is above 0.1: it splits.
    scores = torch.tensor([[0.1]], dtype=torch.float32)  # 64 x 64 with 32-64 px leaves: one root, one score
    assert mixres.ops.build_quadtree_adaptive(scores, 64, 64, 32, 64, 4, None, 0.1)[1].tolist() == [1]
    assert mixres.ops.build_quadtree_adaptive(scores.double(), 64, 64, 32, 64, 4, None, 0.1)[1].tolist() == [4]


# ----------------------------------------------------------------------------------------------------- properties
@st.composite
def cases(draw):
    geometry = draw(small_geometries())
    valid = geometry.valid_n_patches()
    max_patches = valid[draw(st.integers(0, len(valid) - 1))]
    batch = draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2 ** 31))
    pyramid = random_pyramid(geometry, batch, seed, ties=draw(st.booleans()))
    budgets = random_budgets(geometry, batch, max_patches, seed) if draw(st.booleans()) else None
    thresholds = None
    if draw(st.booleans()):  # each level's threshold a quantile of its scores: from no split to every split
        quantiles = draw(st.lists(st.floats(0, 1), min_size=len(pyramid), max_size=len(pyramid)))
        thresholds = torch.cat([m.flatten().quantile(q)[None] for m, q in zip(pyramid, quantiles)] + [torch.zeros(0)])
    return geometry, max_patches, batch, pyramid, budgets, thresholds


@settings(max_examples=120, deadline=None)
@given(cases())
def test_prefix_property_mosaics_padding_and_determinism(case):
    geometry, max_patches, batch, pyramid, budgets, thresholds = case
    packed = oracles.pack(pyramid, batch)
    args = (*geometry_args(geometry), max_patches)
    boxes, lengths = torch.ops.mixres.build_quadtree_adaptive(packed, *args, budgets, thresholds)
    caps = [max_patches] * batch if budgets is None else budgets.tolist()
    for b, (n, cap) in enumerate(zip(lengths.tolist(), caps, strict=True)):
        assert geometry.n_roots <= n <= cap and (n - geometry.n_roots) % 3 == 0
        leaves = boxes[b:b + 1, :n]
        # The prefix property: the fixed budget's leaves for as many leaves.
        assert torch.equal(leaves, torch.ops.mixres.build_quadtree(packed[b:b + 1], *args[:4], n))
        assert (coverage(leaves, geometry.height, geometry.width) == 1).all()
        assert not boxes[b, n:].any()  # padding: (0, 0, 0) exactly
        if n < cap:
            # Stopped by the rule: the leaf the greedy splits next scores at or below its level's threshold.
            after = torch.ops.mixres.build_quadtree(packed[b:b + 1], *args[:4], n + 3)[0]
            (parent,) = {tuple(box) for box in leaves[0].tolist()} - {tuple(box) for box in after.tolist()}
            y, x, size = parent
            level = geometry.splittable_sizes.index(size)
            assert thresholds is not None
            assert pyramid[level][b, y // size, x // size] <= thresholds[level]
    assert torch.equal(reference.build_quadtree_adaptive(packed, *args, budgets, thresholds)[0], boxes)
    again = torch.ops.mixres.build_quadtree_adaptive(packed.clone(), *args, budgets, thresholds)
    assert torch.equal(again[0], boxes) and torch.equal(again[1], lengths)


def test_one_thread_gives_the_same_trees():
    geometry = QuadtreeGeometry(256, 256, 16, 64)
    pyramid = random_pyramid(geometry, 64, seed=11, ties=True)
    packed = oracles.pack(pyramid, 64)
    args = (packed, 256, 256, 16, 64, 100, random_budgets(geometry, 64, 100, 11), torch.tensor([1.0, 0.0]))
    expected = torch.ops.mixres.build_quadtree_adaptive(*args)
    with oracles.one_thread():
        got = torch.ops.mixres.build_quadtree_adaptive(*args)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


# ------------------------------------------------------------------------------------------------------- bad input
def bad_call(max_patches=30, budgets=None, thresholds=None, scores=None, sizes=(128, 192, 16, 64)):
    """A call of every implementation on a 2-image batch, 128 x 192 with 16-64 px patches (6 roots), with one bad
    argument."""
    scores = torch.rand(2, 30) if scores is None else scores
    return lambda impl: impl(scores, *sizes, max_patches, budgets, thresholds)


BAD_INPUTS = [
    # (what, call, exception, message pattern, implementations)
    ("thresholds nan", bad_call(thresholds=torch.tensor([0.5, math.nan])), ValueError,
     r"thresholds must be finite, got nan for patch size 32 \(thresholds\[1\]\)"),
    ("thresholds inf", bad_call(thresholds=torch.tensor([math.inf, 0.5])), ValueError,
     r"thresholds must be finite, got inf for patch size 64 \(thresholds\[0\]\)"),
    ("thresholds -inf", bad_call(thresholds=torch.tensor([0.0, -math.inf])), ValueError,
     r"thresholds must be finite, got -inf for patch size 32"),
    ("thresholds too long", bad_call(thresholds=torch.zeros(3)), ValueError,
     r"thresholds must be \[2\], one per splittable patch size \(64, 32\), got \[3\]"),
    ("thresholds 2-D", bad_call(thresholds=torch.zeros(1, 2)), ValueError, r"thresholds must be \[2\].*got \[1, 2\]"),
    ("thresholds float64", bad_call(thresholds=torch.zeros(2, dtype=torch.float64)), TypeError,
     r"thresholds must have the scores' dtype"),
    ("thresholds int", bad_call(thresholds=torch.zeros(2, dtype=torch.int64)), TypeError,
     r"thresholds must have the scores' dtype"),
    ("thresholds on meta", bad_call(thresholds=torch.zeros(2, device="meta")), ValueError,
     r"thresholds is on meta but scores are on cpu"),
    ("budgets too long", bad_call(budgets=torch.tensor([6, 9, 12])), ValueError,
     r"budgets must be \[B\] = \[2\], one budget per image, got \[3\]"),
    ("budgets 2-D", bad_call(budgets=torch.tensor([[6], [9]])), ValueError, r"budgets must be \[B\] = \[2\]"),
    ("budgets float", bad_call(budgets=torch.tensor([6.0, 9.0])), TypeError, r"budgets must be int32 or int64"),
    ("budgets bool", bad_call(budgets=torch.tensor([True, False])), TypeError, r"budgets must be int32 or int64"),
    ("budgets int16", bad_call(budgets=torch.tensor([6, 9], dtype=torch.int16)), TypeError,
     r"budgets must be int32 or int64"),
    ("budgets on meta", bad_call(budgets=torch.tensor([6, 9], device="meta")), ValueError,
     r"budgets is on meta but scores are on cpu"),
    ("budget not roots + 3k", bad_call(budgets=torch.tensor([6, 10])), ValueError,
     r"budgets\[1\] = 10 is unreachable: each budget must be 6 \+ 3k, from 6 to max_patches = 30"),
    ("budget above max_patches", bad_call(budgets=torch.tensor([33, 6])), ValueError,
     r"budgets\[0\] = 33 is unreachable.*to max_patches = 30"),
    ("budget below the roots", bad_call(budgets=torch.tensor([3, 6])), ValueError, r"budgets\[0\] = 3 is unreachable"),
    ("budget negative", bad_call(budgets=torch.tensor([6, -3])), ValueError, r"budgets\[1\] = -3 is unreachable"),
    ("budget 2**40", bad_call(budgets=torch.tensor([2 ** 40, 6])), ValueError,
     r"budgets\[0\] = 1099511627776 is unreachable"),
    ("max_patches not roots + 3k", bad_call(max_patches=31), ValueError, r"max_patches.*31"),
    ("max_patches above the leaves", bad_call(max_patches=99), ValueError, r"max_patches.*99"),
    ("max_patches below the roots", bad_call(max_patches=3), ValueError, r"max_patches.*3"),
    ("scores nan", bad_call(scores=torch.full((2, 30), math.nan)), ValueError, r"scores must be finite"),
    ("scores float16", bad_call(scores=torch.zeros(2, 30, dtype=torch.float16)), TypeError,
     r"scores must be float32 or float64"),
    ("scores wrong length", bad_call(scores=torch.zeros(2, 29)), ValueError, r"scores must be the packed pyramid"),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("what, call, error, pattern", BAD_INPUTS, ids=[case[0] for case in BAD_INPUTS])
def test_bad_input_gets_a_clear_error(what, call, error, pattern, impl):
    with pytest.raises(error, match=pattern):
        call(IMPLS[impl])


WRAPPER_BAD_INPUTS = [
    ("threshold nan", bad_call(thresholds=math.nan), ValueError, r"thresholds must be finite, got nan"),
    ("threshold inf", bad_call(thresholds=-math.inf), ValueError, r"thresholds must be finite, got -inf"),
    ("threshold past float32", bad_call(thresholds=1e39), ValueError,
     r"thresholds must be finite in the scores' dtype float32, got 1e\+39, which overflows it"),
    ("thresholds list nan", bad_call(thresholds=[0.0, math.nan]), ValueError,
     r"thresholds must be finite, got nan for patch size 32 \(thresholds\[1\]\)"),
    ("thresholds list too short", bad_call(thresholds=[0.0]), ValueError,
     r"thresholds must be \[2\], one per splittable patch size \(64, 32\), got 1 numbers"),
    ("thresholds str", bad_call(thresholds="0.5"), TypeError, r"thresholds must be a number, a sequence"),
    ("threshold bool", bad_call(thresholds=True), TypeError, r"thresholds must be a number, a sequence"),
    ("0-dim threshold on meta", bad_call(thresholds=torch.tensor(0.5, device="meta")), ValueError,
     r"thresholds is on meta but scores are on cpu"),
    ("budgets floats", bad_call(budgets=[6.0, 9.0]), TypeError,
     r"budgets must be a Tensor \[B\] or a sequence of ints, got \[6.0, 9.0\]"),
    ("budgets bools", bad_call(budgets=[True, True]), TypeError, r"budgets must be a Tensor \[B\] or a sequence"),
    ("budgets int", bad_call(budgets=6), TypeError, r"budgets must be a Tensor \[B\] or a sequence of ints, got 6"),
    ("budgets list unreachable", bad_call(budgets=[6, 2 ** 70]), ValueError,
     r"budgets\[1\] = 1180591620717411303424 is unreachable"),
    ("budgets list too long", bad_call(budgets=[6, 9, 12]), ValueError, r"budgets must be \[B\] = \[2\]"),
]


@pytest.mark.parametrize("what, call, error, pattern", WRAPPER_BAD_INPUTS, ids=[case[0] for case in WRAPPER_BAD_INPUTS])
def test_bad_input_to_the_wrapper_gets_a_clear_error(what, call, error, pattern):
    with pytest.raises(error, match=pattern):
        call(mixres.ops.build_quadtree_adaptive)


def test_the_first_bad_budget_is_named_whatever_the_thread_count():
    budgets = torch.full((64,), 6)
    budgets[[17, 40]] = 7

    def call():
        with pytest.raises(ValueError, match=r"budgets\[17\] = 7 is unreachable"):
            torch.ops.mixres.build_quadtree_adaptive(torch.rand(64, 30), 128, 192, 16, 64, 30, budgets, None)

    call()
    with oracles.one_thread():
        call()
