"""Position embeddings of mixed-resolution leaves: from a pretrained ViT's table, or from the leaf centres (x, y).

The functions and :class:`LearnedXYEmbed` take the leaves of a :class:`mixres.Mosaic` (``boxes [B, N, 3]`` (y, x,
size) in pixels, or ``centers [B, N, 2]`` (y, x) in units of the min_patch_size grid) and return ``[B, N, D]``.
The Quadformer's ``pos_embed`` kinds are built on them: one :class:`PositionEmbedding` module each, made from its
name by :func:`pos_embed_class`.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..grid import block_index, block_sides
from .padding import neutral_padding

if TYPE_CHECKING:
    from ..mosaic import Mosaic

__all__ = ["leaf_table_embed", "sincos_xy_embed", "LearnedXYEmbed", "PositionEmbedding", "ResampledTable",
           "SinCosXY", "LearnedXY", "POS_EMBEDS", "pos_embed_class"]


def leaf_table_embed(table: Tensor, boxes: Tensor, min_patch_size: int, max_patch_size: int) -> Tensor:
    """Each leaf's mean of a position table over the min_patch_size cells it covers (``resample`` in docs/design.md).

    The table is average-pooled once per leaf size (a window of k x k cells for leaves of k cells), and each leaf
    gathers its own entry: a leaf of one cell reads the table's entry as is, so a mosaic of min_patch_size leaves
    reproduces the ViT's own embedding exactly. Differentiable with respect to the table.

    Args:
        table: ``[gh, gw, D]``, one entry per min_patch_size cell of the image (gh = H / min_patch_size).
        boxes: ``[B, N, 3]`` int (y, x, size) in pixels; each leaf aligned to its own size, as tokenize makes them.
        min_patch_size, max_patch_size: the mosaic's smallest and largest leaf side, in pixels.

    Returns:
        ``[B, N, D]`` in the table's dtype.
    """
    rows, cols, _ = table.shape
    grid = table.permute(2, 0, 1).unsqueeze(0)  # [1, D, gh, gw]
    # The pyramid of tokens_to_grid's adjoint, of means rather than sums, and once for the whole batch: every leaf
    # side up to max_patch_size (and no larger than the table: the uniform-grid baseline's is coarser).
    levels = [grid if cells == 1 else F.avg_pool2d(grid, cells) for cells in block_sides(rows, cols)
              if cells * min_patch_size <= max_patch_size]
    pooled = torch.cat([level.flatten(2)[0].T for level in levels])  # [sum of gh/k * gw/k, D]
    return pooled[block_index(boxes, min_patch_size, rows, cols)]


def sincos_xy_embed(centers: Tensor, dim: int, temperature: float = 10000.0) -> Tensor:
    """The paper's ``xy`` scheme, sinusoidal: the 1-D sin-cos embedding of y in the first ``dim / 2`` channels and
    of x in the last ``dim / 2`` (each half is ``[sin(c w_i), cos(c w_i)]``, w_i = temperature^(-i / (dim / 4))).

    Args:
        centers: ``[B, N, 2]`` (y, x), any float unit (the mosaic's s_min grid).
        dim: the embedding width D, a multiple of 4.

    Returns:
        ``[B, N, D]`` float32 (no parameters, any image size).
    """
    if dim % 4:
        raise ValueError(f"the xy sin-cos position embedding needs an embedding width divisible by 4, got {dim}")
    quarter = dim // 4
    frequencies = temperature ** (-torch.arange(quarter, device=centers.device, dtype=torch.float32) / quarter)
    angles = centers.float().unsqueeze(-1) * frequencies  # [B, N, 2, D/4]
    return torch.cat([angles.sin(), angles.cos()], dim=-1).flatten(-2)


class LearnedXYEmbed(nn.Module):
    """The paper's ``xy`` scheme, learned: a table of y embeddings and one of x embeddings (``dim / 2`` each),
    read at each leaf centre by linear interpolation and concatenated (y, then x).

    A leaf centre sits on the half-cell lattice of the min_patch_size grid, so the tables hold one entry per half
    cell: ``2 g - 1`` rows for a grid of g cells. Images of another size map their centres linearly onto the
    tables (as resampling a position table would).

    Args:
        grid: (gh, gw), the min_patch_size grid of the model's image size.
        dim: the embedding width D, even.
    """

    def __init__(self, grid: tuple[int, int], dim: int):
        super().__init__()
        if dim % 2:
            raise ValueError(f"the learned xy position embedding needs an even embedding width, got {dim}")
        self.grid = tuple(grid)
        self.y_table = nn.Parameter(torch.empty(2 * grid[0] - 1, dim // 2))
        self.x_table = nn.Parameter(torch.empty(2 * grid[1] - 1, dim // 2))
        nn.init.trunc_normal_(self.y_table, std=0.02)
        nn.init.trunc_normal_(self.x_table, std=0.02)

    def forward(self, centers: Tensor, grid: tuple[int, int]) -> Tensor:
        """``centers [B, N, 2]`` (y, x) on an image whose min_patch_size grid is ``grid`` -> ``[B, N, D]``."""
        halves = []
        for axis, table in enumerate((self.y_table, self.x_table)):
            # Centres span [0, g - 1] in cells; the table spans [0, 2 g_model - 2] in half cells.
            scale = (table.shape[0] - 1) / max(grid[axis] - 1, 1)
            position = (centers[..., axis].float() * scale).clamp(0, table.shape[0] - 1)
            low = position.floor().long().clamp(max=table.shape[0] - 2) if table.shape[0] > 1 else \
                torch.zeros_like(position, dtype=torch.long)
            high = (low + 1).clamp(max=table.shape[0] - 1)
            weight = (position - low).unsqueeze(-1).to(table.dtype)
            halves.append(table[low] * (1 - weight) + table[high] * weight)
        return torch.cat(halves, dim=-1)


class PositionEmbedding(nn.Module):
    """A ``pos_embed`` kind of the Quadformer: the positions of a mosaic's leaves, ``[B, N, D]``, added to their
    token embeddings.

    A kind is built on the ViT it serves, ``kind(vit, grid)`` (``grid``: the min_patch_size grid of the model's
    image size), and may change it there (the ``xy`` kinds cut the ViT's table to its prefix tokens' entries). The
    table stays the ViT's (``vit.pos_embed``), so that the ViT's weights keep their names: the ViT is passed to
    :meth:`forward` and :meth:`adapt_state_dict` rather than held.

    Attributes:
        kind: its ``pos_embed`` name.
        reads_centers: whether the positions come from the leaf centres (``mosaic.centers``, in the grid of
            ``mosaic.image_size``) rather than from the boxes.
    """

    kind: ClassVar[str]
    reads_centers: ClassVar[bool]

    def forward(self, mosaic: Mosaic, vit: nn.Module) -> Tensor:
        """The positions of ``mosaic``'s leaves, ``[B, N, D]``. A padded mosaic's padding rows are those of a
        stand-in leaf (:func:`mixres.models.padding.neutral_padding`): finite, whatever its padding holds."""
        raise NotImplementedError

    def no_weight_decay(self) -> set[str]:
        """Its own parameters (names relative to it) that weight decay leaves out: all of them, position tables."""
        return {name for name, _ in self.named_parameters()}

    def adapt_state_dict(self, state_dict: dict, prefix: str, vit: nn.Module, table_key: str) -> None:
        """Fits a checkpoint's position weights to this kind, in place: its own, saved under ``prefix`` (their
        names relative to it), and the ViT's table at ``table_key`` (of another image size, or of a kind that uses
        it where this one does not). Weights that already fit are left as they are."""


class ResampledTable(PositionEmbedding):
    """``pos_embed="resample"``: the ViT's pretrained table, averaged over the min_patch_size cells each leaf covers
    (:func:`leaf_table_embed`), after a bicubic resampling of the table when the image's grid differs from it."""

    kind = "resample"
    reads_centers = False

    def __init__(self, vit: nn.Module, grid: tuple[int, int]):
        super().__init__()
        if vit.pos_embed is None:
            raise ValueError("pos_embed='resample' needs the ViT's absolute position table, and this ViT has none "
                             "(pos_embed is None): use pos_embed='xy' or 'xy-learned'")

    def forward(self, mosaic: Mosaic, vit: nn.Module) -> Tensor:
        mosaic = neutral_padding(mosaic)
        side = mosaic.min_patch_size
        grid = (mosaic.image_size[0] // side, mosaic.image_size[1] // side)
        table = vit.pos_embed[:, _table_prefix(vit):]
        table_grid = tuple(vit.patch_embed.grid_size)
        if table_grid != grid:
            from timm.layers import resample_abs_pos_embed

            table = resample_abs_pos_embed(table, new_size=list(grid), old_size=list(table_grid),
                                           num_prefix_tokens=0)
        table = table.reshape(grid[0], grid[1], -1)
        # Every leaf side the mosaic's grid can hold, not only up to the model's max_patch_size: a prepared mosaic
        # may have larger leaves, and checking its boxes would need a host synchronisation.
        largest = side * block_sides(*grid)[-1]
        return leaf_table_embed(table, mosaic.boxes, side, largest)

    def adapt_state_dict(self, state_dict: dict, prefix: str, vit: nn.Module, table_key: str) -> None:
        """A table of another square grid (a plain ViT's at another image size) is resampled to the model's grid,
        as timm does; one without the patches' entries (the ``xy`` kinds') cannot serve, and says so."""
        table = state_dict.get(table_key)
        if table is None or table.shape == vit.pos_embed.shape or table.dim() != 3 \
                or table.shape[-1] != vit.pos_embed.shape[-1]:
            return  # fits, or torch and explain_mismatch say what differs
        from timm.layers import resample_abs_pos_embed

        n_prefix = _table_prefix(vit)
        cells = table.shape[1] - n_prefix
        side = round(cells ** 0.5)
        if cells <= 0:
            raise RuntimeError(f"these weights have no position table for the patches (only its {table.shape[1]} "
                               f"prefix-token entries: a Quadformer's trained with pos_embed 'xy' or 'xy-learned'), "
                               f"which this model's pos_embed='resample' needs: build it with pos_embed='xy' or "
                               f"'xy-learned' (--pos-embed)")
        if side * side != cells:
            raise RuntimeError(f"these weights' position table has {cells} patch entries, not a square grid, and "
                               f"the model's {tuple(vit.patch_embed.grid_size)} grid differs: it cannot be "
                               f"resampled; build the model at the weights' image size (img_size)")
        state_dict[table_key] = resample_abs_pos_embed(table, new_size=list(vit.patch_embed.grid_size),
                                                       old_size=[side, side], num_prefix_tokens=n_prefix)


class _FromCentres(PositionEmbedding):
    """The ``xy`` kinds: positions from the leaf centres. The ViT's table of patch positions is of no use to them:
    only its prefix tokens' entries are kept (or nothing, where it has none for them), so that no parameter goes
    without a gradient."""

    reads_centers = True

    def __init__(self, vit: nn.Module):
        super().__init__()
        if vit.pos_embed is not None:
            # Contiguous strides, not the slice's: DDP's gradient buckets take the parameter's strides, and
            # autograd gives the gradient contiguous ones.
            prefix = _table_prefix(vit)
            table = vit.pos_embed.data[:, :prefix].clone(memory_format=torch.contiguous_format)
            vit.pos_embed = nn.Parameter(table) if prefix else None

    def adapt_state_dict(self, state_dict: dict, prefix: str, vit: nn.Module, table_key: str) -> None:
        """A checkpoint's ViT table is cut as the model's was (to its prefix tokens' entries, or dropped)."""
        if table_key not in state_dict:
            return
        if vit.pos_embed is None:
            del state_dict[table_key]
        else:
            state_dict[table_key] = state_dict[table_key][:, :_table_prefix(vit)]


class SinCosXY(_FromCentres):
    """``pos_embed="xy"``, the paper's scheme: :func:`sincos_xy_embed` of the leaf centres. No parameters."""

    kind = "xy"

    def __init__(self, vit: nn.Module, grid: tuple[int, int]):
        super().__init__(vit)
        if vit.embed_dim % 4:
            raise ValueError(f"pos_embed='xy' needs an embedding width divisible by 4, got {vit.embed_dim}")
        self.dim = vit.embed_dim

    def forward(self, mosaic: Mosaic, vit: nn.Module) -> Tensor:
        mosaic = neutral_padding(mosaic)
        return sincos_xy_embed(mosaic.centers, self.dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


class LearnedXY(_FromCentres):
    """``pos_embed="xy-learned"``: learned y and x tables read at the leaf centres (:class:`LearnedXYEmbed`, its
    ``xy_embed``)."""

    kind = "xy-learned"

    def __init__(self, vit: nn.Module, grid: tuple[int, int]):
        super().__init__(vit)
        self.xy_embed = LearnedXYEmbed(grid, vit.embed_dim)

    def forward(self, mosaic: Mosaic, vit: nn.Module) -> Tensor:
        mosaic = neutral_padding(mosaic)
        side = mosaic.min_patch_size
        return self.xy_embed(mosaic.centers, (mosaic.image_size[0] // side, mosaic.image_size[1] // side))

    def adapt_state_dict(self, state_dict: dict, prefix: str, vit: nn.Module, table_key: str) -> None:
        """The ViT's table is cut, and tables of another length (another image size or min_patch_size) are
        resampled, linearly as they are read: their rows span the leaf centres' range whatever their length."""
        super().adapt_state_dict(state_dict, prefix, vit, table_key)
        for name, table in self.named_parameters():
            key = prefix + name
            loaded = state_dict.get(key)
            if loaded is not None and loaded.dim() == 2 and loaded.shape[1] == table.shape[1] \
                    and loaded.shape[0] != table.shape[0]:
                state_dict[key] = F.interpolate(loaded.T[None].float(), size=table.shape[0], mode="linear",
                                                align_corners=True)[0].T.to(loaded.dtype).contiguous()


def _table_prefix(vit: nn.Module) -> int:
    """How many prefix-token entries the ViT's position table holds before the patches'."""
    return 0 if vit.no_embed_class else vit.num_prefix_tokens


_KINDS = {kind.kind: kind for kind in (ResampledTable, SinCosXY, LearnedXY)}
POS_EMBEDS = tuple(_KINDS)


def pos_embed_class(kind: str) -> type[PositionEmbedding]:
    """The :class:`PositionEmbedding` of a ``pos_embed`` name (one of :data:`POS_EMBEDS`), to be built on a ViT as
    ``pos_embed_class(kind)(vit, grid)``; a ValueError naming the kinds for another name."""
    if kind not in _KINDS:
        raise ValueError(f"pos_embed must be one of {', '.join(POS_EMBEDS)}, got {kind!r}")
    return _KINDS[kind]

