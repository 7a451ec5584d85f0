#!/usr/bin/env bash
# On a CUDA machine: build the extension, run the test suite and the benchmarks, and write logs and
# results under $OUT (default ./out):
#
#   bash scripts/gpu_check.sh                                      # full build, tests, benchmarks
#   FLASH_ATTN_HEADDIMS=128 bash scripts/gpu_check.sh --no-bench   # iterate on a subset
#   BENCH="decode specdec" bash scripts/gpu_check.sh --no-tests --baseline base   # before/after
#
# Options: --no-tests, --no-bench, --no-build (use the build a previous call on this still-warm
# machine installed), --quick (quick benchmarks), --sanitize, --profile (Nsight Compute report of
# one prefill and one decode launch, or of PROFILE_KERNEL's launches in PROFILE_TARGET's calls),
# --pytest-args "...", --baseline DIR.
# Environment: BENCH, the benchmarks to run, a subset of "decode specdec forward backward dropout
# host sweep rows triton" (default "decode specdec host sweep"; dropout: the forward and backward
# grids with dropout_p 0.1; rows: the split tile's num_splits sweep); BENCH_TIMEOUT (s per
# benchmark, default 300);
# TEST_TIMEOUT (s for the test suite, default 420);
# MAXFAIL (pytest --maxfail, default 40); BENCH_COMMIT (the commit of this tree, for result headers
# when the copy here has no git metadata of its own); SANITIZE_CHUNK=0|1 (half of the sanitizer
# tests), SANITIZE_K (a pytest -k expression narrowing them), SANITIZE_TOOLS ("memcheck racecheck"),
# SANITIZE_TIMEOUT; PROFILE_KERNEL, PROFILE_TARGET, PROFILE_NAME (--profile).
# --baseline DIR: DIR holds another commit's source tree, made on the development machine with
#   bash scripts/make_trees.sh NAME=REV   (then --baseline base/NAME)
# It is built in place with the same FLASH_ATTN_* knobs and MAX_JOBS, then every chosen benchmark
# runs twice back to back on this card: with PYTHONPATH=DIR (results *_before) and with this tree's
# build (*_after); benchmarks/tools/compare.py prints the per-cell ratios (compare.log).
# If .whl/ holds wheels (nvidia-cutlass for a machine without it), they are installed first.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
run_tests=1; run_bench=1; run_build=1; profile=0; sanitize=0; quick=""; pytest_args=""; baseline=""
while [ $# -gt 0 ]; do
  case "$1" in
    --no-tests) run_tests=0 ;;
    --no-bench) run_bench=0 ;;
    --no-build) run_build=0 ;;
    --quick) quick="--quick" ;;
    --profile) profile=1 ;;
    --sanitize) sanitize=1 ;;
    --pytest-args) pytest_args="$2"; shift ;;
    --baseline) baseline=$(cd "$2" && pwd) || { echo "--baseline: no folder $2"; exit 2; }; shift ;;
    *) echo "unknown option $1"; exit 2 ;;
  esac
  shift
done
export PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # the package, for scripts in subfolders

