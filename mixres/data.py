"""Datasets and loaders for training and evaluation: an image folder, timm's dataset factory, or the small-objects
task of :mod:`mixres.datasets`; normalised as the model expects, split across processes under ``torchrun``."""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler

__all__ = ["build_dataset", "build_loader", "SMALL_OBJECTS"]

SMALL_OBJECTS = "small-objects"


class _Normalized(Dataset):
    """Items ``(image [C, H, W] in [0, 1], label)`` -> ``((image - mean) / std, label)``."""

    def __init__(self, dataset: Dataset, mean, std):
        self.dataset = dataset
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image, label = self.dataset[index][:2]
        return (image - self.mean) / self.std, label


def build_dataset(source: str | os.PathLike, split: str, image_size: int | tuple[int, int], mean, std,
                  train: bool, length: int | None = None, seed: int = 0) -> Dataset:
    """A dataset of ``(image [3, H, W] normalised with mean and std, label)``.

    Args:
        source: one of

            - a folder of class sub-folders (torchvision's ImageFolder layout), or a folder holding ``split``
              as such a folder (``root/train/<class>/*.jpg``, ``root/val/<class>/*.jpg``);
            - ``"small-objects"``: :class:`mixres.datasets.SmallObjects`, generated (needs scikit-image);
            - a name for timm's dataset factory (``timm.data.create_dataset``), e.g. ``"torch/cifar10"``, whose
              files are looked up under ``$MIXRES_DATA`` (default ``./data``). Nothing is downloaded.
        split: ``"train"`` or ``"val"`` (timm names such as ``"validation"`` are passed through).
        image_size: the model's input size, an int or (H, W).
        mean, std: the model's per-channel normalisation (``model.pretrained_cfg["mean"]``, ``["std"]``).
        train: training augmentation (timm's ``create_transform``: random resized crop and flip) rather than the
            evaluation resize and centre crop. Generated small-objects images are never augmented.
        length: items of a generated split (small-objects only; default 10000 for train, 2000 for val).
        seed: the generated split's seed (small-objects only).
    """
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if str(source) == SMALL_OBJECTS:
        from .datasets import SmallObjects

        if size[0] != size[1]:
            raise ValueError(f"small-objects images are square; got image_size {size}")
        length = length if length is not None else (10000 if split == "train" else 2000)
        return _Normalized(SmallObjects(split=split, length=length, image_size=size[0], seed=seed), mean, std)

    from timm.data import create_dataset, create_transform

    transform = create_transform(input_size=(3, *size), is_training=train, mean=mean, std=std,
                                 crop_pct=1.0 if train else 0.875)
    path = Path(source)
    if path.is_dir():
        from torchvision.datasets import ImageFolder

        root = path / split if (path / split).is_dir() else path
        return ImageFolder(str(root), transform=transform)
    if "/" not in str(source):
        raise ValueError(f"dataset {str(source)!r} is neither a folder, nor {SMALL_OBJECTS!r}, nor a timm dataset "
                         f"name such as 'torch/cifar10'")
    root = os.environ.get("MIXRES_DATA", "data")
    return create_dataset(str(source), root=root, split=split, is_training=train, download=False,
                          transform=transform)


def build_loader(dataset: Dataset, batch_size: int, train: bool, workers: int = 0, distributed: bool = False,
                 seed: int = 0) -> DataLoader:
    """A loader over ``dataset``; under DDP each process reads its own shard (``DistributedSampler``; call
    ``loader.sampler.set_epoch(epoch)`` every epoch so that training shuffles differently)."""
    sampler = DistributedSampler(dataset, shuffle=train, seed=seed, drop_last=train) if distributed else None
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=train and sampler is None, sampler=sampler,
                      num_workers=workers, pin_memory=torch.cuda.is_available(), drop_last=train,
                      generator=generator, persistent_workers=workers > 0)
