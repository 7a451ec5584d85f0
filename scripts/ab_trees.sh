#!/usr/bin/env bash
# On a CUDA machine: build several source trees side by side and compare them, each serving as main
# for the kernels it does not change (scripts/GPU_CHECKLIST.md, "pair A/B"). No build of main.
#
#   TREES="bwd fwd" PAIRS="forward:bwd:fwd backward:fwd:bwd" \
#   TESTS="bwd=sm90_backward or determin;fwd=sm90_forward or varlen" bash scripts/ab_trees.sh
#
# TREES: folders under base/, each made on the development machine with
#   git archive REV | tar -x -C base/NAME && git rev-parse --short REV > base/NAME/COMMIT
# and copied to the CUDA machine beside the checkout (with .whl); they build in parallel, MAX_JOBS split
# between them. TESTS: "tree=pytest -k expression" clauses joined by ';', run on the tree's own
# build and tests, in parallel. PAIRS: "benchmark:main:patched" (benchmark: forward, backward,
# specdec or decode), each run --quick on main then on the patched tree and compared
# (benchmarks/tools/compare.py: ratios > 1, the patched tree faster). A pair's tree may be
# "installed": the build an earlier call on this still-warm machine installed with gpu_check.sh
# (e.g. main's full set), named INSTALLED_COMMIT in the results; it is not in TREES and is not
# rebuilt. LIMIT: seconds the command may take (default 570); benchmarks that would start with
# less than 45 s left are skipped.
# The device returns at most 8 files, so every log and result ends up in $OUT/ab.tgz; the
# comparisons and test counts are also printed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT/ab"
t0=$(date +%s)
elapsed() { echo $(( $(date +%s) - t0 )); }
left() { echo $(( ${LIMIT:-570} - $(elapsed) )); }
export PYTHONUNBUFFERED=1 FLASH_ATTN_HEADDIMS=${FLASH_ATTN_HEADDIMS:-64,128,256}
export FLASH_ATTN_DTYPES=${FLASH_ATTN_DTYPES:-fp16} FLASH_ATTN_CUDA_ARCHS=${FLASH_ATTN_CUDA_ARCHS:-90}
export FLASH_ATTN_PTX=${FLASH_ATTN_PTX:-0}  # the card runs the sm_90a code; PTX would compile it all twice
site=/tmp/site
if ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" .whl/*.whl
fi
nvidia-smi --query-gpu=name,serial --format=csv,noheader | tee "$OUT/ab/device.log"
read -r -a trees <<< "${TREES:?TREES names the folders under base/ to compare}"
jobs_each=$(( ${MAX_JOBS:-16} / ${#trees[@]} ))
for t in "${trees[@]}"; do
  (cd "base/$t" && MAX_JOBS=$jobs_each PYTHONPATH=$site python3 setup.py build_ext --inplace > "$OUT/ab/build_$t.log" 2>&1
   echo "build $t: rc $? at $(elapsed) s") &
done
wait
IFS=';' read -r -a clauses <<< "${TESTS:-}"
for c in "${clauses[@]}"; do
  t=${c%%=*}; k=${c#*=}
  (cd "base/$t" && PYTHONPATH=$PWD:$site timeout $(( $(left) / 2 )) python3 -m pytest tests -q -p no:cacheprovider -k "$k" \
     > "$OUT/ab/tests_$t.log" 2>&1
   echo "tests $t ($k): $(tail -n 1 "$OUT/ab/tests_$t.log") at $(elapsed) s") &
done
wait
bench() {  # benchmark tree
  local args="--quick --headdims ${FLASH_ATTN_HEADDIMS} --dtypes ${FLASH_ATTN_DTYPES}" script=$1
  if [ "$1" = specdec ]; then
    script=decode; args="--quick --grid specdec --cells ${SPECDEC_CELLS:-batch=1|4,seqlen_k=4096|8192} --time-budget-s 20"
  elif [ "$1" = decode ]; then
    args="--quick"  # the decode grid: head dim 128, fp16, dense and paged
  fi
  [ "$(left)" -gt 45 ] || { echo "$1 $2: skipped, $(left) s left"; return 1; }
  local commit path  # the installed build: site-packages' flash_attn, no tree in front of it
  if [ "$2" = installed ]; then commit=${INSTALLED_COMMIT:-installed}; path=$site
  else commit=$(cat "base/$2/COMMIT"); path=$PWD/base/$2:$site; fi
  BENCH_COMMIT=$commit PYTHONPATH=$path timeout $(( $(left) - 15 )) \
    python3 "benchmarks/benchmark_$script.py" $args --out-dir "$OUT/ab/$1_$2" > "$OUT/ab/$1_$2.log" 2>&1
  local rc=$?
  echo "$1 $2: rc $rc at $(elapsed) s"
  return $rc
}
for pair in ${PAIRS:-}; do
  IFS=: read -r b main patched <<< "$pair"
  bench "$b" "$main"; main_rc=$?
  bench "$b" "$patched" && [ $main_rc -eq 0 ] || continue
  python3 benchmarks/tools/compare.py "$OUT/ab/${b}_$main"/*.json "$OUT/ab/${b}_$patched"/*.json > "$OUT/ab/compare_${b}_$patched.log" 2>&1
  echo "== $b: $patched against $main"; grep -v '^|---' "$OUT/ab/compare_${b}_$patched.log"
  [ "$b" = specdec ] && grep -h "kvcache <=" "$OUT/ab/${b}_$main.log" "$OUT/ab/${b}_$patched.log"
done
tar -czf "$OUT/ab.tgz" -C "$OUT" ab && rm -rf "$OUT/ab"
echo "done at $(elapsed) s"
