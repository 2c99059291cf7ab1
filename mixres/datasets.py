"""SmallObjects: a tiny digit on a faint texture, a classification task where a mixed-resolution tokenizer matters.

Each image is a random crop of one of scikit-image's texture photos (brick, grass, gravel), its contrast turned
down, with one digit drawn on it in Pillow's built-in font; the label is the digit. The digit is small: 8-11 px
high by default, on 256 x 256 images. At full resolution it is clear. A uniform-grid ViT/16 given as few tokens as
a Quadformer sees the image at a lower resolution: with 64 tokens (32 px patches resized to 16) at half
resolution, where the digit is 4-5.5 px high and its 1 px strokes keep half their contrast; with 16 tokens, at a
quarter. A content-aware scorer finds the digit, because its strokes are the image's strongest fine detail (the
texture is faint), and gives it 16 px leaves, which a Quadformer sees at full resolution.

    >>> train = mixres.datasets.SmallObjects("train", length=10_000)
    >>> image, label = train[0]                       # [3, 256, 256] float32 in [0, 1], int in [0, 10)
    >>> images, labels = train.tensors()              # the whole split: [10000, 3, 256, 256], [10000]
    >>> box = train.box(0)                            # (y0, x0, y1, x1) of the digit's ink, in pixels
    >>> crowded = mixres.datasets.SmallObjects("train", objects=(1, 4))   # 1-4 digits; the label is the largest
    >>> boxes, digits = crowded.boxes(0), crowded.digits(0)              # every digit's box, the label's first

Measured with the defaults, on the first 512 val items, by ``benchmarks/small_objects_legibility.py`` (its output:
``benchmarks/results/small_objects_legibility.md``):

- PixelBlur(16, 64) puts the digit's centre in a 16 px leaf in 94% of the images at n_patches=40, 98% at 64 and
  100% at 100 (tests/test_datasets.py checks 64, on 64 items). Entropy(16, 64), whose grey-level histogram barely
  changes for a few stroke pixels, in 51%, 70% and 82%.
- How legible the digit is at each resolution: a small CNN trained on 3,000 crops of 32 px around the digit (so,
  told where it is), downsampled by area averaging, reads 99.6% of the val digits at full resolution, 99.0% at
  half resolution and 57% at a quarter. Half resolution loses almost nothing when the digit's place is known: the
  differences between a Quadformer and a uniform grid should show at budgets below 64 tokens.

Information density that varies from image to image (``objects=(lo, hi)``, issue 15's test of adaptive token
budgets): each image holds from lo to hi digits, their number drawn uniformly, none overlapping, and the label is the
**largest** digit. A fixed budget gives every image the same number of 16 px leaves, too few for an image of four
digits or too many for an image of one; an adaptive one (``tokenize(..., threshold=t)``) can give the first more.
Why the largest digit:

- the label depends on every object: any digit the model cannot read may be the largest, since the digits' places,
  sizes and colours are drawn alike (the others are uniform from 0 to the label: with k digits the largest is
  unique with probability (label / (label + 1))**(k - 1)), so only an image whose digits are all legible is read
  for sure;
- it stays within reach of the tiny ViT of ``benchmarks/small_objects.sh``, whose max pooling over the tokens
  computes it directly: if each token's features say "a digit >= d is here", for d = 1..9, their maximum over the
  tokens says "the largest digit is >= d". Reading one digit is what that ViT learns in 10 epochs (44-48% top-1,
  benchmarks/RESULTS.md). A sum modulo 10 would need attention to combine every digit's value, and a count of the
  digits would need no reading at all (a 32 px leaf shows that a digit is there), so resolution would not matter;
- the labels stay balanced (the largest digit is drawn as today's single digit is), so chance stays 1 / num_classes.

Everything is generated on the fly, deterministically, from data that ships with the installed packages: no
download. Needs scikit-image (``pip install mixres[demo]``).
"""
from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["SmallObjects", "make_split", "TEXTURES"]

