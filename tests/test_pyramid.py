"""pack_pyramid against the oracle's packing; pack_pyramid and saliency_to_pyramid at their edges (found by
tests/test_fuzz_ops.py). saliency_to_pyramid against its oracle: tests/test_tokenize.py."""
import pytest
import torch

import mixres

import oracles
from helpers import random_pyramid


def test_pack_pyramid_matches_the_oracle():
    geometry = mixres.QuadtreeGeometry(128, 192, 8, 64)
    pyramid = random_pyramid(geometry, 3, seed=1)
    forms = {"list": pyramid, "dict": dict(zip(geometry.splittable_sizes, pyramid)),
             "one float64 map": [pyramid[0].double(), *pyramid[1:]], "half": [m.half() for m in pyramid],
             "transposed": [m.mT.contiguous().mT for m in pyramid]}
    for name, scores in forms.items():
        packed = mixres.pack_pyramid(scores, geometry, 3, torch.device("cpu"))
        expected = oracles.pack(oracles.as_maps(scores, 8, 64), 3)
        assert packed.dtype == expected.dtype and torch.equal(packed, expected), name


def test_pack_pyramid_packs_an_empty_batch():
    geometry = mixres.QuadtreeGeometry(64, 128, 16, 64)
    pyramid = [torch.zeros(0, 1, 2), torch.zeros(0, 2, 4, dtype=torch.float64)]
    packed = mixres.pack_pyramid(pyramid, geometry, 0, torch.device("cpu"))
    assert packed.shape == (0, 10) and packed.dtype == torch.float64


@pytest.mark.parametrize("saliency, error, pattern", [
    ([[[0.0]]], TypeError, "saliency must be a Tensor"),
    (torch.rand(8, 8), ValueError, r"saliency must have rank 3 \[B, h, w\], got rank 2"),
    (torch.rand(1, 1, 8, 8), ValueError, "saliency must have rank 3"),
    (torch.ones(1, 8, 8, dtype=torch.int64), TypeError, "saliency must be floating point, got torch.int64"),
    (torch.rand(1, 0, 0), ValueError, "saliency map 0x0 is empty"),
    (torch.rand(1, 8, 9), ValueError, "does not have the image's aspect ratio"),
], ids=["list", "rank 2", "rank 4", "int64", "empty", "aspect"])
def test_saliency_to_pyramid_checks_its_map(saliency, error, pattern):
    with pytest.raises(error, match=pattern):
        mixres.saliency_to_pyramid(saliency, mixres.QuadtreeGeometry(64, 64, 16, 64))


@pytest.mark.parametrize("height, width, lo, hi", [(128, 192, 8, 64), (224, 224, 16, 32), (96, 32, 4, 32),
                                                   (64, 64, 16, 16)])
def test_packed_length_counts_the_cells_of_every_splittable_level(height, width, lo, hi):
    cells = sum((height // size) * (width // size) for size in oracles.patch_sizes(lo, hi)[:-1])
    assert mixres.pyramid.packed_length(height, width, lo, hi) == cells
    assert mixres.QuadtreeGeometry(height, width, lo, hi).n_scores == cells


def test_packed_length_takes_the_symbolic_sides_of_a_compiled_graph():
    """The fake kernel of pixel_blur_scores sizes its output with packed_length, on SymInt sides when the image
    size is dynamic: one graph must serve both sizes, with the right P for each."""
    torch._dynamo.reset()
    compiled = torch.compile(lambda images: mixres.ops.pixel_blur_scores(images, 16, 64), dynamic=True,
                             fullgraph=True, backend="aot_eager")
    for height, width in [(128, 192), (64, 256)]:
        cells = sum((height // size) * (width // size) for size in (64, 32))
        assert compiled(torch.rand(2, 3, height, width)).shape == (2, cells)


def test_a_packed_pyramid_splits_into_views_of_its_scores():
    geometry = mixres.QuadtreeGeometry(128, 192, 8, 64)
    pyramid = random_pyramid(geometry, 3, seed=2)
    scores = oracles.pack(pyramid, 3)
    maps = mixres.PackedPyramid(scores, geometry).maps()
    assert len(maps) == len(pyramid) and all(torch.equal(got, want) for got, want in zip(maps, pyramid))
    assert all(m.untyped_storage().data_ptr() == scores.untyped_storage().data_ptr() for m in maps)
    assert mixres.PackedPyramid(torch.zeros(2, 0), mixres.QuadtreeGeometry(64, 64, 32, 32)).maps() == []


def test_pack_pyramid_of_a_packed_pyramid_is_its_scores():
    geometry = mixres.QuadtreeGeometry(64, 128, 16, 64)
    scores = torch.rand(2, 10)
    packed = mixres.pyramid.pack_scores(mixres.PackedPyramid(scores, geometry), geometry, 2, "cpu")
    assert packed is scores
    half = mixres.pyramid.pack_scores(mixres.PackedPyramid(scores.half(), geometry), geometry, 2, "cpu")
    assert half.dtype == torch.float32 and torch.equal(half, scores.half().float())


GEOMETRY = mixres.QuadtreeGeometry(64, 128, 16, 64)  # P = 1 * 2 + 2 * 4 = 10


@pytest.mark.parametrize("scores, geometry, error, pattern", [
    ([[0.0] * 10], GEOMETRY, TypeError, "scores must be a Tensor, got list"),
    (torch.zeros(2, 10, dtype=torch.int64), GEOMETRY, TypeError, "scores must be floating point, got torch.int64"),
    (torch.zeros(2, 9), GEOMETRY, ValueError,
     r"a packed pyramid of a 64x128 image with patches of 16 to 64 px must be \[B, 10\], got \[2, 9\]"),
    (torch.zeros(2, 1, 10), GEOMETRY, ValueError, r"must be \[B, 10\], got \[2, 1, 10\]"),
    (torch.zeros(2, 10), (64, 128, 16, 64), TypeError, "geometry must be a QuadtreeGeometry, got tuple"),
], ids=["list", "int64", "length", "rank 3", "geometry"])
def test_a_packed_pyramid_checks_its_scores(scores, geometry, error, pattern):
    with pytest.raises(error, match=pattern):
        mixres.PackedPyramid(scores, geometry)
