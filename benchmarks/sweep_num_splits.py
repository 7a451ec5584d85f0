#!/usr/bin/env python
"""num_splits sweep for decode: how far is the split-KV heuristic (num_splits=0) from the best
explicit split count, cell by cell, on the decode grid of benchmark_decode.py.

Grid and filters: decode_grid.py (the same cells as benchmark_decode.py: seqlen_k in {2048, 4096,
8192, 32768} x batch in {1, 16, 128} x (heads, kv_heads) in {(12,12), (32,8), (32,32)}, head dim
128, fp16; cells with K+V > --max-kv-gib skipped; --cells filter).

Per cell, K/V are allocated once, then each call is
  flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_seqlen_q=1, max_seqlen_k=seqlen_k, causal=True,
                         num_splits=N)
with q (batch, heads, 128), k/v (batch*seqlen_k, kv_heads, 128), timed for
  N = 0 (the heuristic; `auto_splits` = its choice, from flash_attn.num_splits_heuristic with this
      GPU's SM count), and N = 1, 2, ..., 16, 32, 64, 128, leaving out values above the number of
      128-key blocks ceil(seqlen_k / 128) (the dispatcher clamps to it, so they would repeat the
      largest value; the clamp is read from num_splits_heuristic(..., num_splits=huge), which
      returns the dispatcher's min(N, key blocks, 128)). The heuristic's choice is always timed
      explicitly too.
Cells with batch * heads >= 2 * SMs (--restrict-factor) already fill the GPU several times over
without splitting; to save time they sweep only N in {1, 2, 3, 4} (plus auto). --full sweeps every
value everywhere. Cells reached after --time-budget-s also get the restricted set.

Timing: timing.bench (CUDA events per call, 256 MiB L2 flush before each call outside the event
window, median), --reps repeats per value (default 15; --quick: 5).

Reported per cell: auto_splits, auto_us, best_splits / best_us (fastest explicit N), regret =
auto_us / best_us. Regret < 1 is possible: noise between two timings of the same configuration,
or auto running a kernel that no explicit N selects: an explicit num_splits=1 runs upstream's
unsplit forward kernel, while a heuristic choice of 1 runs the split-KV (decode) kernel with one
split and the combine, so where auto_splits = 1 the auto and "1" columns are different kernels.
Summary: fraction of cells with regret <= 1.05, worst regret. maxdiff = max |out(N) - out(auto)|
over all N (outside timing; a sanity check of every split count).

--page-size N sweeps the same cells with K/V in a paged cache of N-token pages in random order
(block_table; outputs splits_sweep_paged{N}_h100.*); paged K/V get the same plan as contiguous K/V.

Usage (repository root, GPU machine; about 15-40 s on an H100, budget < 150 s):
  python benchmarks/sweep_num_splits.py
  python benchmarks/sweep_num_splits.py --quick --cells "batch=1"
  python benchmarks/sweep_num_splits.py --page-size 16 --cells "batch=1"
Outputs: OUT_DIR/splits_sweep_h100.json (one row per cell) and OUT_DIR/splits_sweep_h100.md
(OUT_DIR = --out-dir, default benchmarks/results).
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
for _p in (REPO, HERE):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import torch  # noqa: E402

from timing import (bench, settle, require_cuda, environment_lines, gpu_name, today_utc, fmt,  # noqa: E402
                    markdown_table, short_err, sticky_cuda_error)
from write_results import write_json, write_section  # noqa: E402
from paged_cache import make_paged  # noqa: E402
from decode_grid import (HEADDIM, add_grid_args, parse_cells, select_cells, cell_name,  # noqa: E402
                         skipped_line)

DEVICE = "cuda"
KEY_BLOCK = 128  # keys per block of the split-KV kernel at head dim 128 (the dispatcher clamps to the count)
SWEEP_SPLITS = list(range(1, 17)) + [32, 64, 128]
RESTRICTED_SPLITS = [1, 2, 3, 4]
REGRET_OK = 1.05
TITLE = "num_splits sweep (decode, fp16, head dim 128)"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", default=os.path.join(HERE, "results"))
    p.add_argument("--json", default=None, help="JSON output path (default OUT_DIR/splits_sweep_h100.json)")
    p.add_argument("--results-md", default=None,
                   help="markdown section output path (default OUT_DIR/splits_sweep_h100.md)")
    p.add_argument("--quick", action="store_true", help="fewer repeats (5 per value; smoke run)")
    add_grid_args(p)
    p.add_argument("--reps", type=int, default=None, help="timed repeats per split value (default 15, --quick 5)")
    p.add_argument("--full", action="store_true",
                   help="sweep every split value in every cell (no restriction for large batch*heads)")
    p.add_argument("--restrict-factor", type=float, default=2.0,
                   help="cells with batch*heads >= this * SMs sweep only num_splits in {1,2,3,4} + auto "
                        "(default %(default)s)")
    p.add_argument("--page-size", type=int, default=0,
                   help="sweep a paged K/V cache of this many tokens per page, pages shuffled "
                        "(block_table; default 0: the contiguous cache)")
    p.add_argument("--time-budget-s", type=float, default=120.0,
                   help="cells started after this many seconds sweep only {1,2,3,4} + auto with the "
                        "minimum repeats (default %(default)s)")
    return p.parse_args(argv)


def n_key_blocks(seqlen_k: int) -> int:
    return max(1, -(-seqlen_k // KEY_BLOCK))


def split_values(seqlen_k: int, restricted: bool, auto_splits=None, cap=None) -> list:
    """Explicit num_splits values to time: the sweep list (or the restricted one) without values
    above the dispatcher's clamp (`cap`; default the number of 128-key blocks), plus the
    heuristic's own choice."""
    nb = cap if cap else n_key_blocks(seqlen_k)
    vals = [n for n in (RESTRICTED_SPLITS if restricted else SWEEP_SPLITS) if n <= nb]
    if auto_splits is not None and 1 <= auto_splits <= nb and auto_splits not in vals:
        vals.append(int(auto_splits))
    return sorted(set(vals))


