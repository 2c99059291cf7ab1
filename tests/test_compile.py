"""torch.compile(fullgraph=True) of tokenize on the CPU: the ops trace through their fake kernels."""
import torch

import mixres

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


def test_tokenize_compiles_with_inductor_and_a_dense_saliency_map():
    images, saliency = torch.rand(2, 3, 128, 128), torch.rand(2, 128, 128)
    torch._dynamo.reset()
    compiled = torch.compile(lambda x, s: mixres.tokenize(x, s, n_patches=31).tokens, fullgraph=True)
    torch.testing.assert_close(compiled(images, saliency), mixres.tokenize(images, saliency, n_patches=31).tokens)
