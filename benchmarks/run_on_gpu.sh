#!/usr/bin/env bash
# Builds the extension against the python3 that holds torch, then runs the tests and/or the benchmark suite on
# the GPU, keeping the logs and the benchmark JSON in OUT_DIR, to be committed. This is the command behind the CUDA
# figures of benchmarks/RESULTS.md.
#
#   benchmarks/run_on_gpu.sh [tests] [bench]     (both when none is named)
#   OUT_DIR defaults to benchmarks/results/<UTC date>-cuda-<GPU> (results_dir.py), e.g. 2026-11-29-cuda-h200
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT_DIR:-$(python3 benchmarks/results_dir.py)}
mkdir -p "$out"
steps=${*:-tests bench}
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16}
# The end-to-end benchmark's torch.compile variant compiles three models per setting (tens of minutes in all):
# more than a lent GPU's session allows. MIXRES_BENCH_COMPILE=1 runs it.
export MIXRES_BENCH_COMPILE=${MIXRES_BENCH_COMPILE:-0}
# Machine code for the GPU at hand only: a faster build than the portable default.
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$(python3 -c \
  "import torch; print('%d.%d' % torch.cuda.get_device_capability())")}
# A g++ that links libstdc++ statically into the extension (as the /opt/gcc wrapper that one GPU image puts in CC
# and CXX does) makes every error message crash while formatting a number: use the system compiler.
if [ -x /usr/bin/g++ ]; then
  export CC=/usr/bin/gcc CXX=/usr/bin/g++ LDSHARED="/usr/bin/g++ -shared"
fi
build_log=$(mktemp)
python3 -m pip install -v --no-build-isolation --no-deps -e . > "$build_log" 2>&1 || {
  tail -40 "$build_log"; exit 1; }
tail -60 "$build_log" > "$out/build-tail.log"  # the full verbose log is large; its end says what was built
if ! ldd mixres/_C*.so | grep -q libstdc++; then
  echo "mixres/_C.so links libstdc++ statically: its error paths will crash; build with another compiler"; exit 1
fi
python3 -c "import torch, mixres; print('torch', torch.__version__, '|', torch.cuda.get_device_name(),
      '| mixres CUDA kernels:', mixres.ops.has_kernel('cuda'), '| built with CUDA', mixres.ops.cuda_version())"
status=0
for step in $steps; do
  case $step in
    tests) python3 -m pytest tests -q -p no:cacheprovider -rf 2>&1 | tee "$out/tests.log" | tail -15 ||
             status=1 ;;
    bench) PYTHON=python3 OUT_DIR="$out" benchmarks/bench.sh | tail -25 || status=1 ;;
    *) echo "unknown step $step (tests, bench)"; exit 2 ;;
  esac
done
exit $status
