"""Hostile inputs to what flows into tokenize and the models (issue 12): NaN and Inf pixels through every scorer,
tokenize's nan_policy, half-precision inputs on every path, channel counts the model or scorer does not take, and
sizes, counts and seeds at the limits of their types. Each gives a correct result or a clear error."""
import copy
import math
import time
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer
from torch import nn

import mixres
from mixres.models import Quadformer, UniformGrid, grid_for_budget
from mixres.scorers import Entropy, FeatureBased, GradCAM, PixelBlur, Precomputed, Random, Uniform

import oracles
from helpers import raising_on_host_sync, random_pyramid

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF_DTYPES = [torch.float16, torch.bfloat16]


TOKENIZERS = {"cpp": mixres.tokenize, "reference": mixres.reference.tokenize}


def tiny_cnn(channels=3, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(channels, 4, 3, padding=1), nn.ReLU(inplace=True),
                         nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.ReLU(inplace=True),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5)).eval()


def random_feature_scorer(**kwargs):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the random-backbone warning
        return FeatureBased(random_init=True, **kwargs)


# The scorers that read pixel values, at 16-64 px, with the value a bad pixel must have for the oracle image to give
# their network the same input as the scorer's replacement (0 in the network's input).
PIXEL_SCORERS = {
    "pixel-blur": (lambda: PixelBlur(16, 64), lambda channel: 0.0),
    "entropy": (lambda: Entropy(16, 64), lambda channel: 0.0),
    "feature": (random_feature_scorer, lambda channel: IMAGENET_MEAN[channel]),
    "gradcam": (lambda: GradCAM(tiny_cnn(), min_patch_size=16, max_patch_size=64), lambda channel: 0.0),
}
BLIND_SCORERS = {
    "random": lambda images: Random(16, 64, seed=3),
    "uniform": lambda images: Uniform(16, 64),
    "precomputed": lambda images: Precomputed(torch.rand(images.shape[0], 32, 32,
                                                         generator=torch.Generator().manual_seed(4)), 16, 64),
}
BAD_VALUES = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def textured_images(batch=2, channels=3, height=128, width=128, seed=0):
    """Random pixels beside a flat quarter, so that scores differ from patch to patch."""
    images = torch.rand(batch, channels, height, width, generator=torch.Generator().manual_seed(seed))
    images[:, :, : height // 2, : width // 2] = 0.5
    return images


def small_vit(channels=3, seed=0, **overrides):
    torch.manual_seed(seed)
    vit = VisionTransformer(**{**dict(img_size=128, patch_size=16, embed_dim=32, depth=2, num_heads=2,
                                      num_classes=5, in_chans=channels), **overrides}).eval()
    with torch.no_grad():  # timm zero-initialises these; random values make the comparisons meaningful
        vit.pos_embed.normal_(std=0.5)
        vit.cls_token.normal_(std=0.5)
    return vit


def imagenet_quadformer(scorer="pixel-blur", **kwargs):
    """A Quadformer whose inputs carry ImageNet's normalisation, whose numbers bfloat16 would round."""
    return Quadformer(small_vit(), n_patches=kwargs.pop("n_patches", 31), scorer=scorer, input_mean=IMAGENET_MEAN,
                      input_std=IMAGENET_STD, **kwargs).eval()


def cells_holding(y, x, sizes):
    """{size: (row, col)}: the cell of each level that holds pixel (y, x)."""
    return {size: (y // size, x // size) for size in sizes}


# ------------------------------------------------------------------------------------- NaN and Inf pixels
@pytest.mark.parametrize("bad", BAD_VALUES)
@pytest.mark.parametrize("name", PIXEL_SCORERS)
def test_a_bad_pixel_makes_nan_exactly_the_patches_that_hold_it(name, bad):
    make_scorer, neutral = PIXEL_SCORERS[name]
    scorer = make_scorer()
    images = textured_images()
    image, channel, y, x = 1, 2, 77, 45
    images[image, channel, y, x] = BAD_VALUES[bad]
    pyramid = scorer(images)
    # The oracle: the same images with the pixel at the value whose network input is the scorer's replacement.
    clean = images.clone()
    clean[image, channel, y, x] = neutral(channel)
    expected = scorer(clean)
    holding = cells_holding(y, x, (64, 32))
    for level, want, size in zip(pyramid, expected, (64, 32), strict=True):
        nan = torch.zeros_like(level, dtype=torch.bool)
        nan[image, holding[size][0], holding[size][1]] = True
        assert torch.isnan(level[nan]).all(), f"{name}: the {size} px patch holding the pixel is not NaN"
        assert torch.equal(level[~nan], want[~nan]), f"{name}: other {size} px patches changed"


@pytest.mark.parametrize("channels", [1, 4])
@pytest.mark.parametrize("name", ["pixel-blur", "entropy"])
def test_a_bad_pixel_in_any_channel_of_any_channel_count(name, channels):
    scorer = PIXEL_SCORERS[name][0]()
    images = textured_images(channels=channels)
    images[0, channels - 1, 3, 100] = math.nan
    levels = scorer(images)
    for level, size in zip(levels, (64, 32)):
        assert torch.isnan(level[0, 3 // size, 100 // size]) and torch.isfinite(level).sum() == level.numel() - 1


@pytest.mark.parametrize("name", PIXEL_SCORERS)
def test_bad_pixels_of_channels_last_and_strided_images(name):
    scorer = PIXEL_SCORERS[name][0]()
    images = textured_images()
    images[0, 1, 100, 20] = math.nan
    expected = scorer(images)
    wider = torch.zeros(2, 3, 128, 160)
    wider[..., :128] = images
    for variant in (images.to(memory_format=torch.channels_last), wider[..., :128]):
        for got, want in zip(scorer(variant), expected, strict=True):
            assert torch.equal(torch.isnan(got), torch.isnan(want)) and torch.isnan(got).sum() == 1
            torch.testing.assert_close(got, want, equal_nan=True)


@pytest.mark.parametrize("bad", ["nan", "inf"])
@pytest.mark.parametrize("name", PIXEL_SCORERS)
@pytest.mark.parametrize("tokenizer", TOKENIZERS)
def test_tokenize_names_the_bad_pixel_on_the_cpu(tokenizer, name, bad):
    images = textured_images()
    images[1, 2, 77, 45] = BAD_VALUES[bad]
    images[1, 0, 100, 3] = BAD_VALUES[bad]
    pattern = (rf"images hold 2 NaN or Inf values \(the first, {bad}, in image 1, channel 0, at \(y, x\) = "
               rf"\(100, 3\)\), and the scores are not finite there: scorers need finite pixels.*"
               rf"nan_policy='lowest'.*scores must be finite")
    with pytest.raises(ValueError, match=pattern):
        TOKENIZERS[tokenizer](images, PIXEL_SCORERS[name][0](), n_patches=31)


def test_the_quadformer_names_the_bad_pixel_of_its_input():
    model = imagenet_quadformer()
    images = torch.randn(2, 3, 128, 128)
    images[0, 1, 5, 6] = math.nan
    with pytest.raises(ValueError, match=r"images hold 1 NaN or Inf values \(the first, nan, in image 0, channel 1"):
        model(images)


@pytest.mark.parametrize("tokenizer", TOKENIZERS)
def test_scores_that_overflow_for_finite_images_blame_the_scorer(tokenizer):
    images = textured_images()
    images[0, 0, 70:80, 70:80] = 1e30  # finite in float32, but its squared error is not
    with pytest.raises(ValueError, match=r"scores must be finite.*the images are finite \(largest \|value\| 1e\+30\), "
                                         r"so the scorer PixelBlur\(min_patch_size=16, max_patch_size=64\) made them"):
        TOKENIZERS[tokenizer](images, PixelBlur(16, 64), n_patches=31)


@pytest.mark.parametrize("name", BLIND_SCORERS)
def test_scorers_blind_to_pixels_ignore_bad_ones_and_the_tokens_carry_them(name):
    images = textured_images()
    scorer = BLIND_SCORERS[name](images)
    clean = mixres.tokenize(images, scorer, n_patches=40)
    images[1, 0, 77, 45] = math.nan
    mosaic = mixres.tokenize(images, scorer, n_patches=40)
    assert torch.equal(mosaic.boxes, clean.boxes)
    y, x, size = mosaic.boxes[1].T
    holds = (y <= 77) & (77 < y + size) & (x <= 45) & (45 < x + size)
    assert holds.sum() == 1
    assert torch.isnan(mosaic.tokens[1, holds]).any()
    assert torch.equal(mosaic.tokens[1, ~holds], clean.tokens[1, ~holds])
    assert torch.equal(mosaic.tokens[0], clean.tokens[0])


# --------------------------------------------------------------------------------------------------- nan_policy
def lowest_oracle(pyramid):
    """The pyramid as float32 with NaN and -Inf at float32's lowest finite value and +Inf at its highest, by
    masked assignment (not torch.nan_to_num, which the policy uses)."""
    extremes = torch.finfo(torch.float32)
    replaced = []
    for level in pyramid:
        level = level.float().clone()
        level[torch.isnan(level) | (level == -math.inf)] = extremes.min
        level[level == math.inf] = extremes.max
        replaced.append(level)
    return replaced


def spoiled_pyramid(geometry, batch, seed, dtype=torch.float32, fraction=0.2):
    """A random pyramid with about ``fraction`` of its scores NaN, +Inf or -Inf."""
    generator = torch.Generator().manual_seed(seed + 1000)
    pyramid = random_pyramid(geometry, batch, seed, dtype=dtype)
    for level in pyramid:
        where = torch.rand(level.shape, generator=generator) < fraction
        kinds = torch.randint(0, 3, level.shape, generator=generator)
        level[where & (kinds == 0)] = math.nan
        level[where & (kinds == 1)] = math.inf
        level[where & (kinds == 2)] = -math.inf
    return pyramid


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2 ** 16), fraction=st.sampled_from([0.05, 0.3, 1.0]), splits=st.integers(0, 30),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
       tokenizer=st.sampled_from(sorted(TOKENIZERS)))
def test_lowest_policy_ranks_nan_and_inf_like_the_finite_extremes(seed, fraction, splits, dtype, tokenizer):
    images = torch.rand(2, 3, 128, 192)
    geometry = mixres.QuadtreeGeometry(128, 192, 16, 64)
    pyramid = spoiled_pyramid(geometry, 2, seed, dtype, fraction)
    n_patches = geometry.n_roots + 3 * splits
    got = TOKENIZERS[tokenizer](images, pyramid, n_patches, nan_policy="lowest")
    oracles.assert_matches(got, oracles.tokenize(images, lowest_oracle(pyramid), n_patches))


@pytest.mark.parametrize("tokenizer", TOKENIZERS)
def test_lowest_policy_order_on_a_hand_made_pyramid(tokenizer):
    # Roots (64 px) in raster order: NaN, -1e30, +Inf, 0.5; every 32 px cell scores 0.
    images = torch.rand(1, 3, 128, 128)
    roots = torch.tensor([[[math.nan, -1e30], [math.inf, 0.5]]])
    pyramid = [roots, torch.zeros(1, 4, 4)]

    def whole_roots(splits):
        boxes = TOKENIZERS[tokenizer](images, pyramid, 4 + 3 * splits, nan_policy="lowest").boxes[0].tolist()
        return sorted((y, x) for y, x, size in boxes if size == 64)

    # +Inf first, then 0.5, then the eight zeros of their quadrants; -1e30 next, its quadrants (0) and NaN last.
    assert whole_roots(1) == [(0, 0), (0, 64), (64, 64)]
    assert whole_roots(2) == [(0, 0), (0, 64)]
    assert whole_roots(10) == [(0, 0), (0, 64)]
    assert whole_roots(11) == [(0, 0)]
    assert whole_roots(15) == [(0, 0)]
    assert whole_roots(16) == []
    # NaN ties with a score of exactly float32's lowest value: raster order decides, as for any tie.
    pyramid = [torch.tensor([[[math.nan, torch.finfo(torch.float32).min], [1.0, 1.0]]]), torch.zeros(1, 4, 4)]
    assert whole_roots(11) == [(0, 64)]


@pytest.mark.parametrize("name", PIXEL_SCORERS)
def test_lowest_policy_through_each_scorer_splits_the_patches_of_bad_pixels_last(name):
    scorer = PIXEL_SCORERS[name][0]()
    images = textured_images()
    images[0, 1, 10, 120] = math.nan
    images[1, 0, 70, 70] = math.inf
    for splits in (3, 12, 19):
        got = mixres.tokenize(images, scorer, 4 + 3 * splits, nan_policy="lowest")
        expected = mixres.tokenize(images, lowest_oracle(scorer(images)), 4 + 3 * splits)
        assert torch.equal(got.boxes, expected.boxes)


def test_lowest_policy_changes_nothing_for_finite_scores():
    images, geometry = torch.rand(2, 3, 128, 192), mixres.QuadtreeGeometry(128, 192, 16, 64)
    for dtype in (torch.float32, torch.float64):
        pyramid = random_pyramid(geometry, 2, seed=5, dtype=dtype, ties=True)
        assert torch.equal(mixres.tokenize(images, pyramid, 60, nan_policy="lowest").boxes,
                           mixres.tokenize(images, pyramid, 60).boxes)


@pytest.mark.parametrize("tokenizer", TOKENIZERS)
def test_raise_policy_still_raises_on_the_cpu(tokenizer):
    images, geometry = torch.rand(2, 3, 128, 192), mixres.QuadtreeGeometry(128, 192, 16, 64)
    pyramid = spoiled_pyramid(geometry, 2, seed=0)
    with pytest.raises(ValueError, match="scores must be finite"):
        TOKENIZERS[tokenizer](images, pyramid, 60, nan_policy="raise")


@pytest.mark.parametrize("policy", ["ignore", "LOWEST", "", None, 1, ("lowest",)])
def test_bad_nan_policy(policy):
    images = torch.rand(1, 3, 128, 128)
    with pytest.raises(ValueError, match=r"nan_policy must be one of 'raise', 'lowest', got"):
        mixres.tokenize(images, Uniform(16, 64), 4, nan_policy=policy)
    with pytest.raises(ValueError, match=r"nan_policy must be one of 'raise', 'lowest'"):
        Quadformer(small_vit(), n_patches=31, nan_policy=policy)


def test_the_quadformer_passes_its_nan_policy_on():
    model = imagenet_quadformer(nan_policy="lowest")
    images = torch.randn(2, 3, 128, 128)
    images[1, 0, 40:42, 90] = math.nan
    mosaic = model.tokenize(images)
    expected = mixres.tokenize(images, lowest_oracle(model.score(images)), 31, patch_size=16)
    assert torch.equal(mosaic.boxes, expected.boxes)
    logits = model(images)
    assert torch.isfinite(logits[0]).all() and torch.isnan(logits[1]).all()  # NaN tokens give NaN logits
    model.nan_policy = "raise"
    with pytest.raises(ValueError, match="images hold 2 NaN or Inf values"):
        model(images)


def test_docstrings_say_what_happens_on_cuda():
    for phrase in ("nan_policy", "device-side assert", "synchronisation", '"lowest"', "Non-finite pixels"):
        assert phrase in mixres.tokenize.__doc__
    assert "nan_policy" in Quadformer.__doc__ and "Non-finite pixels" in mixres.scorers.Scorer.__doc__


@pytest.mark.skipif(not (torch.cuda.is_available() and mixres.ops.has_kernel("cuda")), reason="needs a GPU")
def test_lowest_policy_on_cuda_needs_no_sync_and_matches_the_cpu():
    geometry = mixres.QuadtreeGeometry(128, 192, 16, 64)
    images = textured_images(batch=3, height=128, width=192)
    images[0, 1, 10, 120] = math.nan
    images[2, 0, 70, 70] = -math.inf
    pyramid = spoiled_pyramid(geometry, 3, seed=1)
    scorers = [PixelBlur(16, 64), Entropy(16, 64)]
    on_cuda = images.cuda(), [level.cuda() for level in pyramid]
    torch.cuda.synchronize()
    with raising_on_host_sync():
        from_pyramid = mixres.tokenize(*on_cuda, 60, nan_policy="lowest")
        from_scorers = [(mixres.tokenize(on_cuda[0], scorer, 60, nan_policy="lowest"), scorer(on_cuda[0]))
                        for scorer in scorers]
    expected = mixres.tokenize(images, pyramid, 60, nan_policy="lowest")
    assert torch.equal(from_pyramid.boxes.cpu(), expected.boxes)
    for mosaic, scores in from_scorers:
        assert all(torch.isnan(level).any() for level in scores)  # the bad pixels' patches
        cpu = mixres.tokenize(images, [level.cpu() for level in scores], 60, nan_policy="lowest")
        assert torch.equal(mosaic.boxes.cpu(), cpu.boxes)


# ----------------------------------------------------------------------------------------------- half precision
def eps(dtype):
    return torch.finfo(dtype).eps


@pytest.mark.parametrize("patch_size", [16, 24])
@pytest.mark.parametrize("mode", ["area", "bilinear"])
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("tokenizer", TOKENIZERS)
def test_half_images_tokens_are_the_exact_resize_rounded_once(tokenizer, dtype, mode, patch_size):
    images = torch.rand(2, 3, 128, 192, generator=torch.Generator().manual_seed(0)).to(dtype)
    pyramid = random_pyramid(mixres.QuadtreeGeometry(128, 192, 16, 64), 2, seed=0)
    mosaic = TOKENIZERS[tokenizer](images, pyramid, 60, patch_size=patch_size, mode=mode)
    exact = oracles.tokenize(images, pyramid, 60, patch_size=patch_size, mode=mode)
    assert exact.tokens.dtype == torch.float64
    assert mosaic.tokens.dtype == dtype and torch.equal(mosaic.boxes, exact.boxes)
    # The resize accumulates in float32 and rounds once to the dtype: half an ulp, plus the float32 sum's error
    # (at most 4095 terms of 2**-24 relative, a quarter of float16's ulp), so one ulp (eps) relative bounds it.
    # atol: the spacing of float16's subnormals, where relative precision ends.
    torch.testing.assert_close(mosaic.tokens.double(), exact.tokens, rtol=eps(dtype), atol=2.0 ** -24)


def half_score_forms(dtype):
    """Each form of scores, in ``dtype``, for 128 x 192 images with 16-64 px patches, batch 2."""
    generator = torch.Generator().manual_seed(1)
    levels = [torch.randn(2, 2, 3, generator=generator).to(dtype), torch.randn(2, 4, 6, generator=generator).to(dtype)]
    dense = (torch.rand(2, 128, 192, generator=generator) * 50).to(dtype)
    coarse = torch.rand(2, 8, 12, generator=generator).to(dtype)
    return {"list": levels, "dict": {64: levels[0], 32: levels[1]}, "dense": dense, "coarse dense": coarse,
            "precomputed dense": Precomputed(dense, 16, 64), "precomputed pyramid": Precomputed(levels, 16, 64)}


def as_float32(scores):
    if isinstance(scores, Precomputed):
        saliency = scores.saliency
        return Precomputed(saliency.float() if isinstance(saliency, torch.Tensor) else [m.float() for m in saliency],
                           16, 64)
    if isinstance(scores, dict):
        return {size: level.float() for size, level in scores.items()}
    return scores.float() if isinstance(scores, torch.Tensor) else [level.float() for level in scores]


@pytest.mark.parametrize("form", list(half_score_forms(torch.float16)))
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("tokenizer", TOKENIZERS)
def test_half_scores_rank_as_their_float32_values(tokenizer, dtype, form):
    # tokenize promises: half maps are compared, and dense ones summed, as float32 (a bfloat16 sum would round).
    images = torch.rand(2, 3, 128, 192)
    scores = half_score_forms(dtype)[form]
    for n_patches in (30, 60, 90):
        assert torch.equal(TOKENIZERS[tokenizer](images, scores, n_patches).boxes,
                           TOKENIZERS[tokenizer](images, as_float32(scores), n_patches).boxes)


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_half_dense_saliency_is_summed_in_float32(dtype):
    saliency = (torch.rand(2, 128, 192, generator=torch.Generator().manual_seed(2)) * 50).to(dtype)
    geometry = mixres.QuadtreeGeometry(128, 192, 16, 64)
    for got, expected in zip(mixres.saliency_to_pyramid(saliency, geometry),
                             oracles.saliency_pyramid(saliency.double(), 128, 192, 16, 64), strict=True):
        assert got.dtype == torch.float32
        # float32 sums: the mean of 256 values rounds by at most 256 float32 ulps (2**-16 relative), where
        # float16 sums would be off by 2**-11 and bfloat16 ones by 2**-8.
        torch.testing.assert_close(got.double(), expected, rtol=2.0 ** -16, atol=0)


ALL_SCORERS = {**{name: make for name, (make, _) in PIXEL_SCORERS.items()},
               **{name: (lambda make=make: make(torch.rand(2, 3, 128, 128))) for name, make in BLIND_SCORERS.items()}}


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("name", ALL_SCORERS)
def test_every_scorer_scores_half_images_as_their_float32_values(name, dtype):
    # Each scorer widens half images (or converts them to its network's float32) before reading them.
    scorer = ALL_SCORERS[name]()
    images = textured_images().to(dtype)
    for got, expected in zip(scorer(images), scorer(images.float()), strict=True):
        assert got.dtype == torch.float32 and torch.equal(got, expected)
    assert torch.equal(mixres.tokenize(images, scorer, 31).boxes, mixres.tokenize(images.float(), scorer, 31).boxes)


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_scorer_networks_in_half_precision(dtype):
    images = textured_images()
    # GradCAM: the images go to the model's dtype, whatever theirs.
    model = tiny_cnn()
    full = GradCAM(model, min_patch_size=16, max_patch_size=64)(images)
    half_model = copy.deepcopy(model).to(dtype)
    wide_model = copy.deepcopy(half_model).float()  # the same rounded weights, in float32
    for images_dtype in (torch.float32, dtype):
        half = GradCAM(half_model, min_patch_size=16, max_patch_size=64)(images.to(images_dtype))
        wide = GradCAM(wide_model, min_patch_size=16, max_patch_size=64)(images.to(dtype).float())
        for h, w, f in zip(half, wide, full, strict=True):
            assert h.dtype == torch.float32 and h.shape == f.shape and torch.isfinite(h).all()
            # As for FeatureBased's autocast test: the network's rounding, a few of the dtype's ulps of the largest.
            torch.testing.assert_close(h, w, rtol=0, atol=8 * eps(dtype) * w.abs().max().item())
    # FeatureBased follows its backbone's dtype, even when converted after the scorer was built.
    scorer = random_feature_scorer()
    full = scorer(images)
    scorer.backbone.to(dtype)
    for h, f in zip(scorer(images), full, strict=True):
        assert h.dtype == torch.float32
        torch.testing.assert_close(h, f, rtol=0.1, atol=0.1 * f.abs().max().item())  # as test_scorer_features'


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_a_float32_quadformer_on_half_images(dtype):
    model = imagenet_quadformer()
    images = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(3)).to(dtype)
    half, wide = model.tokenize(images), model.tokenize(images.float())
    # The scorer sees the same float32 images either way (unnormalised in float32), so the leaves are the same;
    # the tokens are those of the float32 images, rounded to the dtype once (the extraction is a copy at p = 16).
    assert torch.equal(half.boxes, wide.boxes) and half.tokens.dtype == dtype
    torch.testing.assert_close(half.tokens.double(), wide.tokens.double(), rtol=eps(dtype) / 2, atol=2.0 ** -25)
    with torch.no_grad():
        logits = model(images)
        expected = model(mixres.Mosaic(half.tokens.float(), wide.boxes, wide.centers, 16, (128, 128)))
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, expected, rtol=1e-6, atol=1e-6)  # the same float32 computation


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_a_quadformer_in_half_precision(dtype):
    model = imagenet_quadformer()
    half = copy.deepcopy(model).to(dtype)
    # The normalisation stays exact float32, so the scorer sees what the float32 model's sees.
    for name, values in (("input_mean", IMAGENET_MEAN), ("input_std", IMAGENET_STD)):
        buffer = getattr(half, name)
        assert buffer.dtype == torch.float32 and torch.equal(buffer.flatten(), torch.tensor(values))
    assert copy.deepcopy(model).double().input_std.flatten().tolist() == list(IMAGENET_STD)
    wide = copy.deepcopy(half).float()  # the same rounded weights, in float32
    images = torch.randn(4, 3, 128, 128, generator=torch.Generator().manual_seed(4))
    for images_dtype in (torch.float32, dtype):
        x = images.to(images_dtype)
        assert torch.equal(half.tokenize(x).boxes, model.tokenize(x).boxes)
        with torch.no_grad():
            logits, expected = half(x), wide(x.float())
        assert logits.dtype == dtype
        # The ViT's own rounding in the dtype: measured under one ulp of the largest logit (0.7 for bfloat16,
        # 0.6 for float16); two ulps leave room for other CPUs' summation orders.
        torch.testing.assert_close(logits.float(), expected, rtol=0, atol=2 * eps(dtype) * expected.abs().max().item())


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_the_uniform_grid_on_half_images_and_in_half_precision(dtype):
    model = imagenet_quadformer()
    grid = UniformGrid(model, grid=5)
    images = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(5)).to(dtype)
    # CPUs have no half antialiased resize: it runs in float32, rounded once.
    half, wide = grid.tokenize(images), grid.tokenize(images.float())
    assert half.tokens.dtype == dtype and torch.equal(half.tokens, wide.tokens.to(dtype))
    with torch.no_grad():
        assert grid(images).dtype == torch.float32
        assert UniformGrid(copy.deepcopy(model).to(dtype), grid=5)(images).dtype == dtype


