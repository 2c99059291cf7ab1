"""The baseline scorers (Random, Uniform, Precomputed) and APT's Entropy: layouts, behaviour, and a per-patch oracle."""
import math

import pytest
import torch

import mixres
from mixres.scorers.base import Scorer
from mixres.scorers.baselines import Precomputed, Random, Uniform
from mixres.scorers.entropy import Entropy

import oracles

SCORERS = {
    "random": lambda lo, hi, batch: Random(lo, hi, seed=0),
    "uniform": lambda lo, hi, batch: Uniform(lo, hi),
    "precomputed": lambda lo, hi, batch: Precomputed(torch.rand(batch, 32, 48), lo, hi),
    "entropy": lambda lo, hi, batch: Entropy(lo, hi),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", SCORERS)
def test_pyramid_shapes_dtypes_device_and_tokenize(name, dtype):
    images = torch.rand(2, 3, 128, 192).to(dtype).requires_grad_()
    scorer = SCORERS[name](8, 64, 2)
    pyramid = scorer(images)
    assert [tuple(m.shape) for m in pyramid] == [(2, 2, 3), (2, 4, 6), (2, 8, 12)]
    assert all(m.dtype == torch.float32 and m.device == images.device for m in pyramid)
    assert all(torch.isfinite(m).all() and not m.requires_grad for m in pyramid)
    # tokenize calls the scorer itself and takes its patch sizes.
    mosaic = mixres.tokenize(images, scorer, n_patches=30)
    assert mosaic.boxes.shape == (2, 30, 3) and mosaic.min_patch_size == 8


@pytest.mark.parametrize("name", SCORERS)
def test_equal_sizes_give_an_empty_pyramid(name):
    assert SCORERS[name](32, 32, 1)(torch.rand(1, 3, 64, 96)) == []


def test_random_is_reproducible_with_a_seed_and_fresh_without():
    images = torch.rand(2, 3, 128, 128)
    first = Random(16, 64, seed=7)(images)
    assert all(((m >= 0) & (m < 1)).all() for m in first)
    global_state = torch.get_rng_state()
    again = Random(16, 64, seed=7)
    for _ in range(2):
        assert all(torch.equal(a, b) for a, b in zip(first, again(images), strict=True))
    assert torch.equal(torch.get_rng_state(), global_state)  # a seeded scorer leaves the global stream alone
    assert not all(torch.equal(a, b) for a, b in zip(first, Random(16, 64, seed=8)(images)))
    # Only the shape is read, not the values.
    assert all(torch.equal(a, b) for a, b in zip(first, Random(16, 64, seed=7)(torch.zeros_like(images))))

    unseeded = Random(16, 64)
    assert not all(torch.equal(a, b) for a, b in zip(unseeded(images), unseeded(images)))
    torch.manual_seed(3)
    drawn = unseeded(images)
    torch.manual_seed(3)
    assert all(torch.equal(a, b) for a, b in zip(drawn, unseeded(images)))


def test_random_checks_seed_and_shows_it():
    assert repr(Random(8, 32, seed=5)) == "Random(min_patch_size=8, max_patch_size=32, seed=5)"
    for seed in ("1", 1.0, True):
        with pytest.raises(TypeError, match="seed must be an int or None"):
            Random(seed=seed)


def regular_grid(height, width, size):
    return torch.tensor([(y, x, size) for y in range(0, height, size) for x in range(0, width, size)],
                        dtype=torch.int32)


def test_uniform_gives_the_regular_grid_at_the_largest_budget():
    images = torch.rand(2, 3, 128, 192)
    assert all((m == 1).all() for m in Uniform(16, 64)(images))
    mosaic = mixres.tokenize(images, Uniform(16, 64), n_patches=8 * 12)
    assert torch.equal(mosaic.boxes, regular_grid(128, 192, 16).expand(2, -1, -1))


def test_uniform_splits_in_raster_order_below_the_largest_budget():
    images = torch.rand(1, 3, 128, 192)
    # 6 roots; refining the top row of 3 roots down to 16 px takes 3 * (1 + 4) splits of 3 new leaves each.
    boxes = mixres.tokenize(images, Uniform(16, 64), n_patches=6 + 3 * 15).boxes[0]
    want = torch.cat([regular_grid(64, 192, 16), regular_grid(64, 192, 64) + torch.tensor([64, 0, 0])])
    assert torch.equal(boxes, want.int())


@pytest.mark.parametrize("map_size", [(32, 48), (128, 192), (12, 18)], ids=["cells", "pixels", "resampled"])
def test_precomputed_dense_map_is_summed_per_patch(map_size):
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 128, 192, generator=generator)
    saliency = torch.rand(2, *map_size, generator=generator)
    want = oracles.saliency_pyramid(saliency, 128, 192, 16, 64)
    got = Precomputed(saliency, 16, 64)(images)
    torch.testing.assert_close(got, want)
    # The leaves the oracle grows from the map.
    assert torch.equal(mixres.tokenize(images, Precomputed(saliency, 16, 64), n_patches=30).boxes,
                       oracles.tokenize(images, saliency, 30, 16, 64).boxes)
    half = Precomputed(saliency.half(), 16, 64)(images)
    assert all(m.dtype == torch.float32 for m in half)
    torch.testing.assert_close(half, oracles.saliency_pyramid(saliency.half().float(), 128, 192, 16, 64))


