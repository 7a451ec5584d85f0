#!/usr/bin/env python
"""num_splits sweeps: regret = heuristic (num_splits=0) time / best explicit time. Per cell: auto, the
explicit N of the grid up to the dispatcher's clamp plus the heuristic's choice, auto again (the regret's,
same warmed-up state); maxdiff = max |out(N) - out(auto)|; median of CUDA-event times, L2 flushed.

--grid decode (default): benchmark_decode.py's decode grid (flash_attn_varlen_func), N = 1..16, 32, 64,
  128; N = 1..4 only where batch*heads >= 2 x SMs or after --time-budget-s. Explicit N = 1 runs the unsplit
  kernel, a heuristic 1 the decode kernel (regret < 1 possible). Median of 15 calls (--quick 5). Result:
  splits_sweep_<card>.json; --page-size N: shuffled N-token pages, splits_sweep_pagedN_<card>.json.
--grid prefill (compute capability 9.0): flash_attn_func, batch 1, heads 16 / kv heads 4, seqlen_q 65 / 256
  / 1024 x seqlen_k 8k / 32k / 128k, causal (bottom-right) or not, fp16, --headdims (default 128); the
  Hopper forward's plan (flash_attn_2_cuda.num_splits_heuristic(..., sm90_prefill=True)), N = 1 (the unsplit
  Hopper kernel), 2, 4, 8, 16, 32, then the SM80 kernels (set_sm90_forward(False): unsplit, as the SM80 plan
  keeps queries past 64 rows). Result: prefill_splits_sweep_<card>.json.
--grid rows: the split kernel's tile (17-64 query rows of a (batch, kv head) after the GQA swap or packing):
  flash_attn_func, causal, fp16, head dim 128, batch 1 / 4 x seqlen_k 4k / 16k, for 32 / 8 heads with 8 and 16
  queries (packed: 32 and 64 rows), 32 / 1 heads with one query (swapped: 32 rows), 12 / 12 heads with 32 and
  64 queries; N as the decode grid's. Result: rows_splits_sweep_<card>.json.
"""

import functools
import itertools
import sys

import torch

import common
import timing
from common import fmt

DECODE_SWEEP = list(range(1, 17)) + [32, 64, 128]
RESTRICTED = [1, 2, 3, 4]
RESTRICT_FACTOR = 2  # batch*heads >= this many x SMs: only RESTRICTED is swept
PREFILL_SWEEP = [1, 2, 4, 8, 16, 32]
PREFILL_KEYS = ["headdim", "causal", "seqlen_q", "seqlen_k"]
ROWS_KEYS = ["batch", "seqlen_k", "heads", "kv_heads", "seqlen_q"]
ROWS_SHAPES = [(32, 8, 8), (32, 8, 16), (32, 1, 1), (12, 12, 32), (12, 12, 64)]  # heads, kv heads, seqlen_q
PREFILL_SEQLENS_Q = [65, 256, 1024]
PREFILL_SEQLENS_K = [8192, 32768, 131072]
REGRET_OK = 1.05


def sweep(row, call, plan, grid, kw):
    """Times call(0) (auto), call(N) for the N of grid up to the clamp plus the heuristic's choice, call(0)
    again; plan(N) is the dispatcher's num_splits for a requested N (0: the heuristic)."""
    row.update(auto_splits=plan(0), split_cap=plan(1 << 20), times_us={}, auto_us=None, auto_first_us=None,
               best_splits=None, best_us=None, regret=None)
    row["swept"] = sorted({n for n in grid + [row["auto_splits"]] if n <= row["split_cap"]})
    timing.settle(call(0)())
    auto_out, diffs = None, []
    for pos, n in enumerate([0] + row["swept"] + [0]):
        t, note, out = timing.time_impl(call(n), kw)
        if note:
            row["notes"].append(f"num_splits={n}: {note}")
        elif n == 0:
            row["auto_us" if pos else "auto_first_us"], auto_out = t, out
        else:
            row["times_us"][str(n)] = t
            if auto_out is not None:
                diffs.append(common.maxdiff(out, auto_out))
    if row["times_us"]:
        row["best_splits"] = int(min(row["times_us"], key=row["times_us"].get))
        row["best_us"] = row["times_us"][str(row["best_splits"])]
        row["regret"] = common.ratio(row["auto_us"], row["best_us"])
    row["nosplit_us"], row["maxdiff"] = row["times_us"].get("1"), max(diffs, default=None)
    return row


