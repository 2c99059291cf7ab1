"""A budget sweep: top-1, MACs and throughput of a Quadformer at several token budgets, against the uniform grid.

    python -m mixres.evaluate --model quadformer_vit_base_patch16_224 --pretrained-file vit_b16.pth \\
        --data /data/imagenet --budgets 49,64,100,145,196 --output out/eval

For each budget N, two rows: the Quadformer at N leaves, and the uniform-grid baseline from the same ViT weights at
about N tokens (the image resized to g x g patches, g = round(sqrt(N)), the position table resampled: see
:class:`mixres.models.UniformGrid`). Each row holds top-1 (and top-5 with at least 5 classes), GMACs per image
(the scorer's share apart), and the images/s and microseconds per image of the whole forward (scorer, tokenize,
ViT) on the device. Writes ``budgets.csv``, ``budgets.json`` and ``budgets.png`` (accuracy and throughput against
the number of tokens; needs matplotlib) to ``--output``, and prints a table.

Adaptive points (``--threshold T...`` or ``--mean-tokens M...``, each M calibrated on ``--calibration-images``
evaluation images; a training checkpoint's own threshold is added by itself): the Quadformer with that threshold,
each image getting its own number of leaves up to the cap ``--n-patches``. Their rows add the mean, least and most
tokens per image over the evaluated images; their GMACs are the mean over those images of the MACs at each image's
own length (what the packed forward computes; the padded forward computes the cap's for every image, shown as
``gmacs_padded``); their images/s time the packed forward (scorer, tokenize, :func:`mixres.pack`, the ViT on packed
rows), the layout to deploy where lengths vary.
"""
from __future__ import annotations

import argparse
import csv
import json
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import IterableDataset
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count
from tqdm import tqdm

from ..checkpoints import read_torch_file
from ..models import load_weights, read_state_dict
from ..mosaic import check_threshold
from ..packed import pack
from ..pyramid import QuadtreeGeometry
from .adaptive import (adaptive_threshold, calibrate_model, calibration_record, calibration_sample, check_mean_tokens,
                       describe_calibration)
from .loaders import (SMALL_OBJECTS, UnreadableImageError, build_dataset, build_loader, evenly_spaced, release_loader,
                      report_unreadable, skip_unreadable_images)
from .model_builder import build_model
from .options import (COUNT, POSITIVE, HelpFormatter, IntegerList, add_adaptive_options, add_amp_option,
                      add_data_kwargs_option, add_device_option, add_model_options, add_seed_option, add_workers_option,
                      autocast, check_model_options, format_threshold, require_file)
from .timing import device_name, median_seconds

__all__ = ["evaluate_budgets", "count_macs", "default_budgets", "parse_budgets", "write_results", "plot_budgets",
           "format_table", "main", "build_parser", "COLUMNS", "MACS_NOTE", "MACS_ADAPTIVE_NOTE"]

MACS_NOTE = ("GMACs per image from torch.utils.flop_counter.FlopCounterMode (MACs = FLOPs / 2): matmuls, linear "
             "layers, convolutions and attention, the scorer included (its share is shown apart). Not counted: "
             "normalisations, activations, pooling, image resizing and mixres's tokenize ops (quadtree, leaf "
             "resize, position gathering), which are data movement.")
MACS_ADAPTIVE_NOTE = ("Adaptive rows: GMACs per image is the mean over the evaluated images of the MACs at each "
                      "image's own length, what the packed forward computes; gmacs_padded is the padded forward's, the "
                      "cap's for every image. Their images/s time the packed forward: scorer, tokenize, mixres.pack "
                      "and the ViT on packed rows.")
COLUMNS = ("method", "budget", "n_patches", "threshold", "source", "mean_tokens", "min_tokens", "max_tokens", "grid",
           "image_size", "top1", "top5", "gmacs", "gmacs_padded", "scorer_gmacs", "images_per_s", "us_per_image",
           "timed_forward", "n_images", "batch_size", "amp", "scorer", "device", "device_name", "torch")


def _cpu_attention_flops(query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# On the CPU, F.scaled_dot_product_attention (timm's attention) runs an op that FlopCounterMode has no formula
# for, so the attention matmuls would go uncounted there and not on CUDA: count it as the other SDPA kernels are.
_EXTRA_FLOP_FORMULAS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops}


