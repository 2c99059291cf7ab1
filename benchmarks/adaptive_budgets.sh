#!/usr/bin/env bash
# Issue 15, item 6: does a content-adaptive token budget pay, at equal MEAN tokens? The task is
# mixres.datasets.SmallObjects(objects=(1, 4)): 1 to 4 small digits per 256 px image on a faint texture, the label the
# largest digit, so an image with more digits needs more small leaves. For each mean token count M, the tiny ViT of
# benchmarks/small_objects.sh (D=96, 4 blocks, 3 heads, xy sin-cos positions, max pooling), as a Quadformer on
# pixel-blur leaves of 16-64 px, is trained from scratch twice:
#   - fixed: --n-patches N, N the valid budget (16 + 3k) nearest M, for every image;
#   - adaptive: --mean-tokens M --n-patches CAP: mixres.train calibrates the stopping threshold whose mean token
#     count is M (mixres.calibrate_threshold), each image stops splitting when its best leaf scores at or below it,
#     and CAP (N_max) bounds every image's leaves.
# NEEDS mixres.train's --mean-tokens flag (issue 15, being added alongside this script): without it the adaptive
# runs fail at once with argparse's "unrecognized arguments: --mean-tokens".
#
#   benchmarks/adaptive_budgets.sh [OUT]        (default benchmarks/results/adaptive_budgets)
#   env: PYTHON (.venv/bin/python), MEANS ("25 40 64"), CAP (3: N_max = the largest valid budget <= 3 M; or "max":
#        256, one leaf per 16 px cell), EPOCHS (10), TRAIN (30000), VAL (2000), BATCH (128), LR (1e-3), WORKERS
#        (the CPU count, at most 8), DEVICE (cuda if available, else cpu), DATA_KWARGS (SmallObjects arguments as
#        JSON; default '{"objects": [1, 4]}'), MODEL_KWARGS (the ViT's, as JSON; below), DRY_RUN (1: print the
#        commands, run nothing, write nothing)
# Prints a Markdown table (also OUT/summary.md, with the figure OUT/top1.png: benchmarks/adaptive_budgets_summary.py)
# of each run's best and last validation top-1 and its training images/s, then measures, on the same data, the
# tokens each budget gives the val images, which digits land
# in small leaves, and the inference images/s of fixed, padded and packed forwards at each M
# (benchmarks/adaptive_budgets_coverage.py, into OUT/coverage.md; it needs no training: throughput does not depend
# on the weights). The table to put in RESULTS.md is both: top-1 from summary.md, images/s from coverage.md.
# Predictions from that script before any training: benchmarks/results/adaptive_budgets_coverage*.md.
# OUT is meant to be committed, as benchmarks/small_objects.sh's: each run's log.jsonl, log.csv and train.log,
# summary.md, coverage.md and environment.txt; the checkpoints (*.pt) are ignored by git.
# Each run sees EPOCHS x TRAIN images: on a 2-core CPU about 10-13 minutes per run at these sizes
# (benchmarks/RESULTS.md, "Small objects"), so about 1 h 20 for the 6 runs of the defaults.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
# shellcheck source=benchmarks/training_runs.sh
source benchmarks/training_runs.sh
OUT="${1:-benchmarks/results/adaptive_budgets}"
MEANS="${MEANS:-25 40 64}"
CAP="${CAP:-3}"
DATA_KWARGS="${DATA_KWARGS:-{\"objects\": [1, 4]\}}"
DRY_RUN="${DRY_RUN:-0}"
case "$DRY_RUN" in 0|1) ;; *) echo "DRY_RUN must be 0 or 1, got '$DRY_RUN'" >&2; exit 2 ;; esac
case "$CAP" in max|[1-9]|[1-9][0-9]) ;; *) echo "CAP must be a whole multiple of M (1-99) or max, got '$CAP'" >&2
  exit 2 ;; esac
# The Quadformer of benchmarks/small_objects.sh (see why max pooling there), run on packed mosaics: an adaptive
# budget's padded mosaics (N_max = CAP x M) would make every image cost N_max tokens in the ViT; packed, each costs
# its own (the same logits; a fixed budget has no padding, so nothing to pack).
MAX_POOLED_VIT='{"embed_dim": 96, "depth": 4, "num_heads": 3, "global_pool": "max", "class_token": false,
  "token_layout": "packed"}'
MODEL_KWARGS="${MODEL_KWARGS:-$MAX_POOLED_VIT}"
WORKERS="${WORKERS:-$(( $(nproc) < 8 ? $(nproc) : 8 ))}"
DEVICE_ARGS=()
[ -n "${DEVICE:-}" ] && DEVICE_ARGS=(--device "$DEVICE")
# 256 px images, 16-64 px leaves: 16 roots, budgets 16 + 3k up to 256.
ROOTS=16
MAX_PATCHES=256

