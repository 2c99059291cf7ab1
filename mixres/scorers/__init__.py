"""Patch scorers: a scorer maps images ``[B, C, H, W]`` to a score pyramid.

The pyramid is what :func:`mixres.tokenize` takes: a list of maps ordered coarse to fine, one per splittable patch
size s = max_patch_size, max_patch_size/2, ..., 2*min_patch_size, the map of size s being ``[B, H/s, W/s]``; a
higher score splits that s x s patch first. Scorers run without gradients, batched, on the images' device, and
``mixres.tokenize(images, scorer, n_patches)`` calls one itself. ``create_scorer(name, ...)`` builds one by name.
"""
from .base import Scorer
from .baselines import Precomputed, Random, Uniform
from .entropy import Entropy
from .features import FeatureBased
from .gradcam import GradCAM
from .pixel_blur import PixelBlur
from .registry import SCORERS, create_scorer

__all__ = ["Scorer", "PixelBlur", "FeatureBased", "GradCAM", "Entropy", "Random", "Uniform", "Precomputed", "SCORERS",
           "create_scorer"]