def count_macs(fn: Callable[[], object]) -> int:
    """Multiply-accumulates of ``fn()`` as :class:`torch.utils.flop_counter.FlopCounterMode` counts them
    (FLOPs / 2): matmuls, linear layers, convolutions and attention, on any device. See :data:`MACS_NOTE`."""
    with FlopCounterMode(display=False, custom_mapping=_EXTRA_FLOP_FORMULAS) as counter:
        fn()
    return counter.get_total_flops() // 2


def default_budgets(geometry: QuadtreeGeometry, count: int = 5) -> list[int]:
    """``count`` valid budgets evenly spread from the fewest leaves (the root grid) to the most (the full grid)."""
    # The valid budgets are roots + 3k up to the full grid: the i-th is computed, never the (long) list.
    total = (geometry.max_patches - geometry.n_roots) // 3 + 1
    picks = range(total) if total <= count else {round(i * (total - 1) / (count - 1)) for i in range(count)}
    return sorted(geometry.n_roots + 3 * pick for pick in picks)


_BUDGETS = IntegerList(1)  # the type of --budgets


def parse_budgets(text: str | Sequence[int], geometry: QuadtreeGeometry) -> list[int]:
    """``"49,64,100"`` (or the list that ``--budgets`` parses it to) -> ``[49, 64, 100]``, each checked against the
    geometry: a ``ValueError`` names the nearest valid budgets of an unreachable one."""
    try:
        budgets = _BUDGETS(text) if isinstance(text, str) else list(text)
    except argparse.ArgumentTypeError as error:
        raise ValueError(f"budgets: {error}") from None
    if not budgets:
        raise ValueError("no budget given")
    for budget in budgets:
        geometry.check_n_patches(budget)
    return budgets


