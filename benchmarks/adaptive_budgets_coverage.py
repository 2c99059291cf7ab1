"""Adaptive against fixed token budgets at equal mean tokens, before any training: which digits get small leaves?

    python benchmarks/adaptive_budgets_coverage.py [--output FILE] [--val-items 2000] [--means 25 40 64] ...

The task is ``SmallObjects(objects=(1, 4))`` (issue 15, item 6; ``--data-kwargs`` for others): 1 to 4 digits per
256 px image, the label the largest, so an image is read for sure only when every one of its digits is legible.
For each mean token count M of ``--means``, PixelBlur(16, 64) tokenizes the first ``--val-items`` val items

- with a fixed budget: ``n_patches`` = the valid budget (16 + 3k) nearest M, the same for every image;
- with an adaptive one, for each cap of ``--caps`` (a multiple of M, rounded down to a valid budget, or ``max``:
  256, one leaf per 16 px cell): ``threshold`` = :func:`mixres.calibrate_threshold` on ``--calibration-items``
  *train* items for the mean M at that cap, then ``tokenize(..., n_patches=cap, threshold=...)`` on the val items,
  so the val mean is M only as far as the calibration sample predicts it.

It reports the tokens per image (mean, least, most; the mean by the image's number of digits), and how often a
digit's centre (the centre of its box, rounded down) lies in a 16 px leaf, which the ViT sees at full resolution, or
in a leaf of at most 32 px, at half resolution, where a small CNN told where the digit is still reads 99% of them
(``benchmarks/results/small_objects_legibility.md``; at a quarter, in a 64 px leaf, 57%): per digit, per image (all
of its digits), and for the label's digit, by the number of digits in the image. Nothing is trained: this predicts
whether adaptive budgets can win, not that they do.

Then timings, on ``--timing-batch`` val items, in one process, each comparison's calls interleaved round by round
(``mixres.apps.end_to_end.interleaved_ms``, medians of ``--rounds`` rounds after ``--warmup``), for the last cap
of ``--caps`` (3 M by default: the padded layout's cost grows with the cap):

- tokenize with the fixed budget against tokenize with the threshold, from the same precomputed PixelBlur scores
  (the quadtree and the resizing; the scorer costs the same in both);
- the Quadformer of ``benchmarks/small_objects.sh`` (timm's vit_tiny_patch16_224 at 256 px with D=96, 4 blocks, 3
  heads, max pooling, no class token, xy positions; random weights, eval mode, inference_mode), images in, scorer
  included: at the fixed budget; adaptive in the padded layout (``[B, N_max]``, a key-padding mask); adaptive
  packed (``model(mixres.pack(model.tokenize(images)))``, packing included).

Deterministic for a given machine, except the timings: the machine is shared, so only the ratios between calls of
one comparison mean much, and even they are noisy. Needs scikit-image and timm. Writes a Markdown file
(default: benchmarks/results/adaptive_budgets_coverage.md). On a loaded 2-core CPU, with the defaults: about a minute.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import mixres
from mixres.apps.end_to_end import interleaved_ms
from mixres.datasets import SmallObjects
from mixres.models import create_model

from small_objects_legibility import cpu_name, side_at

SIZE, MIN_PATCH, MAX_PATCH = 256, 16, 64
# The Quadformer of benchmarks/small_objects.sh: its MAX_POOLED_VIT and mixres.train's model options.
MODEL = "quadformer_vit_tiny_patch16_224"
MODEL_KWARGS = {"embed_dim": 96, "depth": 4, "num_heads": 3, "global_pool": "max", "class_token": False}


def nearest_budget(mean: float) -> int:
    """The valid n_patches nearest ``mean`` (the smaller of two equally near)."""
    return min(mixres.valid_n_patches(SIZE, min_patch_size=MIN_PATCH, max_patch_size=MAX_PATCH),
               key=lambda n: (abs(n - mean), n))


def cap_for(mean: float, cap: str) -> int:
    """``"max"`` -> every 16 px cell a leaf; a factor f -> the largest valid budget <= f * mean (at least the one
    nearest ``mean``)."""
    valid = mixres.valid_n_patches(SIZE, min_patch_size=MIN_PATCH, max_patch_size=MAX_PATCH)
    if cap == "max":
        return valid[-1]
    return max([n for n in valid if n <= float(cap) * mean] + [nearest_budget(mean)])


def packed_scores(scorer, images: torch.Tensor, chunk: int = 128) -> mixres.PackedPyramid:
    """``scorer.packed(images)``, ``chunk`` images at a time (PixelBlur scores each image alone)."""
    parts = [scorer.packed(images[start:start + chunk]) for start in range(0, len(images), chunk)]
    return mixres.PackedPyramid(torch.cat([part.scores for part in parts]), parts[0].geometry)


def leaves_of(images: torch.Tensor, scores: mixres.PackedPyramid, n_patches: int, threshold=None,
              chunk: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """``tokenize``'s ``boxes [B, n_patches, 3]`` and ``lengths [B]``, ``chunk`` images at a time (the tokens of a
    thousand images at 256 leaves would take 800 MB)."""
    boxes, lengths = [], []
    for start in range(0, len(images), chunk):
        part = mixres.PackedPyramid(scores.scores[start:start + chunk], scores.geometry)
        mosaic = mixres.tokenize(images[start:start + chunk], part, n_patches, MIN_PATCH, MAX_PATCH,
                                 threshold=threshold)
        boxes.append(mosaic.boxes)
        lengths.append(mosaic.lengths.long() if mosaic.is_padded else torch.full((len(part.scores),), n_patches))
    return torch.cat(boxes), torch.cat(lengths)


def object_table(dataset: SmallObjects) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every digit of the dataset: ``image [D]`` (its item), ``centre [D, 2]`` (y, x, rounded down), ``is_label [D]``
    (the label's digit: the first of its item), and ``count [B]``, the digits of each item."""
    image, centre, is_label, count = [], [], [], []
    for index in range(len(dataset)):
        boxes = dataset.boxes(index)
        count.append(len(boxes))
        for number, (y0, x0, y1, x1) in enumerate(boxes):
            image.append(index)
            centre.append(((y0 + y1) // 2, (x0 + x1) // 2))
            is_label.append(number == 0)
    return torch.tensor(image), torch.tensor(centre), torch.tensor(is_label), torch.tensor(count)


def coverage(leaves: torch.Tensor, objects, largest_side: int) -> dict[str, torch.Tensor]:
    """Which digits lie in a leaf of at most ``largest_side`` px: ``digit [D]`` bool, ``image [B]`` (all of the
    item's digits), ``label [B]`` (the label's digit)."""
    image, centre, is_label, count = objects
    covered = side_at(leaves[image], centre) <= largest_side
    missed = torch.zeros(len(count), dtype=torch.long).index_add_(0, image, (~covered).long())
    return {"digit": covered, "image": missed == 0, "label": covered[is_label]}


def adaptive_name(cap: str) -> str:
    return f"adaptive, cap {cap}x M" if cap != "max" else "adaptive, cap max"


def percent(values: torch.Tensor) -> str:
    return f"{100 * values.float().mean().item():.1f}" if values.numel() else "-"


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" /
                        "adaptive_budgets_coverage.md", help="the Markdown report (default: %(default)s)")
    parser.add_argument("--val-items", type=int, default=2000, help="val items measured (default: 2000)")
    parser.add_argument("--calibration-items", type=int, default=1000,
                        help="train items the thresholds are calibrated on (default: 1000)")
    parser.add_argument("--data-kwargs", type=json.loads, default={"objects": [1, 4]},
                        help='SmallObjects\' arguments, a JSON object, as benchmarks/adaptive_budgets.sh\'s '
                        'DATA_KWARGS (default: \'{"objects": [1, 4]}\')')
    parser.add_argument("--seed", type=int, default=0,
                        help="SmallObjects' seed: 1 gives the val images that mixres.train --seed 0 validates on "
                        "(default: 0)")
    parser.add_argument("--means", type=float, nargs="+", default=[25, 40, 64],
                        help="mean tokens per image compared (default: 25 40 64)")
    parser.add_argument("--caps", nargs="+", default=["max", "3"],
                        help="the adaptive budgets' caps N_max: multiples of the mean, or max; the last one is timed "
                        "(default: max 3)")
    parser.add_argument("--timing-batch", type=int, default=64, help="images per timed call (default: 64)")
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds (default: 7)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first (default: 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    for cap in args.caps:
        if cap != "max" and not (cap.replace(".", "", 1).isdigit() and float(cap) >= 1):
            parser.error(f"--caps takes multiples of the mean (numbers >= 1) or max, got {cap!r}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    began = time.perf_counter()
    scorer = mixres.PixelBlur(MIN_PATCH, MAX_PATCH)
    data_kwargs = {**args.data_kwargs, "seed": args.seed}
    described = ", ".join(f"{key}={value}" for key, value in data_kwargs.items())

    val = SmallObjects("val", args.val_items, **data_kwargs)
    images = val.tensors()[0]
    objects = object_table(val)
    counts = objects[3]
    ks = list(range(val.objects[0], val.objects[1] + 1))
    calibration_images = SmallObjects("train", args.calibration_items, **data_kwargs).tensors()[0]
    scores = packed_scores(scorer, images)  # once: every budget and threshold grows the same greedy quadtree

    def by_count(values: torch.Tensor, per_digit: bool = False) -> list[str]:
        """``values`` per image (or per digit), as percentages: for each number of digits k, then all."""
        owner = counts[objects[0]] if per_digit else counts
        return [percent(values[owner == k]) for k in ks] + [percent(values)]

    rows = []  # (M, name, cap, lengths [B], leaves [B, N, 3], calibration or None)
    for mean in args.means:
        fixed = nearest_budget(mean)
        rows.append((mean, "fixed", fixed, *leaves_of(images, scores, fixed)[::-1], None))
        for cap in args.caps:
            n_max = cap_for(mean, cap)
            calibration = mixres.calibrate_threshold(scorer, calibration_images, mean_tokens=mean, max_patches=n_max)
            boxes, lengths = leaves_of(images, scores, n_max, calibration.thresholds)
            rows.append((mean, adaptive_name(cap), n_max, lengths, boxes, calibration))
        print(f"M={mean:g}: done in {time.perf_counter() - began:.0f} s", flush=True)

    count_share = " ".join(f"{k}: {int((counts == k).sum())}" for k in ks)
    lines = [f"# {__doc__.splitlines()[0]}", "",
             f"`python benchmarks/adaptive_budgets_coverage.py` with `{' '.join(argv) if argv else 'its defaults'}`"
             f" (`--val-items {args.val_items} --calibration-items {args.calibration_items} --data-kwargs "
             f"'{json.dumps(args.data_kwargs)}' --seed {args.seed} --means "
             f"{' '.join(f'{m:g}' for m in args.means)} --caps "
             f"{' '.join(args.caps)} --timing-batch {args.timing_batch} --rounds {args.rounds} --warmup "
             f"{args.warmup} --threads {args.threads}`).",
             f"torch {torch.__version__}, {cpu_name()}, {args.threads} thread(s). "
             f"`SmallObjects('val', {args.val_items}, {described})`, digits per image: {count_share}. "
             f"PixelBlur(16, 64) at 256 px: 16 roots of 64 px, budgets 16 + 3k up to 256. Thresholds calibrated on "
             f"`SmallObjects('train', {args.calibration_items}, {described})`.", "",
             "## Tokens per image", "",
             "| M | budget | N (cap) | calibration mean | val mean | min | max | "
             + " | ".join(f"mean, {k} digit{'s' * (k > 1)}" for k in ks) + " |",
             "|---:|---|---:|---:|---:|---:|---:|" + "---:|" * len(ks)]
    for mean, name, n_max, lengths, _, calibration in rows:
        calibrated = f"{calibration.mean_tokens:.1f}" if calibration is not None else "-"
        lines.append(f"| {mean:g} | {name} | {n_max} | {calibrated} | {lengths.float().mean():.1f} | "
                     f"{int(lengths.min())} | {int(lengths.max())} | "
                     + " | ".join(f"{lengths[counts == k].float().mean():.1f}" for k in ks) + " |")
    for largest_side, title in ((MIN_PATCH, "in a 16 px leaf (full resolution)"),
                                (2 * MIN_PATCH, "in a leaf of at most 32 px (at least half resolution)")):
        lines += ["", f"## Digits {title}", "",
                  "Percentages. *digits*: of all the digits of the images with k digits; *images*: of the images "
                  "with k digits, those whose every digit is; *label's digit*: of all images.", "",
                  "| M | budget | " + " | ".join(f"digits, k={k}" for k in ks) + " | digits, all | "
                  + " | ".join(f"images, k={k}" for k in ks) + " | images, all | label's digit |",
                  "|---:|---|" + "---:|" * (2 * len(ks) + 3)]
        for mean, name, _, _, leaves, _ in rows:
            found = coverage(leaves, objects, largest_side)
            lines.append(f"| {mean:g} | {name} | " + " | ".join(by_count(found["digit"], per_digit=True)) + " | "
                         + " | ".join(by_count(found["image"])) + f" | {percent(found['label'])} |")
    print("\n".join(lines), flush=True)

    timed = mixres.PackedPyramid(scores.scores[:args.timing_batch], scores.geometry)
    lines += timings(args, images[:args.timing_batch], timed, rows)
    lines += ["", f"Took {time.perf_counter() - began:.0f} s."]
    report = "\n".join(lines) + "\n"
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(report)
    print("\n".join(lines[-20:]))
    return report


def timings(args, images: torch.Tensor, scores, rows) -> list[str]:
    """The timing tables' lines, for the last cap of ``--caps`` at each mean."""
    cpu = torch.device("cpu")
    batch = len(images)
    timed_name = adaptive_name(args.caps[-1])
    lines = ["", f"## Timings ({batch} val images per call, CPU, {args.threads} thread(s))", "",
             f"Medians of {args.rounds} interleaved rounds after {args.warmup}; adaptive = `{timed_name}` above. "
             "**The machine is shared with other jobs: only the ratios within one row mean much, and they are noisy.**",
             "", "tokenize from precomputed PixelBlur scores (quadtree and resizing):", "",
             "| M | fixed N | fixed ms | adaptive N_max | adaptive mean tokens | adaptive ms | fixed / adaptive |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    model_lines = ["", "The Quadformer of `benchmarks/small_objects.sh` (random weights, eval, inference_mode), images "
                   "in, scorer included; images/s:", "",
                   "| M | fixed | adaptive, padded | adaptive, packed | packed / fixed | packed / padded |",
                   "|---:|---:|---:|---:|---:|---:|"]
    fixed_rows = {mean: n for mean, name, n, *_ in rows if name == "fixed"}
    for mean, name, n_max, _, _, calibration in rows:
        if name != timed_name:
            continue
        fixed = fixed_rows[mean]
        thresholds = calibration.thresholds
        calls = {"fixed": lambda: mixres.tokenize(images, scores, fixed, MIN_PATCH, MAX_PATCH),
                 "adaptive": lambda: mixres.tokenize(images, scores, n_max, MIN_PATCH, MAX_PATCH,
                                                     threshold=thresholds)}
        ms, outputs = interleaved_ms(calls, cpu, args.rounds, args.warmup)
        lengths = outputs["adaptive"].lengths.float()
        lines.append(f"| {mean:g} | {fixed} | {ms['fixed']:.1f} | {n_max} | {lengths.mean():.1f} | "
                     f"{ms['adaptive']:.1f} | {ms['fixed'] / ms['adaptive']:.2f} |")

        common = dict(img_size=SIZE, num_classes=10, scorer="pixel-blur", pos_embed="xy", **MODEL_KWARGS)
        torch.manual_seed(0)
        fixed_model = create_model(MODEL, n_patches=fixed, **common).eval()
        adaptive_model = create_model(MODEL, n_patches=n_max, **common).eval()
        adaptive_model.load_state_dict(fixed_model.state_dict())
        adaptive_model.threshold = thresholds
        # The ViT's inputs are normalised; the scorer undoes it (Quadformer.score), so the thresholds still apply.
        normalised = (images - fixed_model.input_mean) / fixed_model.input_std
        with torch.inference_mode():
            calls = {"fixed": lambda: fixed_model(normalised),
                     "padded": lambda: adaptive_model(normalised),
                     "packed": lambda: adaptive_model(mixres.pack(adaptive_model.tokenize(normalised)))}
            ms, outputs = interleaved_ms(calls, cpu, args.rounds, args.warmup)
        # The same computation in both layouts (tests/test_packed.py checks it closely): a guard on what is timed.
        torch.testing.assert_close(outputs["packed"], outputs["padded"], rtol=1e-4, atol=1e-4)
        per_s = {key: 1e3 * batch / value for key, value in ms.items()}
        model_lines.append(f"| {mean:g} | {per_s['fixed']:.0f} | {per_s['padded']:.0f} | {per_s['packed']:.0f} | "
                           f"{per_s['packed'] / per_s['fixed']:.2f} | {per_s['packed'] / per_s['padded']:.2f} |")
        print(lines[-1], model_lines[-1], sep="\n", flush=True)
    return lines + model_lines


if __name__ == "__main__":
    main()
