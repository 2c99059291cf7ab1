"""The command line of ``python -m mixres.train``: its parser, and the checks that relate one option to another."""
from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch

from ..options import (POSITIVE, HelpFormatter, Real, add_amp_option, add_data_kwargs_option, add_model_options,
                       add_seed_option, add_workers_option, check_model_options)

__all__ = ["build_parser", "parse_args"]


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m mixres.train``; its description is the first line of :mod:`mixres.apps.train`'s
    docstring."""
    from . import __doc__ as usage

    parser = argparse.ArgumentParser(prog="python -m mixres.train", description=usage.splitlines()[0],
                                     formatter_class=HelpFormatter)
    add_model_options(parser, num_classes_default="the training set's classes")
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
