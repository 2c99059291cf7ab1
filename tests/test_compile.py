"""torch.compile(fullgraph=True) on the CPU: tokenize (the ops trace through their fake kernels), with fixed and
adaptive budgets, and the whole Quadformer, through inductor too."""
import copy

import torch
from timm.models.vision_transformer import VisionTransformer

import mixres
from mixres.models import Quadformer
from mixres.scorers import PixelBlur

from helpers import random_pyramid


def test_tokenize_compiles_with_fullgraph_and_matches_eager():
    geometry = mixres.QuadtreeGeometry(128, 192, 16, 64)
    images = torch.rand(2, 3, 128, 192, requires_grad=True)
    pyramid = random_pyramid(geometry, 2)
    torch._dynamo.reset()

    def run(images, coarse, fine):
        mosaic = mixres.tokenize(images, [coarse, fine], n_patches=30, mode="bilinear")
        return mosaic.tokens, mosaic.boxes, mosaic.centers

    compiled = torch.compile(run, fullgraph=True, backend="aot_eager")
    eager = run(images, *pyramid)
    traced = compiled(images, *pyramid)
    for a, b in zip(eager, traced):
        torch.testing.assert_close(a, b)
    traced[0].sum().backward()  # the registered backward runs inside the compiled graph's autograd
    expected = torch.autograd.grad(eager[0].sum(), images)[0]
    torch.testing.assert_close(images.grad, expected)


def test_adaptive_tokenize_compiles_with_fullgraph_and_matches_eager():
    """Per-image budgets and thresholds as graph inputs, or a dict threshold of Python numbers: the padded mosaic,
    its lengths and valid mask, and the gradient (which padding takes no part in)."""
    geometry = mixres.QuadtreeGeometry(128, 192, 16, 64)
    images = torch.rand(3, 3, 128, 192, requires_grad=True)
    pyramid = random_pyramid(geometry, 3)
    budgets, thresholds = torch.tensor([6, 60, 33], dtype=torch.int32), torch.tensor([0.5, 0.1])
    torch._dynamo.reset()

    def with_tensors(images, coarse, fine, budgets, thresholds):
        mosaic = mixres.tokenize(images, [coarse, fine], n_patches=budgets, max_patches=60, threshold=thresholds,
                                 mode="bilinear")
        return mosaic.tokens, mosaic.boxes, mosaic.centers, mosaic.lengths, mosaic.valid

    def with_numbers(images, coarse, fine):
        mosaic = mixres.tokenize(images, [coarse, fine], n_patches=60, threshold={64: 0.5, 32: 0.1})
        return mosaic.tokens, mosaic.boxes, mosaic.centers, mosaic.lengths, mosaic.valid

    for run, inputs in ((with_tensors, (images, *pyramid, budgets, thresholds)), (with_numbers, (images, *pyramid))):
        eager = run(*inputs)
        traced = torch.compile(run, fullgraph=True, backend="aot_eager")(*inputs)
        assert eager[3].tolist() != [60, 60, 60] and len(set(eager[3].tolist())) > 1  # padding in some images
        for a, b in zip(eager, traced, strict=True):
            assert torch.equal(a, b)
        weights = torch.rand(eager[0].shape)
        (expected,) = torch.autograd.grad((eager[0] * weights).sum(), images)
        (got,) = torch.autograd.grad((traced[0] * weights).sum(), images)
        torch.testing.assert_close(got, expected)


def test_tokenize_compiles_with_inductor_and_a_dense_saliency_map():
    images, saliency = torch.rand(2, 3, 128, 128), torch.rand(2, 128, 128)
    torch._dynamo.reset()
    compiled = torch.compile(lambda x, s: mixres.tokenize(x, s, n_patches=31).tokens, fullgraph=True)
    torch.testing.assert_close(compiled(images, saliency), mixres.tokenize(images, saliency, n_patches=31).tokens)


def test_the_quadformer_compiles_with_inductor_and_fullgraph_and_is_as_accurate_as_eager():
    """The whole model (scorer, quadtree, resize, ViT) through inductor's generated code, against float64."""
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=128, patch_size=16, embed_dim=32, depth=2, num_heads=2, num_classes=5)
    with torch.no_grad():  # timm zero-initialises these: random values make the position lookup count
        vit.pos_embed.normal_(std=0.5)
        vit.cls_token.normal_(std=0.5)
    model = Quadformer(vit, n_patches=31, scorer=PixelBlur(16, 64)).eval()
    images = torch.randn(4, 3, 128, 128)
    exact = copy.deepcopy(model).double()
    # The float64 model must pick the float32 model's leaves, or the logits could not be compared.
    assert torch.equal(exact.tokenize(images.double()).boxes, model.tokenize(images).boxes)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        truth = exact(images.double())
        logits = {"eager": model(images), "inductor": compiled(images)}
    torch._dynamo.reset()
    # Each logit comes out of a few dozen float32 sums of 32 to 768 terms (dot products, layer norms, the softmax
    # over 32 tokens), rounded to 2^-24 relative: eager lands within about 3 units of 2^-24 of the largest logit.
    # 64 units hold any order of those sums (inductor's fused loops, another vector width, one thread), and are a
    # hundredth of what swapping two of the 31 leaves' tokens changes (5e-4 of the largest logit).
    tolerance = 64 * 2**-24 * truth.abs().max().item()
    for name, value in logits.items():
        torch.testing.assert_close(value.double(), truth, rtol=0, atol=tolerance, msg=lambda text: f"{name}: {text}")
