"""PixelBlur, the pixel-blur scorer, and its fused op torch.ops.mixres.pixel_blur_scores: pyramid layout, both
against the independent per-patch oracle (oracles.pixel_blur_pyramid) and the op against the reference; argument
checks and opcheck."""
import pytest
import torch

import mixres
from mixres import reference
from mixres.pyramid import QuadtreeGeometry
from mixres.scorers import PixelBlur

import oracles
from helpers import run_script

# (height, width, min_patch_size, max_patch_size): non-square, scale factors 2 to 32, min_patch_sizes that are not
# powers of two or are tiny (1 to 3: the up-sampling's edge cases), and a single size (no score at all).
BLUR_GEOMETRIES = [(128, 192, 16, 64), (96, 160, 8, 32), (224, 112, 14, 56), (64, 128, 4, 64), (48, 96, 3, 24),
                   (32, 64, 2, 16), (64, 96, 1, 32), (64, 128, 32, 32)]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


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


def flat_above_noisy(channels=3):
    """Flat areas next to noisy ones, so that scores differ across patches and would show any bleeding."""
    torch.manual_seed(0)
    images = torch.rand(2, channels, 64, 128)
    images[:, :, :32] = images[:, :, :32].mean(dim=(2, 3), keepdim=True)
    return images


@pytest.mark.parametrize("channels", [1, 3, 4])
def test_matches_per_patch_oracle(channels):
    images = flat_above_noisy(channels)
    got = PixelBlur(8, 32)(images)
    want = oracles.pixel_blur_pyramid(images, 8, 32)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(PixelBlur(8, 32)(images.double()), want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_images_are_scored_in_float32(dtype):
    """The half values, widened exactly, accumulate in float32 and come out float32: the float64 oracle on the
    same half values is met to float32 accuracy (measured: 1.7e-7 relative). Arithmetic in the images' dtype
    would be 2.3e-4 (float16) and 2.7e-3 (bfloat16) away, and scores rounded to float16 up to 4.9e-4."""
    images = flat_above_noisy().to(dtype)
    got = PixelBlur(8, 32)(images)
    want = oracles.pixel_blur_pyramid(images, 8, 32)  # .double() of half values is exact
    assert [m.dtype for m in got] == [torch.float32, torch.float32]
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=1e-7)


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


# ----------------------------------------------------------------------------------- torch.ops.mixres.pixel_blur_scores


def blur_geometry_id(g):
    return "{}x{}_{}-{}".format(*g)


