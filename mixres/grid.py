"""Leaf features <-> the dense grid of min_patch_size cells, for dense-prediction heads on a mosaic.

:func:`tokens_to_grid` paints each leaf's feature over the ``(size / min_patch_size)^2`` cells the leaf covers;
:func:`grid_to_tokens` pools the cells of each leaf back onto it (sum or mean). With ``reduce="sum"`` the two are
adjoint: each is the other's backward.

Both are pure PyTorch, batched and free of host synchronisation, with output shapes fixed by the input shapes, so
they run on any device, under ``torch.compile(fullgraph=True)`` and in CUDA graphs.

The boxes must be what :func:`mixres.tokenize` makes: in every image, leaves that cover the image exactly (no gap,
no overlap), each a square whose side is ``min_patch_size`` times a power of two, whose corner is a multiple of its
side, and which divides H and W; in an adaptive mosaic, followed by padding boxes (0, 0, 0). Padding paints no cell
and pools to 0 (sum and mean alike), so its features get a zero gradient; shapes stay static, with no host
synchronisation. Checking the boxes would need a host synchronisation, so it is the caller's contract: with other
boxes the results are unspecified (no error is raised; an index past the grid trips an indexing error, on CUDA a
device-side assert).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .checks import check_batch, check_device, check_plain_int, check_rank, is_padding_box

__all__ = ["tokens_to_grid", "grid_to_tokens"]


def tokens_to_grid(features: Tensor, boxes: Tensor, min_patch_size: int, image_size: tuple[int, int]) -> Tensor:
    """Paints each leaf's feature over the min_patch_size cells its leaf covers.

    Args:
        features: ``[B, N, D]``, one feature vector per leaf, any dtype.
        boxes: ``[B, N, 3]`` int32 or int64, each leaf's (y, x, size) in pixels, e.g. ``mosaic.boxes``: a mosaic
            as :func:`mixres.tokenize` makes it (see the module's contract).
        min_patch_size: s_min, the side of a grid cell in pixels.
        image_size: (H, W) in pixels, multiples of ``min_patch_size``.

    Returns:
        ``[B, D, H / s_min, W / s_min]`` in the features' dtype and device, cell (r, c) holding the feature of the
        leaf that covers it (never a padding box's). Its memory is channels-last (a view of a ``[B, h, w, D]``
        tensor). Differentiable with respect to ``features``; the backward is ``grid_to_tokens(grad, boxes,
        min_patch_size, reduce="sum")``.

    Raises:
        TypeError: a non-tensor argument, boxes not int32/int64, or a min_patch_size or image_size not of ints.
        ValueError: wrong ranks, features and boxes of different batch sizes or leaf counts, an image_size that is
            not a multiple of min_patch_size, or tensors on different devices.
    """
    check_rank("features", features, 3, "[B, N, D]")
    _check_boxes(boxes, features, "features")
    rows, cols = _grid_shape(min_patch_size, image_size)
    cells = _Paint.apply(features, boxes, min_patch_size, rows, cols)  # [B, h * w, D]
    return cells.unflatten(1, (rows, cols)).permute(0, 3, 1, 2)


def grid_to_tokens(grid: Tensor, boxes: Tensor, min_patch_size: int, reduce: str = "mean") -> Tensor:
    """Pools a dense grid of min_patch_size cells onto the leaves: each leaf gets the sum or the mean of its cells.

    Each leaf's cells are added pairwise, in a quadtree (2 x 2 blocks, then 2 x 2 blocks of those, ...): the
    result is deterministic on every device, and the mean of a leaf whose cells are all equal is that value
    exactly (barring overflow), so ``grid_to_tokens(tokens_to_grid(x, ...), ..., "mean")`` gives back ``x`` bit
    for bit.

    Args:
        grid: ``[B, D, h, w]``, a feature per min_patch_size cell of the ``h * s_min x w * s_min`` image, e.g. a
            dense head's output. Any dtype for ``"sum"``, floating point for ``"mean"``.
        boxes: ``[B, N, 3]`` int32 or int64, each leaf's (y, x, size) in pixels, e.g. ``mosaic.boxes``: a mosaic
            of that image as :func:`mixres.tokenize` makes it (see the module's contract).
        min_patch_size: s_min, the side of a grid cell in pixels.
        reduce: ``"mean"`` (average over the leaf's ``(size / s_min)^2`` cells) or ``"sum"``.

    Returns:
        ``[B, N, D]`` in the grid's dtype and device; 0 for padding boxes (0, 0, 0). Differentiable with respect to
        ``grid``; with ``"sum"`` the backward is ``tokens_to_grid(grad, boxes, min_patch_size, image_size)``.

    Raises:
        TypeError: a non-tensor argument, boxes not int32/int64, a min_patch_size not an int, or an integer grid
            with ``reduce="mean"``.
        ValueError: wrong ranks, grid and boxes of different batch sizes, an unknown reduce, or tensors on
            different devices.
    """
    if reduce not in ("mean", "sum"):
        raise ValueError(f"reduce must be 'mean' or 'sum', got {reduce!r}")
    check_rank("grid", grid, 4, "[B, D, h, w]")
    _check_boxes(boxes, grid, "grid")
    check_plain_int("min_patch_size", min_patch_size)
    if reduce == "mean" and not (grid.is_floating_point() or grid.is_complex()):
        raise TypeError(f"grid must be floating point for reduce='mean', got {grid.dtype}; use reduce='sum'")
    rows, cols = grid.shape[-2:]
    summed = _Pool.apply(grid.permute(0, 2, 3, 1).flatten(1, 2), boxes, min_patch_size, rows, cols)
    if reduce == "sum":
        return summed
    # A leaf of side k * s_min covers k^2 cells, a power of two: the division itself is exact. A padding box covers
    # none and sums to 0: divided by 1, it stays 0.
    return summed / ((boxes[..., 2] // min_patch_size) ** 2).clamp(min=1)[..., None]


class _LeafGridFunction(torch.autograd.Function):
    """An op ``(tensor, boxes, min_patch_size, rows, cols)`` whose backward is its adjoint op, on the same boxes.

    Pairing :class:`_Paint` and :class:`_Pool` this way makes each the exact adjoint of the other, also in its
    rounding, and keeps atomics (autograd's scatter_add for a gather) out of both backwards.
    """

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        _, boxes, ctx.min_patch_size, ctx.rows, ctx.cols = inputs
        ctx.save_for_backward(boxes)


def _adjoint(op: type[_LeafGridFunction], ctx, grad: Tensor) -> tuple:
    (boxes,) = ctx.saved_tensors
    return op.apply(grad, boxes, ctx.min_patch_size, ctx.rows, ctx.cols), None, None, None, None


class _Paint(_LeafGridFunction):
    """features ``[B, N, D]`` -> cells ``[B, h * w, D]``, each cell its leaf's feature; the backward is
    :class:`_Pool`."""

    @staticmethod
    def forward(features: Tensor, boxes: Tensor, min_patch_size: int, rows: int, cols: int) -> Tensor:
        owner = _owner_index(boxes, min_patch_size, rows, cols)
        # Whole D-vectors, D innermost: each cell copies its leaf's feature contiguously.
        return features.gather(1, owner[..., None].expand(-1, -1, features.shape[2]))

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _adjoint(_Pool, ctx, grad)


class _Pool(_LeafGridFunction):
    """cells ``[B, h * w, D]`` -> each leaf's sum ``[B, N, D]``, by a pyramid of pairwise 2 x 2 sums; the backward
    is :class:`_Paint`."""

    @staticmethod
    def forward(cells: Tensor, boxes: Tensor, min_patch_size: int, rows: int, cols: int) -> Tensor:
        # Level j holds the sums of the aligned 2^j x 2^j blocks, [B, h / 2^j * w / 2^j, D], all levels in one
        # tensor so that a single gather reads every leaf's block from the level of its size, and padding boxes a
        # zero row after them (block_index). Copying the cells in first (D innermost, whatever the grid's layout)
        # lets the sums and the gather read whole D-vectors.
        sides = block_sides(rows, cols)
        counts = [rows // k * (cols // k) for k in sides]
        batch, dim = cells.shape[0], cells.shape[2]
        pyramid = cells.new_empty(batch, sum(counts) + 1, dim)
        *levels, padding = pyramid.split([*counts, 1], dim=1)
        padding.zero_()
        levels[0].copy_(cells)
        for finer, level, k in zip(levels, levels[1:], sides[1:]):
            quads = finer.unflatten(1, (rows // k, 2, cols // k, 2))
            level.copy_(((quads[:, :, 0, :, 0] + quads[:, :, 0, :, 1])
                         + (quads[:, :, 1, :, 0] + quads[:, :, 1, :, 1])).flatten(1, 2))
        index = block_index(boxes, min_patch_size, rows, cols)
        return pyramid.gather(1, index[..., None].expand(-1, -1, dim))

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _adjoint(_Paint, ctx, grad)


def block_sides(rows: int, cols: int) -> list[int]:
    """The leaf sides in cells that a rows x cols grid can hold: 1, 2, 4, ..., each dividing rows and cols."""
    sides = [1]
    while rows % (2 * sides[-1]) == 0 and cols % (2 * sides[-1]) == 0 and 2 * sides[-1] <= min(rows, cols):
        sides.append(2 * sides[-1])
    return sides


def block_index(boxes: Tensor, min_patch_size: int, rows: int, cols: int) -> Tensor:
    """``[B, N]`` int64: where each leaf's block lies in a pyramid of a rows x cols grid's aligned blocks, the
    levels of sides 1, 2, 4, ... cells (:func:`block_sides`) concatenated, each level in raster order. A padding box
    (0, 0, 0) gets the index just past the whole pyramid, where a caller keeps a zero entry."""
    padding = is_padding_box(boxes)
    row, col, side = (boxes.long() // min_patch_size).unbind(-1)
    side = side.clamp(min=1)  # a padding box's side, 0, would divide by zero below; its index is replaced anyway
    area = side * side
    # Levels 0 .. j-1 before the level of side k = 2^j hold h w (1 + 1/4 + ... + 1/4^(j-1)) = 4 (h w / k^2)
    # (k^2 - 1) / 3 entries; 3 divides k^2 - 1 = 4^j - 1.
    start = rows * cols // area * ((area - 1) // 3) * 4
    past_the_pyramid = sum(rows // k * (cols // k) for k in block_sides(rows, cols))
    return torch.where(padding, past_the_pyramid, start + row // side * (cols // side) + col // side)


def _owner_index(boxes: Tensor, min_patch_size: int, rows: int, cols: int) -> Tensor:
    """``[B, rows * cols]`` int64: the index in ``[0, N)`` of the leaf that covers each cell, in raster order.

    A leaf of side k cells starts at a multiple of k, so the leaf covering cell (r, c), if it has side k, starts
    at the aligned corner ((r // k) k, (c // k) k). Map each leaf's side and index to its corner cell; then, for
    every possible side k (a static loop over the few powers of two that divide the grid), the cells whose
    k-aligned corner starts a leaf of side k belong to that leaf. In a mosaic exactly one k matches each cell.
    Padding boxes are mapped to a slot past the grid, which no cell reads: they own no cell.
    """
    batch, n_leaves = boxes.shape[:2]
    padding = is_padding_box(boxes)
    boxes = boxes.long() // min_patch_size  # (row, col, side) in cells
    corner = torch.where(padding, rows * cols, boxes[..., 0] * cols + boxes[..., 1])
    side_at = boxes.new_zeros(batch, rows * cols + 1).scatter_(1, corner, boxes[..., 2])
    row = torch.arange(rows, device=boxes.device)[:, None]
    col = torch.arange(cols, device=boxes.device)[None, :]
    owner_corner = boxes.new_zeros(batch, rows * cols)
    for side in block_sides(rows, cols):
        aligned = ((row // side * side) * cols + col // side * side).flatten()  # [rows * cols]
        owner_corner = torch.where(side_at.index_select(1, aligned) == side, aligned, owner_corner)
    leaf_at = boxes.new_zeros(batch, rows * cols + 1).scatter_(
        1, corner, torch.arange(n_leaves, device=boxes.device).expand(batch, n_leaves))
    return leaf_at.gather(1, owner_corner)


def _check_boxes(boxes, other: Tensor, other_name: str) -> None:
    """boxes ``[B, N, 3]`` int32/int64 on ``other``'s device with its batch size (and, for features, its N)."""
    check_rank("boxes", boxes, 3, "[B, N, 3] (y, x, size)")
    if boxes.shape[2] != 3:
        raise ValueError(f"boxes must be [B, N, 3] (y, x, size), got {list(boxes.shape)}")
    if boxes.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"boxes must be int32 or int64 (y, x, size) in pixels, got {boxes.dtype}")
    check_device("boxes", boxes, other.device, holder=f"{other_name} is")
    check_batch("boxes", boxes, other.shape[0], holder=other_name)
    if other_name == "features" and boxes.shape[1] != other.shape[1]:
        raise ValueError(f"boxes has {boxes.shape[1]} leaves but features has {other.shape[1]} (N must match)")


def _grid_shape(min_patch_size: int, image_size: tuple[int, int]) -> tuple[int, int]:
    """(H / s_min, W / s_min), after checking the sizes."""
    check_plain_int("min_patch_size", min_patch_size)
    if (not isinstance(image_size, (tuple, list)) or len(image_size) != 2
            or any(isinstance(v, bool) or not isinstance(v, int) for v in image_size)):
        raise TypeError(f"image_size must be (H, W), two ints, got {image_size!r}")
    height, width = image_size
    if height <= 0 or width <= 0 or height % min_patch_size or width % min_patch_size:
        raise ValueError(f"image_size {tuple(image_size)} must be positive multiples of min_patch_size "
                         f"{min_patch_size}")
    return height // min_patch_size, width // min_patch_size
