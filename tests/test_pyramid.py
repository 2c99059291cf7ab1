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