# ------------------------------------------------------------------------------------------------ channel counts
@pytest.mark.parametrize("channels", [1, 2, 4])
def test_a_quadformer_refuses_images_of_other_channels(channels):
    model = imagenet_quadformer()
    images = torch.randn(2, channels, 128, 128)
    pattern = rf"images must have the ViT's 3 input channels, \[B, 3, H, W\], got \[2, {channels}, 128, 128\]"
    for call in (model, model.tokenize, model.score, UniformGrid(model, grid=4)):
        with pytest.raises(ValueError, match=pattern):
            call(images)


def test_a_quadformer_of_one_channel():
    model = Quadformer(small_vit(channels=1), n_patches=31, input_mean=(0.5,), input_std=(0.25,)).eval()
    images = torch.randn(2, 1, 128, 128)
    with torch.no_grad():
        assert model(images).shape == (2, 5)
    # The scorer sees the unnormalised images.
    expected = PixelBlur(16, 64)(images * 0.25 + 0.5)
    assert all(torch.equal(a, b) for a, b in zip(model.score(images), expected, strict=True))
    with pytest.raises(ValueError, match=r"input_mean and input_std need 1 values"):
        Quadformer(small_vit(channels=1), n_patches=31, input_mean=IMAGENET_MEAN, input_std=IMAGENET_STD)