def evaluate_budgets(model, loader: Iterable, budgets: Sequence[int], device: str | torch.device = "cpu", *,
                     limit: int | None = None, amp: str | None = None, warmup: int = 2, timed_batches: int = 5,
                     progress: bool = True, thresholds: Sequence[tuple[str, object]] = ()) -> list[dict]:
    """Top-1/top-5, GMACs and throughput of a Quadformer at each budget and of its uniform-grid baseline, and at
    adaptive budgets.

    One pass over the data evaluates every configuration on each batch. MACs are counted on one image
    (:func:`count_macs`) at each length it is run at; the throughput is timed on the first batch, after ``warmup``
    untimed calls, as the median of ``timed_batches`` calls of the whole forward (scorer, tokenize and ViT; for the
    uniform grid, resize and ViT; for an adaptive point, scorer, tokenize, :func:`mixres.pack` and the ViT on packed
    rows), synchronising on CUDA.

    Args:
        model: a :class:`mixres.models.Quadformer`; it is moved to ``device`` and put in eval mode. The baseline
            is a :class:`mixres.models.UniformGrid` on it, sharing its ViT.
        loader: batches of ``(images [B, C, H, W] normalised for the model, labels [B])`` at the model's image size.
        budgets: leaves per image, each valid for the model's geometry (``model.geometry.valid_n_patches()``).
            The uniform grid of each is :func:`mixres.models.grid_for_budget`'s.
        device: where to run.
        limit: stop after this many images (the first ones of the loader).
        amp: run under ``torch.autocast`` to ``"bf16"`` or ``"fp16"`` (the ``--amp`` values); None: not.
        warmup, timed_batches: untimed and timed calls of the throughput measurement.
        progress: show a tqdm progress bar.
        thresholds: adaptive points, ``(source, threshold)`` each: a threshold of :func:`mixres.tokenize` (a number
            or ``{patch size: number}``) and where it comes from (``"--threshold"``, ``"--mean-tokens 100"``...),
            run with ``model.n_patches`` as the cap N_max.

    Returns:
        One dict per configuration: per budget in the given order the Quadformer then the uniform grid, then the
        adaptive points in order (method ``"adaptive"``, budget the cap); the :data:`COLUMNS` (``top5`` is None
        with fewer than 5 classes; ``scorer_gmacs`` is 0 for the uniform grid; a fixed budget's mean, least and
        most tokens are its own).
    """
    from ..models import UniformGrid, grid_for_budget

    if limit is not None and limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    if model.threshold is not None:
        raise ValueError(f"the model has a threshold ({model.threshold!r}), but budgets are fixed ones: set "
                         f"model.threshold = None and pass the threshold as thresholds=[('model', threshold)]")
    device = torch.device(device)
    model = model.to(device).eval()
    for budget in budgets:
        model.geometry.check_n_patches(budget)
    uniform = UniformGrid(model)
    height, width, side = model.geometry.height, model.geometry.width, model.min_patch_size
    scorer_name = type(model.scorer).__name__

    def adaptive(images, threshold):
        with adaptive_threshold(model, threshold):
            mosaic = model.tokenize(images)
        return model(pack(mosaic)), mosaic.lengths

    configs = []
    for budget in budgets:
        configs.append(dict(method="quadformer", budget=budget, n_patches=budget, grid="",
                            image_size=f"{height}x{width}", scorer=scorer_name, timed_forward="dense",
                            forward=lambda images, n=budget: (model(images, n_patches=n), None)))
        rows, cols = grid_for_budget(budget, (height, width))
        configs.append(dict(method="uniform", budget=budget, n_patches=rows * cols, grid=f"{rows}x{cols}",
                            image_size=f"{rows * side}x{cols * side}", scorer="", timed_forward="dense",
                            forward=lambda images, g=(rows, cols): (uniform(images, g), None)))
    for source, threshold in thresholds:
        configs.append(dict(method="adaptive", budget=model.n_patches, n_patches=model.n_patches,
                            threshold=format_threshold(threshold), source=source, grid="",
                            image_size=f"{height}x{width}", scorer=scorer_name, timed_forward="packed",
                            forward=lambda images, t=threshold: adaptive(images, t)))

    top_k = (1, 5) if model.num_classes >= 5 else (1,)
    correct = [dict.fromkeys(top_k, 0) for _ in configs]
    # Each adaptive point's count of images per length: [cap + 1], on the device until the end.
    lengths = [torch.zeros(model.n_patches + 1, dtype=torch.int64, device=device) for _ in configs]
    seen, first = 0, None
    with tqdm(loader, desc=f"{len(configs)} configurations", unit="batch", disable=not progress) as batches, \
            torch.no_grad(), autocast(device, amp):
        for images, labels in batches:
            if limit is not None:
                images, labels = images[:limit - seen], labels[:limit - seen]
            images = images.to(device, non_blocking=True)
            labels = torch.as_tensor(labels).to(device, non_blocking=True)
            if first is None:
                first = images
            for config, hits, counts in zip(configs, correct, lengths):
                logits, image_lengths = config["forward"](images)
                predicted = logits.topk(max(top_k), dim=1).indices
                for k in top_k:
                    hits[k] += int((predicted[:, :k] == labels[:, None]).any(dim=1).sum())
                if image_lengths is not None:
                    counts += torch.bincount(image_lengths, minlength=counts.numel())
            seen += images.shape[0]
            if limit is not None and seen >= limit:
                break
    if first is None:
        raise ValueError("the loader gave no images")

    one = first[:1]
    scorer_macs = count_macs(lambda: model.score(one))
    macs_at = {}  # tokens -> the Quadformer's MACs on one image of that many leaves

    def quadformer_macs(tokens: int) -> int:
        if tokens not in macs_at:
            with torch.no_grad():
                macs_at[tokens] = count_macs(lambda: model(one, n_patches=tokens))
        return macs_at[tokens]

    name, results = device_name(device), []
    for config, hits, counts in zip(configs, correct, lengths):
        forward = config.pop("forward")
        if config["method"] == "adaptive":
            counts = counts.tolist()
            used = [tokens for tokens, count in enumerate(counts) if count]
            tokens = dict(mean_tokens=sum(n * counts[n] for n in used) / seen, min_tokens=used[0],
                          max_tokens=used[-1])
            macs = sum(quadformer_macs(n) * counts[n] for n in used) / seen
            padded_macs = quadformer_macs(config["n_patches"])
        else:
            tokens = dict.fromkeys(("mean_tokens", "min_tokens", "max_tokens"), config["n_patches"])
            if config["method"] == "quadformer":
                macs = padded_macs = quadformer_macs(config["n_patches"])
            else:
                with torch.no_grad():
                    macs = padded_macs = count_macs(lambda: forward(one))
        with torch.no_grad(), autocast(device, amp):
            seconds = median_seconds(lambda: forward(first), device, timed_batches, warmup)
        results.append({
            "threshold": "", "source": "", **config, **tokens,
            "top1": hits[1] / seen,
            "top5": hits[5] / seen if 5 in hits else None,
            "gmacs": macs / 1e9,
            "gmacs_padded": padded_macs / 1e9,
            "scorer_gmacs": scorer_macs / 1e9 if config["method"] != "uniform" else 0.0,
            "images_per_s": first.shape[0] / seconds,
            "us_per_image": seconds / first.shape[0] * 1e6,
            "n_images": seen,
            "batch_size": first.shape[0],
            "amp": amp,
            "device": str(device),
            "device_name": name,
            "torch": torch.__version__,
        })
    return [{column: row[column] for column in COLUMNS} for row in results]


