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
``--threshold``, ``--mean-tokens``, ``--amp``, ``--seed``, ``--workers``...

Adaptive budgets: ``--threshold T`` or ``--mean-tokens M`` (calibrated once on a sample of the training images)
give each image its own number of leaves, capped at ``--n-patches``; see the option group's help.

This module holds its parser and the checks that relate one option to another.
"""
from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch

from ..options import (POSITIVE, HelpFormatter, Real, add_adaptive_options, add_amp_option, add_data_kwargs_option,
                       add_model_options, add_seed_option, add_workers_option, check_adaptive_options,
                       check_model_options)

__all__ = ["build_parser", "parse_args"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m mixres.train", description=__doc__.splitlines()[0],
                                     formatter_class=HelpFormatter)
    add_model_options(parser, num_classes_default="the training set's classes")
    adaptive = parser.add_argument_group(
        "adaptive budgets (Quadformer; --n-patches is the cap)",
        "Each image gets its own number of leaves, at most --n-patches; the model trains and validates on padded "
        "mosaics with masked attention and pooling. --mean-tokens calibrates the threshold once, at the start, on "
        "--calibration-images training images (the evaluation transform, no augmentation); the threshold is printed, "
        "logged (threshold in log.jsonl and log.csv) and saved in the checkpoints, where python -m mixres.evaluate "
        "finds it. A resumed run with the checkpoint's --mean-tokens and cap keeps the checkpoint's threshold.")
    add_adaptive_options(adaptive)
    data = parser.add_argument_group("data")
    data.add_argument("--data", required=True, help="a folder, small-objects, or a timm dataset name")
    data.add_argument("--train-split", default="train")
    data.add_argument("--val-split", default="val")
    data.add_argument("--train-length", type=POSITIVE, default=None, help="generated training images (small-objects)")
    data.add_argument("--val-length", type=POSITIVE, default=None, help="generated validation images (small-objects)")
    add_data_kwargs_option(data)
    data.add_argument("--skip-bad-images", action="store_true",
                      help="leave out image files that cannot be read (each file is read once before training, by "
                           "--workers processes), and count them in the log (train_skipped, val_skipped); without "
                           "it, the first unreadable file stops the run with its name")
    data.add_argument("--no-augment", action="store_true",
                      help="train on the evaluation transform (resize and centre crop) instead of random crops, "
                           "flips and colour jitter")
    add_workers_option(data, "data-loading processes per training process")

    training = parser.add_argument_group("training")
    training.add_argument("--epochs", type=POSITIVE, default=10)
    training.add_argument("--batch-size", type=POSITIVE, default=64, help="per process")
    # AdamW moves each weight by about lr a step: above 1 nothing can be learnt.
    training.add_argument("--lr", type=Real(0, 1, inclusive=False), default=1e-4,
                          help="peak learning rate, reached after the warmup")
    training.add_argument("--min-lr", type=Real(0, 1), default=0.0,
                          help="learning rate at the end of the cosine, at most --lr")
    training.add_argument("--weight-decay", type=Real(0), default=0.05,
                          help="AdamW's decoupled weight decay; times --lr below 1")
    training.add_argument("--warmup-epochs", type=Real(0), default=1.0,
                          help="linear warmup, may be fractional; at most --epochs")
    training.add_argument("--grad-clip", type=Real(0, inclusive=False), default=None,
                          help="clip the gradients' global norm to this")
    add_amp_option(training, note=" (CUDA only; it adds a gradient scaler)")
    training.add_argument("--compile", action="store_true", help="torch.compile the model")
    add_seed_option(training)
    training.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                          help="under torchrun, each process takes the device of its LOCAL_RANK")

    output = parser.add_argument_group("output")
    output.add_argument("--output", type=Path, default=Path("out/train"), help="checkpoints and logs")
    output.add_argument("--resume", default=None,
                        help="a checkpoint to continue from, or 'auto': OUTPUT/last.pt if it exists")
    return parser


def parse_args(argv: Sequence[str] | None = None,
               parser: argparse.ArgumentParser | None = None) -> argparse.Namespace:
    """The options of :func:`main`, checked before anything is loaded: an unknown model, Quadformer options for
    another model, a missing file... exit with a usage error (status 2). ``--resume auto`` becomes a path or
    None, and ``args.quadformer`` says whether the model is a Quadformer."""
    parser = parser or build_parser()
    args = parser.parse_args(argv)
    check_model_options(parser, args)
    check_adaptive_options(parser, args)
    # Each option's own range is its type's; these relate two options.
    if args.min_lr > args.lr:
        parser.error(f"--min-lr {args.min_lr:g} must be at most --lr {args.lr:g}: the cosine goes down to it")
    if args.weight_decay * args.lr >= 1:
        parser.error(f"--weight-decay {args.weight_decay:g} times --lr {args.lr:g} must be below 1: AdamW scales "
                     f"every weight by 1 - lr * weight_decay each step")
    if args.warmup_epochs > args.epochs:
        parser.error(f"--warmup-epochs {args.warmup_epochs:g} must be at most --epochs {args.epochs}")
    if args.amp == "fp16" and not args.device.startswith("cuda"):
        parser.error("--amp fp16 is for CUDA devices; use --amp bf16 on the CPU")
    if args.resume == "auto":
        last = args.output / "last.pt"
        args.resume = last if last.is_file() else None
    elif args.resume is not None:
        args.resume = Path(args.resume)
        if not args.resume.is_file():
            parser.error(f"--resume {args.resume}: no such checkpoint")
    return args
