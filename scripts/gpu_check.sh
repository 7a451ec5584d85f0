#!/usr/bin/env bash
# On a CUDA machine: build the extension, run the whole test suite and the benchmarks, and write
# logs and results under $OUT (default ./out). Used on the H100 through the device tool:
#
#   bash scripts/gpu_check.sh                 # full build (all head dims, fp16+bf16), tests, benchmarks
#   FLASH_ATTN_HEADDIMS=128 bash scripts/gpu_check.sh --no-bench   # iterate on a subset
#
# Options: --no-tests, --no-bench, --quick (quick benchmarks), --profile (Nsight Compute report
# of one prefill and one decode launch), --pytest-args "...". SKIP_FORWARD_BENCH=1 leaves out the
# prefill benchmark; BENCH_TIMEOUT (default 300 s) bounds each benchmark. --sanitize runs
# compute-sanitizer memcheck and racecheck on decode tests (split, cluster-merged, paired single-split, paged; fp16);
# SANITIZE_CHUNK=0|1 takes half of them, SANITIZE_TOOLS="racecheck" one tool.
# If .whl/ holds wheels (nvidia-cutlass for a machine without it), they are installed first.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
run_tests=1; run_bench=1; profile=0; sanitize=0; quick=""; pytest_args=""
while [ $# -gt 0 ]; do
  case "$1" in
    --no-tests) run_tests=0 ;;
    --no-bench) run_bench=0 ;;
    --quick) quick="--quick" ;;
    --profile) profile=1 ;;
    --sanitize) sanitize=1 ;;
    --pytest-args) pytest_args="$2"; shift ;;
    *) echo "unknown option $1"; exit 2 ;;
  esac
  shift
done
export PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # the in-place build and the package, for scripts in subfolders

if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=$PYTHONPATH:/tmp/site
fi

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/env.log"
python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)' | tee -a "$OUT/env.log"

export FLASH_ATTN_CUDA_ARCHS=${FLASH_ATTN_CUDA_ARCHS:-90}
start=$(date +%s)
# pip install (not build_ext --inplace): the package metadata it records is what transformers'
# is_flash_attn_2_available() looks for (tests/test_hf_integration.py).
MAX_JOBS=${MAX_JOBS:-16} python3 -m pip install --no-build-isolation --no-deps --no-cache-dir -v . >/tmp/build.log 2>&1
status=$?
echo "build: exit $status in $(( $(date +%s) - start )) s (archs $FLASH_ATTN_CUDA_ARCHS, head dims ${FLASH_ATTN_HEADDIMS:-all}, dtypes ${FLASH_ATTN_DTYPES:-all})" | tee -a "$OUT/env.log"
if [ $status -ne 0 ]; then cp /tmp/build.log "$OUT/build.log"; grep -E "error|Error" /tmp/build.log | head -40; exit 1; fi

if [ $run_tests -eq 1 ]; then
  start=$(date +%s)
  timeout 420 python3 -m pytest tests -q -rf --maxfail=${MAXFAIL:-40} -p no:cacheprovider $pytest_args >"$OUT/tests.log" 2>&1
  echo "tests: exit $? in $(( $(date +%s) - start )) s" | tee -a "$OUT/env.log"
  tail -25 "$OUT/tests.log"
fi

if [ $run_bench -eq 1 ]; then
  mkdir -p "$OUT/results"
  # Each benchmark's files join one archive as soon as it ends (the device tool returns at most 8
  # files, and a run stopped at its time limit still returns what is archived).
  bench() {
    local start=$(date +%s)
    timeout "${BENCH_TIMEOUT:-300}" python3 "$@" $quick --out-dir "$OUT/results" >>"$OUT/bench.log" 2>&1
    echo "bench $(basename "$1") ${*:2}: exit $? in $(( $(date +%s) - start )) s" | tee -a "$OUT/env.log"
    tar -C "$OUT" -rf "$OUT/results.tar" results && rm -rf "$OUT/results" && mkdir -p "$OUT/results"
  }
  [ "${SKIP_FORWARD_BENCH:-0}" = 1 ] || bench benchmarks/benchmark_forward.py
  bench benchmarks/benchmark_decode.py
  bench benchmarks/host_overhead.py
  bench benchmarks/sweep_num_splits.py
  bench benchmarks/sweep_num_splits.py --page-size 16 --cells "batch=1|16"
  grep -vE "^\|" "$OUT/bench.log" | tail -60
  rm -rf "$OUT/results"
fi

if [ $sanitize -eq 1 ]; then
  # split, cluster-merged and single-split (clusters of two) decode, paged varlen (pages 16/48/64/256), and paged kv-cache calls
  # with a window (page entries fetched after the lengths) or left padding (any-alignment loader)
  # SANITIZE_CHUNK=0 / 1 runs only the first / second half of these 85 tests (racecheck over all of
  # them takes ~10 minutes on an H100); SANITIZE_TOOLS narrows the tools.
  sel="fp16 and ((128 and ((test_split_kv_decode and (4097 or 1000)) or test_paged_varlen or (paged48 and (sq1_new1 or append1)))) or test_single_split_decode_grids)"
  files="tests/test_split_kv.py tests/test_paged_varlen.py tests/test_kvcache.py"
  # shellcheck disable=SC2086  # word-split on purpose: several files / test ids
  ids=$(python3 -m pytest $files --collect-only -q -p no:cacheprovider -k "$sel" 2>/dev/null | grep "::")
  n=$(echo "$ids" | wc -l); half=$(( (n + 1) / 2 ))
  case "${SANITIZE_CHUNK:-}" in
    0) ids=$(echo "$ids" | head -n $half) ;;
    1) ids=$(echo "$ids" | tail -n +$((half + 1))) ;;
  esac
  echo "sanitize: $(echo "$ids" | wc -l) of $n tests" | tee -a "$OUT/env.log"
  for tool in ${SANITIZE_TOOLS:-memcheck racecheck}; do
    start=$(date +%s)
    # shellcheck disable=SC2086
    timeout "${SANITIZE_TIMEOUT:-200}" compute-sanitizer --tool $tool --error-exitcode 9 python3 -m pytest \
      -q -x -p no:cacheprovider $ids >"$OUT/sanitize_$tool.log" 2>&1
    echo "sanitize $tool: exit $? in $(( $(date +%s) - start )) s" | tee -a "$OUT/env.log"
    grep -E "ERROR SUMMARY|passed|failed" "$OUT/sanitize_$tool.log" | tail -3
  done
fi

if [ $profile -eq 1 ]; then
  ncu --kernel-name regex:flash_fwd --launch-skip 2 --launch-count 2 --section SpeedOfLight \
    --section WarpStateStats --section InstructionStats --section LaunchStats --section Occupancy \
    --section MemoryWorkloadAnalysis python3 benchmarks/profile_forward.py >"$OUT/ncu.txt" 2>&1
  grep -E "Duration|Compute \(SM\) Throughput|Memory Throughput|Stall|Registers|Achieved Occupancy" "$OUT/ncu.txt" | head -40
fi
