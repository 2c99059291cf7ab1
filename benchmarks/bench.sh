#!/usr/bin/env bash
# Runs the benchmark suite and keeps what it measured, to be committed: OUT_DIR/benchmark.json (pytest-benchmark's
# JSON: machine, commit, every timing and the extra figures), OUT_DIR/bench.log (the run's output, with the summary
# of throughputs and costs) and OUT_DIR/env.txt (date, commit, torch, device). benchmarks/RESULTS.md cites these.
#
#   benchmarks/bench.sh [pytest arguments]    (`make bench` runs it with the .venv's python)
#   env: PYTHON (python3), OUT_DIR (benchmarks/results/<UTC date>-<device>, see results_dir.py)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
out=${OUT_DIR:-$("$PYTHON" benchmarks/results_dir.py)}
mkdir -p "$out"
{
  echo "date: $(date -u '+%F %T UTC')"
  changes=$(git diff --quiet HEAD 2>/dev/null || echo " (with local changes)")
  echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)$changes"
  "$PYTHON" -c "
import torch, mixres
from mixres.apps.timing import device_name
device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
print('torch:', torch.__version__)
print('device:', device_name(device))
print('cpu:', device_name(torch.device('cpu')))
print('mixres kernels:', [d for d in ('cpu', 'cuda') if mixres.ops.has_kernel(d)], '| built with CUDA', mixres.ops.cuda_version())"
  echo "command: benchmarks/bench.sh $*"
} > "$out/env.txt"
cat "$out/env.txt"
"$PYTHON" -m pytest benchmarks -q -p no:cacheprovider --benchmark-json="$out/benchmark.json" "$@" 2>&1 |
  tee "$out/bench.log"
echo "bench: results in $out"