def compact_ranges(vals) -> str:
    """[1, 2, 3, 4, 22, 32] -> "1-4,22,32"."""
    vals = sorted(set(vals))
    if not vals:
        return "-"
    parts, start, prev = [], vals[0], vals[0]
    for x in vals[1:] + [None]:
        if x is not None and x == prev + 1:
            prev = x
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if x is not None:
            start = prev = x
    return ",".join(parts)


def is_restricted(cell, num_sms: int, factor: float) -> bool:
    return cell["batch"] * cell["heads"] >= factor * num_sms


def summarize(rows) -> dict:
    regrets = [(r["regret"], r) for r in rows if r.get("regret") is not None]
    n = len(regrets)
    ok = sum(1 for x, _ in regrets if x <= REGRET_OK)
    worst = max(regrets, key=lambda t: t[0]) if regrets else None
    return {
        "cells": len(rows),
        "cells_with_regret": n,
        "cells_regret_ok": ok,
        "frac_regret_ok": (ok / n) if n else None,
        "regret_ok_threshold": REGRET_OK,
        "worst_regret": worst[0] if worst else None,
        "worst_cell": cell_name(worst[1]) if worst else None,
        "restricted_cells": [cell_name(r) for r in rows if r.get("restricted")],
    }


def summary_line(s) -> str:
    if not s["cells_with_regret"]:
        return "no cell has both an auto and an explicit timing"
    return (f"regret <= {s['regret_ok_threshold']:.2f} in {s['cells_regret_ok']}/{s['cells_with_regret']} cells "
            f"({100 * s['frac_regret_ok']:.0f}%); worst regret {s['worst_regret']:.3f} ({s['worst_cell']})")


