"""The log of ``python -m mixres.train``: one row per epoch, appended to ``log.jsonl`` and ``log.csv``."""
from __future__ import annotations

import csv
import json
from pathlib import Path

__all__ = ["LOG_FIELDS", "append_log"]

LOG_FIELDS = ("epoch", "lr", "train_loss", "val_loss", "val_top1", "val_top5", "images_per_s", "seconds",
              "train_skipped", "val_skipped", "threshold")


def append_log(output: Path, row: dict) -> None:
    with open(output / "log.jsonl", "a") as file:
        file.write(json.dumps(row) + "\n")
    csv_path = output / "log.csv"
    new = not csv_path.exists() or csv_path.stat().st_size == 0
    fields = [field for field in LOG_FIELDS if field in row]
    if not new:  # a resumed run keeps the file's columns, should its options add or drop some (log.jsonl has all)
        with open(csv_path, newline="") as file:
            fields = next(csv.reader(file), fields)
    with open(csv_path, "a", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=fields, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerow(row)