@pytest.mark.parametrize("geometry", BLUR_GEOMETRIES, ids=blur_geometry_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_op_matches_the_oracle_and_the_reference(geometry, dtype):
    height, width, lo, hi = geometry
    generator = torch.Generator().manual_seed(height + lo)
    images = torch.rand(3, 2, height, width, generator=generator, dtype=torch.float64).to(dtype)
    images[0, :, : height // 2] = 0.25  # flat areas score 0
    packed = torch.ops.mixres.pixel_blur_scores(images, lo, hi)
    reference_scores = reference.pixel_blur_scores(images, lo, hi)
    n_scores = QuadtreeGeometry(height, width, lo, hi).n_scores
    assert packed.shape == reference_scores.shape == (3, n_scores)
    assert packed.dtype == reference_scores.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    # Half-precision images are widened to float32 by both: the same tolerance as float32. The oracle works in
    # float64 on the same (rounded) pixels.
    tol = (1e-12, 1e-14) if dtype == torch.float64 else (1e-5, 1e-6)
    expected = oracles.pack(oracles.pixel_blur_pyramid(images, lo, hi), 3).double()  # float32 when empty
    for scores in (packed, reference_scores):
        torch.testing.assert_close(scores.double(), expected, rtol=tol[0], atol=tol[1])
    torch.testing.assert_close(packed, reference_scores, rtol=tol[0], atol=tol[1])


def test_op_packs_its_maps_and_scorer_returns_views():
    images = torch.rand(2, 3, 128, 192)
    packed = torch.ops.mixres.pixel_blur_scores(images, 8, 64)
    pyramid = PixelBlur(8, 64)(images)
    assert torch.equal(oracles.pack(pyramid, 2), packed)
    # The maps are views of one packed tensor, in the packed layout.
    assert all(m.untyped_storage().data_ptr() == pyramid[0].untyped_storage().data_ptr() for m in pyramid)
    assert [tuple(m.shape) for m in pyramid] == [(2, 2, 3), (2, 4, 6), (2, 8, 12)]
    # packed() is the op's output as it is, with its geometry.
    packed_pyramid = PixelBlur(8, 64).packed(images)
    assert torch.equal(packed_pyramid.scores, packed)
    assert packed_pyramid.geometry == QuadtreeGeometry(128, 192, 8, 64)


def test_op_channels_last_and_noncontiguous_images():
    images = torch.rand(2, 3, 128, 256)
    expected = torch.ops.mixres.pixel_blur_scores(images, 16, 64)
    assert torch.equal(torch.ops.mixres.pixel_blur_scores(images.to(memory_format=torch.channels_last), 16, 64),
                       expected)
    wide = torch.rand(2, 3, 128, 320)
    wide[..., :256] = images
    torch.testing.assert_close(torch.ops.mixres.pixel_blur_scores(wide[..., :256], 16, 64), expected)


def test_op_empty_batch_and_equal_sizes():
    geometry = QuadtreeGeometry(64, 128, 16, 64)
    for dtype, out in ((torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.float64,) * 2):
        empty = torch.ops.mixres.pixel_blur_scores(torch.rand(0, 3, 64, 128).to(dtype), 16, 64)
        assert empty.shape == (0, geometry.n_scores) and empty.dtype == out
        assert reference.pixel_blur_scores(torch.rand(0, 3, 64, 128).to(dtype), 16, 64).shape == empty.shape
    assert torch.ops.mixres.pixel_blur_scores(torch.rand(2, 3, 64, 128), 32, 32).shape == (2, 0)


def test_op_rejects_bad_inputs():
    op = torch.ops.mixres.pixel_blur_scores
    images = torch.rand(2, 3, 64, 128)
    with pytest.raises(ValueError, match=r"images must be \[B, C, H, W\]"):
        op(images[0], 16, 64)
    with pytest.raises(TypeError, match="images must be float16, bfloat16, float32 or float64"):
        op(images.to(torch.int32), 16, 64)
    with pytest.raises(TypeError, match="images must be float16, bfloat16, float32 or float64"):
        op(images.to(torch.uint8), 16, 64)
    with pytest.raises(ValueError, match="images must have at least one channel"):
        op(images[:, :0], 16, 64)
    with pytest.raises(ValueError, match="images height and width must be positive multiples of max_patch_size 64, "
                                         "got 64x96"):
        op(images[..., :96], 16, 64)
    with pytest.raises(ValueError, match="images height and width must be positive multiples"):
        op(images[..., :0], 16, 64)
    with pytest.raises(ValueError, match="max_patch_size / min_patch_size must be a power of two"):
        op(images, 16, 48)
    with pytest.raises(ValueError, match="0 < min_patch_size <= max_patch_size"):
        op(images, 0, 64)
    with pytest.raises(ValueError, match="0 < min_patch_size <= max_patch_size"):
        op(images, 64, 32)
    with pytest.raises(ValueError, match="0 < min_patch_size <= max_patch_size"):
        op(images, 16, -64)
    with pytest.raises(ValueError, match="max_patch_size must be at most 32768"):
        op(images, 16, 1 << 16)


def blur_inputs():
    """Images for the bit-for-bit checks: every dtype; wide images (the CPU kernel cuts bands into strips, more of
    them for more threads), non-square, small and odd min_patch_sizes, a flat half (scores of 0)."""
    generator = torch.Generator().manual_seed(7)
    cases = []
    for height, width, lo, hi in [(64, 1024, 16, 64), (128, 896, 16, 32), (96, 160, 8, 32), (48, 576, 3, 24),
                                  (64, 96, 1, 32), (32, 256, 2, 16)]:
        for dtype in DTYPES:
            images = torch.rand(2, 3, height, width, generator=generator, dtype=torch.float64).to(dtype)
            images[0, :, :, : width // 2] = 0.25
            cases.append((images, lo, hi))
    return cases


def test_op_gives_the_same_bits_for_any_thread_count():
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        expected = [torch.ops.mixres.pixel_blur_scores(*case) for case in blur_inputs()]
        for n in (2, 3, 8):
            torch.set_num_threads(n)
            for case, scores in zip(blur_inputs(), expected, strict=True):
                assert torch.equal(torch.ops.mixres.pixel_blur_scores(*case), scores), (n, case[0].shape, case[1:])
    finally:
        torch.set_num_threads(threads)


def test_op_gives_the_same_bits_without_avx2(tmp_path, monkeypatch):
    """On x86-64 CPUs with AVX2 the CPU kernel runs a copy of its loops compiled for AVX2; ATEN_CPU_CAPABILITY=default
    keeps it on the baseline copy. Both must give the same bits (on a CPU without AVX2, both runs take the
    baseline)."""
    cases = blur_inputs()
    expected = [torch.ops.mixres.pixel_blur_scores(*case) for case in cases]  # before the variable is set
    torch.save({"cases": cases, "expected": expected}, tmp_path / "blur.pt")
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "default")
    run_script(f"""
import torch, mixres
assert torch.backends.cpu.get_cpu_capability() == "DEFAULT", torch.backends.cpu.get_cpu_capability()
saved = torch.load({str(tmp_path / "blur.pt")!r})
for case, expected in zip(saved["cases"], saved["expected"], strict=True):
    assert torch.equal(torch.ops.mixres.pixel_blur_scores(*case), expected), (case[0].shape, case[0].dtype, case[1:])
""")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_opcheck_pixel_blur_scores(dtype):
    images = torch.rand(2, 3, 64, 128).to(dtype)
    torch.library.opcheck(torch.ops.mixres.pixel_blur_scores.default, (images, 16, 64))
    torch.library.opcheck(torch.ops.mixres.pixel_blur_scores.default, (images, 8, 32))
    torch.library.opcheck(torch.ops.mixres.pixel_blur_scores.default, (images, 32, 32))


def test_reference_fallback(monkeypatch):
    images = torch.rand(2, 3, 64, 128)
    expected = torch.ops.mixres.pixel_blur_scores(images, 16, 64)
    monkeypatch.setattr(mixres.ops, "_KERNEL_DEVICES", frozenset())
    monkeypatch.setattr(mixres.ops, "_warned", {"cpu"})  # the warning is tested with tokenize
    torch.testing.assert_close(mixres.ops.pixel_blur_scores(images, 16, 64), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.cat([m.flatten(1) for m in PixelBlur(16, 64)(images)], 1), expected,
                               rtol=1e-5, atol=1e-6)