def sweep_cell(c, varlen, heuristic, num_sms, bench_kw, restricted, page_size=0, dtype=torch.float16):
    """Time auto and every explicit split value for one cell -> row dict (never raises)."""
    batch, seqlen_k, heads, kv_heads = c["batch"], c["seqlen_k"], c["heads"], c["kv_heads"]
    d = HEADDIM
    scale = d ** -0.5
    row = dict(batch=batch, seqlen_k=seqlen_k, heads=heads, kv_heads=kv_heads, page_size=page_size,
               key_blocks=n_key_blocks(seqlen_k),
               split_cap=None, restricted=restricted, swept=[], auto_splits=None, auto_us=None, auto_first_us=None, best_splits=None,
               best_us=None, regret=None, nosplit_us=None, times_us={}, maxdiff=None, notes=[])
    try:
        row["auto_splits"] = int(heuristic(batch, heads, kv_heads, 1, seqlen_k, d, num_sms, 0))
        # The dispatcher clamps an explicit num_splits to min(N, key blocks, 128): ask it for a huge N.
        row["split_cap"] = int(heuristic(batch, heads, kv_heads, 1, seqlen_k, d, num_sms, 1 << 20))
    except Exception as e:  # noqa: BLE001
        row["notes"].append("heuristic: " + short_err(e))
    vals = split_values(seqlen_k, restricted, row["auto_splits"], row["split_cap"])
    row["swept"] = vals
    q = k = v = cu_q = cu_k = o_auto = paged_kw = None
    try:
        q = torch.randn(batch, heads, d, device=DEVICE, dtype=dtype)
        k = torch.randn(batch * seqlen_k, kv_heads, d, device=DEVICE, dtype=dtype)
        v = torch.randn(batch * seqlen_k, kv_heads, d, device=DEVICE, dtype=dtype)
        cu_q = torch.arange(0, batch + 1, device=DEVICE, dtype=torch.int32)
        cu_k = torch.arange(0, batch + 1, device=DEVICE, dtype=torch.int32) * seqlen_k
        paged_kw = {}
        if page_size:
            k, v, block_table = make_paged(k, v, batch, seqlen_k, page_size)
            paged_kw = dict(block_table=block_table)
        outs_diff = []
        try:  # settle the GPU on this cell before timing (see timing.settle)
            settle(lambda: varlen(q, k, v, cu_q, cu_k, 1, seqlen_k, dropout_p=0.0, softmax_scale=scale,
                                  causal=True, num_splits=0, **paged_kw))
        except Exception:  # noqa: BLE001
            pass
        # auto is timed first and again last; the regret uses the last timing, taken in the same
        # warmed-up state as the explicit values before it (the first timing in a cell can read slow:
        # NOTES experiment 16). The first is kept as auto_first_us.
        for pos, ns in enumerate([0] + vals + [0]):
            def fn(ns=ns):
                return varlen(q, k, v, cu_q, cu_k, 1, seqlen_k, dropout_p=0.0, softmax_scale=scale,
                              causal=True, num_splits=ns, **paged_kw)
            try:
                o = fn()
                if ns == 0 and o_auto is None:
                    o_auto = o
                elif o_auto is not None:
                    outs_diff.append((o.float() - o_auto.float()).abs().max().item())
                del o
                res = bench(fn, **bench_kw)
            except Exception as e:  # noqa: BLE001
                row["notes"].append(f"num_splits={ns}: " + short_err(e))
                continue
            if ns == 0:
                row["auto_us" if pos > 0 else "auto_first_us"] = res.median_us
            else:
                row["times_us"][str(ns)] = res.median_us
        if outs_diff:
            row["maxdiff"] = max(outs_diff)
    except Exception as e:  # noqa: BLE001
        row["notes"].append("cell: " + short_err(e))
    finally:
        del q, k, v, cu_q, cu_k, o_auto, paged_kw
        gc.collect()
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    if row["times_us"]:
        best = min(row["times_us"].items(), key=lambda kv: kv[1])
        row["best_splits"], row["best_us"] = int(best[0]), best[1]
        row["nosplit_us"] = row["times_us"].get("1")
        if row["auto_us"]:
            row["regret"] = row["auto_us"] / row["best_us"]
    return row