def test_precomputed_pyramid_is_returned_in_order():
    images = torch.rand(2, 3, 128, 192)
    coarse, fine = torch.rand(2, 2, 3), torch.rand(2, 4, 6)
    for pyramid in ([coarse, fine], (coarse, fine), {32: fine, 64: coarse}):
        got = Precomputed(pyramid, 16, 64)(images)
        assert len(got) == 2 and torch.equal(got[0], coarse) and torch.equal(got[1], fine)
    doubles = Precomputed([coarse.double(), fine.double()], 16, 64)(images)
    assert [m.dtype for m in doubles] == [torch.float64, torch.float64]  # kept: ties may need the precision
    assert repr(Precomputed([coarse, fine], 16, 64)).endswith("saliency=pyramid of 2 maps)")


def test_precomputed_checks_the_saliency_against_the_images():
    images = torch.rand(2, 3, 128, 192)
    with pytest.raises(ValueError, match="saliency has batch size 3 but images has 2"):
        Precomputed(torch.rand(3, 32, 48), 16, 64)(images)
    with pytest.raises(ValueError, match="saliency has batch size 1 but images has 2"):
        Precomputed([torch.rand(1, 2, 3), torch.rand(1, 4, 6)], 16, 64)(images)
    with pytest.raises(ValueError, match="saliency is on meta but images are on cpu"):
        Precomputed(torch.rand(2, 32, 48, device="meta"), 16, 64)(images)
    with pytest.raises(ValueError, match="saliency is on cpu but images are on meta"):
        Precomputed([torch.rand(2, 2, 3), torch.rand(2, 4, 6)], 16, 64)(images.to("meta"))
    with pytest.raises(ValueError, match=r"saliency map of patch size 32 must have shape .* \[2, 4, 6\]"):
        Precomputed([torch.rand(2, 2, 3), torch.rand(2, 4, 4)], 16, 64)(images)
    with pytest.raises(ValueError, match="aspect ratio"):
        Precomputed(torch.rand(2, 32, 32), 16, 64)(images)


def test_precomputed_rejects_bad_saliency_when_built():
    with pytest.raises(ValueError, match="dense map of rank 3"):
        Precomputed(torch.rand(2, 1, 32, 48))
    with pytest.raises(ValueError, match="dense map of rank 3"):
        Precomputed(torch.rand(32, 48))
    with pytest.raises(ValueError, match="pyramid must have rank 3"):
        Precomputed([torch.rand(2, 3), torch.rand(4, 6)])
    with pytest.raises(ValueError, match="must hold 2 maps"):
        Precomputed([torch.rand(2, 2, 3)])
    with pytest.raises(ValueError, match="one map per splittable patch size"):
        Precomputed({64: torch.rand(2, 2, 3), 16: torch.rand(2, 8, 12)})
    with pytest.raises(TypeError, match="floating point"):
        Precomputed(torch.ones(2, 32, 48, dtype=torch.int64))
    with pytest.raises(TypeError, match="must be Tensors"):
        Precomputed([[0.5], torch.rand(2, 4, 6)])
    with pytest.raises(TypeError, match="got ndarray"):
        Precomputed(torch.rand(2, 32, 48).numpy())