def test_a_prepared_mosaic_of_other_channels_or_patch_size():
    model = imagenet_quadformer()
    pyramid = random_pyramid(mixres.QuadtreeGeometry(128, 128, 16, 64), 1, seed=0)
    for images, patch_size in ((torch.rand(1, 4, 128, 128), 16), (torch.rand(1, 3, 128, 128), 8)):
        mosaic = mixres.tokenize(images, pyramid, 31, patch_size=patch_size)
        with pytest.raises(ValueError, match=r"mosaic tokens must be \[B, N, 3, 16, 16\] \(the ViT's channels and "
                                             r"patch size\), got \[1, 31, "):
            model(mosaic)


def test_a_prepared_mosaic_with_leaves_larger_than_the_models():
    # The model's leaves stop at 64 px; a mosaic of 128 px leaves still gets the mean of the table over each leaf.
    model = imagenet_quadformer()
    images = torch.rand(2, 3, 256, 256)
    mosaic = mixres.tokenize(images, torch.rand(2, 256, 256), 7, max_patch_size=128)
    assert (mosaic.boxes[..., 2] == 128).any()
    positions = model.pos_embed(mosaic, model.vit)
    table = resample_abs_pos_embed(model.vit.pos_embed[:, 1:], new_size=[16, 16], old_size=[8, 8],
                                   num_prefix_tokens=0)
    table = table[0].T.reshape(-1, 16, 16)  # [D, 16, 16]
    for b in range(2):
        for n, (y, x, size) in enumerate(mosaic.boxes[b].tolist()):
            cells = table[:, y // 16:(y + size) // 16, x // 16:(x + size) // 16]
            torch.testing.assert_close(positions[b, n], cells.mean(dim=(1, 2)), rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        assert torch.isfinite(model(mosaic)).all()


@pytest.mark.parametrize("channels", [1, 4])
def test_network_scorers_name_the_channels_their_network_takes(channels):
    images = torch.rand(2, channels, 128, 128)
    with pytest.raises(ValueError, match=rf"images have {channels} channels, but backbone 'shufflenet_v2_x0_5' "
                                         r"takes 3 \(its first convolution, 'conv1.0', has in_channels=3\)"):
        random_feature_scorer(normalize=False)(images)
    with pytest.raises(ValueError, match=r"normalize=True standardises RGB images"):
        random_feature_scorer()(images)
    with pytest.raises(ValueError, match=rf"images have {channels} channels, but model Sequential takes 3 \(its "
                                         r"first convolution, '0', has in_channels=3\): pass images \[B, 3, H, W\]"):
        GradCAM(tiny_cnn(), min_patch_size=16, max_patch_size=64)(images)
    # A network of that many channels is fine.
    assert GradCAM(tiny_cnn(channels), min_patch_size=16, max_patch_size=64)(images)[0].shape == (2, 2, 2)


@pytest.mark.parametrize("channels", [1, 2, 4, 7])
def test_scorers_that_take_any_channel_count(channels):
    images = textured_images(channels=channels)
    # PixelBlur's error is the mean over channels: the mean of each channel's own scores.
    per_channel = [PixelBlur(16, 64)(images[:, c:c + 1]) for c in range(channels)]
    for level, parts in zip(PixelBlur(16, 64)(images), zip(*per_channel), strict=True):
        torch.testing.assert_close(level, torch.stack(parts).mean(dim=0), rtol=1e-5, atol=1e-7)
    # Entropy's grey is the channel mean unless there are 3 channels (luma).
    grey = images.mean(dim=1, keepdim=True)
    for got, expected in zip(Entropy(16, 64)(images), Entropy(16, 64)(grey), strict=True):
        torch.testing.assert_close(got, expected)
    for scorer in (Random(16, 64, seed=0), Uniform(16, 64), Precomputed(torch.rand(2, 8, 8), 16, 64)):
        assert [m.shape for m in scorer(images)] == [(2, 2, 2), (2, 4, 4)]
    assert mixres.tokenize(images, PixelBlur(16, 64), 31).tokens.shape == (2, 31, channels, 16, 16)


NORMALISATIONS = [
    (dict(input_mean=(0.5,) * 4), ValueError, r"input_mean and input_std need 3 values \(the ViT's channels\), got 4"),
    (dict(input_std=(0.5, 0.5)), ValueError, r"need 3 values \(the ViT's channels\), got 2 for input_std"),
    (dict(input_mean="abc"), TypeError, r"input_mean must be a sequence of 3 numbers"),
    (dict(input_std=0.5), TypeError, r"input_std must be a sequence of 3 numbers"),
    (dict(input_mean=(0.5, None, 0.5)), TypeError, r"input_mean must be a sequence of 3 numbers"),
    (dict(input_mean=(0.5, math.nan, 0.5)), ValueError, r"input_mean must be finite numbers"),
    (dict(input_mean=(0.5, math.inf, 0.5)), ValueError, r"input_mean must be finite numbers"),
    (dict(input_std=(0.5, 0.0, 0.5)), ValueError, r"input_std must be positive numbers"),
    (dict(input_std=(0.5, -0.2, 0.5)), ValueError, r"input_std must be positive numbers"),
    (dict(input_std=(0.5, math.nan, 0.5)), ValueError, r"input_std must be positive numbers"),
]


@pytest.mark.parametrize("kwargs, error, pattern", NORMALISATIONS, ids=[str(case[0]) for case in NORMALISATIONS])
def test_bad_input_normalisation(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        Quadformer(small_vit(), n_patches=31, **kwargs)


def test_input_normalisation_may_be_any_sequence_of_numbers():
    for mean in ([0.5, 0.5, 0.5], np.array([0.5, 0.5, 0.5]), torch.tensor([0.5, 0.5, 0.5])):
        model = Quadformer(small_vit(), n_patches=31, input_mean=mean, input_std=(1, 2, 3))
        assert model.input_mean.flatten().tolist() == [0.5] * 3 and model.input_std.flatten().tolist() == [1, 2, 3]


# ------------------------------------------------------------------------------------------ limits of the types
def make_sizes(**changes):
    """tokenize of a 128 px image and a dense saliency map, 4 leaves, with ``changes`` to its arguments."""
    return lambda: mixres.tokenize(torch.rand(1, 3, 128, 128), torch.rand(1, 128, 128), **({"n_patches": 4} | changes))


LIMITS = [
    # (what, call, exception, message pattern)
    ("bins 0", lambda: Entropy(bins=0), ValueError, r"bins must be an int >= 2 and at most 65536 \(2\*\*16\), got 0"),
    ("bins 1", lambda: Entropy(bins=1), ValueError, r"bins must be an int >= 2 and at most 65536"),
    ("bins -1", lambda: Entropy(bins=-1), ValueError, r"bins must be an int >= 2.*got -1"),
    ("bins 2**31", lambda: Entropy(bins=2 ** 31), ValueError, r"at most 65536 \(2\*\*16\), got 2147483648"),
    ("bins 2**63", lambda: Entropy(bins=2 ** 63), ValueError, r"at most 65536 \(2\*\*16\), got 9223372036854775808"),
    ("bins float", lambda: Entropy(bins=32.0), TypeError, r"bins must be an int >= 2.*got float 32.0"),
    ("bins bool", lambda: Entropy(bins=True), TypeError, r"bins must be an int >= 2.*got bool True"),
    ("bins numpy float", lambda: Entropy(bins=np.float64(32)), TypeError, r"bins must be an int.*got float64"),
    ("value_range above float32", lambda: Entropy(value_range=(0, 1e39)), ValueError,
     r"value_range must be finite with lo < hi in float32"),
    ("value_range span above float32", lambda: Entropy(value_range=(-3e38, 3e38)), ValueError,
     r"value_range must be finite with lo < hi in float32"),
    ("value_range equal in float32", lambda: Entropy(value_range=(1.0, 1.0 + 1e-12)), ValueError,
     r"lo < hi after rounding to float32"),
    ("seed -1", lambda: Random(seed=-1), ValueError,
     r"seed must be an int or None \(an int in \[0, 2\*\*64\)\), got -1"),
    ("seed 2**64", lambda: Random(seed=2 ** 64), ValueError, r"in \[0, 2\*\*64\)\), got 18446744073709551616"),
    ("seed -2**63", lambda: Random(seed=-2 ** 63), ValueError, r"in \[0, 2\*\*64\)"),
    ("seed float", lambda: Random(seed=1.0), TypeError, r"seed must be an int or None"),
    ("seed tensor", lambda: Random(seed=torch.tensor(3)), TypeError, r"seed must be an int.*pass int\(value\)"),
    ("min_patch_size 0", make_sizes(min_patch_size=0), ValueError, r"min_patch_size must be a positive int, got 0"),
    ("min_patch_size -16", make_sizes(min_patch_size=-16), ValueError, r"min_patch_size must be a positive int"),
    ("min_patch_size 2**62", make_sizes(min_patch_size=2 ** 62), ValueError,
     r"min_patch_size 4611686018427387904 must be at most max_patch_size 64"),
    ("max_patch_size 2**62", make_sizes(max_patch_size=2 ** 62), ValueError,
     r"image height 128 is not a multiple of max_patch_size 4611686018427387904"),
    ("min_patch_size float", make_sizes(min_patch_size=16.0), TypeError,
     r"min_patch_size must be a positive int, got float 16.0"),
    ("min_patch_size bool", make_sizes(min_patch_size=True), TypeError, r"min_patch_size must be a positive int"),
    ("max_patch_size str", make_sizes(max_patch_size="64"), TypeError, r"max_patch_size must be a positive int"),
    ("patch_size 0", make_sizes(patch_size=0), ValueError, r"patch_size must be a positive int or None"),
    ("patch_size -1", make_sizes(patch_size=-1), ValueError, r"patch_size must be a positive int or None"),
    ("patch_size float", make_sizes(patch_size=16.0), TypeError, r"patch_size must be a positive int or None"),
    ("patch_size bool", make_sizes(patch_size=False), TypeError, r"patch_size must be a positive int or None"),
    ("patch_size 2**62", make_sizes(patch_size=2 ** 62), ValueError, r"patch_size must be .*32768"),
    ("n_patches bool", make_sizes(n_patches=True), TypeError, r"n_patches must be an int, got bool"),
    ("n_patches float", make_sizes(n_patches=4.0), TypeError, r"n_patches must be an int, got float"),
    ("n_patches numpy float", make_sizes(n_patches=np.float32(4)), TypeError, r"n_patches must be an int"),
    ("n_patches tensor", make_sizes(n_patches=torch.tensor(4)), TypeError,
     r"n_patches must be an int, got Tensor tensor\(4\): pass int\(value\)"),
    ("n_patches 2**63", make_sizes(n_patches=2 ** 63), ValueError, r"n_patches=9223372036854775808 is unreachable"),
    ("n_patches -2**63", make_sizes(n_patches=-2 ** 63), ValueError, r"unreachable.*nearest valid: 4"),
    ("scorer sizes float", lambda: PixelBlur(16.0, 64), TypeError, r"min_patch_size must be a positive int"),
    ("scorer sizes 2**62", lambda: Entropy(16, 2 ** 62 + 16), ValueError, r"must be a power of two"),
    ("scorer sizes 2**40", lambda: Entropy(16, 2 ** 40), ValueError,
     r"max_patch_size must be at most 2147483647 \(boxes hold int32"),
    ("zero height", lambda: mixres.tokenize(torch.rand(1, 3, 0, 128), torch.rand(1, 0, 128)), ValueError,
     r"images have no pixels \(H x W = 0 x 128\)"),
    ("zero width to a scorer", lambda: Entropy()(torch.rand(1, 3, 64, 0)), ValueError, r"images have no pixels"),
    ("empty batch to a scorer", lambda: PixelBlur()(torch.rand(0, 3, 64, 64)), ValueError, r"empty batch \(B=0\)"),
    ("empty batch to a model", lambda: imagenet_quadformer()(torch.rand(0, 3, 128, 128)), ValueError,
     r"empty batch \(B=0\)"),
    ("grid_for_budget 0", lambda: grid_for_budget(0, (224, 224)), ValueError, r"n_patches must be a positive int"),
    ("grid_for_budget float", lambda: grid_for_budget(49.0, (224, 224)), TypeError, r"n_patches must be a positive"),
    ("uniform grid 0", lambda: UniformGrid(small_vit(), grid=(0, 3)), ValueError, r"grid must be a positive int"),
    ("uniform grid float", lambda: UniformGrid(small_vit(), grid=2.5), TypeError, r"grid must be a positive int"),
    ("uniform grid triple", lambda: UniformGrid(small_vit(), grid=(2, 2, 2)), ValueError, r"\(rows, cols\)"),
]


@pytest.mark.parametrize("what, call, error, pattern", LIMITS, ids=[case[0] for case in LIMITS])
def test_limits_get_a_clear_error(what, call, error, pattern):
    with pytest.raises(error, match=pattern):
        call()


@pytest.mark.parametrize("integer", [np.int64, np.int32, np.uint16, np.int8])
def test_numpy_integers_are_taken_for_sizes_counts_and_seeds(integer):
    images = torch.rand(2, 3, 128, 128)
    pyramid = random_pyramid(mixres.QuadtreeGeometry(128, 128, 16, 64), 2, seed=0)
    expected = mixres.tokenize(images, pyramid, 31, min_patch_size=16, max_patch_size=64, patch_size=16)
    for tokenize in TOKENIZERS.values():
        mosaic = tokenize(images, pyramid, integer(31), min_patch_size=integer(16), max_patch_size=integer(64),
                          patch_size=integer(16))
        assert torch.equal(mosaic.boxes, expected.boxes) and type(mosaic.min_patch_size) is int
        torch.testing.assert_close(mosaic.tokens, expected.tokens)
    scorer = PixelBlur(integer(16), integer(64))
    assert (scorer.min_patch_size, scorer.max_patch_size) == (16, 64) and type(scorer.max_patch_size) is int
    assert mixres.tokenize(images, scorer, integer(31), max_patch_size=64).boxes.shape == (2, 31, 3)
    assert Entropy(bins=integer(32)).bins == 32
    assert all(torch.equal(a, b) for a, b in zip(Random(seed=integer(7))(images), Random(seed=7)(images)))
    model = imagenet_quadformer(n_patches=integer(31))
    assert model.n_patches == 31 and model.tokenize(images, n_patches=integer(34)).n_patches == 34
    assert grid_for_budget(integer(100), (224, 224)) == (10, 10)
    assert UniformGrid(model, grid=(integer(3), integer(4))).grid == (3, 4)


@pytest.mark.parametrize("seed", [0, 1, 2 ** 32, 2 ** 63, 2 ** 64 - 1, np.uint64(2 ** 64 - 1)])
def test_random_seeds_across_their_range(seed):
    images = torch.rand(1, 3, 128, 128)
    got = Random(16, 64, seed=seed)(images)
    # The oracle: torch's own generator seeded with the same number, drawing the maps in order.
    generator = torch.Generator().manual_seed(int(seed))
    expected = [torch.rand(1, 2, 2, generator=generator), torch.rand(1, 4, 4, generator=generator)]
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


def test_entropy_at_the_limits_of_its_levels():
    images = textured_images()
    # The most levels, and a range as wide as float32 allows: both give finite entropies within [0, log2(bins)].
    for scorer in (Entropy(16, 64, bins=2 ** 16), Entropy(16, 64, value_range=(-1e38, 1e38))):
        for level in scorer(images):
            assert torch.isfinite(level).all() and (level >= 0).all() and (level <= math.log2(scorer.bins)).all()
    # With 2**16 levels of [0, 1), the random quarter of the image has all-distinct levels: log2 of the pixels.
    fine = Entropy(16, 64, bins=2 ** 16)(images)
    assert fine[1][0, 3, 3] > math.log2(32 * 32) - 0.05


@settings(max_examples=60, deadline=None)
@given(height=st.integers(1, 4000), width=st.integers(1, 4000), n_patches=st.integers(1, 3000))
def test_grid_for_budget_is_the_closest_grid(height, width, n_patches):
    rows, cols = grid_for_budget(n_patches, (height, width))
    aspect = width / height
    assert cols == max(1, round(rows * aspect))
    # No grid of the aspect's family is closer, and a tie goes to the fewer tokens (brute force over the rows).
    counts = [r * max(1, round(r * aspect)) for r in range(1, n_patches + 2)]
    best = min(counts, key=lambda count: (abs(count - n_patches), count))
    assert rows * cols == best


def test_grid_for_budget_of_a_huge_budget_is_immediate():
    start = time.perf_counter()
    assert grid_for_budget(2 ** 62, (224, 224)) == (2 ** 31, 2 ** 31)
    rows, cols = grid_for_budget(10 ** 30, (256, 384))
    assert abs(rows * cols - 10 ** 30) / 10 ** 30 < 1e-6 and cols == round(rows * 1.5)
    assert time.perf_counter() - start < 1.0  # it used to count up through every row (2**31 of them)


@settings(max_examples=80, deadline=None)
@given(value=st.one_of(st.integers(-2 ** 70, 2 ** 70), st.floats(allow_nan=True), st.booleans(), st.none(),
                       st.text(max_size=3), st.integers(-2 ** 63, 2 ** 63 - 1).map(np.int64)),
       field=st.sampled_from(["height", "width", "min_patch_size", "max_patch_size"]))
def test_any_size_gives_a_geometry_or_a_clear_error(value, field):
    sizes = dict(height=128, width=128, min_patch_size=16, max_patch_size=64) | {field: value}
    integer = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    try:
        geometry = mixres.QuadtreeGeometry(**sizes)
    except TypeError as error:
        assert not integer and str(error).startswith(f"{field} must be a positive int, got ")
    except ValueError as error:
        assert integer and any(name in str(error) for name in ("height", "width", "patch_size"))
    else:
        assert integer and all(type(getattr(geometry, name)) is int for name in sizes) and geometry.n_roots >= 1
