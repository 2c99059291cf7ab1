"""tokenize with adaptive budgets (a threshold, per-image budgets): the padded mosaic against each image tokenized
alone at its own length (hypothesis), against the independent oracle, on both backends; the forms the threshold and
the budgets take; padding's values and gradient; Mosaic.valid, lengths and image_leaves; the models' refusal of
padded mosaics; and every bad input."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import mixres
from mixres.pyramid import QuadtreeGeometry

import oracles
from helpers import float64_tolerance, random_pyramid, small_geometries

TOKENIZERS = {"cpp": mixres.tokenize, "reference": mixres.reference.tokenize}


def make_inputs(batch=3, channels=3, height=128, width=192, min_size=16, max_size=64, seed=0, ties=False):
    images = torch.rand(batch, channels, height, width, generator=torch.Generator().manual_seed(seed))
    geometry = QuadtreeGeometry(height, width, min_size, max_size)
    return images, random_pyramid(geometry, batch, seed, ties)


def assert_padding(mosaic):
    """Entries past each image's length hold exactly the documented padding, and ``valid`` marks the others."""
    n_entries = mosaic.n_patches
    assert mosaic.lengths.dtype == torch.int32 and mosaic.lengths.shape == (mosaic.boxes.shape[0],)
    assert mosaic.is_padded
    expected_valid = torch.arange(n_entries) < mosaic.lengths[:, None]
    assert mosaic.valid.dtype == torch.bool and torch.equal(mosaic.valid, expected_valid)
    padding = ~expected_valid
    assert not mosaic.tokens[padding].any() and not mosaic.boxes[padding].any()
    assert (mosaic.centers[padding] == -0.5).all()
    assert (mosaic.boxes[expected_valid][:, 2] > 0).all() and (mosaic.centers[expected_valid] >= 0).all()


def splits_between(packed_image, geometry: QuadtreeGeometry, n_before: int):
    """The leaf (y, x, size) that the greedy splits to go from ``n_before`` leaves to ``n_before + 3``, by the fixed
    budget's op on one image's packed scores."""
    args = (geometry.height, geometry.width, geometry.min_patch_size, geometry.max_patch_size)
    before = torch.ops.mixres.build_quadtree(packed_image, *args, n_before)[0]
    after = torch.ops.mixres.build_quadtree(packed_image, *args, n_before + 3)[0]
    (parent,) = {tuple(box) for box in before.tolist()} - {tuple(box) for box in after.tolist()}
    return parent


# ------------------------------------------------------------------------------------------------------ properties
@st.composite
def adaptive_cases(draw):
    """A small geometry, images, scores, and the keyword arguments of an adaptive tokenize: a threshold in one of its
    forms, per-image budgets in one of theirs, or both."""
    geometry = draw(small_geometries())
    valid = geometry.valid_n_patches()
    max_patches = valid[draw(st.integers(0, len(valid) - 1))]
    batch = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2 ** 31))
    pyramid = random_pyramid(geometry, batch, seed, ties=draw(st.booleans()))
    images = torch.rand(batch, draw(st.integers(1, 2)), geometry.height, geometry.width,
                        generator=torch.Generator().manual_seed(seed))
    stop = draw(st.sampled_from(["threshold", "budgets", "both"]))
    kwargs = dict(n_patches=max_patches, min_patch_size=geometry.min_patch_size,
                  max_patch_size=geometry.max_patch_size, mode=draw(st.sampled_from(["area", "bilinear"])),
                  patch_size=draw(st.sampled_from([geometry.min_patch_size, 3])))
    budgets = [max_patches] * batch
    if stop != "threshold":
        budgets = [valid[draw(st.integers(0, valid.index(max_patches)))] for _ in range(batch)]
        form = draw(st.sampled_from(["int32", "int64", "list"]))
        kwargs["n_patches"] = budgets if form == "list" else torch.tensor(budgets, dtype=getattr(torch, form))
        kwargs["max_patches"] = max_patches
    thresholds = None
    if stop != "budgets":
        # Each level's threshold a quantile of its scores (float32 values: rounding changes none): from no split to
        # every split.
        thresholds = [m.flatten().quantile(draw(st.floats(0, 1))).item() for m in pyramid]
        form = draw(st.sampled_from(["dict", "list", "tensor", "number"]))
        if form == "number":
            thresholds = [thresholds[0]] * len(pyramid) if pyramid else []
            kwargs["threshold"] = thresholds[0] if pyramid else 0.5
        else:
            kwargs["threshold"] = {"dict": dict(zip(geometry.splittable_sizes, thresholds)), "list": thresholds,
                                   "tensor": torch.tensor(thresholds)}[form]
    return geometry, images, pyramid, kwargs, budgets, thresholds