def render(rows, summary, args, env, num_sms, skipped) -> tuple:
    """-> (main table, relative-time table, markdown body)."""
    headers = ["batch", "seqlen_k", "heads", "kv_heads", "split cap", "swept", "auto_splits", "auto_us",
               "best_splits", "best_us", "regret", "num_splits=1 us", "maxdiff"]
    trows = []
    for r in rows:
        sw_txt = compact_ranges(r["swept"])
        if r["restricted"]:
            sw_txt += " (restricted)"
        trows.append([r["batch"], r["seqlen_k"], r["heads"], r["kv_heads"], fmt(r["split_cap"], "d", "?"), sw_txt,
                      fmt(r["auto_splits"], "d", "?"), fmt(r["auto_us"]), fmt(r["best_splits"], "d"),
                      fmt(r["best_us"]), fmt(r["regret"], ".3f"), fmt(r["nosplit_us"]), fmt(r["maxdiff"], ".1e")])
    table = markdown_table(headers, trows)

    cols = sorted({int(s) for r in rows for s in r["times_us"]})
    rel_headers = ["cell", "auto"] + [str(n) for n in cols]
    rel_rows = []
    for r in rows:
        b = r["best_us"]
        line = [cell_name(r), f"{fmt(r['auto_us'] / b if r['auto_us'] and b else None, '.2f')} "
                              f"({fmt(r['auto_splits'], 'd', '?')})"]
        for n in cols:
            t = r["times_us"].get(str(n))
            cell = fmt(t / b if t and b else None, ".2f", "")
            if t and n == r["best_splits"]:
                cell = f"**{cell}**"
            line.append(cell)
        rel_rows.append(line)
    rel_table = markdown_table(rel_headers, rel_rows)

    restricted = summary["restricted_cells"]
    body = [
        "fp16, head dim 128, flash_attn_varlen_func(q (batch, heads, 128), k/v (batch*seqlen_k, kv_heads, 128), "
        "max_seqlen_q=1, causal=True, num_splits=N); microseconds per call (CUDA events, L2 flushed before each "
        f"call, median of {bench_reps(args)} repeats). auto = num_splits=0 (heuristic; auto_splits = "
        f"flash_attn.num_splits_heuristic with {num_sms} SMs); best = fastest explicit N; regret = auto_us / best_us "
        "(< 1: auto beats every explicit N: noise, or a kernel no explicit N selects - explicit N = 1 runs the unsplit "
        "forward kernel, a heuristic choice of 1 the split-KV kernel with one split). split cap = the "
        f"dispatcher's clamp of an explicit N (min(N, key blocks of {KEY_BLOCK} keys, 128), as reported by "
        "num_splits_heuristic(..., num_splits=huge)); larger N are not timed. maxdiff = max |out(N) - out(auto)|.",
        "",
        "; ".join(env[2:]) if len(env) > 2 else "",
        "",
        "**Summary:** " + summary_line(summary) + ".",
    ]
    if restricted:
        body += ["", f"Restricted cells (batch*heads >= {args.restrict_factor:g} x {num_sms} SMs, or reached after the "
                     f"time budget): only num_splits in {{{', '.join(map(str, RESTRICTED_SPLITS))}}} + auto swept: "
                     + ", ".join(restricted) + "."]
    body += ["", table, "", "Time / best time per explicit num_splits (bold: best; auto column: auto / best "
             "and the heuristic's choice):", "", rel_table]
    if skipped:
        body += ["", skipped_line(skipped, args.max_kv_gib)]
    notes = [f"{cell_name(r)}: {n}" for r in rows for n in r["notes"]]
    if notes:
        body += ["", "Notes:"] + [f"- {n}" for n in notes]
    return table, rel_table, "\n".join(body)


def bench_reps(args) -> int:
    if args.reps is not None:
        return args.reps
    return 5 if args.quick else 15


