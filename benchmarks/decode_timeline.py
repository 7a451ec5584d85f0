"""Per-block timelines of decode launches (diagnostics; NOTES 39).

Needs a build with the timeline hooks (csrc/flash_attn/src/decode_timeline.h):
    FLASH_ATTN_DECODE_TIMELINE=1 python setup.py build_ext --inplace
Each decode launch then records, per thread block, its SM and %globaltimer at five marks (start,
lengths loaded, first sub-block landed, loop done, exit); with FLASH_ATTN_TIMELINE_FILE set the
launch synchronizes and writes them to that file (so time the calls elsewhere, not here).

For each --cell "batch,seqlen_k,heads,kv_heads[,num_splits]" (num_splits 0 = the heuristic) this
runs flash_attn_varlen_func as benchmark_decode.py does (fp16, head dim 128, L2 flushed before the
recorded call) and prints: the block span (first start to last exit) and the K+V bandwidth over it,
the median / spread of each phase, active blocks per microsecond, and blocks per SM. Raw records
go to OUT_DIR/decode_timeline.npz (per cell: int64 [blocks, 16] = smid, then (ns, clock) per mark:
0 start, 1 lengths loaded, 2 first sub-block landed, 3 loop done, 4 exit, 5 / 6 around the first
cluster barrier when the splits merge in a cluster).
"""

import argparse
import os
import struct
import sys
import tempfile

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import evict_l2, l2_flush_buffer, require_cuda  # noqa: E402

DEFAULT_CELLS = ["16,2048,12,12", "16,2048,32,8", "1,8192,12,12", "128,2048,32,8"]
PHASES = [("lengths", 0, 1), ("first data", 1, 2), ("loop", 2, 3), ("epilogue", 3, 4), ("total", 0, 4)]
# Marks 5 and 6 exist with a cluster merge only: the epilogue split at the first cluster barrier.
CLUSTER_PHASES = [("warp merge", 3, 5), ("cluster wait", 5, 6), ("split merge", 6, 4)]


def record(cell, flush, path):
    from flash_attn import flash_attn_varlen_func

    batch, seqlen_k, heads, kv_heads, *rest = (int(x) for x in cell.split(","))
    num_splits = rest[0] if rest else 0
    d = 128
    q = torch.randn(batch, heads, d, device="cuda", dtype=torch.half)
    k = torch.randn(batch * seqlen_k, kv_heads, d, device="cuda", dtype=torch.half)
    v = torch.randn_like(k)
    cu_q = torch.arange(0, batch + 1, dtype=torch.int32, device="cuda")
    cu_k = cu_q * seqlen_k

    def call():
        return flash_attn_varlen_func(q, k, v, cu_q, cu_k, 1, seqlen_k, causal=True, num_splits=num_splits)

    for _ in range(3):
        call()
    torch.cuda.synchronize()
    if os.path.exists(path):
        os.remove(path)
    evict_l2(flush)
    os.environ["FLASH_ATTN_TIMELINE_FILE"] = path
    try:
        call()
        torch.cuda.synchronize()
    finally:
        del os.environ["FLASH_ATTN_TIMELINE_FILE"]
    if not os.path.exists(path):
        sys.exit("no timeline written: build with FLASH_ATTN_DECODE_TIMELINE=1 (and the call must run the decode kernel)")
    raw = open(path, "rb").read()
    grid = struct.unpack("III", raw[:12])
    rows = np.frombuffer(raw[12:], dtype=np.uint64).reshape(-1, 16).astype(np.int64)
    kv_bytes = 2 * batch * seqlen_k * kv_heads * d * 2
    return f"b{batch}_s{seqlen_k}_{heads}x{kv_heads}_ns{num_splits}", grid, rows, kv_bytes


def summarize(name, grid, rows, kv_bytes):
    ns = rows[:, 1:15:2]  # marks 0-6 (5, 6: cluster merge only, else 0)
    rel = (ns - ns[:, 0].min()) / 1e3  # us since the first block started
    span = rel[:, 4].max()
    print(f"{name}: grid {grid} = {len(rows)} blocks, span {span:.1f} us, "
          f"K+V {kv_bytes / 1e6:.0f} MB -> {kv_bytes / span / 1e6:.2f} TB/s over the span")
    print(f"   starts: median {np.median(rel[:, 0]):.2f} max {rel[:, 0].max():.2f} us; "
          f"exits: min {rel[:, 4].min():.1f} median {np.median(rel[:, 4]):.1f} max {span:.1f} us")
    clustered = bool((rows[:, 11] != 0).all())
    for label, a, b in PHASES + (CLUSTER_PHASES if clustered else []):
        dt = rel[:, b] - rel[:, a]
        print(f"   {label:10s} median {np.median(dt):7.2f}  p10 {np.percentile(dt, 10):7.2f}  "
              f"p90 {np.percentile(dt, 90):7.2f}  max {dt.max():7.2f} us")
    if clustered:  # split 0 merges the cluster: its own phases after the first barrier
        split = (np.arange(len(rows)) // grid[0]) % grid[1]
        dt = rel[split == 0, 4] - rel[split == 0, 6]
        print(f"   split 0's merge (past the barrier to exit): median {np.median(dt):.2f} max {dt.max():.2f} us")
    active = [int(((rel[:, 0] <= t) & (rel[:, 4] > t)).sum()) for t in np.arange(0.0, span + 1.0, 1.0)]
    print("   active blocks per us:", " ".join(map(str, active)))
    per_sm = np.bincount(rows[:, 0], minlength=int(rows[:, 0].max()) + 1)
    print(f"   blocks per SM: min {per_sm.min()} max {per_sm.max()}, SMs used {int((per_sm > 0).sum())}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cell", action="append", help='"batch,seqlen_k,heads,kv_heads[,num_splits]" (repeatable)')
    p.add_argument("--out-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = p.parse_args()
    require_cuda("decode_timeline.py")
    flush = l2_flush_buffer()
    arrays = {}
    with tempfile.TemporaryDirectory() as tmp:
        for cell in args.cell or DEFAULT_CELLS:
            name, grid, rows, kv_bytes = record(cell, flush, os.path.join(tmp, "timeline.bin"))
            summarize(name, grid, rows, kv_bytes)
            arrays[name] = rows
    os.makedirs(args.out_dir, exist_ok=True)
    out = os.path.join(args.out_dir, "decode_timeline.npz")
    np.savez_compressed(out, **arrays)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
