"""Dense features of a Quadformer (issue 16): timm's forward_intermediates contract. With pos_embed="resample" and
a mosaic of min_patch_size leaves only, the block outputs are the plain ViT's, in NCHW and NLC; a coarser mosaic's
NCHW grids paint each leaf's feature over its cells; padded mosaics give each image its own grids."""
import pytest
import torch

import mixres
from mixres.models import Quadformer

from helpers import float64_tolerance
from test_models import VIT_VARIANTS, full_grid, small_vit

# forward_intermediates' options, each case against the ViT's own call with the same arguments.
OPTIONS = {
    "last block, NCHW": dict(indices=1),
    "all blocks, normed, NLC": dict(indices=None, norm=True, output_fmt="NLC"),
    "first block, prefix tokens, stop early": dict(indices=[0], return_prefix_tokens=True, stop_early=True),
    "intermediates only": dict(indices=[-1], intermediates_only=True),
    "dict": dict(indices=2, output_dict=True, return_prefix_tokens=True),
}


def assert_same(got, want):
    """Equal structures of tensors, each within float64 rounding of the other."""
    if isinstance(want, torch.Tensor):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=0, atol=float64_tolerance(want))
    elif isinstance(want, dict):
        assert set(got) - {"mosaic"} == set(want), (set(got), set(want))
        for key in want:
            assert_same(got[key], want[key])
    else:
        assert len(got) == len(want)
        for got_item, want_item in zip(got, want, strict=True):
            assert_same(got_item, want_item)


@pytest.mark.parametrize("variant", ["cls", "registers", "avg_pool", "non_square"])
@pytest.mark.parametrize("options", OPTIONS)
def test_the_finest_mosaic_gives_the_vits_intermediates(variant, options):
    vit = small_vit(**VIT_VARIANTS[variant], depth=3).double()
    model = Quadformer(vit, n_patches=full_grid(vit), scorer="random", pos_embed="resample").eval()
    images = torch.randn(2, 3, *vit.patch_embed.img_size, dtype=torch.float64)
    with torch.no_grad():
        want = vit.forward_intermediates(images, **OPTIONS[options])
        got = model.forward_intermediates(images, **OPTIONS[options])
    assert_same(got, want)
    if OPTIONS[options].get("output_dict"):
        assert got["mosaic"].n_patches == full_grid(vit)


def test_a_coarse_mosaic_paints_each_leaf_over_its_cells():
    vit = small_vit(img_size=128, depth=2)
    model = Quadformer(vit, n_patches=25, scorer="pixel-blur").eval()
    images = torch.rand(2, 3, 128, 128)
    with torch.no_grad():
        result = model.forward_intermediates(images, indices=[0, 1], output_fmt="NLC", output_dict=True)
        grids = model.forward_intermediates(images, indices=[0, 1], intermediates_only=True)
    mosaic = result["mosaic"]
    assert mosaic.boxes[:, :, 2].unique().numel() > 1  # leaves of several sizes
    for leaves, grid in zip(result["image_intermediates"], grids, strict=True):
        assert leaves.shape == (2, 25, 32) and grid.shape == (2, 32, 8, 8) and grid.is_contiguous()
        for b in range(2):
            for n, (y, x, size) in enumerate(mosaic.boxes[b].tolist()):
                cells = grid[b, :, y // 16:(y + size) // 16, x // 16:(x + size) // 16]
                assert torch.equal(cells, leaves[b, n, :, None, None].expand_as(cells))


def test_a_padded_mosaic_gives_each_image_its_own_grids():
    vit = small_vit(img_size=128, depth=2).double()
    model = Quadformer(vit, n_patches=31, scorer="pixel-blur").eval()
    images = torch.rand(3, 3, 128, 128, dtype=torch.float64)
    scores = model.score(images)
    padded = mixres.tokenize(images, scores, [16, 31, 7], max_patches=31)
    with torch.no_grad():
        grids = model.forward_intermediates(padded, indices=[0, 1], norm=True, intermediates_only=True)
        for b, n in enumerate((16, 31, 7)):
            alone = model.forward_intermediates(model.tokenize(images[b:b + 1], n_patches=n), indices=[0, 1],
                                                norm=True, intermediates_only=True)
            for grid, want in zip(grids, alone, strict=True):
                torch.testing.assert_close(grid[b:b + 1], want, rtol=0, atol=float64_tolerance(want))


def test_prune_intermediate_layers_keeps_what_the_indices_need():
    vit = small_vit(depth=4)
    model = Quadformer(vit, n_patches=full_grid(vit), pos_embed="resample").eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = model.forward_intermediates(images, indices=[1], intermediates_only=True)
        assert model.prune_intermediate_layers([1]) == [1]
        assert len(model.vit.blocks) == 2
        got = model.forward_intermediates(images, indices=[1], intermediates_only=True)
    assert torch.equal(got[0], want[0])


def test_bad_arguments_are_refused():
    vit = small_vit()
    model = Quadformer(vit, n_patches=full_grid(vit)).eval()
    images = torch.randn(2, 3, 64, 64)
    with pytest.raises(ValueError, match="output_fmt must be 'NCHW' or 'NLC', got 'NHWC'"):
        model.forward_intermediates(images, output_fmt="NHWC")
    with pytest.raises(ValueError, match="not a PackedMosaic"):
        model.forward_intermediates(mixres.pack(model.tokenize(images)))
