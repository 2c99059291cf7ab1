"""The training loop of ``python -m mixres.train``: its epochs of steps, each followed by validation, a log row
and a checkpoint."""
from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..loaders import build_loader
from ...checks import is_number
from ..options import autocast, format_threshold
from .checkpoint import save_checkpoint
from .distributed import reduce_sum, weights_digest
from .log import append_log
from .schedule import restore_optimizer, warmup_cosine
from .seeding import seed_epoch

__all__ = ["train_epochs", "validate"]


def train_epochs(args: argparse.Namespace, model: nn.Module, train_set, val_set, device: torch.device, rank: int,
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
        restore_optimizer(optimizer, scheduler, checkpoint, step)
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
        seed_epoch(args.seed, epoch, rank)
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
        train_loss = reduce_sum(loss_sum).item() / (steps_per_epoch * world)
        if not math.isfinite(train_loss):
            raise FloatingPointError(f"epoch {epoch + 1}: the training loss is {train_loss}; no checkpoint written")

        metrics = validate(eval_net, val_loader, device, args.amp)
        row = {"epoch": epoch + 1, "lr": lr, "train_loss": train_loss, **metrics,
               "images_per_s": steps_per_epoch * args.batch_size * world / train_seconds,
               "seconds": time.perf_counter() - started, **skipped}
        if getattr(model, "threshold", None) is not None:
            row["threshold"] = model.threshold if is_number(model.threshold) else format_threshold(model.threshold)
        is_best = metrics["val_top1"] > best_top1
        best_top1 = max(best_top1, metrics["val_top1"])
        if rank == 0:
            append_log(args.output, row)
            save_checkpoint(args.output / "last.pt", {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "epoch": epoch + 1,
                "best_top1": best_top1, "metrics": row, "args": saved_args, "world_size": world,
                "threshold": getattr(model, "threshold", None)})
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


@torch.no_grad()
def validate(model: nn.Module, loader, device: torch.device, amp: str | None = None) -> dict:
    """Mean cross-entropy and top-1 (and top-5, with at least 5 classes) accuracy in percent over the items of
    ``loader``, summed exactly across the processes: under DDP, each process reads its own shard once
    (:func:`mixres.apps.loaders.build_loader`), and the sums of losses, hits and items are all-reduced. ``model``
    must not be DDP-wrapped, since the shards may differ in batches by one. ``amp``: an ``--amp`` value, or None."""
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
    loss, top1, top5, count = reduce_sum(totals).tolist()
    if count == 0:
        raise ValueError("the validation set is empty")
    metrics = {"val_loss": loss / count, "val_top1": 100 * top1 / count}
    if num_classes is None:  # this process's shard was empty: the model tells the classes
        num_classes = getattr(model, "num_classes", 0)
    if num_classes >= 5:
        metrics["val_top5"] = 100 * top5 / count
    return metrics