# scikit-image's grey texture photos (512 x 512): they fill the frame with a fine, even pattern and hold no object
# that would compete with the digit for a scorer's attention.
TEXTURES = ("brick", "grass", "gravel")
SPLITS = ("train", "val")
MULTIPLE = 64  # the largest patch of the Quadformer demos: images are a whole number of 64 px roots
_DIGITS = "0123456789"
# The least gap between two digits' boxes, in pixels, with objects=(lo, hi): each digit stays a separate shape.
OBJECT_GAP = 4
# Placement attempts per digit: __init__ checks that each attempt succeeds with probability >= 1/2 (see
# _check_objects_fit), so they all fail with probability <= 2**-64, and then the item is an error, not a hang.
_PLACEMENT_TRIES = 64
# ITU-R BT.601 luma weights of R, G, B (as the Entropy scorer): contrast is measured in luma.
_LUMA = np.array([0.299, 0.587, 0.114])


class SmallObjects(torch.utils.data.Dataset):
    """A digit 8-11 px high on a faint 256 x 256 texture; the label is the digit. With ``objects=(lo, hi)``, lo to hi
    digits; the label is the largest.

    Item ``i`` is a deterministic function of (split, seed, i): it is drawn from its own random stream, so items
    can be made in any order, by any worker, and the train and val splits never share an item.

    How an item is drawn:
      - background: a ``image_size`` crop of a texture (``TEXTURES``, mirrored to tile when it is smaller than the
        image), flipped and rotated by a multiple of 90 degrees at random. Its grey levels are standardised, scaled
        to a standard deviation drawn from ``background_contrast`` and centred on a random grey in [0.25, 0.75],
        then tinted (each channel times a factor in [0.85, 1.15]);
      - object: the digit ``label`` in Pillow's default font (anti-aliased, hinted: crisp 1 px strokes), at a font
        size drawn from ``object_size``, rotated by a whole number of degrees in [-max_rotation, max_rotation], and
        painted fully inside the image at a random position, in a random colour whose luma differs by at least 0.35
        from the mean of the background under it;
      - with ``objects=(lo, hi)``: k digits, k uniform in [lo, hi]. The first is the label; each other is uniform
        in [0, label], so the label is the largest. Each has its own size, rotation and colour, drawn as above,
        and its own position, drawn again until its box is at least ``OBJECT_GAP`` (4) px from every earlier box.
        The default ``(1, 1)`` draws exactly the items of the single-digit dataset.

    Args:
        split: ``"train"`` or ``"val"``.
        length: the number of items.
        image_size: the side of the square images, a positive multiple of 64 (the Quadformer's largest patch).
        object_size: ``(lo, hi)``, the range of the font size in pixels (inclusive), 8 <= lo <= hi <=
            image_size // 2. A digit's ink is about 0.7 of the font size high, in the steps the hinted font
            renders: sizes 11-17 (the default) draw digits 8, 9, 10 or 11 px high, 5-11 px wide; 8 draws 5 px.
        num_classes: how many digits are used, 2 to 10: labels are 0 .. num_classes - 1.
        seed: selects one of many independent datasets; two seeds give different items.
        background_contrast: ``(lo, hi)``, the range of the texture's standard deviation (in [0, 1] grey levels),
            before tinting, 0 <= lo <= hi <= 0.25. The default is tuned so that PixelBlur finds the digit (see
            the module's docstring) while the texture stays visible; at (0.04, 0.08) PixelBlur spends its
            splits on the texture: 52% of the digits' centres in a 16 px leaf at n_patches=64, not 98%
            (``benchmarks/small_objects_legibility.py``).
        max_rotation: the largest rotation of the digit, in degrees, in [0, 45].
        objects: ``(lo, hi)``, the range of the number of digits per image (inclusive), 1 <= lo <= hi, and hi
            digits of the largest font size must fit the image with room to spare (an error says when they do not:
            at 256 px and the default sizes, up to 17).

    Items are ``(image [3, image_size, image_size] float32 in [0, 1], label int)``; ``box(i)`` tells where the digit
    (the label's) is, ``boxes(i)`` and ``digits(i)`` where every digit is and which, and ``tensors()`` makes the
    whole split at once.
    """

    def __init__(self, split: str = "train", length: int = 10_000, image_size: int = 256,
                 object_size: tuple[int, int] = (11, 17), num_classes: int = 10, seed: int = 0,
                 background_contrast: tuple[float, float] = (0.015, 0.035), max_rotation: int = 15,
                 objects: tuple[int, int] = (1, 1)):
        if split not in SPLITS:
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        if isinstance(length, bool) or not isinstance(length, int) or not 0 <= length < 2 ** 62:
            raise ValueError(f"length must be an int >= 0, got {length!r}")
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size <= 0 \
                or image_size % MULTIPLE:
            raise ValueError(f"image_size must be a positive multiple of {MULTIPLE} (the largest patch size), got "
                             f"{image_size!r}")
        lo, hi = _int_pair("object_size", object_size)
        if not 8 <= lo <= hi <= image_size // 2:
            raise ValueError(f"object_size must be (lo, hi) with 8 <= lo <= hi <= image_size // 2 = "
                             f"{image_size // 2} (font sizes under 8 draw digits under 5 px high, too small to "
                             f"read at any resolution; the upper bound keeps a rotated digit inside the image), "
                             f"got {object_size!r}")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or not 2 <= num_classes <= 10:
            raise ValueError(f"num_classes must be an int from 2 to 10 (one class per digit), got {num_classes!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 64:
            raise ValueError(f"seed must be an int in [0, 2**64), got {seed!r}")
        try:
            contrast = tuple(float(c) for c in background_contrast)
        except (TypeError, ValueError):
            raise TypeError(f"background_contrast must be a pair of numbers (lo, hi), got "
                            f"{background_contrast!r}") from None
        if len(contrast) != 2 or not 0 <= contrast[0] <= contrast[1] <= 0.25:
            raise ValueError(f"background_contrast must be (lo, hi) with 0 <= lo <= hi <= 0.25, got "
                             f"{background_contrast!r}")
        if isinstance(max_rotation, bool) or not isinstance(max_rotation, int) or not 0 <= max_rotation <= 45:
            raise ValueError(f"max_rotation must be an int from 0 to 45 degrees, got {max_rotation!r}")
        fewest, most = _int_pair("objects", objects)
        if not 1 <= fewest <= most:
            raise ValueError(f"objects must be (lo, hi) with 1 <= lo <= hi digits per image, got {objects!r}")
        _check_objects_fit(most, hi, image_size)
        self.split, self.length, self.image_size = split, length, image_size
        self.object_size, self.num_classes, self.seed = (lo, hi), num_classes, seed
        self.background_contrast, self.max_rotation = contrast, max_rotation
        self.objects = (fewest, most)

    def __repr__(self) -> str:
        return (f"SmallObjects(split={self.split!r}, length={self.length}, image_size={self.image_size}, "
                f"object_size={self.object_size}, num_classes={self.num_classes}, seed={self.seed}, "
                f"background_contrast={self.background_contrast}, max_rotation={self.max_rotation}, "
                f"objects={self.objects})")

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        """``(image [3, image_size, image_size] float32 in [0, 1], label int in [0, num_classes))``."""
        image, label, _ = self.item(index)
        return image, label

    def box(self, index: int) -> tuple[int, int, int, int]:
        """Where item ``index``'s digit is (with several, the first, whose digit is the label): ``(y0, x0, y1,
        x1)`` in pixels, the tight box of its ink (every pixel the digit paints, even faintly), ends exclusive.
        Cheap: it draws the item's parameters, not its image."""
        return self._draw(self._index(index))[1]

    def boxes(self, index: int) -> list[tuple[int, int, int, int]]:
        """Where each of item ``index``'s digits is, as :meth:`box` gives one: the label's first, then the others in
        the order they were drawn (``digits(index)``'s). Non-overlapping, at least ``OBJECT_GAP`` px apart."""
        return [digit["box"] for digit in self._draw(self._index(index))[0]["objects"]]

    def digits(self, index: int) -> list[int]:
        """Item ``index``'s digits, in :meth:`boxes`' order: the label first, each other at most the label."""
        return [digit["digit"] for digit in self._draw(self._index(index))[0]["objects"]]

    def item(self, index: int) -> tuple[Tensor, int, tuple[int, int, int, int]]:
        """``(image [3, H, W] float32 in [0, 1], label, box (y0, x0, y1, x1))``: an item with its (label's) digit's
        box."""
        params, box = self._draw(self._index(index))
        return torch.from_numpy(self._render(params)), params["label"], box

    def tensors(self, count: int | None = None, start: int = 0, dtype: torch.dtype = torch.float32,
                return_boxes: bool = False):
        """Items ``start .. start + count - 1`` (default: all of them) stacked.

        Returns:
            ``images [n, 3, H, W]``, ``labels [n]`` int64, and with ``return_boxes`` also ``boxes [n, 4]`` int64
            (y0, x0, y1, x1), each the label's digit's (:meth:`box`). ``dtype=torch.float32`` gives the items
            exactly; ``torch.uint8`` gives ``round(255 * image)``, a quarter of the memory (10,000 images of 256 x
            256 take 7.9 GB in float32, 2 GB in uint8).
        """
        if count is None:
            count = self.length - start
        if not (0 <= start and 0 <= count and start + count <= self.length):
            raise ValueError(f"items start={start} .. start + count - 1 = {start + count - 1} are outside the "
                             f"dataset's 0 .. {self.length - 1}")
        if dtype not in (torch.float32, torch.uint8):
            raise ValueError(f"dtype must be torch.float32 or torch.uint8, got {dtype}")
        size = self.image_size
        images = torch.empty(count, 3, size, size, dtype=dtype)
        labels = torch.empty(count, dtype=torch.int64)
        boxes = torch.empty(count, 4, dtype=torch.int64)
        # Each image is rendered straight into its row (float32), or into one reused buffer (uint8).
        buffer = np.empty((3, size, size), dtype=np.float32)
        rows = images.numpy()
        for row in range(count):
            params, box = self._draw(start + row)
            labels[row], boxes[row] = params["label"], torch.tensor(box)
            if dtype == torch.float32:
                self._render(params, out=rows[row])
            else:
                np.rint(self._render(params, out=buffer) * 255, out=buffer)
                rows[row] = buffer
        return (images, labels, boxes) if return_boxes else (images, labels)

    # -- internals ---------------------------------------------------------------------------------------------

    def _index(self, index) -> int:
        if isinstance(index, torch.Tensor) and index.numel() == 1:
            index = int(index)
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
            raise TypeError(f"index must be an int, got {type(index).__name__}")
        index = int(index)
        if index < 0:
            index += self.length
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} is out of range for a dataset of length {self.length}")
        return index

    def _generator(self, index: int, stream: int) -> np.random.Generator:
        """The item's own random stream. A Philox generator keyed by (seed, split, stream, index), packed
        injectively into its 128-bit key, so no two items, splits or seeds share a stream. (torch's CPU generator
        keeps only 32 bits of its seed, too few to hold all three.)"""
        key = (self.seed, (SPLITS.index(self.split) << 63) | (stream << 62) | index)
        return np.random.Generator(np.random.Philox(key=key[0] | (key[1] << 64)))

    def _label(self, index: int) -> int:
        # Labels are balanced exactly: each aligned run of num_classes items is a random permutation of the
        # classes (drawn from its own stream), so any split of a few hundred items has every class alike.
        run, position = divmod(index, self.num_classes)
        return int(self._generator(run, stream=1).permutation(self.num_classes)[position])

    def _draw(self, index: int) -> tuple[dict, tuple[int, int, int, int]]:
        """Every random choice of item ``index`` (its digits' in ``params["objects"]``), and the label's digit's
        box. The draws of a single digit come in the order they always did, so objects=(1, 1) keeps every item."""
        rng = self._generator(index, stream=0)
        size = self.image_size
        label = self._label(index)
        texture = TEXTURES[rng.integers(len(TEXTURES))]
        tile = _texture(texture, size).shape[-1]
        params = {
            "label": label,
            "texture": texture,
            "crop": (int(rng.integers(tile - size + 1)), int(rng.integers(tile - size + 1))),
            "flip": bool(rng.integers(2)),
            "quarter_turns": int(rng.integers(4)),
            "grey": float(rng.uniform(0.25, 0.75)),
            "contrast": float(rng.uniform(*self.background_contrast)),
            "tint": rng.uniform(0.85, 1.15, size=3),
        }
        count = 1 if self.objects == (1, 1) else int(rng.integers(self.objects[0], self.objects[1] + 1))
        params["objects"] = []
        for number in range(count):
            digit = {
                "digit": label if number == 0 else int(rng.integers(label + 1)),
                "font_size": int(rng.integers(self.object_size[0], self.object_size[1] + 1)),
                "angle": int(rng.integers(-self.max_rotation, self.max_rotation + 1)),
                "hue": rng.uniform(size=3),
                "luma_side": float(rng.uniform()),
                "luma_offset": float(rng.uniform()),
            }
            mask_h, mask_w = _glyph(_DIGITS[digit["digit"]], digit["font_size"], digit["angle"]).shape
            digit["box"] = self._place(rng, mask_h, mask_w, [other["box"] for other in params["objects"]])
            params["objects"].append(digit)
        return params, params["objects"][0]["box"]

    def _place(self, rng: np.random.Generator, height: int, width: int,
               taken: list[tuple[int, int, int, int]]) -> tuple[int, int, int, int]:
        """A box ``height x width`` at a random place inside the image, at least ``OBJECT_GAP`` px from every box
        in ``taken`` (the first draw, when there is none)."""
        size = self.image_size
        for _ in range(_PLACEMENT_TRIES):
            y0, x0 = int(rng.integers(size - height + 1)), int(rng.integers(size - width + 1))
            box = (y0, x0, y0 + height, x0 + width)
            if all(_apart(box, other) for other in taken):
                return box
        raise RuntimeError(f"no room for a {height} x {width} digit apart from {taken} in {_PLACEMENT_TRIES} tries "
                           f"(a chance below 2**-64): {self!r}")

    def _render(self, params: dict, out: np.ndarray | None = None) -> np.ndarray:
        """The image ``[3, H, W]`` float32 of an item from its parameters, written into ``out`` if given.

        In numpy, single-threaded: each operation is too small for torch's thread pool to pay off, and its
        threads spin and stall when the cores are busy (a DataLoader's other workers)."""
        image = self._background(params, out)
        for digit in params["objects"]:
            y0, x0, y1, x1 = digit["box"]
            # The digits' boxes are apart: each one's colour is set against the texture alone.
            under = image[:, y0:y1, x0:x1]
            colour = _colour(digit, under.mean(axis=(1, 2), dtype=np.float64)).astype(np.float32)[:, None, None]
            alpha = _glyph(_DIGITS[digit["digit"]], digit["font_size"], digit["angle"])
            # Anti-aliased paint: alpha-blend the colour over the texture.
            under += alpha * (colour - under)
        return image

    def _background(self, params: dict, out: np.ndarray | None = None) -> np.ndarray:
        """The textured background ``[3, H, W]`` float32 of an item, without its digit."""
        size = self.image_size
        top, left = params["crop"]
        grey = _texture(params["texture"], size)[top:top + size, left:left + size]  # standardised: mean 0, std 1
        if params["flip"]:
            grey = grey[:, ::-1]
        grey = np.rot90(grey, params["quarter_turns"])  # a view, as is the flip
        # tint * (grey level + contrast * texture), in one pass per channel.
        tint = params["tint"].astype(np.float32)[:, None, None]
        image = np.empty((3, size, size), dtype=np.float32) if out is None else out
        np.multiply(grey[None], tint * np.float32(params["contrast"]), out=image)
        image += tint * np.float32(params["grey"])
        return np.clip(image, 0, 1, out=image)


