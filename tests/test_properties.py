"""Properties of the quadtree over random geometries, budgets and scores (hypothesis), and the C++ op and the
reference against the oracle quadtree."""
import torch
from hypothesis import assume, given, settings, strategies as st

from mixres import reference

import oracles
from helpers import coverage, random_pyramid, small_geometries


@st.composite
def cases(draw):
    geometry = draw(small_geometries())
    budgets = geometry.valid_n_patches()
    n_patches = budgets[draw(st.integers(0, len(budgets) - 1))]
    return geometry, n_patches, draw(st.integers(1, 4)), draw(st.integers(0, 2 ** 31)), draw(st.booleans())


def build(geometry, n_patches, batch, seed, ties):
    """The pyramid, packed by the oracle, the op's other arguments and its boxes."""
    pyramid = random_pyramid(geometry, batch, seed, ties)
    packed = oracles.pack(pyramid, batch)
    args = (geometry.height, geometry.width, geometry.min_patch_size, geometry.max_patch_size, n_patches)
    return pyramid, packed, args, torch.ops.mixres.build_quadtree(packed, *args)


@settings(max_examples=150, deadline=None)
@given(cases())
def test_leaves_form_an_aligned_mosaic_of_exactly_n_patches_in_raster_order(case):
    geometry, n_patches, batch, seed, ties = case
    *_, boxes = build(*case)
    assert boxes.shape == (batch, n_patches, 3)
    ys, xs, sizes = boxes.unbind(-1)
    assert torch.isin(sizes, torch.tensor(geometry.sizes, dtype=torch.int32)).all()
    assert ((ys % sizes == 0) & (xs % sizes == 0)).all()  # quadtree cells are aligned to their size
    assert (coverage(boxes, geometry.height, geometry.width) == 1).all()  # no gap, no overlap
    keys = ys.long() * geometry.width + xs.long()
    assert (keys[:, 1:] > keys[:, :-1]).all()  # canonical raster order of the corners


@settings(max_examples=150, deadline=None)
@given(cases())
def test_cpp_and_reference_equal_the_oracle_and_are_deterministic(case):
    pyramid, packed, args, boxes = build(*case)
    assert torch.equal(boxes, oracles.quadtree(pyramid, *args, batch=case[2]))
    assert torch.equal(reference.build_quadtree(packed, *args), boxes)
    assert torch.equal(boxes, torch.ops.mixres.build_quadtree(packed.clone(), *args))


@settings(max_examples=50, deadline=None)
@given(cases())
def test_each_split_takes_the_best_leaf(case):
    """Growing the budget by one split keeps every leaf but one, which becomes its four quadrants (the greedy order
    does not depend on where it stops), and that leaf is the best splittable one of the smaller tree: the highest
    score, the first corner in raster order among equal scores. Checked over a few consecutive splits."""
    geometry, n_patches, batch, seed, ties = case
    n_patches = min(n_patches, geometry.max_patches - 3)
    assume(n_patches >= geometry.n_roots)  # a single patch size: nothing to split
    pyramid = random_pyramid(geometry, batch, seed, ties)
    score_maps = dict(zip(geometry.splittable_sizes, pyramid, strict=True))
    *_, small = build(geometry, n_patches, batch, seed, ties)
    for budget in range(n_patches + 3, min(n_patches + 12, geometry.max_patches) + 1, 3):
        *_, large = build(geometry, budget, batch, seed, ties)
        for b in range(batch):
            before = {tuple(box) for box in small[b].tolist()}
            after = {tuple(box) for box in large[b].tolist()}
            (parent,) = before - after
            y, x, s = parent
            half = s // 2
            assert after - before == {(y, x, half), (y, x + half, half), (y + half, x, half),
                                      (y + half, x + half, half)}
            candidates = [(y, x, s) for y, x, s in before if s > geometry.min_patch_size]
            score = {leaf: score_maps[leaf[2]][b, leaf[0] // leaf[2], leaf[1] // leaf[2]].item()
                     for leaf in candidates}
            best = max(score.values())
            assert parent == min(leaf for leaf in candidates if score[leaf] == best)
        small = large
