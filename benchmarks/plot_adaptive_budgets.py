"""The figure of benchmarks/adaptive_budgets.sh's runs (issue 15, item 6): validation top-1 against the mean tokens
per image, fixed and adaptive budgets, from each run's log.

    python benchmarks/plot_adaptive_budgets.py OUT [--output PNG]     (default: OUT/top1.png)

Reads OUT/fixed-M/log.jsonl and OUT/adaptive-M/log.jsonl (one row per epoch, ``val_top1``) for every M it finds,
and plots each run's best and last epoch's top-1 at M. Needs matplotlib.
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path


def runs(out: Path) -> dict[str, dict[int, list[dict]]]:
    """{"fixed" | "adaptive": {M: the log's rows}} of the runs under ``out``."""
    found: dict[str, dict[int, list[dict]]] = {"fixed": {}, "adaptive": {}}
    for log in sorted(out.glob("*/log.jsonl")):
        match = re.fullmatch(r"(fixed|adaptive)-(\d+)", log.parent.name)
        if match:
            rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
            found[match[1]][int(match[2])] = rows
    return found


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="the folder benchmarks/adaptive_budgets.sh wrote")
    parser.add_argument("--output", type=Path, default=None, help="the PNG to write (default: OUT/top1.png)")
    parser.add_argument("--title", default="Fixed against adaptive budgets at equal mean tokens",
                        help="the figure's title (say what the task was)")
    args = parser.parse_args(argv)
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 4), layout="constrained")
    axes = figure.subplots()
    for (kind, by_mean), colour in zip(runs(args.out).items(), ("tab:blue", "tab:orange")):
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
    output = args.output or args.out / "top1.png"
    figure.savefig(output, dpi=120)
    print(f"wrote {output}")
    return output


if __name__ == "__main__":
    main()
