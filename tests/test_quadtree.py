"""build_quadtree: the C++ op and the reference against the independent oracle (oracles.quadtree) and against
hand-computed trees."""
import pytest
import torch

from mixres import reference
from mixres.pyramid import QuadtreeGeometry

import oracles
from helpers import random_pyramid, run_script

# (height, width, min_patch_size, max_patch_size): square, non-square, one level, four levels.
GEOMETRIES = [(256, 256, 16, 64), (224, 224, 16, 32), (128, 320, 16, 64), (64, 64, 8, 64), (96, 64, 32, 32)]


def build_and_check(geometry: QuadtreeGeometry, pyramid, n_patches: int, batch: int | None = None):
    """The C++ op's tree, after checking that it and the reference's equal the oracle's. The ops take the pyramid
    packed by the oracle, so that mixres's own packing is not on both sides."""
    batch = pyramid[0].shape[0] if batch is None else batch
    packed = oracles.pack(pyramid, batch)
    args = (geometry.height, geometry.width, geometry.min_patch_size, geometry.max_patch_size, n_patches)
    expected = oracles.quadtree(pyramid, *args, batch=batch)
    cpp = torch.ops.mixres.build_quadtree(packed, *args)
    assert cpp.dtype == torch.int32 and cpp.shape == (batch, n_patches, 3)
    assert torch.equal(cpp, expected)
    assert torch.equal(reference.build_quadtree(packed, *args), expected)
    return cpp


@pytest.mark.parametrize("ties", [False, True], ids=["random", "ties"])
@pytest.mark.parametrize("shape", GEOMETRIES, ids=lambda g: "x".join(map(str, g)))
def test_cpp_and_reference_match_the_oracle(shape, ties):
    geometry = QuadtreeGeometry(*shape)
    budgets = geometry.valid_n_patches()
    for n_patches in sorted({budgets[0], budgets[len(budgets) // 3], budgets[-1]}):
        for seed in range(3):  # a single patch size (96x64) has no maps: only the root grid is reachable
            build_and_check(geometry, random_pyramid(geometry, batch=5, seed=seed, ties=ties), n_patches, batch=5)


def test_float64_scores_are_compared_in_float64():
    geometry = QuadtreeGeometry(128, 128, 32, 64)
    # Two roots that differ by less than float32 can resolve: the later root (0, 64) must win in float64.
    level0 = torch.tensor([[[1.0, 1.0 + 1e-12], [0.0, 0.0]]], dtype=torch.float64)
    cpp = build_and_check(geometry, [level0], n_patches=7)
    assert (cpp[0, :, 2] == 32).sum() == 4 and {tuple(b) for b in cpp[0, :, :2].tolist()} >= {(0, 64), (32, 96)}


def test_hand_computed_tree():
    # 128 x 128, sizes 16..64. Root (0, 64) scores highest, then its child (32, 96), then root (64, 0).
    geometry = QuadtreeGeometry(128, 128, 16, 64)
    level64 = torch.tensor([[[0.0, 5.0], [3.0, 1.0]]])
    level32 = torch.zeros(1, 4, 4)
    level32[0, 1, 3] = 4.0  # the quadrant (32, 96) of root (0, 64)
    level32[0, 0, 2] = -1.0  # another quadrant of the same root: must not split
    cpp = build_and_check(geometry, [level64, level32], n_patches=4 + 3 * 3)
    expected = [
        (0, 0, 64), (0, 64, 32), (0, 96, 32), (32, 64, 32), (32, 96, 16), (32, 112, 16),
        (48, 96, 16), (48, 112, 16), (64, 0, 32), (64, 32, 32), (64, 64, 64), (96, 0, 32), (96, 32, 32),
    ]
    assert cpp[0].tolist() == [list(box) for box in expected]


def test_ties_go_to_the_first_leaf_in_raster_order():
    geometry = QuadtreeGeometry(128, 192, 32, 64)
    cpp = build_and_check(geometry, [torch.ones(1, 2, 3)], n_patches=6 + 3)
    assert cpp[0, :4].tolist() == [[0, 0, 32], [0, 32, 32], [0, 64, 64], [0, 128, 64]]


def test_uniform_scores_at_the_finest_budget_give_the_raster_grid():
    geometry = QuadtreeGeometry(128, 192, 16, 64)
    pyramid = [torch.full((2, *geometry.grid(s)), 0.5) for s in geometry.splittable_sizes]
    cpp = build_and_check(geometry, pyramid, n_patches=geometry.max_patches)
    ys, xs = torch.meshgrid(torch.arange(0, 128, 16), torch.arange(0, 192, 16), indexing="ij")
    grid = torch.stack([ys.flatten(), xs.flatten(), torch.full((ys.numel(),), 16)], 1).to(torch.int32)
    assert torch.equal(cpp[0], grid) and torch.equal(cpp[1], grid)


def test_negative_scores_and_large_batch_are_fine():
    geometry = QuadtreeGeometry(256, 256, 16, 64)
    pyramid = [-1e30 * m.abs() - 5 for m in random_pyramid(geometry, batch=300, seed=7)]
    build_and_check(geometry, pyramid, n_patches=100)


@pytest.mark.parametrize("build", [torch.ops.mixres.build_quadtree, reference.build_quadtree], ids=["cpp", "reference"])
def test_image_sides_must_fit_the_int32_boxes(build):
    # A side of 2^31 px would wrap the boxes' int32 coordinates and sizes: (0, 0, -2^31) was returned.
    with pytest.raises(ValueError, match="height must be at most 2147483647|at most 2147483647 .boxes hold int32"):
        build(torch.zeros(1, 0), 2**31, 2**31, 2**31, 2**31, 1)
    with pytest.raises(ValueError, match="at most 2147483647"):
        build(torch.zeros(1, 0), 64, 2**40, 64, 64, 2**34)
    with pytest.raises(ValueError, match="height must be at most 2147483647"):
        QuadtreeGeometry(2**31, 64, 16, 64)


@pytest.mark.parametrize("build", [torch.ops.mixres.build_quadtree, reference.build_quadtree], ids=["cpp", "reference"])
def test_scores_must_be_float32_or_float64(build):
    for dtype in (torch.float16, torch.bfloat16, torch.int32, torch.bool):
        with pytest.raises(TypeError, match="scores must be float32 or float64"):
            build(torch.zeros(2, 5, dtype=dtype), 64, 64, 16, 64, 4)


def test_huge_valid_geometries_allocate_nothing_they_do_not_return():
    """The reference's cell table grows with the image (a cell per min_patch_size square): it must not be built
    for an empty batch, nor before a budget too large to allocate fails. In a capped subprocess, since a regression
    would exhaust the machine's memory."""
    run_script("""
import pytest, torch
from mixres import reference
for build in (torch.ops.mixres.build_quadtree, reference.build_quadtree):
    build(torch.zeros(1, 5), 64, 64, 16, 64, 4)  # warm-up
    cap_memory(256)
    empty = build(torch.zeros(0, 0), 2**30, 2**30, 2**15, 2**15, 2**30)
    assert empty.shape == (0, 2**30, 3) and empty.dtype == torch.int32
    # 2^60 leaves of 1 px: a valid budget whose boxes cannot be allocated, a RuntimeError from the allocator.
    with pytest.raises(RuntimeError, match="overflow|allocate"):
        build(torch.zeros(1, 0), 2**30, 2**30, 1, 1, 2**60)
""")
