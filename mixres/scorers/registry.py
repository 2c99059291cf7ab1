"""Scorers by name, for the command line and for model configs: ``create_scorer("feature", weights=...)``."""
from __future__ import annotations

from .base import Scorer
from .baselines import Precomputed, Random, Uniform
from .entropy import Entropy
from .features import FeatureBased
from .gradcam import GradCAM
from .pixel_blur import PixelBlur

__all__ = ["SCORERS", "create_scorer"]

SCORERS: dict[str, type[Scorer]] = {
    "pixel-blur": PixelBlur,
    "feature": FeatureBased,
    "gradcam": GradCAM,
    "entropy": Entropy,
    "random": Random,
    "uniform": Uniform,
    "precomputed": Precomputed,
}


def create_scorer(scorer: str | Scorer, min_patch_size: int = 16, max_patch_size: int = 64, **kwargs) -> Scorer:
    """A scorer from its name, or the scorer itself after checking its patch sizes.

    Args:
        scorer: one of :data:`SCORERS` (``"pixel-blur"``, ``"feature"``, ``"gradcam"``, ``"entropy"``,
            ``"random"``, ``"uniform"``, ``"precomputed"``; case and ``_`` for ``-`` do not matter), or a
            :class:`Scorer`.
        min_patch_size, max_patch_size: the tokenizer's smallest and largest leaf side, in pixels.
        **kwargs: the scorer's own arguments, e.g. ``weights=`` for ``"feature"``, ``model=`` for ``"gradcam"``,
            ``seed=`` for ``"random"``, ``saliency=`` for ``"precomputed"``. Not allowed with a Scorer.

    Raises:
        ValueError: an unknown name, or a Scorer whose patch sizes differ from those asked for.
        TypeError: arguments the scorer does not take.
    """
    if isinstance(scorer, Scorer):
        if kwargs:
            raise TypeError(f"scorer arguments {sorted(kwargs)} are for a scorer given by name; {scorer!r} is "
                            f"already built")
        if (scorer.min_patch_size, scorer.max_patch_size) != (min_patch_size, max_patch_size):
            raise ValueError(f"scorer {scorer!r} scores for patch sizes {scorer.min_patch_size}-"
                             f"{scorer.max_patch_size} px, but {min_patch_size}-{max_patch_size} px were asked for")
        return scorer
    if not isinstance(scorer, str):
        raise TypeError(f"scorer must be a name ({', '.join(SCORERS)}) or a mixres Scorer, got "
                        f"{type(scorer).__name__}")
    key = scorer.strip().lower().replace("_", "-")
    if key not in SCORERS:
        raise ValueError(f"scorer {scorer!r} is unknown: choose one of {', '.join(SCORERS)}, or pass a Scorer")
    return SCORERS[key](min_patch_size=min_patch_size, max_patch_size=max_patch_size, **kwargs)
