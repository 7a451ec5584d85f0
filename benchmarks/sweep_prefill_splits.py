#!/usr/bin/env python
"""Split-KV of longer queries on the Hopper forward: regret = heuristic (num_splits=0) time / best explicit time.

Cells: batch 1, heads 16 / kv heads 4, seqlen_q 65 / 256 / 1024 against seqlen_k 8k / 32k / 128k, causal
(bottom-right) or not, fp16 (--headdims, default 128). Per cell: num_splits = 0 (the plan:
flash_attn_2_cuda.num_splits_heuristic(..., sm90_prefill=True)), 1 (the unsplit Hopper kernel) and 2, 4, 8, 16,
32 where the split tile's key blocks allow them, then the SM80 kernels on the same call (set_sm90_forward(False):
unsplit, as the SM80 plan keeps queries past 64 rows). Median of CUDA-event times, L2 flushed. Needs compute
capability 9.0. Result: prefill_splits_sweep_<card>.json.
"""

import sys

import torch

import common
import timing
from common import fmt

SWEEP = [1, 2, 4, 8, 16, 32]
SEQLENS_Q = [65, 256, 1024]
SEQLENS_K = [8192, 32768, 131072]
HEADS, KV_HEADS = 16, 4


def sweep_cell(c, kw):
    import flash_attn
    import flash_attn_2_cuda
    b, sq, sk, d, causal = 1, c["seqlen_q"], c["seqlen_k"], c["headdim"], c["causal"]
    sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    cap = flash_attn_2_cuda.num_splits_heuristic(b, HEADS, KV_HEADS, sq, sk, d, sms, 1 << 20, True)
    row = dict(c, batch=b, heads=HEADS, kv_heads=KV_HEADS, times_us={}, notes=[],
               auto_splits=flash_attn_2_cuda.num_splits_heuristic(b, HEADS, KV_HEADS, sq, sk, d, sms, 0, True))
    q = torch.randn(b, sq, HEADS, d, device="cuda", dtype=torch.float16)
    k, v = (torch.randn(b, sk, KV_HEADS, d, device="cuda", dtype=torch.float16) for _ in range(2))

    def call(n):
        return lambda: lambda: flash_attn.flash_attn_func(q, k, v, causal=causal, num_splits=n)

    timing.settle(call(0)())
    for n in [0] + [n for n in SWEEP if n <= cap]:
        t, note, _ = timing.time_impl(call(n), kw)
        if note:
            row["notes"].append(f"num_splits={n}: {note}")
        if n == 0:
            row["auto_us"] = t
        else:
            row["times_us"][str(n)] = t
    t, note, _ = timing.time_impl(common.on_sm80_kernels(call(0), "set_sm90_forward"), kw)
    row["sm80_us"] = t
    if note:
        row["notes"].append(f"SM80: {note}")
    timed = {n: t for n, t in row["times_us"].items() if t}
    row["best_splits"] = int(min(timed, key=timed.get)) if timed else None
    row["best_us"] = timed.get(str(row["best_splits"]))
    row["regret"] = common.ratio(row.get("auto_us"), row["best_us"])
    row["speedup_vs_unsplit"] = common.ratio(timed.get("1"), row.get("auto_us"))
    return row


def report(rows) -> str:
    headers = ["causal", "seqlen_q", "seqlen_k", "auto splits", "auto us", "best splits", "best us", "regret",
               "unsplit us", "unsplit / auto", "SM80 us"]
    table = [[r["causal"], r["seqlen_q"], r["seqlen_k"], r.get("auto_splits"), fmt(r.get("auto_us")),
              fmt(r.get("best_splits"), "d"), fmt(r.get("best_us")), fmt(r.get("regret"), ".3f"),
              fmt(r.get("times_us", {}).get("1")), fmt(r.get("speedup_vs_unsplit"), ".2f"), fmt(r.get("sm80_us"))]
             for r in rows]
    regrets = [r["regret"] for r in rows if r.get("regret")]
    return (f"regret <= 1.05 in {sum(x <= 1.05 for x in regrets)}/{len(regrets)} cells\n\n"
            + common.markdown_table(headers, table))


def main(argv=None) -> int:
    p = common.parser(__doc__, time_budget_s=120.0)
    p.add_argument("--headdims", default="128", help="default %(default)s")
    args = p.parse_args(argv)
    desc = common.start()
    if torch.cuda.get_device_capability() != (9, 0):
        raise SystemExit("sweep_prefill_splits.py times the Hopper forward: it needs a compute capability 9.0 GPU")
    cells = [dict(headdim=d, causal=causal, seqlen_q=sq, seqlen_k=sk) for d in map(int, args.headdims.split(","))
             for causal in (False, True) for sq in SEQLENS_Q for sk in SEQLENS_K]

    def line(r):
        return (f"hd{r['headdim']} {'causal' if r['causal'] else 'full  '} q{r['seqlen_q']:<5d} s{r['seqlen_k']:<7d} "
                f"auto {fmt(r.get('auto_splits'), '3d')} {fmt(r.get('auto_us'), '9.1f')} us  best "
                f"{fmt(r.get('best_splits'), '3d')} {fmt(r.get('best_us'), '9.1f')} us  unsplit "
                f"{fmt(r.get('times_us', {}).get('1'), '9.1f')} us  SM80 {fmt(r.get('sm80_us'), '9.1f')} us")

    rows = common.run_cells(cells, lambda c, kw, late: [sweep_cell(c, kw)], args, common.bench_kwargs(args, 0.3), line)
    common.save(args, "prefill_splits_sweep", desc, rows, report(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
