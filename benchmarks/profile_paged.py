#!/usr/bin/env python
"""Why is paged-KV decode up to 2x slower than a contiguous K/V cache at batch 1 (but only
~1.0-1.1x at batch 16-128)?  This script separates the candidate causes by timing, per decode
cell (batch, seqlen_k, heads, kv_heads; head dim 128, fp16, one query per sequence), variants of

  flash_attn_varlen_func(q, k, v, cu_q, cu_k, 1, seqlen_k, softmax_scale=d**-0.5, causal=True,
                         num_splits=0, ...)

  contig          contiguous k/v (batch*seqlen_k, kv_heads, 128), plain call (the reference).
  contig_alibi0   contiguous, alibi_slopes = zeros(heads): same math, but runs the library's
                  "extras" kernel instantiation (softcap/ALiBi/paged code), which paged K/V also
                  uses. CAVEAT: ALiBi disables the GQA seqlen/ngroups swap, so for heads != kv_heads
                  this variant also changes the plan (query rows, split count), not only the kernel.
  paged{P}_ident  paged cache (num_pages, P, kv_heads, 128) that is a VIEW of the contiguous
                  memory, block_table = arange: pages in logical order (memory identical to contig).
                  contig_alibi0 -> paged_ident isolates the block-table lookups themselves.
  paged{P}_rand   the same data with the pages in a random physical order (as benchmark_decode.py
                  does). paged_ident -> paged_rand isolates the scattered memory access.
for P in --pages (default 16, 256).

Every variant's output is compared with contig's outside the timed region (max |diff|; the paged
variants are expected to be bit-identical, contig_alibi0 within 1e-3; '!' marks a larger diff).

Timing (benchmarks/timing.py): timing.settle() on contig before each cell, then timing.bench
(256 MiB L2 flush before every call, CUDA events, median us); --rounds passes over the variants,
alternating forward / reverse order, keeping each variant's lowest median (order bias). Columns:
median us, ratio to contig, GB/s = K+V bytes / median time. JSON goes to $OUT/profile_paged.json
when OUT is set, else benchmarks/results/profile_paged_h100.json.

Usage (repository root, GPU machine):
  python benchmarks/profile_paged.py                                  # default cells
  python benchmarks/profile_paged.py --cells "1,32768,32,32;16,8192,32,32"

--ncu: no timing; for the FIRST selected cell, each variant runs 3 warm-up calls, then exactly one
call inside torch.cuda.nvtx.range_push(<variant name>) / range_pop(). Select kernels with ncu's
NVTX filter; push/pop ranges need a trailing '/' ("name/"; a name without '/' means a start/end
range and matches nothing here). Several --nvtx-include are OR'ed. A split call shows as two
kernels (the split kernel and the combine kernel). Example:
  ncu --nvtx --nvtx-include "paged16_rand/" --nvtx-include "contig/" \\
      --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats \\
      --section SchedulerStats --section LaunchStats \\
      python benchmarks/profile_paged.py --ncu --cells 1,32768,32,32
Variant names: contig, contig_alibi0, paged16_ident, paged16_rand, paged256_ident, paged256_rand.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
for _p in (REPO, HERE):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import torch  # noqa: E402

from write_results import write_json  # noqa: E402
from paged_cache import make_paged  # noqa: E402
from timing import (bench, settle, require_cuda, environment_lines, gpu_name, now_utc, git_rev,  # noqa: E402
                    fmt, short_err, free_flush_buffers)

HEADDIM = 128
DEFAULT_CELLS = "1,32768,32,32;1,32768,32,8;1,8192,12,12;1,2048,12,12;16,8192,32,32;128,2048,32,8"
ALIBI_TOL = 1e-3
MEM_MARGIN = 1 << 30  # bytes of free GPU memory to keep beyond a cell's tensors


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cells", default=DEFAULT_CELLS,
                   help='";"-separated batch,seqlen_k,heads,kv_heads (default: "%(default)s")')
    p.add_argument("--pages", default="16,256", help="comma-separated page sizes (default %(default)s)")
    p.add_argument("--rounds", type=int, default=2,
                   help="timing passes over the variants, alternating order; lowest median kept (default 2)")
    p.add_argument("--reps", type=int, default=100, help="max timed calls per variant and round (default 100)")
    p.add_argument("--ncu", action="store_true",
                   help="no timing: one NVTX-wrapped call per variant of the first cell (see top of file)")
    p.add_argument("--json", default=None, help="JSON output path (default: see top of file)")
    return p.parse_args(argv)


def parse_cells(spec: str) -> list:
    """'1,32768,32,32;16,8192,32,32' -> [(1, 32768, 32, 32), (16, 8192, 32, 32)]."""
    cells = []
    for part in spec.replace(" ", "").split(";"):
        if not part:
            continue
        vals = part.split(",")
        try:
            cell = tuple(int(x) for x in vals)
        except ValueError:
            cell = ()
        if len(cell) != 4 or min(cell) <= 0 or cell[2] % cell[3]:
            raise SystemExit(f"--cells: bad cell {part!r} (want batch,seqlen_k,heads,kv_heads; "
                             f"heads a multiple of kv_heads)")
        cells.append(cell)
    if not cells:
        raise SystemExit("--cells: no cell given")
    return cells


def cell_label(cell) -> str:
    b, s, h, hk = cell
    return f"b{b} s{s} h{h}/{hk}"


def kv_bytes(cell) -> int:
    b, s, _h, hk = cell
    return 2 * b * s * hk * HEADDIM * 2  # K and V, fp16


def unpage(k_paged, block_table):
    """Inverse of make_paged for one tensor: (batch*seqlen_k, kv_heads, d) in logical order."""
    return k_paged[block_table.long().flatten()].reshape(-1, *k_paged.shape[2:])


def variant_names(pages) -> list:
    return ["contig", "contig_alibi0"] + [f"paged{p}_{kind}" for p in pages for kind in ("ident", "rand")]


def build_variants(cell, pages, device="cuda"):
    """-> (dict name -> zero-arg callable, notes). Allocates q, K/V, the rand paged copies."""
    from flash_attn import flash_attn_varlen_func
    b, s, h, hk = cell
    gen = dict(device=device, dtype=torch.float16)
    q = torch.randn(b, h, HEADDIM, **gen)
    k = torch.randn(b * s, hk, HEADDIM, **gen)
    v = torch.randn(b * s, hk, HEADDIM, **gen)
    cu_q = torch.arange(b + 1, device=device, dtype=torch.int32)
    cu_k = torch.arange(b + 1, device=device, dtype=torch.int32) * s
    alibi0 = torch.zeros(h, dtype=torch.float32, device=device)
    scale = HEADDIM ** -0.5

    def call(kk, vv, **kw):
        return lambda: flash_attn_varlen_func(q, kk, vv, cu_q, cu_k, 1, s, softmax_scale=scale, causal=True,
                                              num_splits=0, **kw)

    fns = {"contig": call(k, v), "contig_alibi0": call(k, v, alibi_slopes=alibi0)}
    notes = []
    if h != hk:
        notes.append("contig_alibi0: ALiBi disables the GQA head swap, so for heads != kv_heads its plan "
                     "(query rows per block, split count) differs from contig, not only the kernel")
    for p in pages:
        if s % p:
            notes.append(f"page {p}: seqlen_k {s} is not a multiple; paged{p} variants skipped")
            continue
        for kind in ("ident", "rand"):
            kp, vp, bt = make_paged(k, v, b, s, p, shuffle=(kind == "rand"))
            fns[f"paged{p}_{kind}"] = call(kp, vp, block_table=bt)
    return fns, notes


def check_outputs(outs: dict) -> dict:
    """name -> max |out - out['contig']| as float (CPU or GPU tensors)."""
    ref = outs["contig"].float()
    return {name: (o.float() - ref).abs().max().item() for name, o in outs.items()}


def diff_flag(name, diff) -> str:
    tol = ALIBI_TOL if name == "contig_alibi0" else 0.0
    return "" if diff <= tol else "!"


def summarize(cell, medians: dict, diffs: dict) -> list:
    """Rows (dicts) for one cell from name -> median us (None = failed) and name -> max diff."""
    base = medians.get("contig")
    nbytes = kv_bytes(cell)
    rows = []
    for name, us in medians.items():
        rows.append({
            "cell": cell_label(cell), "variant": name, "median_us": us,
            "ratio": (us / base) if (us and base) else None,
            "gbps": (nbytes / (us * 1e-6) / 1e9) if us else None,
            "maxdiff": diffs.get(name),
        })
    return rows


def format_table(rows) -> str:
    head = f"{'cell':<20} {'variant':<15} {'median_us':>10} {'ratio':>7} {'GB/s':>8} {'maxdiff':>10}"
    lines = [head, "-" * len(head)]
    for r in rows:
        d = r["maxdiff"]
        dstr = "n/a" if d is None else f"{d:.2e}{diff_flag(r['variant'], d)}"
        lines.append(f"{r['cell']:<20} {r['variant']:<15} {fmt(r['median_us'], '.1f'):>10} "
                     f"{fmt(r['ratio'], '.3f'):>7} {fmt(r['gbps'], '.0f'):>8} {dstr:>10}")
    return "\n".join(lines)


def available_bytes():
    free, _ = torch.cuda.mem_get_info()
    return free + torch.cuda.memory_reserved() - torch.cuda.memory_allocated()


def first_outputs(fns: dict, warmup: int = 3) -> dict:
    outs = {}
    for name, fn in fns.items():
        for _ in range(warmup):
            outs[name] = fn()
    torch.cuda.synchronize()
    return outs


def time_cell(fns: dict, rounds: int, reps: int):
    """-> (name -> lowest median us or None, name -> BenchResult dict, errors)."""
    settle(fns["contig"])
    best, stats, errors = {n: None for n in fns}, {}, {}
    names = list(fns)
    for r in range(max(rounds, 1)):
        for name in (names if r % 2 == 0 else names[::-1]):
            if name in errors:
                continue
            try:
                res = bench(fns[name], reps=reps, max_time_s=1.0)
            except Exception as e:  # noqa: BLE001
                errors[name] = short_err(e)
                continue
            if best[name] is None or res.median_us < best[name]:
                best[name], stats[name] = res.median_us, res.as_dict()
    return best, stats, errors


def splits_note(cell) -> str:
    try:
        from flash_attn.flash_attn_interface import num_splits_heuristic
        b, s, h, hk = cell
        return f"heuristic num_splits (no ALiBi) = {num_splits_heuristic(b, h, hk, 1, s, HEADDIM)}"
    except Exception as e:  # noqa: BLE001
        return f"num_splits_heuristic unavailable ({short_err(e, 80)})"


def run_ncu(cell, pages) -> None:
    fns, notes = build_variants(cell, pages)
    for n in notes:
        print("note:", n)
    outs = first_outputs(fns)  # the 3 warm-ups, outside any NVTX range
    for name, fn in fns.items():
        torch.cuda.nvtx.range_push(name)
        fn()
        torch.cuda.nvtx.range_pop()
        torch.cuda.synchronize()
    diffs = check_outputs(outs)
    print(f"ncu mode, {cell_label(cell)}: one call each of " + ", ".join(fns))
    print("max|diff| vs contig: " + ", ".join(f"{n} {d:.2e}{diff_flag(n, d)}" for n, d in diffs.items()))


def run_timing(cells, pages, args) -> int:
    for line in environment_lines(REPO):
        print(line)
    all_rows, cell_records = [], []
    for cell in cells:
        print(f"\n== {cell_label(cell)}: K+V {kv_bytes(cell) / 2**20:.0f} MiB; {splits_note(cell)}")
        rand_copies = sum(1 for p in pages if cell[1] % p == 0)
        need = kv_bytes(cell) * (1 + rand_copies) + MEM_MARGIN
        if available_bytes() < need:
            print(f"note: skipped, needs ~{need / 2**30:.1f} GiB, {available_bytes() / 2**30:.1f} GiB available")
            cell_records.append({"cell": list(cell), "skipped": "memory"})
            continue
        record = {"cell": list(cell), "kv_bytes": kv_bytes(cell), "splits": splits_note(cell)}
        fns = outs = None
        try:
            fns, notes = build_variants(cell, pages)
            for n in notes:
                print("note:", n)
            outs = first_outputs(fns)
            diffs = check_outputs(outs)
            outs = None
            medians, stats, errors = time_cell(fns, args.rounds, args.reps)
            for n, e in errors.items():
                print(f"note: {n} failed: {e}")
            rows = summarize(cell, medians, diffs)
            print(format_table(rows))
            all_rows += rows
            record.update(notes=notes, errors=errors, rows=rows, stats=stats)
        except Exception as e:  # noqa: BLE001
            print(f"note: cell failed: {short_err(e)}")
            record["error"] = short_err(e)
        cell_records.append(record)
        fns = outs = None  # free this cell's tensors before the next
        torch.cuda.empty_cache()

    print("\n== all cells")
    print(format_table(all_rows))
    path = args.json or (os.path.join(os.environ["OUT"], "profile_paged.json") if os.environ.get("OUT")
                         else os.path.join(HERE, "results", "profile_paged_h100.json"))
    print()
    write_json(path, {"gpu": gpu_name(), "date": now_utc(), "rev": git_rev(REPO), "pages": pages,
                      "rounds": args.rounds, "cells": cell_records})
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    cells = parse_cells(args.cells)
    pages = [int(x) for x in args.pages.split(",") if x.strip()]
    require_cuda("profile_paged.py")
    if args.ncu:
        run_ncu(cells[0], pages)
        return 0
    try:
        return run_timing(cells, pages, args)
    finally:
        free_flush_buffers()


if __name__ == "__main__":
    sys.exit(main())
