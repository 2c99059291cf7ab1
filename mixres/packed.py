"""The packed layout of a batch of mosaics: every image's valid leaves one after the other, ``[T, ...]``, with the
cumulative lengths ``cu_seqlens [B + 1]`` and the longest length ``max_seqlen``, as flash-attn's varlen functions and
PyTorch's varlen, nested (jagged) and flex attention take them.

A padded :class:`mixres.Mosaic` spends the same compute on its padding as on its leaves; a packed one holds no
padding (or, in the static variant, a tail of a size chosen in advance), so token-wise layers cost what the leaves
cost.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .checks import check_int, check_lengths
from .mosaic import Mosaic

__all__ = ["PackedMosaic", "pack"]


@dataclass
class PackedMosaic:
    """A batch of mosaics in the packed layout: image b's leaves are rows ``cu_seqlens[b]`` to ``cu_seqlens[b + 1]``,
    in canonical order.

    Attributes:
        tokens: ``[T, C, p, p]``, each leaf resized to p x p.
        boxes: ``[T, 3]`` int32, each leaf's (y, x, size) in pixels.
        centers: ``[T, 2]`` float32, each leaf's centre (y, x) in units of the s_min grid (as in a Mosaic).
        cu_seqlens: ``[B + 1]`` int32, 0 then the cumulative sum of the images' lengths, on the tokens' device.
        max_seqlen: an upper bound of the images' lengths, a Python int: the longest length when packed by
            :func:`pack` without ``total_tokens``; N_max, the padded mosaic's width, in the static variant.
        min_patch_size: s_min, the unit of ``centers``.
        image_size: (H, W) of the tokenized images.

    The static variant (``pack(mosaic, total_tokens=T_max)``) has ``T = T_max`` rows, of which the last
    ``T_max - cu_seqlens[B]`` belong to no image: the tail, padding as a padded mosaic's (tokens 0, boxes (0, 0, 0),
    centres (-0.5, -0.5)). Without it, ``T = cu_seqlens[B]``.
    """

    tokens: Tensor
    boxes: Tensor
    centers: Tensor
    cu_seqlens: Tensor
    max_seqlen: int
    min_patch_size: int
    image_size: tuple[int, int]

    @property
    def batch_size(self) -> int:
        return self.cu_seqlens.shape[0] - 1

    @property
    def total_tokens(self) -> int:
        """T, the number of rows (the tail's included)."""
        return self.tokens.shape[0]

    @property
    def patch_size(self) -> int:
        return self.tokens.shape[-1]

    @property
    def lengths(self) -> Tensor:
        """``[B]`` int32, each image's number of leaves."""
        return self.cu_seqlens.diff()

    @property
    def valid(self) -> Tensor:
        """``[T]`` bool, True at the rows that belong to an image (all but the static variant's tail)."""
        return torch.arange(self.total_tokens, device=self.cu_seqlens.device) < self.cu_seqlens[-1]

    @property
    def batch_index(self) -> Tensor:
        """``[T]`` int64, the image each row belongs to; B for the static variant's tail. No host synchronisation."""
        return row_images(self.cu_seqlens, self.total_tokens)

    @property
    def tokens_channels_last(self) -> Tensor:
        """``[T, p, p, C]``, a view of ``tokens`` (no copy)."""
        return self.tokens.permute(0, 2, 3, 1)

    def flat_tokens(self) -> Tensor:
        """``[T, C * p * p]``, a view in the (C, p, p) order of a ViT's ``Conv2d`` patch-embedding weight."""
        return self.tokens.flatten(1)

    def unpack(self, n_patches: int | None = None) -> Mosaic:
        """The padded :class:`mixres.Mosaic` of these leaves: ``[B, N, ...]`` with N = ``n_patches`` (default
        ``max_seqlen``), each image's leaves first, then padding (tokens 0, boxes (0, 0, 0), centres (-0.5, -0.5)),
        and ``lengths [B]`` int64. ``pack(mosaic).unpack(mosaic.n_patches)`` is ``mosaic`` (its padding as
        tokenize makes it; an unpadded mosaic comes back with ``lengths`` set, all N). Differentiable with respect to
        the tokens; no host synchronisation, so an image longer than ``n_patches`` cannot be detected: n_patches
        must be at least ``max_seqlen``."""
        width = self.max_seqlen if n_patches is None else check_int(
            "n_patches", n_patches, low=self.max_seqlen, valid=f"an int >= max_seqlen = {self.max_seqlen} (or None)")
        lengths = self.lengths.long()
        columns = torch.arange(width, device=self.cu_seqlens.device)
        valid = columns < lengths[:, None]  # [B, N]
        # Every (image, column) reads a row; padding reads a clamped one and is then overwritten.
        rows = (self.cu_seqlens[:-1, None].long() + columns).clamp(max=max(self.total_tokens - 1, 0))

        def gathered(values: Tensor, fill: float) -> Tensor:
            keep = valid.view(*valid.shape, *(1,) * (values.dim() - 1))
            # A Python number, not a tensor made from it: copying that to a GPU would synchronise.
            return torch.where(keep, values[rows], fill)

        return Mosaic(tokens=gathered(self.tokens, 0), boxes=gathered(self.boxes, 0),
                      centers=gathered(self.centers, -0.5), min_patch_size=self.min_patch_size,
                      image_size=self.image_size, lengths=lengths)


def row_images(cu_seqlens: Tensor, rows: int) -> Tensor:
    """``[rows]`` int64: the sequence (of ``cu_seqlens [B + 1]``) each of ``rows`` packed rows falls in, B past the
    last one. On the device, no host synchronisation."""
    positions = torch.arange(rows, device=cu_seqlens.device)
    return torch.searchsorted(cu_seqlens[1:].long(), positions, right=True)


def pack(mosaic: Mosaic, total_tokens: int | None = None) -> PackedMosaic:
    """A :class:`mixres.Mosaic`, padded or not, in the packed layout (:class:`PackedMosaic`).

    Args:
        mosaic: ``tokens [B, N, C, p, p]``, ``boxes [B, N, 3]``, ``centers [B, N, 2]``, and ``lengths [B]`` (each
            from 1 to N) or None (every image N leaves).
        total_tokens: None: ``T = sum(lengths)`` rows. This **synchronises with the device once** for a padded
            mosaic (T is data-dependent: an output shape, and max_seqlen, must be known on the host), which CUDA-graph
            capture and ``torch.compile(fullgraph=True)`` cannot take. An int T_max >= 1: the static variant,
            exactly ``T_max`` rows, the leaves then a tail of padding, ``max_seqlen = N``, and no host
            synchronisation. ``sum(lengths) > T_max`` is never silently wrong: on the CPU a ValueError; on a GPU a
            device-side assert (``torch._assert_async``), which ends the process's CUDA context, since raising
            would need a synchronisation. Choose ``T_max`` from the budget you allow, e.g. ``B * mean length``
            with a margin, or ``B * N`` to be safe.

    Returns:
        :class:`PackedMosaic`, ``tokens [T, C, p, p]`` (differentiable with respect to the mosaic's tokens),
        ``boxes [T, 3]``, ``centers [T, 2]``, ``cu_seqlens [B + 1]`` int32, on the mosaic's device.

    Raises:
        TypeError: ``mosaic`` not a Mosaic, ``total_tokens`` not an int.
        ValueError: ``total_tokens`` below 1, below ``B * N`` for an unpadded mosaic, or (on the CPU) below
            ``sum(lengths)``.
    """
    if not isinstance(mosaic, Mosaic):
        raise TypeError(f"mosaic must be a mixres.Mosaic, got {type(mosaic).__name__}")
    batch, width = mosaic.tokens.shape[:2]
    device = mosaic.tokens.device
    lengths = check_lengths(mosaic.lengths, mosaic.tokens) if mosaic.is_padded else \
        torch.full((batch,), width, device=device)
    cu_seqlens = torch.nn.functional.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
    if total_tokens is None:
        total, longest = _read_lengths(cu_seqlens, lengths, width) if mosaic.is_padded else (batch * width, width)
    else:
        total = check_int("total_tokens", total_tokens, low=1,
                          valid="a positive int (T_max, the rows of the static variant) or None")
        longest = width
        if not mosaic.is_padded and total < batch * width:
            raise ValueError(f"total_tokens={total} is below the mosaic's {batch} x {width} = {batch * width} leaves")
        if mosaic.is_padded:
            if device.type == "cpu" and not torch.compiler.is_compiling():
                valid_total, _ = _read_lengths(cu_seqlens, lengths, width)  # free on the CPU
                if valid_total > total:
                    raise ValueError(f"total_tokens={total} is below the mosaic's {valid_total} valid leaves "
                                     f"(sum(lengths)): pass a larger total_tokens (B * N = {batch * width} always "
                                     f"holds them)")
            else:
                torch._assert_async(cu_seqlens[-1] <= total, f"mixres.pack: total_tokens={total} is below the "
                                    f"mosaic's number of valid leaves, sum(lengths)")
    if not mosaic.is_padded and total == batch * width:
        # Every leaf in order: the rows are the mosaic's, viewed (no copy).
        return PackedMosaic(tokens=mosaic.tokens.flatten(0, 1), boxes=mosaic.boxes.flatten(0, 1),
                            centers=mosaic.centers.flatten(0, 1), cu_seqlens=cu_seqlens, max_seqlen=longest,
                            min_patch_size=mosaic.min_patch_size, image_size=mosaic.image_size)
    images = row_images(cu_seqlens, total)
    valid = images < batch
    images = images.clamp(max=batch - 1)  # the tail reads a leaf of the last image, then is overwritten
    leaves = images * width + (torch.arange(total, device=device) - cu_seqlens[images].long()).clamp(0, width - 1)

    def gathered(values: Tensor, fill: float) -> Tensor:
        rows = values.flatten(0, 1)[leaves]
        return torch.where(valid.view(-1, *(1,) * (rows.dim() - 1)), rows, fill)  # no copy from the host

    return PackedMosaic(tokens=gathered(mosaic.tokens, 0), boxes=gathered(mosaic.boxes, 0),
                        centers=gathered(mosaic.centers, -0.5), cu_seqlens=cu_seqlens, max_seqlen=longest,
                        min_patch_size=mosaic.min_patch_size, image_size=mosaic.image_size)


def _read_lengths(cu_seqlens: Tensor, lengths: Tensor, width: int) -> tuple[int, int]:
    """(sum, max) of a padded mosaic's ``lengths``, read on the host in one synchronisation; a ValueError for a
    length outside [1, N], which would otherwise be taken as it is."""
    total, longest, shortest = torch.stack([cu_seqlens[-1], lengths.max().to(torch.int32),
                                            lengths.min().to(torch.int32)]).tolist()
    if shortest < 1 or longest > width:
        raise ValueError(f"mosaic.lengths must be from 1 to N = {width}, got values from {shortest} to {longest}")
    return total, longest
