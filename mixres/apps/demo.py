"""Tokenizes the photos that ship with scikit-image, draws their mosaics and times the tokenizer.

    python -m mixres.demo [--out DIR] [--n-patches N] [--batch B] [--repeats R]
                          [--feature-weights FILE] [--gradcam-model NAME] [--gradcam-weights FILE]

For each photo (astronaut, chelsea, coffee, rocket) it writes ``<out>/<name>.png`` (the photo with its leaf borders,
then the mosaic rendered from the tokens) and ``<out>/<name>.json`` (the leaves). It writes ``<out>/scorers.png``,
the rocket's mosaic from each scorer side by side; FeatureBased and GradCAM use random weights unless given local
weight files. It prints each scorer's leaves per size on the rocket, and how many of them lie in its top half (the
sky) with their mean side against that of the others. Then it prints the images/s of ``mixres.tokenize`` (the C++
ops) against ``mixres.reference.tokenize`` (plain PyTorch) and of the scorer. Needs scikit-image (``pip install
mixres[demo]``); everything runs on the CPU, offline.
"""
from __future__ import annotations

import argparse
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from .. import ops
from ..mosaic import tokenize
from ..pyramid import QuadtreeGeometry
from ..scorers import Entropy, FeatureBased, GradCAM, PixelBlur, Random, Scorer, Uniform
from ..viz import save_mosaic_grid
from .fitting import fit_to_multiple, nearest_valid_n_patches
from .mosaic_files import leaves_per_size, save_mosaic
from .options import POSITIVE, Integer
from .timing import format_throughput, time_tokenizer

__all__ = ["main", "build_parser", "load_photo", "top_half_leaves", "compare_scorers", "PHOTOS"]

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")
MIN_PATCH, MAX_PATCH = 16, 64


def load_photo(name: str, short_side: int = 256, multiple: int = MAX_PATCH) -> Tensor:
    """A scikit-image sample photo as ``[3, H, W]`` float32 in [0, 1], resized by :func:`fit_to_multiple` so that
    the short side is ``short_side`` and the long side the nearest multiple of ``multiple`` to its aspect ratio."""
    import skimage.data

    pixels = torch.from_numpy(getattr(skimage.data, name)()).float() / 255
    photo = pixels.permute(2, 0, 1) if pixels.dim() == 3 else pixels[None].expand(3, -1, -1)
    return fit_to_multiple(photo, multiple, short_side)


def _center_square(photo: Tensor, side: int) -> Tensor:
    """``[C, H, W]`` (short side ``side``) -> its central ``[C, side, side]`` crop."""
    top, left = (photo.shape[1] - side) // 2, (photo.shape[2] - side) // 2
    return photo[:, top:top + side, left:left + side]


def _gradcam_classifier(name: str, weights: Path | None) -> torch.nn.Module:
    """A torchvision classifier, with the weights of a local state-dict file, or random ones when None."""
    import torchvision

    model = torchvision.models.get_model(name, weights=None)
    if weights is not None:
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return model.eval()


def compare_scorers(photo: Tensor, n_patches: int, path: Path, feature_weights: Path | None = None,
                    gradcam_model: str = "resnet18", gradcam_weights: Path | None = None) -> dict[str, Tensor]:
    """Writes ``path``: the mosaic of ``photo [3, H, W]`` from each scorer, side by side, at ``n_patches`` leaves
    of 16-64 px. FeatureBased (ShuffleNetV2 x0.5) and GradCAM (torchvision ``gradcam_model``) take their weights
    from local state-dict files; without one they are randomly initialised, and their captions say so.

    Returns:
        caption -> the scorer's leaves ``[n_patches, 3]`` (y, x, side).
    """
    random_note = " (random weights)"
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="FeatureBased: backbone")  # the caption says it instead
        torch.manual_seed(0)  # the random backbones, so that the figure can be made again
        feature = FeatureBased(weights=feature_weights, random_init=feature_weights is None)
        classifier = _gradcam_classifier(gradcam_model, gradcam_weights)
    scorers: dict[str, Scorer] = {
        "PixelBlur": PixelBlur(MIN_PATCH, MAX_PATCH),
        "Entropy": Entropy(MIN_PATCH, MAX_PATCH),
        "FeatureBased, ShuffleNetV2" + (random_note if feature_weights is None else ""): feature,
        f"GradCAM, {gradcam_model}" + (random_note if gradcam_weights is None else ""): GradCAM(classifier),
        "Random(seed=0)": Random(MIN_PATCH, MAX_PATCH, seed=0),
        "Uniform": Uniform(MIN_PATCH, MAX_PATCH),
    }
    boxes = {caption: tokenize(photo[None], scorer, n_patches).boxes[0] for caption, scorer in scorers.items()}
    save_mosaic_grid(photo, boxes, path, columns=3)
    return boxes


