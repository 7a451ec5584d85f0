#!/usr/bin/env python
"""Before/after comparison of two result files of the same benchmark (gpu_check.sh --baseline):
per cell, speed of after relative to before (before time / after time; after / before for
TFLOP/s: > 1 = after faster) for the main measured columns, and how many cells lie within 2%.
  python benchmarks/tools/compare.py results/decode_h100_before.json results/decode_h100_after.json
"""
import os
import sys

from plot import load

CELL_KEYS = ("dtype", "causal", "headdim", "seqlen", "batch", "seqlen_q", "seqlen_k", "heads", "kv_heads", "page_size")
COLUMNS = ("ours_us", "ours_kvcache_us", "ours_graph_us", "paged16_us", "paged256_us", "auto_us", "ours_tflops",
           "ours_bwd_ms", "ours_det_bwd_ms")
WITHIN = 0.02


def rows(path):
    data, _ = load(path)
    return {tuple(r.get(k) for k in CELL_KEYS): r for r in data} if isinstance(data, list) else {}


def speed_ratio(column, before, after):
    """> 1: after faster (times: before / after; TFLOP/s: after / before)."""
    return (after / before if column.endswith("tflops") else before / after) if after and before else None


def main(before_path, after_path) -> int:
    before, after = rows(before_path), rows(after_path)
    cells = [c for c in before if c in after]
    columns = [k for k in COLUMNS if any(before[c].get(k) and after[c].get(k) for c in cells)]
    if not columns:
        print(f"{os.path.basename(after_path)}: no cells to compare with {before_path}")
        return 1
    print(f"{os.path.basename(after_path)}: after vs before, speed ratio per cell (> 1: after faster)")
    print("| cell | " + " | ".join(columns) + " |\n|" + "---|" * (len(columns) + 1))
    speed = {(c, k): speed_ratio(k, before[c].get(k), after[c].get(k)) for c in cells for k in columns}
    for c in cells:
        print("| " + " ".join(f"{k}={v}" for k, v in zip(CELL_KEYS, c) if v is not None) + " | "
              + " | ".join("n/a" if speed[c, k] is None else f"{speed[c, k]:.3f}" for k in columns) + " |")
    for k in columns:
        s = [speed[c, k] for c in cells if speed[c, k] is not None]
        within = sum(abs(x - 1) <= WITHIN for x in s)
        print(f"{k}: within {WITHIN:.0%} in {within}/{len(s)} cells; faster by more in "
              f"{sum(x > 1 + WITHIN for x in s)}, slower by more in {sum(x < 1 - WITHIN for x in s)}; "
              f"min {min(s):.3f}, max {max(s):.3f}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        print(__doc__)
        sys.exit(sys.argv[1:] not in (["-h"], ["--help"]))
    sys.exit(main(sys.argv[1], sys.argv[2]))
