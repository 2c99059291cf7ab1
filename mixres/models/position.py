"""Position embeddings of mixed-resolution leaves: from a pretrained ViT's table, or from the leaf centres (x, y).

All take the leaves of a :class:`mixres.Mosaic` (``boxes [B, N, 3]`` (y, x, size) in pixels, or ``centers
[B, N, 2]`` (y, x) in units of the min_patch_size grid) and return ``[B, N, D]``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..grid import block_index, block_sides

__all__ = ["leaf_table_embed", "sincos_xy_embed", "LearnedXYEmbed"]


def leaf_table_embed(table: Tensor, boxes: Tensor, min_patch_size: int, max_patch_size: int) -> Tensor:
    """Each leaf's mean of a position table over the min_patch_size cells it covers (DESIGN.md's ``resample``).

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

