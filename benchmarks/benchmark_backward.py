#!/usr/bin/env python
"""Backward-pass time and TFLOP/s: ours (flash_attn_func, deterministic=False and True) against
PyTorch's vendored FlashAttention-2 (SDPA FLASH_ATTENTION) and cuDNN (SDPA CUDNN_ATTENTION); on
compute capability 9.0 also ours on the SM80 kernels (set_sm90_backward(False): the kernel the
Hopper backward replaces where it applies).

The timed call is torch.autograd.grad(out, (q, k, v), dout, retain_graph=True) of a forward output
computed beforehand. Grid, timing and forward FLOPs as in benchmark_forward.py; backward FLOPs =
2.5 x forward. An implementation whose forward or backward raises is n/a, with the reason.
--dropout P passes dropout_p to ours and torch FA2 (cuDNN runs without) and adds ours_nodrop (ours
without dropout, for the cost of dropout). Result: backward_<card>.json, backward_dropout_<card>.json
with --dropout.
"""

import sys

import torch
import torch.nn.functional as F

import common
import timing
from common import fmt, ratio

BACKWARD_FLOPS_FACTOR = 2.5
PEERS = ("ours", "ours_det", "ours_sm80", "torch_fa2", "cudnn", "ours_nodrop")


def backward_of(forward, q, k, v):
    """make_fn for time_impl: run the forward once (not timed), return the backward call."""
    def make():
        out = forward(q, k, v)
        dout = torch.randn_like(out)  # same strides as out: no layout copy inside the backward
        return lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)
    return make


def measure(c, kw, args):
    from flash_attn import flash_attn_func
    (q, k, v), batch, heads = common.prefill_inputs(c, requires_grad=True)
    causal, dropout = c["causal"], args.dropout

    def sdpa(p):
        return lambda q, k, v: F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=p, is_causal=causal)

    def ours(deterministic, p=dropout):
        return lambda q, k, v: flash_attn_func(q, k, v, p, causal=causal, deterministic=deterministic)

    impls = {"ours": (backward_of(ours(False), q, k, v), None),
             "ours_det": (backward_of(ours(True), q, k, v), None),
             "torch_fa2": (backward_of(sdpa(dropout), q, k, v), timing.sdpa_context("FLASH_ATTENTION")),
             "cudnn": (backward_of(sdpa(0.0), q, k, v), timing.sdpa_context("CUDNN_ATTENTION"))}
    if dropout:
        impls["ours_nodrop"] = (backward_of(ours(False, 0.0), q, k, v), None)
    if torch.cuda.get_device_capability() == (9, 0):
        impls["ours_sm80"] = (common.on_sm80_kernels(impls["ours"][0], "set_sm90_backward"), None)
    times, notes, _ = timing.time_impls(impls, kw, 1 if args.quick else 2)
    flops = BACKWARD_FLOPS_FACTOR * common.forward_flops(c, batch, heads)
    row = dict(c, batch=batch, nheads=heads, dropout_p=dropout, notes=[f"{n}: {t}" for n, t in notes.items()])
    for name in impls:
        row[f"{name}_bwd_ms"] = times[name] / 1e3 if times.get(name) else None
        row[f"{name}_bwd_tflops"] = flops / (times[name] * 1e-6) / 1e12 if times.get(name) else None
    return [row]


def main(argv=None) -> int:
    p = common.parser(__doc__, time_budget_s=200.0, grid="prefill")
    p.add_argument("--dropout", type=float, default=0.0, help="dropout_p for ours and torch FA2 (default 0)")
    args = p.parse_args(argv)
    desc = common.start()
    rows = common.run_cells(common.prefill_cells(args), lambda c, kw, late: measure(c, kw, args), args,
                            common.bench_kwargs(args, 0.2), [f"{n}_bwd_tflops" for n in PEERS])
    peers = PEERS if args.dropout else PEERS[:-1]  # ours_nodrop only beside ours with dropout
    against = ("torch_fa2", "ours_sm80") + (("ours_nodrop",) if args.dropout else ())
    headers = (["dtype", "headdim", "causal", "seqlen"] + [f"{n} TFLOP/s" for n in peers]
               + [f"ours/{n}" for n in against])
    table = [[r[k] for k in headers[:4]] + [fmt(r.get(f"{n}_bwd_tflops")) for n in peers]
             + [fmt(ratio(r.get("ours_bwd_tflops"), r.get(f"{n}_bwd_tflops")), ".2f") for n in against] for r in rows]
    notes = sorted({n for r in rows for n in r["notes"]})
    report = (common.markdown_table(headers, table) + f"\n\ndropout_p {args.dropout:g} (ours, ours_det, ours_sm80, "
              "torch FA2; cuDNN and ours_nodrop 0)\nours >= torch FA2 in "
              f"{common.count(rows, 'torch_fa2_bwd_tflops', 'ours_bwd_tflops', 1.0)} cells"
              + "".join(f"\n- {n}" for n in notes[:20]))
    common.save(args, "backward_dropout" if args.dropout else "backward", desc, rows, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
