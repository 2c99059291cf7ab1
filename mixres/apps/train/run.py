"""``python -m mixres.train``'s :func:`main`: its options, data and model, a checkpoint to resume, the processes,
then the training loop."""
from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch
import torch.distributed as dist

from ...checkpoints import explain_mismatch
from ..loaders import (UnreadableImageError, build_dataset, release_loader, report_unreadable,
                       skip_unreadable_images)
from ..model_builder import build_model
from .checkpoint import check_resumable, read_checkpoint
from .distributed import setup_device
from .loop import train_epochs
from .options import build_parser, parse_args

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> dict:
    """Trains as :mod:`mixres.apps.train.options`' docstring says. Returns the last epoch's row of the log (the
    same on every process), with ``best_val_top1``, ``weights_sha256`` (of the final weights) and, under DDP,
    ``replicas_identical`` (whether every process ended with the same weights)."""
    parser = build_parser()
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
        check_resumable(parser, args, checkpoint)
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

    device, rank, world = setup_device(args)
    try:
        args.calibration = _set_adaptive_budgets(parser, args, model, device, rank, world, checkpoint,
                                                 (image_size, mean, std))
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
        return train_epochs(args, model, train_set, val_set, device, rank, world, checkpoint, skipped)
    except UnreadableImageError as error:
        release_loader(error)
        parser.error(f"--data: {error.brief} (--skip-bad-images leaves unreadable files out)")
    finally:
        if world > 1:
            dist.destroy_process_group()


def _set_adaptive_budgets(parser: argparse.ArgumentParser, args: argparse.Namespace, model, device: torch.device,
                          rank: int, world: int, checkpoint: dict | None, data_config: tuple) -> dict | None:
    """Sets ``model.threshold`` from ``--threshold``, or from ``--mean-tokens``: calibrated on a sample of the
    training images (the evaluation transform), or the checkpoint's calibration where it was for the same mean and
    cap. Returns the calibration's record (None without ``--mean-tokens``), the same in every process."""
    from ...mosaic import check_threshold
    from ..adaptive import calibrate_model, calibration_record, calibration_sample, check_mean_tokens, \
        describe_calibration

    if args.threshold is not None:
        try:
            check_threshold(args.threshold, model.geometry)
        except (ValueError, TypeError) as error:
            parser.error(f"--threshold: {error}")
        model.threshold = args.threshold
        return None
    if args.mean_tokens is None:
        return None
    cap = model.n_patches
    problem = check_mean_tokens(args.mean_tokens, model.geometry.n_roots, cap)
    if problem:
        parser.error(problem)
    saved = checkpoint["args"].get("calibration") if checkpoint is not None else None
    if saved and saved["target"] == args.mean_tokens and saved["max_patches"] == cap:
        record = saved
        if rank == 0:
            print(f"the checkpoint's calibration: threshold {record['threshold']!r}, {record['mean_tokens']:.2f} "
                  f"tokens per image on average over {record['sample_images']} training images", flush=True)
    else:
        image_size, mean, std = data_config
        sample = build_dataset(args.data, args.train_split, image_size, mean, std, train=False,
                               length=args.train_length, seed=args.seed, generator_kwargs=args.data_kwargs)
        images = calibration_sample(sample, args.calibration_images).to(device)
        calibration = calibrate_model(model.to(device), images, args.mean_tokens, cap, args.batch_size)
        record = calibration_record(calibration, images.shape[0])
        if world > 1:  # each process computes the same; rank 0's is the one they all keep
            shared = [record]
            dist.broadcast_object_list(shared, src=0)
            record = shared[0]
        if rank == 0:
            print(f"calibrated on the training images: {describe_calibration(calibration, images.shape[0])}",
                  flush=True)
    model.threshold = record["threshold"]
    return record


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
