"""tokens_to_grid and grid_to_tokens against per-leaf loops; adjointness, gradients, torch.compile, errors, and the
exact round trip over random quadtrees (hypothesis)."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

import mixres
from mixres import grid_to_tokens, tokens_to_grid

import oracles
from helpers import random_mosaic, random_pyramid

# (height, width, min_patch_size, max_patch_size): non-square, a 14 x 14 grid (odd halves), 3 to 4 sizes, one size.
GEOMETRIES = [(128, 192, 16, 64), (224, 224, 16, 32), (96, 160, 8, 32), (128, 64, 4, 32), (64, 128, 32, 32)]


def make_mosaic(height, width, min_patch_size, max_patch_size, n_patches, batch=2, seed=0, ties=False):
    geometry = mixres.QuadtreeGeometry(height, width, min_patch_size, max_patch_size)
    images = torch.zeros(batch, 1, height, width)
    return mixres.tokenize(images, random_pyramid(geometry, batch, seed, ties), n_patches, min_patch_size,
                           max_patch_size)


def leaf_cells(mosaic):
    """(b, n, rows slice, cols slice) of every leaf, in cells."""
    s = mosaic.min_patch_size
    for b in range(mosaic.boxes.shape[0]):
        for n, (y, x, size) in enumerate(mosaic.boxes[b].tolist()):
            yield b, n, slice(y // s, (y + size) // s), slice(x // s, (x + size) // s)


def paint_each_leaf(features, mosaic):
    height, width = mosaic.image_size
    s = mosaic.min_patch_size
    grid = torch.full((features.shape[0], features.shape[2], height // s, width // s), float("nan"),
                      dtype=features.dtype)
    for b, n, rows, cols in leaf_cells(mosaic):
        grid[b, :, rows, cols] = features[b, n][:, None, None]
    return grid


def pool_each_leaf(grid, mosaic, reduce):
    out = grid.new_empty(grid.shape[0], mosaic.n_patches, grid.shape[1])
    for b, n, rows, cols in leaf_cells(mosaic):
        cells = grid[b, :, rows, cols].flatten(1)
        out[b, n] = cells.sum(1) if reduce == "sum" else cells.mean(1)
    return out


def randn(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: "{}x{}_{}-{}".format(*g))
@pytest.mark.parametrize("budget", [0, 1, -1], ids=["fewest", "middle", "most"])
def test_matches_per_leaf_loops(geometry, budget):
    height, width, lo, hi = geometry
    budgets = mixres.valid_n_patches(height, width, lo, hi)
    mosaic = make_mosaic(*geometry, budgets[len(budgets) // 2 if budget == 1 else budget], seed=budget + 7)
    features = randn(2, mosaic.n_patches, 3)
    grid = tokens_to_grid(features, mosaic.boxes, lo, (height, width))
    assert grid.shape == (2, 3, height // lo, width // lo)
    assert torch.equal(grid, paint_each_leaf(features, mosaic))
    cells = randn(2, 3, height // lo, width // lo, seed=1)
    for reduce in ("sum", "mean"):
        torch.testing.assert_close(grid_to_tokens(cells, mosaic.boxes, lo, reduce),
                                   pool_each_leaf(cells, mosaic, reduce), rtol=1e-14, atol=1e-14)


def test_mosaic_to_grid_is_channels_last_and_in_place_safe():
    _, mosaic = random_mosaic()
    features = randn(3, mosaic.n_patches, 5, dtype=torch.float32).requires_grad_()
    grid = mosaic.to_grid(features)
    assert grid.shape == (3, 5, 8, 12) and grid.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(grid, tokens_to_grid(features, mosaic.boxes, 16, (128, 192)))
    grid.add_(1).sum().backward()  # in place is fine: the grid is an ordinary view, not a custom Function's output
    assert torch.equal(features.grad, ((mosaic.boxes[..., 2] // 16) ** 2)[..., None].float().expand(-1, -1, 5))


def test_gradcheck():
    _, mosaic = random_mosaic(batch=2, height=64, width=128, n_patches=17)
    features = randn(2, 17, 2).requires_grad_()
    grid = randn(2, 2, 4, 8, seed=1).requires_grad_()
    paint = lambda f: tokens_to_grid(f, mosaic.boxes, 16, (64, 128))  # noqa: E731
    assert torch.autograd.gradcheck(paint, features)
    assert torch.autograd.gradgradcheck(paint, features)
    for reduce in ("sum", "mean"):
        pool = lambda g: grid_to_tokens(g, mosaic.boxes, 16, reduce)  # noqa: E731
        assert torch.autograd.gradcheck(pool, grid)
        assert torch.autograd.gradgradcheck(pool, grid)


def test_each_op_is_the_others_adjoint_and_backward():
    _, mosaic = random_mosaic()
    tokens = randn(3, mosaic.n_patches, 4).requires_grad_()
    grid = randn(3, 4, 8, 12, seed=1).requires_grad_()
    painted = mosaic.to_grid(tokens)
    pooled = grid_to_tokens(grid, mosaic.boxes, 16, "sum")
    torch.testing.assert_close((painted * grid).sum(), (tokens * pooled).sum(), rtol=1e-14, atol=0)
    # Bit for bit: each backward *is* the other op.
    assert torch.equal(torch.autograd.grad(painted, tokens, grid)[0], pooled)
    assert torch.equal(torch.autograd.grad(pooled, grid, tokens)[0], painted)


def test_mean_is_the_sum_over_the_leaf_cells():
    _, mosaic = random_mosaic()
    grid = randn(3, 4, 8, 12, dtype=torch.float32)
    cells = ((mosaic.boxes[..., 2] // 16) ** 2)[..., None]
    assert torch.equal(grid_to_tokens(grid, mosaic.boxes, 16) * cells, grid_to_tokens(grid, mosaic.boxes, 16, "sum"))
    assert torch.equal(grid_to_tokens(torch.ones(3, 1, 8, 12), mosaic.boxes, 16, "sum"), cells.float())


def test_mosaic_of_finest_leaves_is_a_raster_reshape():
    geometry = mixres.QuadtreeGeometry(128, 192, 16, 64)
    mosaic = mixres.tokenize(torch.rand(2, 3, 128, 192), mixres.Uniform(16, 64), geometry.max_patches)
    tokens = randn(2, 96, 5)
    assert torch.equal(mosaic.to_grid(tokens), tokens.transpose(1, 2).reshape(2, 5, 8, 12))
    grid = randn(2, 5, 8, 12, seed=1)
    for reduce in ("sum", "mean"):
        assert torch.equal(grid_to_tokens(grid, mosaic.boxes, 16, reduce), grid.flatten(2).transpose(1, 2))


def test_dtypes_and_integer_labels():
    _, mosaic = random_mosaic()
    labels = torch.arange(mosaic.n_patches).expand(3, -1)[..., None]  # int64: which leaf covers each cell
    owner = mosaic.to_grid(labels)
    assert owner.dtype == torch.int64
    assert torch.equal(owner.float(), paint_each_leaf(labels.double(), mosaic).float())
    assert torch.equal(grid_to_tokens(owner, mosaic.boxes, 16, "sum"),
                       labels * ((mosaic.boxes[..., 2] // 16) ** 2)[..., None])
    for dtype in (torch.float16, torch.bfloat16):
        tokens = randn(3, mosaic.n_patches, 4).to(dtype)
        back = grid_to_tokens(mosaic.to_grid(tokens), mosaic.boxes, 16)
        assert back.dtype == dtype and torch.equal(back, tokens)


def test_runs_on_the_meta_device():
    boxes = random_mosaic()[1].boxes.to("meta")
    grid = tokens_to_grid(torch.empty(3, boxes.shape[1], 7, device="meta"), boxes, 16, (128, 192))
    assert grid.device.type == "meta" and grid.shape == (3, 7, 8, 12)
    assert grid_to_tokens(grid, boxes, 16).shape == (3, boxes.shape[1], 7)


def padded_boxes(height, width, min_patch_size, max_patch_size, budgets, max_patches, seed=0):
    """The boxes [B, max_patches, 3] of an adaptive mosaic with per-image ``budgets``: image b's leaves, then
    padding (0, 0, 0)."""
    geometry = mixres.QuadtreeGeometry(height, width, min_patch_size, max_patch_size)
    packed = oracles.pack(random_pyramid(geometry, len(budgets), seed), len(budgets))
    boxes, lengths = torch.ops.mixres.build_quadtree_adaptive(packed, height, width, min_patch_size, max_patch_size,
                                                              max_patches, torch.tensor(budgets), None)
    assert lengths.tolist() == budgets
    return boxes


@pytest.mark.parametrize("geometry", GEOMETRIES[:4], ids=lambda g: "{}x{}_{}-{}".format(*g))
def test_padding_paints_nothing_pools_to_zero_and_gets_no_gradient(geometry):
    """Each image of a padded batch gives what its leaves alone give; padding entries pool to exactly 0 (mean too)
    and get a zero gradient, and gradients of the grid take nothing from them."""
    height, width, lo, hi = geometry
    valid = mixres.valid_n_patches(height, width, lo, hi)
    budgets = [valid[0], valid[-1], valid[len(valid) // 2]]
    boxes = padded_boxes(*geometry, budgets, valid[-1])
    features = randn(3, valid[-1], 4).requires_grad_()
    grid = randn(3, 4, height // lo, width // lo, seed=1).requires_grad_()
    painted = tokens_to_grid(features, boxes, lo, (height, width))
    pooled = {reduce: grid_to_tokens(grid, boxes, lo, reduce) for reduce in ("sum", "mean")}
    weights = randn(3, valid[-1], 4, seed=2)
    grad_features, grad_grid = torch.autograd.grad((painted * grid).sum() + sum(
        (p * weights).sum() for p in pooled.values()), (features, grid))
    for b, n in enumerate(budgets):
        alone_features = features[b:b + 1, :n].detach().requires_grad_()
        alone_grid = grid[b:b + 1].detach().requires_grad_()
        alone_painted = tokens_to_grid(alone_features, boxes[b:b + 1, :n], lo, (height, width))
        alone_pooled = {reduce: grid_to_tokens(alone_grid, boxes[b:b + 1, :n], lo, reduce)
                        for reduce in ("sum", "mean")}
        alone_grads = torch.autograd.grad((alone_painted * alone_grid).sum() + sum(
            (p * weights[b:b + 1, :n]).sum() for p in alone_pooled.values()), (alone_features, alone_grid))
        assert torch.equal(painted[b:b + 1], alone_painted)
        for reduce, values in pooled.items():
            assert torch.equal(values[b:b + 1, :n], alone_pooled[reduce]) and not values[b, n:].any(), reduce
        assert torch.equal(grad_features[b:b + 1, :n], alone_grads[0]) and not grad_features[b, n:].any()
        assert torch.equal(grad_grid[b:b + 1], alone_grads[1])


def test_padded_round_trip_gives_the_leaves_back_and_zero_padding():
    boxes = padded_boxes(128, 192, 16, 64, [6, 60, 33, 96], 96, seed=3)
    tokens = randn(4, 96, 3, dtype=torch.float32)
    grid = tokens_to_grid(tokens, boxes, 16, (128, 192))
    valid = (boxes[..., 2] > 0)[..., None]
    assert torch.equal(grid_to_tokens(grid, boxes, 16, "mean"), torch.where(valid, tokens, 0))
    # Padding leaves share the corner (0, 0) with a leaf: the leaf, not the padding, owns the cells there.
    owner = tokens_to_grid(torch.arange(96.0).expand(4, -1)[..., None], boxes, 16, (128, 192))
    assert (owner < torch.tensor([6, 60, 33, 96])[:, None, None, None]).all()


@pytest.mark.parametrize("padded", [False, True], ids=["mosaic", "padded"])
def test_compiles_with_fullgraph_and_matches_eager(padded):
    _, mosaic = random_mosaic()
    if padded:
        mosaic.boxes = padded_boxes(128, 192, 16, 64, [6, 60, 33], 60)
    tokens = randn(3, mosaic.n_patches, 4, dtype=torch.float32).requires_grad_()
    grid = randn(3, 4, 8, 12, seed=1, dtype=torch.float32).requires_grad_()

    def run(tokens, grid, boxes):
        return (tokens_to_grid(tokens, boxes, 16, (128, 192)), grid_to_tokens(grid, boxes, 16),
                grid_to_tokens(grid, boxes, 16, "sum"))

    torch._dynamo.reset()
    compiled = torch.compile(run, fullgraph=True, backend="aot_eager")
    eager, traced = run(tokens, grid, mosaic.boxes), compiled(tokens, grid, mosaic.boxes)
    for a, b in zip(eager, traced):
        assert torch.equal(a, b)
    loss = lambda outputs: sum((o * o).sum() for o in outputs)  # noqa: E731
    inputs = (tokens, grid)
    for a, b in zip(torch.autograd.grad(loss(eager), inputs), torch.autograd.grad(loss(traced), inputs)):
        assert torch.equal(a, b)


def bad_calls():
    boxes = random_mosaic(batch=2)[1].boxes
    n = boxes.shape[1]
    features, grid = torch.zeros(2, n, 4), torch.zeros(2, 4, 8, 12)
    paint = lambda **kw: lambda: tokens_to_grid(**{"features": features, "boxes": boxes,  # noqa: E731
                                                   "min_patch_size": 16, "image_size": (128, 192), **kw})
    pool = lambda **kw: lambda: grid_to_tokens(**{"grid": grid, "boxes": boxes, "min_patch_size": 16, **kw})  # noqa
    return [
        (paint(features=features.numpy()), TypeError, "features must be a Tensor"),
        (paint(features=features[0]), ValueError, r"features must have rank 3 \[B, N, D\], got rank 2"),
        (paint(boxes=boxes[0]), ValueError, "boxes must have rank 3"),
        (paint(boxes=boxes[..., :2]), ValueError, r"boxes must be \[B, N, 3\]"),
        (paint(boxes=boxes.float()), TypeError, "boxes must be int32 or int64"),
        (paint(boxes=boxes.to("meta")), ValueError, "boxes is on meta but features is on cpu"),
        (paint(features=features[:1]), ValueError, "boxes has batch size 2 but features has 1"),
        (paint(features=features[:, 1:]), ValueError, f"boxes has {n} leaves but features has {n - 1}"),
        (paint(image_size=(128, 200)), ValueError, r"image_size \(128, 200\) must be positive multiples of "
                                                   "min_patch_size 16"),
        (paint(image_size=128), TypeError, "image_size must be"),
        (paint(min_patch_size=16.0), TypeError, "min_patch_size must be an int"),
        (paint(min_patch_size=0), ValueError, "min_patch_size must be positive"),
        (pool(grid=grid[0]), ValueError, r"grid must have rank 4 \[B, D, h, w\]"),
        (pool(grid=grid[:1]), ValueError, "boxes has batch size 2 but grid has 1"),
        (pool(reduce="max"), ValueError, "reduce must be 'mean' or 'sum'"),
        (pool(grid=grid.long()), TypeError, "grid must be floating point for reduce='mean'"),
    ]


@pytest.mark.parametrize("index", range(len(bad_calls())))
def test_rejects_bad_arguments(index):
    call, error, message = bad_calls()[index]
    with pytest.raises(error, match=message):
        call()


@st.composite
def mosaics(draw):
    min_size = draw(st.sampled_from([4, 8, 16]))
    max_size = min_size << draw(st.integers(0, 3))
    height, width = draw(st.integers(1, 3)) * max_size, draw(st.integers(1, 3)) * max_size
    budgets = mixres.valid_n_patches(height, width, min_size, max_size)
    n_patches = draw(st.sampled_from(budgets))
    return make_mosaic(height, width, min_size, max_size, n_patches, batch=draw(st.integers(1, 3)),
                       seed=draw(st.integers(0, 2 ** 31)), ties=draw(st.booleans()))


@settings(max_examples=100, deadline=None)
@given(mosaics(), st.integers(1, 5), st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
       st.integers(0, 2 ** 31))
def test_round_trip_through_the_grid_is_exact(mosaic, dim, dtype, seed):
    tokens = randn(mosaic.boxes.shape[0], mosaic.n_patches, dim, seed=seed).to(dtype)
    grid = mosaic.to_grid(tokens)
    assert torch.equal(grid_to_tokens(grid, mosaic.boxes, mosaic.min_patch_size, "mean"), tokens)
    leaf = torch.arange(mosaic.n_patches, dtype=torch.float64).expand(len(tokens), -1)[..., None]
    assert torch.equal(mosaic.to_grid(leaf), paint_each_leaf(leaf, mosaic))  # every cell, its own leaf