if ls .whl/*.whl >/dev/null 2>&1; then
  # Installed once per machine: ab_trees.sh installs them first and runs this script while its
  # trees build against /tmp/site, which must not be rewritten under them.
  if [ ! -d /tmp/site/cutlass_library ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
  fi
  export PYTHONPATH=$PYTHONPATH:/tmp/site
fi

nvidia-smi --query-gpu=name,serial,driver_version,memory.total --format=csv,noheader | tee -a "$OUT/env.log"
python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)' | tee -a "$OUT/env.log"

export FLASH_ATTN_CUDA_ARCHS=${FLASH_ATTN_CUDA_ARCHS:-90}
# The card here runs the sm_90a code: no PTX, which would compile every kernel a second time.
export FLASH_ATTN_PTX=${FLASH_ATTN_PTX:-0}
export MAX_JOBS=${MAX_JOBS:-16}

# With --baseline, the baseline tree builds beside this one (each with half the jobs when both
# build): each build ends in a few long compiles (the torch-including files), which then overlap.
baseline_pid=""
if [ -n "$baseline" ] && [ $run_bench -eq 1 ]; then
  [ $run_build -eq 1 ] && export MAX_JOBS=$(( (MAX_JOBS + 1) / 2 ))
  baseline_start=$(date +%s)
  (cd "$baseline" && python3 setup.py build_ext --inplace) >/tmp/baseline_build.log 2>&1 &
  baseline_pid=$!
fi

if [ $run_build -eq 0 ] && python3 -c "import torch, flash_attn_2_cuda" 2>/dev/null; then
  echo "build: the installed one ($(python3 -c 'import flash_attn; print(flash_attn.build_info())'))" | tee -a "$OUT/env.log"
else
  start=$(date +%s)
  # pip install (not build_ext --inplace): the package metadata it records is what transformers'
  # is_flash_attn_2_available() looks for (tests/test_hf_integration.py).
  python3 -m pip install --no-build-isolation --no-deps --no-cache-dir -v . >/tmp/build.log 2>&1
  status=$?
  echo "build: exit $status in $(( $(date +%s) - start )) s (archs $FLASH_ATTN_CUDA_ARCHS, head dims ${FLASH_ATTN_HEADDIMS:-all}, dtypes ${FLASH_ATTN_DTYPES:-all})" | tee -a "$OUT/env.log"
  # The slowest compiles (seconds, object): what bounds the build's wall time at MAX_JOBS.
  log=$(ls -t build/temp*/.ninja_log 2>/dev/null | head -1)
  [ -n "$log" ] && awk 'NR > 1 { n = split($4, p, "/"); printf "  compile %7.1f s %s\n", ($2 - $1) / 1000, p[n] }' "$log" |
    sort -k2 -rn | head -12 >> "$OUT/env.log"
  if [ $status -ne 0 ]; then
    [ -n "$baseline_pid" ] && kill "$baseline_pid" 2>/dev/null
    cp /tmp/build.log "$OUT/build.log"; grep -E "error|Error" /tmp/build.log | head -40; exit 1
  fi
fi

if [ -n "$baseline_pid" ]; then
  wait "$baseline_pid"
  status=$?
  echo "baseline build ($baseline, commit $(cat "$baseline/COMMIT" 2>/dev/null || echo unknown)): exit $status in $(( $(date +%s) - baseline_start )) s" | tee -a "$OUT/env.log"
  if [ $status -ne 0 ]; then cp /tmp/baseline_build.log "$OUT/baseline_build.log"; grep -E "error|Error" /tmp/baseline_build.log | head -40; exit 1; fi
fi

if [ $run_tests -eq 1 ]; then
  start=$(date +%s)
  # --pytest-args is parsed as shell words, so a quoted -k expression stays one argument.
  eval "extra=($pytest_args)"
  timeout "${TEST_TIMEOUT:-420}" python3 -m pytest tests -q -rf --maxfail="${MAXFAIL:-40}" -p no:cacheprovider \
    "${extra[@]}" >"$OUT/tests.log" 2>&1
  echo "tests: exit $? in $(( $(date +%s) - start )) s" | tee -a "$OUT/env.log"
  tail -25 "$OUT/tests.log"
fi

