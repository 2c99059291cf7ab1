"""Fine-tunes a classifier (a Quadformer or any timm model) on one device, or on several under ``torchrun`` (DDP).

    python -m mixres.train --model quadformer_vit_small_patch16_224 --pretrained --n-patches 100 \\
        --data DIR --epochs 10 --batch-size 64 --lr 1e-4 --amp --output out/run1
    torchrun --standalone --nproc_per_node=8 -m mixres.train --model ... --output out/run1 [--resume auto]

``--data`` is a folder (``DIR/<class>/*.png``, or ``DIR/train/<class>/...`` and ``DIR/val/<class>/...``),
``small-objects`` (generated), or a timm dataset name such as ``torch/cifar10`` (see :mod:`mixres.data`).
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
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import os
import random
import shutil
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR

from ...checkpoints import explain_mismatch, read_torch_file
from ..loaders import (UnreadableImageError, build_dataset, build_loader, release_loader, report_unreadable,
                       skip_unreadable_images)
from ..model_builder import build_model
from ..options import (POSITIVE, HelpFormatter, Real, add_amp_option, add_data_kwargs_option, add_model_options,
                       add_seed_option, add_workers_option, autocast, check_model_options)

__all__ = ["main", "parse_args", "warmup_cosine", "evaluate", "weights_digest", "read_checkpoint", "CHECKPOINT_KEYS"]

LOG_FIELDS = ("epoch", "lr", "train_loss", "val_loss", "val_top1", "val_top5", "images_per_s", "seconds",
              "train_skipped", "val_skipped")
CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "scaler", "epoch", "best_top1", "metrics", "args")
# The options that make another model than the checkpoint's, which a resumed run must keep (its weights and the
# optimizer's moments are that model's), beside --model and the number of classes.
RESUME_MODEL_OPTIONS = ("model_kwargs", "img_size", "pos_embed", "min_patch_size", "max_patch_size", "uniform_grid")
# timm arguments in --model-kwargs that only regularise training: a resumed run may change them.
_REGULARISERS = frozenset({"drop_rate", "drop_path_rate", "attn_drop_rate", "proj_drop_rate", "pos_drop_rate",
                           "patch_drop_rate"})


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m mixres.train", description=__doc__.splitlines()[0],
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
    parser = parser or _parser()
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


# --------------------------------------------------------------------------------------------------- the data
def _data_config(args: argparse.Namespace) -> tuple[tuple[int, int], tuple, tuple]:
    """(image size (H, W), mean, std), known before the model is built (which needs the classes, which need the
    dataset, which needs the size and normalisation)."""
    from timm.data import resolve_data_config

    from ...models.factory import pretrained_cfg

    size = args.img_size if args.img_size is not None else args.model_kwargs.get("img_size")
    size = (size, size) if isinstance(size, int) else tuple(size) if size is not None else None
    data_cfg = resolve_data_config({"input_size": (3, *size)} if size else {},
                                   pretrained_cfg=pretrained_cfg(args.model))
    return tuple(data_cfg["input_size"][1:]), data_cfg["mean"], data_cfg["std"]


def _count_classes(dataset) -> int | None:
    """The classes of a dataset (ImageFolder, torchvision's, small-objects), or None where it does not say."""
    for candidate in (dataset, getattr(dataset, "dataset", None)):
        if isinstance(getattr(candidate, "num_classes", None), int):
            return candidate.num_classes
        if getattr(candidate, "classes", None) is not None:
            return len(candidate.classes)
    return None


# ------------------------------------------------------------------------------------------ optimisation parts
def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int,
                  min_lr_ratio: float = 0.0) -> LambdaLR:
    """A per-step schedule: the learning rate rises linearly to its base value over ``warmup_steps`` steps
    (``base * (step + 1) / warmup_steps``, never 0), then follows a half cosine down to ``base * min_lr_ratio``
    at ``total_steps``. Call ``scheduler.step()`` after every optimiser step. Its state is the step count alone,
    and the learning rate a function of it, so a resumed run follows the same curve."""
    warmup_steps = min(warmup_steps, total_steps - 1)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min((step - warmup_steps) / max(total_steps - warmup_steps, 1), 1.0)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)


