#!/usr/bin/env python
"""Decode latency (fp16, head dim 128, causal = bottom-right), ours against PyTorch's FA2 and cuDNN
on the same K/V memory; microseconds per call, timed as in benchmark_forward.py.

--grid decode (default): one query per sequence, seqlen_k 2048..32768 x batch 1/16/128 x heads 12/12,
  32/8, 32/32, flash_attn_varlen_func. Columns: ours (num_splits=0), nosplit (num_splits=1),
  torch_fa2_varlen (aten._flash_attention_forward), cudnn (SDPA CUDNN_ATTENTION, enable_gqa),
  paged16 / paged256 (ours on K/V in shuffled 16- / 256-token pages;
  target <= 1.10 x ours), bw_frac = (K+V bytes / ours time) / bandwidth of a 2 GiB copy. Result:
  decode_<card>.json.
--grid specdec: seqlen_q 1/2/4/8/16 x batch 1/4/16 x seqlen_k 4096..32768 x heads 12/12, 32/8. Columns:
  ours (flash_attn_func), ours_kvcache (flash_attn_with_kvcache), torch_fa2_dense, cudnn (explicit
  bottom-right mask), best_explicit (fastest num_splits in 1..min(64, key blocks)). Result: specdec_<card>.json.
"""

import sys

import torch
import torch.nn.functional as F

import common
import timing
from common import fmt, ratio

PAGES = (16, 256)
PAGED_TARGET = 1.10
PAGED_MARGIN_BYTES = 2 << 30  # free memory kept beyond a paged copy of K/V, else its columns are skipped
SPECDEC_SEQLENS_Q = [1, 2, 4, 8, 16]
SPECDEC_BATCHES = [1, 4, 16]
SPECDEC_SEQLENS_K = [4096, 8192, 16384, 32768]
SPECDEC_HEADS = [(12, 12), (32, 8)]
DECODE_IMPLS = ("ours", "nosplit", "torch_fa2_varlen", "cudnn")
SPECDEC_IMPLS = ("ours", "ours_kvcache", "torch_fa2_dense", "cudnn", "best_explicit")
D = 128
HALF = dict(device="cuda", dtype=torch.float16)
DECODE_KEYS = ["batch", "seqlen_k", "heads", "kv_heads", "ours_us", "nosplit_us", "torch_fa2_varlen_us", "cudnn_us",
               "bw_frac", "splits", "maxdiff", "cudnn_maxdiff", "kv_bytes", "copy_bw_bytes_per_s"]
DECODE_KEYS += [f"paged{p}_{s}" for p in PAGES for s in ("us", "ratio", "maxdiff")]


def decode_cell(c, args, kw, torch_fa2, copy_bw):
    import flash_attn
    fa2, fa2_note = torch_fa2
    b, s, h, hk = c["batch"], c["seqlen_k"], c["heads"], c["kv_heads"]
    row = dict(dict.fromkeys(DECODE_KEYS), **c, splits=flash_attn.num_splits_heuristic(b, h, hk, 1, s, D),
               kv_bytes=common.kv_bytes(c), copy_bw_bytes_per_s=copy_bw, notes=[])
    q, k, v = torch.randn(b, h, D, **HALF), torch.randn(b * s, hk, D, **HALF), torch.randn(b * s, hk, D, **HALF)
    cu_q = torch.arange(b + 1, device="cuda", dtype=torch.int32)
    cu_k = cu_q * s

    def ours(splits, kk=k, vv=v, **paged):
        return lambda: lambda: flash_attn.flash_attn_varlen_func(q, kk, vv, cu_q, cu_k, 1, s, causal=True,
                                                                 num_splits=splits, **paged)

    timing.settle(ours(0)())
    q4, k4, v4 = q.view(b, h, 1, D), k.view(b, s, hk, D).transpose(1, 2), v.view(b, s, hk, D).transpose(1, 2)
    impls = {"ours": (ours(0), None), "nosplit": (ours(1), None)}
    if fa2:
        impls["torch_fa2_varlen"] = (lambda: lambda: fa2(q, k, v, cu_q, cu_k, 1, s, True), None)
    impls["cudnn"] = (lambda: lambda: F.scaled_dot_product_attention(q4, k4, v4, enable_gqa=h != hk),
                      timing.sdpa_context("CUDNN_ATTENTION"))  # one query: bottom-right causal allows every key
    times, notes, outs = timing.time_impls(impls, kw, 1 if args.quick else 2, repeat=("ours", "cudnn"))
    row.update({f"{name}_us": times.get(name) for name in DECODE_IMPLS})
    row["notes"] += [f"{n}: {t}" for n, t in notes.items()] + ([] if fa2 else [f"torch_fa2: {fa2_note}"])
    o = outs.get("ours")
    if o is not None:
        for name, key in (("torch_fa2_varlen", "maxdiff"), ("cudnn", "cudnn_maxdiff")):
            if outs.get(name) is not None:
                row[key] = common.maxdiff(o, outs[name].reshape(o.shape))
        if row["maxdiff"] is None:  # torch FA2 n/a: compare with cuDNN
            row["maxdiff"] = row["cudnn_maxdiff"]
    row["bw_frac"] = ratio(row["kv_bytes"] / (row["ours_us"] * 1e-6), copy_bw) if row["ours_us"] else None
    for page in PAGES:
        if not args.paged or o is None:
            continue
        free = torch.cuda.mem_get_info()[0] + torch.cuda.memory_reserved() - torch.cuda.memory_allocated()
        if free < row["kv_bytes"] + PAGED_MARGIN_BYTES:
            row["notes"].append(f"paged{page}: skipped (GPU memory)")
            continue
        kp, vp, table = common.make_paged(k, v, b, s, page)
        t, note, op = timing.time_impl(ours(0, kp, vp, block_table=table), dict(kw, max_time_s=kw["max_time_s"] / 2))
        row[f"paged{page}_us"], row[f"paged{page}_ratio"] = t, ratio(t, row["ours_us"])
        row[f"paged{page}_maxdiff"] = common.maxdiff(op, o) if op is not None else None
        if note:
            row["notes"].append(f"paged{page}: {note}")
        del kp, vp, table, op
    return row


