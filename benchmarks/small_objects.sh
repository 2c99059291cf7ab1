#!/usr/bin/env bash
# The paper's claim, small enough to rerun in an hour on a CPU: at equal token counts, a Quadformer beats a
# uniform-grid ViT on a task where content-adaptive resolution matters. mixres.datasets.SmallObjects: one 8-11 px
# digit on a faint 256 px texture (scikit-image's brick, grass, gravel); the label is the digit. For each budget N,
# the same tiny ViT (D=96, 4 blocks, 3 heads, xy sin-cos positions, max pooling) is trained from scratch twice: as a
# Quadformer on N leaves of 16-64 px (pixel-blur scores), and on the image resized to the grid of about N 16 px
# patches (--uniform-grid).
#
#   benchmarks/small_objects.sh [OUT]        (default out/small_objects)
#   env: PYTHON (.venv/bin/python), BUDGETS ("25 49"), EPOCHS (10), TRAIN (30000), VAL (2000), BATCH (128),
#        LR (1e-3), WORKERS (the CPU count, at most 8), DEVICE (cuda if available, else cpu), DATA_KWARGS
#        (SmallObjects arguments as JSON, e.g. '{"object_size": [20, 28]}' for larger digits; default {})
# Prints a Markdown table (also OUT/summary.md) of the best and last validation top-1 of each run, then sweeps the
# budgets of the last budget's Quadformer against the uniform grid of its own weights (OUT/sweep/budgets.png).
# Each run sees 300000 images. On a 2-core CPU, each training took 9-13 minutes and the whole script 50 (results and
# caveats: benchmarks/RESULTS.md).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
OUT="${1:-out/small_objects}"
BUDGETS="${BUDGETS:-25 49}"
DATA_KWARGS="${DATA_KWARGS:-{\}}"
# Max pooling over the tokens, no class token: the label lies in one small object, and max pooling lets each token's
# evidence reach the head before attention has learnt where to look. With the class token (or average pooling) the
# same ViT stayed at chance for 10 epochs of 20000 images as a Quadformer.
MODEL_KWARGS='{"embed_dim": 96, "depth": 4, "num_heads": 3, "global_pool": "max", "class_token": false}'
WORKERS="${WORKERS:-$(( $(nproc) < 8 ? $(nproc) : 8 ))}"
DEVICE_ARGS=()
[ -n "${DEVICE:-}" ] && DEVICE_ARGS=(--device "$DEVICE")

for n in $BUDGETS; do
  for method in quadformer uniform; do
    extra=()
    [ "$method" = uniform ] && extra=(--uniform-grid)
    "$PYTHON" -m mixres.train --model quadformer_vit_tiny_patch16_224 --img-size 256 \
      --model-kwargs "$MODEL_KWARGS" --pos-embed xy --scorer pixel-blur \
      --n-patches "$n" "${extra[@]}" --data small-objects --data-kwargs "$DATA_KWARGS" \
      --train-length "${TRAIN:-30000}" --val-length "${VAL:-2000}" \
      --no-augment --epochs "${EPOCHS:-10}" --warmup-epochs 1 --batch-size "${BATCH:-128}" --lr "${LR:-1e-3}" \
      --weight-decay 0.05 --workers "$WORKERS" --seed 0 "${DEVICE_ARGS[@]}" --output "$OUT/$method-$n"
  done
done

"$PYTHON" - "$OUT" $BUDGETS <<'PY'
import json, sys
from pathlib import Path

import torch

out, budgets = Path(sys.argv[1]), sys.argv[2:]
lines = ["| method | tokens | best val top-1 (%) | last val top-1 (%) | epochs | train images/s |",
         "|---|---|---|---|---|---|"]
for n in budgets:
    for method in ("quadformer", "uniform"):
        rows = [json.loads(line) for line in (out / f"{method}-{n}" / "log.jsonl").read_text().splitlines()]
        tokens = n
        if method == "uniform":
            from mixres.models import grid_for_budget
            rows_, cols = grid_for_budget(int(n), (256, 256))
            tokens = f"{rows_ * cols} ({rows_}x{cols} grid)"
        lines.append(f"| {method} | {tokens} | {max(r['val_top1'] for r in rows):.1f} | {rows[-1]['val_top1']:.1f} "
                     f"| {rows[-1]['epoch']} | {rows[-1]['images_per_s']:.0f} |")
table = "\n".join(lines)
print(table)
(out / "summary.md").write_text(table + "\n")
PY

last="${BUDGETS##* }"
# --seed 1: the validation images that mixres.train used (its val set is drawn with --seed + 1).
"$PYTHON" -m mixres.evaluate --model quadformer_vit_tiny_patch16_224 --img-size 256 \
  --model-kwargs "$MODEL_KWARGS" --pos-embed xy --scorer pixel-blur --num-classes 10 \
  --checkpoint "$OUT/quadformer-$last/best.pt" --data small-objects --data-kwargs "$DATA_KWARGS" \
  --val-length "${VAL:-2000}" --seed 1 \
  --budgets 16,25,34,49,64,100 --batch-size "${BATCH:-128}" --workers "$WORKERS" "${DEVICE_ARGS[@]}" \
  --output "$OUT/sweep"
