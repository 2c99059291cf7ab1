"""The summary of benchmarks/adaptive_budgets.sh's runs (issue 15, item 6), from each run's log: a Markdown table
(OUT/summary.md, also printed) and a figure of validation top-1 against the mean tokens per image, fixed and adaptive
budgets (OUT/top1.png).

    python benchmarks/adaptive_budgets_summary.py OUT [MORE ...] [--title TITLE]

Reads OUT/fixed-M/log.jsonl and OUT/adaptive-M/log.jsonl (one row per epoch: ``val_top1``, ``images_per_s``,
``epoch``) for every M it finds, in OUT and in each further folder (runs of the same settings made at another time;
a run found twice is an error): each run's best and last epoch's top-1 and its last epoch's training images/s. Writes
into OUT. The figure needs matplotlib (without it, the table alone).
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path


def runs(*folders: Path) -> dict[str, dict[int, list[dict]]]:
    """{"fixed" | "adaptive": {M: the log's rows}} of the runs under ``folders``."""
    found: dict[str, dict[int, list[dict]]] = {"fixed": {}, "adaptive": {}}
    for folder in folders:
        for log in sorted(folder.glob("*/log.jsonl")):
            match = re.fullmatch(r"(fixed|adaptive)-(\d+)", log.parent.name)
            if not match:
                continue
            if int(match[2]) in found[match[1]]:
                raise SystemExit(f"{log.parent.name} is in more than one of the folders given")
            found[match[1]][int(match[2])] = [json.loads(line) for line in log.read_text().splitlines()
                                              if line.strip()]
    return found


def table(found: dict[str, dict[int, list[dict]]]) -> str:
    """The Markdown table: per M and budget, the best and last validation top-1, the epochs and the last epoch's
    training images/s."""
    lines = ["| M | budget | best val top-1 (%) | last val top-1 (%) | epochs | train images/s (last epoch) |",
             "|---:|---|---:|---:|---:|---:|"]
    for m in sorted({m for by_mean in found.values() for m in by_mean}):
        for kind, by_mean in found.items():
            if m in by_mean:
                rows = by_mean[m]
                lines.append(f"| {m} | {kind} | {max(row['val_top1'] for row in rows):.1f} | "
                             f"{rows[-1]['val_top1']:.1f} | {rows[-1]['epoch']} | {rows[-1]['images_per_s']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="a folder benchmarks/adaptive_budgets.sh wrote; the outputs go here")
    parser.add_argument("more", type=Path, nargs="*", help="more such folders, whose runs join the table")
    parser.add_argument("--title", default="Fixed against adaptive budgets at equal mean tokens",
                        help="the figure's title (say what the task was)")
    args = parser.parse_args(argv)
    found = runs(args.out, *args.more)
    summary = table(found)
    print(summary)
    (args.out / "summary.md").write_text(summary + "\n")
    try:
        from matplotlib.figure import Figure
    except ImportError:
        print("no figure: matplotlib is not installed")
        return summary

    figure = Figure(figsize=(6, 4), layout="constrained")
    axes = figure.subplots()
    for (kind, by_mean), colour in zip(found.items(), ("tab:blue", "tab:orange")):
        means = sorted(by_mean)
        if not means:
            continue
        axes.plot(means, [max(row["val_top1"] for row in by_mean[m]) for m in means], "o-", color=colour,
                  label=f"{kind}: best epoch")
        axes.plot(means, [by_mean[m][-1]["val_top1"] for m in means], "x--", color=colour, label=f"{kind}: last epoch")
    axes.set_xlabel("mean tokens per image (M)")
    axes.set_ylabel("validation top-1 (%)")
    axes.set_title(args.title, fontsize=9)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.savefig(args.out / "top1.png", dpi=120)
    print(f"wrote {args.out / 'summary.md'} and {args.out / 'top1.png'}")
    return summary


if __name__ == "__main__":
    main()
