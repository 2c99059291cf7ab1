"""PixelBlur, the pixel-blur scorer: pyramid layout, an independent per-patch oracle, and a real photo."""
import pytest
import torch
import torch.nn.functional as F

import mixres
from mixres.scorers import PixelBlur


def per_patch_pixel_blur(images, min_patch_size, max_patch_size):
    """The oracle: DESIGN.md's formula, one patch crop at a time, in float64."""
    images = images.double()
    batch, _, height, width = images.shape
    pyramid, size = [], max_patch_size
    while size > min_patch_size:
        scores = torch.empty(batch, height // size, width // size, dtype=torch.float64)
        for b in range(batch):
            for row in range(height // size):
                for col in range(width // size):
                    crop = images[b:b + 1, :, row * size:(row + 1) * size, col * size:(col + 1) * size]
                    small = F.interpolate(crop, size=(min_patch_size, min_patch_size), mode="area")
                    blurred = F.interpolate(small, size=(size, size), mode="bilinear", align_corners=False)
                    scores[b, row, col] = ((crop - blurred) ** 2).mean() * size
        pyramid.append(scores)
        size //= 2
    return pyramid


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_pyramid_shapes_dtypes_device(dtype):
    images = torch.rand(2, 3, 128, 192).to(dtype)
    pyramid = PixelBlur(8, 64)(images)
    assert [tuple(m.shape) for m in pyramid] == [(2, 2, 3), (2, 4, 6), (2, 8, 12)]
    expected = torch.float64 if dtype == torch.float64 else torch.float32
    assert all(m.dtype == expected and m.device == images.device for m in pyramid)
    assert all(torch.isfinite(m).all() and (m >= 0).all() for m in pyramid)
    # The pyramid is what tokenize takes.
    assert mixres.tokenize(images, pyramid, n_patches=30, min_patch_size=8).boxes.shape == (2, 30, 3)


def test_equal_sizes_give_an_empty_pyramid():
    assert PixelBlur(32, 32)(torch.rand(1, 3, 64, 64)) == []


@pytest.mark.parametrize("channels", [1, 3, 4])
def test_matches_per_patch_oracle(channels):
    torch.manual_seed(0)
    # Smooth areas next to noisy ones, so that scores differ across patches and would show any bleeding.
    images = torch.rand(2, channels, 64, 128)
    images[:, :, :32] = images[:, :, :32].mean(dim=(2, 3), keepdim=True)
    got = PixelBlur(8, 32)(images)
    want = per_patch_pixel_blur(images, 8, 32)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(PixelBlur(8, 32)(images.double()), want, rtol=1e-12, atol=1e-14)


def test_half_precision_close_to_float32():
    images = torch.rand(1, 3, 64, 64)
    for half, full in zip(PixelBlur(16, 64)(images.half()), PixelBlur(16, 64)(images.half().float())):
        torch.testing.assert_close(half, full)


def test_flat_image_scores_zero_and_is_deterministic():
    assert all((m == 0).all() for m in PixelBlur()(torch.full((1, 3, 128, 128), 0.3)))
    images = torch.rand(3, 3, 128, 128)
    first, second = PixelBlur()(images), PixelBlur()(images.clone())
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_no_grad_and_rejects_bad_input():
    images = torch.rand(1, 3, 64, 64, requires_grad=True)
    assert not any(m.requires_grad for m in PixelBlur()(images))
    with pytest.raises(ValueError, match="multiple of max_patch_size"):
        PixelBlur()(torch.rand(1, 3, 100, 64))
    with pytest.raises(TypeError, match="uint8"):
        PixelBlur()(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))
    with pytest.raises(ValueError, match="rank 4"):
        PixelBlur()(torch.rand(3, 64, 64))
    with pytest.raises(ValueError, match="power of two"):
        PixelBlur(16, 48)


def test_rocket_sky_gets_larger_leaves():
    pytest.importorskip("skimage")
    from mixres.demo import load_photo

    photo = load_photo("rocket")[None]  # [1, 3, 256, 384]; the top half is mostly clear evening sky
    mosaic = mixres.tokenize(photo, PixelBlur(16, 64)(photo), n_patches=129)
    y, size = mosaic.boxes[0, :, 0], mosaic.boxes[0, :, 2].float()
    sky = y < 128  # leaves are aligned to the 64 px grid, so these lie wholly in the top half
    # Measured: 30 sky leaves of mean side 37.3 px (the launch towers at the edges bring it below 64) against
    # 99 leaves of mean side 20.7 px elsewhere (the rocket, towers, lights and horizon).
    assert size[sky].mean() > 1.5 * size[~sky].mean()
    assert sky.sum() < (~sky).sum()
