"""The ``mixres`` command: mosaics of image files, the tokenizer's throughput on this machine, and the valid budgets.

    mixres mosaic photo.jpg scans/*.png -n 100 --scorer pixel-blur -o out/mosaic
    mixres bench --device cuda --batch 256 --vit
    mixres budgets --size 224 --min 16 --max 32

``python -m mixres`` is the same command. Bad options, missing or unreadable images and an output folder that cannot
be written end with a one-line message and exit status 2, without a traceback.
"""
from __future__ import annotations

import argparse
import json
import os
import textwrap
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor

from ._args import COMMAND_LINE_SCORERS, HelpFormatter, add_device_option, json_object, require_at_least
from ._timing import device_name, format_throughput, kernel_label, median_seconds, throughput_row, time_tokenizer
from .demo import fit_to_multiple, nearest_valid_n_patches, save_mosaic
from .mosaic import tokenize
from .pyramid import QuadtreeGeometry, default_max_patch_size
from .scorers import Random, create_scorer

__all__ = ["main", "build_parser", "load_image"]

BENCH_SCORERS = ("pixel-blur", "entropy", "random", "uniform")
DEFAULT_VIT = "vit_base_patch16_224"


def load_image(path: str | os.PathLike) -> Tensor:
    """An image file, in any format Pillow reads, as RGB ``[3, H, W]`` float32 in [0, 1]: turned upright by its
    EXIF orientation, grey and palette images expanded to RGB, an alpha channel dropped."""
    with Image.open(path) as file:
        picture = ImageOps.exif_transpose(file).convert("RGB")
    return torch.from_numpy(np.array(picture)).permute(2, 0, 1).float() / 255


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
    parser.add_argument("--min", type=int, default=16, help="smallest leaf side, in pixels")
    default = f"default: {max_default}" if max_default is not None else \
        "default: the largest of 4, 2, 1 times --min that divides the image: 32 at 224 px, 64 at 256 px"
    parser.add_argument("--max", type=int, default=max_default,
                        help=f"largest leaf side: --min times a power of two ({default})")


def _add_mode_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mode", default="area", choices=("area", "bilinear"), help="how leaves are resized to tokens")


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
    require_at_least(parser, args, 1, ("size", "width"))
    height, width = args.size, args.width or args.size
    if args.max is None:
        args.max = default_max_patch_size(height, width, args.min)
    return _geometry(parser, args, height, width, f"{height}x{width} px with --min {args.min} --max {args.max}")


# --------------------------------------------------------------------------------------------------------- mosaic
def _read_images(parser: argparse.ArgumentParser, paths: Sequence[Path]) -> Iterator[Tensor]:
    """Each image of ``paths`` in turn (see :func:`load_image`); a usage error for the first that is missing or
    unreadable."""
    for path in paths:
        if not path.exists():
            parser.error(f"{path}: no such file")
        if path.is_dir():
            parser.error(f"{path}: a folder, not an image (pass its files: {path}/*.jpg)")
        try:
            image = load_image(path)
        # Pillow reports a file it cannot identify or decode as any of these, depending on the format.
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
            parser.error(f"{path}: cannot read it as an image: {error}")
        yield image


def _budget(parser: argparse.ArgumentParser, args: argparse.Namespace, path: Path, size: tuple[int, int]) -> int:
    """The leaves of one image of ``size`` (resized): ``-n`` itself when reachable, else its nearest valid budget
    with ``--nearest`` and a usage error without; about a third of the most leaves when ``-n`` is not given."""
    geometry = QuadtreeGeometry(*size, args.min, args.max)
    if args.n_patches is None:
        return nearest_valid_n_patches(geometry, geometry.max_patches / 3)
    if args.nearest:
        return nearest_valid_n_patches(geometry, args.n_patches)
    try:
        return geometry.check_n_patches(args.n_patches)
    except ValueError as error:
        parser.error(f"{path} (resized to {size[0]}x{size[1]}): {error}; or pass --nearest")