def per_patch_entropy(images, min_patch_size, max_patch_size, bins, value_range):
    """The oracle: grey in float64, then one torch.histc per patch crop and the entropy in bits."""
    images = images.double()
    grey = images.mean(dim=1) if images.shape[1] != 3 else (0.299 * images[:, 0] + 0.587 * images[:, 1]
                                                              + 0.114 * images[:, 2])
    lo, hi = value_range
    grey = grey.clamp(lo, hi)  # histc drops values outside its range; the scorer counts them at the ends

    def entropy(crop):
        p = torch.histc(crop, bins=bins, min=lo, max=hi) / crop.numel()
        p = p[p > 0]
        return -(p * p.log2()).sum()

    return oracles.per_patch_pyramid(grey, min_patch_size, max_patch_size,
                                     lambda crops, size: torch.stack([entropy(crop) for crop in crops]))


def textured_images(batch, channels, height, width, bins, value_range, seed):
    """Noise of a contrast that varies from one 4 x 4 cell to the next, so that patches span many entropies.

    A pixel whose grey value lies within 1e-3 of a level's width from a level boundary is moved by a third of a
    level (on every channel: the grey weights sum to 1), so that float32 and float64 rounding agree on its level.
    """
    generator = torch.Generator().manual_seed(seed)
    lo, hi = value_range
    contrast = torch.rand(batch, 1, height // 4, width // 4, generator=generator, dtype=torch.float64)
    contrast = contrast.repeat_interleave(4, dim=2).repeat_interleave(4, dim=3)
    noise = torch.rand(batch, channels, height, width, generator=generator, dtype=torch.float64)
    # The range is overshot by a quarter on either side, so that clamping is exercised too.
    images = lo + (hi - lo) * (0.5 + 1.5 * (noise - 0.5) * contrast)
    weights = torch.tensor([0.299, 0.587, 0.114], dtype=torch.float64) if channels == 3 else \
        torch.full((channels,), 1 / channels, dtype=torch.float64)
    level = (torch.einsum("bchw,c->bhw", images, weights) - lo) / (hi - lo) * bins
    near_edge = (level - level.round()).abs() < 1e-3
    return (images + near_edge.unsqueeze(1) * (hi - lo) / bins / 3).float()


@pytest.mark.parametrize("channels, min_patch_size, max_patch_size, height, width, bins, value_range", [
    (3, 8, 32, 64, 96, 32, (0.0, 1.0)),
    (1, 4, 16, 48, 16, 8, (0.0, 1.0)),
    (4, 2, 16, 32, 32, 5, (-1.0, 2.0)),
    (3, 4, 8, 24, 40, 256, (0.0, 255.0)),
])
def test_entropy_matches_per_patch_oracle(channels, min_patch_size, max_patch_size, height, width, bins,
                                          value_range):
    images = textured_images(2, channels, height, width, bins, value_range, seed=channels)
    scorer = Entropy(min_patch_size, max_patch_size, bins=bins, value_range=value_range)
    want = per_patch_entropy(images, min_patch_size, max_patch_size, bins, value_range)
    assert len(set(torch.cat([w.flatten() for w in want]).tolist())) > 10  # the images are far from constant
    for got in (scorer(images), scorer(images.double())):
        torch.testing.assert_close(got, [w.float() for w in want], rtol=1e-5, atol=1e-5)


def test_entropy_of_a_constant_image_is_zero():
    images = torch.tensor([0.0, 0.3, 1.0, -5.0, 7.0]).view(5, 1, 1, 1).expand(5, 3, 64, 128)
    assert all((m == 0).all() for m in Entropy(8, 64)(images))


def test_entropy_reaches_log2_bins_on_a_uniform_histogram():
    bins = 16
    # An 8 x 8 patch holding each of the 16 level centres 4 times, in a random order; grey channels.
    centres = (torch.arange(64) % bins + 0.5) / bins
    patch = centres[torch.randperm(64, generator=torch.Generator().manual_seed(0))].view(8, 8)
    images = patch.expand(1, 3, 8, 8)
    (score,) = Entropy(4, 8, bins=bins)(images)
    torch.testing.assert_close(score, torch.full((1, 1, 1), math.log2(bins)))
    noise = Entropy(4, 16, bins=bins)(torch.rand(2, 3, 64, 64))
    assert all((m <= math.log2(bins) + 1e-5).all() for m in noise)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_entropy_of_half_precision_images_is_computed_in_float32(dtype):
    images = torch.rand(2, 3, 64, 64).to(dtype)
    for half, full in zip(Entropy(8, 32)(images), Entropy(8, 32)(images.float()), strict=True):
        assert half.dtype == torch.float32 and torch.equal(half, full)


def test_entropy_splits_the_noisy_half_first():
    images = torch.rand(1, 3, 128, 128)
    images[..., 64:] = 0.5
    # 2 noisy roots and their 8 quadrants: 10 splits refine the left half down to 16 px.
    boxes = mixres.tokenize(images, Entropy(16, 64), n_patches=4 + 3 * 10).boxes[0]
    assert (boxes[boxes[:, 1] >= 64, 2] == 64).all() and (boxes[boxes[:, 1] < 64, 2] == 16).all()


def test_entropy_checks_its_arguments():
    assert repr(Entropy(8, 32, bins=4, value_range=(0, 255))) == \
        "Entropy(min_patch_size=8, max_patch_size=32, bins=4, value_range=(0.0, 255.0))"
    for bins in (1, 0, -1, 2 ** 16 + 1, 2 ** 31, 2 ** 63):
        with pytest.raises(ValueError, match=r"bins must be an int >= 2 and at most 65536 \(2\*\*16\), got"):
            Entropy(bins=bins)
    for bins in (2.0, True, "32", None):  # not integers: a TypeError (it was a ValueError before issue 12)
        with pytest.raises(TypeError, match="bins must be an int >= 2"):
            Entropy(bins=bins)
    for value_range in ((1.0, 0.0), (0.5, 0.5), (0.0, math.inf), (math.nan, 1.0)):
        with pytest.raises(ValueError, match="value_range must be finite with lo < hi"):
            Entropy(value_range=value_range)
    for value_range in (1.0, (0.0, 1.0, 2.0), ("a", "b")):
        with pytest.raises(TypeError, match="value_range must be a pair of numbers"):
            Entropy(value_range=value_range)
    with pytest.raises(ValueError, match="multiple of max_patch_size"):
        Entropy()(torch.rand(1, 3, 100, 64))


@pytest.mark.parametrize("name", SCORERS)
def test_packed_is_the_pyramid_packed_with_its_geometry(name):
    images = torch.rand(2, 3, 128, 192)
    scorer = SCORERS[name](8, 64, 2)
    packed = scorer.packed(images)
    assert packed.geometry == mixres.QuadtreeGeometry(128, 192, 8, 64)
    assert torch.equal(packed.scores, oracles.pack(scorer(images), 2))


def test_a_scorer_that_returns_a_dense_map_still_tokenizes():
    """A Scorer's pyramid may be a dense saliency map, as any scores may: packed() sums it over each patch."""
    class Brightness(Scorer):
        def __call__(self, images):
            return images.mean(dim=1)

    images = torch.rand(2, 3, 128, 192, generator=torch.Generator().manual_seed(6))
    pyramid = oracles.saliency_pyramid(images.mean(dim=1), 128, 192, 16, 64)
    torch.testing.assert_close(Brightness(16, 64).packed(images).scores, oracles.pack(pyramid, 2))
    oracles.assert_matches(mixres.tokenize(images, Brightness(16, 64), n_patches=30),
                           oracles.tokenize(images, pyramid, 30))
