"""extract_patches and leaf_centers: the C++ ops and the reference against the independent oracles (F.interpolate
leaf by leaf and its autograd; the centre formula in float64)."""
import pytest
import torch

import mixres
from mixres import reference

import oracles
from helpers import random_boxes, random_mosaic, run_script
from oracles import interpolate_each_leaf

EXTRACTS = {"cpp": torch.ops.mixres.extract_patches, "reference": reference.extract_patches}

MODES = ["area", "bilinear"]


def random_boxes_and_images(**kwargs):
    images, mosaic = random_mosaic(**kwargs)
    return images, mosaic.boxes


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("patch_size", [16, 8, 4, 24, 32])  # down, exact, non-divisible and up-sampling
def test_matches_interpolate_per_leaf(mode, patch_size):
    images, boxes = random_boxes_and_images(channels=3)
    expected = interpolate_each_leaf(images, boxes, patch_size, mode)
    torch.testing.assert_close(torch.ops.mixres.extract_patches(images, boxes, patch_size, mode), expected)
    torch.testing.assert_close(reference.extract_patches(images, boxes, patch_size, mode), expected)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)])
def test_dtypes(mode, dtype, tol):
    images, boxes = random_boxes_and_images(channels=2, dtype=dtype)
    tokens = torch.ops.mixres.extract_patches(images, boxes, 16, mode)
    assert tokens.dtype == dtype
    # Accumulation is in float32 (float64 for float64), so only the final rounding differs from float64.
    expected = interpolate_each_leaf(images.double(), boxes, 16, mode)
    torch.testing.assert_close(tokens.double(), expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("channels", [1, 5])
def test_any_channel_count_and_strided_images(channels):
    images, boxes = random_boxes_and_images(channels=channels)
    strided = images.to(memory_format=torch.channels_last)
    tokens = torch.ops.mixres.extract_patches(strided, boxes, 16, "area")
    torch.testing.assert_close(tokens, interpolate_each_leaf(images, boxes, 16, "area"))


def with_padding(boxes: torch.Tensor) -> torch.Tensor:
    """``boxes`` with every fifth one, and 7 more at the end, the padding box (0, 0, 0): padding among the leaves and
    after them (an adaptive mosaic's), which must give zero tokens and no gradient wherever it is."""
    padded = torch.cat([boxes, torch.zeros(boxes.shape[0], 7, 3, dtype=boxes.dtype)], dim=1)
    padded[:, ::5] = 0
    return padded


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("batch", [1, 3])
def test_tokens_do_not_depend_on_the_thread_count(batch, mode):
    """With fewer images than threads, the CPU kernel cuts each image's leaves, taken by top row, into pieces of about
    equal work, one task each. A mosaic's leaves, and boxes out of order, overlapping and scattered, with padding
    boxes or without, must give every token, bit for bit, on any number of threads."""
    images, mosaic_boxes = random_boxes_and_images(batch=batch, n_patches=60, seed=7)
    scattered = random_boxes(batch, 40, images.shape[2], images.shape[3], sizes=[3, 8, 16, 24, 64, 100], seed=7)
    threads = torch.get_num_threads()
    try:
        for boxes in (mosaic_boxes, scattered, with_padding(mosaic_boxes), with_padding(scattered)):
            expected = interpolate_each_leaf(images, boxes, 16, mode)
            first = None
            for count in (4, 3, 2, 1):
                torch.set_num_threads(count)
                torch.full(expected.shape, float("nan")).sum()  # a skipped leaf shows as NaN in a reused block
                tokens = torch.ops.mixres.extract_patches(images, boxes, 16, mode)
                if first is None:
                    torch.testing.assert_close(tokens, expected)
                    first = tokens
                assert torch.equal(tokens, first), f"{count} threads"
    finally:
        torch.set_num_threads(threads)


@oracles.one_thread()
def oracle_gradient(images, boxes, patch_size, mode, grad_tokens):
    """The images' gradient of sum(tokens * grad_tokens) by autograd through the per-leaf oracle, in the images'
    dtype (see oracles.resize_dtype)."""
    images = images.detach().clone().requires_grad_()
    tokens = interpolate_each_leaf(images, boxes, patch_size, mode)
    (grad,) = torch.autograd.grad((tokens * grad_tokens).sum(), images)
    return grad


# float32 gradients sum the contributions of every token that reads a pixel (of overlapping leaves, too); here
# their magnitudes add up to at most about 35, and a few float32 ulps of that (2^-24 relative) is about 1e-5.
GRADIENT_TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-12}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("patch_size", [16, 24])
@pytest.mark.parametrize("extract", EXTRACTS.values(), ids=EXTRACTS.keys())
def test_backward_matches_autograd_through_the_oracle(extract, mode, patch_size):
    images, boxes = random_boxes_and_images(batch=2, seed=3)
    grad = torch.randn(2, boxes.shape[1], 3, patch_size, patch_size, generator=torch.Generator().manual_seed(1))
    leaf = images.clone().requires_grad_()
    extract(leaf, boxes, patch_size, mode).backward(grad)
    tolerance = GRADIENT_TOLERANCE[torch.float32]
    torch.testing.assert_close(leaf.grad, oracle_gradient(images, boxes, patch_size, mode, grad), rtol=tolerance,
                               atol=tolerance)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("patch_size", [8, 16, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("extract", EXTRACTS.values(), ids=EXTRACTS.keys())
def test_arbitrary_boxes_match_the_oracle(extract, dtype, patch_size, mode):
    """Overlapping boxes whose sides are not multiples of the token side, smaller than it, or up to 12x larger, and
    padding boxes (0, 0, 0) among them: tokens (0 for padding) and gradients, which sum the overlaps (and take
    nothing from padding)."""
    height, width = 96, 160
    images = torch.rand(3, 2, height, width, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    images = images.to(dtype).requires_grad_()
    boxes = with_padding(random_boxes(3, 50, height, width, sizes=[3, 5, 8, 13, 16, 24, 31, 40, 64, 96], seed=4))
    tokens = extract(images, boxes, patch_size, mode)
    assert not tokens[(boxes == 0).all(-1)].any()  # exactly 0
    torch.testing.assert_close(tokens, interpolate_each_leaf(images.detach(), boxes, patch_size, mode),
                               rtol=oracles.TOLERANCE[dtype], atol=oracles.TOLERANCE[dtype])
    grad = torch.randn(tokens.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64).to(dtype)
    (grad_images,) = torch.autograd.grad(tokens, images, grad)
    tolerance = GRADIENT_TOLERANCE[dtype]
    torch.testing.assert_close(grad_images, oracle_gradient(images, boxes, patch_size, mode, grad), rtol=tolerance,
                               atol=tolerance)


@pytest.mark.parametrize("mode", MODES)
def test_gradcheck_float64(mode):
    # gradcheck builds dense Jacobians (inputs x outputs), so the mosaic is tiny: 7 leaves of 8 and 16 px.
    images = torch.rand(1, 2, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    pyramid = [torch.tensor([[[0.0, 1.0], [0.5, 0.2]]])]
    boxes = mixres.tokenize(images, pyramid, n_patches=7, min_patch_size=8, max_patch_size=16).boxes
    boxes = torch.cat([boxes, torch.zeros(1, 2, 3, dtype=torch.int32)], dim=1)  # and two padding boxes
    images.requires_grad_()
    for patch_size in (8, 6, 20):
        assert torch.autograd.gradcheck(lambda x: torch.ops.mixres.extract_patches(x, boxes, patch_size, mode),
                                        (images,), eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("mode", MODES)
def test_half_precision_backward(mode):
    images, boxes = random_boxes_and_images(batch=2)
    grad = torch.rand(2, boxes.shape[1], 3, 16, 16)
    full = images.clone().requires_grad_()
    torch.ops.mixres.extract_patches(full, boxes, 16, mode).backward(grad)
    half = images.to(torch.bfloat16).requires_grad_()
    torch.ops.mixres.extract_patches(half, boxes, 16, mode).backward(grad.to(torch.bfloat16))
    assert half.grad.dtype == torch.bfloat16
    torch.testing.assert_close(half.grad.float(), full.grad, rtol=1.6e-2, atol=1e-2)


@pytest.mark.parametrize("box", [[16, 32, 0], [0, 16, 0], [0, 0, -16], [-16, 0, 16], [0, 180, 16], [120, 0, 16]])
def test_boxes_outside_the_image_are_rejected(box):
    images, boxes = random_boxes_and_images(batch=1)
    boxes[0, 5] = torch.tensor(box, dtype=torch.int32)
    with pytest.raises(ValueError, match="is not inside the 128x192 image"):
        torch.ops.mixres.extract_patches(images, boxes, 16, "area")


def test_a_meta_tensor_among_cpu_ones_is_rejected():
    """A meta tensor sends the call to the fake kernel, which must not hand back uninitialised CPU memory."""
    images, boxes = random_boxes_and_images(batch=1)
    with pytest.raises(ValueError, match="boxes is on meta but images are on cpu"):
        torch.ops.mixres.extract_patches(images, boxes.to("meta"), 16, "area")
    grad = torch.rand(1, boxes.shape[1], 3, 16, 16)
    with pytest.raises(ValueError, match="boxes is on meta but grad_tokens are on cpu"):
        torch.ops.mixres.extract_patches_backward(grad, boxes.to("meta"), 128, 192, "area")
    with pytest.raises(ValueError, match="boxes is on cpu but grad_tokens are on meta"):
        torch.ops.mixres.extract_patches_backward(grad.to("meta"), boxes, 128, 192, "area")


def test_bad_mode_and_box_dtype_are_rejected():
    images, boxes = random_boxes_and_images(batch=1)
    with pytest.raises(ValueError, match="mode must be 'area' or 'bilinear'"):
        torch.ops.mixres.extract_patches(images, boxes, 16, "nearest")
    with pytest.raises(TypeError, match="boxes must be int32"):
        torch.ops.mixres.extract_patches(images, boxes.long(), 16, "area")


def test_leaf_centers():
    boxes = torch.tensor([[[0, 0, 16], [0, 16, 32], [16, 32, 64], [224, 240, 16]]], dtype=torch.int32)
    expected = torch.tensor([[[0.0, 0.0], [0.5, 1.5], [2.5, 3.5], [14.0, 15.0]]])
    assert torch.equal(torch.ops.mixres.leaf_centers(boxes, 16), expected)
    assert torch.equal(reference.leaf_centers(boxes, 16), expected)
    mosaic_boxes = random_boxes_and_images()[1]
    odd_boxes = random_boxes(2, 40, 96, 160, sizes=[3, 5, 8, 13, 64], seed=6)
    for boxes in (mosaic_boxes, odd_boxes):
        for min_patch_size in (8, 3, 14, 1):
            for leaf_centers in (torch.ops.mixres.leaf_centers, reference.leaf_centers):
                oracles.assert_centers_close(leaf_centers(boxes, min_patch_size),
                                             oracles.leaf_centers(boxes, min_patch_size))


def _bad_extract_arguments():
    images, boxes = torch.rand(2, 3, 64, 64), torch.tensor([[[0, 0, 32]], [[32, 32, 32]]], dtype=torch.int32)
    return [
        ("box y + size past the image", (images, torch.tensor([[[40, 0, 32]], [[0, 0, 8]]], dtype=torch.int32), 8,
                                         "area"), ValueError, r"boxes\[0, 0\] \(y=40, x=0, size=32\) is not inside "
                                                              r"the 64x64 image: need size >= 1, 0 <= y <= 64 - size"),
        ("negative x in the second image", (images, torch.tensor([[[0, 0, 8]], [[0, -1, 8]]], dtype=torch.int32), 8,
                                            "bilinear"), ValueError, r"boxes\[1, 0\] \(y=0, x=-1, size=8\)"),
        # (0, 0, 0) is padding, and (32, 32, 0) an error.
        ("empty box", (images, boxes * torch.tensor([1, 1, 0], dtype=torch.int32), 8, "area"), ValueError,
         r"boxes\[1, 0\] \(y=32, x=32, size=0\) is not inside the 64x64 image: need size >= 1.* \(or the padding "
         r"box \(0, 0, 0\)\)"),
        ("int64 boxes", (images, boxes.long(), 8, "area"), TypeError, "boxes must be int32"),
        ("boxes of 4 numbers", (images, torch.zeros(2, 1, 4, dtype=torch.int32), 8, "area"), ValueError,
         r"boxes must be \[B=2, N, 3\], got \[2, 1, 4\]"),
        ("boxes of another batch", (images, boxes[:1], 8, "area"), ValueError, r"boxes must be \[B=2, N, 3\]"),
        ("patch_size 0", (images, boxes, 0, "area"), ValueError, r"patch_size must be in \[1, 32768\], got 0"),
        ("patch_size 32769", (images, boxes, 32769, "area"), ValueError, r"patch_size must be in \[1, 32768\]"),
        ("integer images", (images.to(torch.int32), boxes, 8, "area"), TypeError,
         "images must be float16, bfloat16, float32 or float64"),
        ("images of rank 3", (images[0], boxes, 8, "area"), ValueError, r"images must be \[B, C, H, W\]"),
        ("mode", (images, boxes, 8, "nearest"), ValueError, "mode must be 'area' or 'bilinear'"),
        # Expanded: 2^60 leaves of 2^20 channels cost no memory as inputs, but their tokens are not addressable.
        ("tokens past 2^63 bytes", (torch.zeros(1).expand(2**20, 2**20, 1, 1),
                                    torch.zeros(1, dtype=torch.int32).expand(2**20, 2**20, 3), 2**15, "area"),
         ValueError, r"the tokens \[B, N, C, p, p\] = \[1048576, 1048576, 1048576, 32768, 32768\] would take"),
    ]


@pytest.mark.parametrize("extract", EXTRACTS.values(), ids=EXTRACTS.keys())
@pytest.mark.parametrize("what, args, error, pattern", _bad_extract_arguments(),
                         ids=[case[0] for case in _bad_extract_arguments()])
def test_cpp_and_reference_reject_bad_arguments_alike(extract, what, args, error, pattern):
    # The reference checks before it allocates anything: its crops grow with the boxes' sizes.
    with pytest.raises(error, match=pattern):
        extract(*args)


def test_backward_checks_its_token_gradient():
    boxes = torch.tensor([[[0, 0, 32]]], dtype=torch.int32)
    backward = torch.ops.mixres.extract_patches_backward
    # An expanded tensor: p = 32769 costs no memory, and the check comes before any copy.
    with pytest.raises(ValueError, match=r"patch side p must be in \[1, 32768\]"):
        backward(torch.zeros(1).expand(1, 1, 1, 32769, 32769), boxes, 64, 64, "area")
    with pytest.raises(ValueError, match=r"patch side p must be in \[1, 32768\]"):
        backward(torch.zeros(1, 1, 3, 0, 0), boxes, 64, 64, "area")
    with pytest.raises(TypeError, match="grad_tokens must be float16, bfloat16, float32 or float64"):
        backward(torch.zeros(1, 1, 3, 8, 8, dtype=torch.int64), boxes, 64, 64, "area")
    with pytest.raises(ValueError, match=r"boxes\[0, 0\] \(y=0, x=0, size=32\) is not inside the 16x64 image"):
        backward(torch.zeros(1, 1, 3, 8, 8), boxes, 16, 64, "area")


@pytest.mark.parametrize("leaf_centers", [torch.ops.mixres.leaf_centers, reference.leaf_centers],
                         ids=["cpp", "reference"])
def test_leaf_centers_checks_its_arguments(leaf_centers):
    boxes = torch.tensor([[[0, 0, 16]]], dtype=torch.int32)
    with pytest.raises(TypeError, match="boxes must be int32"):
        leaf_centers(boxes.long(), 16)
    with pytest.raises(ValueError, match=r"boxes must be \[B, N, 3\], got \[1, 3\]"):
        leaf_centers(boxes[0], 16)
    with pytest.raises(ValueError, match="min_patch_size must be positive, got 0"):
        leaf_centers(boxes, 0)
    extremes = torch.tensor([[[2**31 - 1, -2**31, 2**31 - 1], [-7, 3, -2]]], dtype=torch.int32)
    assert torch.equal(leaf_centers(extremes, 2**40), torch.ops.mixres.leaf_centers(extremes, 2**40))


def test_reference_memory_stays_proportional_with_overlapping_boxes():
    """500 boxes over the whole 256 KB image: cropped at once, they would take 128 MB; in pieces, a few MB."""
    run_script("""
import torch
from mixres import reference
images = torch.rand(1, 1, 256, 256)
boxes = torch.tensor([[[0, 0, 256]] * 500], dtype=torch.int32)
reference.extract_patches(images, boxes[:, :40], 1, "area")  # warm-up: threads, their malloc arenas, pools
cap_memory(48)
tokens = reference.extract_patches(images, boxes, 1, "area")
torch.testing.assert_close(tokens, images.mean().expand(1, 500, 1, 1, 1))
""")


@pytest.mark.parametrize("mode", MODES)
def test_a_leaf_of_the_token_size_is_copied_inf_and_nan_included(mode):
    """A bilinear blend would multiply an Inf neighbour by its weight 0, turning its finite neighbours into NaN.
    (F.interpolate keeps the neighbours but turns the Inf itself into NaN: the reference may do the same.)"""
    images = torch.rand(1, 2, 16, 16, generator=torch.Generator().manual_seed(0))
    images[0, 0, 3, 5], images[0, 1, 6, 6], images[0, 0, 0, 7] = float("inf"), float("-inf"), float("nan")
    boxes = torch.tensor([[[0, 0, 8], [0, 8, 8], [8, 0, 8], [8, 8, 8]]], dtype=torch.int32)
    leaves = torch.stack([images[0, :, y:y + 8, x:x + 8] for y, x, _ in boxes[0].tolist()])[None]
    torch.testing.assert_close(torch.ops.mixres.extract_patches(images, boxes, 8, mode), leaves, rtol=0, atol=0,
                               equal_nan=True)
    tokens, finite = reference.extract_patches(images, boxes, 8, mode), leaves.isfinite()
    assert torch.equal(tokens[finite], leaves[finite]) and not tokens[~finite].isfinite().any()
    grad_tokens = torch.rand(1, 4, 2, 8, 8)
    grad_tokens[0, 0, 0, 3, 4] = float("inf")
    grad = torch.ops.mixres.extract_patches_backward(grad_tokens, boxes, 16, 16, mode)
    expected = grad_tokens[0].unflatten(0, (2, 2)).permute(2, 0, 3, 1, 4).reshape(1, 2, 16, 16)
    torch.testing.assert_close(grad, expected, rtol=0, atol=0)
