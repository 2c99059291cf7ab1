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
from helpers import random_boxes, random_pyramid, run_script

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
    torch.cuda.set_sync_debug_mode("error")
    try:
        pyramid = scorer(images)
        ops.pixel_blur_scores(images.half(), 8, 64)
        mosaic = mixres.tokenize(images, pyramid, n_patches=budgets(QuadtreeGeometry(128, 192, 16, 64))[1])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(torch.equal(a, b) for a, b in zip(pyramid, expected))
    assert mosaic.boxes.device == images.device


# ------------------------------------------------------------------------------------------------- empty inputs


def test_empty_inputs():
    geo = QuadtreeGeometry(64, 128, 16, 64)
    scores = torch.zeros(0, geo.n_scores, device=DEVICE)
    assert ops.build_quadtree(scores, 64, 128, 16, 64, geo.n_roots).shape == (0, geo.n_roots, 3)
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
    torch.cuda.set_sync_debug_mode("error")
    try:
        for scores in (maps, saliency):
            for mode in MODES:
                mosaic = mixres.tokenize(images.detach(), scores, n_patches=n_patches, mode=mode)
                ops.extract_patches_backward(grad, mosaic.boxes, height, width, mode)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_tokenize_cuda_graph_replay():
    height, width, batch = 128, 192, 8
    geo = QuadtreeGeometry(height, width, 16, 64)
    n_patches = budgets(geo)[1]
    images = random_images(batch, 3, height, width)
    maps = random_pyramid(geo, batch, device=DEVICE)

    def run():
        mosaic = mixres.tokenize(images, maps, n_patches=n_patches)
        return mosaic.tokens, mosaic.boxes, mosaic.centers

    side = torch.cuda.Stream()  # warm up on a side stream, as torch.cuda.graph's documentation asks
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = run()
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


# ------------------------------------------------------------------------------------------------------ opcheck


def test_opcheck_build_quadtree():
    geo = QuadtreeGeometry(128, 192, 16, 64)
    for dtype in (torch.float32, torch.float64):
        scores = packed_scores(geo, 3, ties=True, dtype=dtype)
        torch.library.opcheck(ops.build_quadtree.default, (scores, 128, 192, 16, 64, budgets(geo)[1]))


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
    torch.cuda.set_sync_debug_mode("error")
    try:
        results = grid_ops_and_gradients(features, grid, boxes)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    # Gathers and the same pairwise sums in the same order (no atomics): identical to the CPU, forward and backward.
    for got, expected in zip(results, grid_ops_and_gradients(features.cpu(), grid.cpu(), boxes.cpu())):
        assert got.is_cuda and torch.equal(got.cpu(), expected)


def test_grid_ops_cuda_graph_replay_and_compile():
    boxes, features, grid = grid_case(batch=8)
    side = torch.cuda.Stream()  # warm up on a side stream, as torch.cuda.graph's documentation asks
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        grid_ops(features, grid, boxes)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = grid_ops(features, grid, boxes)
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
        torch.cuda.set_sync_debug_mode("error")
        try:
            logits = model(cuda_images)
        finally:
            torch.cuda.set_sync_debug_mode("default")
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
