"""mixres.tokenize: outputs, score forms (each against the independent oracle, oracles.tokenize), the reference
fallback and every bad-input case."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import mixres
from mixres import ops

import oracles
from helpers import random_pyramid

TOKENIZERS = {"cpp": mixres.tokenize, "reference": mixres.reference.tokenize}


def make_inputs(batch=2, height=256, width=192, min_size=16, max_size=64, seed=0, ties=False):
    images = torch.rand(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))
    geometry = mixres.QuadtreeGeometry(height, width, min_size, max_size)
    return images, random_pyramid(geometry, batch, seed, ties)


def assert_same_mosaic(a: mixres.Mosaic, b: mixres.Mosaic):
    assert torch.equal(a.boxes, b.boxes) and torch.equal(a.centers, b.centers)
    torch.testing.assert_close(a.tokens, b.tokens)


def test_outputs_and_their_layout():
    images, pyramid = make_inputs()
    mosaic = mixres.tokenize(images, pyramid, n_patches=63)
    assert mosaic.tokens.shape == (2, 63, 3, 16, 16) and mosaic.tokens.dtype == torch.float32
    assert mosaic.boxes.shape == (2, 63, 3) and mosaic.boxes.dtype == torch.int32
    assert mosaic.centers.shape == (2, 63, 2) and mosaic.centers.dtype == torch.float32
    assert (mosaic.n_patches, mosaic.patch_size, mosaic.image_size) == (63, 16, (256, 192))
    channels_last = mosaic.tokens_channels_last
    assert channels_last.shape == (2, 63, 16, 16, 3) and channels_last.data_ptr() == mosaic.tokens.data_ptr()


@pytest.mark.parametrize("ties", [False, True], ids=["random", "ties"])
@pytest.mark.parametrize("mode, patch_size", [("area", 16), ("bilinear", 12), ("area", 24), ("bilinear", 16)])
@pytest.mark.parametrize("tokenizer", TOKENIZERS)
def test_tokenize_matches_the_oracle(tokenizer, mode, patch_size, ties):
    images, pyramid = make_inputs(ties=ties)
    for n_patches in (12, 63, 120):
        mosaic = TOKENIZERS[tokenizer](images, pyramid, n_patches=n_patches, patch_size=patch_size, mode=mode)
        oracles.assert_matches(mosaic, oracles.tokenize(images, pyramid, n_patches, 16, 64, patch_size, mode))


def test_flat_tokens_feed_a_linear_patch_embedding():
    # All leaves at s_min in raster order: the linear embedding of flat tokens is a ViT's strided Conv2d.
    images = torch.rand(2, 3, 64, 96)
    geometry = mixres.QuadtreeGeometry(64, 96, 16, 32)
    uniform = [torch.ones(2, *geometry.grid(32))]
    mosaic = mixres.tokenize(images, uniform, n_patches=geometry.max_patches, max_patch_size=32)
    weight = torch.randn(8, 3, 16, 16)
    conv = F.conv2d(images, weight, stride=16).flatten(2).transpose(1, 2)
    torch.testing.assert_close(mosaic.flat_tokens() @ weight.flatten(1).T, conv, rtol=1e-4, atol=1e-4)


def test_pyramid_as_dict_and_float64():
    images, pyramid = make_inputs()
    as_list = mixres.tokenize(images, pyramid, n_patches=63)
    as_dict = {64: pyramid[0], 32: pyramid[1]}
    assert_same_mosaic(as_list, mixres.tokenize(images, as_dict, n_patches=63))
    oracles.assert_matches(as_list, oracles.tokenize(images, as_dict, 63))
    as_double = mixres.tokenize(images.double(), [m.double() for m in pyramid], n_patches=63)
    assert as_double.tokens.dtype == torch.float64 and torch.equal(as_double.boxes, as_list.boxes)


# (map height, map width, image side, max_patch_size): maps 16, 4 and 2 times finer than the s_min grid or equal to it
# (cell averages), and maps that do not divide it, coarser (Grad-CAM's 7x7 over 224 px) or finer (bilinear).
SALIENCY_SIZES = [(128, 128, 128, 64), (32, 32, 128, 64), (16, 16, 128, 64), (8, 8, 128, 64), (7, 7, 224, 32),
                  (3, 3, 128, 64), (28, 28, 128, 64)]


@pytest.mark.parametrize("ties", [False, True], ids=["random", "ties"])
@pytest.mark.parametrize("map_height, map_width, side, max_size", SALIENCY_SIZES,
                         ids=["{}x{}-{}px".format(*case) for case in SALIENCY_SIZES])
@pytest.mark.parametrize("tokenizer", TOKENIZERS)
def test_dense_saliency_is_summed_over_each_patch(tokenizer, map_height, map_width, side, max_size, ties):
    generator = torch.Generator().manual_seed(map_height)
    images = torch.rand(2, 3, side, side, generator=generator)
    # Ties: small integers, whose cell averages, bilinear blends and sums are exact in any order.
    saliency = (torch.randint(0, 3, (2, map_height, map_width), generator=generator).float() if ties
                else torch.rand(2, map_height, map_width, generator=generator))
    geometry = mixres.QuadtreeGeometry(side, side, 16, max_size)
    expected = oracles.saliency_pyramid(saliency, side, side, 16, max_size)
    torch.testing.assert_close(mixres.saliency_to_pyramid(saliency, geometry), expected)
    budgets = geometry.valid_n_patches()
    for n_patches in (budgets[len(budgets) // 3], budgets[-2]):
        oracles.assert_matches(TOKENIZERS[tokenizer](images, saliency, n_patches, max_patch_size=max_size),
                               oracles.tokenize(images, saliency, n_patches, 16, max_size))


def test_a_scorer_in_place_of_scores():
    images = torch.rand(2, 3, 128, 96, generator=torch.Generator().manual_seed(1))
    scorer = mixres.PixelBlur(16, 32)
    expected = oracles.tokenize(images, oracles.pixel_blur_pyramid(images, 16, 32), 18, 16, 32)
    # The patch sizes come from the scorer, or may repeat its own.
    oracles.assert_matches(mixres.tokenize(images, scorer, n_patches=18), expected)
    oracles.assert_matches(mixres.reference.tokenize(images, scorer, n_patches=18, max_patch_size=32), expected)
    # A plain function has no sizes: the defaults, 16 and 64, apply.
    images = torch.rand(2, 3, 128, 192, generator=torch.Generator().manual_seed(2))
    default_sizes = mixres.PixelBlur(16, 64)
    oracles.assert_matches(mixres.tokenize(images, lambda x: default_sizes(x), n_patches=33),
                           oracles.tokenize(images, oracles.pixel_blur_pyramid(images, 16, 64), 33))


@pytest.mark.parametrize("tokenizer", TOKENIZERS)
def test_a_packed_pyramid_in_place_of_its_maps(tokenizer):
    images, pyramid = make_inputs(seed=3)
    packed = mixres.PackedPyramid(oracles.pack(pyramid, 2), mixres.QuadtreeGeometry(256, 192, 16, 64))
    oracles.assert_matches(TOKENIZERS[tokenizer](images, packed, n_patches=63),
                           oracles.tokenize(images, pyramid, 63))


def recording_backend(ops_module, calls: list) -> SimpleNamespace:
    """The three ops of ``ops_module``, each noting its name and arguments in ``calls`` when it runs."""
    def recording(name):
        def run(*args):
            calls.append((name, args))
            return getattr(ops_module, name)(*args)
        return run
    return SimpleNamespace(**{name: recording(name) for name in ("build_quadtree", "extract_patches", "leaf_centers")})


def test_tokenize_runs_on_the_backend_it_is_given(monkeypatch):
    images, pyramid = make_inputs(seed=4)
    expected = oracles.tokenize(images, pyramid, 63)
    calls = []
    oracles.assert_matches(mixres.tokenize(images, pyramid, n_patches=63, backend=recording_backend(
        mixres.reference, calls)), expected)
    assert [name for name, _ in calls] == ["build_quadtree", "extract_patches", "leaf_centers"]
    # The reference's tokenize is that backend: it runs without mixres.ops.
    for name in ("build_quadtree", "extract_patches", "leaf_centers"):
        monkeypatch.setattr(ops, name, lambda *args: pytest.fail("the reference tokenizer ran mixres.ops"))
    oracles.assert_matches(mixres.reference.tokenize(images, pyramid, n_patches=63), expected)


def test_a_scorer_that_packs_its_scores_hands_them_to_the_quadtree_as_they_are(monkeypatch):
    """PixelBlur's fused op computes the packed layout: tokenize takes it without splitting it into maps and
    concatenating them again."""
    computed, calls = [], []
    pixel_blur_scores = ops.pixel_blur_scores

    def recording_pixel_blur_scores(*args):
        computed.append(pixel_blur_scores(*args))
        return computed[-1]

    monkeypatch.setattr(ops, "pixel_blur_scores", recording_pixel_blur_scores)
    images = torch.rand(2, 3, 128, 192, generator=torch.Generator().manual_seed(5))
    mosaic = mixres.tokenize(images, mixres.PixelBlur(16, 64), n_patches=30, backend=recording_backend(ops, calls))
    assert len(computed) == 1 and calls[0][0] == "build_quadtree" and calls[0][1][0] is computed[0]
    oracles.assert_matches(mosaic, oracles.tokenize(images, oracles.pixel_blur_pyramid(images, 16, 64), 30))


def test_gradients_reach_the_images():
    images, pyramid = make_inputs()
    images.requires_grad_()
    mixres.tokenize(images, pyramid, n_patches=63, mode="bilinear").tokens.square().sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0


def test_reference_fallback_without_kernels(monkeypatch):
    images, pyramid = make_inputs()
    expected = mixres.tokenize(images, pyramid, n_patches=63)
    monkeypatch.setattr(ops, "_KERNEL_DEVICES", frozenset())
    monkeypatch.setattr(ops, "_warned", set())
    with pytest.warns(UserWarning, match="using the pure-PyTorch reference on cpu"):
        fallback = mixres.tokenize(images, pyramid, n_patches=63)
    assert_same_mosaic(fallback, expected)


def test_valid_n_patches():
    budgets = mixres.valid_n_patches(224, min_patch_size=16, max_patch_size=32)
    assert budgets[0] == 49 and budgets[-1] == 196 and 100 in budgets and 101 not in budgets
    assert mixres.valid_n_patches(256, 192) == list(range(12, 193, 3))


def test_default_max_patch_size():
    from mixres.pyramid import default_max_patch_size

    assert default_max_patch_size(224, 224, 16) == 32 and default_max_patch_size(256, 384, 16) == 64
    assert default_max_patch_size(224, 256, 8) == 32 and default_max_patch_size(48, 48, 16) == 16
    with pytest.raises(ValueError, match="not a multiple of max_patch_size 16"):
        mixres.QuadtreeGeometry(200, 200, 16, default_max_patch_size(200, 200, 16))  # none divides: the error says so


def test_docstring_documents_shapes_and_errors():
    doc = mixres.tokenize.__doc__
    for phrase in ("[B, C, H, W]", "[B, N, C, p, p]", "[B, N, 3]", "[B, N, 2]", "Raises", "nearest valid"):
        assert phrase in doc


PACKED_GEOMETRY = mixres.QuadtreeGeometry(256, 192, 16, 64)  # make_inputs' images: P = 4 * 3 + 8 * 6 = 60
BAD_INPUTS = [
    # (what, kwargs changes, exception, message pattern)
    ("rank", dict(images=torch.rand(3, 256, 192)), ValueError, r"images must have rank 4"),
    ("integer images", dict(images=torch.zeros(2, 3, 256, 192, dtype=torch.uint8)), TypeError,
     r"images must be float16.*got torch.uint8.*255"),
    ("not a tensor", dict(images=[[0.0]]), TypeError, r"images must be a Tensor"),
    ("empty batch", dict(images=torch.rand(0, 3, 256, 192)), ValueError, r"empty batch \(B=0\)"),
    ("no channels", dict(images=torch.rand(2, 0, 256, 192)), ValueError, r"no channels"),
    ("size not divisible", dict(images=torch.rand(2, 3, 224, 192)), ValueError,
     r"height 224 is not a multiple of max_patch_size 64.*192 or 256.*max_patch_size=32"),
    ("ratio not a power of two", dict(max_patch_size=48), ValueError, r"must be a power of two"),
    ("min above max", dict(min_patch_size=128), ValueError, r"min_patch_size 128 must be at most max_patch_size 64"),
    ("zero patch size", dict(min_patch_size=0), ValueError, r"min_patch_size must be a positive int"),
    ("unreachable n_patches", dict(n_patches=64), ValueError, r"n_patches=64 is unreachable.*nearest valid: 63 or 66"),
    ("too many patches", dict(n_patches=400), ValueError, r"at most 192; nearest valid: 192"),
    ("too few patches", dict(n_patches=5), ValueError, r"nearest valid: 12"),
    ("float n_patches", dict(n_patches=63.0), TypeError, r"n_patches must be an int"),
    ("bad patch_size", dict(patch_size=0), ValueError, r"patch_size must be a positive int"),
    ("bad mode", dict(mode="nearest"), ValueError, r"mode must be 'area' or 'bilinear'"),
    ("wrong number of maps", dict(scores=[torch.rand(2, 4, 3)]), ValueError, r"must hold 2 maps"),
    ("wrong map shape", dict(scores=[torch.rand(2, 4, 3), torch.rand(2, 8, 8)]), ValueError,
     r"patch size 32 must have shape \[B, H/s, W/s\] = \[2, 8, 6\], got \[2, 8, 8\]"),
    ("wrong batch in a map", dict(scores=[torch.rand(3, 4, 3), torch.rand(3, 8, 6)]), ValueError,
     r"must have shape \[B, H/s, W/s\] = \[2, 4, 3\]"),
    ("wrong dict keys", dict(scores={64: torch.rand(2, 4, 3), 16: torch.rand(2, 16, 12)}), ValueError,
     r"one map per splittable patch size \[64, 32\], got keys \[64, 16\]"),
    ("integer scores", dict(scores=[torch.ones(2, 4, 3, dtype=torch.long), torch.rand(2, 8, 6)]), TypeError,
     r"must be floating point"),
    ("scores of a wrong type", dict(scores="saliency"), TypeError, r"scores must be a dense saliency map"),
    ("dense map of rank 4", dict(scores=torch.rand(2, 1, 256, 192)), ValueError, r"rank 3 \[B, h, w\]"),
    ("dense map batch", dict(scores=torch.rand(3, 256, 192)), ValueError, r"scores has batch size 3"),
    ("dense map aspect", dict(scores=torch.rand(2, 16, 16)), ValueError, r"does not have the image's aspect"),
    ("scorer of other sizes", dict(scores=mixres.PixelBlur(16, 32), max_patch_size=64), ValueError,
     r"max_patch_size=64 but the scorer PixelBlur\(min_patch_size=16, max_patch_size=32\).*max_patch_size=32"),
    ("device mix", dict(scores=[torch.rand(2, 4, 3, device="meta"), torch.rand(2, 8, 6)]), ValueError,
     r"is on meta but images are on cpu"),
    ("packed pyramid of other sizes", dict(scores=mixres.PackedPyramid(
        torch.rand(2, 12), mixres.QuadtreeGeometry(256, 192, 32, 64))), ValueError,
     r"scores is a packed pyramid of a 256x192 image with patches of 32 to 64 px, but these images and patch "
     r"sizes make a 256x192 image with patches of 16 to 64 px"),
    ("packed pyramid batch", dict(scores=mixres.PackedPyramid(torch.rand(3, 60), PACKED_GEOMETRY)), ValueError,
     r"scores has batch size 3 but images has 2"),
    ("packed pyramid device", dict(scores=mixres.PackedPyramid(torch.rand(2, 60, device="meta"), PACKED_GEOMETRY)),
     ValueError, r"scores is on meta but images are on cpu"),
]


@pytest.mark.parametrize("what, changes, error, pattern", BAD_INPUTS, ids=[case[0] for case in BAD_INPUTS])
@pytest.mark.parametrize("tokenize", TOKENIZERS.values(), ids=TOKENIZERS.keys())
def test_bad_input_gets_a_clear_error(tokenize, what, changes, error, pattern):
    images, pyramid = make_inputs()
    kwargs = dict(images=images, scores=pyramid, n_patches=63) | changes
    with pytest.raises(error, match=pattern):
        tokenize(**kwargs)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("tokenize", TOKENIZERS.values(), ids=TOKENIZERS.keys())
def test_non_finite_scores_are_rejected(tokenize, bad):
    images, pyramid = make_inputs()
    pyramid[1][1, 3, 2] = bad
    with pytest.raises(ValueError, match="scores must be finite"):
        tokenize(images, pyramid, n_patches=63)
    saliency = torch.rand(2, 256, 192)
    saliency[0, 100, 100] = bad
    with pytest.raises(ValueError, match="scores must be finite"):
        tokenize(images, saliency, n_patches=63)


def test_non_finite_error_names_the_place():
    images, pyramid = make_inputs()
    pyramid[1][1, 3, 2] = float("nan")
    with pytest.raises(ValueError, match=r"found nan in image 1 at patch size 32, cell \(3, 2\)"):
        mixres.tokenize(images, pyramid, n_patches=63)


def test_the_ops_check_their_own_arguments():
    # Users may call torch.ops.mixres directly: no crash, a clear error.
    with pytest.raises(ValueError, match=r"n_patches must be 16 \+ 3k"):
        torch.ops.mixres.build_quadtree(torch.rand(1, 80), 256, 256, 16, 64, 17)
    with pytest.raises(ValueError, match=r"packed pyramid \[B, 80\]"):
        torch.ops.mixres.build_quadtree(torch.rand(1, 79), 256, 256, 16, 64, 16)
    with pytest.raises(ValueError, match=r"multiples of max_patch_size"):
        torch.ops.mixres.build_quadtree(torch.rand(1, 80), 250, 256, 16, 64, 16)
    with pytest.raises(ValueError, match=r"power of two"):
        torch.ops.mixres.build_quadtree(torch.rand(1, 80), 256, 256, 16, 48, 16)