# ------------------------------------------------------------------------------------------------------- outputs
def format_table(rows: Sequence[dict]) -> str:
    """The rows as a fixed-width text table."""
    lines = [f"{'method':<11}{'budget':>7}{'tokens':>8}{'min':>5}{'max':>5}{'grid':>7}{'top-1':>8}{'top-5':>8}"
             f"{'GMACs':>10}{'scorer':>10}{'images/s':>11}{'us/image':>10}  threshold"]
    for row in rows:
        top5 = f"{100 * row['top5']:7.2f}%" if row["top5"] is not None else f"{'-':>8}"
        threshold = f"  {row['threshold']} ({row['source']})" if row["threshold"] else ""
        lines.append(f"{row['method']:<11}{row['budget']:>7}{row['mean_tokens']:8.4g}{row['min_tokens']:>5}"
                     f"{row['max_tokens']:>5}{row['grid'] or '-':>7}{100 * row['top1']:7.2f}%{top5}"
                     f"{row['gmacs']:10.4g}{row['scorer_gmacs']:10.4g}{row['images_per_s']:11.1f}"
                     f"{row['us_per_image']:10.1f}{threshold}")
    return "\n".join(lines)


def plot_budgets(rows: Sequence[dict], path: str | Path, title: str = "") -> Path | None:
    """Draws ``path``: top-1 against the (mean) number of tokens per image and images/s against it, one line per
    method (fixed budgets, uniform grid, adaptive points). Returns
    None (and says how to install it) when matplotlib is missing."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        print(f"matplotlib is not installed, so {Path(path).name} is not drawn: pip install matplotlib")
        return None
    figure = Figure(figsize=(11, 4.2), layout="constrained")
    accuracy, speed = figure.subplots(1, 2)
    for method, style in (("quadformer", "o-"), ("uniform", "s--"), ("adaptive", "^:")):
        points = sorted((row["mean_tokens"], row["top1"], row["images_per_s"]) for row in rows
                        if row["method"] == method)
        if points:
            tokens, top1, rate = zip(*points)
            accuracy.plot(tokens, [100 * value for value in top1], style, label=method)
            speed.plot(tokens, rate, style, label=method)
    for axes, label in ((accuracy, "top-1 (%)"), (speed, "images/s")):
        axes.set_xlabel("tokens per image (adaptive: mean)")
        axes.set_ylabel(label)
        axes.grid(alpha=0.3)
        axes.legend()
    if title:
        figure.suptitle(title)
    path = Path(path)
    figure.savefig(path, dpi=120)
    return path


def write_results(rows: Sequence[dict], output: str | Path, config: dict | None = None,
                  title: str = "") -> dict[str, Path | None]:
    """Writes ``budgets.csv`` (the rows), ``budgets.json`` (``{"config", "macs_note", "rows"}``) and
    ``budgets.png`` (:func:`plot_budgets`) to the folder ``output``; returns their paths (png None when not
    drawn)."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    paths = {"csv": output / "budgets.csv", "json": output / "budgets.json"}
    with paths["csv"].open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    notes = {"macs_note": MACS_NOTE, "macs_adaptive_note": MACS_ADAPTIVE_NOTE}
    paths["json"].write_text(json.dumps({"config": config or {}, **notes, "rows": list(rows)}, indent=2) + "\n")
    paths["png"] = plot_budgets(rows, output / "budgets.png", title)
    return paths


# ------------------------------------------------------------------------------------------------------ command
def _training_checkpoint(path: Path) -> dict | None:
    """The file at ``path`` when it is a checkpoint of ``python -m mixres.train`` (its threshold and options are
    read), else None: a state dict, a safetensors file, a file that cannot be read (its weights are loaded later,
    with their own error)."""
    if path.suffix == ".safetensors":
        return None
    try:
        state = read_torch_file(path)
    except (ValueError, OSError):
        return None
    return state if isinstance(state, dict) and isinstance(state.get("args"), dict) and "model" in state else None