def _mosaic(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """``mixres mosaic``: checks the options and reads every image, then tokenizes them in batches of one size and
    budget, and writes each one's figure and leaves."""
    require_at_least(parser, args, 1, ("n_patches", "batch"))
    _geometry(parser, args, args.max, args.max, f"--min {args.min} --max {args.max}")
    if args.size is not None:
        _geometry(parser, args, args.size, args.size, f"--size {args.size} with --max {args.max}")
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

    # Every image is read before anything is written, so that a bad one stops the run with nothing half done.
    source_sizes, photos = [], []
    for image in _read_images(parser, args.images):
        source_sizes.append(tuple(image.shape[-2:]))
        photos.append(fit_to_multiple(image, args.max, args.size))
    groups: dict[tuple[int, int, int], list[int]] = {}  # (height, width, n_patches) -> indices, first seen first
    for index, (path, photo) in enumerate(zip(args.images, photos)):
        size = tuple(photo.shape[-2:])
        groups.setdefault((*size, _budget(parser, args, path, size)), []).append(index)
    _writable_folder(parser, args.out, "--out")

    for (height, width, n_patches), indices in groups.items():
        for start in range(0, len(indices), args.batch):
            chunk = indices[start:start + args.batch]
            images = torch.stack([photos[index] for index in chunk]).to(args.device)
            mosaic = tokenize(images, scorer, n_patches, mode=args.mode)
            for position, index in enumerate(chunk):
                path, source = args.images[index], source_sizes[index]
                try:
                    record = save_mosaic(images[position], mosaic, args.out, path.stem, args.max, position,
                                         image=str(path), source_size=list(source), scorer=repr(scorer),
                                         mode=args.mode)
                except OSError as error:
                    parser.exit(1, f"{parser.prog}: error: cannot write to {args.out}: {error}\n")
                leaves = ", ".join(f"{side} px: {count}" for side, count in record["leaves_per_size"].items())
                print(f"{path}: {source[0]}x{source[1]} -> {height}x{width}, n_patches={n_patches} ({leaves}): "
                      f"{args.out / path.stem}.png, .json")
    return 0


# ---------------------------------------------------------------------------------------------------------- bench
def _vit(parser: argparse.ArgumentParser, name: str, geometry: QuadtreeGeometry, n_patches: int,
         device: torch.device) -> torch.nn.Module:
    """The Quadformer on timm's ``name`` with random weights, for the images' geometry: bf16 on CUDA (as
    benchmarks/test_cuda_costs.py times it), float32 elsewhere; a usage error for a name that is no timm ViT."""
    import timm

    from .models import create_model
    from .models.factory import QUADFORMER_PREFIX

    if not timm.is_model(name):
        parser.error(f"--vit: unknown timm model {name!r}")
    try:
        model = create_model(QUADFORMER_PREFIX + name, img_size=(geometry.height, geometry.width),
                             n_patches=n_patches, min_patch_size=geometry.min_patch_size,
                             max_patch_size=geometry.max_patch_size, scorer="uniform")
    except (ValueError, TypeError, RuntimeError) as error:
        parser.error(f"--vit {name}: not a timm ViT that mixres.models.Quadformer can wrap: {error}")
    return model.to(device, torch.bfloat16 if device.type == "cuda" else torch.float32).eval()


def _bench(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """``mixres bench``: times the tokenizer, the reference, the scorers and optionally a ViT forward on one batch
    of random images, and prints the table."""
    require_at_least(parser, args, 1, ("batch", "repeats"))
    geometry = _size_geometry(parser, args)
    height, width, device = geometry.height, geometry.width, args.device
    batch = args.batch or (256 if device.type == "cuda" else 16)
    try:
        geometry.check_n_patches(args.n_patches)
    except ValueError as error:
        parser.error(f"--n-patches: {error}")
    if args.json is not None:
        if args.json.is_dir():
            parser.error(f"--json {args.json}: a folder; give a file name")
        _writable_folder(parser, args.json.parent, "--json")
    model = _vit(parser, args.vit, geometry, args.n_patches, device) if args.vit else None

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

    if args.json is not None:
        config = {"device": str(device), "device_name": device_name(device), "torch": torch.__version__,
                  "tokenize_runs": kernel_label(device), "batch": batch, "height": height, "width": width,
                  "n_patches": args.n_patches, "min_patch_size": args.min, "max_patch_size": args.max,
                  "mode": args.mode, "repeats": args.repeats}
        try:
            args.json.write_text(json.dumps({"config": config, "rows": rows}, indent=2) + "\n")
        except OSError as error:
            parser.exit(1, f"{parser.prog}: error: cannot write {args.json}: {error}\n")
    return 0


# -------------------------------------------------------------------------------------------------------- budgets
def _budgets(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """``mixres budgets``: prints the quadtree's root and leaf counts and every reachable ``n_patches``."""
    geometry = _size_geometry(parser, args)
    valid = geometry.valid_n_patches()
    print(f"{geometry.height}x{geometry.width} px, {args.min}-{args.max} px leaves: {geometry.n_roots} roots of "
          f"{args.max} px, at most {geometry.max_patches} leaves of {args.min} px; n_patches = {geometry.n_roots} + 3k "
          f"(each split adds 3), {len(valid)} budgets:")
    print(textwrap.fill(" ".join(map(str, valid)), width=100))
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
        description="For each image (any format Pillow reads, as RGB): resize it so that both sides are multiples "
                    "of --max, tokenize it, and write OUT/<name>.png (its leaf borders on the photo, then the mosaic "
                    "rendered from its tokens) and OUT/<name>.json (image, source_size, height, width, the patch "
                    "sizes, n_patches, scorer, mode, leaves [[y, x, size], ...], leaves_per_size). Images of one "
                    "size are tokenized together.")
    mosaic.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="image files")
    mosaic.add_argument("-n", "--n-patches", type=int, default=None,
                        help="leaves per image; an unreachable budget is an error naming the nearest valid ones "
                             "(see mixres budgets) unless --nearest (default: the valid budget nearest to a third "
                             "of the most)")
    mosaic.add_argument("--nearest", action="store_true",
                        help="round -n to each image's nearest valid budget (the smaller on a tie)")
    mosaic.add_argument("--scorer", default="pixel-blur", choices=COMMAND_LINE_SCORERS, help="the leaves' scorer")
    mosaic.add_argument("--scorer-kwargs", type=json_object, default={}, metavar="JSON",
                        help='the scorer\'s arguments, a JSON object: \'{"weights": "shufflenet.pth"}\' for feature, '
                             '\'{"seed": 1}\' for random')
    _add_patch_options(mosaic, max_default=64)
    _add_mode_option(mosaic)
    mosaic.add_argument("--size", type=int, default=None,
                        help="resize each image so that its short side is SIZE (a multiple of --max) and its long "
                             "side the nearest multiple of --max to its aspect ratio (default: keep the size, each "
                             "side rounded to its nearest multiple of --max, halves up, at least --max; an image "
                             "that fits is not resampled). Resizing is bilinear with antialiasing")
    mosaic.add_argument("--batch", type=int, default=16, help="images tokenized together, all of one size")
    add_device_option(mosaic)
    mosaic.add_argument("-o", "--out", type=Path, default=Path("out/mosaic"), help="output folder, created if needed")
    mosaic.set_defaults(run=_mosaic, parser=mosaic)

    bench = commands.add_parser(
        "bench", formatter_class=HelpFormatter, help="time the tokenizer and the scorers on this machine",
        description="Times, on one batch of random images and random score pyramids: mixres.tokenize (the compiled "
                    "ops) against mixres.reference.tokenize (plain PyTorch), each scorer, and with --vit a ViT "
                    "forward over the tokens; prints ms per batch, images/s and each time over the tokenizer's. "
                    "CUDA work is waited for before each time is read. The benchmarks/ suite (pytest-benchmark) "
                    "measures more.")
    add_device_option(bench)
    bench.add_argument("--batch", type=int, default=None, help="images per batch (default: 256 on CUDA, 16 on the CPU)")
    bench.add_argument("--size", type=int, default=224, help="image height")
    bench.add_argument("--width", type=int, default=None, help="image width (default: --size)")
    bench.add_argument("-n", "--n-patches", type=int, default=100, help="leaves per image")
    _add_patch_options(bench)
    _add_mode_option(bench)
    bench.add_argument("--repeats", type=int, default=5, help="timed batches of each; the median is shown")
    bench.add_argument("--scorers", type=_scorer_names, default=list(BENCH_SCORERS), metavar="NAMES",
                       help=f"comma-separated scorers to time, of {', '.join(COMMAND_LINE_SCORERS)}; feature runs "
                            f"with random weights, as labelled (its cost does not depend on them) (default: "
                            f"{','.join(BENCH_SCORERS)})")
    bench.add_argument("--vit", nargs="?", const=DEFAULT_VIT, default=None, metavar="MODEL",
                       help=f"also time a timm ViT's forward over the tokens (random weights; bf16 on CUDA, float32 "
                            f"elsewhere) and the tokenizer's share of it; --vit alone is {DEFAULT_VIT}")
    bench.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the results to PATH")
    bench.set_defaults(run=_bench, parser=bench)

    budgets = commands.add_parser(
        "budgets", formatter_class=HelpFormatter, help="list the valid n_patches of an image size",
        description="Lists every reachable n_patches of a quadtree over an image: from the grid of --max roots, "
                    "each split adds 3 leaves, up to the grid of --min leaves.")
    budgets.add_argument("--size", type=int, required=True, help="image height")
    budgets.add_argument("--width", type=int, default=None, help="image width (default: --size)")
    _add_patch_options(budgets)
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
