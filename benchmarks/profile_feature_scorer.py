"""Where the feature scorer's time goes (issue 14): torch.profiler tables of FeatureBased (ShuffleNetV2 x0.5,
random weights) with its backbone as given (NCHW, BatchNorm after each convolution) and with the copy it runs,
prepared for inference (BatchNorm folded, channels-last), and the median time of each, interleaved.

    python benchmarks/profile_feature_scorer.py [--device cpu] [--batch 16] [--size 224] [--min 16] [--max 32]
        [--rounds 5] [--out DIR]

A forward hook on the backbone makes the scorer run the backbone as given (hooks must see every call); the hook
does nothing else. The tables and times go to stdout and, with --out, to DIR/profile.txt.
"""
import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from mixres.apps.timing import device_name, synchronize
from mixres.scorers import FeatureBased


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", type=torch.device, default=torch.device("cpu"))
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--min", type=int, default=16)
    parser.add_argument("--max", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="FeatureBased: backbone")
        scorer = FeatureBased(random_init=True, min_patch_size=args.min, max_patch_size=args.max)
    images = torch.rand(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    images = images.to(args.device)

    def as_given():
        handle = scorer.backbone.register_forward_hook(lambda module, inputs, output: None)
        try:
            return scorer(images)
        finally:
            handle.remove()

    variants = {"backbone as given": as_given, "prepared copy": lambda: scorer(images)}
    lines = [f"FeatureBased({scorer.backbone_name}, random weights), {args.batch} images of {args.size} px, "
             f"{args.min}-{args.max} px patches, on {args.device} ({device_name(args.device)}), "
             f"{torch.get_num_threads()} threads, torch {torch.__version__}"]
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.type == "cuda" else [])
    sort_by = "self_cuda_time_total" if args.device.type == "cuda" else "self_cpu_time_total"
    for name, call in variants.items():
        call()  # warm-up: the prepared copy is made here
        synchronize(args.device)
        with profile(activities=activities) as profiler:
            call()
            synchronize(args.device)
        lines += [f"\n== {name}: one call", profiler.key_averages().table(sort_by=sort_by, row_limit=12)]

    times = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, call in variants.items():
            start = time.perf_counter()
            call()
            synchronize(args.device)
            times[name].append(time.perf_counter() - start)
    medians = {name: 1e3 * statistics.median(values) for name, values in times.items()}
    lines.append(f"\nmedian of {args.rounds} interleaved calls: " + ", ".join(
        f"{name} {ms:.1f} ms" for name, ms in medians.items()) +
        f"; speed-up {medians['backbone as given'] / medians['prepared copy']:.2f}x")
    report = "\n".join(lines)
    print(report)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "profile.txt").write_text(report + "\n")
        print(f"written to {args.out / 'profile.txt'}", file=sys.stderr)


if __name__ == "__main__":
    main()