def _head_classes(state: dict[str, Tensor]) -> int | None:
    """The number of classes of a Quadformer's, a UniformGrid's or a plain ViT's state dict: its head's outputs
    (None: no head)."""
    head = next((state[key] for key in ("vit.head.weight", "quadformer.vit.head.weight", "head.weight")
                 if key in state), None)
    return head.shape[0] if head is not None and head.dim() == 2 else None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m mixres.evaluate", description=__doc__.splitlines()[0],
                                     formatter_class=HelpFormatter)
    model = add_model_options(parser, quadformer_only=True,
                              num_classes_default="the --checkpoint head's, else timm's")
    model.add_argument("--checkpoint", type=Path, default=None,
                       help="a trained Quadformer's weights (the forms of --pretrained-file), loaded last; every "
                            "weight must match")
    data = parser.add_argument_group("data")
    data.add_argument("--data", required=True,
                      help=f"a folder of class sub-folders (or of split folders), {SMALL_OBJECTS!r}, or a timm "
                           f"dataset name (torch/cifar10, read under $MIXRES_DATA)")
    data.add_argument("--split", default="val", help="the split to evaluate")
    data.add_argument("--val-length", type=POSITIVE, default=None, help="images of a generated split (small-objects)")
    add_data_kwargs_option(data)
    data.add_argument("--batch-size", type=POSITIVE, default=64, help="batch size, also of the throughput timing")
    data.add_argument("--limit", type=POSITIVE, default=None,
                      help="evaluate at most this many images, spread evenly over the dataset")
    data.add_argument("--skip-bad-images", action="store_true",
                      help="leave out image files that cannot be read (each file is read once first); the number "
                           "left out is printed and saved in budgets.json. Without it, the first unreadable file "
                           "stops the run with its name")
    add_workers_option(data, "data-loading processes")
    run = parser.add_argument_group("run")
    run.add_argument("--budgets", type=_BUDGETS, default=None,
                     help="comma-separated leaf budgets, e.g. 49,64,100,145,196 (default: 5 valid ones from the "
                          "fewest to the most)")
    adaptive = parser.add_argument_group(
        "adaptive budgets (points of the sweep beside --budgets)",
        "Each image gets its own number of leaves, at most --n-patches. A training checkpoint (--checkpoint) that ran "
        "with a threshold adds its own point. Their GMACs are the mean over the images at each image's own length "
        "(the packed forward's; gmacs_padded: the padded forward's, the cap's); their images/s time the packed "
        "forward.")
    adaptive.add_argument("--n-patches", type=POSITIVE, default=None,
                          help="the cap N_max of the adaptive points (default: the training checkpoint's "
                               "--n-patches, else the model's)")
    add_adaptive_options(adaptive, several=True)
    add_device_option(run)
    add_amp_option(run)
    run.add_argument("--warmup", type=COUNT, default=2, help="untimed forward calls before timing")
    run.add_argument("--timed-batches", type=POSITIVE, default=5, help="timed forward calls (the median is reported)")
    add_seed_option(run, "seed of random initialisations (random scorer weights) and of generated data")
    run.add_argument("--output", type=Path, default=Path("out/eval"), help="folder for budgets.csv, .json, .png")
    return parser


