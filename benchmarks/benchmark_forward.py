#!/usr/bin/env python
"""Prefill forward TFLOP/s: ours (flash_attn_func) against PyTorch's vendored FlashAttention-2
(aten._flash_attention_forward, same tensors) and cuDNN (SDPA CUDNN_ATTENTION on (b, h, s, d) views).
On compute capability 9.0, ours is the Hopper kernel where it applies, ours_sm80 the SM80 one.

Grid: fp16, bf16 x head dim 64/128/256 x causal or not x seqlen 512..16k, model dim 2048 (heads = 2048 /
head dim, batch = 16k / seqlen); FLOPs = 4 * batch * heads * seqlen^2 * head dim (causal: half). Time per
call: CUDA events, L2 flushed (read) before each call, median; peers timed in order, then in reverse, each
keeping its lower median. Result: forward_<card>.json. --softcap S / --alibi: ours and ours_sm80 with
score modifiers (PyTorch's FA2 and cuDNN take neither: not timed); result forward_score_mods_<card>.json.
--paged P: ours and ours_sm80 read K/V from P-token pages in shuffled order through a block table
(flash_attn_with_kvcache, cache_seqlens = seqlen), the peers the same K/V contiguous; result
forward_paged<P>_<card>.json. --dropout P: ours, ours_sm80 and torch FA2 with dropout_p = P, cuDNN and
ours_nodrop (ours again) without, for the cost of dropout; result forward_dropout_<card>.json.
"""

import sys

import torch
import torch.nn.functional as F

import common
import timing
from common import fmt, ratio

PEERS = ("ours", "ours_sm80", "torch_fa2", "cudnn", "ours_nodrop")


def measure(c, kw, fa2, args):
    from flash_attn import flash_attn_func
    (q, k, v), batch, heads = common.prefill_inputs(c)
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    causal, seqlen = c["causal"], c["seqlen"]
    slopes = torch.rand(heads, device="cuda", dtype=torch.float32) * 0.3 if args.alibi else None
    dropout = args.dropout
    impls = {"ours": (lambda: lambda: flash_attn_func(q, k, v, dropout, causal=causal, softcap=args.softcap,
                                                      alibi_slopes=slopes), None)}
    if dropout:
        impls["ours_nodrop"] = (lambda: lambda: flash_attn_func(q, k, v, causal=causal), None)
    if args.paged:
        from flash_attn import flash_attn_with_kvcache
        k_paged, v_paged, table = common.make_paged(k.flatten(0, 1), v.flatten(0, 1), batch, seqlen, args.paged)
        lens = torch.full((batch,), seqlen, dtype=torch.int32, device="cuda")
        impls["ours"] = (lambda: lambda: flash_attn_with_kvcache(
            q, k_paged, v_paged, cache_seqlens=lens, block_table=table, causal=causal, softcap=args.softcap,
            alibi_slopes=slopes), None)
    if not args.score_mods:
        impls["cudnn"] = (lambda: lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal),
                          timing.sdpa_context("CUDNN_ATTENTION"))
    if torch.cuda.get_device_capability() == (9, 0):
        impls["ours_sm80"] = (common.on_sm80_kernels(impls["ours"][0], "set_sm90_forward"), None)
    if fa2 and not args.score_mods:
        impls["torch_fa2"] = (lambda: lambda: fa2(q, k, v, None, None, seqlen, seqlen, causal, dropout), None)
    times, notes, outs = timing.time_impls(impls, kw, 1 if args.quick else 2)
    flops = common.forward_flops(c, batch, heads)
    row = dict(c, batch=batch, nheads=heads, notes=[f"{n}: {t}" for n, t in notes.items()])
    for name in PEERS:
        row[f"{name}_us"] = times.get(name)
        row[f"{name}_tflops"] = flops / (times[name] * 1e-6) / 1e12 if times.get(name) else None
    if not dropout and outs.get("ours") is not None and outs.get("torch_fa2") is not None:
        row["maxdiff"] = common.maxdiff(outs["ours"], outs["torch_fa2"])
    return [row]


def main(argv=None) -> int:
    p = common.parser(__doc__, time_budget_s=150.0, grid="prefill")
    p.add_argument("--softcap", type=float, default=0.0, help="softcap of every call (default %(default)s: none)")
    p.add_argument("--alibi", action="store_true", help="ALiBi slopes per head on every call")
    p.add_argument("--paged", type=int, default=0,
                   help="ours reads K/V from pages of this many tokens (default %(default)s: contiguous)")
    p.add_argument("--dropout", type=float, default=0.0,
                   help="dropout_p of ours, ours_sm80 and torch FA2 (default %(default)s); cuDNN runs without")
    args = p.parse_args(argv)
    args.score_mods = args.softcap > 0 or args.alibi
    desc = common.start()
    fa2, fa2_note = timing.torch_fa2_forward()
    if fa2_note:
        print("torch FA2:", fa2_note)
    rows = common.run_cells(common.prefill_cells(args), lambda c, kw, late: measure(c, kw, fa2, args), args,
                            common.bench_kwargs(args, 0.15), [f"{n}_tflops" for n in PEERS])
    peers = PEERS if args.dropout else PEERS[:-1]  # ours_nodrop only beside ours with dropout
    headers = (["dtype", "headdim", "causal", "seqlen", "ours TFLOP/s", "ours SM80 TFLOP/s", "torch FA2 TFLOP/s",
                "cuDNN TFLOP/s"] + (["ours no-dropout TFLOP/s"] if args.dropout else [])
               + [f"ours/{n}" for n in peers[2:]] + ["maxdiff"])
    table = [[r["dtype"], r["headdim"], r["causal"], r["seqlen"]] + [fmt(r.get(f"{n}_tflops")) for n in peers]
             + [fmt(ratio(r.get("ours_tflops"), r.get(f"{n}_tflops")), ".2f") for n in peers[2:]]
             + [fmt(r.get("maxdiff"), ".1e")] for r in rows]
    report = (common.markdown_table(headers, table) + f"\n\ndropout_p {args.dropout:g} (ours, ours SM80, torch FA2; "
              "cuDNN and ours no-dropout 0)\nours >= torch FA2 in "
              f"{common.count(rows, 'torch_fa2_tflops', 'ours_tflops', 1.0)} cells, >= cuDNN in "
              f"{common.count(rows, 'cudnn_tflops', 'ours_tflops', 1.0)}")
    name = "forward_score_mods" if args.score_mods else "forward_dropout" if args.dropout else "forward"
    common.save(args, f"{name}_paged{args.paged}" if args.paged else name, desc, rows, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