def _seed_epoch(seed: int, epoch: int, rank: int) -> None:
    """Seeds every generator that augmentations, dropout or a random scorer may draw from, per (seed, epoch,
    rank): an epoch's random numbers do not depend on the epochs before it, so a resumed run draws the same."""
    state = np.random.SeedSequence([seed, epoch, rank]).generate_state(2)
    random.seed(int(state[0]))
    np.random.seed(int(state[1]))
    torch.manual_seed(int(state[0]))


def _reduce_sum(tensor: Tensor) -> Tensor:
    """The sum over the processes (the tensor itself without DDP)."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, amp: str | None = None) -> dict:
    """Mean cross-entropy and top-1 (and top-5, with at least 5 classes) accuracy in percent over the items of
    ``loader``, summed exactly across the processes: under DDP, each process reads its own shard once
    (:func:`mixres.data.build_loader`), and the sums of losses, hits and items are all-reduced. ``model`` must not
    be DDP-wrapped, since the shards may differ in batches by one. ``amp``: an ``--amp`` value, or None."""
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top-1 hits, top-5 hits, items
    num_classes = None
    for images, labels in loader:
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with autocast(device, amp):
            logits = model(images)
        logits = logits.float()
        num_classes = logits.shape[1]
        hits = logits.topk(min(5, num_classes), dim=1).indices == labels[:, None]
        totals += torch.stack([F.cross_entropy(logits, labels, reduction="sum").double(),
                               hits[:, 0].sum().double(), hits.sum().double(),
                               torch.tensor(len(labels), dtype=torch.float64, device=device)])
    loss, top1, top5, count = _reduce_sum(totals).tolist()
    if count == 0:
        raise ValueError("the validation set is empty")
    metrics = {"val_loss": loss / count, "val_top1": 100 * top1 / count}
    if num_classes is None:  # this process's shard was empty: the model tells the classes
        num_classes = getattr(model, "num_classes", 0)
    if num_classes >= 5:
        metrics["val_top5"] = 100 * top5 / count
    return metrics


def weights_digest(model: nn.Module) -> str:
    """A SHA-256 of the model's state dict (names, dtypes, shapes and bytes): equal digests, equal weights."""
    digest = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        value = value.detach().cpu().contiguous()
        digest.update(f"{name} {value.dtype} {tuple(value.shape)}".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())  # 0-d: BatchNorm's counter
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------- files and DDP
def read_checkpoint(path: str | os.PathLike) -> dict:
    """A checkpoint that this script wrote (``last.pt``, ``best.pt``), checked to be a whole one: the
    :data:`CHECKPOINT_KEYS`, each of its kind.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file cannot be read (empty, truncated...: :func:`mixres.checkpoints.read_torch_file`), or
            is no such checkpoint (a plain state dict, another program's file, keys missing); the message names
            the file and what is wrong.
    """
    state = read_torch_file(path)
    if not isinstance(state, dict):
        raise ValueError(f"{path} is not a checkpoint of python -m mixres.train: it holds a {type(state).__name__}")
    missing = [key for key in CHECKPOINT_KEYS if key not in state]
    if missing:
        if state and all(isinstance(value, Tensor) for value in state.values()):
            raise ValueError(f"{path} is not a checkpoint of python -m mixres.train but a state dict of weights "
                             f"alone: start a new run from it with --pretrained-file {path}")
        raise ValueError(f"{path} is not a whole checkpoint of python -m mixres.train: it lacks "
                         f"{', '.join(missing)}")
    kinds = {"model": isinstance(state["model"], dict) and all(isinstance(value, Tensor)
                                                                for value in state["model"].values()),
             "optimizer": isinstance(state["optimizer"], dict) and {"state", "param_groups"} <= set(state["optimizer"]),
             "scheduler": isinstance(state["scheduler"], dict) and isinstance(state["scheduler"].get("last_epoch"),
                                                                              int),
             "scaler": isinstance(state["scaler"], dict),
             "epoch": isinstance(state["epoch"], int) and state["epoch"] >= 1,
             "best_top1": isinstance(state["best_top1"], (int, float)),
             "metrics": isinstance(state["metrics"], dict),
             "args": isinstance(state["args"], dict) and isinstance(state["args"].get("model"), str)}
    wrong = [key for key, right in kinds.items() if not right]
    if wrong:
        raise ValueError(f"{path} is not a whole checkpoint of python -m mixres.train: its {', '.join(wrong)} "
                         f"{'is' if len(wrong) == 1 else 'are'} not what this script writes")
    return state


