"""Fine-tunes a classifier (a Quadformer or any timm model) on one device, or on several under ``torchrun`` (DDP):
``python -m mixres.train``, whose options and outputs :mod:`mixres.apps.train.options` describes.

The code, one job a module: :mod:`.options` (the command line and its usage), :mod:`.run` (:func:`main`: data,
model, resume, processes), :mod:`.loop` (the epochs and :func:`validate`), :mod:`.schedule` (the learning rate, and
where a resumed run picks it up), :mod:`.checkpoint` and :mod:`.log` (what a run writes), :mod:`.distributed`
(devices, process groups, sums across processes) and :mod:`.seeding` (each epoch's random numbers).
"""
from .checkpoint import CHECKPOINT_KEYS, read_checkpoint
from .distributed import weights_digest
from .loop import validate
from .options import build_parser, parse_args
from .run import main
from .schedule import warmup_cosine

__all__ = ["main", "build_parser", "parse_args", "warmup_cosine", "validate", "weights_digest", "read_checkpoint",
           "CHECKPOINT_KEYS"]
