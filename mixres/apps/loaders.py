"""Datasets and loaders for training and evaluation: an image folder, timm's dataset factory, or the small-objects
task of :mod:`mixres.datasets`; normalised as the model expects, split across processes under ``torchrun``."""
from __future__ import annotations

import itertools
import os
import traceback
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, Subset

from ..image_files import EIGHT_BIT_MODES, load_image

__all__ = ["build_dataset", "build_loader", "ShardSampler", "SMALL_OBJECTS", "MAX_SEED", "read_image",
           "UnreadableImageError", "release_loader", "skip_unreadable_images", "report_unreadable", "evenly_spaced"]

SMALL_OBJECTS = "small-objects"
# The largest seed: the training order seeds torch's generator with seed + epoch, and generated data its validation
# split with seed + 1, each of which must stay below 2**64 (torch's and numpy's limit); 2**63 - 1 leaves room.
MAX_SEED = 2**63 - 1
# The prefixes of timm's dataset factory (``torch/cifar10``, ``hfds/...``); any other source is a folder.
_TIMM_PREFIXES = ("torch", "hfds", "hfids", "tfds", "wds")


class UnreadableImageError(OSError):
    """An image file that cannot be read; its message names the file and the reason.

    Raised in a DataLoader worker, it reaches the main process as an UnreadableImageError too, whose message holds
    the worker's traceback, then this message: :attr:`brief` is the message alone either way."""

    @property
    def brief(self) -> str:
        text = str(self).strip()
        marker = f"{type(self).__name__}: "
        return text.rsplit(marker, 1)[-1] if "Original Traceback" in text and marker in text else text


def release_loader(error: BaseException) -> None:
    """Frees the DataLoader iterator that ``error`` (raised while iterating, e.g. an :class:`UnreadableImageError`
    from a worker) keeps alive through the frames of its traceback, so that its workers exit now.

    Those frames hold the error itself too: a reference cycle, which the garbage collector breaks later, and then it
    may finalise the workers' queues before the iterator, whose shutdown then waits 5 s for each worker that never
    hears it (measured: 10 s with 2 workers). Clearing the frames' variables frees the iterator at once, in order.
    """
    traceback.clear_frames(error.__traceback__)