# bench NAME SCRIPT ARGS...: one benchmark (before and after with --baseline, back to back); its
# files join one archive as soon as it ends (the device tool returns at most 8 files, and a run
# stopped at its time limit still returns what is archived).
bench() {
  local name=$1 label dir start status
  shift
  [ -f "$1" ] || { echo "bench $name: no $1, skipped" | tee -a "$OUT/env.log"; return; }
  for label in ${baseline:+before} after; do
    dir="$OUT/results/$label"; mkdir -p "$dir"; start=$(date +%s)
    if [ "$label" = before ]; then
      PYTHONPATH=$baseline:$PYTHONPATH BENCH_COMMIT=$(cat "$baseline/COMMIT" 2>/dev/null || echo "unknown-baseline") \
        timeout "${BENCH_TIMEOUT:-300}" python3 "$@" $quick --out-dir "$dir" >>"$OUT/bench.log" 2>&1
    else
      timeout "${BENCH_TIMEOUT:-300}" python3 "$@" $quick --out-dir "$dir" >>"$OUT/bench.log" 2>&1
    fi
    status=$?
    echo "bench $name${baseline:+ ($label)}: exit $status in $(( $(date +%s) - start )) s" | tee -a "$OUT/env.log"
  done
  if [ -n "$baseline" ]; then
    for f in "$OUT"/results/before/*.json; do
      after="$OUT/results/after/$(basename "$f")"
      [ -f "$f" ] && [ -f "$after" ] && python3 benchmarks/tools/compare.py "$f" "$after" 2>&1 | tee -a "$OUT/compare.log" | grep -E "^[a-z_0-9]+:"
    done
  fi
  for f in "$OUT"/results/*/*; do  # results/LABEL/X.ext -> results/X_LABEL.ext (no suffix without --baseline)
    label=$(basename "$(dirname "$f")"); base=$(basename "$f")
    mv "$f" "$OUT/results/${base%.*}${baseline:+_$label}.${base##*.}"
  done
  rm -rf "$OUT"/results/*/
  tar -C "$OUT" -rf "$OUT/results.tar" results && rm -rf "$OUT/results"
}

if [ $run_bench -eq 1 ]; then
  # A reduced build times the prefill grid's head dims it compiled (64 / 128 / 192 / 256) ...
  grid_args=""
  if [ -n "${FLASH_ATTN_HEADDIMS:-}" ]; then
    hd=$(echo "$FLASH_ATTN_HEADDIMS" | tr ',' '\n' | grep -xE "64|128|192|256" | paste -sd, -)
    [ -n "$hd" ] && grid_args="--headdims $hd"
  fi
  # ... and the dtypes it compiled.
  [ -n "${FLASH_ATTN_DTYPES:-}" ] && grid_args="$grid_args --dtypes $FLASH_ATTN_DTYPES"
  for b in ${BENCH:-decode specdec host sweep}; do
    case "$b" in
      decode) bench decode benchmarks/benchmark_decode.py ;;
      specdec) bench specdec benchmarks/benchmark_decode.py --grid specdec ;;
      forward) bench forward benchmarks/benchmark_forward.py $grid_args ;;
      backward) bench backward benchmarks/benchmark_backward.py $grid_args ;;
      dropout) bench forward_dropout benchmarks/benchmark_forward.py $grid_args --dropout 0.1
               bench backward_dropout benchmarks/benchmark_backward.py $grid_args --dropout 0.1 ;;
      host) bench host benchmarks/host_overhead.py ;;
      sweep) bench sweep benchmarks/sweep_num_splits.py
             bench sweep_paged16 benchmarks/sweep_num_splits.py --page-size 16 --cells "batch=1|16" ;;
      rows) bench sweep_rows benchmarks/sweep_num_splits.py --grid rows ;;
      triton) bench triton benchmarks/tools/triton_ops.py ;;
      *) echo "BENCH: unknown benchmark $b (decode specdec forward backward dropout host sweep rows triton)" | tee -a "$OUT/env.log" ;;
    esac
  done
  grep -vE "^\|" "$OUT/bench.log" | tail -60
fi

if [ $sanitize -eq 1 ]; then
  # split, cluster-merged and single-split (clusters of two) decode, paged varlen (pages 16/48/64/256),
  # paged kv-cache calls with a window (page entries fetched after the lengths) or left padding
  # (any-alignment loader), the Hopper forward (several tiles per persistent block; the V-tail
  # zeroing's named barrier), the Hopper backward (a small causal and a windowed case, GQA; the
  # deterministic variant on a causal GQA case and, unmasked with fewer key blocks than query
  # blocks, in the rotated walk; varlen with the rows past a sequence zeroed), and
  # dropout on both Hopper kernels, and packed GQA tiles (a query head group's rows in one tile: the
  # decode kernel at 16 and 10 rows, the split tile at 27).
  # SANITIZE_CHUNK=0 / 1 runs the first / second half of them (racecheck over all takes ~10 minutes
  # on an H100); SANITIZE_TOOLS narrows the tools (e.g. "racecheck synccheck").
  sel="fp16 and ((128 and ((test_split_kv_decode and (4097 or 1000)) or test_paged_varlen or (paged48 and (sq1_new1 or append1)))) or test_single_split_decode_grids or (test_sm90_forward_matches_reference and mha and (1023-1024 or 113-203 or 2048-77)) or (test_sm90_forward_nan_past_the_used_keys and causal) or (test_sm90_backward_matches_reference and (fp16-256- or fp16-192- or fp16-128- or fp16-96- or fp16-64-) and (113-17-causal or 255-1000-causal or 333-77-win17_5)) or (test_sm90_backward_grouped_heads and (fp16-256- or fp16-128- or fp16-64-) and 255-300 and causal and gqa) or (test_sm90_backward_deterministic and (fp16-256- or fp16-192- or fp16-128- or fp16-64-) and (300-1000-causal-gqa or 1000-300-none-mha)) or test_dropout_backward_hopper_and_sm80 or test_dropout_forward_hopper_and_sm80 or (test_sm90_backward_varlen and (fp16-128- or fp16-64-) and causal) or (test_packed_gqa_matches_reference and 128 and (32-8-q8 or 16-2-q5 or 12-4-q9) and (causal_softcap-1-0 or causal-1000-3 or none-4097-0)))"
  # SANITIZE_K narrows the subset further (a pytest -k expression, e.g. "dropout or sm90_backward").
  [ -n "${SANITIZE_K:-}" ] && sel="($sel) and ($SANITIZE_K)"
  files="tests/test_split_kv.py tests/test_paged_varlen.py tests/test_kvcache.py tests/test_sm90_forward.py tests/test_sm90_backward.py tests/test_dropout.py tests/test_gqa_packing.py"
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
    # Memcheck and synccheck instrument only this library's kernels (flash_*): the references'
    # cuBLAS kernels run as they are. Racecheck with a kernel-name filter (include or exclude)
    # stops with an internal error ("failed to handle a hardware exception", compute-sanitizer
    # 2025.3.1 of CUDA 13.0 on an H100, 2026-12-06); unfiltered it runs, ~5 s per test, and
    # reports hazards inside cuBLAS's nvjet kernels too, so its hazards are counted per kernel.
    filter="--kernel-name kns=flash_"
    [ "$tool" = racecheck ] && filter=""
    # shellcheck disable=SC2086
    timeout "${SANITIZE_TIMEOUT:-200}" compute-sanitizer --tool $tool $filter --error-exitcode 9 python3 -m pytest \
      -q -x -p no:cacheprovider $ids >"$OUT/sanitize_$tool.log" 2>&1
    echo "sanitize $tool: exit $? in $(( $(date +%s) - start )) s" | tee -a "$OUT/env.log"
    grep -E "ERROR SUMMARY|RACECHECK SUMMARY|passed|failed" "$OUT/sanitize_$tool.log" | tail -3
    if [ "$tool" = racecheck ]; then
      echo "racecheck reports by kernel (flash_* are ours):" | tee -a "$OUT/env.log"
      grep -E "Race reported between" "$OUT/sanitize_$tool.log" | sed -E 's/.* access at ([A-Za-z0-9_]+).*/\1/' |
        sort | uniq -c | tee -a "$OUT/env.log"
    fi
  done
fi

if [ $profile -eq 1 ]; then
  # PROFILE_KERNEL: a regex of the kernels to profile (default flash_fwd: one prefill and one decode
  # launch of profile_target.py's defaults); PROFILE_TARGET: profile_target.py's arguments
  # (e.g. "backward 16,1024,8,256" with PROFILE_KERNEL=flash_bwd_sm90). The clocks stay as they
  # are (--clock-control none), as for every timing here. PROFILE_NAME.tar (default profile.tar)
  # holds the report (.ncu-rep), its details page as text (.txt) and its per-instruction SASS page
  # (_sass.csv: where the warps stall, instruction by instruction): one file, since the device
  # tool returns at most eight.
  name=${PROFILE_NAME:-profile}
  dir=/tmp/$name; rm -rf "$dir"; mkdir -p "$dir"
  # shellcheck disable=SC2086  # PROFILE_TARGET is word-split on purpose
  ncu --clock-control none --kernel-name "regex:${PROFILE_KERNEL:-flash_fwd}" --launch-skip 2 --launch-count 2 \
    --set full --import-source no -f -o "$dir/$name" \
    python3 benchmarks/tools/profile_target.py ${PROFILE_TARGET:-} >"$dir/$name.log" 2>&1
  ncu -i "$dir/$name.ncu-rep" --page details >"$dir/$name.txt" 2>&1
  ncu -i "$dir/$name.ncu-rep" --page source --csv --print-source sass >"$dir/${name}_sass.csv" 2>&1
  tar -C /tmp -cf "$OUT/$name.tar" "$name"
  echo "profile $name: $(wc -c <"$dir/${name}_sass.csv") bytes of SASS page" | tee -a "$OUT/env.log"
  grep -E "Duration|Compute \(SM\) Throughput|Memory Throughput|Registers|Achieved Occupancy" "$dir/$name.txt" | head -20
  tail -3 "$dir/$name.log"
fi
