#!/usr/bin/env bash
# Tuning experiment: build head dim 128 (fp16) with several decode tiles ("sub_n,stages,warps",
# tile_sizes.h's decode_tile), each into its own folder, in parallel, then time the decode cells
# given by --cells filters for each. A variant "TILE+PATCH" builds a copy of the tree with PATCH
# (a `git diff` file) applied, so a code change is timed against the tree in the same run. Usage:
#   bash scripts/tune_decode_tiles.sh "32,2,4" "16,4,4" "32,2,4+out/x.patch" ... [-- --cells "batch=1" ...]
# Writes $OUT/tune_decode.log. Needs nvidia-cutlass importable (gpu_check.sh installs .whl/).
# TUNE_CUDNN=1 keeps the cuDNN column; TUNE_SWEEP_ARGS="..." also runs sweep_num_splits.py with
# those arguments for each variant (output in $OUT/sweep_<variant>.log).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out}
tiles=(); while [ $# -gt 0 ] && [ "$1" != "--" ]; do tiles+=("$1"); shift; done
[ $# -gt 0 ] && shift
bench_args=("$@")
log="$OUT/tune_decode.log"
jobs_per=$(( ${MAX_JOBS:-16} / ${#tiles[@]} )); [ $jobs_per -lt 1 ] && jobs_per=1
tag_of() { local t=${1//,/_}; t=${t//+/_}; t=${t//\//_}; echo "${t//./_}"; }
start=$(date +%s)
for variant in "${tiles[@]}"; do
  tag=$(tag_of "$variant")
  tile=${variant%%+*}
  src=$PWD
  if [ "$variant" != "$tile" ]; then  # TILE+PATCH: a patched copy of the tree
    src=/tmp/dec_src_$tag
    rm -rf "$src" && mkdir -p "$src" && cp -r csrc flash_attn setup.py "$src"/ &&
      patch -s -d "$src" -p1 <"${variant#*+}" || { echo "patch ${variant#*+} failed" | tee -a "$log"; continue; }
  fi
  (cd "$src" && FLASH_ATTN_HEADDIMS=128 FLASH_ATTN_DTYPES=fp16 FLASH_ATTN_CUDA_ARCHS=90 \
    FLASH_ATTN_DECODE_TILE_OVERRIDE=$tile MAX_JOBS=$jobs_per python3 setup.py build_ext \
    --build-lib /tmp/dec_$tag --build-temp /tmp/dec_tmp_$tag >/tmp/dec_build_$tag.log 2>&1) &
done
wait
echo "builds: $(( $(date +%s) - start )) s" | tee -a "$log"
for variant in "${tiles[@]}"; do
  tag=$(tag_of "$variant")
  echo "== decode variant $variant" | tee -a "$log"
  if ! ls /tmp/dec_$tag/flash_attn_2_cuda*.so >/dev/null 2>&1; then grep -E "error" /tmp/dec_build_$tag.log | head -5 | tee -a "$log"; continue; fi
  cudnn_flag=--no-cudnn; [ "${TUNE_CUDNN:-0}" = 1 ] && cudnn_flag=
  PYTHONPATH=/tmp/dec_$tag:$PYTHONPATH python3 benchmarks/benchmark_decode.py $cudnn_flag --out-dir /tmp/dec_res_$tag \
    "${bench_args[@]}" 2>&1 | grep -E "^b[0-9]" | tee -a "$log"
  if [ -n "${TUNE_SWEEP_ARGS:-}" ]; then
    # shellcheck disable=SC2086  # word-split on purpose: several arguments
    PYTHONPATH=/tmp/dec_$tag:$PYTHONPATH python3 benchmarks/sweep_num_splits.py --out-dir /tmp/dec_sweep_$tag \
      $TUNE_SWEEP_ARGS >"$OUT/sweep_$tag.log" 2>&1
  fi
done
