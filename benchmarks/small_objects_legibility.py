"""mixres.datasets' figures, measured: does a scorer find the digit, and how legible is it at lower resolution?

    python benchmarks/small_objects_legibility.py [--output FILE] [--val-items 512] [--train-crops 3000] ...

1. Finding the digit: on the first ``--val-items`` val items of ``SmallObjects()`` (its defaults), the fraction
   whose digit's centre (the centre of ``box(i)``, rounded down) lies in a 16 px leaf of the scorer's mosaic, for
   PixelBlur(16, 64) and Entropy(16, 64) at each of ``--budgets``; and PixelBlur at n_patches=64 on a stronger
   texture, ``background_contrast=(0.04, 0.08)``, where it spends its splits on the texture. 16 splits could as
   well make the uniform 32 px grid (every root split once), with no 16 px leaf: a 16 px leaf on the digit means the
   scorer ranked the digit's 32 px patch above whole roots of texture.
2. Reading the digit when its place is known: a small CNN is trained from scratch on ``--train-crops`` crops of
   32 px around the digit of train items 0, 1, ..., and tested on the same crops of the val items, at full
   resolution, half and a quarter. A crop's corner is the digit's centre minus 16 px, rounded down to a multiple
   of 4 and kept inside the image, so the digit's centre is 14-17 px from the crop's top-left corner (it is not
   always exactly central), and the crop is aligned with the image's 2 and 4 px cells. A crop at half (quarter)
   resolution is that crop of the image downsampled by area averaging (each 2x2 (4x4) block of pixels averaged),
   scaled back to 32 px by pixel replication, so that one network architecture serves every resolution. One
   network per resolution, same seed. The ViT of a uniform grid resizes the whole image the same way, though
   bilinearly with antialiasing (``--resize bilinear`` measures that instead).

Prints a Markdown table and writes it to ``--output`` (default: benchmarks/results/small_objects_legibility.md).
Deterministic for a given machine and thread count (``--threads``, default 1: the CNN's training on the CPU sums in
an order that depends on the threads). Needs scikit-image. On a loaded 2-core CPU, with the defaults: about 10
minutes, mostly the CNNs' training.
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import mixres
from mixres.datasets import SmallObjects

CROP = 32
SCALES = (1, 2, 4)  # full resolution, half, a quarter


def digit_centres(boxes: torch.Tensor) -> torch.Tensor:
    """``[B, 4]`` digit boxes (y0, x0, y1, x1) -> ``[B, 2]`` their centres (y, x), rounded down."""
    return torch.stack([(boxes[:, 0] + boxes[:, 2]) // 2, (boxes[:, 1] + boxes[:, 3]) // 2], dim=1)


def side_at(leaves: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """``[B, N, 3]`` leaves (y, x, side) and ``[B, 2]`` points (y, x) -> ``[B]`` the side of the leaf over each
    point (the leaves partition the image, so exactly one covers it)."""
    y, x, side = leaves.long().unbind(-1)
    py, px = points[:, :1], points[:, 1:]
    covers = (y <= py) & (py < y + side) & (x <= px) & (px < x + side)
    assert bool((covers.sum(dim=1) == 1).all()), "the leaves do not partition the image"
    return (side * covers).sum(dim=1)


def found_fractions(dataset: SmallObjects, scorer, budgets: list[int], chunk: int = 64) -> dict[int, float]:
    """n_patches -> the fraction of ``dataset``'s items whose digit's centre lies in a leaf of ``min_patch_size``."""
    found = dict.fromkeys(budgets, 0)
    for start in range(0, len(dataset), chunk):
        images, _, boxes = dataset.tensors(min(chunk, len(dataset) - start), start=start, return_boxes=True)
        scores = scorer(images)  # once per chunk: every budget grows the same quadtree further
        centres = digit_centres(boxes)
        for n_patches in budgets:
            leaves = mixres.tokenize(images, scores, n_patches, scorer.min_patch_size, scorer.max_patch_size).boxes
            found[n_patches] += int((side_at(leaves, centres) == scorer.min_patch_size).sum())
    return {n_patches: count / len(dataset) for n_patches, count in found.items()}


def digit_crops(dataset: SmallObjects, count: int, scale: int, resize: str, chunk: int = 256):
    """The ``CROP`` px crops around the digits of items 0 .. count - 1 at 1 / ``scale`` resolution, scaled back to
    ``CROP`` px by pixel replication: ``[count, 3, CROP, CROP]`` float32 in [0, 1], and the labels ``[count]``."""
    crops, labels = torch.empty(count, 3, CROP, CROP), torch.empty(count, dtype=torch.int64)
    align = max(SCALES)
    size = dataset.image_size
    for start in range(0, count, chunk):
        images, labels_, boxes = dataset.tensors(min(chunk, count - start), start=start, return_boxes=True)
        labels[start:start + len(images)] = labels_
        corners = ((digit_centres(boxes) - CROP // 2) // align * align).clamp(0, size - CROP)
        for row, (image, (top, left)) in enumerate(zip(images, corners.tolist())):
            crop = image[None, :, top:top + CROP, left:left + CROP]
            if scale > 1:
                small = CROP // scale
                if resize == "area":
                    crop = F.interpolate(crop, size=(small, small), mode="area")
                else:
                    # The whole image resized, then cropped: bilinear taps reach outside the crop.
                    whole = F.interpolate(image[None], size=(size // scale, size // scale), mode="bilinear",
                                          align_corners=False, antialias=True)
                    crop = whole[:, :, top // scale:top // scale + small, left // scale:left // scale + small]
                crop = F.interpolate(crop, scale_factor=scale, mode="nearest")
            crops[start + row] = crop[0]
    return crops, labels


def small_cnn(num_classes: int) -> nn.Module:
    """Four 3x3 convolutions (32, 32, 64, 64 channels) with two 2x2 max pools, a global max pool, a linear head."""
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(64, num_classes))


def train_and_test(train: tuple, val: tuple, num_classes: int, epochs: int, batch: int, lr: float,
                   seed: int) -> float:
    """Trains ``small_cnn`` on ``train`` (crops, labels) with AdamW and a cosine schedule; returns the top-1 (%)
    on ``val``."""
    torch.manual_seed(seed)
    model = small_cnn(num_classes)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    steps = epochs * -(-len(train[0]) // batch)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    order = torch.Generator().manual_seed(seed)
    crops, labels = (train[0] - 0.5) / 0.25, train[1]
    for _ in range(epochs):
        model.train()
        for indices in torch.randperm(len(crops), generator=order).split(batch):
            loss = F.cross_entropy(model(crops[indices]), labels[indices])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    model.eval()
    with torch.no_grad():
        predictions = torch.cat([model(part).argmax(1) for part in ((val[0] - 0.5) / 0.25).split(256)])
    return 100 * (predictions == val[1]).float().mean().item()


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" /
                        "small_objects_legibility.md", help="the Markdown table (default: %(default)s)")
    parser.add_argument("--val-items", type=int, default=512, help="val items, for both measures (default: 512)")
    parser.add_argument("--budgets", type=int, nargs="+", default=[40, 64, 100],
                        help="n_patches of the scorers' mosaics (default: 40 64 100)")
    parser.add_argument("--train-crops", type=int, default=3000, help="CNN training crops (default: 3000)")
    parser.add_argument("--epochs", type=int, default=10, help="CNN training epochs (default: 10)")
    parser.add_argument("--batch", type=int, default=100, help="CNN batch size (default: 100)")
    parser.add_argument("--lr", type=float, default=3e-3, help="CNN peak learning rate (default: 3e-3)")
    parser.add_argument("--resize", choices=("area", "bilinear"), default="area",
                        help="how the CNN's crops are downsampled (default: area averaging)")
    parser.add_argument("--seed", type=int, default=0, help="the CNNs' initialisation and batch order (default: 0)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    began = time.perf_counter()

    lines = [f"# {__doc__.splitlines()[0]}", "",
             f"`python benchmarks/small_objects_legibility.py` with `{' '.join(argv) if argv else 'its defaults'}`"
             f" (`--val-items {args.val_items} --budgets {' '.join(map(str, args.budgets))} --train-crops "
             f"{args.train_crops} --epochs {args.epochs} --batch {args.batch} --lr {args.lr} --resize {args.resize}"
             f" --seed {args.seed} --threads {args.threads}`).",
             f"torch {torch.__version__}, {cpu_name()}; "
             f"`SmallObjects()` defaults except where a row says.", "",
             f"Digits whose centre lies in a 16 px leaf, of the first {args.val_items} val items:", "",
             "| scorer | background_contrast | " + " | ".join(f"n_patches={n}" for n in args.budgets) + " |",
             "|---|---|" + "---:|" * len(args.budgets)]
    val = SmallObjects("val", args.val_items)
    for name, scorer in (("PixelBlur(16, 64)", mixres.PixelBlur(16, 64)), ("Entropy(16, 64)", mixres.Entropy(16, 64))):
        fractions = found_fractions(val, scorer, args.budgets)
        lines.append(f"| {name} | {val.background_contrast} (default) | "
                     + " | ".join(f"{100 * fractions[n]:.1f}%" for n in args.budgets) + " |")
        print(lines[-1], flush=True)
    textured = SmallObjects("val", args.val_items, background_contrast=(0.04, 0.08))
    fraction = found_fractions(textured, mixres.PixelBlur(16, 64), [64])[64]
    lines.append(f"| PixelBlur(16, 64) | {textured.background_contrast} | "
                 + " | ".join(f"{100 * fraction:.1f}%" if n == 64 else "" for n in args.budgets) + " |")
    print(lines[-1], flush=True)

    lines += ["", f"A small CNN told where the digit is ({CROP} px crops around it, {args.train_crops} train crops, "
              f"{args.epochs} epochs), top-1 on the {args.val_items} val items' crops, downsampled by "
              f"{'area averaging' if args.resize == 'area' else 'bilinear interpolation with antialiasing'}:", "",
              "| resolution | val top-1 |", "|---|---:|"]
    train = SmallObjects("train", args.train_crops)
    for scale in SCALES:
        accuracy = train_and_test(digit_crops(train, args.train_crops, scale, args.resize),
                                  digit_crops(val, args.val_items, scale, args.resize), train.num_classes,
                                  args.epochs, args.batch, args.lr, args.seed)
        resolution = {1: "full", 2: "half", 4: "a quarter"}[scale]
        lines.append(f"| {resolution} | {accuracy:.1f}% |")
        print(lines[-1], flush=True)
    lines += ["", f"Took {time.perf_counter() - began:.0f} s."]
    table = "\n".join(lines) + "\n"
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(table)
    print(table)
    return table


if __name__ == "__main__":
    main()
