"""Gradients of every op beyond the first: exact where the op is differentiable, a clear error where it is not,
never zeros or a silently dropped gradient."""
import pytest
import torch

import mixres
from mixres import reference

import oracles
from helpers import random_pyramid

MODES = ["area", "bilinear"]


def tiny_mosaic(batch=1, seed=0):
    """float64 images [B, 2, 16, 16] and the boxes of a 7-leaf mosaic of 4 and 8 px leaves: gradgradcheck builds
    dense Jacobians, so everything is small."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, 2, 16, 16, dtype=torch.float64, generator=generator)
    pyramid = [torch.tensor([[[0.0, 1.0], [0.5, 0.2]]]).expand(batch, 2, 2)]
    boxes = mixres.tokenize(images, pyramid, n_patches=7, min_patch_size=4, max_patch_size=8).boxes
    return images, boxes


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("patch_size", [4, 3, 10])  # exact, non-divisible down-sampling, up-sampling
def test_extract_patches_gradgradcheck(mode, patch_size):
    images, boxes = tiny_mosaic()
    images.requires_grad_()
    assert torch.autograd.gradgradcheck(lambda x: torch.ops.mixres.extract_patches(x, boxes, patch_size, mode),
                                        (images,), eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("mode", MODES)
def test_extract_patches_backward_is_differentiable_in_its_token_gradient(mode):
    _, boxes = tiny_mosaic()
    grad_tokens = torch.rand(1, 7, 2, 3, 3, dtype=torch.float64, requires_grad=True)

    def backward(g):
        return torch.ops.mixres.extract_patches_backward(g, boxes, 16, 16, mode)

    assert torch.autograd.gradcheck(backward, (grad_tokens,), eps=1e-6, atol=1e-8)
    assert torch.autograd.gradgradcheck(backward, (grad_tokens,), eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("mode", MODES)
def test_extract_patches_backward_is_the_adjoint_of_extract_patches(mode):
    # <A x, g> == <x, A^T g>: the identity the double backward rests on, checked on random vectors.
    images, boxes = tiny_mosaic(batch=2)
    grad_tokens = torch.randn(2, 7, 2, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    tokens = torch.ops.mixres.extract_patches(images, boxes, 3, mode)
    grad_images = torch.ops.mixres.extract_patches_backward(grad_tokens, boxes, 16, 16, mode)
    torch.testing.assert_close((tokens * grad_tokens).sum(), (images * grad_images).sum(), rtol=1e-12, atol=0)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("patch_size", [16, 12])
def test_gradient_penalty_through_tokenize_matches_the_oracle(mode, patch_size):
    """A gradient penalty (the double backward of a WGAN-GP or an input-gradient regulariser): the C++ path and
    the reference must give what the oracle gives through F.interpolate's own autograd, leaf by leaf."""
    geometry = mixres.QuadtreeGeometry(64, 96, 16, 32)
    generator = torch.Generator().manual_seed(5)
    images = torch.rand(2, 3, 64, 96, dtype=torch.float64, generator=generator)
    pyramid = random_pyramid(geometry, batch=2, seed=5, dtype=torch.float64)
    dim = 15 * 3 * patch_size * patch_size
    weights = torch.randn(2, dim, dtype=torch.float64, generator=generator) / dim**0.5  # tanh far from saturation

    def penalty(tokenize):
        x = images.clone().requires_grad_()
        tokens = tokenize(x, pyramid, 15, min_patch_size=16, max_patch_size=32, patch_size=patch_size,
                          mode=mode).tokens
        output = (tokens.flatten(1) @ weights.T).tanh().sum()  # non-linear in the tokens: a non-zero Hessian
        (grad,) = torch.autograd.grad(output, x, create_graph=True)
        (penalty,) = torch.autograd.grad(grad.square().sum(), x)
        return penalty

    expected = penalty(oracles.tokenize)
    assert expected.abs().sum() > 0
    for tokenize in (mixres.tokenize, reference.tokenize):
        torch.testing.assert_close(penalty(tokenize), expected, rtol=1e-10, atol=1e-12)


def test_grid_ops_gradgradcheck():
    images, boxes = tiny_mosaic(batch=2)
    features = torch.randn(2, 7, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda f: mixres.tokens_to_grid(f, boxes, 4, (16, 16)), (features,))
    grid = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    for reduce in ("mean", "sum"):
        assert torch.autograd.gradgradcheck(lambda g: mixres.grid_to_tokens(g, boxes, 4, reduce), (grid,))


@pytest.mark.parametrize("pixel_blur_scores", [torch.ops.mixres.pixel_blur_scores, reference.pixel_blur_scores],
                         ids=["cpp", "reference"])
def test_pixel_blur_scores_refuses_a_backward_instead_of_dropping_it(pixel_blur_scores):
    images = torch.rand(2, 3, 64, 64, requires_grad=True)
    scores = pixel_blur_scores(images, 16, 64)
    # The forward works (scores that only feed the quadtree need no gradient) ...
    assert scores.requires_grad and scores.shape == (2, 5)
    torch.testing.assert_close(scores.detach(), pixel_blur_scores(images.detach(), 16, 64))
    # ... but a gradient through them is refused, alone or added to a differentiable term.
    with pytest.raises(NotImplementedError, match="pixel_blur_scores is not differentiable.*images.detach"):
        scores.sum().backward()
    with pytest.raises(NotImplementedError, match="pixel_blur_scores is not differentiable"):
        (images.sum() + pixel_blur_scores(images, 16, 64).sum()).backward()
    assert not pixel_blur_scores(images.detach(), 16, 64).requires_grad


def test_pixel_blur_scores_opcheck_with_images_that_require_grad():
    images = torch.rand(2, 3, 64, 128, requires_grad=True)
    # The aot_dispatch test runs a backward, which is refused by design.
    torch.library.opcheck(torch.ops.mixres.pixel_blur_scores.default, (images, 16, 64),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_integer_outputs_carry_no_gradient_and_tokens_still_do():
    """Scores that require grad reach the boxes only through discrete choices: the boxes and centres are
    integers or come from them, so they carry no gradient, while the tokens' gradient reaches the images."""
    images, _ = tiny_mosaic()
    geometry = mixres.QuadtreeGeometry(16, 16, 4, 8)
    for backend in (mixres.ops, reference):
        scores = oracles.pack(random_pyramid(geometry, 1), 1).requires_grad_()
        boxes = backend.build_quadtree(scores, 16, 16, 4, 8, 7)
        centers = backend.leaf_centers(boxes, 4)
        assert boxes.dtype == torch.int32 and not boxes.requires_grad and not centers.requires_grad
        x = images.clone().requires_grad_()
        backend.extract_patches(x, boxes, 4, "area").sum().backward()
        assert x.grad.abs().sum() > 0
