"""The argument checks that every stage of mixres shares, so that one mistake reads the same wherever it is made.

Each check raises ``TypeError`` for a value of the wrong kind (not a Tensor, not an int, the wrong dtype) and
``ValueError`` for a wrong shape, range, device or choice, naming the argument. The checks that mirror a C++ op's
own take its name as ``op`` and start their messages with it, as the op's errors do.
"""
from __future__ import annotations

import math
import numbers
import operator
import struct
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["FLOAT_DTYPES", "RESIZE_MODES", "NAN_POLICIES", "check_int", "check_plain_int", "check_tensor",
           "check_rank", "check_float_dtype", "check_floating", "check_device", "check_batch", "check_images",
           "check_map", "check_boxes", "check_boxes_inside", "is_padding_box", "check_budgets", "check_budget_values",
           "check_thresholds", "check_threshold_values", "check_threshold_number", "check_per_size_keys", "is_number",
           "check_resize_mode", "check_nan_policy", "check_lengths"]

# The dtypes of images and tokens.
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# How a leaf is resized to a token: see mixres.tokenize.
RESIZE_MODES = ("area", "bilinear")
# What tokenize does with NaN and infinite scores: see its docstring.
NAN_POLICIES = ("raise", "lowest")


def _prefix(op: str | None) -> str:
    return f"{op}: " if op else ""


def check_int(name: str, value, low: int | None = None, high: int | None = None, valid: str | None = None) -> int:
    """``value`` as a Python int, for the sizes, counts and seeds of mixres: a Python int or any integer scalar
    that implements ``__index__`` (NumPy's ``np.int64(100)``), within ``[low, high]``.

    A bool is not a count, and a Tensor is refused too: reading its value would synchronise with its device (and
    specialise a compiled graph on it); pass ``int(t)``. ``valid`` describes the valid values in the errors
    (default: from ``low`` and ``high``).

    Raises:
        TypeError: not an integer (a float, a str, a bool, a Tensor...), naming ``name``.
        ValueError: outside ``[low, high]``, naming ``name`` and the range.
    """
    if valid is None:
        valid = ("a positive int" if low == 1 and high is None else
                 f"an int >= {low}" if high is None else f"an int from {low} to {high}")
    if isinstance(value, bool) or isinstance(value, Tensor) or not hasattr(type(value), "__index__"):
        hint = ": pass int(value)" if isinstance(value, Tensor) else ""
        raise TypeError(f"{name} must be {valid}, got {type(value).__name__} {value!r}{hint}")
    try:
        number = operator.index(value)
    except TypeError:  # NumPy's bool has __index__ but refuses to be an index
        raise TypeError(f"{name} must be {valid}, got {type(value).__name__} {value!r}") from None
    if (low is not None and number < low) or (high is not None and number > high):
        raise ValueError(f"{name} must be {valid}, got {number}")
    return number


def check_plain_int(name: str, value, op: str | None = None, high: int | None = None) -> int:
    """``value``, a positive Python int (at most ``high``), as the ops take their sizes: no bool, and no NumPy
    integer either, unlike :func:`check_int`."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{_prefix(op)}{name} must be an int, got {value!r}")
    if high is not None and not 0 < value <= high:
        raise ValueError(f"{_prefix(op)}{name} must be in [1, {high}], got {value}")
    if value <= 0:
        raise ValueError(f"{_prefix(op)}{name} must be positive, got {value}")
    return value


def check_tensor(name: str, value, op: str | None = None) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{_prefix(op)}{name} must be a Tensor, got {type(value).__name__}")
    return value


def check_rank(name: str, value, rank: int, shape: str) -> Tensor:
    """A Tensor of rank ``rank``; ``shape`` describes it in the errors (``"[B, C, H, W]"``)."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a Tensor {shape}, got {type(value).__name__}")
    if value.dim() != rank:
        raise ValueError(f"{name} must have rank {rank} {shape}, got rank {value.dim()} {list(value.shape)}")
    return value


def check_float_dtype(name: str, value: Tensor, op: str | None = None, hint: str = "") -> Tensor:
    """A Tensor of one of the :data:`FLOAT_DTYPES`, the dtypes the ops compute in."""
    if value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{_prefix(op)}{name} must be float16, bfloat16, float32 or float64, got {value.dtype}"
                        + hint)
    return value


def check_floating(name: str, value: Tensor) -> Tensor:
    """Any floating-point Tensor: scores and saliency, which are converted to float32 or float64."""
    if not value.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {value.dtype}")
    return value


def check_device(name: str, value: Tensor, device: torch.device, holder: str = "images are") -> Tensor:
    """``value`` on ``device``, the device of what ``holder`` names (``"images are"``, ``"features is"``)."""
    if value.device != device:
        raise ValueError(f"{name} is on {value.device} but {holder} on {device}: put both on one device")
    return value