def read_image(path: str | os.PathLike):
    """The image file at ``path``, read whole: an 8-bit image as an RGB ``PIL.Image`` (as torchvision's ImageFolder
    reads it), any other (16-bit grey, float...) as RGB float32 ``[3, H, W]`` in [0, 1] by
    :func:`mixres.image_files.load_image`, whose values are exact where ``convert("RGB")`` would clip them. The
    training and evaluation transforms take either.

    Raises:
        UnreadableImageError: the file cannot be read: not an image Pillow knows, truncated, corrupt, of a mode or
            values that :func:`~mixres.image_files.load_image` refuses... The message names the file and the reason.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with open(path, "rb") as file, Image.open(file) as picture:
            if picture.mode in EIGHT_BIT_MODES:
                return picture.convert("RGB")  # convert reads the whole image
        return load_image(path)
    except MemoryError:
        raise
    # Pillow's decoders report a bad file in many ways: OSError (truncated), SyntaxError (a broken PNG chunk),
    # ValueError, EOFError, zlib and struct errors, DecompressionBombError...
    except Exception as error:
        reason = "not an image file that Pillow can identify" if isinstance(error, UnidentifiedImageError) else \
            str(error).removeprefix(f"{path}: ") or type(error).__name__  # load_image's messages name the file
        raise UnreadableImageError(f"cannot read {path}: {reason}") from error


class _Readability(Dataset):
    """Item i: "" where ``paths[i]`` can be read, else why not (:func:`read_image`'s message)."""

    def __init__(self, paths: list[str]):
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> str:
        try:
            read_image(self.paths[index])
        except UnreadableImageError as error:
            return str(error)
        return ""


def skip_unreadable_images(dataset: Dataset, workers: int = 0, distributed: bool = False) -> tuple[Dataset, list[str]]:
    """``dataset`` (an image folder of :func:`build_dataset`, or a ``Subset`` of one) without the items whose
    files cannot be read, and why each was skipped (:func:`read_image`'s messages), in the dataset's order.

    Each file is read whole once, by ``workers`` loader processes; under DDP (``distributed``, the process group
    initialised) each process reads its share and they exchange what they found, so that all keep the same items.
    ``dataset`` itself is returned when every file can be read.

    Raises:
        ValueError: ``dataset`` is not an image folder (generated data, a timm dataset: no files to read).
    """
    folder, indices = (dataset.dataset, list(dataset.indices)) if isinstance(dataset, Subset) else \
        (dataset, list(range(len(dataset))))
    if not isinstance(getattr(folder, "samples", None), list):
        raise ValueError("skipping unreadable images is for image folders: this data has no image files")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    mine = range(rank, len(indices), world)
    probe = _Readability([folder.samples[indices[position]][0] for position in mine])
    loader = DataLoader(probe, batch_size=16, num_workers=workers, collate_fn=list)
    found = {position: problem for position, problem in zip(mine, itertools.chain.from_iterable(loader)) if problem}
    if distributed:
        shares = [None] * world
        dist.all_gather_object(shares, found)
        found = {position: problem for share in shares for position, problem in share.items()}
    if not found:
        return dataset, []
    kept = Subset(folder, [index for position, index in enumerate(indices) if position not in found])
    return kept, [found[position] for position in sorted(found)]


def report_unreadable(problems: list[str], total: int, what: str, shown: int = 10) -> str:
    """Lines for the user: how many of the ``total`` files of ``what`` (``"training images"``) were left out as
    unreadable (:func:`skip_unreadable_images`'s ``problems``), and the first ``shown`` reasons."""
    lines = [f"skipped {len(problems)} unreadable {what} of {total}" + (":" if problems else "")]
    lines += [f"  {problem}" for problem in problems[:shown]]
    if len(problems) > shown:
        lines.append(f"  ... and {len(problems) - shown} more")
    return "\n".join(lines)


def evenly_spaced(dataset: Dataset, limit: int) -> Dataset:
    """At most ``limit`` items spread over the whole dataset: a folder sorted by class gives every class."""
    if limit >= len(dataset):
        return dataset
    return Subset(dataset, [round(i * (len(dataset) - 1) / max(limit - 1, 1)) for i in range(limit)])


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
                  train: bool, length: int | None = None, seed: int = 0,
                  generator_kwargs: dict | None = None) -> Dataset:
    """A dataset of ``(image [3, H, W] normalised with mean and std, label)``.

    Args:
        source: one of

            - a folder of class sub-folders (torchvision's ImageFolder layout; every split reads it), or a folder
              holding ``split`` as such a folder (``root/train/<class>/*.jpg``, ``root/val/<class>/*.jpg``).
              Its files are read by :func:`read_image`: one that cannot be read raises an
              :class:`UnreadableImageError` naming it (:func:`skip_unreadable_images` leaves such files out);
            - ``"small-objects"``: :class:`mixres.datasets.SmallObjects`, generated (needs scikit-image);
            - a name for timm's dataset factory (``timm.data.create_dataset``) with its prefix (``torch/``,
              ``hfds/``, ``hfids/``, ``tfds/``, ``wds/``), e.g. ``"torch/cifar10"``, whose files are looked up
              under ``$MIXRES_DATA`` (default ``./data``). Nothing is downloaded.
        split: ``"train"`` or ``"val"`` (timm names such as ``"validation"`` are passed through).
        image_size: the model's input size, an int or (H, W).
        mean, std: the model's per-channel normalisation (``model.pretrained_cfg["mean"]``, ``["std"]``).
        train: training augmentation (timm's ``create_transform``: random resized crop and flip) rather than the
            evaluation resize and centre crop. Generated small-objects images are never augmented.
        length: items of a generated split (small-objects only; default 10000 for train, 2000 for val).
        seed: the generated split's seed (small-objects only).
        generator_kwargs: more :class:`mixres.datasets.SmallObjects` arguments (small-objects only), e.g.
            ``{"object_size": [20, 28]}``.
    """
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if str(source) == SMALL_OBJECTS:
        from ..datasets import SmallObjects

        if size[0] != size[1]:
            raise ValueError(f"small-objects images are square; got image_size {size}")
        length = length if length is not None else (10000 if split == "train" else 2000)
        generated = SmallObjects(split=split, length=length, image_size=size[0], seed=seed, **(generator_kwargs or {}))
        return _Normalized(generated, mean, std)
    if generator_kwargs:
        raise ValueError(f"generator arguments are for {SMALL_OBJECTS!r} data, not {str(source)!r}")

    from timm.data import create_dataset, create_transform

    transform = create_transform(input_size=(3, *size), is_training=train, mean=mean, std=std,
                                 crop_pct=1.0 if train else 0.875)
    # Only a prefixed name goes to timm's factory, which reads any other (a bare "torch" too) as a folder under
    # $MIXRES_DATA: a missing folder would read another one instead of failing.
    prefix, slash, _ = str(source).partition("/")
    if slash and prefix.lower() in _TIMM_PREFIXES:
        root = os.environ.get("MIXRES_DATA", "data")
        return create_dataset(str(source), root=root, split=split, is_training=train, download=False,
                              transform=transform)
    path = Path(source)
    if not path.is_dir():
        raise FileNotFoundError(f"dataset {str(source)!r}: no such folder, and neither {SMALL_OBJECTS!r} nor a timm "
                                f"dataset name with its prefix ({', '.join(p + '/' for p in _TIMM_PREFIXES)}), such "
                                f"as 'torch/cifar10'")
    from torchvision.datasets import ImageFolder

    if (path / split).is_dir():
        return ImageFolder(str(path / split), transform=transform, loader=read_image)
    if any((path / name).is_dir() for name in ("train", "val", "validation", "test")):
        # A folder of splits lacking this one: reading it as a folder of classes would make a class of each split.
        raise FileNotFoundError(f"{path} holds split folders but no {split!r} one")
    return ImageFolder(str(path), transform=transform, loader=read_image)


