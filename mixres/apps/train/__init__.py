"""Fine-tunes a classifier (a Quadformer or any timm model) on one device, or on several under ``torchrun`` (DDP).

    python -m mixres.train --model quadformer_vit_small_patch16_224 --pretrained --n-patches 100 \\
        --data DIR --epochs 10 --batch-size 64 --lr 1e-4 --amp --output out/run1
    torchrun --standalone --nproc_per_node=8 -m mixres.train --model ... --output out/run1 [--resume auto]

``--data`` is a folder (``DIR/<class>/*.png``, or ``DIR/train/<class>/...`` and ``DIR/val/<class>/...``),
``small-objects`` (generated), or a timm dataset name such as ``torch/cifar10`` (see :mod:`mixres.apps.loaders`).
``--batch-size`` is per process: the global batch is that times the number of processes, and ``--lr`` is used as
given. AdamW (no weight decay on 1-D parameters, position tables and prefix tokens) with a per-step cosine schedule
after a linear warmup.

Writes to ``--output``: ``last.pt`` every epoch and ``best.pt`` on the best validation top-1 (model, optimizer,
scheduler, grad scaler, epoch, best top-1, arguments, number of processes); one row per epoch in ``log.csv`` and
``log.jsonl`` (epoch, lr of its last step, train_loss, val_loss, val_top1 and val_top5 (from 5 classes) in percent,
training images_per_s over all processes, seconds; with ``--skip-bad-images``, train_skipped and val_skipped, the
unreadable files left out). ``--resume auto`` continues from ``last.pt`` where there is one. A resumed run reads
the same batches in the same order as an uninterrupted one, and its random numbers are seeded per epoch, so with
``--workers 0`` it computes the same weights; with workers, the augmentations draw other random numbers after a
resume.

A resumed run continues the checkpoint's model: the options that make another one (``--model``, ``--model-kwargs``
other than dropout rates, ``--img-size``, ``--pos-embed``, ``--min-patch-size``, ``--max-patch-size``,
``--uniform-grid``, and the number of classes) must be the checkpoint's; ``--pretrained-file`` starts a new run
from its weights instead. The others take effect from the resumed epoch on: ``--epochs``, ``--lr``, ``--min-lr``,
``--warmup-epochs``, ``--weight-decay`` and ``--grad-clip`` as if the whole run had had them; ``--batch-size``, the
number of processes and the data set the steps per epoch, and the schedule continues at the epochs done times this
run's steps per epoch (a line says so when they differ from the checkpoint's); ``--n-patches``, ``--scorer``,
``--amp``, ``--seed``, ``--workers``...

The code, one job a module: :mod:`.options` (the command line), :mod:`.run` (:func:`main`: data, model, resume,
processes), :mod:`.loop` (the epochs and :func:`validate`), :mod:`.schedule` (the learning rate, and where a
resumed run picks it up), :mod:`.checkpoint` and :mod:`.log` (what a run writes), :mod:`.distributed` (devices,
process groups, sums across processes) and :mod:`.seeding` (each epoch's random numbers).
"""
from .checkpoint import CHECKPOINT_KEYS, read_checkpoint
from .distributed import weights_digest
from .loop import validate
from .options import build_parser, parse_args
from .run import main
from .schedule import warmup_cosine

__all__ = ["main", "build_parser", "parse_args", "warmup_cosine", "validate", "weights_digest", "read_checkpoint",
           "CHECKPOINT_KEYS"]
