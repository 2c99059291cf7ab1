"""Quadformers registered with timm: ``timm.create_model("quadformer_vit_base_patch16_224", n_patches=100)``.

Each name wraps the timm ViT of the same name without the ``quadformer_`` prefix. ``pretrained=True`` loads that
ViT's weights through timm's own mechanism (its pretrained tags work: ``quadformer_vit_base_patch16_224.augreg_in1k``;
``pretrained_cfg_overlay=dict(file="vit.safetensors")`` reads a local file). ``checkpoint_path=`` loads a
Quadformer checkpoint or a plain ViT one.
"""
from __future__ import annotations

import inspect

from timm.models import register_model

from .quadformer import Quadformer, check_vit

__all__ = ["create_quadformer"]

_QUADFORMER_ARGS = frozenset(inspect.signature(Quadformer).parameters) - {"vit"}


def create_quadformer(vit_name: str, pretrained: bool = False, **kwargs) -> Quadformer:
    """A :class:`Quadformer` around ``timm.create_model(vit_name, pretrained, ...)``, for any timm ViT name.

    Args:
        vit_name: a timm VisionTransformer name, with or without a pretrained tag (``"deit3_small_patch16_224"``).
        pretrained: load the ViT's pretrained weights through timm (download, or ``pretrained_cfg_overlay=
            dict(file=...)`` for a local file). With ``scorer="feature"``, the scorer's backbone is pretrained
            too (``weights="DEFAULT"``) unless ``scorer_kwargs`` names its weights.
        **kwargs: :class:`Quadformer` arguments (``n_patches``, ``scorer``, ``scorer_kwargs``, ``pos_embed``,
            ``min_patch_size``, ``max_patch_size``, ``resize_mode``, ``input_mean``, ``input_std``,
            ``nan_policy``); the rest go to ``timm.create_model`` for the ViT (``num_classes``, ``img_size``,
            ``drop_path_rate``, ``pretrained_cfg``, ...). ``n_patches`` defaults to about half the tokens of the
            uniform grid, at any image size: the fewest valid leaves of at least half the grid of min_patch_size
            cells (100 of 196 at 224 px with 16-32 px leaves, 288 of 576 at 384 px with 16-64 px).
    """
    import timm

    quadformer_args = {key: kwargs.pop(key) for key in list(kwargs) if key in _QUADFORMER_ARGS}
    if pretrained and quadformer_args.get("scorer") == "feature":
        scorer_kwargs = dict(quadformer_args.get("scorer_kwargs") or {})
        if "weights" not in scorer_kwargs and not scorer_kwargs.get("random_init"):
            scorer_kwargs["weights"] = "DEFAULT"
        quadformer_args["scorer_kwargs"] = scorer_kwargs
    vit = timm.create_model(vit_name, pretrained=pretrained, **{k: v for k, v in kwargs.items() if v is not None})
    if quadformer_args.get("n_patches") is not None:
        return Quadformer(vit, **quadformer_args)
    patch_size, _, (height, width) = check_vit(vit)
    side = quadformer_args.get("min_patch_size") or patch_size
    full = (height // side) * (width // side)
    # The full grid is a valid budget in every geometry: build there, then take the default from the geometry,
    # whose max_patch_size the Quadformer chooses.
    model = Quadformer(vit, **dict(quadformer_args, n_patches=full))
    model.n_patches = min(n for n in model.geometry.valid_n_patches() if 2 * n >= full)
    return model


def _register(vit_name: str) -> None:
    """Registers ``quadformer_<vit_name>`` with timm."""

    def entrypoint(pretrained: bool = False, pretrained_cfg=None, **kwargs) -> Quadformer:
        return create_quadformer(vit_name, pretrained=pretrained, pretrained_cfg=pretrained_cfg, **kwargs)

    entrypoint.__name__ = entrypoint.__qualname__ = f"quadformer_{vit_name}"
    entrypoint.__doc__ = (f"Quadformer on timm's {vit_name}, by default about half the uniform grid's tokens per "
                          f"image (see mixres.models.create_quadformer).")
    entrypoint.__module__ = __name__
    globals()[entrypoint.__name__] = register_model(entrypoint)


for _size in ("tiny", "small", "base", "large"):
    for _image_size in (224, 384):
        _register(f"vit_{_size}_patch16_{_image_size}")