def build_loader(dataset: Dataset, batch_size: int, train: bool, workers: int = 0, distributed: bool = False,
                 seed: int = 0) -> DataLoader:
    """A loader over ``dataset``; under DDP (``distributed``, the process group initialised) each process reads
    its own shard.

    Training shuffles by a ``DistributedSampler`` (one replica without DDP) and drops the last partial batch: call
    ``loader.sampler.set_epoch(epoch)`` every epoch. Its order is a function of ``seed`` and the epoch alone, so a
    run resumed at some epoch reads what an uninterrupted one reads. Evaluation reads every item exactly once, in
    order, across the processes (:class:`ShardSampler`), so that sums over the processes count each item once.
    ``seed``: an int from 0 to :data:`MAX_SEED`.
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed must be an int from 0 to 2**63 - 1, got {seed!r}")
    if train:
        replicas = {} if distributed else dict(num_replicas=1, rank=0)
        sampler = DistributedSampler(dataset, shuffle=True, seed=seed, drop_last=True, **replicas)
    else:
        sampler = ShardSampler(dataset) if distributed else None
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      pin_memory=torch.cuda.is_available(), drop_last=train, generator=generator,
                      persistent_workers=workers > 0)


class ShardSampler(Sampler[int]):
    """This process's share of a dataset for evaluation under DDP: items ``rank, rank + world, ...``.

    Unlike ``DistributedSampler``, which pads the shards to one length by repeating items (counting them twice in
    the metrics), the shards differ in length by at most one, so every process may run a different number of
    batches: evaluate without collectives in the forward (the model unwrapped from DDP).
    """

    def __init__(self, dataset: Dataset, num_replicas: int | None = None, rank: int | None = None):
        self.length = len(dataset)
        self.num_replicas = dist.get_world_size() if num_replicas is None else num_replicas
        self.rank = dist.get_rank() if rank is None else rank

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.length, self.num_replicas))

    def __len__(self) -> int:
        return len(range(self.rank, self.length, self.num_replicas))