@settings(max_examples=60, deadline=None)
@given(adaptive_cases())
def test_each_image_is_its_own_fixed_budget_mosaic_then_padding(case):
    """The key property: image b of an adaptive mosaic is, bit for bit, the fixed-budget mosaic of that image alone
    at n_patches = lengths[b], followed by the documented padding; it stopped where the rule says; the reference
    backend gives the same mosaic."""
    geometry, images, pyramid, kwargs, budgets, thresholds = case
    mosaic = mixres.tokenize(images, pyramid, **kwargs)
    batch, n_max = images.shape[0], max(budgets) if "max_patches" not in kwargs else kwargs["max_patches"]
    assert mosaic.tokens.shape == (batch, n_max, images.shape[1], kwargs["patch_size"], kwargs["patch_size"])
    assert mosaic.boxes.shape == (batch, n_max, 3) and mosaic.centers.shape == (batch, n_max, 2)
    assert_padding(mosaic)
    packed = oracles.pack(pyramid, batch)
    for b, (n, cap) in enumerate(zip(mosaic.lengths.tolist(), budgets, strict=True)):
        assert geometry.n_roots <= n <= cap
        alone = mixres.tokenize(images[b:b + 1], [m[b:b + 1] for m in pyramid], n, geometry.min_patch_size,
                                geometry.max_patch_size, kwargs["patch_size"], kwargs["mode"])
        for field in ("tokens", "boxes", "centers"):
            assert torch.equal(getattr(mosaic, field)[b:b + 1, :n], getattr(alone, field)), field
        # Stopped by the rule or the budget, not before: the last split scored above its level's threshold, and
        # the next one (when the budget allows it) at or below.
        if thresholds is not None and n > geometry.n_roots:
            y, x, size = splits_between(packed[b:b + 1], geometry, n - 3)
            level = geometry.splittable_sizes.index(size)
            assert pyramid[level][b, y // size, x // size] > thresholds[level]
        if n < cap:
            assert thresholds is not None
            y, x, size = splits_between(packed[b:b + 1], geometry, n)
            level = geometry.splittable_sizes.index(size)
            assert pyramid[level][b, y // size, x // size] <= thresholds[level]
    by_reference = mixres.reference.tokenize(images, pyramid, **kwargs)
    for field in ("lengths", "boxes", "centers"):
        assert torch.equal(getattr(by_reference, field), getattr(mosaic, field)), field
    torch.testing.assert_close(by_reference.tokens, mosaic.tokens, rtol=1e-5, atol=1e-5)
    assert not by_reference.tokens[~mosaic.valid].any()


# ----------------------------------------------------------------------------------------------- against the oracle
@pytest.mark.parametrize("mode", ["area", "bilinear"])
@pytest.mark.parametrize("tokenizer", TOKENIZERS)
def test_padded_mosaics_match_the_oracle(tokenizer, mode):
    images, pyramid = make_inputs(batch=4, seed=1)
    thresholds = [m.flatten().quantile(0.7).item() for m in pyramid]
    budgets = torch.tensor([6, 60, 33, 96])
    tokenize = TOKENIZERS[tokenizer]
    cases = [
        (dict(n_patches=96, threshold=dict(zip((64, 32), thresholds))), dict(thresholds=thresholds)),
        (dict(n_patches=budgets, max_patches=96), dict(budgets=budgets)),
        (dict(n_patches=budgets, max_patches=96, threshold=thresholds), dict(budgets=budgets, thresholds=thresholds)),
    ]
    for kwargs, oracle_kwargs in cases:
        mosaic = tokenize(images, pyramid, mode=mode, patch_size=12, **kwargs)
        oracles.assert_matches(mosaic, oracles.tokenize(images, pyramid, 96, 16, 64, 12, mode, **oracle_kwargs))
        assert_padding(mosaic)
        assert len(set(mosaic.lengths.tolist())) > 1  # the images stopped at different lengths


# ------------------------------------------------------------------------------------------------ the input forms
def test_every_threshold_form_gives_the_same_mosaic():
    images, pyramid = make_inputs(seed=2)
    expected = mixres.tokenize(images, pyramid, 60, threshold=[0.5, 0.25])
    assert len(set(expected.lengths.tolist())) > 1
    for threshold in ({64: 0.5, 32: 0.25}, {np.int64(32): 0.25, 64: np.float32(0.5)}, (0.5, 0.25),
                      torch.tensor([0.5, 0.25]), torch.tensor([0.5, 0.25], dtype=torch.float64)):
        got = mixres.tokenize(images, pyramid, 60, threshold=threshold)
        for field in ("lengths", "boxes", "centers", "tokens"):
            assert torch.equal(getattr(got, field), getattr(expected, field)), (threshold, field)
    one = mixres.tokenize(images, pyramid, 60, threshold=0.5)
    for threshold in ([0.5, 0.5], {64: 0.5, 32: 0.5}, torch.tensor(0.5), torch.tensor(0.5, dtype=torch.float64)):
        assert torch.equal(mixres.tokenize(images, pyramid, 60, threshold=threshold).boxes, one.boxes), threshold
    assert not torch.equal(one.lengths, expected.lengths)  # the per-level case tells the levels apart


def test_every_budget_form_gives_the_same_mosaic():
    images, pyramid = make_inputs(seed=3)
    budgets = [6, 60, 33]
    expected = mixres.tokenize(images, pyramid, torch.tensor(budgets), max_patches=60)
    assert expected.lengths.tolist() == budgets
    for form in (torch.tensor(budgets, dtype=torch.int32), budgets, tuple(np.array(budgets))):
        got = mixres.tokenize(images, pyramid, form, max_patches=60)
        assert torch.equal(got.boxes, expected.boxes) and torch.equal(got.tokens, expected.tokens), form
    # A list's padded length is its largest budget, unless max_patches says more.
    assert mixres.tokenize(images, pyramid, budgets).n_patches == 60
    wider = mixres.tokenize(images, pyramid, budgets, max_patches=96)
    assert wider.n_patches == 96 and torch.equal(wider.boxes[:, :60], expected.boxes) and not wider.boxes[:, 60:].any()


def test_float64_scores_take_float64_thresholds():
    # Root (0, 64) scores just above the threshold, beyond what float32 resolves: only float64 splits it.
    images = torch.rand(1, 1, 128, 128)
    level = torch.tensor([[[1.0, 1.0 + 1e-12], [0.0, 0.0]]], dtype=torch.float64)
    assert mixres.tokenize(images, [level], 13, 32, 64, threshold=1.0).lengths.tolist() == [7]
    assert mixres.tokenize(images, [level.float()], 13, 32, 64, threshold=1.0).lengths.tolist() == [4]


def test_padding_gets_no_gradient():
    images, pyramid = make_inputs(seed=4)
    images.requires_grad_()
    for mode in ("area", "bilinear"):
        mosaic = mixres.tokenize(images, pyramid, torch.tensor([6, 60, 33]), max_patches=60, mode=mode)
        weights = torch.randn(mosaic.tokens.shape, generator=torch.Generator().manual_seed(5))
        (everything,) = torch.autograd.grad((mosaic.tokens * weights).sum(), images, retain_graph=True)
        (leaves_only,) = torch.autograd.grad((mosaic.tokens * weights)[mosaic.valid].sum(), images)
        assert torch.equal(everything, leaves_only)


def test_a_fixed_budget_mosaic_is_not_padded():
    images, pyramid = make_inputs(seed=6)
    mosaic = mixres.tokenize(images, pyramid, 60)
    assert mosaic.lengths is None and not mosaic.is_padded
    assert mosaic.valid.shape == (3, 60) and mosaic.valid.all()
    assert torch.equal(mosaic.image_leaves(1), mosaic.boxes[1])
    padded = mixres.tokenize(images, pyramid, [6, 60, 33])
    assert [len(padded.image_leaves(b)) for b in range(3)] == [6, 60, 33]
    assert torch.equal(padded.image_leaves(2), padded.boxes[2, :33])


def test_the_docstrings_say_what_padding_is():
    doc = mixres.tokenize.__doc__
    for phrase in ("threshold", "max_patches", "lengths", "valid", "(0, 0, 0)", "(-0.5, -0.5)", "tokens 0",
                   "host synchronisation", "fullgraph", "CUDA graphs", "{patch size: number}"):
        assert phrase in doc, phrase
    for phrase in ("lengths", "padding", "(0, 0, 0)"):
        assert phrase in mixres.Mosaic.__doc__, phrase


# ------------------------------------------------------------------------------------------------------- the models
def test_the_models_take_a_padded_mosaic_from_tokenize():
    """tests/test_models_padded.py checks hand-made padded mosaics in depth; this one, tokenize's: each image's
    logits are those of its own fixed-budget mosaic."""
    from timm.models.vision_transformer import VisionTransformer

    from mixres.models import Quadformer

    images, pyramid = make_inputs(batch=2, height=128, width=128, seed=7)
    images = images.double()
    padded = mixres.tokenize(images, pyramid, [16, 31], max_patches=31)
    vit = VisionTransformer(img_size=128, patch_size=16, embed_dim=32, depth=1, num_heads=2, num_classes=5,
                            global_pool="avg").double().eval()
    for pos_embed in ("resample", "xy", "xy-learned"):
        model = Quadformer(vit, n_patches=31, pos_embed=pos_embed).double()
        with torch.no_grad():
            logits = model(padded)
            for b, n in enumerate((16, 31)):
                alone = mixres.tokenize(images[b:b + 1], [level[b:b + 1] for level in pyramid], n)
                expected = model(alone)
                torch.testing.assert_close(logits[b:b + 1], expected, rtol=0, atol=float64_tolerance(expected))


# ------------------------------------------------------------------------------------------------------- bad input
GEOMETRY = QuadtreeGeometry(128, 192, 16, 64)  # make_inputs' images: 6 roots, budgets 6 + 3k up to 96
BAD_INPUTS = [
    # (what, keyword arguments of tokenize, exception, message pattern)
    ("threshold nan", dict(threshold=math.nan), ValueError,
     r"threshold must be finite, got nan for patch size 64 \(threshold\[0\]\)"),
    ("threshold inf", dict(threshold=math.inf), ValueError, r"threshold must be finite, got inf"),
    ("threshold list nan", dict(threshold=[0.0, math.nan]), ValueError,
     r"threshold must be finite, got nan for patch size 32 \(threshold\[1\]\)"),
    ("threshold dict -inf", dict(threshold={64: 0.0, 32: -math.inf}), ValueError,
     r"threshold must be finite, got -inf for patch size 32"),
    ("threshold tensor nan", dict(threshold=torch.tensor([math.nan, 0.0])), ValueError,
     r"threshold must be finite, got nan for patch size 64 \(threshold\[0\]\)"),
    ("threshold past float32", dict(threshold=1e39), ValueError,
     r"threshold must be finite in the scores' dtype float32, got 1e\+39 for patch size 64 \(threshold\[0\]\), "
     r"which overflows it"),
    ("threshold str", dict(threshold="0.5"), TypeError, r"threshold must be a number, a dict \{patch size: number\}"),
    ("threshold bool", dict(threshold=True), TypeError, r"threshold must be a number"),
    ("threshold list of str", dict(threshold=["0.5", "0.5"]), TypeError, r"threshold must be a number"),
    ("threshold dict of tensors", dict(threshold={64: torch.tensor(0.5), 32: torch.tensor(0.5)}), TypeError,
     r"threshold must be a number"),
    ("threshold list too short", dict(threshold=[0.5]), ValueError,
     r"threshold must hold one number per splittable patch size \[64, 32\], coarse to fine, got 1 numbers"),
    ("threshold dict of s_min", dict(threshold={64: 0.5, 16: 0.5}), ValueError,
     r"threshold as a dict must have one entry per splittable patch size, keys \[64, 32\] \(the smallest size, 16, "
     r"is never split\), got keys \[64, 16\]"),
    ("threshold dict missing a size", dict(threshold={64: 0.5}), ValueError, r"got keys \[64\]"),
    ("threshold dict of str keys", dict(threshold={"64": 0.5, "32": 0.5}), ValueError, r"got keys \['64', '32'\]"),
    ("threshold dict of float keys", dict(threshold={64.0: 0.5, 32.0: 0.5}), ValueError, r"got keys \[64.0, 32.0\]"),
    ("threshold tensor [3]", dict(threshold=torch.zeros(3)), ValueError,
     r"threshold must be one number \(0-dim\) or \[2\], one per splittable patch size \[64, 32\], got shape \[3\]"),
    ("threshold tensor int", dict(threshold=torch.zeros(2, dtype=torch.int64)), TypeError,
     r"threshold must be floating point, got torch.int64"),
    ("threshold on meta", dict(threshold=torch.zeros(2, device="meta")), ValueError,
     r"threshold is on meta but images are on cpu"),
    ("budgets without max_patches", dict(n_patches=torch.tensor([6, 9, 12])), ValueError,
     r"n_patches is a Tensor of per-image budgets: pass max_patches=N_max"),
    ("budgets [2]", dict(n_patches=torch.tensor([6, 9]), max_patches=30), ValueError,
     r"n_patches must be \[B\] = \[3\], one budget per image, got \[2\]"),
    ("budgets 0-dim", dict(n_patches=torch.tensor(6), threshold=0.5), TypeError,
     r"n_patches must be an int, got Tensor tensor\(6\): pass int\(value\)"),
    ("budgets 2-D", dict(n_patches=torch.tensor([[6, 9, 12]]), max_patches=30), ValueError,
     r"n_patches must be \[B\] = \[3\]"),
    ("budgets float", dict(n_patches=torch.tensor([6.0, 9.0, 12.0]), max_patches=30), TypeError,
     r"n_patches must be int32 or int64, got torch.float32"),
    ("budgets bool", dict(n_patches=torch.tensor([True, True, False]), max_patches=30), TypeError,
     r"n_patches must be int32 or int64"),
    ("budgets on meta", dict(n_patches=torch.tensor([6, 9, 12], device="meta"), max_patches=30), ValueError,
     r"n_patches is on meta but images are on cpu"),
    ("budget unreachable", dict(n_patches=torch.tensor([6, 10, 12]), max_patches=30), ValueError,
     r"n_patches\[1\] = 10 is unreachable: each budget must be 6 \+ 3k, from 6 to max_patches = 30"),
    ("budget past max_patches", dict(n_patches=torch.tensor([6, 9, 33]), max_patches=30), ValueError,
     r"n_patches\[2\] = 33 is unreachable.*to max_patches = 30"),
    ("budget below the roots", dict(n_patches=[3, 6, 6]), ValueError, r"n_patches\[0\] = 3 is unreachable"),
    ("budgets list too long", dict(n_patches=[6, 9, 12, 15]), ValueError,
     r"n_patches must hold one budget per image, \[B\] = \[3\], got 4"),
    ("budgets list of floats", dict(n_patches=[6, 9.0, 12]), TypeError, r"n_patches\[1\] must be an int, got float"),
    ("max_patches unreachable", dict(n_patches=[6, 9, 12], max_patches=31), ValueError,
     r"max_patches=31 is unreachable.*nearest valid: 30 or 33"),
    ("max_patches below a budget", dict(n_patches=[6, 9, 33], max_patches=30), ValueError,
     r"n_patches\[2\] = 33 is unreachable"),
    ("max_patches with one budget", dict(n_patches=30, max_patches=60), ValueError,
     r"max_patches=60 is the padded length of per-image budgets.*leave max_patches out"),
    ("max_patches with a threshold", dict(n_patches=30, max_patches=60, threshold=0.5), ValueError,
     r"with one n_patches for every image and a threshold, n_patches itself is the cap N_max"),
    ("cap unreachable", dict(n_patches=31, threshold=0.5), ValueError, r"n_patches=31 is unreachable"),
    ("empty batch", dict(images=torch.rand(0, 3, 128, 192), scores=[torch.rand(0, 2, 3), torch.rand(0, 4, 6)],
                         threshold=0.5), ValueError, r"empty batch \(B=0\)"),
]


@pytest.mark.parametrize("what, changes, error, pattern", BAD_INPUTS, ids=[case[0] for case in BAD_INPUTS])
@pytest.mark.parametrize("tokenize", TOKENIZERS.values(), ids=TOKENIZERS.keys())
def test_bad_input_gets_a_clear_error(tokenize, what, changes, error, pattern):
    images, pyramid = make_inputs()
    kwargs = dict(images=images, scores=pyramid, n_patches=30) | changes
    with pytest.raises(error, match=pattern):
        tokenize(**kwargs)