def top_half_leaves(boxes: Tensor, height: int) -> dict[str, float]:
    """How a mosaic shares its leaves between the top and the bottom half of an image of ``height`` rows (the
    rocket's sky and the rest): ``{"top_leaves": the number of leaves whose centre is in the top half,
    "top_mean_side": their mean side in px, "bottom_mean_side": the others' mean side}`` (NaN for an empty half)."""
    y, side = boxes[:, 0].double(), boxes[:, 2].double()
    top = 2 * y + side < height  # the centre y + side / 2 above height / 2, in integers
    return {"top_leaves": int(top.sum()), "top_mean_side": side[top].mean().item(),
            "bottom_mean_side": side[~top].mean().item()}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m mixres.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("out/demo"), help="output folder (default: out/demo)")
    parser.add_argument("--n-patches", type=POSITIVE, default=None,
                        help="leaves per photo, rounded to the nearest valid budget (default: about a third of "
                             "the most)")
    parser.add_argument("--batch", type=Integer(1, 4096), default=64,
                        help="batch size of the throughput test, at most 4096 (3.2 GB of 256 px photos) "
                             "(default: 64)")
    parser.add_argument("--repeats", type=POSITIVE, default=5, help="timed repetitions, after a warm-up (default: 5)")
    parser.add_argument("--feature-weights", type=Path, default=None,
                        help="state-dict file of torchvision's shufflenet_v2_x0_5 for the FeatureBased panel "
                             "(default: random weights)")
    parser.add_argument("--gradcam-model", default="resnet18",
                        help="torchvision classifier for the GradCAM panel (default: resnet18)")
    parser.add_argument("--gradcam-weights", type=Path, default=None,
                        help="its state-dict file (default: random weights)")
    return parser


def main(argv: Sequence[str] | None = None) -> dict:
    """Runs the demo (see the module docstring). Returns what it printed, as a dict: ``photos`` (one entry per
    photo: name, size, n_patches, leaves per size, files), ``scorers`` (each scorer's leaves per size on the
    rocket), ``top_half`` (each scorer's :func:`top_half_leaves` on the rocket) and ``throughput`` (images/s of
    ``tokenize``, ``reference`` and the ``pixel-blur`` scorer)."""
    args = build_parser().parse_args(argv)

    device = torch.device("cpu")
    scorer = PixelBlur(MIN_PATCH, MAX_PATCH)
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"mixres demo on {device.type} (torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"C++ kernels: {'yes' if ops.has_kernel(device) else 'no, using the reference'}), writing to {args.out}")

    photos, report = {}, {"device": device.type, "photos": []}
    for name in PHOTOS:
        photo = photos[name] = load_photo(name).to(device)
        height, width = photo.shape[-2:]
        geometry = QuadtreeGeometry(height, width, MIN_PATCH, MAX_PATCH)
        target = args.n_patches if args.n_patches is not None else geometry.max_patches / 3
        n_patches = nearest_valid_n_patches(geometry, target)
        mosaic = tokenize(photo[None], scorer(photo[None]), n_patches, MIN_PATCH, MAX_PATCH)
        per_size = save_mosaic(photo, mosaic, args.out, name, MAX_PATCH, name=name)["leaves_per_size"]
        print(f"  {name:<10} {height}x{width}  n_patches={n_patches:<4} leaves per size: "
              + ", ".join(f"{s} px: {c}" for s, c in per_size.items()))
        report["photos"].append({"name": name, "size": (height, width), "n_patches": n_patches,
                                 "leaves_per_size": per_size, "png": args.out / f"{name}.png",
                                 "json": args.out / f"{name}.json"})

    rocket = photos["rocket"]
    n_patches = nearest_valid_n_patches(QuadtreeGeometry(*rocket.shape[-2:], MIN_PATCH, MAX_PATCH),
                                        args.n_patches if args.n_patches is not None else 128)
    comparison = args.out / "scorers.png"
    leaves = compare_scorers(rocket, n_patches, comparison, args.feature_weights, args.gradcam_model,
                             args.gradcam_weights)
    report["scorers"] = {caption: leaves_per_size(boxes) for caption, boxes in leaves.items()}
    # README.md quotes PixelBlur's and Entropy's at the default n_patches (tests/test_scorer_photos.py checks it).
    report["top_half"] = {caption: top_half_leaves(boxes, rocket.shape[-2]) for caption, boxes in leaves.items()}
    print(f"Each scorer's mosaic of the rocket, n_patches={n_patches}: {comparison}")
    print("  leaves per size; in the top half (the sky): leaves, their mean side, the mean side below")
    for caption, per_size in report["scorers"].items():
        top = report["top_half"][caption]
        print(f"  {caption:<40} " + ", ".join(f"{s} px: {c}" for s, c in per_size.items())
              + f"; sky: {top['top_leaves']}, {top['top_mean_side']:.1f} px vs {top['bottom_mean_side']:.1f} px")

    side = 256
    squares = [_center_square(photos[name], side) for name in PHOTOS]
    images = torch.stack([squares[i % len(squares)] for i in range(args.batch)])
    geometry = QuadtreeGeometry(side, side, MIN_PATCH, MAX_PATCH)
    n_patches = nearest_valid_n_patches(geometry, geometry.max_patches / 3)
    rows = time_tokenizer(images, scorer(images), n_patches, MIN_PATCH, MAX_PATCH,
                          {"pixel-blur": ("scorer pixel-blur", scorer)}, repeats=args.repeats)
    report["throughput"] = {row["name"]: row["images_per_s"] for row in rows}
    print(f"Throughput on {device.type}: batch of {args.batch} {side}x{side} RGB images, n_patches={n_patches}, "
          f"{MIN_PATCH}-{MAX_PATCH} px patches, median of {args.repeats} runs after a warm-up")
    print(format_throughput(rows))
    return report


if __name__ == "__main__":
    main()
