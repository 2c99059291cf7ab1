# What the training drivers (benchmarks/small_objects.sh, benchmarks/adaptive_budgets.sh) share; sourced by them.
# Needs PYTHON set.

# refuse_existing_runs OUT NAME...: exits 2 when OUT/NAME/log.jsonl exists. mixres.train appends to a folder's log:
# a second run into the same OUT would mix two runs in one summary.
refuse_existing_runs() {
  local out=$1 name
  shift
  for name in "$@"; do
    if [ -e "$out/$name/log.jsonl" ]; then
      echo "$out/$name/log.jsonl exists: move the previous results away, or give another OUT" >&2
      exit 2
    fi
  done
}

# write_environment OUT COMMAND SETTINGS: OUT/environment.txt, what the results came from: the date, the commit (and
# whether the tree had changes), the command, its settings, the CPU and the versions. The drivers then append each
# run's seconds.
write_environment() {
  local out=$1 command=$2 settings=$3 commit
  commit="$(git rev-parse HEAD 2>/dev/null || echo unknown)"
  git diff --quiet HEAD -- 2>/dev/null || commit+=" (with uncommitted changes)"
  mkdir -p "$out"
  {
    echo "date: $(date -u +%Y-%m-%dT%H:%MZ)"
    echo "commit: $commit"
    echo "command: $command"
    echo "env: $settings"
    echo "cpu: $(grep -m1 'model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2- | sed 's/^ //'), $(nproc) cores"
    "$PYTHON" -c 'import sys, torch, timm; print(f"python {sys.version.split()[0]}, torch {torch.__version__}," \
      f" timm {timm.__version__}, cuda: {torch.cuda.get_device_name() if torch.cuda.is_available() else None}")'
  } >"$out/environment.txt"
}
