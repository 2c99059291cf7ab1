"""The ``mixres`` command: mosaics of image files, the tokenizer's throughput on this machine, and the valid budgets.

    mixres mosaic photo.jpg scans/*.png -n 100 --scorer pixel-blur -o out/mosaic
    mixres bench --device cuda --batch 256 --vit
    mixres bench --end-to-end --vit vit_small_patch16_224 --scorers pixel-blur,feature
    mixres budgets --size 224 --min 16 --max 32
    mixres budgets --size 224 --min 16 --max 32 --mean-tokens 64 100 --data /data/imagenet --scorer pixel-blur

``python -m mixres`` is the same command. Bad options, missing or unreadable images and an output folder that cannot
be written end with a one-line message and exit status 2, without a traceback.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor

from ..checks import RESIZE_MODES
from ..image_files import load_image
from ..budgets import calibrate_threshold
from ..mosaic import check_threshold, tokenize
from ..pyramid import QuadtreeGeometry, default_max_patch_size
from ..scorers import Random, create_scorer
from .fitting import fit_to_multiple, fitted_size, nearest_valid_n_patches
from .mosaic_files import save_mosaic
from .options import (COMMAND_LINE_SCORERS, POSITIVE, SIDE, HelpFormatter, Real, add_data_kwargs_option,
                      add_device_option, add_seed_option, add_threshold_option, format_threshold, json_object)
from .timing import device_name, format_throughput, kernel_label, median_seconds, throughput_row, time_tokenizer

__all__ = ["main", "build_parser", "load_image"]

BENCH_SCORERS = ("pixel-blur", "entropy", "random", "uniform")
DEFAULT_VIT = "vit_base_patch16_224"


# ----------------------------------------------------------------------------------------------- shared options
def _scorer_names(text: str) -> list[str]:
    """An argparse type: comma-separated scorer names (``pixel-blur,entropy``) -> their list."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in COMMAND_LINE_SCORERS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown scorer {unknown[0]!r}: choose from "
                                         f"{', '.join(COMMAND_LINE_SCORERS)}")
    return names


def _add_patch_options(parser: argparse.ArgumentParser, max_default: int | None = None) -> None:
    """Adds ``--min`` and ``--max`` (default ``max_default``; None: the image's default_max_patch_size)."""
    parser.add_argument("--min", type=SIDE, default=16, help="smallest leaf side, in pixels")
    default = f"default: {max_default}" if max_default is not None else \
        "default: the largest of 4, 2, 1 times --min that divides the image: 32 at 224 px, 64 at 256 px"
    parser.add_argument("--max", type=SIDE, default=max_default,
                        help=f"largest leaf side: --min times a power of two ({default})")


def _add_mode_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mode", default="area", choices=RESIZE_MODES, help="how leaves are resized to tokens")


def _geometry(parser: argparse.ArgumentParser, args: argparse.Namespace, height: int, width: int,
              options: str) -> QuadtreeGeometry:
    """The quadtree of ``height x width`` with ``--min`` and ``--max``; when they do not fit, a usage error that
    begins with ``options`` (the options at fault) and names the sizes that would fit."""
    try:
        return QuadtreeGeometry(height, width, args.min, args.max)
    except ValueError as error:
        parser.error(f"{options}: {error}")


def _writable_folder(parser: argparse.ArgumentParser, folder: Path, option: str) -> None:
    """Creates ``folder``; a usage error when it cannot be created or written to."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        parser.error(f"{option} {folder}: cannot create the folder: {error.strerror or error}")
    if not os.access(folder, os.W_OK | os.X_OK):
        parser.error(f"{option} {folder}: the folder is not writable")


def _size_geometry(parser: argparse.ArgumentParser, args: argparse.Namespace) -> QuadtreeGeometry:
    """The quadtree of ``--size`` x ``--width`` (``--size`` when not given) with ``--min`` and ``--max`` (when not
    given: :func:`mixres.pyramid.default_max_patch_size`, set in ``args``); usage errors as :func:`_geometry`'s."""
    height, width = args.size, args.width or args.size
    if args.max is None:
        args.max = default_max_patch_size(height, width, args.min)
    return _geometry(parser, args, height, width, f"{height}x{width} px with --min {args.min} --max {args.max}")


# --------------------------------------------------------------------------------------------------------- memory
# Bytes per pixel of an RGB float32 image, the unit of the memory estimates below.
FLOAT_PIXEL = 3 * 4


