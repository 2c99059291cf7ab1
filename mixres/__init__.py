"""mixres: mixed-resolution quadtree tokenization for Vision Transformers (the Quadformer of Ronen et al., 2023).

>>> mosaic = mixres.tokenize(images, scores, n_patches=100)   # tokens [B, N, C, 16, 16], boxes, centers
"""
from . import datasets, ops, reference, scorers, viz
from .mosaic import Mosaic, tokenize
from .pyramid import QuadtreeGeometry, pack_pyramid, saliency_to_pyramid, valid_n_patches
from .scorers import Entropy, FeatureBased, GradCAM, PixelBlur, Precomputed, Random, Uniform, create_scorer

__version__ = "0.1.0"
__all__ = ["Mosaic", "tokenize", "valid_n_patches", "QuadtreeGeometry", "pack_pyramid", "saliency_to_pyramid",
           "PixelBlur", "FeatureBased", "GradCAM", "Entropy", "Random", "Uniform", "Precomputed", "create_scorer",
           "datasets", "ops", "reference", "scorers", "viz"]
