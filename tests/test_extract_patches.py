"""extract_patches and leaf_centers: the C++ ops against F.interpolate leaf by leaf and against the reference."""
import pytest
import torch

import mixres
from mixres import reference

from helpers import interpolate_each_leaf, random_mosaic

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


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("patch_size", [16, 24])
def test_backward_matches_reference(mode, patch_size):
    images, boxes = random_boxes_and_images(batch=2, seed=3)
    grad = torch.randn(2, boxes.shape[1], 3, patch_size, patch_size, generator=torch.Generator().manual_seed(1))
    grads = []
    for extract in (torch.ops.mixres.extract_patches, reference.extract_patches):
        leaf = images.clone().requires_grad_()
        extract(leaf, boxes, patch_size, mode).backward(grad)
        grads.append(leaf.grad)
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.parametrize("mode", MODES)
def test_gradcheck_float64(mode):
    # gradcheck builds dense Jacobians (inputs x outputs), so the mosaic is tiny: 7 leaves of 8 and 16 px.
    images = torch.rand(1, 2, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    pyramid = [torch.tensor([[[0.0, 1.0], [0.5, 0.2]]])]
    boxes = mixres.tokenize(images, pyramid, n_patches=7, min_patch_size=8, max_patch_size=16).boxes
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


@pytest.mark.parametrize("box", [[0, 0, 0], [-16, 0, 16], [0, 180, 16], [120, 0, 16]])
def test_boxes_outside_the_image_are_rejected(box):
    images, boxes = random_boxes_and_images(batch=1)
    boxes[0, 5] = torch.tensor(box, dtype=torch.int32)
    with pytest.raises(ValueError, match="is not inside the 128x192 image"):
        torch.ops.mixres.extract_patches(images, boxes, 16, "area")


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
    _, random_boxes = random_boxes_and_images()
    assert torch.equal(torch.ops.mixres.leaf_centers(random_boxes, 8), reference.leaf_centers(random_boxes, 8))
