"""The CUDA kernels against the independent oracles (tests/oracles.py, on the CPU), the CPU kernels and the
pure-PyTorch reference; no host sync, CUDA graphs, torch.compile.

The CPU kernels share csrc/*.h with the CUDA ones, so they are never the only oracle. Boxes and centres must be
identical on every device; area tokens too (same arithmetic, same summation order); bilinear tokens, the gradients
(atomics) and the pixel-blur scores (block reductions) agree to rounding.
"""
import types

import pytest
import torch

import mixres
from mixres import reference
from mixres.pyramid import QuadtreeGeometry

import oracles
from helpers import captured_in_cuda_graph, raising_on_host_sync, random_boxes, random_pyramid, run_script

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

DEVICE = torch.device("cuda")
ops = torch.ops.mixres
MODES = ["area", "bilinear"]
# (height, width, min_patch_size, max_patch_size): non-square images, 2 to 4 patch sizes, and a single size.
GEOMETRIES = [(128, 192, 16, 64), (256, 448, 16, 64), (224, 224, 16, 32), (96, 160, 8, 32), (64, 128, 32, 32)]
LOW_PRECISION_TOL = {torch.float16: 1e-3, torch.bfloat16: 8e-3}  # input plus output rounding, values in [0, 1]


def geometry_id(g):
    return "{}x{}_{}-{}".format(*g)


