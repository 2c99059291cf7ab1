"""Reading image files faithfully: every Pillow mode as RGB float32 in [0, 1], each value read exactly or the file
refused, never clipped or rescaled silently (``convert("RGB")`` clips 16-bit grey to white and truncates floats)."""
from __future__ import annotations

import os
import warnings

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor

__all__ = ["load_image", "EIGHT_BIT_MODES", "READABLE_MODES"]

# How each Pillow mode becomes RGB in [0, 1]. An alpha channel is dropped: the colours as stored, not composited onto
# any background (a transparent pixel shows the colour it holds).
GREY_MODES = ("1", "L", "LA", "La")  # 8-bit grey (1: black and white): value / 255, replicated to three channels
# 8-bit colour, converted to RGB by Pillow (palettes expanded; CMYK, YCbCr, LAB, HSV without colour management):
# value / 255. Pillow reads 16-bit colour PNG and TIFF files as 8-bit RGB.
COLOUR_MODES = ("P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV")
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")  # 16-bit grey: value / 65535 (12-bit TIFF: / 4095)
BITS_PER_SAMPLE = 258  # the TIFF tag
# I (32-bit integers) is read from PGM and PNG files only, where it holds 16-bit grey (Pillow scales a PGM's maxval to
# 65535; Pillows before 10 open 16-bit PNG files in mode I); F (32-bit float) as it is, when every value lies in [0, 1].
EIGHT_BIT_MODES = (*GREY_MODES, *COLOUR_MODES)
READABLE_MODES = (*EIGHT_BIT_MODES, *SIXTEEN_BIT_MODES, "I", "F")


def load_image(path: str | os.PathLike) -> Tensor:
    """An image file, in any format Pillow reads, as RGB ``[3, H, W]`` float32 in [0, 1], its values read
    faithfully or not at all: turned upright by its EXIF orientation, grey replicated, an alpha channel dropped.

    - 8-bit images (Pillow modes 1, L, LA, P, PA, RGB, RGBA, CMYK, YCbCr, LAB, HSV...): value / 255, after Pillow's
      conversion to RGB (palettes; CMYK, YCbCr, LAB and HSV without colour management). Pillow itself reads 16-bit
      colour PNG and TIFF files as 8-bit RGB.
    - 16-bit grey (modes I;16, I;16B...; mode I from PGM files of maxval above 255, which Pillow scales to 65535,
      and from PNG files): value / 65535; 12-bit TIFF files, whose samples Pillow leaves from 0 to 4095: value / 4095.
    - 32-bit float (mode F): the values as they are, when every one is finite and in [0, 1].
    - Files of several frames (animations, multi-page TIFF): the first frame, with a ``UserWarning``.

    Raises:
        ValueError: a float image with values outside [0, 1] (the message gives their range) or NaN; a 32-bit
            integer image (mode I) other than a PGM's or PNG's, whose white level no file states; any other mode;
            an empty image.
        OSError, SyntaxError, PIL.Image.DecompressionBombError...: what Pillow raises for a file it cannot read.
    """
    with Image.open(path) as file:
        mode = file.mode
        if mode not in READABLE_MODES:
            raise ValueError(f"{path}: Pillow reads it in mode {mode!r}, which mixres does not read; it reads "
                             f"{', '.join(READABLE_MODES)}")
        if mode == "I" and file.format not in ("PPM", "PNG"):
            raise ValueError(f"{path}: a {file.format} image of 32-bit integers (Pillow mode I), whose white level "
                             f"no file states: save it as 8 or 16 bits, or as floats in [0, 1]")
        scale = 65535 if mode in SIXTEEN_BIT_MODES or mode == "I" else 1 if mode == "F" else 255
        if mode in SIXTEEN_BIT_MODES and file.format == "TIFF":
            # Pillow leaves the samples of a 12-bit TIFF as they are, 0 to 4095: its white is 2**bits - 1.
            bits = file.tag_v2.get(BITS_PER_SAMPLE, 16)
            scale = 2 ** (bits[0] if isinstance(bits, tuple) else bits) - 1
        if getattr(file, "is_animated", False):
            warnings.warn(f"{path}: {file.n_frames} frames (an animation or pages): only the first is read",
                          stacklevel=2)
        ImageOps.exif_transpose(file, in_place=True)
        picture = file.convert("LA") if mode == "La" else file  # Pillow converts premultiplied grey through LA
        if mode in GREY_MODES and picture.mode != "L":
            picture = picture.convert("L")
        elif mode in COLOUR_MODES and mode != "RGB":
            picture = picture.convert("RGB")
        # A copy of the pixels, as uint8, uint16 (either byte order), int32 or float32; Pillow's own copy is freed
        # with the file, before the float image is made.
        pixels = np.asarray(picture)
        del picture
    if pixels.size == 0:
        raise ValueError(f"{path}: an empty image ({pixels.shape[1]}x{pixels.shape[0]} px)")
    if mode == "F":
        lowest, highest = float(pixels.min()), float(pixels.max())
        if np.isnan(lowest) or np.isnan(highest):
            raise ValueError(f"{path}: a float image (Pillow mode F) that holds NaN")
        if lowest < 0 or highest > 1:
            raise ValueError(f"{path}: a float image (Pillow mode F) with values from {lowest:g} to {highest:g}: "
                             f"float images are read as they are, so they must lie in [0, 1]; scale it first")
    image = np.empty((3, *pixels.shape[:2]), dtype=np.float32)
    image[...] = pixels.transpose(2, 0, 1) if pixels.ndim == 3 else pixels  # grey: one plane, three times
    del pixels
    if scale != 1:
        np.divide(image, np.float32(scale), out=image)  # float32 division, correctly rounded
    return torch.from_numpy(image)
