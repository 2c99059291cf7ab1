"""mixres: mixed-resolution quadtree tokenization for Vision Transformers (the Quadformer of Ronen et al., 2023).

>>> mosaic = mixres.tokenize(images, scores, n_patches=100)   # tokens [B, N, C, 16, 16], boxes, centers
"""
import functools

from . import checks, datasets, ops, reference, scorers, viz
from .budgets import ThresholdCalibration, calibrate_threshold
from .grid import grid_to_tokens, tokens_to_grid
from .mosaic import Mosaic, tokenize
from .packed import PackedMosaic, pack
from .pyramid import PackedPyramid, QuadtreeGeometry, pack_pyramid, saliency_to_pyramid, valid_n_patches
from .scorers import Entropy, FeatureBased, GradCAM, PixelBlur, Precomputed, Random, Uniform, create_scorer

__version__ = "0.1.0"

# The plain-PyTorch tokenizer: the tokenizer on the reference's ops. Bound here, where both are imported: the
# reference holds the ops alone, and the tokenizer imports mixres.ops, which falls back to the reference.
reference.tokenize = functools.partial(tokenize, backend=reference)
reference.tokenize.__doc__ = """:func:`mixres.tokenize` on the plain-PyTorch ops of :mod:`mixres.reference`: the same
arguments, the same mosaic."""


def __getattr__(name: str):
    # mixres.models imports timm (about a second and a half): only when asked for. Importing it registers the
    # quadformer_* models with timm.
    if name == "models":
        import importlib

        return importlib.import_module(".models", __name__)
    raise AttributeError(f"module 'mixres' has no attribute {name!r}")


__all__ = ["Mosaic", "tokenize", "PackedMosaic", "pack", "calibrate_threshold", "ThresholdCalibration",
           "tokens_to_grid", "grid_to_tokens", "valid_n_patches", "QuadtreeGeometry", "PackedPyramid", "pack_pyramid",
           "saliency_to_pyramid", "PixelBlur", "FeatureBased", "GradCAM", "Entropy", "Random", "Uniform",
           "Precomputed", "create_scorer", "checks", "datasets", "models", "ops", "reference", "scorers", "viz"]
