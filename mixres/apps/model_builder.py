"""The model that ``python -m mixres.train`` and ``python -m mixres.evaluate`` build from their model options
(:func:`mixres.apps.options.add_model_options`), by :func:`mixres.models.create_model`."""
from __future__ import annotations

import argparse

from torch import nn

from .options import QUADFORMER_OPTIONS

__all__ = ["build_model"]


def build_model(args: argparse.Namespace, num_classes: int | None = None, load_pretrained: bool = True) -> nn.Module:
    """The model of the options that :func:`~mixres.apps.options.add_model_options` adds (checked by
    :func:`~mixres.apps.options.check_model_options`): :func:`mixres.models.create_model` with ``--model-kwargs``,
    the image size, the Quadformer options and the starting weights (``--pretrained``, ``--pretrained-file``; none
    when ``load_pretrained`` is False, as for a resumed run that reads its own); wrapped in a
    :class:`mixres.models.UniformGrid` for ``--uniform-grid``. ``num_classes``, where given, overrides
    ``--num-classes``."""
    from ..models import create_model

    kwargs = dict(args.model_kwargs)
    kwargs.update({name: getattr(args, name) for name in QUADFORMER_OPTIONS if getattr(args, name, None) is not None})
    num_classes = args.num_classes if num_classes is None else num_classes
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    model = create_model(args.model, pretrained=args.pretrained and load_pretrained,
                         pretrained_file=args.pretrained_file if load_pretrained else None, img_size=args.img_size,
                         **kwargs)
    if getattr(args, "uniform_grid", False):
        from ..models import UniformGrid, grid_for_budget

        model = UniformGrid(model, grid=grid_for_budget(model.n_patches, (model.geometry.height, model.geometry.width)))
    return model
