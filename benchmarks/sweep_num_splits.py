#!/usr/bin/env python
"""num_splits sweep on benchmark_decode.py's decode grid: regret = heuristic (num_splits=0) time / best explicit time.

Per cell: auto, N = 1..16, 32, 64, 128 up to the dispatcher's clamp plus the heuristic's choice,
auto again (the regret's, same warmed-up state). Cells with batch*heads >= 2 x SMs or reached after
--time-budget-s sweep N = 1..4 only. Explicit N = 1 runs the unsplit kernel, a heuristic 1 the
decode kernel (regret < 1 possible). Median of 15 calls (--quick 5), L2 flushed. Result:
splits_sweep_<card>.json; --page-size N: shuffled N-token pages, splits_sweep_pagedN_<card>.json.
"""

import itertools
import sys

import torch

import common
import timing
from common import fmt

SWEEP = list(range(1, 17)) + [32, 64, 128]
RESTRICTED = [1, 2, 3, 4]
REGRET_OK = 1.05
RESTRICT_FACTOR = 2  # batch*heads >= this many x SMs: only RESTRICTED is swept


def sweep_cell(c, args, restricted, kw):
    import flash_attn
    b, s, h, hk = c["batch"], c["seqlen_k"], c["heads"], c["kv_heads"]
    row = dict(c, page_size=args.page_size, key_blocks=-(-s // 128), restricted=restricted, times_us={},
               auto_splits=flash_attn.num_splits_heuristic(b, h, hk, 1, s, 128),
               split_cap=flash_attn.num_splits_heuristic(b, h, hk, 1, s, 128, num_splits=1 << 20),
               auto_us=None, auto_first_us=None, best_splits=None, best_us=None, regret=None, maxdiff=None, notes=[])
    row["swept"] = sorted({n for n in (RESTRICTED if restricted else SWEEP) if n <= row["split_cap"]}
                          | ({row["auto_splits"]} if row["auto_splits"] <= row["split_cap"] else set()))
    q = torch.randn(b, h, 128, device="cuda", dtype=torch.float16)
    k, v = (torch.randn(b * s, hk, 128, device="cuda", dtype=torch.float16) for _ in range(2))
    cu_q = torch.arange(b + 1, device="cuda", dtype=torch.int32)
    paged = {}
    if args.page_size:
        k, v, paged["block_table"] = common.make_paged(k, v, b, s, args.page_size)

    def call(n):
        return lambda: lambda: flash_attn.flash_attn_varlen_func(q, k, v, cu_q, cu_q * s, 1, s, causal=True,
                                                                 num_splits=n, **paged)

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


def ranges(vals) -> str:
    """[1, 2, 3, 4, 32] -> "1-4,32" (a run of consecutive values keeps n - its index)."""
    runs = [[n for _, n in g] for _, g in itertools.groupby(enumerate(vals), lambda p: p[1] - p[0])]
    return ",".join(str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs)


def report(rows) -> str:
    headers = ["batch", "seqlen_k", "heads", "kv_heads", "swept", "auto_splits", "auto_us", "best_splits", "best_us",
               "regret", "num_splits=1 us", "maxdiff"]
    table = [[r["batch"], r["seqlen_k"], r["heads"], r["kv_heads"],
              ranges(r["swept"]) + (" (restricted)" if r["restricted"] else ""), r["auto_splits"], fmt(r["auto_us"]),
              fmt(r["best_splits"], "d"), fmt(r["best_us"]), fmt(r["regret"], ".3f"), fmt(r["nosplit_us"]),
              fmt(r["maxdiff"], ".1e")] for r in rows]
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
    p.add_argument("--page-size", type=int, default=0, help="paged cache of this many tokens per page (default 0: "
                   "contiguous)")
    args = p.parse_args(argv)
    desc = common.start()

    def measure(c, kw, late):
        restricted = late or c["batch"] * c["heads"] >= RESTRICT_FACTOR * desc["sms"]
        return [sweep_cell(c, args, restricted, kw)]

    def line(r):
        return (f"{common.cell_name(r):22s} auto {fmt(r.get('auto_splits'), '3d')} {fmt(r.get('auto_us'), '8.1f')} us  "
                f"best {fmt(r.get('best_splits'), '3d')} {fmt(r.get('best_us'), '8.1f')} us  regret "
                f"{fmt(r.get('regret'), '.3f')}" + ("  [restricted]" if r.get("restricted") else ""))

    kw = dict(warmup=1 if args.quick else 2, reps=5 if args.quick else 15, min_reps=5, max_time_s=0.15)
    rows = [r for r in common.run_cells(common.select_cells(common.decode_cells(), args), measure, args, kw, line)
            if "swept" in r]
    common.save(args, f"splits_sweep_paged{args.page_size}" if args.page_size else "splits_sweep", desc, rows,
                report(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
