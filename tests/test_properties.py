"""Properties of the quadtree over random geometries, budgets and scores (hypothesis)."""
import torch
from hypothesis import given, settings, strategies as st

import mixres
from mixres import reference
from mixres.pyramid import pack_pyramid

from helpers import coverage, random_pyramid


@st.composite
def cases(draw):
    min_size = draw(st.sampled_from([4, 8, 16]))
    levels = draw(st.integers(1, 4))
    max_size = min_size << (levels - 1)
    rows, cols = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    geometry = mixres.QuadtreeGeometry(rows * max_size, cols * max_size, min_size, max_size)
    budgets = geometry.valid_n_patches()
    n_patches = budgets[draw(st.integers(0, len(budgets) - 1))]
    return geometry, n_patches, draw(st.integers(1, 4)), draw(st.integers(0, 2 ** 31)), draw(st.booleans())


def build(geometry, n_patches, batch, seed, ties):
    pyramid = random_pyramid(geometry, batch, seed, ties)
    packed = pack_pyramid(pyramid, geometry, batch, torch.device("cpu"))
    args = (geometry.height, geometry.width, geometry.min_patch_size, geometry.max_patch_size, n_patches)
    return packed, args, torch.ops.mixres.build_quadtree(packed, *args)


@settings(max_examples=150, deadline=None)
@given(cases())
def test_leaves_form_an_aligned_mosaic_of_exactly_n_patches_in_raster_order(case):
    geometry, n_patches, batch, seed, ties = case
    _, _, boxes = build(*case)
    assert boxes.shape == (batch, n_patches, 3)
    ys, xs, sizes = boxes.unbind(-1)
    assert torch.isin(sizes, torch.tensor(geometry.sizes, dtype=torch.int32)).all()
    assert ((ys % sizes == 0) & (xs % sizes == 0)).all()  # quadtree cells are aligned to their size
    assert (coverage(boxes, geometry.height, geometry.width) == 1).all()  # no gap, no overlap
    keys = ys.long() * geometry.width + xs.long()
    assert (keys[:, 1:] > keys[:, :-1]).all()  # canonical raster order of the corners


@settings(max_examples=150, deadline=None)
@given(cases())
def test_cpp_equals_reference_and_is_deterministic(case):
    packed, args, boxes = build(*case)
    assert torch.equal(boxes, reference.build_quadtree(packed, *args))
    assert torch.equal(boxes, torch.ops.mixres.build_quadtree(packed.clone(), *args))


@settings(max_examples=50, deadline=None)
@given(cases())
def test_each_split_takes_the_best_leaf(case):
    # Growing the budget by one split keeps every leaf but one, which becomes its four quadrants: the greedy
    # order is consistent across budgets.
    geometry, n_patches, batch, seed, ties = case
    if n_patches + 3 > geometry.max_patches:
        return
    _, _, small = build(geometry, n_patches, batch, seed, ties)
    _, _, large = build(geometry, n_patches + 3, batch, seed, ties)
    for b in range(batch):
        before = {tuple(box) for box in small[b].tolist()}
        after = {tuple(box) for box in large[b].tolist()}
        (parent,) = before - after
        y, x, s = parent
        half = s // 2
        assert after - before == {(y, x, half), (y, x + half, half), (y + half, x, half), (y + half, x + half, half)}
