"""A mosaic's files, as ``mixres mosaic`` and the demo write them: its figure (PNG) and its leaves (JSON)."""
from __future__ import annotations

import json
from pathlib import Path

from torch import Tensor

from ..mosaic import Mosaic
from ..viz import save_mosaic_figure

__all__ = ["leaves_per_size", "save_mosaic"]


def leaves_per_size(boxes: Tensor) -> dict[int, int]:
    """``[N, 3]`` boxes -> {leaf side: count}, largest side first."""
    sizes, counts = boxes[:, 2].unique(return_counts=True)
    return {int(s): int(c) for s, c in sorted(zip(sizes, counts), key=lambda sc: -sc[0])}


def save_mosaic(photo: Tensor, mosaic: Mosaic, out: Path, stem: str, max_patch_size: int, index: int = 0,
                **info) -> dict:
    """Writes ``out/<stem>.png`` (:func:`mixres.viz.save_mosaic_figure`: the photo with its leaf borders, then the
    mosaic rendered from its tokens) and ``out/<stem>.json``: ``info``, then the image's ``height`` and ``width``,
    ``min_patch_size``, ``max_patch_size``, ``n_patches`` (this image's leaves), the ``leaves`` ``[[y, x, size],
    ...]`` and ``leaves_per_size`` (``{"64": count, ...}``, largest first); for a padded mosaic (an adaptive
    budget), also ``max_patches``, its padded length N_max. Padding is no leaf: it is in neither list.

    Args:
        photo: ``[C, H, W]`` in [0, 1], the image that ``mosaic[index]`` was made from.
        mosaic: its mosaic (a batch of them); ``index`` picks the one.
        out, stem: the folder (it must exist) and the files' name.
        max_patch_size: the largest leaf side the mosaic was allowed.
        **info: fields put first in the JSON record.

    Returns:
        The JSON record (with int keys in ``leaves_per_size``).
    """
    boxes = mosaic.image_leaves(index)
    height, width = mosaic.image_size
    record = {**info, "height": height, "width": width, "min_patch_size": mosaic.min_patch_size,
              "max_patch_size": max_patch_size, "n_patches": len(boxes),
              **({"max_patches": mosaic.n_patches} if mosaic.is_padded else {}), "leaves": boxes.tolist(),
              "leaves_per_size": leaves_per_size(boxes)}
    save_mosaic_figure(photo, mosaic, out / f"{stem}.png", index)
    (out / f"{stem}.json").write_text(json.dumps(record) + "\n")
    return record
