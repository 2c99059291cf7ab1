"""Pictures of mosaics: leaf borders drawn on a photo, and tokens painted back over their leaves.

Memory stays near the picture's own size, whatever the image's: images are quantised to 8 bits in bands of rows,
and tokens resized back in chunks of leaves, so no float copy of a large image is made on the way.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from os import PathLike

import numpy as np

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from .checks import is_padding_box
from .mosaic import Mosaic

__all__ = ["draw_mosaic", "render_tokens", "save_mosaic_figure", "save_mosaic_grid"]


# Elements of the float temporaries: a band of image rows, a chunk of resized leaves (16 MB in float32).
_CHUNK_ELEMENTS = 1 << 22


def _check_image(image: Tensor) -> None:
    if image.dim() != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"image must be [C, H, W] with C = 1 or 3, got {list(image.shape)}")


def _to_uint8(values: Tensor) -> Tensor:
    """Floats in [0, 1] (clamped) -> uint8, rounded to nearest: ``round(clamp(v, 0, 1) * 255)``."""
    return (values.detach().float().clamp(0, 1) * 255).round_().to(torch.uint8)


def _paint_image(target: Tensor, image: Tensor) -> None:
    """Writes ``image [C, H, W]`` (C = 1 or 3, in [0, 1]) into ``target [H, W, 3]`` uint8, in bands of rows; grey
    is replicated so that borders keep their colour."""
    channels, height, width = image.shape
    rows = max(1, _CHUNK_ELEMENTS // (channels * width))
    for top in range(0, height, rows):
        band = _to_uint8(image[:, top:top + rows]).cpu()
        target[top:top + rows] = band.permute(1, 2, 0).expand(-1, -1, 3)


def _to_pil(image: Tensor) -> Image.Image:
    """``[C, H, W]`` float in [0, 1], C in {1, 3} -> an RGB PIL image (grey is replicated so borders keep colour)."""
    _check_image(image)
    pixels = np.empty((image.shape[1], image.shape[2], 3), dtype=np.uint8)
    _paint_image(torch.from_numpy(pixels), image)
    return Image.fromarray(pixels)


def draw_mosaic(image: Tensor, boxes: Tensor, color: tuple[int, int, int] = (255, 64, 64),
                width: int = 1) -> Image.Image:
    """Draws the border of each leaf on the photo.

    Args:
        image: ``[C, H, W]`` float in [0, 1], C = 1 or 3.
        boxes: ``[N, 3]`` int (y, x, size) in pixels, e.g. ``mosaic.boxes[b]``; the padding boxes (0, 0, 0) of a
            padded mosaic are no leaves, and are not drawn.
        color: RGB of the borders.
        width: border width in pixels, drawn inside each leaf.

    Returns:
        An RGB ``PIL.Image.Image`` of size W x H.
    """
    if boxes.dim() != 2 or boxes.shape[1] != 3:
        raise ValueError(f"boxes must be [N, 3] (y, x, size), got {list(boxes.shape)}")
    picture = _to_pil(image)
    _draw_borders(picture, boxes, color, width)
    return picture


def _draw_borders(picture: Image.Image, boxes: Tensor, color: tuple[int, int, int], width: int) -> None:
    """Draws each leaf's border on ``picture``, whose top-left corner is the image's (not the padding boxes')."""
    draw = ImageDraw.Draw(picture)
    for y, x, size in boxes[~is_padding_box(boxes)].tolist():
        draw.rectangle((x, y, x + size - 1, y + size - 1), outline=tuple(color), width=width)


def render_tokens(mosaic: Mosaic, mode: str = "nearest") -> Tensor:
    """Paints each token back over its leaf: the reverse of tokenize.

    Each token is resized from p x p to its leaf's size and written at the leaf's (y, x); since the leaves
    partition the image, every pixel is written once. One ``F.interpolate`` per distinct leaf size.

    Args:
        mosaic: a :class:`mixres.Mosaic` (tokens ``[B, N, C, p, p]``, boxes ``[B, N, 3]``); a padded one's padding
            paints nothing.
        mode: ``"nearest"`` (shows each token's resolution as blocks) or ``"bilinear"`` (``align_corners=False``).

    Returns:
        ``[B, C, H, W]`` in the tokens' dtype and device.
    """
    tokens = mosaic.tokens.detach()
    batch, _, channels, _, _ = tokens.shape
    canvas = tokens.new_zeros(batch, channels, *mosaic.image_size)
    for b, size, rows, cols, leaves in _resized_leaves(tokens, mosaic.boxes, mosaic.image_size, mode):
        _leaf_grid(canvas.permute(0, 2, 3, 1), size)[b, rows, cols] = leaves.permute(0, 2, 3, 1)
    return canvas


def _resized_leaves(tokens: Tensor, boxes: Tensor, image_size: tuple[int, int],
                    mode: str) -> Iterator[tuple[Tensor, int, Tensor, Tensor, Tensor]]:
    """``tokens [B, N, C, p, p]`` resized back to their leaves ``boxes [B, N, 3]`` in images of ``image_size``, in
    chunks of one leaf size and at most :data:`_CHUNK_ELEMENTS` elements: ``(image indices [M], size, leaf rows
    [M], leaf columns [M] (in units of size), leaves [M, C, size, size])``. Padding boxes (0, 0, 0) are skipped."""
    if mode not in ("nearest", "bilinear"):
        raise ValueError(f"mode must be 'nearest' or 'bilinear', got {mode!r}")
    tokens = tokens.detach()
    channels, patch = tokens.shape[2], tokens.shape[3]
    padding = is_padding_box(boxes)
    boxes = boxes.long()
    corners, sides = boxes[..., :2], boxes[..., 2:]
    off_grid = (sides < 1) | (corners % sides.clamp(min=1) != 0) | (corners + sides > corners.new_tensor(image_size))
    if (off_grid.any(dim=-1) & ~padding).any():
        raise ValueError("the mosaic's leaves must lie in the image and start on multiples of their size, as "
                         "mixres.tokenize's do")
    for size in boxes[..., 2].unique().tolist():
        if size == 0:  # padding
            continue
        b, n = (boxes[..., 2] == size).nonzero(as_tuple=True)
        step = max(1, _CHUNK_ELEMENTS // (channels * size * size))
        for start in range(0, len(b), step):
            image, leaf = b[start:start + step], n[start:start + step]
            leaves = tokens[image, leaf]  # [M, C, p, p]
            if size != patch:
                leaves = F.interpolate(leaves, size=(size, size), mode=mode,
                                       align_corners=False if mode == "bilinear" else None)
            yield image, size, boxes[image, leaf, 0] // size, boxes[image, leaf, 1] // size, leaves


def _leaf_grid(pixels: Tensor, size: int) -> Tensor:
    """``[B, H, W, C]`` (any strides) -> the view ``[B, H/size, W/size, size, size, C]`` of its size x size cells:
    leaves, which start on multiples of their size, are assigned whole, by index, without index tensors per
    pixel."""
    height, width = pixels.shape[1] // size * size, pixels.shape[2] // size * size
    pixels = pixels[:, :height, :width]
    return pixels.unflatten(2, (width // size, size)).unflatten(1, (height // size, size)).transpose(2, 3)


def save_mosaic_figure(image: Tensor, mosaic: Mosaic, path: str | PathLike, index: int = 0,
                       color: tuple[int, int, int] = (255, 64, 64), width: int = 1, mode: str = "nearest",
                       gap: int = 8) -> Image.Image:
    """Writes one PNG: the photo with its leaf borders, then (to the right) the mosaic rendered from its tokens.

    Args:
        image: ``[C, H, W]`` float in [0, 1], C = 1 or 3: the photo that ``mosaic[index]`` was made from.
        mosaic: tokens with C = 1 or 3 channels, in [0, 1]; a padded mosaic shows image ``index``'s leaves only.
        path: where to write the figure.
        index: which image of the mosaic's batch to show.
        color, width: the borders, as in :func:`draw_mosaic`.
        mode: how tokens are resized back, as in :func:`render_tokens`.
        gap: white pixels between the two panels.

    Returns:
        The figure, ``(2 W + gap) x H``.
    """
    _check_image(image)
    if tuple(image.shape[1:]) != tuple(mosaic.image_size):
        raise ValueError(f"image is {image.shape[1]}x{image.shape[2]} but the mosaic {mosaic.image_size[0]}x"
                         f"{mosaic.image_size[1]}: pass the image it was made from")
    if mosaic.tokens.shape[2] not in (1, 3):
        raise ValueError(f"the mosaic's tokens must have 1 or 3 channels, got {mosaic.tokens.shape[2]}")
    boxes = mosaic.image_leaves(index)  # without a padded mosaic's padding
    tokens = mosaic.tokens[index, :len(boxes)].detach()
    height, image_width = image.shape[1:]
    figure = Image.new("RGB", (2 * image_width + gap, height), "white")
    # Both panels are painted in bands of rows, 8-bit, and pasted into the figure: neither a float canvas nor an
    # 8-bit copy of the whole figure is made. A band spans whole rows of the largest leaves, so that each leaf lies
    # in one band.
    largest = int(boxes[:, 2].max())
    band_rows = max(1, _CHUNK_ELEMENTS // (3 * image_width * largest)) * largest
    tops = boxes[:, 0]
    for top in range(0, height, band_rows):
        band = torch.empty(min(band_rows, height - top), image_width, 3, dtype=torch.uint8)
        _paint_image(band, image[:, top:top + band_rows])
        figure.paste(Image.fromarray(band.numpy()), (0, top))
        band.fill_(255)
        in_band = ((tops >= top) & (tops < top + band_rows)).nonzero()[:, 0]
        shifted = boxes[in_band] - boxes.new_tensor([top, 0, 0])
        for _, size, rows, cols, leaves in _resized_leaves(tokens[in_band][None], shifted[None], band.shape[:2],
                                                           mode):
            colours = _to_uint8(leaves).permute(0, 2, 3, 1).expand(-1, -1, -1, 3).cpu()
            _leaf_grid(band[None], size)[0, rows.cpu(), cols.cpu()] = colours
        figure.paste(Image.fromarray(band.numpy()), (image_width + gap, top))
    _draw_borders(figure, boxes, color, width)
    figure.save(path)
    return figure


def save_mosaic_grid(image: Tensor, panels: Mapping[str, Tensor], path: str | PathLike, columns: int = 3,
                     color: tuple[int, int, int] = (255, 64, 64), width: int = 1, gap: int = 8,
                     font_size: int = 16) -> Image.Image:
    """Writes one PNG comparing mosaics of the same photo: one panel per entry, its caption above the photo with
    that mosaic's leaf borders, in rows of ``columns``.

    Args:
        image: ``[C, H, W]`` float in [0, 1], C = 1 or 3.
        panels: caption -> boxes ``[N, 3]`` (y, x, size), e.g. ``{"PixelBlur": mosaic.boxes[0], ...}``.
        path: where to write the figure.
        columns: panels per row.
        color, width: the borders, as in :func:`draw_mosaic`.
        gap: white pixels between panels.
        font_size: caption height in pixels.

    Returns:
        The figure.
    """
    if not panels:
        raise ValueError("panels must hold at least one caption -> boxes entry")
    if columns < 1:
        raise ValueError(f"columns must be at least 1, got {columns}")
    pictures = [(caption, draw_mosaic(image, boxes, color, width)) for caption, boxes in panels.items()]
    panel_width, panel_height = pictures[0][1].size
    caption_height = font_size + gap
    columns = min(columns, len(pictures))
    rows = -(-len(pictures) // columns)
    figure = Image.new("RGB", (columns * panel_width + (columns - 1) * gap,
                               rows * (caption_height + panel_height) + (rows - 1) * gap), "white")
    draw = ImageDraw.Draw(figure)
    font = ImageFont.load_default(size=font_size)
    for index, (caption, picture) in enumerate(pictures):
        left = (index % columns) * (panel_width + gap)
        top = (index // columns) * (caption_height + panel_height + gap)
        draw.text((left, top), caption, fill="black", font=font)
        figure.paste(picture, (left, top + caption_height))
    figure.save(path)
    return figure