def check_batch(name: str, value: Tensor, batch: int, holder: str = "images") -> Tensor:
    """``value`` with ``batch`` rows, the batch size of ``holder``."""
    if value.shape[0] != batch:
        raise ValueError(f"{name} has batch size {value.shape[0]} but {holder} has {batch}")
    return value


def check_images(images) -> Tensor:
    """Images ``[B, C, H, W]`` that :func:`mixres.tokenize` and the scorers take: floating point, B, C, H, W >= 1.
    Whether H and W fit the patch sizes is :class:`mixres.QuadtreeGeometry`'s check."""
    check_rank("images", images, 4, "[B, C, H, W]")
    check_float_dtype("images", images, hint=" (convert with images.float() / 255)" if images.dtype == torch.uint8
                      else "")
    if images.shape[0] == 0:
        raise ValueError("images is an empty batch (B=0): tokenize needs at least one image")
    if images.shape[1] == 0:
        raise ValueError("images has no channels (C=0)")
    if images.shape[2] == 0 or images.shape[3] == 0:
        raise ValueError(f"images have no pixels (H x W = {images.shape[2]} x {images.shape[3]}): height and width "
                         f"must be positive multiples of max_patch_size")
    return images


def check_map(name: str, value, batch: int, shape: tuple[int, int], device: torch.device) -> Tensor:
    """One map of a score pyramid: floating point ``[batch, *shape]`` on the images' ``device``."""
    check_tensor(name, value)
    check_floating(name, value)
    check_device(name, value, device)
    if tuple(value.shape) != (batch, *shape):
        raise ValueError(f"{name} must have shape [B, H/s, W/s] = {[batch, *shape]}, got {list(value.shape)}")
    return value


def check_boxes(boxes, batch: int | None, op: str) -> Tensor:
    """``boxes [B, N, 3]`` int32, B = ``batch`` unless None: the C++ ops' check_boxes, with their messages."""
    check_tensor("boxes", boxes, op)
    if boxes.dim() != 3 or (batch is not None and boxes.shape[0] != batch) or boxes.shape[2] != 3:
        expected = "B" if batch is None else f"B={batch}"
        raise ValueError(f"{op}: boxes must be [{expected}, N, 3], got {list(boxes.shape)}")
    if boxes.dtype != torch.int32:
        raise TypeError(f"{op}: boxes must be int32, got {boxes.dtype}")
    return boxes


def check_boxes_inside(boxes: Tensor, height: int, width: int, op: str) -> Tensor:
    """Every box a square of positive side inside the image (in int64: y + size may overflow an int32), or the
    padding box (0, 0, 0) of an adaptive mosaic. Reads the boxes on the host: a synchronisation on CUDA, which is why
    only the reference checks this."""
    y, x, size = boxes.long().unbind(-1)
    outside = (size < 1) | (y < 0) | (x < 0) | (y + size > height) | (x + size > width)
    outside &= ~is_padding_box(boxes)
    if outside.any():
        b, n = outside.nonzero()[0].tolist()
        y, x, size = boxes[b, n].tolist()
        raise ValueError(f"{op}: boxes[{b}, {n}] (y={y}, x={x}, size={size}) is not inside the {height}x{width} "
                         f"image: need size >= 1, 0 <= y <= {height} - size and 0 <= x <= {width} - size (or the "
                         f"padding box (0, 0, 0))")
    return boxes


def is_padding_box(boxes: Tensor) -> Tensor:
    """``[...]`` bool: which boxes ``[..., 3]`` are the padding box (0, 0, 0) that follows an adaptive mosaic's
    leaves. Elementwise: no host synchronisation."""
    return (boxes == 0).all(dim=-1)


def check_budgets(budgets, batch: int, op: str | None, device: torch.device | None = None, name: str = "budgets",
                  holder: str = "scores are") -> Tensor:
    """Per-image budgets ``[batch]`` int32 or int64 (on ``device``, the device of what ``holder`` names, unless
    None): the C++ check_adaptive_args, with its messages; ``name`` is the argument's (``n_patches`` for tokenize).
    Their values are :func:`check_budget_values`'."""
    check_tensor(name, budgets, op)
    if budgets.dim() != 1 or budgets.shape[0] != batch:
        raise ValueError(f"{_prefix(op)}{name} must be [B] = [{batch}], one budget per image, got "
                         f"{list(budgets.shape)}")
    if budgets.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{_prefix(op)}{name} must be int32 or int64, got {budgets.dtype}")
    if device is not None and budgets.device != device:
        raise ValueError(f"{_prefix(op)}{name} is on {budgets.device} but {holder} on {device}: put both on one "
                         f"device")
    return budgets


