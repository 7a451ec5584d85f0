#!/usr/bin/env bash
# Tuning experiment: rebuild one head dim (fp16) with several forward tile shapes and time the
# forward benchmark for each. Usage: bash scripts/tune_fwd_tiles.sh HEADDIM "m,n,warps" ...
# Writes $OUT/tune_hdim<D>.log. Leaves the last variant built: rebuild before other work.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out}
hdim=$1; shift
log="$OUT/tune_hdim$hdim.log"
for tile in "$@"; do
  echo "== hdim $hdim tile $tile" | tee -a "$log"
  FLASH_ATTN_HEADDIMS=$hdim FLASH_ATTN_DTYPES=fp16 FLASH_ATTN_FWD_TILE_OVERRIDE=$tile MAX_JOBS=${MAX_JOBS:-16} \
    python3 setup.py build_ext --inplace >"$OUT/tune_build.log" 2>&1 || { tail -20 "$OUT/tune_build.log" | tee -a "$log"; continue; }
  python3 benchmarks/benchmark_forward.py --quick --headdims "$hdim" --out-dir /tmp/tune 2>&1 | grep -E "^hd" | tee -a "$log"
done
