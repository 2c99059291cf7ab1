"""Pictures of mosaics: leaf borders drawn on a photo, and tokens painted back over their leaves."""
from __future__ import annotations

from collections.abc import Mapping
from os import PathLike

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from .mosaic import Mosaic

__all__ = ["draw_mosaic", "render_tokens", "save_mosaic_figure", "save_mosaic_grid"]


def _to_pil(image: Tensor) -> Image.Image:
    """``[C, H, W]`` float in [0, 1], C in {1, 3} -> an RGB PIL image (grey is replicated so borders keep colour)."""
    if image.dim() != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"image must be [C, H, W] with C = 1 or 3, got {list(image.shape)}")
    pixels = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).expand(3, -1, -1)
    return Image.fromarray(pixels.permute(1, 2, 0).contiguous().cpu().numpy())


def draw_mosaic(image: Tensor, boxes: Tensor, color: tuple[int, int, int] = (255, 64, 64),
                width: int = 1) -> Image.Image:
    """Draws the border of each leaf on the photo.

    Args:
        image: ``[C, H, W]`` float in [0, 1], C = 1 or 3.
        boxes: ``[N, 3]`` int (y, x, size) in pixels, e.g. ``mosaic.boxes[b]``.
        color: RGB of the borders.
        width: border width in pixels, drawn inside each leaf.

    Returns:
        An RGB ``PIL.Image.Image`` of size W x H.
    """
    if boxes.dim() != 2 or boxes.shape[1] != 3:
        raise ValueError(f"boxes must be [N, 3] (y, x, size), got {list(boxes.shape)}")
    picture = _to_pil(image)
    draw = ImageDraw.Draw(picture)
    for y, x, size in boxes.tolist():
        draw.rectangle((x, y, x + size - 1, y + size - 1), outline=tuple(color), width=width)
    return picture


def render_tokens(mosaic: Mosaic, mode: str = "nearest") -> Tensor:
    """Paints each token back over its leaf: the reverse of tokenize.

    Each token is resized from p x p to its leaf's size and written at the leaf's (y, x); since the leaves
    partition the image, every pixel is written once. One ``F.interpolate`` per distinct leaf size.

    Args:
        mosaic: a :class:`mixres.Mosaic` (tokens ``[B, N, C, p, p]``, boxes ``[B, N, 3]``).
        mode: ``"nearest"`` (shows each token's resolution as blocks) or ``"bilinear"`` (``align_corners=False``).

    Returns:
        ``[B, C, H, W]`` in the tokens' dtype and device.
    """
    if mode not in ("nearest", "bilinear"):
        raise ValueError(f"mode must be 'nearest' or 'bilinear', got {mode!r}")
    tokens = mosaic.tokens.detach()
    batch, _, channels, patch, _ = tokens.shape
    boxes = mosaic.boxes.long()
    canvas = tokens.new_zeros(batch, channels, *mosaic.image_size)
    channel = torch.arange(channels, device=tokens.device)[None, :, None, None]
    for size in boxes[..., 2].unique().tolist():
        b, n = (boxes[..., 2] == size).nonzero(as_tuple=True)
        leaves = tokens[b, n]  # [M, C, p, p]
        if size != patch:
            leaves = F.interpolate(leaves, size=(size, size), mode=mode,
                                   align_corners=False if mode == "bilinear" else None)
        offsets = torch.arange(size, device=tokens.device)
        ys = (boxes[b, n, 0][:, None] + offsets)[:, None, :, None]
        xs = (boxes[b, n, 1][:, None] + offsets)[:, None, None, :]
        canvas[b[:, None, None, None], channel, ys, xs] = leaves
    return canvas


def save_mosaic_figure(image: Tensor, mosaic: Mosaic, path: str | PathLike, index: int = 0,
                       color: tuple[int, int, int] = (255, 64, 64), width: int = 1, mode: str = "nearest",
                       gap: int = 8) -> Image.Image:
    """Writes one PNG: the photo with its leaf borders, then (to the right) the mosaic rendered from its tokens.

    Args:
        image: ``[C, H, W]`` float in [0, 1], C = 1 or 3: the photo that ``mosaic[index]`` was made from.
        mosaic: tokens with C = 1 or 3 channels, in [0, 1].
        path: where to write the figure.
        index: which image of the mosaic's batch to show.
        color, width: the borders, as in :func:`draw_mosaic`.
        mode: how tokens are resized back, as in :func:`render_tokens`.
        gap: white pixels between the two panels.

    Returns:
        The figure, ``(2 W + gap) x H``.
    """
    one = Mosaic(tokens=mosaic.tokens[index:index + 1], boxes=mosaic.boxes[index:index + 1],
                 centers=mosaic.centers[index:index + 1], min_patch_size=mosaic.min_patch_size,
                 image_size=mosaic.image_size)
    left = draw_mosaic(image, mosaic.boxes[index], color, width)
    right = _to_pil(render_tokens(one, mode)[0])
    figure = Image.new("RGB", (2 * left.width + gap, left.height), "white")
    figure.paste(left, (0, 0))
    figure.paste(right, (left.width + gap, 0))
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
