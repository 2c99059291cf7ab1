"""torch.library.opcheck: schemas, fake kernels, autograd registration and AOT dispatch of every op."""
import pytest
import torch

import mixres

from helpers import random_pyramid


def sample(batch=2, height=128, width=192):
    geometry = mixres.QuadtreeGeometry(height, width, 16, 64)
    packed = mixres.pack_pyramid(random_pyramid(geometry, batch), geometry, batch, torch.device("cpu"))
    boxes = torch.ops.mixres.build_quadtree(packed, height, width, 16, 64, 30)
    return packed, boxes, torch.rand(batch, 3, height, width)


def test_build_quadtree():
    packed, _, _ = sample()
    torch.library.opcheck(torch.ops.mixres.build_quadtree.default, (packed, 128, 192, 16, 64, 30))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_build_quadtree_adaptive(dtype):
    packed, _, _ = sample()
    packed = packed.to(dtype)
    budgets = torch.tensor([30, 18], dtype=torch.int32)
    thresholds = packed.quantile(0.6, dim=1).to(dtype)[:1].expand(2).contiguous()
    for args in ((budgets, thresholds), (budgets.long(), None), (None, thresholds), (None, None)):
        torch.library.opcheck(torch.ops.mixres.build_quadtree_adaptive.default, (packed, 128, 192, 16, 64, 30, *args))


@pytest.mark.parametrize("mode", ["area", "bilinear"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_extract_patches(mode, dtype):
    _, boxes, images = sample()
    images = images.to(dtype).requires_grad_()
    torch.library.opcheck(torch.ops.mixres.extract_patches.default, (images, boxes, 16, mode))
    grad = torch.rand(2, boxes.shape[1], 3, 16, 16, dtype=dtype)
    torch.library.opcheck(torch.ops.mixres.extract_patches_backward.default, (grad, boxes, 128, 192, mode))
    # A double backward differentiates extract_patches_backward in grad_tokens: its own autograd formula.
    torch.library.opcheck(torch.ops.mixres.extract_patches_backward.default,
                          (grad.requires_grad_(), boxes, 128, 192, mode))


@pytest.mark.parametrize("mode", ["area", "bilinear"])
def test_extract_patches_of_a_padded_mosaic(mode):
    packed, _, images = sample()
    boxes, lengths = torch.ops.mixres.build_quadtree_adaptive(packed, 128, 192, 16, 64, 30,
                                                              torch.tensor([30, 9], dtype=torch.int32), None)
    assert lengths.tolist() == [30, 9]  # 21 padding boxes in image 1
    images.requires_grad_()
    torch.library.opcheck(torch.ops.mixres.extract_patches.default, (images, boxes, 16, mode))
    grad = torch.rand(2, 30, 3, 16, 16, requires_grad=True)
    torch.library.opcheck(torch.ops.mixres.extract_patches_backward.default, (grad, boxes, 128, 192, mode))
    torch.library.opcheck(torch.ops.mixres.leaf_centers.default, (boxes, 16))


def test_leaf_centers():
    _, boxes, _ = sample()
    torch.library.opcheck(torch.ops.mixres.leaf_centers.default, (boxes, 16))


def test_empty_inputs_need_no_special_case_in_the_ops():
    packed, boxes, images = sample()
    assert torch.ops.mixres.build_quadtree(packed[:0], 128, 192, 16, 64, 30).shape == (0, 30, 3)
    boxes_and_lengths = torch.ops.mixres.build_quadtree_adaptive(packed[:0], 128, 192, 16, 64, 30,
                                                                 torch.zeros(0, dtype=torch.int32), None)
    assert [t.shape for t in boxes_and_lengths] == [(0, 30, 3), (0,)]
    assert torch.ops.mixres.extract_patches(images[:, :0], boxes, 16, "area").shape == (2, 30, 0, 16, 16)
    assert torch.ops.mixres.leaf_centers(boxes[:, :0], 16).shape == (2, 0, 2)