def main(argv: Sequence[str] | None = None) -> list[dict]:
    """Runs the sweep (see the module docstring) and returns its rows. Bad options exit with status 2 and a
    message naming the problem."""
    parser = build_parser()
    args = parser.parse_args(argv)
    check_model_options(parser, args, quadformer_only=True)
    require_file(parser, args, "checkpoint")

    device = args.device
    torch.manual_seed(args.seed)
    trained = _training_checkpoint(args.checkpoint) if args.checkpoint is not None else None
    if args.n_patches is None and trained is not None:
        args.n_patches = trained["args"].get("n_patches")
    try:
        if args.num_classes is None and args.checkpoint is not None:
            # A trained model's classes are in its checkpoint: its head says how many.
            args.num_classes = _head_classes(read_state_dict(args.checkpoint))
        model = build_model(args)
        if args.checkpoint is not None:
            load_weights(model, args.checkpoint)
    except (ValueError, TypeError, RuntimeError, OSError) as error:
        parser.error(f"cannot build {args.model}: {error}")
    geometry = model.geometry
    try:
        budgets = parse_budgets(args.budgets, geometry) if args.budgets else default_budgets(geometry)
    except ValueError as error:
        parser.error(f"--budgets: {error}")
    thresholds = [("--threshold", threshold) for threshold in args.threshold or ()]
    for source, threshold in thresholds:
        try:
            check_threshold(threshold, geometry)
        except (ValueError, TypeError) as error:
            parser.error(f"--threshold {format_threshold(threshold)}: {error}")
    for mean_tokens in args.mean_tokens or ():
        problem = check_mean_tokens(mean_tokens, geometry.n_roots, model.n_patches)
        if problem:
            parser.error(problem)
    if trained is not None and trained.get("threshold") is not None:
        thresholds.append((f"checkpoint {args.checkpoint.name}", trained["threshold"]))
    try:
        dataset = build_dataset(args.data, args.split, (geometry.height, geometry.width),
                                model.input_mean.flatten().tolist(), model.input_std.flatten().tolist(),
                                train=False, length=args.val_length, seed=args.seed,
                                generator_kwargs=args.data_kwargs)
    except (ValueError, TypeError, OSError) as error:
        parser.error(f"--data: {error}")
    classes = getattr(dataset, "classes", None)
    if classes is not None and len(classes) > model.num_classes:
        warnings.warn(f"the data has {len(classes)} classes but the model {model.num_classes}: set --num-classes",
                      stacklevel=2)
    if args.limit is not None and not isinstance(dataset, IterableDataset):
        dataset = evenly_spaced(dataset, args.limit)
    unreadable = None
    if args.skip_bad_images:
        size = len(dataset)
        try:
            dataset, unreadable = skip_unreadable_images(dataset, args.workers)
        except ValueError as error:
            parser.error(f"--skip-bad-images: {error} (--data {args.data})")
        print(report_unreadable(unreadable, size, "images"))
    calibrations = []
    if args.mean_tokens:
        try:
            images = calibration_sample(dataset, args.calibration_images).to(device)
        except UnreadableImageError as error:
            release_loader(error)
            parser.error(f"--data: {error.brief} (--skip-bad-images leaves unreadable files out)")
        for mean_tokens in args.mean_tokens:
            calibration = calibrate_model(model.to(device), images, mean_tokens, model.n_patches, args.batch_size)
            print(f"calibrated on the evaluation images: {describe_calibration(calibration, images.shape[0])}")
            thresholds.append((f"--mean-tokens {mean_tokens:g}", calibration.threshold))
            calibrations.append(calibration_record(calibration, images.shape[0]))
        del images
    loader = build_loader(dataset, args.batch_size, train=False, workers=args.workers)

    print(f"{args.model}: {type(model.scorer).__name__} scorer, {model.min_patch_size}-{model.max_patch_size} px "
          f"leaves, pos_embed={model.pos_embed_kind}, {geometry.height}x{geometry.width} images; budgets "
          f"{', '.join(map(str, budgets))}; on {device} ({device_name(device)}), torch {torch.__version__}"
          f"{f', autocast to {args.amp}' if args.amp else ''}")
    try:
        rows = evaluate_budgets(model, loader, budgets, device, limit=args.limit, amp=args.amp, warmup=args.warmup,
                                timed_batches=args.timed_batches, thresholds=thresholds)
    except UnreadableImageError as error:
        release_loader(error)
        parser.error(f"--data: {error.brief} (--skip-bad-images leaves unreadable files out)")
    config = {key: str(value) if isinstance(value, (Path, torch.device)) else value
              for key, value in vars(args).items()}
    config.update(budgets=budgets, thresholds=[[source, threshold] for source, threshold in thresholds],
                  calibrations=calibrations, scorer_class=type(model.scorer).__name__,
                  min_patch_size=model.min_patch_size, max_patch_size=model.max_patch_size,
                  image_size=[geometry.height, geometry.width])
    if unreadable is not None:
        config["unreadable_skipped"] = unreadable
    paths = write_results(rows, args.output, config,
                          title=f"{args.model}, {type(model.scorer).__name__} scorer, {rows[0]['device_name']}")
    print(format_table(rows))
    print(MACS_NOTE)
    if thresholds:
        print(MACS_ADAPTIVE_NOTE)
    print(f"images/s and us/image: the whole forward (scorer, tokenize, ViT; adaptive: packed) on batches of "
          f"{rows[0]['batch_size']}, median of {args.timed_batches} after {args.warmup} warm-up calls; top-1 over "
          f"{rows[0]['n_images']} images" + (f" ({len(unreadable)} unreadable ones left out)" if unreadable else ""))
    print("Wrote " + ", ".join(str(path) for path in paths.values() if path is not None))
    return rows


if __name__ == "__main__":
    main()
