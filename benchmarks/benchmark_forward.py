#!/usr/bin/env python
"""Prefill (forward) throughput in TFLOP/s: ours (flash_attn_func) against PyTorch's vendored
FlashAttention-2 (aten._flash_attention_forward on the same dense (batch, seqlen, heads, d) tensors)
and cuDNN (SDPA CUDNN_ATTENTION on (b, h, s, d) views of them), in one run.

Grid: fp16 and bf16 x head dim 64/128/256 x causal and not x seqlen 512..16k, model dim 2048
(heads = 2048 / head dim, batch = 16k / seqlen). FLOPs = 4 * batch * heads * seqlen^2 * head dim,
halved for causal. Time per call: CUDA events, L2 flushed (read) before each call, median; each
implementation timed, then timed again in reverse order, keeping its lower median.
Result: forward_<card>.json.
"""

from __future__ import annotations

import gc
import sys
import time

import torch
import torch.nn.functional as F

import common
from common import fmt, ratio

MODEL_DIM = 2048
TOKENS = 16384
SEQLENS = [512, 1024, 2048, 4096, 8192, 16384]
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def parse_args(argv=None):
    p = common.parser(__doc__)
    p.add_argument("--dtypes", default="fp16,bf16", help="default %(default)s")
    p.add_argument("--headdims", default="64,128,256", help="default %(default)s")
    p.add_argument("--causal", choices=["both", "true", "false"], default="both")
    p.add_argument("--time-budget-s", type=float, default=150.0,
                   help="cells started after this many seconds get the minimum repeats (default 150)")
    return p.parse_args(argv)


def forward_flops(batch, heads, seqlen, headdim, causal) -> float:
    return 4 * batch * heads * seqlen ** 2 * headdim / (2 if causal else 1)


def cell(dtype, headdim, causal, seqlen, kw, passes, fa2):
    heads, batch = MODEL_DIM // headdim, TOKENS // seqlen
    q, k, v = (torch.randn(batch, seqlen, heads, headdim, device="cuda", dtype=DTYPES[dtype]) for _ in range(3))
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    from flash_attn import flash_attn_func
    impls = {"ours": (lambda: lambda: flash_attn_func(q, k, v, causal=causal), None),
             "cudnn": (lambda: lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal),
                       common.sdpa_context("CUDNN_ATTENTION"))}
    if fa2:
        impls["torch_fa2"] = (lambda: lambda: fa2(q, k, v, None, None, seqlen, seqlen, causal), None)
    times, notes, outs = common.time_impls(impls, kw, passes)
    flops = forward_flops(batch, heads, seqlen, headdim, causal)
    row = dict(dtype=dtype, causal=causal, headdim=headdim, seqlen=seqlen, batch=batch, nheads=heads,
               notes=[f"{n}: {t}" for n, t in notes.items()])
    for name in ("ours", "torch_fa2", "cudnn"):
        row[f"{name}_us"] = times.get(name)
        row[f"{name}_tflops"] = flops / (times[name] * 1e-6) / 1e12 if times.get(name) else None
    if outs.get("ours") is not None and outs.get("torch_fa2") is not None:
        row["maxdiff"] = (outs["ours"].float() - outs["torch_fa2"].float()).abs().max().item()
    return row


def main(argv=None) -> int:
    args = parse_args(argv)
    desc = common.start("benchmark_forward.py", args)
    fa2, fa2_note = common.torch_fa2_forward()
    if fa2_note:
        print("torch FA2:", fa2_note)
    kw, late_kw = common.bench_kwargs(args, 0.15), dict(warmup=1, reps=3, min_reps=3, max_time_s=0.05)
    causals = {"both": [False, True], "true": [True], "false": [False]}[args.causal]
    torch.manual_seed(0)
    t0, rows = time.time(), []
    for dtype in args.dtypes.split(","):
        for headdim in map(int, args.headdims.split(",")):
            for causal in causals:
                for seqlen in SEQLENS:
                    cell_kw = kw if time.time() - t0 < args.time_budget_s else late_kw
                    try:
                        r = cell(dtype, headdim, causal, seqlen, cell_kw, 1 if args.quick else 2, fa2)
                    except Exception as e:  # noqa: BLE001 - one broken cell is reported, the run goes on
                        r = dict(dtype=dtype, causal=causal, headdim=headdim, seqlen=seqlen, ours_tflops=None,
                                 torch_fa2_tflops=None, cudnn_tflops=None, notes=["cell: " + common.short_err(e)])
                    rows.append(r)
                    print(f"{dtype} hd{headdim} {'causal' if causal else 'full  '} s{seqlen:<6d} ours "
                          f"{fmt(r['ours_tflops'], '6.1f')} torch_fa2 {fmt(r['torch_fa2_tflops'], '6.1f')} cudnn "
                          f"{fmt(r['cudnn_tflops'], '6.1f')} TFLOP/s" + "".join(f"\n    {n}" for n in r["notes"]),
                          flush=True)
                    gc.collect()
                    torch.cuda.empty_cache()
                    if r["notes"] and common.context_dead():
                        print("the CUDA context is unusable; stopping")
                        return finish(args, desc, rows, t0)
    return finish(args, desc, rows, t0)


def finish(args, desc, rows, t0) -> int:
    headers = ["dtype", "headdim", "causal", "seqlen", "ours TFLOP/s", "torch FA2 TFLOP/s", "cuDNN TFLOP/s",
               "ours/torch_fa2", "ours/cudnn", "maxdiff"]
    table = [[r["dtype"], r["headdim"], r["causal"], r["seqlen"], fmt(r["ours_tflops"]), fmt(r["torch_fa2_tflops"]),
              fmt(r["cudnn_tflops"]), fmt(ratio(r["ours_tflops"], r["torch_fa2_tflops"]), ".2f"),
              fmt(ratio(r["ours_tflops"], r["cudnn_tflops"]), ".2f"), fmt(r.get("maxdiff"), ".1e")] for r in rows]
    both = [r for r in rows if r["ours_tflops"] and r["torch_fa2_tflops"]]
    report = (common.markdown_table(headers, table) + f"\n\nours >= torch FA2 in "
              f"{sum(r['ours_tflops'] >= r['torch_fa2_tflops'] for r in both)}/{len(both)} cells")
    print("\n" + report + f"\n\nelapsed {time.time() - t0:.0f} s")
    common.save(args, "forward", desc, rows, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
