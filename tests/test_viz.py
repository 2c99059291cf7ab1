"""Mosaic pictures: render_tokens against a per-leaf loop, draw_mosaic and save_mosaic_figure (against the two
panels drawn whole); a padded mosaic's pictures and JSON record are its images' leaves alone."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import mixres
from mixres import viz
from mixres.apps.mosaic_files import save_mosaic
from mixres.viz import draw_mosaic, render_tokens, save_mosaic_figure, save_mosaic_grid

from helpers import random_mosaic, random_pyramid


def per_leaf_render(mosaic, mode):
    batch, _, channels, _, _ = mosaic.tokens.shape
    canvas = torch.full((batch, channels, *mosaic.image_size), float("nan"))
    for b in range(batch):
        for n, (y, x, size) in enumerate(mosaic.boxes[b].tolist()):
            canvas[b, :, y:y + size, x:x + size] = F.interpolate(
                mosaic.tokens[b, n][None], size=(size, size), mode=mode,
                align_corners=False if mode == "bilinear" else None)[0]
    return canvas


@pytest.mark.parametrize("mode", ["area", "bilinear"])
def test_finest_mosaic_reproduces_the_image(mode):
    images = torch.rand(2, 3, 128, 64)
    finest = mixres.valid_n_patches(128, 64)[-1]
    mosaic = mixres.tokenize(images, torch.rand(2, 8, 4), n_patches=finest, mode=mode)
    for render_mode in ("nearest", "bilinear"):
        assert torch.equal(render_tokens(mosaic, render_mode), images)


@pytest.mark.parametrize("render_mode", ["nearest", "bilinear"])
@pytest.mark.parametrize("patch_size", [16, 8, 24])
def test_render_matches_per_leaf_loop(render_mode, patch_size):
    _, mosaic = random_mosaic(patch_size=patch_size)
    assert len(mosaic.boxes[..., 2].unique()) == 3  # every leaf size is exercised
    rendered = render_tokens(mosaic, render_mode)
    assert rendered.shape == (3, 3, 128, 192) and rendered.dtype == mosaic.tokens.dtype
    torch.testing.assert_close(rendered, per_leaf_render(mosaic, render_mode), rtol=0, atol=1e-6)


def test_render_rejects_unknown_mode():
    _, mosaic = random_mosaic()
    with pytest.raises(ValueError, match="mode"):
        render_tokens(mosaic, "bicubic")


@pytest.mark.parametrize("channels", [1, 3])
def test_draw_mosaic_size_and_borders(channels):
    images, mosaic = random_mosaic(channels=channels)
    picture = draw_mosaic(images[0], mosaic.boxes[0], color=(0, 255, 0))
    assert isinstance(picture, Image.Image) and picture.size == (192, 128) and picture.mode == "RGB"
    y, x, size = mosaic.boxes[0, 0].tolist()
    assert picture.getpixel((x, y)) == (0, 255, 0)
    assert picture.getpixel((x + size // 2, y + size // 2)) != (0, 255, 0)
    with pytest.raises(ValueError, match="C = 1 or 3"):
        draw_mosaic(torch.rand(2, 64, 64), mosaic.boxes[0])


def test_save_mosaic_figure(tmp_path):
    images, mosaic = random_mosaic()
    path = tmp_path / "figure.png"
    figure = save_mosaic_figure(images[1], mosaic, path, index=1, gap=4)
    assert figure.size == (2 * 192 + 4, 128)
    with Image.open(path) as saved:
        assert saved.size == figure.size


def test_save_mosaic_grid_lays_panels_in_rows(tmp_path):
    images, mosaic = random_mosaic(batch=3)  # 128 x 192 images
    panels = {f"mosaic {b}": mosaic.boxes[b] for b in range(3)}
    figure = save_mosaic_grid(images[0], panels, tmp_path / "grid.png", columns=2, gap=4, font_size=10,
                              color=(0, 255, 0))
    caption = 10 + 4
    assert figure.size == (2 * 192 + 4, 2 * (caption + 128) + 4)
    # The third panel opens the second row; its first leaf's corner carries its border colour.
    y, x, _ = mosaic.boxes[2, 0].tolist()
    assert figure.getpixel((x, caption + 128 + 4 + caption + y)) == (0, 255, 0)
    assert figure.getpixel((192 + 4 + 100, caption + 128 + 4 + caption + 60)) == (255, 255, 255)  # no 4th panel
    with Image.open(tmp_path / "grid.png") as saved:
        assert saved.size == figure.size
    with pytest.raises(ValueError, match="panels"):
        save_mosaic_grid(images[0], {}, tmp_path / "empty.png")
    with pytest.raises(ValueError, match="columns"):
        save_mosaic_grid(images[0], panels, tmp_path / "bad.png", columns=0)


@pytest.mark.parametrize("chunk", [1 << 22, 3000])  # one band and chunk, or many (each leaf row, a few leaves)
@pytest.mark.parametrize("channels, mode", [(3, "nearest"), (1, "bilinear")])
def test_figure_is_the_drawn_photo_and_the_rendered_tokens(chunk, channels, mode, tmp_path, monkeypatch):
    """The figure is painted in bands and chunks: it must be the two panels drawn whole."""
    monkeypatch.setattr(viz, "_CHUNK_ELEMENTS", chunk)
    images, mosaic = random_mosaic(channels=channels)
    figure = np.asarray(save_mosaic_figure(images[2], mosaic, tmp_path / "figure.png", index=2, mode=mode, gap=5))
    left = np.asarray(draw_mosaic(images[2], mosaic.boxes[2]))
    rendered = (render_tokens(mosaic, mode)[2].clamp(0, 1) * 255).round().to(torch.uint8).expand(3, -1, -1)
    assert np.array_equal(figure[:, :192], left)
    assert (figure[:, 192:197] == 255).all()
    assert np.array_equal(figure[:, 197:], rendered.permute(1, 2, 0).numpy())
    with Image.open(tmp_path / "figure.png") as saved:
        assert np.array_equal(np.asarray(saved), figure)


def test_render_refuses_leaves_off_their_grid():
    _, mosaic = random_mosaic()
    boxes = mosaic.boxes.clone()
    boxes[0, 0, 1] += 8  # a 16-64 px leaf moved by 8 px: no longer on a multiple of its size
    with pytest.raises(ValueError, match="start on multiples of their size"):
        render_tokens(mixres.Mosaic(mosaic.tokens, boxes, mosaic.centers, mosaic.min_patch_size, mosaic.image_size))


def padded_mosaic_and_each_image_alone():
    """A padded mosaic (a threshold stops the images at different lengths) and each image's own mosaic at its
    length."""
    images, padded = random_mosaic(threshold=0.5)
    lengths = padded.lengths.tolist()
    assert len(set(lengths)) > 1 and max(lengths) < padded.n_patches
    geometry = mixres.QuadtreeGeometry(128, 192, 16, 64)
    pyramid = random_pyramid(geometry, 3, 0)  # random_mosaic's
    alone = [mixres.tokenize(images[b:b + 1], [m[b:b + 1] for m in pyramid], n) for b, n in enumerate(lengths)]
    return images, padded, alone


def test_a_padded_mosaic_shows_each_image_as_its_leaves_alone(tmp_path):
    images, padded, alone = padded_mosaic_and_each_image_alone()
    rendered = render_tokens(padded)
    for b, own in enumerate(alone):
        assert torch.equal(rendered[b:b + 1], render_tokens(own))
        drawn = np.asarray(draw_mosaic(images[b], padded.boxes[b]))
        assert np.array_equal(drawn, np.asarray(draw_mosaic(images[b], own.boxes[0])))
        figure = np.asarray(save_mosaic_figure(images[b], padded, tmp_path / "padded.png", index=b))
        assert np.array_equal(figure, np.asarray(save_mosaic_figure(images[b], own, tmp_path / "alone.png")))


def test_the_json_of_a_padded_mosaic_lists_its_leaves_only(tmp_path):
    images, padded, alone = padded_mosaic_and_each_image_alone()
    for b, own in enumerate(alone):
        record = save_mosaic(images[b], padded, tmp_path, f"padded{b}", 64, index=b)
        expected = save_mosaic(images[b], own, tmp_path, f"alone{b}", 64)
        assert record.pop("max_patches") == padded.n_patches and "max_patches" not in expected
        assert record == expected and record["n_patches"] == padded.lengths[b]
        assert json.loads((tmp_path / f"padded{b}.json").read_text())["leaves"] == own.boxes[0].tolist()