def make_split(split: str = "train", length: int = 10_000, dtype: torch.dtype = torch.float32, **kwargs):
    """``SmallObjects(split, length, **kwargs).tensors(dtype=dtype)``: ``images [length, 3, H, W]`` and
    ``labels [length]`` int64."""
    return SmallObjects(split, length, **kwargs).tensors(dtype=dtype)


def _int_pair(name: str, value) -> tuple[int, int]:
    if not isinstance(value, Sequence) or len(value) != 2 or \
            any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) for v in value):
        raise TypeError(f"{name} must be a pair of ints (lo, hi), got {value!r}")
    return int(value[0]), int(value[1])


def _apart(box: tuple[int, int, int, int], other: tuple[int, int, int, int]) -> bool:
    """Whether two boxes (y0, x0, y1, x1) are at least ``OBJECT_GAP`` px apart, along y or along x."""
    return (box[2] + OBJECT_GAP <= other[0] or other[2] + OBJECT_GAP <= box[0]
            or box[3] + OBJECT_GAP <= other[1] or other[3] + OBJECT_GAP <= box[1])


def _check_objects_fit(most: int, font_size: int, image_size: int) -> None:
    """A ValueError unless ``most`` digits of ``font_size`` fit an ``image_size`` image easily: each placement
    attempt must succeed with probability >= 1/2. A digit's box is at most g px a side, g = its unrotated ink's
    diagonal + 2 (bicubic rotation spreads it); an earlier box rules out fewer than (2 (g + OBJECT_GAP))**2 of the
    (image_size - g + 1)**2 places of the next box's corner."""
    if most == 1:
        return
    side = max(int(np.ceil(np.hypot(*_glyph(digit, font_size, 0).shape))) for digit in _DIGITS) + 2
    places = (image_size - side + 1) ** 2
    ruled_out = (most - 1) * (2 * (side + OBJECT_GAP)) ** 2
    if 2 * ruled_out > places:
        fit = 1 + places // (2 * (2 * (side + OBJECT_GAP)) ** 2)
        raise ValueError(f"objects allows up to {most} digits, too many for {image_size} px images at font size "
                         f"{font_size} (boxes up to {side} px, {OBJECT_GAP} px apart): at most {fit} fit easily; "
                         f"lower objects[1] or object_size[1], or raise image_size")