def specdec_cells(c0, args, kw, torch_fa2):
    """All seqlen_q of one (batch, seqlen_k, heads) on one cache."""
    import flash_attn
    heuristic, (fa2, _) = flash_attn.num_splits_heuristic, torch_fa2
    b, s, h, hk = c0["batch"], c0["seqlen_k"], c0["heads"], c0["kv_heads"]
    k, v = torch.randn(b, s, hk, D, **HALF), torch.randn(b, s, hk, D, **HALF)
    lens = torch.full((b,), s, device="cuda", dtype=torch.int32)
    cu_k = torch.arange(b + 1, device="cuda", dtype=torch.int32) * s
    rows = []
    for sq in SPECDEC_SEQLENS_Q:
        c = dict(c0, seqlen_q=sq)
        if not common.cell_matches(c, args.cells):
            continue
        q = torch.randn(b, sq, h, D, **HALF)
        cu_q = torch.arange(b + 1, device="cuda", dtype=torch.int32) * sq
        row = dict(heads=h, kv_heads=hk, seqlen_q=sq, batch=b, seqlen_k=s, notes=[],
                   auto_splits=heuristic(b, h, hk, sq, s, D))

        def ours(splits):
            return lambda: lambda: flash_attn.flash_attn_func(q, k, v, causal=True, num_splits=splits)

        timing.settle(ours(0)())
        cap = heuristic(b, h, hk, sq, s, D, num_splits=64)  # the dispatcher's clamp: min(64, key blocks)
        sweep_kw = dict(warmup=1, reps=min(kw["reps"], 5 if args.quick else 10), min_reps=3, max_time_s=0.02)
        sweep = {n: timing.time_impl(ours(n), sweep_kw)[0] for n in range(1, cap + 1)}
        row["best_splits"] = min((n for n in sweep if sweep[n] is not None), key=sweep.get, default=None)
        kvcache = flash_attn.flash_attn_with_kvcache
        impls = {"ours": (ours(0), None),
                 "ours_kvcache": (lambda: lambda: kvcache(q, k, v, cache_seqlens=lens, causal=True), None)}
        if fa2:
            qv, kv_, vv = q.view(b * sq, h, D), k.view(b * s, hk, D), v.view(b * s, hk, D)
            impls["torch_fa2_dense"] = (lambda: lambda: fa2(qv, kv_, vv, cu_q, cu_k, sq, s, True), None)
        mask = None if sq == 1 else torch.ones(sq, s, dtype=torch.bool, device="cuda").tril(s - sq)
        qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        impls["cudnn"] = (lambda: lambda: F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask,
                                                                          enable_gqa=h != hk),
                          timing.sdpa_context("CUDNN_ATTENTION"))
        if row["best_splits"]:
            impls["best_explicit"] = (ours(row["best_splits"]), None)
        times, notes, outs = timing.time_impls(impls, kw, 1 if args.quick else 2)
        row.update({f"{name}_us": times.get(name) for name in SPECDEC_IMPLS})
        row["notes"] += [f"{n}: {t}" for n, t in notes.items()]
        if outs.get("ours") is not None:
            for name in ("ours_kvcache", "torch_fa2_dense", "cudnn"):
                if outs.get(name) is not None:
                    other = outs[name].transpose(1, 2) if name == "cudnn" else outs[name].view(b, sq, h, D)
                    row[f"{name}_maxdiff"] = common.maxdiff(outs["ours"], other)
        rows.append(row)
    return rows