def bench_kwargs(args, late=False) -> dict:
    reps = bench_reps(args)
    if late:
        return dict(warmup=1, reps=min(reps, 5), min_reps=3, max_time_s=0.02)
    return dict(warmup=1 if args.quick else 2, reps=reps, min_reps=min(5, reps), max_time_s=0.15)


def device_sm_count() -> int:
    return torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count


def main(argv=None) -> int:
    args = parse_args(argv)
    conds = parse_cells(args.cells)
    require_cuda("sweep_num_splits.py")
    os.makedirs(args.out_dir, exist_ok=True)
    stem = f"splits_sweep_paged{args.page_size}_h100" if args.page_size else "splits_sweep_h100"
    json_path = args.json or os.path.join(args.out_dir, stem + ".json")
    md_path = args.results_md or os.path.join(args.out_dir, stem + ".md")

    env = environment_lines(REPO)
    for line in env:
        print(line)
    import flash_attn
    from flash_attn import flash_attn_varlen_func as varlen
    heuristic = flash_attn.num_splits_heuristic
    print(f"flash_attn {getattr(flash_attn, '__version__', '?')} from {os.path.dirname(flash_attn.__file__)}")
    num_sms = device_sm_count()

    cells, skipped = select_cells(conds, args.max_kv_gib)
    if skipped:
        print(skipped_line(skipped, args.max_kv_gib))
    if not cells:
        print("no cells selected")
    kw = bench_kwargs(args)
    print(f"timing: CUDA events, 256 MiB L2 flush before each call, median; {kw}; restricted set "
          f"{RESTRICTED_SPLITS} for batch*heads >= {args.restrict_factor:g}*{num_sms}"
          + (" (disabled: --full)" if args.full else ""))
    print()

    torch.manual_seed(0)
    t0 = time.time()
    rows, dead = [], None
    for c in cells:
        late = time.time() - t0 > args.time_budget_s
        restricted = (not args.full and is_restricted(c, num_sms, args.restrict_factor)) or late
        r = sweep_cell(c, varlen, heuristic, num_sms, bench_kwargs(args, late), restricted, args.page_size)
        if late:
            r["notes"].append(f"reached after the {args.time_budget_s:g} s budget: restricted set, minimum repeats")
        rows.append(r)
        curve = " ".join(f"{n}:{r['times_us'][str(n)]:.0f}" for n in r["swept"] if str(n) in r["times_us"])
        print(f"{cell_name(c):22s} auto {fmt(r['auto_splits'], 'd', '?'):>3s} {fmt(r['auto_us'], '8.1f')} us  "
              f"best {fmt(r['best_splits'], 'd', '?'):>3s} {fmt(r['best_us'], '8.1f')} us  "
              f"regret {fmt(r['regret'], '.3f')}{'  [restricted]' if restricted else ''}  | {curve}", flush=True)
        for n in r["notes"]:
            print(f"    note: {n}")
        if r["notes"] and DEVICE == "cuda":
            dead = sticky_cuda_error()
            if dead:
                print(f"CUDA context is unusable after {cell_name(c)}: {dead}; stopping.")
                r["notes"].append(f"stopped here: CUDA context unusable ({dead})")
                break
    elapsed = time.time() - t0

    summary = summarize(rows)
    summary["elapsed_s"] = elapsed
    table, rel_table, body = render(rows, summary, args, env, num_sms, skipped)
    print()
    print(table)
    print()
    print(rel_table)
    print()
    print("summary: " + summary_line(summary))
    if summary["restricted_cells"]:
        print(f"restricted cells ({len(summary['restricted_cells'])}, only {RESTRICTED_SPLITS} + auto swept): "
              + ", ".join(summary["restricted_cells"]))
    print(f"elapsed {elapsed:.1f} s (cells only)")

    write_json(json_path, rows)
    title = (f"num_splits sweep, paged K/V ({args.page_size}-token pages, shuffled)" if args.page_size else TITLE)
    write_section(md_path, title, gpu_name(), today_utc(), body)
    print(f"wrote {md_path}")
    return 0 if not dead else 2


if __name__ == "__main__":
    sys.exit(main())