def _colour(params: dict, background: np.ndarray) -> np.ndarray:
    """The digit's RGB: luma at least 0.35 away from the background's mean colour under it, hue at random."""
    margin = 0.35
    below = max(0.0, float(_LUMA @ background) - margin)   # lumas [0, below] and [above, 1] are far enough
    above = min(1.0, float(_LUMA @ background) + margin)
    room_below, room_above = below, 1.0 - above
    # Pick the darker or the lighter side in proportion to its room, then a luma within it.
    if params["luma_side"] * (room_below + room_above) < room_below:
        luma = below * params["luma_offset"]
    else:
        luma = above + room_above * params["luma_offset"]
    # A random hue around that luma: a colour minus its own luma has zero luma (the weights sum to 1), so scaling it
    # keeps the luma; the scale is the largest that stays inside [0, 1].
    chroma = params["hue"] - _LUMA @ params["hue"]
    with np.errstate(divide="ignore"):
        limits = np.where(chroma > 0, (1 - luma) / chroma, np.where(chroma < 0, -luma / chroma, np.inf))
    return np.clip(luma + min(1.0, limits.min()) * chroma, 0, 1)


@functools.lru_cache(maxsize=None)
def _texture(name: str, min_size: int) -> np.ndarray:
    """A texture photo, grey, standardised (mean 0, std 1), float32 ``[S, S]``; mirrored into a 2^k x 2^k tiling
    (S >= min_size) when the photo is smaller than ``min_size``. Loaded once per process and size."""
    try:
        import skimage.data  # an optional dependency
    except ImportError:
        raise ImportError("mixres.datasets needs scikit-image for its texture photos: pip install mixres[demo]") \
            from None

    pixels = getattr(skimage.data, name)().astype(np.float64)
    if pixels.ndim == 3:
        pixels = pixels[..., :3] @ _LUMA
    side = min(pixels.shape)
    pixels = pixels[:side, :side]
    while pixels.shape[-1] < min_size:
        # Mirror tiling: no seams, unlike plain repetition.
        pixels = np.concatenate([pixels, pixels[:, ::-1]], axis=1)
        pixels = np.concatenate([pixels, pixels[::-1]], axis=0)
    return np.ascontiguousarray((pixels - pixels.mean()) / pixels.std(), dtype=np.float32)


@functools.lru_cache(maxsize=None)
def _glyph(char: str, font_size: int, angle: int) -> np.ndarray:
    """``char`` in Pillow's default font at ``font_size``, anti-aliased, rotated by ``angle`` degrees
    (counter-clockwise) and cropped to its ink: alpha ``[h, w]`` float32 in [0, 1]. Rendered once per process and
    (char, font_size, angle): a few hundred small arrays."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=font_size)
    left, top, right, bottom = font.getbbox(char)
    margin = 2
    canvas = Image.new("L", (right - left + 2 * margin, bottom - top + 2 * margin))
    ImageDraw.Draw(canvas).text((margin - left, margin - top), char, fill=255, font=font)
    if angle:
        canvas = canvas.rotate(angle, resample=Image.Resampling.BICUBIC, expand=True)
    canvas = canvas.crop(canvas.getbbox())
    return np.asarray(canvas, dtype=np.float32) / 255