def _memory(device: torch.device) -> tuple[int, int | None]:
    """(total, available now or None where unknown) bytes of the memory that tensors on ``device`` use: the GPU's
    for CUDA, else this machine's (or its container's, where a cgroup limits it)."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return total, free
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        total = min(total, int(limit)) if limit.isdigit() else total
    except OSError:
        pass
    try:
        available = next(int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                         if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError, IndexError):
        available = None
    return total, available


def _require_memory(parser: argparse.ArgumentParser, needed: int, what: str, device: torch.device,
                    smaller: str) -> None:
    """A usage error when ``what`` needs (about) ``needed`` bytes on ``device``, more than it has (``smaller``
    says how to need less); a warning when more than it has free now."""
    total, available = _memory(device)
    where = "the GPU's" if device.type == "cuda" else "this machine's"
    if needed > total:
        parser.error(f"{what} needs about {needed / 2**30:,.1f} GiB of memory, more than {where} "
                     f"{total / 2**30:,.1f} GiB: {smaller}")
    if available is not None and needed > available:
        print(f"{parser.prog}: warning: {what} needs about {needed / 2**30:,.1f} GiB of memory, and "
              f"{available / 2**30:,.1f} GiB are free now", file=sys.stderr)


# --------------------------------------------------------------------------------------------------------- mosaic
def _check_path(parser: argparse.ArgumentParser, path: Path) -> None:
    """A usage error when ``path`` is missing or a folder."""
    if not path.exists():
        parser.error(f"{path}: no such file")
    if path.is_dir():
        parser.error(f"{path}: a folder, not an image (pass its files: {path}/*.jpg)")


def _read_image(parser: argparse.ArgumentParser, path: Path, show_warnings: bool = True) -> Tensor:
    """:func:`load_image`, with a usage error for a file that is missing or unreadable, and its warnings (several
    frames, Pillow's decompression-bomb warning) shown as one line each, or not at all."""
    _check_path(parser, path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            image = load_image(path)
        except ValueError as error:  # a mode or values that load_image refuses; its message names the file
            parser.error(str(error))
        # Pillow reports a file it cannot identify or decode as any of these, depending on the format.
        except (OSError, SyntaxError, Image.DecompressionBombError) as error:
            parser.error(f"{path}: cannot read it as an image: {error}")
    for warning in caught if show_warnings else ():
        text = str(warning.message)
        print(f"{parser.prog}: warning: {text if text.startswith(str(path)) else f'{path}: {text}'}", file=sys.stderr)
    return image


def _source_size(parser: argparse.ArgumentParser, path: Path) -> tuple[int, int]:
    """The height and width in an image file's header, before any pixel is decoded (EXIF orientation aside: it
    swaps them, which changes no memory estimate); a usage error as :func:`_read_image`'s."""
    _check_path(parser, path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # _read_image shows it
            with Image.open(path) as file:
                return file.height, file.width
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        parser.error(f"{path}: cannot read it as an image: {error}")


def _budget(parser: argparse.ArgumentParser, args: argparse.Namespace, path: Path, size: tuple[int, int]) -> int:
    """The leaves of one image of ``size`` (resized), or their cap with ``--threshold``: ``-n`` itself when
    reachable, else its nearest valid budget with ``--nearest`` and a usage error without; when ``-n`` is not given,
    about a third of the most leaves (with ``--threshold``, the most: no cap)."""
    geometry = QuadtreeGeometry(*size, args.min, args.max)
    if args.n_patches is None:
        return geometry.max_patches if args.threshold is not None else \
            nearest_valid_n_patches(geometry, geometry.max_patches / 3)
    if args.nearest:
        return nearest_valid_n_patches(geometry, args.n_patches)
    try:
        return geometry.check_n_patches(args.n_patches)
    except ValueError as error:
        parser.error(f"{path} (resized to {size[0]}x{size[1]}): {error}; or pass --nearest")


def _mosaic_bytes(source_pixels: int, pixels: int, batch: int) -> int:
    """About the most memory that ``mixres mosaic`` takes for a batch of ``batch`` images of ``pixels`` each,
    read from files of at most ``source_pixels``, counted in float32 RGB pixels: one image as read, its resizing
    (an intermediate and the result), the batch, its tokens (at most the batch's pixels) and the figure (8-bit,
    two thirds of one)."""
    return FLOAT_PIXEL * (source_pixels + (2 * batch + 2) * pixels)


def _mosaic(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """``mixres mosaic``: checks the options and every image, then reads, tokenizes and draws them in batches of
    one size and budget, and writes each one's figure and leaves."""
    _geometry(parser, args, args.max, args.max, f"--min {args.min} --max {args.max}")
    if args.size is not None:
        _geometry(parser, args, args.size, args.size, f"--size {args.size} with --max {args.max}")
    if args.threshold is not None:
        try:  # its sizes are the splittable ones, the same for every image
            check_threshold(args.threshold, QuadtreeGeometry(args.max, args.max, args.min, args.max))
        except (ValueError, TypeError) as error:
            parser.error(f"--threshold: {error}")
    stems: dict[str, Path] = {}
    for path in args.images:
        if path.stem in stems:
            parser.error(f"{stems[path.stem]} and {path} would both be written as {args.out / path.stem}.png: "
                         f"give images of one name in separate runs")
        stems[path.stem] = path
    try:
        scorer = create_scorer(args.scorer, args.min, args.max, **args.scorer_kwargs)
    except (ValueError, TypeError, OSError, RuntimeError) as error:
        parser.error(f"--scorer {args.scorer}: {error} (its arguments go in --scorer-kwargs)")

    # Every image is read and checked before anything is written, so that a bad one stops the run with nothing
    # half done; only its sizes are kept, and each batch is read again when its turn comes, so that memory holds
    # one batch, not every image.
    cpu = torch.device("cpu")
    sources, groups = [], {}  # groups: (height, width, n_patches) -> indices, first seen first
    for index, path in enumerate(args.images):
        source = _source_size(parser, path)
        size = fitted_size(*source, args.max, args.size)
        _require_memory(parser, _mosaic_bytes(math.prod(source), math.prod(size), 1),
                        f"{path} ({source[0]}x{source[1]} px, resized to {size[0]}x{size[1]})", cpu,
                        "lower --size or --max")
        source = tuple(_read_image(parser, path).shape[-2:])  # upright, as EXIF orientation turns it
        size = fitted_size(*source, args.max, args.size)
        sources.append(source)
        groups.setdefault((*size, _budget(parser, args, path, size)), []).append(index)
    for (height, width, _), indices in groups.items():
        batch, largest = min(args.batch, len(indices)), max(math.prod(sources[index]) for index in indices)
        what = f"a batch of {batch} images of {height}x{width} px (--batch {args.batch})"
        _require_memory(parser, _mosaic_bytes(largest, height * width, batch), what, cpu, "lower --batch")
        if args.device.type != "cpu":
            _require_memory(parser, _mosaic_bytes(0, height * width, batch), what, args.device, "lower --batch")
    _writable_folder(parser, args.out, "--out")

    counts = []  # each image's leaves, in the order printed
    for (height, width, n_patches), indices in groups.items():
        for start in range(0, len(indices), args.batch):
            chunk = indices[start:start + args.batch]
            images = _read_batch(parser, [args.images[index] for index in chunk], (height, width), args)
            mosaic = tokenize(images.to(args.device), scorer, n_patches, mode=args.mode, threshold=args.threshold)
            for position, index in enumerate(chunk):
                path, source = args.images[index], sources[index]
                try:
                    record = save_mosaic(images[position], mosaic, args.out, path.stem, args.max, position,
                                         image=str(path), source_size=list(source), scorer=repr(scorer),
                                         mode=args.mode,
                                         **({"threshold": args.threshold} if args.threshold is not None else {}))
                except OSError as error:
                    parser.exit(1, f"{parser.prog}: error: cannot write to {args.out}: {error}\n")
                leaves = ", ".join(f"{side} px: {count}" for side, count in record["leaves_per_size"].items())
                cap = f" of at most {record['max_patches']}" if "max_patches" in record else ""
                print(f"{path}: {source[0]}x{source[1]} -> {height}x{width}, n_patches={record['n_patches']}{cap} "
                      f"({leaves}): {args.out / path.stem}.png, .json")
                counts.append(record["n_patches"])
            del images, mosaic
    if args.threshold is not None and len(counts) > 1:
        print(f"{len(counts)} images, threshold {format_threshold(args.threshold)}: {sum(counts) / len(counts):.1f} "
              f"tokens per image on average (min {min(counts)}, max {max(counts)})")
    return 0


def _read_batch(parser: argparse.ArgumentParser, paths: Sequence[Path], size: tuple[int, int],
                args: argparse.Namespace) -> Tensor:
    """The images of ``paths``, each resized to ``size`` (:func:`mixres.apps.fitting.fit_to_multiple`), as one batch
    ``[B, 3, H, W]`` on the CPU, filled one image at a time (one alone is its own batch, without a copy)."""
    if len(paths) == 1:
        return fit_to_multiple(_read_image(parser, paths[0], False), args.max, args.size)[None]
    images = torch.empty(len(paths), 3, *size)
    for slot, path in zip(images, paths):
        slot.copy_(fit_to_multiple(_read_image(parser, path, False), args.max, args.size))
    return images


def _check_json_path(parser: argparse.ArgumentParser, path: Path | None) -> None:
    """A usage error when ``--json`` (None: not given) names a folder, or one that cannot be written."""
    if path is not None:
        if path.is_dir():
            parser.error(f"--json {path}: a folder; give a file name")
        _writable_folder(parser, path.parent, "--json")


def _write_json(parser: argparse.ArgumentParser, path: Path, results: dict) -> None:
    try:
        path.write_text(json.dumps(results, indent=2) + "\n")
    except OSError as error:
        parser.exit(1, f"{parser.prog}: error: cannot write {path}: {error}\n")


# ---------------------------------------------------------------------------------------------------------- bench
def _vit_dtype(device: torch.device) -> torch.dtype:
    """The dtype of the ViTs that ``mixres bench`` times: bf16 on CUDA (as benchmarks/test_cuda_costs.py times
    them), float32 elsewhere."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def _vit(parser: argparse.ArgumentParser, name: str, geometry: QuadtreeGeometry, n_patches: int,
         device: torch.device) -> torch.nn.Module:
    """The Quadformer on timm's ``name`` with random weights, for the images' geometry: bf16 on CUDA (as
    benchmarks/test_cuda_costs.py times it), float32 elsewhere; a usage error for a name that is no timm ViT."""
    import timm

    from ..models import create_model
    from ..models.factory import QUADFORMER_PREFIX

    if not timm.is_model(name):
        parser.error(f"--vit: unknown timm model {name!r}")
    try:
        model = create_model(QUADFORMER_PREFIX + name, img_size=(geometry.height, geometry.width),
                             n_patches=n_patches, min_patch_size=geometry.min_patch_size,
                             max_patch_size=geometry.max_patch_size, scorer="uniform")
    except (ValueError, TypeError, RuntimeError) as error:
        parser.error(f"--vit {name}: not a timm ViT that mixres.models.Quadformer can wrap: {error}")
    return model.to(device, _vit_dtype(device)).eval()


def _end_to_end_vit(parser: argparse.ArgumentParser, args: argparse.Namespace, geometry: QuadtreeGeometry,
                    device: torch.device) -> tuple[str, torch.nn.Module, int]:
    """(name, ViT, patch size) for ``--end-to-end``: the ``--vit`` model (:data:`DEFAULT_VIT` without ``--vit``)
    for the images' size, random weights, in :func:`_vit_dtype`. Usage errors, before anything is timed, for a
    model that is no timm ViT that a Quadformer can wrap, or whose patches do not tile the images."""
    import timm

    from ..models.quadformer import check_vit
    from .end_to_end import quadformer_around, random_vit

    name, (height, width) = args.vit or DEFAULT_VIT, (geometry.height, geometry.width)
    option = f"--vit {name}" if args.vit else f"--end-to-end (its default --vit {name})"
    if not timm.is_model(name):
        parser.error(f"{option}: unknown timm model")
    try:
        vit = random_vit(name, height, width, device, _vit_dtype(device))
        patch_size = check_vit(vit)[0]
    except (ValueError, TypeError, RuntimeError) as error:
        parser.error(f"{option}: not a timm ViT that mixres.models.Quadformer can wrap: {error}")
    if height % patch_size or width % patch_size:
        # timm would silently drop the pixels beyond the last whole patch.
        multiple = math.lcm(patch_size, geometry.max_patch_size)
        parser.error(f"--size/--width: {name} (--end-to-end) cuts images into {patch_size} px patches, which do not "
                     f"tile {height}x{width} px: give sides that are multiples of {multiple} (of {patch_size} and "
                     f"--max {geometry.max_patch_size})")
    try:  # what the timed Quadformers will be; the checks of the ViT that check_vit leaves to the Quadformer
        quadformer_around(vit, args.n_patches, "uniform", geometry.min_patch_size, geometry.max_patch_size, args.mode)
    except (ValueError, TypeError, RuntimeError) as error:
        parser.error(f"{option}: not a timm ViT that mixres.models.Quadformer can wrap: {error}")
    return name, vit, patch_size


def _end_to_end(args: argparse.Namespace, name: str, vit: torch.nn.Module, patch_size: int,
                geometry: QuadtreeGeometry, batch: int) -> list[dict]:
    """``--end-to-end``: for each of ``--scorers``, the ViT on its uniform grid against the Quadformer around a copy
    of it, timed in interleaved rounds (:mod:`mixres.apps.end_to_end`); prints the table and returns its rows."""
    from .end_to_end import format_end_to_end, normalised_random_images, quadformer_around, time_end_to_end

    height, width = geometry.height, geometry.width
    dtype = str(_vit_dtype(args.device)).removeprefix("torch.")
    vit_tokens = (height // patch_size) * (width // patch_size)
    images = normalised_random_images(vit, batch, height, width)
    print(f"\nend to end: {name} ({dtype}, random weights) on its {vit_tokens} tokens of {patch_size} px against "
          f"the Quadformer around the same weights\non n_patches={args.n_patches} leaves of {args.min}-{args.max} px "
          f"resized to {patch_size} px (pos_embed=resample, mode={args.mode}), {batch} random images a batch; "
          f"median of {args.repeats} interleaved rounds (ViT, scorer alone, Quadformer) after a warm-up")
    rows = []
    for scorer in args.scorers:
        model = quadformer_around(vit, args.n_patches, scorer, args.min, args.max, args.mode)
        row, _ = time_end_to_end(vit, model, images, args.repeats)
        rows.append({"scorer": scorer, "model": name, "dtype": dtype, "vit_tokens": vit_tokens,
                     "n_patches": args.n_patches, **row})
        del model  # one copy of the ViT at a time
    print(format_end_to_end(rows))
    print("ratio = ViT ms / Quadformer ms, the Quadformer's images/s over the ViT's (above 1: the Quadformer is "
          "faster);\nscorer share = the scorer's ms over the Quadformer's")
    return rows


def _bench(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """``mixres bench``: times the tokenizer, the reference, the scorers and optionally a ViT forward on one batch
    of random images, and prints the table; with ``--end-to-end``, then the ViT against the Quadformer."""
    geometry = _size_geometry(parser, args)
    height, width, device = geometry.height, geometry.width, args.device
    batch = args.batch or (256 if device.type == "cuda" else 16)
    try:
        geometry.check_n_patches(args.n_patches)
    except ValueError as error:
        parser.error(f"--n-patches: {error}")
    # The images, their tokens and the reference's temporaries: 2-3.6x the images measured (2 x 2048 px, CPU).
    _require_memory(parser, 4 * FLOAT_PIXEL * batch * height * width,
                    f"a batch of {batch} random {height}x{width} images", device, "lower --batch, --size or --width")
    _check_json_path(parser, args.json)
    model = _vit(parser, args.vit, geometry, args.n_patches, device) if args.vit else None
    end_to_end_vit = _end_to_end_vit(parser, args, geometry, device) if args.end_to_end else None

    scorers = {}
    for name in args.scorers:
        if name == "feature":
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="FeatureBased: backbone")  # the label says it instead
                scorer = create_scorer(name, args.min, args.max, random_init=True)
            scorers[name] = (f"scorer feature ({scorer.backbone_name}, random weights)", scorer)
        else:
            scorers[name] = (f"scorer {name}", create_scorer(name, args.min, args.max))
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(batch, 3, height, width, generator=generator).to(device)
    scores = Random(args.min, args.max, seed=0)(images)  # random pyramids, as the benchmarks/ suite uses

    print(f"mixres bench on {device} ({device_name(device)}), torch {torch.__version__}")
    print(f"{batch} random {height}x{width} RGB images a batch, n_patches={args.n_patches}, {args.min}-{args.max} px "
          f"leaves, mode={args.mode}; median of {args.repeats} timed batches after a warm-up")
    rows = time_tokenizer(images, scores, args.n_patches, args.min, args.max, scorers, mode=args.mode,
                          repeats=args.repeats)
    summary = []
    if model is not None:
        mosaic = tokenize(images, scores, args.n_patches, args.min, args.max, model.patch_size, args.mode)
        with torch.inference_mode():
            seconds = median_seconds(lambda: model(mosaic), device, args.repeats)
        dtype = "bf16" if device.type == "cuda" else "float32"
        rows.append(throughput_row("vit", f"{args.vit} forward ({dtype}, random weights)", seconds, batch,
                                   rows[0]["ms"] / 1e3))
        summary.append(f"mixres.tokenize costs {100 / rows[-1]['vs_tokenize']:.1f}% of the {args.vit} forward "
                       f"over its {args.n_patches} tokens")
    print("\n".join([format_throughput(rows), *summary]))
    results = {"rows": rows}
    if end_to_end_vit is not None:
        results["end_to_end"] = _end_to_end(args, *end_to_end_vit, geometry, batch)

    if args.json is not None:
        config = {"device": str(device), "device_name": device_name(device), "torch": torch.__version__,
                  "tokenize_runs": kernel_label(device), "batch": batch, "height": height, "width": width,
                  "n_patches": args.n_patches, "min_patch_size": args.min, "max_patch_size": args.max,
                  "mode": args.mode, "repeats": args.repeats}
        _write_json(parser, args.json, {"config": config, **results})
    return 0


# -------------------------------------------------------------------------------------------------------- budgets
# Up to this many budgets, ``mixres budgets`` lists them all; beyond, the first and last few (``--all``: all).
LISTED_BUDGETS = 1000
LINE_WIDTH = 100


def _lines_of_numbers(numbers: Iterable[int], width: int = LINE_WIDTH) -> Iterator[str]:
    """Space-separated numbers in lines of at most ``width`` characters (one alone where longer), built as they
    come: a range of millions is never held as a list or a string."""
    line = ""
    for number in numbers:
        word = str(number)
        if line and len(line) + 1 + len(word) > width:
            yield line
            line = word
        else:
            line = f"{line} {word}" if line else word
    if line:
        yield line


def _budgets(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """``mixres budgets``: prints the quadtree's root and leaf counts and the reachable ``n_patches``: all of them
    up to :data:`LISTED_BUDGETS` (or with ``--all``), else the first and last few. They are an arithmetic
    progression, so they are computed as they are printed, never held."""
    geometry = _size_geometry(parser, args)
    first, last = geometry.n_roots, geometry.max_patches
    count = (last - first) // 3 + 1
    if (args.mean_tokens is None) != (args.data is None):
        parser.error("--mean-tokens and --data go together: the threshold is calibrated on the images of --data"
                     if args.data is None else "--data is for --mean-tokens: give the mean token counts to calibrate")
    if args.mean_tokens is not None:
        return _calibrate(parser, args, geometry)
    if args.n_patches is not None or args.json is not None:
        parser.error(f"{'-n' if args.n_patches is not None else '--json'} is for the calibration: give --mean-tokens "
                     f"and --data")
    print(f"{geometry.height}x{geometry.width} px, {args.min}-{args.max} px leaves: {first} roots of {args.max} px, "
          f"at most {last} leaves of {args.min} px; n_patches = {first} + 3k (each split adds 3), {count} budgets:")
    if args.all or count <= LISTED_BUDGETS:
        for line in _lines_of_numbers(range(first, last + 1, 3)):
            print(line)
    else:
        head, tail = range(first, first + 15, 3), range(last - 12, last + 1, 3)
        print(f"{' '.join(map(str, head))} ... {' '.join(map(str, tail))}\n(--all lists every one)")
    return 0


def _calibrate(parser: argparse.ArgumentParser, args: argparse.Namespace, geometry: QuadtreeGeometry) -> int:
    """``mixres budgets --mean-tokens M... --data D``: the threshold of each mean token count on a sample of the
    images of ``--data`` (resized and centre-cropped to the quadtree's size), with ``--scorer``; prints each one's
    t and the sample's mean, least and most tokens per image, and writes them to ``--json``."""
    from .adaptive import calibration_record, calibration_sample, check_mean_tokens, describe_calibration
    from .loaders import UnreadableImageError, build_dataset, release_loader

    try:
        cap = geometry.max_patches if args.n_patches is None else geometry.check_n_patches(args.n_patches)
    except ValueError as error:
        parser.error(f"--n-patches: {error}")
    for mean_tokens in args.mean_tokens:
        problem = check_mean_tokens(mean_tokens, geometry.n_roots, cap)
        if problem:
            parser.error(problem)
    _check_json_path(parser, args.json)
    try:
        scorer = create_scorer(args.scorer, args.min, args.max, **args.scorer_kwargs)
    except (ValueError, TypeError, OSError, RuntimeError) as error:
        parser.error(f"--scorer {args.scorer}: {error} (its arguments go in --scorer-kwargs)")
    try:  # the scorers read images in [0, 1]: no normalisation
        dataset = build_dataset(args.data, args.split, (geometry.height, geometry.width), (0.0,) * 3, (1.0,) * 3,
                                train=False, length=args.calibration_images, seed=args.seed,
                                generator_kwargs=args.data_kwargs)
        images = calibration_sample(dataset, args.calibration_images).to(args.device)
    except UnreadableImageError as error:
        release_loader(error)
        parser.error(f"--data: {error.brief}")
    except (ValueError, TypeError, OSError) as error:
        parser.error(f"--data: {error}")
    print(f"{geometry.height}x{geometry.width} px, {args.min}-{args.max} px leaves ({geometry.n_roots} roots, cap "
          f"{cap}), scorer {args.scorer}, {images.shape[0]} images of {args.data} ({args.split}) on {args.device}:")
    records = []
    for mean_tokens in args.mean_tokens:
        calibration = calibrate_threshold(scorer, images, mean_tokens, max_patches=cap, batch_size=args.batch)
        records.append(calibration_record(calibration, images.shape[0]))
        print(describe_calibration(calibration, images.shape[0]))
    print("Give a threshold back as --threshold T (mixres mosaic, python -m mixres.train / mixres.evaluate), or "
          "tokenize(..., threshold=T)")
    if args.json is not None:
        config = {"data": str(args.data), "split": args.split, "images": images.shape[0], "height": geometry.height,
                  "width": geometry.width, "min_patch_size": args.min, "max_patch_size": args.max, "cap": cap,
                  "scorer": args.scorer, "scorer_kwargs": args.scorer_kwargs, "device": str(args.device)}
        _write_json(parser, args.json, {"config": config, "calibrations": records})
    return 0


# --------------------------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    """The ``mixres`` parser and its subcommands; each sets ``run(subparser, args) -> exit status``."""
    parser = argparse.ArgumentParser(
        prog="mixres", formatter_class=HelpFormatter,
        description="Mixed-resolution quadtree tokenization for ViTs: mosaics of image files, the tokenizer's "
                    "throughput on this machine, and the valid budgets.",
        epilog="mixres COMMAND --help describes each command. python -m mixres is the same command.")
    commands = parser.add_subparsers(title="commands", dest="command", required=True, metavar="COMMAND")

    mosaic = commands.add_parser(
        "mosaic", formatter_class=HelpFormatter, help="draw the mosaics of image files",
        description="For each image (any format Pillow reads, as RGB: 8-bit values / 255, 16-bit grey / 65535, "
                    "float as it is within [0, 1], alpha dropped; others refused): resize it so that both sides are "
                    "multiples of --max, tokenize it, and write OUT/<name>.png (its leaf borders on the photo, then "
                    "the mosaic rendered from its tokens) and OUT/<name>.json (image, source_size, height, width, the "
                    "patch sizes, n_patches, scorer, mode, leaves [[y, x, size], ...], leaves_per_size). Images of one "
                    "size are tokenized together; every image is checked before anything is written.")
    mosaic.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="image files")
    mosaic.add_argument("-n", "--n-patches", type=POSITIVE, default=None,
                        help="leaves per image, or their cap with --threshold; an unreachable budget is an error "
                             "naming the nearest valid ones (see mixres budgets) unless --nearest (default: the valid "
                             "budget nearest to a third of the most; with --threshold, the most)")
    add_threshold_option(mosaic, ": each image gets its own number of leaves, printed (mixres budgets --mean-tokens "
                                 "finds a T for a mean)")
    mosaic.add_argument("--nearest", action="store_true",
                        help="round -n to each image's nearest valid budget (the smaller on a tie)")
    mosaic.add_argument("--scorer", default="pixel-blur", choices=COMMAND_LINE_SCORERS, help="the leaves' scorer")
    mosaic.add_argument("--scorer-kwargs", type=json_object, default={}, metavar="JSON",
                        help='the scorer\'s arguments, a JSON object: \'{"weights": "shufflenet.pth"}\' for feature, '
                             '\'{"seed": 1}\' for random')
    _add_patch_options(mosaic, max_default=64)
    _add_mode_option(mosaic)
    mosaic.add_argument("--size", type=SIDE, default=None,
                        help="resize each image so that its short side is SIZE (a multiple of --max) and its long "
                             "side the nearest multiple of --max to its aspect ratio (default: keep the size, each "
                             "side rounded to its nearest multiple of --max, halves up, at least --max; an image "
                             "that fits is not resampled). Resizing is bilinear with antialiasing")
    mosaic.add_argument("--batch", type=POSITIVE, default=16,
                        help="images tokenized together, all of one size: memory holds one batch")
    add_device_option(mosaic)
    mosaic.add_argument("-o", "--out", type=Path, default=Path("out/mosaic"), help="output folder, created if needed")
    mosaic.set_defaults(run=_mosaic, parser=mosaic)

    bench = commands.add_parser(
        "bench", formatter_class=HelpFormatter, help="time the tokenizer and the scorers on this machine",
        description="Times, on one batch of random images and random score pyramids: mixres.tokenize (the compiled "
                    "ops) against mixres.reference.tokenize (plain PyTorch), each scorer, and with --vit a ViT "
                    "forward over the tokens; prints ms per batch, images/s and each time over the tokenizer's. "
                    "With --end-to-end, then the whole forward of a ViT against the Quadformer around the same "
                    "weights, for each scorer. "
                    "CUDA work is waited for before each time is read. The benchmarks/ suite (pytest-benchmark) "
                    "measures more.")
    add_device_option(bench)
    bench.add_argument("--batch", type=POSITIVE, default=None,
                       help="images per batch (default: 256 on CUDA, 16 on the CPU)")
    bench.add_argument("--size", type=SIDE, default=224, help="image height")
    bench.add_argument("--width", type=SIDE, default=None, help="image width (default: --size)")
    bench.add_argument("-n", "--n-patches", type=POSITIVE, default=100, help="leaves per image")
    _add_patch_options(bench)
    _add_mode_option(bench)
    bench.add_argument("--repeats", type=POSITIVE, default=5, help="timed batches of each; the median is shown")
    bench.add_argument("--scorers", type=_scorer_names, default=list(BENCH_SCORERS), metavar="NAMES",
                       help=f"comma-separated scorers to time, of {', '.join(COMMAND_LINE_SCORERS)}; feature runs "
                            f"with random weights, as labelled (its cost does not depend on them) (default: "
                            f"{','.join(BENCH_SCORERS)})")
    bench.add_argument("--vit", nargs="?", const=DEFAULT_VIT, default=None, metavar="MODEL",
                       help=f"also time a timm ViT's forward over the tokens (random weights; bf16 on CUDA, float32 "
                            f"elsewhere) and the tokenizer's share of it; --vit alone is {DEFAULT_VIT}")
    bench.add_argument("--end-to-end", action="store_true",
                       help=f"then, for each of --scorers, time the whole forward of the --vit model (without --vit: "
                            f"{DEFAULT_VIT}, as --vit alone) on its uniform grid of (H/p)(W/p) tokens of its patch "
                            f"size p, against the Quadformer around a copy of the same random weights reading -n "
                            f"leaves of --min to --max px resized to p px (pos_embed=resample, --mode), on random "
                            f"images normalised as the ViT's inputs; bf16 on CUDA (the feature scorer under bf16 "
                            f"autocast), float32 elsewhere. Rounds of ViT, scorer alone, Quadformer, --repeats of them "
                            f"after a warm-up; prints each one's median ms and images/s, ratio = ViT ms / Quadformer "
                            f"ms and the scorer's share of the Quadformer's ms. p must divide --size and --width; "
                            f"--min need not be p")
    bench.add_argument("--json", type=Path, default=None, metavar="PATH",
                       help="also write the results to PATH (with --end-to-end, its rows under \"end_to_end\")")
    bench.set_defaults(run=_bench, parser=bench)

    budgets = commands.add_parser(
        "budgets", formatter_class=HelpFormatter,
        help="list the valid n_patches of an image size, or calibrate adaptive budgets' thresholds",
        description="Lists the reachable n_patches of a quadtree over an image: from the grid of --max roots, "
                    "each split adds 3 leaves, up to the grid of --min leaves. With --mean-tokens and --data, "
                    "calibrates instead the threshold of adaptive budgets (mixres.calibrate_threshold) whose mean "
                    "token count per image is M on a sample of the images, with --scorer, and prints each t with "
                    "the sample's mean, least and most tokens per image.")
    budgets.add_argument("--size", type=SIDE, required=True, help="image height")
    budgets.add_argument("--width", type=SIDE, default=None, help="image width (default: --size)")
    _add_patch_options(budgets)
    budgets.add_argument("--all", action="store_true",
                         help=f"list every budget (default: all up to {LISTED_BUDGETS}, else the first and last "
                              f"few)")
    calibration = budgets.add_argument_group("calibration of adaptive budgets (--mean-tokens)")
    calibration.add_argument("--mean-tokens", type=Real(1), nargs="+", default=None, metavar="M",
                             help="the mean token counts per image to find thresholds for, from the roots' count to "
                                  "the cap -n")
    calibration.add_argument("--data", default=None,
                             help="the images: a folder of class sub-folders (or of split folders), small-objects "
                                  "(generated), or a timm dataset name (torch/cifar10, read under $MIXRES_DATA); "
                                  "resized and centre-cropped to --size x --width")
    calibration.add_argument("--split", default="val", help="the split of --data")
    add_data_kwargs_option(calibration)
    calibration.add_argument("--calibration-images", type=POSITIVE, default=256,
                             help="images of the sample, spread evenly over the data")
    calibration.add_argument("-n", "--n-patches", type=POSITIVE, default=None,
                             help="the cap N_max on each image's leaves (default: the most, no cap)")
    calibration.add_argument("--scorer", default="pixel-blur", choices=COMMAND_LINE_SCORERS,
                             help="the leaves' scorer")
    calibration.add_argument("--scorer-kwargs", type=json_object, default={}, metavar="JSON",
                             help="the scorer's arguments, a JSON object")
    calibration.add_argument("--batch", type=POSITIVE, default=64, help="images scored and split at a time")
    add_seed_option(calibration, "seed of generated data (small-objects)")
    add_device_option(calibration)
    calibration.add_argument("--json", type=Path, default=None, metavar="PATH",
                             help="also write the calibrations to PATH")
    budgets.set_defaults(run=_budgets, parser=budgets)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs ``mixres`` on ``argv`` (default: the command line) and returns its exit status: 0, 2 for a usage error
    (its message on stderr), 1 for a failure to write. Never raises SystemExit, so it can run in-process."""
    try:
        args = build_parser().parse_args(argv)
        return args.run(args.parser, args)
    except SystemExit as exit_:  # argparse exits on a usage error and after --help
        return exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