def decode_cell(c, args, kw, late, sms):
    import flash_attn
    b, s, h, hk = c["batch"], c["seqlen_k"], c["heads"], c["kv_heads"]
    restricted = late or b * h >= RESTRICT_FACTOR * sms
    row = dict(c, page_size=args.page_size, key_blocks=-(-s // 128), restricted=restricted, notes=[])
    q = torch.randn(b, h, 128, device="cuda", dtype=torch.float16)
    k, v = (torch.randn(b * s, hk, 128, device="cuda", dtype=torch.float16) for _ in range(2))
    cu_q = torch.arange(b + 1, device="cuda", dtype=torch.int32)
    paged = {}
    if args.page_size:
        k, v, paged["block_table"] = common.make_paged(k, v, b, s, args.page_size)

    def call(n):
        return lambda: lambda: flash_attn.flash_attn_varlen_func(q, k, v, cu_q, cu_q * s, 1, s, causal=True,
                                                                 num_splits=n, **paged)
    plan = functools.partial(flash_attn.num_splits_heuristic, b, h, hk, 1, s, 128, None)  # (num_splits) -> splits
    return sweep(row, call, plan, RESTRICTED if restricted else DECODE_SWEEP, kw)


def prefill_cell(c, args, kw, late, sms):
    """decode_cell's arguments; a late prefill cell gets the fewer repeats of kw but its whole sweep."""
    import flash_attn
    import flash_attn_2_cuda
    b, sq, sk, h, hk, d = (c[key] for key in ("batch", "seqlen_q", "seqlen_k", "heads", "kv_heads", "headdim"))
    row = dict(c, notes=[])
    q = torch.randn(b, sq, h, d, device="cuda", dtype=torch.float16)
    k, v = (torch.randn(b, sk, hk, d, device="cuda", dtype=torch.float16) for _ in range(2))

    def call(n):
        return lambda: lambda: flash_attn.flash_attn_func(q, k, v, causal=c["causal"], num_splits=n)
    sweep(row, call, functools.partial(flash_attn_2_cuda.num_splits_heuristic, b, h, hk, sq, sk, d, sms,
                                       sm90_prefill=True, causal=c["causal"]), PREFILL_SWEEP, kw)
    row["sm80_us"], note, _ = timing.time_impl(common.on_sm80_kernels(call(0), "set_sm90_forward"), kw)
    row["notes"] += [f"SM80: {note}"] if note else []
    row["speedup_vs_unsplit"] = common.ratio(row["nosplit_us"], row["auto_us"])
    return row


def rows_cell(c, args, kw, late, sms):
    """decode_cell's arguments: the dense call whose rows fill the split kernel's tile."""
    import flash_attn
    b, sq, sk, h, hk = (c[key] for key in ("batch", "seqlen_q", "seqlen_k", "heads", "kv_heads"))
    row = dict(c, notes=[])
    q = torch.randn(b, sq, h, 128, device="cuda", dtype=torch.float16)
    k, v = (torch.randn(b, sk, hk, 128, device="cuda", dtype=torch.float16) for _ in range(2))

    def call(n):
        return lambda: lambda: flash_attn.flash_attn_func(q, k, v, causal=True, num_splits=n)
    plan = functools.partial(flash_attn.num_splits_heuristic, b, h, hk, sq, sk, 128, None)  # (num_splits) -> splits
    return sweep(row, call, plan, DECODE_SWEEP, kw)


def ranges(vals) -> str:
    """[1, 2, 3, 4, 32] -> "1-4,32" (a run of consecutive values keeps n - its index)."""
    runs = [[n for _, n in g] for _, g in itertools.groupby(enumerate(vals), lambda p: p[1] - p[0])]
    return ",".join(str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs)


def report(rows, grid) -> str:
    """The grid's table, then time / best time per explicit N of every cell."""
    keys = {"decode": ["batch", "seqlen_k", "heads", "kv_heads"], "rows": ROWS_KEYS}.get(grid, PREFILL_KEYS)
    extra = [("unsplit/auto", "speedup_vs_unsplit", ".2f"), ("SM80 us", "sm80_us", ".1f")] if grid == "prefill" else []
    headers = keys + ["swept", "auto_splits", "auto_us", "best_splits", "best_us", "regret", "num_splits=1 us",
                      "maxdiff"] + [h for h, _, _ in extra]
    table = [[r[k] for k in keys] + [ranges(r["swept"]) + (" (restricted)" if r.get("restricted") else ""),
                                     r["auto_splits"], fmt(r["auto_us"]), fmt(r["best_splits"], "d"),
                                     fmt(r["best_us"]), fmt(r["regret"], ".3f"), fmt(r["nosplit_us"]),
                                     fmt(r["maxdiff"], ".1e")] + [fmt(r[k], spec) for _, k, spec in extra]
             for r in rows]
    cols = sorted({int(n) for r in rows for n in r["times_us"]})
    rel = [[common.cell_name(r), f"{fmt(r['regret'], '.2f')} ({r['auto_splits']})"]
           + [fmt(common.ratio(r["times_us"].get(str(n)), r["best_us"]), ".2f").replace("n/a", "") for n in cols]
           for r in rows]
    regrets = [r for r in rows if r["regret"]]
    worst = max(regrets, key=lambda r: r["regret"], default=None)
    summary = (f"regret <= {REGRET_OK} in {sum(r['regret'] <= REGRET_OK for r in regrets)}/{len(regrets)} cells"
               + (f"; worst {worst['regret']:.3f} ({common.cell_name(worst)})" if worst else ""))
    return "\n\n".join([summary, common.markdown_table(headers, table),
                        "Time / best time per explicit num_splits (auto: regret and the heuristic's choice):",
                        common.markdown_table(["cell", "auto"] + list(map(str, cols)), rel)])


def main(argv=None) -> int:
    p = common.parser(__doc__, time_budget_s=120.0, grid="decode")
    p.add_argument("--grid", choices=["decode", "prefill", "rows"], default="decode")
    p.add_argument("--page-size", type=int, default=0, help="decode grid: paged cache of this many tokens per page "
                   "(default 0: contiguous)")
    p.add_argument("--headdims", default="128", help="prefill grid (default %(default)s)")
    args = p.parse_args(argv)
    if args.grid != "decode" and args.page_size:
        p.error("--page-size applies to the decode grid")
    desc = common.start()
    if args.grid == "decode":
        cells, cell = common.decode_cells(), decode_cell
        measurement = f"splits_sweep_paged{args.page_size}" if args.page_size else "splits_sweep"
        kw = dict(warmup=1 if args.quick else 2, reps=5 if args.quick else 15, min_reps=5, max_time_s=0.15)
    elif args.grid == "rows":
        cells = [dict(batch=b, seqlen_k=sk, heads=h, kv_heads=hk, seqlen_q=sq)
                 for b in (1, 4) for sk in (4096, 16384) for h, hk, sq in ROWS_SHAPES]
        cell, measurement = rows_cell, "rows_splits_sweep"
        kw = dict(warmup=1 if args.quick else 2, reps=5 if args.quick else 15, min_reps=5, max_time_s=0.15)
    elif torch.cuda.get_device_capability() != (9, 0):
        raise SystemExit("--grid prefill times the Hopper forward: it needs a compute capability 9.0 GPU")
    else:
        cells = [dict(headdim=d, causal=causal, batch=1, heads=16, kv_heads=4, seqlen_q=sq, seqlen_k=sk)
                 for d in map(int, args.headdims.split(",")) for causal in (False, True)
                 for sq in PREFILL_SEQLENS_Q for sk in PREFILL_SEQLENS_K]
        cell, measurement, kw = prefill_cell, "prefill_splits_sweep", common.bench_kwargs(args, 0.3)
    fields = ["auto_splits", "auto_us", "best_splits", "best_us", "regret"] + {
        "decode": ["restricted"], "prefill": ["sm80_us"]}.get(args.grid, [])
    rows = common.run_cells(common.select_cells(cells, args),
                            lambda c, kw, late: [cell(c, args, kw, late, desc["sms"])], args, kw, fields)
    rows = [r for r in rows if "swept" in r]  # cells that ran (a failing one holds only its error)
    common.save(args, measurement, desc, rows, report(rows, args.grid))
    return 0


if __name__ == "__main__":
    sys.exit(main())