def decode_report(rows, args, copy_bw) -> str:
    headers = ["batch", "seqlen_k", "heads", "kv_heads", "splits", "ours_us", "nosplit_us", "torch_fa2_varlen_us",
               "cudnn_us", "torch_fa2/ours", "ours/cudnn", "bw_frac", "maxdiff"]
    headers += ["paged16/ours", "paged256/ours"] if args.paged else []
    table = [[r[k] for k in headers[:5]] + [fmt(r.get(k)) for k in headers[5:9]]
             + [fmt(ratio(r.get("torch_fa2_varlen_us"), r["ours_us"]), ".2f"),
              fmt(ratio(r["ours_us"], r.get("cudnn_us")), ".3f"), fmt(r["bw_frac"], ".2f"),
              fmt(r.get("maxdiff"), ".1e")]
             + ([fmt(r.get(f"paged{p}_ratio"), ".2f") for p in PAGES] if args.paged else []) for r in rows]
    lines = [common.markdown_table(headers, table), "",
             f"ours <= cuDNN in {common.count(rows, 'ours_us', 'cudnn_us', 1.0)} cells; bw_frac >= 0.9 in "
             f"{sum((r['bw_frac'] or 0) >= 0.9 for r in rows if r['kv_bytes'] >= 200e6)}/"
             f"{sum(r['kv_bytes'] >= 200e6 for r in rows)} cells with K+V >= 200 MB (copy bandwidth "
             f"{fmt(copy_bw and copy_bw / 1e12, '.2f')} TB/s)"]
    if args.paged:
        lines.append(f"paged/ours <= {PAGED_TARGET}: " + "; ".join(
            f"{p}-token pages {common.count(rows, f'paged{p}_us', 'ours_us', PAGED_TARGET)}" for p in PAGES))
    return "\n".join(lines)


def specdec_report(rows) -> str:
    headers = ["heads", "kv_heads", "seqlen_q", "batch", "seqlen_k", "ours_us", "ours_kvcache_us", "torch_fa2_dense_us",
               "cudnn_us", "best_explicit_us", "best_splits", "auto_splits", "ours/fa2", "ours/best"]
    table = [[r[k] for k in headers[:5]] + [fmt(r.get(k)) for k in headers[5:10]] + [r["best_splits"], r["auto_splits"]]
             + [fmt(ratio(r["ours_us"], r.get(k)), ".2f") for k in ("torch_fa2_dense_us", "best_explicit_us")]
             for r in rows]
    return "\n".join([common.markdown_table(headers, table), "",
                      f"ours <= torch FA2 in {common.count(rows, 'ours_us', 'torch_fa2_dense_us', 1.0)} rows",
                      f"ours <= 1.05 x best explicit in {common.count(rows, 'ours_us', 'best_explicit_us', 1.05)} rows",
                      f"kvcache <= 1.02 x ours in {common.count(rows, 'ours_kvcache_us', 'ours_us', 1.02)} rows",
                      f"ours <= cuDNN in {common.count(rows, 'ours_us', 'cudnn_us', 1.0)} rows"])


def main(argv=None) -> int:
    p = common.parser(__doc__, time_budget_s=90.0, grid="decode")
    p.add_argument("--grid", choices=["decode", "specdec"], default="decode")
    p.add_argument("--no-paged", dest="paged", action="store_false", help="decode grid: no paged columns")
    args = p.parse_args(argv)
    common.parse_cells(args.cells)
    desc = common.start()
    torch_fa2 = timing.torch_fa2_forward()
    kw = common.bench_kwargs(args, 0.3)
    if args.grid == "decode":
        copy_bw = timing.copy_bandwidth(reps=10 if args.quick else 20)
        print(f"copy bandwidth (2 GiB copy, read + write): {copy_bw / 1e12:.3f} TB/s")
        rows = common.run_cells(common.select_cells(common.decode_cells(), args),
                                lambda c, kw, late: [decode_cell(c, args, kw, torch_fa2, copy_bw)], args, kw,
                                ["splits"] + [f"{n}_us" for n in DECODE_IMPLS] + ["bw_frac"])
    else:
        cells = [dict(batch=b, seqlen_k=s, heads=h, kv_heads=hk) for s in SPECDEC_SEQLENS_K for b in SPECDEC_BATCHES
                 for h, hk in SPECDEC_HEADS]
        rows = common.run_cells(common.select_cells(cells, args),
                                lambda c, kw, late: specdec_cells(c, args, kw, torch_fa2), args, kw,
                                [f"{n}_us" for n in SPECDEC_IMPLS] + ["best_splits", "auto_splits"])
    done = [r for r in rows if "ours_us" in r]  # cells that ran (a failing one holds only its error)
    report = decode_report(done, args, copy_bw) if args.grid == "decode" else specdec_report(done)
    common.save(args, args.grid, desc, rows, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
