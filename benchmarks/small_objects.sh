#!/usr/bin/env bash
# The paper's claim, small enough to rerun on a CPU: at equal token counts, a Quadformer beats a uniform-grid ViT on
# a task where content-adaptive resolution matters. mixres.datasets.SmallObjects: one 8-11 px digit on a faint
# 256 px texture (scikit-image's brick, grass, gravel); the label is the digit. For each budget N, the same tiny ViT
# (D=96, 4 blocks, 3 heads, xy sin-cos positions, max pooling) is trained from scratch twice: as a Quadformer on N
# leaves of 16-64 px (pixel-blur scores), and on the image resized to the grid of about N 16 px patches
# (--uniform-grid). Then the control: the same uniform-grid training on CONTROL_TOKENS tokens (256: the 16x16 grid
# of the full-resolution image), which tells whether the small grids fail for lack of resolution.
#
#   benchmarks/small_objects.sh [OUT]        (default benchmarks/results/small_objects)
#   env: PYTHON (.venv/bin/python), BUDGETS ("25 49"), EPOCHS (10), TRAIN (30000), VAL (2000), BATCH (128),
#        LR (1e-3), WORKERS (the CPU count, at most 8), DEVICE (cuda if available, else cpu), DATA_KWARGS
#        (SmallObjects arguments as JSON, e.g. '{"object_size": [20, 28]}' for larger digits; default {}),
#        CONTROL (1: run the control; 0: skip it), CONTROL_TOKENS (256), MODEL_KWARGS (the ViT's, as JSON; below)
# Prints a Markdown table (also OUT/summary.md) of the best and last validation top-1 of each run, then sweeps the
# budgets of the last budget's Quadformer against the uniform grid of its own weights (OUT/sweep/budgets.csv,
# .json, .png).
# OUT is meant to be committed: it holds each run's log.jsonl and log.csv (one row per epoch) and train.log (what
# it printed), the summary, the sweep (and sweep.log) and environment.txt (the commit, date, machine, versions and
# each run's seconds); the checkpoints (*.pt, which the sweep reads) are ignored by git
# (benchmarks/results/.gitignore).
# Each run sees 300000 images. On a 2-core CPU (2026-11-25), each Quadformer or small-grid training took 9-13
# minutes, the control 46 and the sweep under one: 50 minutes without the control, about 96 with it (results and
# caveats: benchmarks/RESULTS.md).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
# shellcheck source=benchmarks/training_runs.sh
source benchmarks/training_runs.sh
OUT="${1:-benchmarks/results/small_objects}"
BUDGETS="${BUDGETS:-25 49}"
DATA_KWARGS="${DATA_KWARGS:-{\}}"
CONTROL="${CONTROL:-1}"
CONTROL_TOKENS="${CONTROL_TOKENS:-256}"
case "$CONTROL" in 0|1) ;; *) echo "CONTROL must be 0 or 1, got '$CONTROL'" >&2; exit 2 ;; esac
# Max pooling over the tokens, no class token: the label lies in one small object, and max pooling lets each token's
# evidence reach the head before attention has learnt where to look (with the class token or average pooling, see
# the caveats in benchmarks/RESULTS.md). MODEL_KWARGS replaces these, to try others.
MAX_POOLED_VIT='{"embed_dim": 96, "depth": 4, "num_heads": 3, "global_pool": "max", "class_token": false}'
MODEL_KWARGS="${MODEL_KWARGS:-$MAX_POOLED_VIT}"
WORKERS="${WORKERS:-$(( $(nproc) < 8 ? $(nproc) : 8 ))}"
DEVICE_ARGS=()
[ -n "${DEVICE:-}" ] && DEVICE_ARGS=(--device "$DEVICE")

# The runs, as "method tokens": each budget's two, then the control.
RUNS=()
for n in $BUDGETS; do RUNS+=("quadformer $n" "uniform $n"); done
[ "$CONTROL" = 1 ] && RUNS+=("control $CONTROL_TOKENS")
NAMES=()
for run in "${RUNS[@]}"; do read -r method n <<<"$run"; NAMES+=("$method-$n"); done
refuse_existing_runs "$OUT" "${NAMES[@]}"
write_environment "$OUT" "benchmarks/small_objects.sh $OUT" "BUDGETS='$BUDGETS' EPOCHS=${EPOCHS:-10}\
 TRAIN=${TRAIN:-30000} VAL=${VAL:-2000} BATCH=${BATCH:-128} LR=${LR:-1e-3} WORKERS=$WORKERS DEVICE=${DEVICE:-}\
 DATA_KWARGS='$DATA_KWARGS' CONTROL=$CONTROL CONTROL_TOKENS=$CONTROL_TOKENS MODEL_KWARGS='$MODEL_KWARGS'"

for run in "${RUNS[@]}"; do
  read -r method n <<<"$run"
  extra=()
  [ "$method" != quadformer ] && extra=(--uniform-grid)
  start=$SECONDS
  mkdir -p "$OUT/$method-$n"
  "$PYTHON" -m mixres.train --model quadformer_vit_tiny_patch16_224 --img-size 256 \
    --model-kwargs "$MODEL_KWARGS" --pos-embed xy --scorer pixel-blur \
    --n-patches "$n" "${extra[@]}" --data small-objects --data-kwargs "$DATA_KWARGS" \
    --train-length "${TRAIN:-30000}" --val-length "${VAL:-2000}" \
    --no-augment --epochs "${EPOCHS:-10}" --warmup-epochs 1 --batch-size "${BATCH:-128}" --lr "${LR:-1e-3}" \
    --weight-decay 0.05 --workers "$WORKERS" --seed 0 "${DEVICE_ARGS[@]}" --output "$OUT/$method-$n" \
    2>&1 | tee "$OUT/$method-$n/train.log"
  echo "$method-$n: $(( SECONDS - start )) s" >>"$OUT/environment.txt"
done

"$PYTHON" - "$OUT" "${RUNS[@]}" <<'PY'
import json, sys
from pathlib import Path

from mixres.models import grid_for_budget

out, runs = Path(sys.argv[1]), [run.split() for run in sys.argv[2:]]
lines = ["| method | tokens | best val top-1 (%) | last val top-1 (%) | epochs | train images/s |",
         "|---|---|---|---|---|---|"]
for method, n in runs:
    rows = [json.loads(line) for line in (out / f"{method}-{n}" / "log.jsonl").read_text().splitlines()]
    tokens = n
    if method != "quadformer":
        grid_rows, grid_cols = grid_for_budget(int(n), (256, 256))
        tokens = f"{grid_rows * grid_cols} ({grid_rows}x{grid_cols} grid)"
    name = "uniform, control" if method == "control" else method
    lines.append(f"| {name} | {tokens} | {max(r['val_top1'] for r in rows):.1f} | {rows[-1]['val_top1']:.1f} "
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
  --output "$OUT/sweep" 2>&1 | tee "$OUT/sweep.log"
echo "done: $(date -u +%Y-%m-%dT%H:%MZ)" >>"$OUT/environment.txt"