def _check_resumable(parser: argparse.ArgumentParser, args: argparse.Namespace, checkpoint: dict) -> None:
    """A usage error where this run's options make another model than the checkpoint's (see the module's
    docstring): it names the option, the checkpoint's value and this run's."""
    saved = checkpoint["args"]
    if saved["model"] != args.model:
        parser.error(f"--resume {args.resume} holds a {saved['model']}, not a {args.model}")

    def value(options: dict | argparse.Namespace, name: str):
        found = options.get(name, parser.get_default(name)) if isinstance(options, dict) else getattr(options, name)
        if name == "model_kwargs":
            return {key: item for key, item in (found or {}).items() if key not in _REGULARISERS}
        return found

    def show(name: str, found) -> str:
        if isinstance(found, bool):
            return "given" if found else "not given"
        return "not given" if found is None else json.dumps(found) if isinstance(found, dict) else str(found)

    for name in RESUME_MODEL_OPTIONS:
        before, now = value(saved, name), value(args, name)
        if before != now:
            option = f"--{name.replace('_', '-')}"
            parser.error(f"--resume {args.resume}: {option} is {show(name, before)} in the checkpoint and "
                         f"{show(name, now)} in this run; a resumed run continues the checkpoint's model: give "
                         f"its {option}, or start a new run from its weights with --pretrained-file {args.resume}")


def _restore_optimizer(optimizer: torch.optim.Optimizer, scheduler: LambdaLR, checkpoint: dict, step: int) -> None:
    """Loads the optimizer's state (AdamW's moments and step counts) from ``checkpoint``, keeping this run's
    hyperparameters (``--lr``, ``--weight-decay``), and puts the schedule (this run's: ``--epochs``,
    ``--warmup-epochs``, ``--min-lr``) at ``step``: the epochs done times this run's steps per epoch, which another
    batch size or number of processes changes. With nothing changed, this is the checkpoint's own step and
    learning rate, bit for bit."""
    settings = [{key: value for key, value in group.items() if key != "params"} for group in optimizer.param_groups]
    optimizer.load_state_dict(checkpoint["optimizer"])
    for group, setting in zip(optimizer.param_groups, settings):
        group.update(setting)
    scheduler.load_state_dict(checkpoint["scheduler"])  # its counters
    scheduler.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
    scheduler.last_epoch = step
    # What LambdaLR.step() computes at this step.
    for group, base_lr, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base_lr * factor(step)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def _save(path: Path, state: dict) -> None:
    """Writes a checkpoint whole or not at all: a run killed while saving keeps the previous file."""
    partial = path.with_suffix(".tmp")
    torch.save(state, partial)
    os.replace(partial, path)


