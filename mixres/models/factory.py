"""Models by name, with weights from a local file: any timm model, or a Quadformer around any timm ViT.

>>> model = create_model("quadformer_deit3_small_patch16_224", num_classes=10, pretrained_file="deit3_s.pth")

``quadformer_<name>`` is :func:`mixres.models.create_quadformer` on the timm ViT ``<name>`` (registered with timm or
not); any other name is ``timm.create_model(name)``. This is what ``python -m mixres.train`` and
``python -m mixres.evaluate`` build from their model options.
"""
from __future__ import annotations

import os
import warnings

from torch import nn

from ..checkpoints import explain_mismatch, read_state_dict
from .quadformer import Quadformer
from .registry import create_quadformer

__all__ = ["create_model", "load_weights", "read_state_dict", "pretrained_cfg", "QUADFORMER_PREFIX"]

QUADFORMER_PREFIX = "quadformer_"


def pretrained_cfg(name: str) -> dict:
    """timm's pretrained cfg of a model name, pretrained tag or not (a Quadformer's is its ViT's); {} where there
    is none."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name.removeprefix(QUADFORMER_PREFIX))
    return cfg.to_dict() if cfg is not None else {}


def create_model(name: str, *, pretrained: bool = False, pretrained_file: str | os.PathLike | None = None,
                 num_classes: int | None = None, img_size: int | tuple[int, int] | None = None,
                 **kwargs) -> nn.Module:
    """A timm model, or a Quadformer for a ``quadformer_<timm ViT name>``, with its starting weights.

    Args:
        name: a timm model name, pretrained tag or not; ``quadformer_`` + a timm ViT name for a Quadformer.
        pretrained: timm's pretrained weights (downloaded, or from timm's cache).
        pretrained_file: a state dict file to start from instead (see :func:`read_state_dict`). A Quadformer loads
            a plain ViT's or a Quadformer's by :func:`load_weights` (``pretrained=True``: a classifier of another
            number of classes and learned xy tables the file lacks keep their initialisation, with a warning).
            Any other model loads it through timm's pretrained loading, which resamples a ViT's position table to
            the image size and replaces a classifier of another number of classes.
        num_classes: classifier outputs (default: timm's).
        img_size: the input size of models that fix theirs (ViTs, so Quadformers); ignored for the others (timm's
            CNNs take any size and have no such argument).
        **kwargs: more ``timm.create_model`` arguments; for a Quadformer, :func:`create_quadformer`'s (``n_patches``,
            ``scorer``, ``pos_embed``...).
    """
    import timm

    cfg = pretrained_cfg(name)
    quadformer = name.startswith(QUADFORMER_PREFIX)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if img_size is not None and (quadformer or cfg.get("fixed_input_size")):
        kwargs["img_size"] = img_size
    if quadformer:
        # A file is loaded into the built Quadformer, whose load_state_dict adapts a plain ViT's keys and position
        # table; it replaces timm's weights, so those are not fetched.
        model = create_quadformer(name.removeprefix(QUADFORMER_PREFIX),
                                  pretrained=pretrained and pretrained_file is None, **kwargs)
        if pretrained_file is not None:
            load_weights(model, pretrained_file, pretrained=True)
        return model
    if pretrained_file is not None:
        state = read_state_dict(pretrained_file)
        overlay = dict(state_dict=state)
        classifier = cfg.get("classifier", "head")
        head = state.get(f"{classifier}.weight") if isinstance(classifier, str) else None
        if head is not None:
            # timm replaces the classifier when the model's classes differ from the cfg's; the file's own
            # classifier is what to compare with (a fine-tuned file of 10 classes keeps its head for 10).
            overlay["num_classes"] = head.shape[0]
        try:
            return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
        except RuntimeError as error:
            # timm's strict load lists every weight that differs: say which configuration differs instead.
            problem = explain_mismatch(timm.create_model(name, **kwargs).state_dict(), state)
            raise RuntimeError(f"{pretrained_file}: these weights do not fit the {name}: {problem or error}") from None
    return timm.create_model(name, pretrained=pretrained, **kwargs)


def load_weights(model: Quadformer, path: str | os.PathLike, pretrained: bool = False) -> None:
    """Loads a plain timm ViT's state dict, a Quadformer's or a UniformGrid's, from ``path`` (see
    :func:`read_state_dict`) into a Quadformer (plain ViT keys go under ``vit.``, the position tables are adapted
    to the model's image size: ``Quadformer.load_state_dict``).

    Every weight must match, except with ``pretrained``: then a classifier of another number of classes, and
    learned xy position tables the file lacks, are left at their initialisation, and learned xy tables the model
    has no use for (``pos_embed="xy"``) are left out, with a warning.

    Raises:
        FileNotFoundError, ValueError: the file cannot be read (:func:`read_state_dict`).
        RuntimeError: the weights do not fit the model; the message names the file and the configuration that
            differs (classes, embedding width, depth, position embedding...).
    """
    state = read_state_dict(path)
    new, unused = [], []
    try:
        if pretrained:
            model.adapt_state_dict(state)
            own = model.state_dict()
            for key in list(state):
                if key.startswith("xy_embed.") and key not in own:
                    unused.append(key)
                    del state[key]
                elif key.startswith("vit.head.") and key in own and state[key].shape != own[key].shape:
                    del state[key]
            new = [key for key in own if key not in state and key.startswith(("vit.head.", "xy_embed."))]
            state.update({key: own[key] for key in new})  # left as they are
        model.load_state_dict(state)
    except RuntimeError as error:
        raise RuntimeError(f"{path}: {error}") from None
    if new:
        warnings.warn(f"{path}: {', '.join(new)} left at their random initialisation (the file has none of this "
                      f"shape): they mean nothing until trained", stacklevel=2)
    if unused:
        warnings.warn(f"{path}: {', '.join(unused)} not used (the model has pos_embed={model.pos_embed_kind!r})",
                      stacklevel=2)