def check_budget_values(budgets: Tensor | Sequence[int], n_roots: int, max_patches: int, op: str | None,
                        name: str = "budgets"):
    """Every budget (of a tensor ``[B]`` or a sequence of ints) reachable (``n_roots + 3k``) and at most
    ``max_patches``; the error names the first image that has another. Reads a tensor's values on the host: a
    synchronisation where they are on a GPU."""
    for image, budget in enumerate(budgets.tolist() if isinstance(budgets, Tensor) else budgets):
        if not (n_roots <= budget <= max_patches and (budget - n_roots) % 3 == 0):
            raise ValueError(f"{_prefix(op)}{name}[{image}] = {budget} is unreachable: each budget must be "
                             f"{n_roots} + 3k, from {n_roots} to max_patches = {max_patches}")
    return budgets


def check_thresholds(thresholds, sizes: list[int], dtype: torch.dtype, op: str,
                     device: torch.device | None = None) -> Tensor:
    """Stopping thresholds ``[L]``, one per splittable patch size in ``sizes`` (coarse to fine), of the scores'
    ``dtype`` (on ``device`` unless None): the C++ check_adaptive_args, with its messages. Their values are
    :func:`check_threshold_values`'."""
    check_tensor("thresholds", thresholds, op)
    if thresholds.dim() != 1 or thresholds.shape[0] != len(sizes):
        raise ValueError(f"{op}: thresholds must be [{len(sizes)}], one per splittable patch size "
                         f"({', '.join(map(str, sizes))}), got {list(thresholds.shape)}")
    if thresholds.dtype != dtype:
        raise TypeError(f"{op}: thresholds must have the scores' dtype {dtype}, got {thresholds.dtype}")
    if device is not None and thresholds.device != device:
        raise ValueError(f"{op}: thresholds is on {thresholds.device} but scores are on {device}: put both on one "
                         f"device")
    return thresholds


def check_threshold_values(thresholds: Tensor, sizes: list[int], op: str | None, name: str = "thresholds") -> Tensor:
    """Every threshold finite; the error names the first other and its patch size. Reads the values on the host."""
    for level, (value, size) in enumerate(zip(thresholds.tolist(), sizes, strict=True)):
        check_threshold_number(value, None, op, name, f" for patch size {size} ({name}[{level}])")
    return thresholds


def is_number(value) -> bool:
    """Whether ``value`` is a real number a threshold may be: a Python or NumPy int or float, not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_per_size_keys(name: str, mapping, sizes: list[int], min_patch_size: int, what: str = "entry") -> None:
    """A ValueError unless ``mapping``'s keys are ints, exactly the splittable patch sizes ``sizes`` (a dict of one
    value per size: tokenize's threshold, calibrate_threshold's level_weights)."""
    keys = list(mapping)
    if not all(isinstance(key, numbers.Integral) and not isinstance(key, bool) for key in keys) or sorted(
            map(int, keys)) != sorted(sizes):
        raise ValueError(f"{name} must have one {what} per splittable patch size, keys {sizes} (the smallest size, "
                         f"{min_patch_size}, is never split), got keys {keys}")


def check_threshold_number(value, dtype: torch.dtype | None, op: str | None, name: str = "thresholds",
                           where: str = "") -> float:
    """A finite Python number as the scores' ``dtype`` holds it (float32 rounded to nearest; None: as it is), or a
    ValueError naming ``name`` and ``where`` it was (``" for patch size 32 (thresholds[1])"``)."""
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{_prefix(op)}{name} must be finite, got {value}{where}")
    if dtype == torch.float32:
        try:  # struct rounds to the nearest float32, and refuses a value that rounds to infinity
            value = struct.unpack("<f", struct.pack("<f", value))[0]
        except OverflowError:
            raise ValueError(f"{_prefix(op)}{name} must be finite in the scores' dtype float32, got "
                             f"{value}{where}, which overflows it") from None
    return value


def check_resize_mode(mode, name: str = "mode") -> str:
    """One of :data:`RESIZE_MODES`; ``name`` is the argument's (``"resize_mode"`` for a model)."""
    if mode not in RESIZE_MODES:
        raise ValueError(f"{name} must be 'area' or 'bilinear', got {mode!r}")
    return mode


def check_nan_policy(nan_policy) -> str:
    """One of :data:`NAN_POLICIES`."""
    if not isinstance(nan_policy, str) or nan_policy not in NAN_POLICIES:
        raise ValueError(f"nan_policy must be one of {', '.join(map(repr, NAN_POLICIES))}, got {nan_policy!r}")
    return nan_policy


def check_lengths(lengths, tokens: Tensor) -> Tensor:
    """A padded mosaic's ``lengths``: int32 or int64 ``[B]`` on the device of its ``tokens [B, N, ...]``. Its values
    are not read (that would synchronise with the device): each must be from 1 to N, as tokenize makes them (a
    length of 0 makes average pooling NaN)."""
    check_rank("mosaic.lengths", lengths, 1, "[B], the number of valid leaves of each image")
    if lengths.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"mosaic.lengths must be int32 or int64, got {lengths.dtype}")
    check_batch("mosaic.lengths", lengths, tokens.shape[0], holder="mosaic.tokens")
    return check_device("mosaic.lengths", lengths, tokens.device, holder="mosaic.tokens are")