# The valid budget nearest M (the smaller of two equally near), and the cap: the largest valid budget <= CAP x M.
nearest_budget() { local m=$1; echo $(( ROOTS + 3 * ((m - ROOTS + 1) / 3) )); }
cap_for() {
  local m=$1 cap
  if [ "$CAP" = max ]; then echo "$MAX_PATCHES"; return; fi
  cap=$(( ROOTS + 3 * ((CAP * m - ROOTS) / 3) ))
  (( cap > MAX_PATCHES )) && cap=$MAX_PATCHES
  echo "$cap"
}

# The runs, as "kind M n_patches".
RUNS=()
for m in $MEANS; do
  case "$m" in ''|*[!0-9]*) echo "MEANS must be whole numbers, got '$m'" >&2; exit 2 ;; esac
  if (( m < ROOTS || m > MAX_PATCHES )); then
    echo "each of MEANS must be from $ROOTS (the roots) to $MAX_PATCHES, got $m" >&2; exit 2
  fi
  RUNS+=("fixed $m $(nearest_budget "$m")" "adaptive $m $(cap_for "$m")")
done

run() {  # prints the command; runs it unless DRY_RUN=1
  printf '%q ' "$@"; echo
  [ "$DRY_RUN" = 1 ] || "$@"
}

if [ "$DRY_RUN" = 0 ]; then
  NAMES=()
  for entry in "${RUNS[@]}"; do read -r kind m n <<<"$entry"; NAMES+=("$kind-$m"); done
  refuse_existing_runs "$OUT" "${NAMES[@]}"
  write_environment "$OUT" "benchmarks/adaptive_budgets.sh $OUT" "MEANS='$MEANS' CAP=$CAP EPOCHS=${EPOCHS:-10}\
 TRAIN=${TRAIN:-30000} VAL=${VAL:-2000} BATCH=${BATCH:-128} LR=${LR:-1e-3} WORKERS=$WORKERS DEVICE=${DEVICE:-}\
 DATA_KWARGS='$DATA_KWARGS' MODEL_KWARGS='$MODEL_KWARGS'"
fi

for entry in "${RUNS[@]}"; do
  read -r kind m n <<<"$entry"
  extra=()
  [ "$kind" = adaptive ] && extra=(--mean-tokens "$m")
  start=$SECONDS
  [ "$DRY_RUN" = 1 ] || mkdir -p "$OUT/$kind-$m"
  # The same arguments as benchmarks/small_objects.sh's Quadformer runs, but the data and the budget.
  command=("$PYTHON" -m mixres.train --model quadformer_vit_tiny_patch16_224 --img-size 256
    --model-kwargs "$MODEL_KWARGS" --pos-embed xy --scorer pixel-blur
    --n-patches "$n" "${extra[@]}" --data small-objects --data-kwargs "$DATA_KWARGS"
    --train-length "${TRAIN:-30000}" --val-length "${VAL:-2000}"
    --no-augment --epochs "${EPOCHS:-10}" --warmup-epochs 1 --batch-size "${BATCH:-128}" --lr "${LR:-1e-3}"
    --weight-decay 0.05 --workers "$WORKERS" --seed 0 "${DEVICE_ARGS[@]}" --output "$OUT/$kind-$m")
  if [ "$DRY_RUN" = 1 ]; then
    run "${command[@]}"
  else
    run "${command[@]}" 2>&1 | tee "$OUT/$kind-$m/train.log"
    echo "$kind-$m: $(( SECONDS - start )) s" >>"$OUT/environment.txt"
  fi
done

# summary.md (top-1 and training images/s of each run) and top1.png, from the runs' logs.
run "$PYTHON" benchmarks/adaptive_budgets_summary.py "$OUT" \
  --title "SmallObjects $DATA_KWARGS, 256 px: fixed vs adaptive"

# The caps' factor for the coverage script: CAP itself, and max (whose rows show what the cap costs, if anything).
CAPS=(max)
[ "$CAP" != max ] && CAPS+=("$CAP")
# shellcheck disable=SC2086  # MEANS is a list
# --seed 1: the validation images that mixres.train used (its val set is drawn with --seed + 1).
run "$PYTHON" benchmarks/adaptive_budgets_coverage.py --data-kwargs "$DATA_KWARGS" --val-items "${VAL:-2000}" \
  --seed 1 --means $MEANS --caps "${CAPS[@]}" --output "$OUT/coverage.md"
[ "$DRY_RUN" = 1 ] || echo "done: $(date -u +%Y-%m-%dT%H:%MZ)" >>"$OUT/environment.txt"
