"""Adaptive budgets in the commands (``--threshold``, ``--mean-tokens``): the sample of images a threshold is
calibrated on, the calibration of a Quadformer's threshold, and how both are shown and saved. ``mixres budgets``,
``python -m mixres.train`` and ``python -m mixres.evaluate`` share them."""
from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset, IterableDataset

from ..budgets import ThresholdCalibration, calibrate_threshold
from .loaders import evenly_spaced
from .options import format_threshold

__all__ = ["calibration_sample", "calibrate_model", "calibration_record", "describe_calibration", "check_mean_tokens",
           "adaptive_threshold"]


def calibration_sample(dataset: Dataset, count: int) -> Tensor:
    """At most ``count`` images of ``dataset`` (items ``(image [C, H, W], label)``), spread evenly over it (the first
    ones of an iterable dataset), stacked ``[K, C, H, W]`` on the CPU."""
    if isinstance(dataset, IterableDataset):
        items = itertools.islice(dataset, count)
    else:
        sample = evenly_spaced(dataset, count)
        items = (sample[index] for index in range(len(sample)))
    images = [image for image, _ in items]
    if not images:
        raise ValueError("the data holds no image to calibrate the threshold on")
    return torch.stack(images)


def check_mean_tokens(mean_tokens: float, n_roots: int, cap: int) -> str | None:
    """What is wrong with ``--mean-tokens`` for a quadtree of ``n_roots`` roots capped at ``cap`` leaves, or None."""
    if not n_roots <= mean_tokens <= cap:
        return (f"--mean-tokens {mean_tokens:g} must be from {n_roots} (the roots: no image has fewer leaves) to "
                f"{cap} (the cap, --n-patches)")
    return None


def calibrate_model(model: nn.Module, images: Tensor, mean_tokens: float, cap: int,
                    batch_size: int = 64) -> ThresholdCalibration:
    """The threshold of a :class:`mixres.models.Quadformer` whose mean token count on ``images [K, C, H, W]``
    (normalised as the model's inputs, on its device) is ``mean_tokens``, each image capped at ``cap`` leaves: its
    own scorer, patch sizes and nan_policy (:func:`mixres.calibrate_threshold`)."""
    return calibrate_threshold(model.score, images, mean_tokens, max_patches=cap,
                               min_patch_size=model.min_patch_size, max_patch_size=model.max_patch_size,
                               nan_policy=model.nan_policy, batch_size=batch_size)


def calibration_record(calibration: ThresholdCalibration, n_images: int) -> dict:
    """A calibration as JSON-ready values (what a checkpoint, ``budgets.json`` and ``mixres budgets --json`` hold)."""
    record = dataclasses.asdict(calibration)
    record["threshold_range"] = list(calibration.threshold_range)
    record["thresholds"] = {int(size): value for size, value in calibration.thresholds.items()}
    record["sample_images"] = n_images
    return record


def describe_calibration(calibration: ThresholdCalibration, n_images: int) -> str:
    """One line: the target, t, and the sample's mean, least and most tokens per image at t."""
    low, high = calibration.threshold_range
    return (f"--mean-tokens {calibration.target:g}: threshold {format_threshold(calibration.threshold)} (any in "
            f"[{low:.6g}, {high:.6g}) gives the same), {calibration.mean_tokens:.2f} tokens per image on average "
            f"(min {calibration.min_tokens}, max {calibration.max_tokens}, cap {calibration.max_patches}) over "
            f"{n_images} images")


@contextmanager
def adaptive_threshold(model: nn.Module, threshold) -> Iterator[nn.Module]:
    """The model with ``model.threshold = threshold`` inside the block, its own threshold back after it."""
    before = model.threshold
    model.threshold = threshold
    try:
        yield model
    finally:
        model.threshold = before