def _append_log(output: Path, row: dict) -> None:
    with open(output / "log.jsonl", "a") as file:
        file.write(json.dumps(row) + "\n")
    csv_path = output / "log.csv"
    new = not csv_path.exists() or csv_path.stat().st_size == 0
    fields = [field for field in LOG_FIELDS if field in row]
    if not new:  # a resumed run keeps the file's columns, should its options add or drop some (log.jsonl has all)
        with open(csv_path, newline="") as file:
            fields = next(csv.reader(file), fields)
    with open(csv_path, "a", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=fields, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerow(row)


def _setup_device(args: argparse.Namespace) -> tuple[torch.device, int, int]:
    """(device, rank, world size). Under torchrun (WORLD_SIZE > 1) each process takes the device of its
    LOCAL_RANK and joins the process group: NCCL on CUDA, Gloo on the CPU."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    device = torch.device(args.device)
    if world == 1:
        return device, 0, 1
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    return device, dist.get_rank(), world


# ------------------------------------------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> dict:
    """Trains as the module docstring says. Returns the last epoch's row of the log (the same on every process),
    with ``best_val_top1``, ``weights_sha256`` (of the final weights) and, under DDP, ``replicas_identical``
    (whether every process ended with the same weights)."""
    parser = _parser()
    args = parse_args(argv, parser)

    image_size, mean, std = _data_config(args)
    try:
        train_set = build_dataset(args.data, args.train_split, image_size, mean, std, train=not args.no_augment,
                                  length=args.train_length, seed=args.seed, generator_kwargs=args.data_kwargs)
        val_set = build_dataset(args.data, args.val_split, image_size, mean, std, train=False,
                                length=args.val_length, seed=args.seed + 1, generator_kwargs=args.data_kwargs)
    except (ValueError, TypeError, OSError) as error:
        parser.error(f"--data: {error}")
    num_classes = args.num_classes if args.num_classes is not None else _count_classes(train_set)
    if num_classes is None:
        parser.error(f"--data {args.data} does not say how many classes it has: give --num-classes")
    val_classes = _count_classes(val_set)
    if val_classes is not None and val_classes != num_classes:
        parser.error(f"the validation split has {val_classes} classes and the model {num_classes} (--num-classes, "
                     f"else the training split's)")

    checkpoint = None
    if args.resume is not None:
        try:
            checkpoint = read_checkpoint(args.resume)
        except (ValueError, OSError) as error:
            parser.error(f"--resume: {error}")
        _check_resumable(parser, args, checkpoint)
    torch.manual_seed(args.seed)  # the same initial weights in every process
    try:
        model = build_model(args, num_classes, load_pretrained=checkpoint is None)
    except (ValueError, TypeError, RuntimeError, OSError) as error:
        parser.error(f"cannot build {args.model}: {error}")
    if checkpoint is not None:
        problem = explain_mismatch(model.state_dict(), checkpoint["model"])
        if problem:
            parser.error(f"--resume {args.resume}: its weights do not fit this run's {args.model} ({num_classes} "
                         f"classes, from --num-classes or the training set): {problem}")
        model.load_state_dict(checkpoint["model"])

    device, rank, world = _setup_device(args)
    try:
        skipped = {}
        if args.skip_bad_images:
            sizes = len(train_set), len(val_set)
            try:
                train_set, bad_train = skip_unreadable_images(train_set, args.workers, distributed=world > 1)
                val_set, bad_val = skip_unreadable_images(val_set, args.workers, distributed=world > 1)
            except ValueError as error:
                parser.error(f"--skip-bad-images: {error} (--data {args.data})")
            skipped = {"train_skipped": len(bad_train), "val_skipped": len(bad_val)}
            if rank == 0:
                print(report_unreadable(bad_train, sizes[0], "training images"))
                print(report_unreadable(bad_val, sizes[1], "validation images"), flush=True)
        return _train(args, model, train_set, val_set, device, rank, world, checkpoint, skipped)
    except UnreadableImageError as error:
        release_loader(error)
        parser.error(f"--data: {error.brief} (--skip-bad-images leaves unreadable files out)")
    finally:
        if world > 1:
            dist.destroy_process_group()


def _train(args: argparse.Namespace, model: nn.Module, train_set, val_set, device: torch.device, rank: int,
           world: int, checkpoint: dict | None, skipped: dict) -> dict:
    from timm.optim import create_optimizer_v2
    from tqdm import tqdm

    distributed = world > 1
    train_loader = build_loader(train_set, args.batch_size, train=True, workers=args.workers,
                                distributed=distributed, seed=args.seed)
    val_loader = build_loader(val_set, args.batch_size, train=False, workers=args.workers, distributed=distributed)
    steps_per_epoch = len(train_loader)
    if steps_per_epoch == 0:
        raise ValueError(f"the training set ({len(train_set)} images) is smaller than one global batch "
                         f"({args.batch_size} x {world} processes)")

    model.to(device)
    # Built on the bare model: timm reads its no_weight_decay() names, and leaves 1-D parameters undecayed too.
    optimizer = create_optimizer_v2(model, "adamw", lr=args.lr, weight_decay=args.weight_decay)
    total_steps = args.epochs * steps_per_epoch
    scheduler = warmup_cosine(optimizer, total_steps, round(args.warmup_epochs * steps_per_epoch),
                              args.min_lr / args.lr)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    start_epoch, best_top1, row = 0, -math.inf, {}
    if checkpoint is not None:
        start_epoch, best_top1, row = checkpoint["epoch"], checkpoint["best_top1"], checkpoint["metrics"]
        step = start_epoch * steps_per_epoch
        _restore_optimizer(optimizer, scheduler, checkpoint, step)
        if checkpoint["scaler"] and scaler.is_enabled():  # a scale learnt under --amp fp16, for --amp fp16
            scaler.load_state_dict(checkpoint["scaler"])
        if rank == 0:
            lr = optimizer.param_groups[0]["lr"]
            print(f"resumed from {args.resume} after epoch {start_epoch} (best val top-1 {best_top1:.2f}): step "
                  f"{step} of {total_steps}, lr {lr:.4g}")
            saved_batch, saved_world = checkpoint["args"].get("batch_size"), checkpoint.get("world_size")
            if saved_batch != args.batch_size or saved_world not in (None, world) \
                    or checkpoint["scheduler"]["last_epoch"] != step:
                print(f"rescheduled: the checkpoint's run took {saved_batch} x {saved_world or '?'} images per step "
                      f"(batch size x processes) and stopped at step {checkpoint['scheduler']['last_epoch']}; this "
                      f"run takes {args.batch_size} x {world} in {steps_per_epoch} steps per epoch, so its schedule "
                      f"continues at step {step} of {total_steps} (the end of epoch {start_epoch}), lr {lr:.4g}")
            if start_epoch >= args.epochs:
                print(f"nothing to train: the checkpoint has done {start_epoch} epochs, and --epochs is "
                      f"{args.epochs}; give a larger --epochs to train on")

    # The Quadformer's scorer has no parameters and every parameter gets a gradient (the ViT's position table is
    # cut to what is used), so DDP need not look for unused parameters.
    net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if distributed else model
    train_net = torch.compile(net) if args.compile else net
    eval_net = torch.compile(model) if args.compile else model
    if rank == 0:
        args.output.mkdir(parents=True, exist_ok=True)
        grid = getattr(model, "grid", None)
        what = f"{args.model}, uniform-grid baseline of {grid[0]}x{grid[1]} tokens" if grid else args.model
        print(f"training {what} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters) on "
              f"{world} x {device.type}, {len(train_set)} training and {len(val_set)} validation images, "
              f"{steps_per_epoch} steps per epoch of {args.batch_size} x {world} images")
    saved_args = {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()}

    for epoch in range(start_epoch, args.epochs):
        started = time.perf_counter()
        _seed_epoch(args.seed, epoch, rank)
        train_loader.sampler.set_epoch(epoch)
        train_net.train()
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        bar = tqdm(train_loader, desc=f"epoch {epoch + 1}/{args.epochs}", leave=False,
                   disable=rank != 0 or not sys.stderr.isatty())
        for step, (images, labels) in enumerate(bar):
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            with autocast(device, args.amp):
                loss = F.cross_entropy(train_net(images), labels)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if args.grad_clip is not None:
                scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
                nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            lr = optimizer.param_groups[0]["lr"]
            scheduler.step()
            loss_sum += loss.detach().double()
            if step % 10 == 0 and not bar.disable:
                bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr:.3g}")
        train_seconds = time.perf_counter() - started
        train_loss = _reduce_sum(loss_sum).item() / (steps_per_epoch * world)
        if not math.isfinite(train_loss):
            raise FloatingPointError(f"epoch {epoch + 1}: the training loss is {train_loss}; no checkpoint written")

        metrics = evaluate(eval_net, val_loader, device, args.amp)
        row = {"epoch": epoch + 1, "lr": lr, "train_loss": train_loss, **metrics,
               "images_per_s": steps_per_epoch * args.batch_size * world / train_seconds,
               "seconds": time.perf_counter() - started, **skipped}
        is_best = metrics["val_top1"] > best_top1
        best_top1 = max(best_top1, metrics["val_top1"])
        if rank == 0:
            _append_log(args.output, row)
            _save(args.output / "last.pt", {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "epoch": epoch + 1,
                "best_top1": best_top1, "metrics": row, "args": saved_args, "world_size": world})
            if is_best:
                shutil.copyfile(args.output / "last.pt", args.output / "best.tmp")
                os.replace(args.output / "best.tmp", args.output / "best.pt")
            print(" ".join(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}"
                           for key, value in row.items()) + ("  (best)" if is_best else ""), flush=True)

    result = {**row, "best_val_top1": best_top1, "weights_sha256": weights_digest(model)}
    if distributed:
        digests = [None] * world
        dist.all_gather_object(digests, result["weights_sha256"])
        result["replicas_identical"] = len(set(digests)) == 1
        if rank == 0 and not result["replicas_identical"]:
            warnings.warn(f"the processes ended with different weights: {digests}", stacklevel=1)
        dist.barrier()  # no process leaves (and tears down the group) while another still saves or reduces
    if rank == 0:
        print(f"done: best val top-1 {best_top1:.2f}, weights sha256 {result['weights_sha256'][:16]}"
              + (f", identical on all {world} processes" if result.get("replicas_identical") else ""), flush=True)
    return result


if __name__ == "__main__":
    main()
