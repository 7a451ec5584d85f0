#!/usr/bin/env bash
# On a CUDA machine: build several source trees side by side and compare them, each serving as main
# for the kernels it does not change (scripts/GPU_CHECKLIST.md, "pair A/B"); with INSTALL_MAIN=1
# this checkout's build joins them in the same call, so that one machine start covers a full-set
# build, its tests and the A/Bs against it.
#
#   TREES="bwd fwd" PAIRS="forward:bwd:fwd backward:fwd:bwd" \
#   TESTS="bwd=sm90_backward or determin;fwd=sm90_forward or varlen" bash scripts/ab_trees.sh
#
#   INSTALL_MAIN=1 INSTALLED_COMMIT=abc1234 TREES="pre@128 turns@64" PASSES=2 \
#   PAIRS="decode:pre:installed forward:installed:turns" TESTS="installed=gqa_packing" \
#   TEST_ARGS="-n 8" bash scripts/ab_trees.sh
#
# TREES: folders under base/, each made on the development machine by scripts/make_trees.sh (a
# commit, or a commit with a pending series applied) and copied to the CUDA machine beside the
# checkout (with .whl). NAME@64,128 builds that tree at
# those head dims (default FLASH_ATTN_HEADDIMS). The trees build in parallel, MAX_JOBS split
# between them.
# INSTALL_MAIN=1: this checkout is built and installed by gpu_check.sh (every head dim and dtype
# unless MAIN_HEADDIMS / MAIN_DTYPES narrow it) while the trees build beside it at TREE_JOBS jobs
# each (default 2: a tree at one or two head dims and one dtype then ends with main's build); it
# is "installed" in TESTS and PAIRS. Without it, "installed" is the build an earlier call on this
# still-warm machine installed. INSTALLED_COMMIT names it in the results.
# TESTS: "tree=pytest -k expression" clauses joined by ';', run on the tree's own build and tests
# (or on the installed build with the checkout's tests), in parallel, with TEST_ARGS (e.g. "-n 8").
# PAIRS: "benchmark:main:patched" (benchmark: forward, backward, specdec or decode; forward@64,128
# times those head dims instead of FLASH_ATTN_HEADDIMS), each run --quick on main then on the
# patched tree and compared (benchmarks/tools/compare.py: ratios > 1, the patched tree faster); PASSES=2 runs each pair again in the other order (patched first), so
# that a difference the order makes shows. LIMIT: seconds the command may take (default 570);
# benchmarks that would start with less than 45 s left are skipped.
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
if ls .whl/*.whl > /dev/null 2>&1 && [ ! -d "$site/cutlass_library" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" .whl/*.whl
fi
nvidia-smi --query-gpu=name,serial --format=csv,noheader | tee "$OUT/ab/device.log"
read -r -a trees <<< "${TREES:-}"
if [ "${INSTALL_MAIN:-0}" = 1 ]; then
  jobs_each=${TREE_JOBS:-2}
  main_jobs=$(( ${MAX_JOBS:-16} - jobs_each * ${#trees[@]} ))
  # gpu_check.sh finds the wheels installed above (it installs them only where they are missing,
  # so the trees' builds never see them rewritten).
  (env -u FLASH_ATTN_HEADDIMS -u FLASH_ATTN_DTYPES ${MAIN_HEADDIMS:+FLASH_ATTN_HEADDIMS=$MAIN_HEADDIMS} \
     ${MAIN_DTYPES:+FLASH_ATTN_DTYPES=$MAIN_DTYPES} MAX_JOBS=$main_jobs BENCH_COMMIT=${INSTALLED_COMMIT:-installed} \
     OUT="$OUT/ab/main" bash scripts/gpu_check.sh --no-tests --no-bench > "$OUT/ab/build_main.log" 2>&1
   echo "build main: rc $? at $(elapsed) s ($(grep -h '^build:' "$OUT/ab/main/env.log" 2>/dev/null))") &
else
  jobs_each=$(( ${MAX_JOBS:-16} / (${#trees[@]} > 0 ? ${#trees[@]} : 1) ))
fi
for spec in "${trees[@]}"; do
  t=${spec%%@*}; hd=$FLASH_ATTN_HEADDIMS
  [ "$t" != "$spec" ] && hd=${spec#*@}
  (cd "base/$t" && FLASH_ATTN_HEADDIMS=$hd MAX_JOBS=$jobs_each PYTHONPATH=$site python3 setup.py build_ext --inplace \
     > "$OUT/ab/build_$t.log" 2>&1
   echo "build $t (head dims $hd): rc $? at $(elapsed) s") &
done
wait
IFS=';' read -r -a clauses <<< "${TESTS:-}"
for c in "${clauses[@]}"; do
  t=${c%%=*}; k=${c#*=}
  root=base/$t; path=$PWD/base/$t:$site
  [ "$t" = installed ] && { root=.; path=$PWD:$site; }
  # shellcheck disable=SC2086  # TEST_ARGS is word-split on purpose
  (cd "$root" && PYTHONPATH=$path timeout $(( $(left) / 2 )) python3 -m pytest tests -q -p no:cacheprovider \
     ${TEST_ARGS:-} -k "$k" > "$OUT/ab/tests_$t.log" 2>&1
   echo "tests $t ($k): $(tail -n 1 "$OUT/ab/tests_$t.log") at $(elapsed) s") &
done
wait
bench() {  # benchmark[@head dims] tree [suffix of its result folder and log]
  local sfx=${3:-} hd=$FLASH_ATTN_HEADDIMS name=$1
  case "$name" in *@*) hd=${name#*@}; name=${name%%@*} ;; esac
  set -- "$name" "$2" "$sfx"
  local args="--quick --headdims $hd --dtypes ${FLASH_ATTN_DTYPES}" script=$1
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
    python3 "benchmarks/benchmark_$script.py" $args --out-dir "$OUT/ab/$1_$2$sfx" > "$OUT/ab/$1_$2$sfx.log" 2>&1
  local rc=$?
  echo "$1 $2$sfx: rc $rc at $(elapsed) s"
  return $rc
}
compare() {  # benchmark[@head dims] main patched pass: the pair's two result folders
  set -- "${1%%@*}" "$2" "$3" "$4"
  local m="$OUT/ab/${1}_$2.vs-$3$4" t="$OUT/ab/${1}_$3$4"
  python3 benchmarks/tools/compare.py "$m"/*.json "$t"/*.json > "$OUT/ab/compare_${1}_$3$4.log" 2>&1
  echo "== $1: $3 against $2 (pass ${4#.p})"; grep -v '^|---' "$OUT/ab/compare_${1}_$3$4.log"
  [ "$1" = specdec ] && grep -h "kvcache <=" "$m.log" "$t.log"
  return 0
}
# Pass 1: main then patched; pass 2 (PASSES=2): patched then main. Main's folders name the tree
# it is compared with, so that several pairs may share a main.
for pass in $(seq 1 "${PASSES:-1}"); do
  for pair in ${PAIRS:-}; do
    IFS=: read -r b main patched <<< "$pair"
    if [ "$pass" = 1 ]; then
      bench "$b" "$main" ".vs-$patched.p1"; first_rc=$?
      bench "$b" "$patched" .p1
    else
      bench "$b" "$patched" .p2; first_rc=$?
      bench "$b" "$main" ".vs-$patched.p2"
    fi
    [ $? -eq 0 ] && [ $first_rc -eq 0 ] && compare "$b" "$main" "$patched" ".p$pass"
  done
done
tar -czf "$OUT/ab.tgz" -C "$OUT" ab && rm -rf "$OUT/ab"
echo "done at $(elapsed) s"