def budgets(geometry: QuadtreeGeometry) -> list[int]:
    """The smallest, a middle and the largest reachable n_patches."""
    valid = geometry.valid_n_patches()
    return sorted({valid[0], valid[len(valid) // 2], valid[-1]})


def random_scores(geometry: QuadtreeGeometry, batch: int, seed: int = 0, ties: bool = False, dtype=torch.float32):
    """A random pyramid on the CPU (the oracles' input) and its packing by the oracle, on the device (the ops')."""
    pyramid = random_pyramid(geometry, batch, seed, ties, dtype)
    return pyramid, oracles.pack(pyramid, batch).to(DEVICE)


def packed_scores(geometry: QuadtreeGeometry, batch: int, seed: int = 0, ties: bool = False, dtype=torch.float32):
    return random_scores(geometry, batch, seed, ties, dtype)[1]


def oracle_rows(batch: int) -> torch.Tensor:
    """The images of a batch that the slow per-image oracles check: all of up to 64, else the first and last 32
    (the first and last blocks of a kernel's grid; the CPU kernel checks the others)."""
    if batch <= 64:
        return torch.arange(batch)
    return torch.cat([torch.arange(32), torch.arange(batch - 32, batch)])


def random_images(batch, channels, height, width, seed=0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, channels, height, width, generator=generator, dtype=torch.float64).to(DEVICE, dtype)


def mosaic_boxes(height, width, batch, seed=0, min_patch_size=16, max_patch_size=64):
    geometry = QuadtreeGeometry(height, width, min_patch_size, max_patch_size)
    scores = packed_scores(geometry, batch, seed)
    n_patches = budgets(geometry)[1]
    return ops.build_quadtree(scores, height, width, min_patch_size, max_patch_size, n_patches)


def oracle_tokens(images, boxes, patch_size, mode):
    """Tokens by F.interpolate leaf by leaf on the CPU, in oracles.resize_dtype of the images'."""
    images = images.cpu().to(oracles.resize_dtype(images.dtype))
    return oracles.interpolate_each_leaf(images, boxes.cpu(), patch_size, mode)


@oracles.one_thread()
def oracle_gradient(grad_tokens, boxes, height, width, mode):
    """The images' gradient for ``grad_tokens`` by autograd through the per-leaf oracle on the CPU (the adjoint of
    a linear map: the images' values do not matter), in oracles.resize_dtype of the gradient's."""
    batch, _, channels, patch_size, _ = grad_tokens.shape
    dtype = oracles.resize_dtype(grad_tokens.dtype)
    images = torch.zeros(batch, channels, height, width, dtype=dtype, requires_grad=True)
    tokens = oracles.interpolate_each_leaf(images, boxes.cpu(), patch_size, mode)
    (grad,) = torch.autograd.grad(tokens, images, grad_tokens.cpu().to(dtype))
    return grad


# ---------------------------------------------------------------------------------------------------- quadtree


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=geometry_id)
@pytest.mark.parametrize("batch", [1, 7, 64, 512])
@pytest.mark.parametrize("ties", [False, True], ids=["random", "ties"])
def test_build_quadtree_matches_the_oracle_cpu_and_reference(geometry, batch, ties):
    height, width, lo, hi = geometry
    geo = QuadtreeGeometry(height, width, lo, hi)
    pyramid, scores = random_scores(geo, batch, seed=batch, ties=ties)
    rows = oracle_rows(batch)
    for n_patches in budgets(geo):
        boxes = ops.build_quadtree(scores, height, width, lo, hi, n_patches)
        assert boxes.device == scores.device and boxes.dtype == torch.int32
        assert boxes.shape == (batch, n_patches, 3)
        expected = oracles.quadtree([m[rows] for m in pyramid], height, width, lo, hi, n_patches, batch=len(rows))
        assert torch.equal(boxes.cpu()[rows], expected)
        assert torch.equal(boxes.cpu(), ops.build_quadtree(scores.cpu(), height, width, lo, hi, n_patches))
        assert torch.equal(boxes, reference.build_quadtree(scores, height, width, lo, hi, n_patches))


@pytest.mark.parametrize("ties", [False, True], ids=["random", "ties"])
def test_build_quadtree_float64_and_uniform(ties):
    height, width, lo, hi = 256, 448, 16, 64
    geo = QuadtreeGeometry(height, width, lo, hi)
    scores = packed_scores(geo, 7, seed=5, ties=ties, dtype=torch.float64)
    # Scores that differ only beyond float32 precision must still be told apart.
    scores = scores + torch.arange(scores.shape[1], device=DEVICE, dtype=torch.float64) * 1e-12
    uniform = torch.ones_like(scores)
    for n_patches in budgets(geo):
        for s in (scores, uniform):
            boxes = ops.build_quadtree(s, height, width, lo, hi, n_patches)
            expected = oracles.quadtree(oracles.unpack(s.cpu(), height, width, lo, hi), height, width, lo, hi,
                                        n_patches)
            assert torch.equal(boxes.cpu(), expected)
            assert torch.equal(boxes.cpu(), ops.build_quadtree(s.cpu(), height, width, lo, hi, n_patches))
    # Uniform scores at the largest budget give the plain ViT grid in raster order.
    boxes = ops.build_quadtree(uniform, height, width, lo, hi, geo.max_patches)[0].cpu()
    ys, xs = torch.meshgrid(torch.arange(0, height, lo), torch.arange(0, width, lo), indexing="ij")
    grid = torch.stack([ys.flatten(), xs.flatten(), torch.full_like(ys.flatten(), lo)], dim=1).int()
    assert torch.equal(boxes, grid)


# The candidates of a large tree no longer fit the default 48 KiB of shared memory: the kernel opts in to more,
# stops staging the pyramid, or runs on a global-memory workspace. All must agree with the oracle and the CPU.
@pytest.mark.parametrize("ties", [False, True], ids=["random", "ties"])
@pytest.mark.parametrize("lo, n_patches", [(16, 4096), (4, 256 + 3 * 5000), (4, 65536)],
                         ids=["opt-in", "unstaged", "workspace"])
def test_build_quadtree_large_trees(lo, n_patches, ties):
    height = width = 1024
    geo = QuadtreeGeometry(height, width, lo, 64)
    pyramid, scores = random_scores(geo, 2, seed=1, ties=ties)
    boxes = ops.build_quadtree(scores, height, width, lo, 64, n_patches)
    assert torch.equal(boxes.cpu(), oracles.quadtree(pyramid, height, width, lo, 64, n_patches))
    assert torch.equal(boxes.cpu(), ops.build_quadtree(scores.cpu(), height, width, lo, 64, n_patches))


def test_build_quadtree_rejects_bad_inputs_on_the_host():
    geo = QuadtreeGeometry(128, 192, 16, 64)
    scores = packed_scores(geo, 2)
    with pytest.raises(ValueError, match="n_patches"):
        ops.build_quadtree(scores, 128, 192, 16, 64, geo.n_roots + 1)
    with pytest.raises(ValueError, match="packed pyramid"):
        ops.build_quadtree(scores[:, 1:], 128, 192, 16, 64, geo.n_roots)
    with pytest.raises(ValueError, match="multiples"):
        ops.build_quadtree(scores, 100, 192, 16, 64, geo.n_roots)


# ------------------------------------------------------------------------------------------- adaptive quadtree


def image_budgets(geometry: QuadtreeGeometry, batch: int, max_patches: int, seed: int = 0) -> torch.Tensor:
    """A reachable budget per image, at most max_patches, int64 on the CPU."""
    n_budgets = (max_patches - geometry.n_roots) // 3 + 1
    k = torch.randint(0, n_budgets, (batch,), generator=torch.Generator().manual_seed(seed))
    return geometry.n_roots + 3 * k


def level_quantiles(pyramid, quantile: float, dtype=torch.float32) -> torch.Tensor:
    """A threshold per level, on the CPU: the level's quantile of the scores, so that some images stop early."""
    if not pyramid:
        return torch.zeros(0, dtype=dtype)
    return torch.stack([m.flatten().double().quantile(quantile) for m in pyramid]).to(dtype)


def adaptive_oracle(pyramid, rows, geometry: QuadtreeGeometry, max_patches, image_budget, thresholds):
    """The oracle's (boxes, lengths) for the images ``rows``, from CPU copies of the op's arguments."""
    return oracles.quadtree_adaptive(
        [m[rows] for m in pyramid], geometry.height, geometry.width, geometry.min_patch_size, geometry.max_patch_size,
        max_patches, budgets=None if image_budget is None else image_budget.cpu()[rows],
        thresholds=None if thresholds is None else thresholds.cpu(), batch=len(rows))


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=geometry_id)
@pytest.mark.parametrize("batch", [1, 7, 64, 512])
@pytest.mark.parametrize("ties", [False, True], ids=["random", "ties"])
def test_build_quadtree_adaptive_matches_the_oracle_cpu_and_reference(geometry, batch, ties):
    height, width, lo, hi = geometry
    geo = QuadtreeGeometry(height, width, lo, hi)
    pyramid, scores = random_scores(geo, batch, seed=batch, ties=ties)
    rows = oracle_rows(batch)
    valid = geo.valid_n_patches()
    max_patches = valid[len(valid) // 2]  # the root grid alone for a single patch size
    image_budget = image_budgets(geo, batch, max_patches, seed=batch).to(DEVICE)
    thresholds = level_quantiles(pyramid, 0.7).to(DEVICE)
    for image_budget, thresholds in ((None, None), (image_budget, None), (None, thresholds),
                                     (image_budget.int(), thresholds)):
        args = (height, width, lo, hi, max_patches)
        boxes, lengths = ops.build_quadtree_adaptive(scores, *args, image_budget, thresholds)
        assert boxes.device == scores.device and boxes.dtype == torch.int32 and boxes.shape == (batch, max_patches, 3)
        assert lengths.device == scores.device and lengths.dtype == torch.int32 and lengths.shape == (batch,)
        expected_boxes, expected_lengths = adaptive_oracle(pyramid, rows, geo, max_patches, image_budget, thresholds)
        assert torch.equal(lengths.cpu()[rows], expected_lengths)
        assert torch.equal(boxes.cpu()[rows], expected_boxes)
        on_cpu = ops.build_quadtree_adaptive(scores.cpu(), *args, None if image_budget is None else image_budget.cpu(),
                                             None if thresholds is None else thresholds.cpu())
        assert torch.equal(boxes.cpu(), on_cpu[0]) and torch.equal(lengths.cpu(), on_cpu[1])
        by_reference = reference.build_quadtree_adaptive(scores, *args, image_budget, thresholds)
        assert torch.equal(boxes, by_reference[0]) and torch.equal(lengths, by_reference[1])


@pytest.mark.parametrize("ties", [False, True], ids=["random", "ties"])
def test_build_quadtree_adaptive_prefix_property_and_padding(ties):
    """Image b's leaves are build_quadtree's for n_patches = lengths[b], then (0, 0, 0) boxes."""
    height, width, lo, hi = 256, 448, 16, 64
    geo = QuadtreeGeometry(height, width, lo, hi)
    pyramid, scores = random_scores(geo, 64, seed=3, ties=ties)
    image_budget = image_budgets(geo, 64, geo.max_patches, seed=3).to(DEVICE)
    for thresholds in (None, level_quantiles(pyramid, 0.8).to(DEVICE), level_quantiles(pyramid, 0.2).to(DEVICE)):
        boxes, lengths = ops.build_quadtree_adaptive(scores, height, width, lo, hi, geo.max_patches, image_budget,
                                                     thresholds)
        assert (lengths <= image_budget).all() and (lengths >= geo.n_roots).all()
        for n in lengths.unique().tolist():
            rows = (lengths == n).nonzero()[:, 0]
            assert torch.equal(boxes[rows, :n], ops.build_quadtree(scores[rows], height, width, lo, hi, n))
            assert not boxes[rows, n:].any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_build_quadtree_adaptive_extreme_thresholds(dtype):
    """Below every score and without budgets: build_quadtree(max_patches) exactly; at the highest score: the roots."""
    height, width, lo, hi = 256, 448, 16, 64
    geo = QuadtreeGeometry(height, width, lo, hi)
    scores = packed_scores(geo, 64, seed=4, ties=True, dtype=dtype)
    args = (height, width, lo, hi, budgets(geo)[1])
    below = torch.nextafter(scores.min(), torch.tensor(-float("inf"), dtype=dtype, device=DEVICE)).expand(2)
    boxes, lengths = ops.build_quadtree_adaptive(scores, *args, None, below.contiguous())
    assert (lengths == args[-1]).all() and torch.equal(boxes, ops.build_quadtree(scores, *args))
    boxes, lengths = ops.build_quadtree_adaptive(scores, *args, None, scores.max().expand(2).contiguous())
    roots = ops.build_quadtree(scores, height, width, lo, hi, geo.n_roots)
    assert (lengths == geo.n_roots).all() and torch.equal(boxes[:, :geo.n_roots], roots)
    assert not boxes[:, geo.n_roots:].any()


# The three memory paths of the kernel (test_build_quadtree_large_trees), each stopped by budgets and thresholds.
@pytest.mark.parametrize("lo, max_patches", [(16, 4096), (4, 256 + 3 * 5000), (4, 65536)],
                         ids=["opt-in", "unstaged", "workspace"])
def test_build_quadtree_adaptive_large_trees(lo, max_patches):
    height = width = 1024
    geo = QuadtreeGeometry(height, width, lo, 64)
    pyramid, scores = random_scores(geo, 2, seed=1, ties=True)
    args = (height, width, lo, 64, max_patches)
    # Image 0 may use every leaf, image 1 about half; scores are 0, 1 or 2, so a threshold of 1 stops somewhere.
    image_budget = torch.tensor([max_patches, geo.n_roots + 3 * ((max_patches - geo.n_roots) // 6)], device=DEVICE)
    thresholds = torch.ones(len(pyramid), device=DEVICE)
    for image_budget, thresholds in ((image_budget, None), (None, thresholds)):
        boxes, lengths = ops.build_quadtree_adaptive(scores, *args, image_budget, thresholds)
        expected = adaptive_oracle(pyramid, torch.arange(2), geo, max_patches, image_budget, thresholds)
        assert torch.equal(lengths.cpu(), expected[1]) and torch.equal(boxes.cpu(), expected[0])
        on_cpu = ops.build_quadtree_adaptive(scores.cpu(), *args, None if image_budget is None else image_budget.cpu(),
                                             None if thresholds is None else thresholds.cpu())
        assert torch.equal(boxes.cpu(), on_cpu[0]) and torch.equal(lengths.cpu(), on_cpu[1])


def test_build_quadtree_adaptive_float64_thresholds():
    height, width, lo, hi = 128, 128, 32, 64
    # Root (0, 64) scores just above the threshold, beyond what float32 resolves: it alone is split.
    scores = torch.tensor([[1.0, 1.0 + 1e-12, 0.0, 0.0]], dtype=torch.float64, device=DEVICE)
    thresholds = torch.tensor([1.0], dtype=torch.float64, device=DEVICE)
    boxes, lengths = ops.build_quadtree_adaptive(scores, height, width, lo, hi, 13, None, thresholds)
    assert lengths.tolist() == [7] and boxes[0, :7, 2].tolist().count(32) == 4 and not boxes[0, 7:].any()


def test_build_quadtree_adaptive_wrapper_takes_cpu_budgets_and_numbers():
    """Budgets and thresholds on the CPU are checked on the host and copied; numbers become device tensors."""
    height, width, lo, hi = 128, 192, 16, 64
    geo = QuadtreeGeometry(height, width, lo, hi)
    scores = packed_scores(geo, 7, seed=6)
    args = (height, width, lo, hi, 60)
    image_budget = image_budgets(geo, 7, 60, seed=6)
    thresholds = torch.tensor([0.5, 0.25])
    expected = ops.build_quadtree_adaptive(scores, *args, image_budget.to(DEVICE), thresholds.to(DEVICE))
    for budget_form, threshold_form in ((image_budget, thresholds), (image_budget.tolist(), [0.5, 0.25]),
                                        (image_budget.int(), thresholds.tolist())):
        got = mixres.ops.build_quadtree_adaptive(scores, *args, budget_form, threshold_form)
        assert got[0].device == scores.device and got[1].device == scores.device
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    same = ops.build_quadtree_adaptive(scores, *args, None, torch.full((2,), 0.5, device=DEVICE))
    for threshold in (0.5, torch.tensor(0.5), torch.tensor(0.5, device=DEVICE)):
        got = mixres.ops.build_quadtree_adaptive(scores, *args, None, threshold)
        assert torch.equal(got[0], same[0]) and torch.equal(got[1], same[1])
    bad = image_budget.clone()
    bad[3] = 61
    with pytest.raises(ValueError, match=r"budgets\[3\] = 61 is unreachable: each budget must be 6 \+ 3k"):
        mixres.ops.build_quadtree_adaptive(scores, *args, bad, None)
    with pytest.raises(ValueError, match=r"thresholds must be finite, got nan for patch size 32"):
        mixres.ops.build_quadtree_adaptive(scores, *args, None, torch.tensor([0.0, float("nan")]))


def test_build_quadtree_adaptive_rejects_bad_inputs_on_the_host():
    geo = QuadtreeGeometry(128, 192, 16, 64)
    scores = packed_scores(geo, 2)
    args = (128, 192, 16, 64, 30)
    on_device = torch.tensor([6, 9], device=DEVICE)
    with pytest.raises(ValueError, match="budgets is on cpu but scores are on cuda"):
        ops.build_quadtree_adaptive(scores, *args, on_device.cpu(), None)
    with pytest.raises(ValueError, match="thresholds is on cpu but scores are on cuda"):
        ops.build_quadtree_adaptive(scores, *args, None, torch.zeros(2))
    with pytest.raises(ValueError, match="budgets is on cuda:0 but scores are on cpu"):
        ops.build_quadtree_adaptive(scores.cpu(), *args, on_device, None)
    with pytest.raises(ValueError, match=r"budgets must be \[B\] = \[2\]"):
        ops.build_quadtree_adaptive(scores, *args, on_device[:1], None)
    with pytest.raises(TypeError, match="budgets must be int32 or int64"):
        ops.build_quadtree_adaptive(scores, *args, on_device.float(), None)
    with pytest.raises(ValueError, match=r"thresholds must be \[2\]"):
        ops.build_quadtree_adaptive(scores, *args, None, torch.zeros(3, device=DEVICE))
    with pytest.raises(TypeError, match="thresholds must have the scores' dtype"):
        ops.build_quadtree_adaptive(scores, *args, None, torch.zeros(2, device=DEVICE, dtype=torch.float64))
    with pytest.raises(ValueError, match="max_patches"):
        ops.build_quadtree_adaptive(scores, 128, 192, 16, 64, 31, None, None)


@pytest.mark.parametrize("bad", ["budgets", "thresholds"])
def test_build_quadtree_adaptive_checks_values_on_the_device(bad):
    """Checking a CUDA tensor's values on the host would need a synchronisation: an unreachable budget or a NaN
    threshold trips a device-side assert, which ends the process's CUDA context: in a subprocess. Where asserts are
    compiled out, the image of the bad budget gets no leaf (lengths 0), and a NaN threshold never stops."""
    run_script(f"""
import torch, mixres
scores = torch.rand(2, 30, device="cuda")
budgets = torch.tensor([6, 7], device="cuda") if "{bad}" == "budgets" else None
# Scores are in [0, 1): level 0's threshold never stops, level 1's NaN one stops nothing either (or asserts).
thresholds = torch.tensor([-1.0, float("nan")], device="cuda") if "{bad}" == "thresholds" else None
try:
    boxes, lengths = torch.ops.mixres.build_quadtree_adaptive(scores, 128, 192, 16, 64, 30, budgets, thresholds)
    torch.cuda.synchronize()
except RuntimeError as error:
    assert "device-side assert" in str(error) or "CUDA error" in str(error), error
else:
    if "{bad}" == "budgets":
        assert lengths.tolist() == [6, 0] and not boxes[1].any(), (lengths, boxes)
    else:
        assert lengths.tolist() == [30, 30], lengths
""")


def test_build_quadtree_adaptive_does_not_synchronize():
    height, width, lo, hi = 128, 192, 16, 64
    geo = QuadtreeGeometry(height, width, lo, hi)
    scores = packed_scores(geo, 8)
    args = (height, width, lo, hi, 60)
    image_budget = image_budgets(geo, 8, 60).to(DEVICE, torch.int32)
    thresholds = torch.tensor([0.5, 0.0], device=DEVICE)
    calls = [lambda: ops.build_quadtree_adaptive(scores, *args, image_budget, thresholds),
             lambda: mixres.ops.build_quadtree_adaptive(scores, *args, image_budget, thresholds),
             lambda: mixres.ops.build_quadtree_adaptive(scores, *args, None, 0.25),
             lambda: mixres.ops.build_quadtree_adaptive(scores, *args, image_budget, thresholds[0])]
    expected = [call() for call in calls]  # warm-up: lazy initialisation may synchronize once
    torch.cuda.synchronize()
    with raising_on_host_sync():
        results = [call() for call in calls]
    for got, want in zip(results, expected, strict=True):
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_build_quadtree_adaptive_cuda_graph_replay_and_compile():
    height, width, lo, hi, batch = 128, 192, 16, 64, 8
    geo = QuadtreeGeometry(height, width, lo, hi)
    scores = packed_scores(geo, batch)
    image_budget = image_budgets(geo, batch, 60).to(DEVICE, torch.int32)  # converted to int64 inside the graph
    thresholds = torch.tensor([0.5, 0.0], device=DEVICE)

    def run():
        return ops.build_quadtree_adaptive(scores, height, width, lo, hi, 60, image_budget, thresholds)

    graph, static = captured_in_cuda_graph(run)
    for seed in range(1, 4):
        scores.copy_(packed_scores(geo, batch, seed=seed, ties=seed == 2))
        image_budget.copy_(image_budgets(geo, batch, 60, seed=seed).to(DEVICE, torch.int32))
        thresholds.copy_(torch.tensor([0.25 * seed, -0.5 + 0.5 * seed]))
        graph.replay()
        for replayed, eager in zip(static, run(), strict=True):
            assert torch.equal(replayed, eager)

    def wrapped(scores, image_budget, thresholds):
        return mixres.ops.build_quadtree_adaptive(scores, height, width, lo, hi, 60, image_budget, thresholds)

    torch._dynamo.reset()
    compiled = torch.compile(wrapped, fullgraph=True)
    for got, expected in zip(compiled(scores, image_budget, thresholds), run(), strict=True):
        assert torch.equal(got, expected)


# ------------------------------------------------------------------------------------------------ extract_patches


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("height, width", [(128, 192), (256, 448)])
@pytest.mark.parametrize("batch", [1, 7, 64])
@pytest.mark.parametrize("patch_size", [16, 8, 24])  # F = 1, 2, 4; down-sampling by 2/3 and 4/3; up-sampling
def test_extract_patches_matches_the_oracle_cpu_and_reference(mode, height, width, batch, patch_size):
    images = random_images(batch, 3, height, width, seed=batch)
    boxes = mosaic_boxes(height, width, batch, seed=batch)
    tokens = ops.extract_patches(images, boxes, patch_size, mode)
    assert tokens.shape == (batch, boxes.shape[1], 3, patch_size, patch_size)
    tolerance = oracles.TOLERANCE[torch.float32]
    torch.testing.assert_close(tokens.cpu(), oracle_tokens(images, boxes, patch_size, mode), rtol=tolerance,
                               atol=tolerance)
    on_cpu = ops.extract_patches(images.cpu(), boxes.cpu(), patch_size, mode)
    if mode == "area":  # sums in the CPU kernel's order: identical
        assert torch.equal(tokens.cpu(), on_cpu)
    else:
        torch.testing.assert_close(tokens.cpu(), on_cpu, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(tokens, reference.extract_patches(images, boxes, patch_size, mode),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16], ids=str)
def test_extract_patches_dtypes(mode, dtype):
    height, width = 128, 192
    images = random_images(7, 3, height, width, seed=2)
    boxes = mosaic_boxes(height, width, 7, seed=2)
    expected = ops.extract_patches(images, boxes, 16, mode)  # float32
    tokens = ops.extract_patches(images.to(dtype), boxes, 16, mode)
    assert tokens.dtype == dtype
    torch.testing.assert_close(tokens.cpu().double(), oracle_tokens(images.to(dtype), boxes, 16, mode),
                               rtol=oracles.TOLERANCE[dtype], atol=oracles.TOLERANCE[dtype])
    tol = LOW_PRECISION_TOL.get(dtype, 1e-6)
    torch.testing.assert_close(tokens.float(), expected, rtol=tol, atol=tol)
    on_cpu = ops.extract_patches(images.to(dtype).cpu(), boxes.cpu(), 16, mode)
    if mode == "area":
        assert torch.equal(tokens.cpu(), on_cpu)
    else:
        torch.testing.assert_close(tokens.cpu(), on_cpu, rtol=tol, atol=tol)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("patch_size", [8, 16])
def test_extract_patches_arbitrary_boxes(mode, patch_size):
    """Overlapping boxes of sides that are not multiples of the token side, smaller than it, or 12x larger."""
    height, width = 96, 160
    images = random_images(3, 2, height, width, seed=4)
    boxes = random_boxes(3, 50, height, width, sizes=[5, 8, 13, 16, 24, 31, 32, 40, 64, 96], seed=4).to(DEVICE)
    tokens = ops.extract_patches(images, boxes, patch_size, mode)
    tolerance = oracles.TOLERANCE[torch.float32]
    torch.testing.assert_close(tokens.cpu(), oracle_tokens(images, boxes, patch_size, mode), rtol=tolerance,
                               atol=tolerance)
    on_cpu = ops.extract_patches(images.cpu(), boxes.cpu(), patch_size, mode)
    if mode == "area":
        assert torch.equal(tokens.cpu(), on_cpu)
    else:
        torch.testing.assert_close(tokens.cpu(), on_cpu, rtol=1e-6, atol=1e-6)
    # Strided (channels-last) images give the same tokens.
    strided = ops.extract_patches(images.to(memory_format=torch.channels_last), boxes, patch_size, mode)
    assert torch.equal(strided, tokens)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_extract_patches_without_vector_loads(mode, dtype):
    """Images whose rows or start vector loads cannot read take the scalar kernel, with the same tokens."""
    height, width = 64, 130  # rows of 130 elements: not a whole number of 4-element vectors
    images = random_images(2, 3, height, width, seed=11, dtype=dtype)
    boxes = random_boxes(2, 30, height, width, sizes=[8, 16, 32, 64], seed=11).to(DEVICE)
    tokens = ops.extract_patches(images, boxes, 16, mode).cpu()
    torch.testing.assert_close(tokens.double(), oracle_tokens(images, boxes, 16, mode).double(),
                               rtol=oracles.TOLERANCE[dtype], atol=oracles.TOLERANCE[dtype])
    expected = ops.extract_patches(images.cpu(), boxes.cpu(), 16, mode)
    if mode == "area":
        assert torch.equal(tokens, expected)
    else:
        torch.testing.assert_close(tokens, expected)

    aligned = random_images(2, 3, 64, 128, seed=12, dtype=dtype)
    storage = torch.empty(aligned.numel() + 1, device=DEVICE, dtype=dtype)
    shifted = storage[1:].view_as(aligned).copy_(aligned)  # contiguous, one element past vector alignment
    boxes = mosaic_boxes(64, 128, 2, seed=12)
    assert torch.equal(ops.extract_patches(shifted, boxes, 16, mode), ops.extract_patches(aligned, boxes, 16, mode))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("overlapping", [False, True], ids=["mosaic", "overlapping"])
def test_extract_patches_backward_matches_the_oracle_and_cpu(mode, dtype, overlapping):
    height, width, patch_size = 128, 192, 12
    if overlapping:
        boxes = random_boxes(3, 40, height, width, sizes=[4, 12, 16, 24, 48, 64], seed=7).to(DEVICE)
    else:
        boxes = mosaic_boxes(height, width, 3, seed=7)
    generator = torch.Generator().manual_seed(8)
    grad = torch.randn(3, boxes.shape[1], 2, patch_size, patch_size, generator=generator).to(DEVICE, dtype)
    grad_images = ops.extract_patches_backward(grad, boxes, height, width, mode)
    assert grad_images.dtype == dtype and grad_images.shape == (3, 2, height, width)
    expected = ops.extract_patches_backward(grad.cpu(), boxes.cpu(), height, width, mode)
    # float32 sums of the contributions of every token that reads a pixel (magnitudes adding up to a few tens):
    # a few float32 ulps of them. Half precision: the float32 sum, rounded once to the dtype.
    tol = {torch.float32: (1e-5, 1e-5), torch.float64: (1e-12, 1e-12), torch.float16: (2e-3, 1e-4),
           torch.bfloat16: (1.6e-2, 1e-4)}[dtype]
    torch.testing.assert_close(grad_images.cpu().double(), oracle_gradient(grad, boxes, height, width, mode).double(),
                               rtol=tol[0], atol=tol[1])
    torch.testing.assert_close(grad_images.cpu(), expected, rtol=tol[0], atol=tol[1])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("patch_size", [4, 3])
def test_extract_patches_gradcheck(mode, patch_size):
    images = random_images(2, 2, 8, 12, seed=9, dtype=torch.float64).requires_grad_()
    boxes = random_boxes(2, 6, 8, 12, sizes=[2, 3, 4, 5, 8], seed=9).to(DEVICE)
    # Atomics add in any order: the backward is deterministic only to rounding.
    assert torch.autograd.gradcheck(lambda x: mixres.ops.extract_patches(x, boxes, patch_size, mode), (images,),
                                    nondet_tol=1e-12)


def test_extract_patches_rejects_bad_inputs_on_the_host():
    images = random_images(2, 3, 64, 64)
    boxes = mosaic_boxes(64, 64, 2)
    with pytest.raises(ValueError, match="images.*boxes.*same CUDA device"):
        ops.extract_patches(images, boxes.cpu(), 16, "area")
    with pytest.raises(ValueError, match="mode"):
        ops.extract_patches(images, boxes, 16, "nearest")
    with pytest.raises(ValueError, match="boxes"):
        ops.extract_patches(images, boxes[:1], 16, "area")
    with pytest.raises(TypeError, match="int32"):
        ops.extract_patches(images, boxes.long(), 16, "area")
    grad = torch.zeros(2, boxes.shape[1], 3, 16, 16, device=DEVICE)
    with pytest.raises(ValueError, match="grad_tokens.*boxes.*same CUDA device"):
        ops.extract_patches_backward(grad, boxes.cpu(), 64, 64, "area")


# ------------------------------------------------------------------------------------------------- leaf_centers


@pytest.mark.parametrize("geometry", GEOMETRIES[:3], ids=geometry_id)
def test_leaf_centers_match_the_oracle_cpu_and_reference(geometry):
    height, width, lo, hi = geometry
    geo = QuadtreeGeometry(height, width, lo, hi)
    boxes = ops.build_quadtree(packed_scores(geo, 64, seed=3), height, width, lo, hi, budgets(geo)[1])
    centers = ops.leaf_centers(boxes, lo)
    assert centers.dtype == torch.float32 and centers.shape == (*boxes.shape[:2], 2)
    oracles.assert_centers_close(centers.cpu(), oracles.leaf_centers(boxes.cpu(), lo))
    assert torch.equal(centers.cpu(), ops.leaf_centers(boxes.cpu(), lo))
    assert torch.equal(centers, reference.leaf_centers(boxes, lo))


# --------------------------------------------------------------------------------------------- pixel_blur_scores

# Non-square images; scale factors s / min_patch_size from 2 to 128 (above 32 a lane sums several columns); a
# min_patch_size that is not a power of two; and a single size (P = 0).
BLUR_GEOMETRIES = [(128, 192, 16, 64), (96, 160, 8, 32), (224, 112, 14, 56), (128, 256, 1, 128), (256, 256, 2, 128),
                   (64, 128, 32, 32)]


def blur_tolerance(dtype):
    return (1e-12, 1e-14) if dtype == torch.float64 else (1e-5, 1e-6)  # half precision is widened to float32


def assert_blur_matches_the_oracle(scores, images, lo, hi):
    """Against docs/design.md's formula patch by patch, in float64 on the CPU, from the same (rounded) pixels."""
    rtol, atol = blur_tolerance(images.dtype)
    rows = oracle_rows(images.shape[0])
    expected = oracles.pack(oracles.pixel_blur_pyramid(images.cpu()[rows], lo, hi), len(rows)).double()
    torch.testing.assert_close(scores.cpu()[rows].double(), expected, rtol=rtol, atol=atol)


@pytest.mark.parametrize("geometry", BLUR_GEOMETRIES, ids=geometry_id)
@pytest.mark.parametrize("batch", [1, 7])
def test_pixel_blur_scores_match_the_oracle_cpu_and_reference(geometry, batch):
    height, width, lo, hi = geometry
    images = random_images(batch, 3, height, width, seed=batch + lo)
    images[0, :, : height // 2] = 0.5  # flat: scores 0
    scores = ops.pixel_blur_scores(images, lo, hi)
    assert scores.device == images.device and scores.dtype == torch.float32
    assert scores.shape == (batch, QuadtreeGeometry(height, width, lo, hi).n_scores)
    assert_blur_matches_the_oracle(scores, images, lo, hi)
    torch.testing.assert_close(scores.cpu(), ops.pixel_blur_scores(images.cpu(), lo, hi), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(scores, reference.pixel_blur_scores(images, lo, hi), rtol=1e-5, atol=1e-6)
    assert torch.equal(ops.pixel_blur_scores(images, lo, hi), scores)  # a fixed summation order: deterministic


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("batch", [1, 300])
def test_pixel_blur_scores_dtypes(dtype, batch):
    height, width, lo, hi = 128, 192, 16, 64
    images = random_images(batch, 3, height, width, seed=3, dtype=dtype)
    scores = ops.pixel_blur_scores(images, lo, hi)
    assert scores.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_blur_matches_the_oracle(scores, images, lo, hi)
    rtol, atol = blur_tolerance(dtype)
    torch.testing.assert_close(scores.cpu(), ops.pixel_blur_scores(images.cpu(), lo, hi), rtol=rtol, atol=atol)
    torch.testing.assert_close(scores, reference.pixel_blur_scores(images, lo, hi), rtol=rtol, atol=atol)
    # Strided (channels-last) images give the same scores.
    strided = ops.pixel_blur_scores(images.to(memory_format=torch.channels_last), lo, hi)
    assert torch.equal(strided, scores)


# The down-sampled cells of two channels (2 m^2 accumulators) outgrow the default 48 KiB of shared memory: the kernel
# opts in to more, or, past the device's limit, keeps them in a global-memory workspace.
@pytest.mark.parametrize("dtype, lo", [(torch.float32, 96), (torch.float64, 128), (torch.float32, 256)],
                         ids=["opt-in", "workspace-f64", "workspace-f32"])
def test_pixel_blur_scores_large_cells(dtype, lo):
    height, width, hi = 2 * lo, 4 * lo, 2 * lo
    images = random_images(3, 2, height, width, seed=lo, dtype=dtype)
    scores = ops.pixel_blur_scores(images, lo, hi)
    assert_blur_matches_the_oracle(scores, images, lo, hi)
    rtol, atol = blur_tolerance(dtype)
    torch.testing.assert_close(scores.cpu(), ops.pixel_blur_scores(images.cpu(), lo, hi), rtol=rtol, atol=atol)


def test_pixel_blur_scores_empty_and_bad_inputs():
    assert ops.pixel_blur_scores(random_images(0, 3, 64, 128), 16, 64).shape == (0, 10)
    assert ops.pixel_blur_scores(random_images(0, 3, 64, 128, dtype=torch.float64), 16, 64).dtype == torch.float64
    assert ops.pixel_blur_scores(random_images(2, 3, 64, 128), 32, 32).shape == (2, 0)
    images = random_images(2, 3, 64, 128)
    with pytest.raises(ValueError, match="images height and width must be positive multiples of max_patch_size"):
        ops.pixel_blur_scores(images[..., :96], 16, 64)
    with pytest.raises(TypeError, match="images must be float16"):
        ops.pixel_blur_scores(images.to(torch.uint8), 16, 64)
    with pytest.raises(ValueError, match="power of two"):
        ops.pixel_blur_scores(images, 16, 48)


def test_pixel_blur_scorer_does_not_synchronize():
    images = random_images(4, 3, 128, 192)
    scorer = mixres.PixelBlur(16, 64)
    expected = scorer(images)  # warm-up: lazy initialisation may synchronize once
    torch.cuda.synchronize()
    with raising_on_host_sync():
        pyramid = scorer(images)
        ops.pixel_blur_scores(images.half(), 8, 64)
        mosaic = mixres.tokenize(images, pyramid, n_patches=budgets(QuadtreeGeometry(128, 192, 16, 64))[1])
    assert all(torch.equal(a, b) for a, b in zip(pyramid, expected))
    assert mosaic.boxes.device == images.device


# ------------------------------------------------------------------------------------------------- empty inputs


def test_empty_inputs():
    geo = QuadtreeGeometry(64, 128, 16, 64)
    scores = torch.zeros(0, geo.n_scores, device=DEVICE)
    assert ops.build_quadtree(scores, 64, 128, 16, 64, geo.n_roots).shape == (0, geo.n_roots, 3)
    boxes_and_lengths = ops.build_quadtree_adaptive(scores, 64, 128, 16, 64, geo.n_roots,
                                                    torch.zeros(0, dtype=torch.int32, device=DEVICE),
                                                    torch.zeros(2, device=DEVICE))
    assert [t.shape for t in boxes_and_lengths] == [(0, geo.n_roots, 3), (0,)]
    images = random_images(2, 3, 64, 128)
    no_boxes = torch.zeros(2, 0, 3, dtype=torch.int32, device=DEVICE)
    assert ops.extract_patches(images, no_boxes, 16, "area").shape == (2, 0, 3, 16, 16)
    assert ops.leaf_centers(no_boxes, 16).shape == (2, 0, 2)
    grad = torch.zeros(2, 0, 3, 16, 16, device=DEVICE, dtype=torch.float16)
    grad_images = ops.extract_patches_backward(grad, no_boxes, 64, 128, "bilinear")
    assert grad_images.dtype == torch.float16 and grad_images.shape == (2, 3, 64, 128)
    assert not grad_images.any()
    boxes = mosaic_boxes(64, 128, 2)
    assert ops.extract_patches(images[:, :0], boxes, 16, "area").shape == (2, boxes.shape[1], 0, 16, 16)


# ----------------------------------------------------------------------------------------------------- tokenize


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("batch", [1, 7, 64, 512])
def test_tokenize_matches_the_oracle_and_the_reference(dtype, batch):
    height, width = 128, 192
    geo = QuadtreeGeometry(height, width, 16, 64)
    images = random_images(batch, 3, height, width, seed=batch, dtype=dtype)
    maps = random_pyramid(geo, batch, seed=batch, ties=batch % 2 == 1, device=DEVICE)
    n_patches = budgets(geo)[1]
    mosaic = mixres.tokenize(images, maps, n_patches=n_patches)
    rows = oracle_rows(batch)
    checked = types.SimpleNamespace(tokens=mosaic.tokens.cpu()[rows], boxes=mosaic.boxes.cpu()[rows],
                                    centers=mosaic.centers.cpu()[rows])
    oracles.assert_matches(checked, oracles.tokenize(images.cpu()[rows], [m.cpu()[rows] for m in maps], n_patches))
    expected = reference.tokenize(images, maps, n_patches=n_patches)
    assert mosaic.tokens.dtype == dtype and mosaic.tokens.device == images.device
    assert torch.equal(mosaic.boxes, expected.boxes)
    assert torch.equal(mosaic.centers, expected.centers)
    tol = LOW_PRECISION_TOL.get(dtype, 1e-5)
    torch.testing.assert_close(mosaic.tokens, expected.tokens, rtol=tol, atol=tol)


def test_tokenize_does_not_synchronize():
    height, width = 128, 192
    geo = QuadtreeGeometry(height, width, 16, 64)
    images = random_images(4, 3, height, width).requires_grad_()
    maps = random_pyramid(geo, 4, device=DEVICE)
    saliency = torch.rand(4, 32, 48, device=DEVICE)
    n_patches = budgets(geo)[1]
    grad = torch.randn(4, n_patches, 3, 16, 16, device=DEVICE)
    for scores in (maps, saliency):  # warm-up: lazy initialisation may synchronize once
        mixres.tokenize(images, scores, n_patches=n_patches, mode="bilinear")
    torch.cuda.synchronize()
    with raising_on_host_sync():
        for scores in (maps, saliency):
            for mode in MODES:
                mosaic = mixres.tokenize(images.detach(), scores, n_patches=n_patches, mode=mode)
                ops.extract_patches_backward(grad, mosaic.boxes, height, width, mode)


def test_tokenize_cuda_graph_replay():
    height, width, batch = 128, 192, 8
    geo = QuadtreeGeometry(height, width, 16, 64)
    n_patches = budgets(geo)[1]
    images = random_images(batch, 3, height, width)
    maps = random_pyramid(geo, batch, device=DEVICE)

    def run():
        mosaic = mixres.tokenize(images, maps, n_patches=n_patches)
        return mosaic.tokens, mosaic.boxes, mosaic.centers

    graph, static = captured_in_cuda_graph(run)
    for seed in range(1, 4):
        images.copy_(random_images(batch, 3, height, width, seed=seed))
        for m, new in zip(maps, random_pyramid(geo, batch, seed=seed, ties=seed == 2, device=DEVICE)):
            m.copy_(new)
        graph.replay()
        for replayed, eager in zip(static, run()):
            assert torch.equal(replayed, eager)


def test_tokenize_compiles_fullgraph():
    height, width = 128, 192
    geo = QuadtreeGeometry(height, width, 16, 64)
    n_patches = budgets(geo)[1]
    images = random_images(3, 3, height, width)
    maps = random_pyramid(geo, 3, device=DEVICE)

    def run(images, maps):
        mosaic = mixres.tokenize(images, maps, n_patches=n_patches)
        return mosaic.tokens, mosaic.boxes, mosaic.centers

    torch._dynamo.reset()
    compiled = torch.compile(run, fullgraph=True)
    for got, expected in zip(compiled(images, maps), run(images, maps)):
        assert torch.equal(got, expected)


# ------------------------------------------------------------------------------- adaptive tokenize: padded mosaics


def padded_case(batch: int, seed: int = 0, ties: bool = False):
    """CUDA images and score maps of a 128 x 192 batch (16-64 px), N_max (its middle budget) and per-image budgets up
    to it, int32 on the device."""
    geo = QuadtreeGeometry(128, 192, 16, 64)
    images = random_images(batch, 3, 128, 192, seed=seed)
    maps = random_pyramid(geo, batch, seed=seed, ties=ties, device=DEVICE)
    max_patches = budgets(geo)[1]
    image_budget = image_budgets(geo, batch, max_patches, seed=seed).to(DEVICE, torch.int32)
    return images, maps, max_patches, image_budget


def adaptive_forms(maps, max_patches, image_budget):
    """tokenize's keyword arguments for each way to stop: a dict of numbers, thresholds on the device with budgets,
    budgets alone, thresholds on the CPU (checked on the host, then copied)."""
    thresholds = level_quantiles([m.cpu() for m in maps], 0.6)
    per_size = {64: thresholds[0].item(), 32: thresholds[1].item()}
    return [dict(n_patches=max_patches, threshold=per_size),
            dict(n_patches=image_budget, max_patches=max_patches, threshold=thresholds.to(DEVICE)),
            dict(n_patches=image_budget, max_patches=max_patches),
            dict(n_patches=max_patches, threshold=thresholds)]


def on_the_cpu(kwargs: dict) -> dict:
    return {key: value.cpu() if isinstance(value, torch.Tensor) else value for key, value in kwargs.items()}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("batch", [1, 7, 64])
def test_padded_tokenize_matches_the_cpu_and_the_reference(batch, mode):
    """The padded mosaic on CUDA is the CPU's (whose own tests hold it to the oracle and to each image alone): the
    same lengths, boxes and centres, area tokens bit for bit, and padding exactly 0."""
    images, maps, max_patches, image_budget = padded_case(batch, seed=batch, ties=batch == 7)
    for kwargs in adaptive_forms(maps, max_patches, image_budget):
        mosaic = mixres.tokenize(images, maps, mode=mode, **kwargs)
        assert mosaic.lengths.device == images.device and mosaic.lengths.dtype == torch.int32
        assert mosaic.valid.device == images.device
        on_cpu = mixres.tokenize(images.cpu(), [m.cpu() for m in maps], mode=mode, **on_the_cpu(kwargs))
        for field in ("lengths", "boxes", "centers", "valid"):
            assert torch.equal(getattr(mosaic, field).cpu(), getattr(on_cpu, field)), field
        if mode == "area":  # sums in the CPU kernel's order: identical
            assert torch.equal(mosaic.tokens.cpu(), on_cpu.tokens)
        else:
            torch.testing.assert_close(mosaic.tokens.cpu(), on_cpu.tokens, rtol=1e-6, atol=1e-6)
        assert not mosaic.tokens[~mosaic.valid].any()
        by_reference = reference.tokenize(images, maps, mode=mode, **kwargs)
        for field in ("lengths", "boxes", "centers"):
            assert torch.equal(getattr(by_reference, field), getattr(mosaic, field)), field
        torch.testing.assert_close(by_reference.tokens, mosaic.tokens, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("patch_size", [16, 6])  # runs of 4 elements from vector loads; element by element
def test_extract_patches_padding_is_zero_and_takes_no_gradient(mode, patch_size):
    height, width = 128, 192
    geo = QuadtreeGeometry(height, width, 16, 64)
    scores = packed_scores(geo, 7, seed=5)
    image_budget = image_budgets(geo, 7, 96, seed=5).to(DEVICE)
    boxes, lengths = ops.build_quadtree_adaptive(scores, height, width, 16, 64, 96, image_budget, None)
    assert (lengths < 96).any()
    valid = torch.arange(96, device=DEVICE) < lengths[:, None]
    images = random_images(7, 3, height, width, seed=5)
    torch.full((7, 96, 3, patch_size, patch_size), float("nan"), device=DEVICE).sum()  # a skipped token shows NaN
    tokens = ops.extract_patches(images, boxes, patch_size, mode)
    assert not tokens[~valid].any()
    on_cpu = ops.extract_patches(images.cpu(), boxes.cpu(), patch_size, mode)
    if mode == "area":
        assert torch.equal(tokens.cpu(), on_cpu)
    else:
        torch.testing.assert_close(tokens.cpu(), on_cpu, rtol=1e-6, atol=1e-6)
    grad = torch.randn(tokens.shape, generator=torch.Generator().manual_seed(6)).to(DEVICE)
    grad_images = ops.extract_patches_backward(grad, boxes, height, width, mode)
    # Atomics add in any order: equal to rounding.
    leaves_only = ops.extract_patches_backward(grad * valid[..., None, None, None], boxes, height, width, mode)
    torch.testing.assert_close(grad_images, leaves_only, rtol=1e-5, atol=1e-5)
    expected = ops.extract_patches_backward(grad.cpu(), boxes.cpu(), height, width, mode)
    torch.testing.assert_close(grad_images.cpu(), expected, rtol=1e-5, atol=1e-5)


def test_grid_ops_on_a_padded_mosaic_match_the_cpu():
    geo = QuadtreeGeometry(128, 192, 16, 64)
    boxes, lengths = ops.build_quadtree_adaptive(packed_scores(geo, 4, seed=2), 128, 192, 16, 64, 60,
                                                 torch.tensor([6, 60, 33, 18], device=DEVICE), None)
    generator = torch.Generator().manual_seed(2)
    features = torch.randn(4, 60, 6, generator=generator).to(DEVICE)
    grid = torch.randn(4, 6, 8, 12, generator=generator).to(DEVICE)
    results = grid_ops_and_gradients(features, grid, boxes)
    for got, expected in zip(results, grid_ops_and_gradients(features.cpu(), grid.cpu(), boxes.cpu()), strict=True):
        assert got.is_cuda and torch.equal(got.cpu(), expected)
    padding = torch.arange(60, device=DEVICE) >= lengths[:, None]
    _, mean, total, grad_features, _ = results
    assert padding.any() and not mean[padding].any() and not total[padding].any() and not grad_features[padding].any()


def test_padded_tokenize_does_not_synchronize():
    images, maps, max_patches, image_budget = padded_case(4)
    calls = [lambda kwargs=kwargs: mixres.tokenize(images, maps, **kwargs)
             for kwargs in adaptive_forms(maps, max_patches, image_budget)[:3]]
    calls += [lambda: mixres.tokenize(images, maps, max_patches, threshold=0.25, mode="bilinear"),
              lambda: mixres.tokenize(images, maps, [6, 9, 12, 15], max_patches=max_patches)]
    grad = torch.randn(4, max_patches, 3, 16, 16, device=DEVICE)
    features = torch.randn(4, max_patches, 5, device=DEVICE)

    def run_all():
        results = []
        for call in calls:
            mosaic = call()
            ops.extract_patches_backward(grad, mosaic.boxes, 128, 192, "area")  # atomics: not compared below
            results += [mosaic.tokens, mosaic.boxes, mosaic.centers, mosaic.lengths, mosaic.valid,
                        mixres.grid_to_tokens(mosaic.to_grid(features), mosaic.boxes, 16)]
        return results

    expected = run_all()  # warm-up: lazy initialisation may synchronize once
    torch.cuda.synchronize()
    with raising_on_host_sync():
        results = run_all()
    for got, want in zip(results, expected, strict=True):
        assert torch.equal(got, want)


def test_padded_tokenize_cuda_graph_replay():
    images, maps, max_patches, image_budget = padded_case(8)
    thresholds = torch.tensor([0.5, 0.0], device=DEVICE)

    def run():
        tensors = mixres.tokenize(images, maps, image_budget, max_patches=max_patches, threshold=thresholds)
        numbers = mixres.tokenize(images, maps, max_patches, threshold={64: 0.5, 32: 0.0}, mode="bilinear")
        return (tensors.tokens, tensors.boxes, tensors.centers, tensors.lengths, tensors.valid, numbers.tokens,
                numbers.boxes, numbers.lengths)

    graph, static = captured_in_cuda_graph(run)
    geo = QuadtreeGeometry(128, 192, 16, 64)
    for seed in range(1, 4):
        images.copy_(random_images(8, 3, 128, 192, seed=seed))
        for m, new in zip(maps, random_pyramid(geo, 8, seed=seed, ties=seed == 2, device=DEVICE), strict=True):
            m.copy_(new)
        image_budget.copy_(image_budgets(geo, 8, max_patches, seed=seed).to(DEVICE, torch.int32))
        thresholds.copy_(torch.tensor([0.25 * seed, -0.5 + 0.5 * seed]))
        graph.replay()
        for replayed, eager in zip(static, run(), strict=True):
            assert torch.equal(replayed, eager)


def test_padded_tokenize_compiles_fullgraph():
    images, maps, max_patches, image_budget = padded_case(3)
    thresholds = torch.tensor([0.5, 0.0], device=DEVICE)

    def run(images, maps, image_budget, thresholds):
        mosaic = mixres.tokenize(images, maps, image_budget, max_patches=max_patches, threshold=thresholds)
        return mosaic.tokens, mosaic.boxes, mosaic.centers, mosaic.lengths, mosaic.valid

    torch._dynamo.reset()
    compiled = torch.compile(run, fullgraph=True)
    for got, expected in zip(compiled(images, maps, image_budget, thresholds), run(images, maps, image_budget,
                                                                                  thresholds), strict=True):
        assert torch.equal(got, expected)


def test_padded_tokenize_rejects_bad_inputs_on_the_host():
    images, maps, max_patches, image_budget = padded_case(2)
    with pytest.raises(ValueError, match="n_patches is on cpu but images are on cuda"):
        mixres.tokenize(images, maps, image_budget.cpu(), max_patches=max_patches)
    with pytest.raises(ValueError, match=r"threshold must be finite, got nan for patch size 32 \(threshold\[1\]\)"):
        mixres.tokenize(images, maps, max_patches, threshold=torch.tensor([0.0, float("nan")]))
    with pytest.raises(ValueError, match=r"n_patches\[1\] = 7 is unreachable"):
        mixres.tokenize(images, maps, [6, 7], max_patches=max_patches)


# ------------------------------------------------------------------------------------------------------ opcheck


def test_opcheck_build_quadtree():
    geo = QuadtreeGeometry(128, 192, 16, 64)
    for dtype in (torch.float32, torch.float64):
        scores = packed_scores(geo, 3, ties=True, dtype=dtype)
        torch.library.opcheck(ops.build_quadtree.default, (scores, 128, 192, 16, 64, budgets(geo)[1]))


def test_opcheck_build_quadtree_adaptive():
    geo = QuadtreeGeometry(128, 192, 16, 64)
    max_patches = budgets(geo)[1]
    for dtype in (torch.float32, torch.float64):
        scores = packed_scores(geo, 3, ties=True, dtype=dtype)
        image_budget = image_budgets(geo, 3, max_patches).to(DEVICE, torch.int32)
        thresholds = torch.tensor([1.0, 0.0], dtype=dtype, device=DEVICE)
        for extra in ((image_budget, thresholds), (None, thresholds), (image_budget.long(), None), (None, None)):
            torch.library.opcheck(ops.build_quadtree_adaptive.default, (scores, 128, 192, 16, 64, max_patches, *extra))


@pytest.mark.parametrize("mode", MODES)
def test_opcheck_extract_patches(mode):
    images = random_images(2, 3, 64, 128).requires_grad_()
    boxes = mosaic_boxes(64, 128, 2)
    torch.library.opcheck(ops.extract_patches.default, (images, boxes, 8, mode))
    grad = torch.randn(2, boxes.shape[1], 3, 8, 8, device=DEVICE)
    torch.library.opcheck(ops.extract_patches_backward.default, (grad, boxes, 64, 128, mode))


def test_opcheck_leaf_centers():
    torch.library.opcheck(ops.leaf_centers.default, (mosaic_boxes(64, 128, 2), 16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_opcheck_pixel_blur_scores(dtype):
    images = random_images(2, 3, 64, 128, dtype=dtype)
    for lo, hi in ((16, 64), (8, 32), (32, 32)):
        torch.library.opcheck(ops.pixel_blur_scores.default, (images, lo, hi))


# ------------------------------------------------------------------------------------ tokens_to_grid, grid_to_tokens


def grid_case(batch=4, dim=6, seed=0):
    """The boxes of a 128 x 192 mosaic (16-64 px), features ``[B, N, D]`` and a grid ``[B, D, 8, 12]``, on CUDA."""
    boxes = mosaic_boxes(128, 192, batch, seed)
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(batch, boxes.shape[1], dim, generator=generator).to(DEVICE)
    grid = torch.randn(batch, dim, 8, 12, generator=generator).to(DEVICE)
    return boxes, features, grid


def grid_ops(features, grid, boxes):
    return (mixres.tokens_to_grid(features, boxes, 16, (128, 192)), mixres.grid_to_tokens(grid, boxes, 16),
            mixres.grid_to_tokens(grid, boxes, 16, "sum"))


def grid_ops_and_gradients(features, grid, boxes):
    features, grid = features.detach().requires_grad_(), grid.detach().requires_grad_()
    outputs = grid_ops(features, grid, boxes)
    return *outputs, *torch.autograd.grad(sum((o * o).sum() for o in outputs), (features, grid))


def test_grid_ops_match_cpu_and_do_not_synchronize():
    boxes, features, grid = grid_case()
    grid_ops_and_gradients(features, grid, boxes)  # warm-up: lazy initialisation may synchronize once
    torch.cuda.synchronize()
    with raising_on_host_sync():
        results = grid_ops_and_gradients(features, grid, boxes)
    # Gathers and the same pairwise sums in the same order (no atomics): identical to the CPU, forward and backward.
    for got, expected in zip(results, grid_ops_and_gradients(features.cpu(), grid.cpu(), boxes.cpu())):
        assert got.is_cuda and torch.equal(got.cpu(), expected)


def test_grid_ops_cuda_graph_replay_and_compile():
    boxes, features, grid = grid_case(batch=8)
    graph, static = captured_in_cuda_graph(lambda: grid_ops(features, grid, boxes))
    for seed in range(1, 4):
        for tensor, new in zip((boxes, features, grid), grid_case(batch=8, seed=seed)):
            tensor.copy_(new)
        graph.replay()
        for replayed, eager in zip(static, grid_ops(features, grid, boxes)):
            assert torch.equal(replayed, eager)
    torch._dynamo.reset()
    compiled = torch.compile(grid_ops, fullgraph=True)
    for got, expected in zip(compiled(features, grid, boxes), grid_ops(features, grid, boxes)):
        torch.testing.assert_close(got, expected)


# ------------------------------------------------------------------------------------------------ the Quadformer
def test_quadformer_on_cuda_matches_the_cpu_and_needs_no_host_sync():
    from timm.models.vision_transformer import VisionTransformer

    from mixres.models import Quadformer

    torch.manual_seed(0)
    vit = VisionTransformer(img_size=128, patch_size=16, embed_dim=64, depth=2, num_heads=2, num_classes=7).eval()
    model = Quadformer(vit, n_patches=31, scorer=mixres.PixelBlur(16, 64))
    images = torch.randn(4, 3, 128, 128)
    with torch.no_grad():
        expected = model(images)
        model.to(DEVICE)
        cuda_images = images.to(DEVICE)
        torch.cuda.synchronize()
        with raising_on_host_sync():
            logits = model(cuda_images)
    torch.testing.assert_close(logits.cpu(), expected, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------ issue 12: hostile input, double backward
def test_host_checks_of_types_sizes_and_int32_sides():
    images = random_images(1, 3, 64, 64)
    boxes = mosaic_boxes(64, 64, 1)
    with pytest.raises(TypeError, match="images must be float16, bfloat16, float32 or float64"):
        ops.extract_patches(images.to(torch.int32), boxes, 16, "area")
    with pytest.raises(ValueError, match=r"patch side p must be in \[1, 32768\]"):
        ops.extract_patches_backward(torch.zeros(1, boxes.shape[1], 3, 0, 0, device=DEVICE), boxes, 64, 64, "area")
    with pytest.raises(ValueError, match="would take more than 2"):
        ops.extract_patches_backward(torch.zeros(1, 0, 3, 4, 4, device=DEVICE), boxes[:, :0], 2**40, 2**40, "area")
    with pytest.raises(TypeError, match="scores must be float32 or float64"):
        ops.build_quadtree(torch.zeros(1, 5, device=DEVICE, dtype=torch.float16), 64, 64, 16, 64, 4)
    with pytest.raises(ValueError, match="at most 2147483647"):
        ops.build_quadtree(torch.zeros(1, 0, device=DEVICE), 2**31, 2**31, 2**31, 2**31, 1)


def test_overflowing_boxes_never_touch_memory_outside_the_image():
    """On CUDA the boxes are checked on the device, in int64 (y + size overflowed int32 on the CPU). A failed check
    trips a device-side assert, which ends the process's CUDA context: in a subprocess. Where asserts are compiled
    out, the forward writes NaN tokens and the backward skips the leaf."""
    run_script("""
import torch, mixres
images = torch.rand(1, 3, 64, 64, device="cuda")
boxes = torch.tensor([[[2**31 - 8, 0, 16]]], dtype=torch.int32, device="cuda")
try:
    tokens = torch.ops.mixres.extract_patches(images, boxes, 16, "area")
    grad = torch.ops.mixres.extract_patches_backward(torch.ones(1, 1, 3, 16, 16, device="cuda"), boxes, 64, 64,
                                                     "area")
    torch.cuda.synchronize()
except RuntimeError as error:
    assert "device-side assert" in str(error) or "CUDA error" in str(error), error
else:
    assert tokens.isnan().all() and (grad == 0).all()
""")


@pytest.mark.parametrize("mode", MODES)
def test_gradient_penalty_through_tokenize_matches_the_oracle_and_the_cpu(mode):
    geometry = QuadtreeGeometry(64, 96, 16, 32)
    images = random_images(2, 3, 64, 96, seed=4, dtype=torch.float64).cpu()
    pyramid = random_pyramid(geometry, 2, seed=4, dtype=torch.float64)
    penalties = []
    for device, tokenize in (("cpu", oracles.tokenize), ("cpu", mixres.tokenize), ("cuda", mixres.tokenize)):
        x = images.to(device).requires_grad_()
        tokens = tokenize(x, [m.to(device) for m in pyramid], 15, min_patch_size=16, max_patch_size=32,
                          patch_size=12, mode=mode).tokens
        (grad,) = torch.autograd.grad(tokens.tanh().sum(), x, create_graph=True)
        (penalty,) = torch.autograd.grad(grad.square().sum(), x)
        penalties.append(penalty.cpu())
    assert penalties[0].abs().sum() > 0
    # Atomics add in any order on CUDA: equal to rounding.
    torch.testing.assert_close(penalties[2], penalties[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(penalties[2], penalties[1], rtol=1e-10, atol=1e-12)
