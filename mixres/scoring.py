"""Scores in every form :func:`mixres.tokenize` takes, turned into the packed pyramid ``[B, P]`` the quadtree ops
take: the patch sizes read off a scorer, the scorer run, the pyramid packed, non-finite scores ranked.

What the tokenizer and the threshold calibration (:mod:`mixres.budgets`) share, so that both read scores the same
way.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .pyramid import QuadtreeGeometry, pack_scores
from .scorers.base import Scorer

__all__ = ["is_scorer", "scorer_patch_sizes", "packed_scores", "rank_non_finite_lowest"]


def is_scorer(scores) -> bool:
    """Whether ``scores`` is a scorer, a callable ``scorer(images) -> pyramid``, rather than scores."""
    return callable(scores) and not isinstance(scores, Tensor)


def scorer_patch_sizes(scores, min_patch_size: int | None, max_patch_size: int | None,
                       caller: str = "tokenize") -> tuple[int, int]:
    """The tokenizer's patch sizes: the arguments, else the scorer's own (its ``min_patch_size`` and
    ``max_patch_size`` attributes), else 16 and 64. A scorer whose sizes contradict the arguments is an error, which
    names ``caller``, the function they were passed to."""
    sizes = []
    for name, given, default in (("min_patch_size", min_patch_size, 16), ("max_patch_size", max_patch_size, 64)):
        own = getattr(scores, name, None) if is_scorer(scores) else None
        if given is not None and own is not None and given != own:
            raise ValueError(f"{name}={given} but the scorer {scores!r} scores patches for {name}={own}: pass "
                             f"the same sizes to both, or leave {name} out of {caller}")
        sizes.append(next(size for size in (given, own, default) if size is not None))
    return sizes[0], sizes[1]


def rank_non_finite_lowest(packed: Tensor) -> Tensor:
    """``nan_policy="lowest"``: NaN and -Inf scores become the lowest finite value of the scores' dtype, +Inf the
    highest. Elementwise, so no host synchronisation, and the same on every device."""
    extremes = torch.finfo(packed.dtype)
    return torch.nan_to_num(packed, nan=extremes.min, posinf=extremes.max, neginf=extremes.min)


def packed_scores(images: Tensor, scores, geometry: QuadtreeGeometry, nan_policy: str = "raise") -> Tensor:
    """``scores`` of ``images [B, C, H, W]`` in any form :func:`mixres.tokenize` takes (a pyramid as a list or dict,
    a dense saliency map, a :class:`mixres.PackedPyramid`, a scorer), packed ``[B, P]``: float32, or float64 when
    they are. A :class:`mixres.scorers.Scorer` is asked for ``scorer.packed(images)``, another callable for
    ``scorer(images)``. With ``nan_policy="lowest"``, non-finite scores are ranked by
    :func:`rank_non_finite_lowest`; with ``"raise"`` they are left for the quadtree op to refuse."""
    if is_scorer(scores):
        # A Scorer packs its own pyramid, without a list of maps in between where it computes the packed layout.
        scores = scores.packed(images) if isinstance(scores, Scorer) else scores(images)
    packed = pack_scores(scores, geometry, images.shape[0], images.device)
    return rank_non_finite_lowest(packed) if nan_policy == "lowest" else packed
