#!/usr/bin/env python
"""Decode (max_seqlen_q = 1) latency: ours (split-KV heuristic), ours without splitting,
PyTorch's vendored FA2 varlen forward, and PyTorch SDPA with the cuDNN backend, in one run.

Grid: seqlen_k in {2048, 4096, 8192, 32768} x batch in {1, 16, 128} x (heads, kv_heads) in
{(12,12), (32,8), (32,32)}, head dim 128, fp16, causal=True (with one query per sequence the
bottom-right causal mask allows every key). Cells whose K and V together exceed --max-kv-gib
(default 16 GiB) are skipped.

Implementations (all timed on the same K/V memory, layout (batch*seqlen_k, kv_heads, 128)):
  ours        flash_attn.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 1, seqlen_k, causal=True, num_splits=0)
  nosplit     same with num_splits=1
  torch_fa2   torch.ops.aten._flash_attention_forward(q, k, v, cu_q, cu_k, 1, seqlen_k, 0.0, True, False,
              scale=...)  (kwargs filtered against the op's schema at run time)
  cudnn       SDPA under sdpa_kernel(CUDNN_ATTENTION) on q viewed as (batch, heads, 1, 128) and K/V
              viewed as (batch, kv_heads, seqlen_k, 128) (strided views of the same memory, no copy),
              is_causal=False (SDPA's is_causal is top-left aligned, which for one query would allow
              only key 0; for one query bottom-right causal == no mask), enable_gqa=True for GQA.
              If cuDNN refuses GQA, K/V are expanded with repeat_interleave OUTSIDE the timed
              region (marked "*": that kernel then reads heads/kv_heads times more bytes), provided
              the expansion fits in --max-expand-gib; otherwise n/a.

Columns: speedups are time ratios nosplit/ours and torch_fa2/ours (>1 = ours faster);
ours/cudnn is ours_us / cudnn_us (<1 = ours faster). bw_frac = (K+V bytes / ours time) /
copy bandwidth, where copy bandwidth = (bytes read + written) / time of a 2 GiB D2D copy.
maxdiff = max |ours auto - torch FA2| (outside timing; vs cuDNN when torch FA2 is n/a).

Timing: CUDA events per call, 256 MiB L2 flush before each call (outside the event window),
median (timing.py). --graph adds an "ours_graph_us" column: CUDA-graph replay of 20
back-to-back calls (no flush: L2-warm for small cells, no launch overhead).

Usage (repository root, GPU machine):
  python benchmarks/benchmark_decode.py                 # ~25-50 s on an H100
  python benchmarks/benchmark_decode.py --quick
  python benchmarks/benchmark_decode.py --cells "batch=1"  --cells "batch=1|16,kv_heads=8"
Outputs: benchmarks/results/decode_h100.json and benchmarks/results/decode_h100.md.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import sys
import time
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
for _p in (REPO, HERE):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from timing import (bench, bench_graph, require_cuda, environment_lines, gpu_name, today_utc, fmt,  # noqa: E402
                    markdown_table, short_err, sticky_cuda_error, measure_copy_bandwidth)
from write_results import write_section  # noqa: E402

SEQLENS_K = [2048, 4096, 8192, 32768]
BATCHES = [1, 16, 128]
HEAD_CONFIGS = [(12, 12), (32, 8), (32, 32)]
HEADDIM = 128
CELL_KEYS = ("batch", "seqlen_k", "heads", "kv_heads")
FA2_POSITIONAL = ["query", "key", "value", "cum_seq_q", "cum_seq_k", "max_q", "max_k", "dropout_p",
                  "is_causal", "return_debug_mask"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", default=os.path.join(HERE, "results"))
    p.add_argument("--json", default=None, help="JSON output path (default OUT_DIR/decode_h100.json)")
    p.add_argument("--results-md", default=None,
                   help="markdown section output path (default OUT_DIR/decode_h100.md)")
    p.add_argument("--quick", action="store_true", help="fewer repeats (smoke run)")
    p.add_argument("--cells", default=None,
                   help='filter: comma-separated KEY=V1|V2 clauses over batch, seqlen_k, heads, kv_heads, '
                        'all must match, e.g. "batch=1" or "batch=1|16,seqlen_k=32768"')
    p.add_argument("--max-kv-gib", type=float, default=16.0,
                   help="skip cells whose K+V bytes exceed this many GiB (default 16)")
    p.add_argument("--max-expand-gib", type=float, default=16.0,
                   help="largest GQA-expanded K+V for the cuDNN fallback (default 16 GiB)")
    p.add_argument("--graph", action="store_true",
                   help="also time ours (auto) with CUDA-graph replay (no L2 flush, no launch overhead)")
    p.add_argument("--no-cudnn", action="store_true", help="skip the cuDNN column")
    p.add_argument("--time-budget-s", type=float, default=75.0,
                   help="after this many seconds, remaining cells use the minimum number of repeats")
    return p.parse_args(argv)


def parse_cells(spec):
    conds = {}
    if not spec:
        return conds
    for clause in spec.split(","):
        clause = clause.strip()
        if not clause:
            continue
        if "=" not in clause:
            raise SystemExit(f"--cells: bad clause {clause!r} (want KEY=V1|V2)")
        key, vals = clause.split("=", 1)
        key = key.strip()
        if key not in CELL_KEYS:
            raise SystemExit(f"--cells: unknown key {key!r}; keys: {', '.join(CELL_KEYS)}")
        try:
            conds[key] = {int(v) for v in vals.split("|") if v.strip()}
        except ValueError:
            raise SystemExit(f"--cells: values must be integers in {clause!r}")
    return conds


def cell_matches(conds, cell):
    return all(cell[k] in vs for k, vs in conds.items())


def kv_bytes_of(batch, seqlen_k, kv_heads, headdim=HEADDIM, elem=2):
    return 2 * batch * seqlen_k * kv_heads * headdim * elem


def time_impl(make_fn, ctx_factory, bench_kw):
    """-> (BenchResult|None, note|None, first_output|None); never raises."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with (ctx_factory() if ctx_factory is not None else contextlib.nullcontext()):
                fn = make_fn()
                out = fn()
                if isinstance(out, (tuple, list)):
                    out = out[0]
                torch.cuda.synchronize()
                res = bench(fn, **bench_kw)
            return res, None, out
        except Exception as e:  # noqa: BLE001
            note = short_err(e)
            msgs = [str(w.message).replace("\n", " ") for w in caught]
            if msgs:
                note += " [warning: " + msgs[0][:200] + "]"
            return None, note, None


def torch_fa2_op():
    """Return (callable(q,k,v,cu_q,cu_k,max_q,max_k,scale) -> out, note) for PyTorch's vendored FA2."""
    try:
        op = torch.ops.aten._flash_attention_forward.default
        schema = op._schema
        names = [a.name for a in schema.arguments]
    except Exception as e:  # noqa: BLE001
        return None, "aten._flash_attention_forward unavailable: " + short_err(e)
    if names[:len(FA2_POSITIONAL)] != FA2_POSITIONAL:
        return None, f"unexpected schema: {schema}"
    has_scale = "scale" in names

    def call(q, k, v, cu_q, cu_k, max_q, max_k, scale):
        kw = {"scale": scale} if has_scale else {}
        return op(q, k, v, cu_q, cu_k, max_q, max_k, 0.0, True, False, **kw)[0]
    return call, None


def main(argv=None) -> int:
    args = parse_args(argv)
    conds = parse_cells(args.cells)
    require_cuda("benchmark_decode.py")

    out_dir = args.out_dir
    os.makedirs(out_dir, exist_ok=True)
    json_path = args.json or os.path.join(out_dir, "decode_h100.json")
    md_path = args.results_md or os.path.join(out_dir, "decode_h100.md")
    dtype = torch.float16
    d = HEADDIM
    scale = d ** -0.5

    env = environment_lines(REPO)
    for line in env:
        print(line)

    # ---- implementations
    ours_err = None
    varlen = None
    heuristic = None
    try:
        import flash_attn
        from flash_attn import flash_attn_varlen_func as varlen
        print(f"flash_attn {getattr(flash_attn, '__version__', '?')} from {os.path.dirname(flash_attn.__file__)}")
    except Exception as e:  # noqa: BLE001
        ours_err = "import flash_attn failed: " + short_err(e)
        print(ours_err)
    try:
        import flash_attn_2_cuda
        heuristic = flash_attn_2_cuda.num_splits_heuristic
    except Exception:  # noqa: BLE001
        try:
            from flash_attn.flash_attn_interface import num_splits_heuristic as heuristic
        except Exception:  # noqa: BLE001
            heuristic = None
    num_sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count

    fa2_call, fa2_err = torch_fa2_op()
    try:
        print("torch FA2 op schema:", torch.ops.aten._flash_attention_forward.default._schema)
    except Exception:  # noqa: BLE001
        pass
    if fa2_err:
        print("torch FA2 varlen:", fa2_err)

    cudnn_err = None
    cudnn_ctx = None
    if args.no_cudnn:
        cudnn_err = "skipped (--no-cudnn)"
    else:
        try:
            from torch.nn.attention import sdpa_kernel, SDPBackend

            def cudnn_ctx():
                return sdpa_kernel([SDPBackend.CUDNN_ATTENTION])
        except Exception as e:  # noqa: BLE001
            cudnn_err = "sdpa_kernel unavailable: " + short_err(e)

    # ---- copy bandwidth (reference for bw_frac)
    try:
        cb = measure_copy_bandwidth(2 << 30, reps=10 if args.quick else 20)
        copy_bw = cb["bytes_per_s"]
        print(f"copy bandwidth (2 GiB D2D copy, read+write): {copy_bw / 1e12:.3f} TB/s "
              f"({cb['time_us']:.0f} us per copy)")
    except Exception as e:  # noqa: BLE001
        copy_bw = None
        print("copy bandwidth measurement failed:", short_err(e))
    torch.cuda.empty_cache()

    if args.quick:
        base_kw = dict(warmup=2, reps=15, min_reps=3, max_time_s=0.1)
    else:
        base_kw = dict(warmup=3, reps=50, min_reps=5, max_time_s=0.3)
    late_kw = dict(warmup=1, reps=3, min_reps=3, max_time_s=0.03)
    print(f"timing: CUDA events, 256 MiB L2 flush before each call, median; "
          f"{'quick' if args.quick else 'full'} ({base_kw})")
    print()

    cells, skipped = [], []
    for seqlen_k in SEQLENS_K:
        for batch in BATCHES:
            for heads, kv_heads in HEAD_CONFIGS:
                c = dict(batch=batch, seqlen_k=seqlen_k, heads=heads, kv_heads=kv_heads)
                if not cell_matches(conds, c):
                    continue
                if kv_bytes_of(batch, seqlen_k, kv_heads) > args.max_kv_gib * 2 ** 30:
                    skipped.append(c)
                    continue
                cells.append(c)
    if skipped:
        print("skipped (K+V > %.0f GiB): " % args.max_kv_gib
              + ", ".join(f"b{c['batch']} s{c['seqlen_k']} h{c['heads']}/{c['kv_heads']}" for c in skipped))
    if not cells:
        print("no cells selected")

    t0 = time.time()
    rows, notes = [], []
    torch.manual_seed(0)
    dead = None

    for c in cells:
        if dead:
            break
        batch, seqlen_k, heads, kv_heads = c["batch"], c["seqlen_k"], c["heads"], c["kv_heads"]
        kw = base_kw if time.time() - t0 < args.time_budget_s else late_kw
        name = f"b{batch} s{seqlen_k} h{heads}/{kv_heads}"
        kvb = kv_bytes_of(batch, seqlen_k, kv_heads)
        row = dict(batch=batch, seqlen_k=seqlen_k, heads=heads, kv_heads=kv_heads,
                   ours_us=None, nosplit_us=None, torch_fa2_varlen_us=None, cudnn_us=None, bw_frac=None,
                   splits=None, maxdiff=None, cudnn_maxdiff=None, cudnn_kv_expanded=False,
                   kv_bytes=kvb, copy_bw_bytes_per_s=copy_bw, notes=[])
        if args.graph:
            row["ours_graph_us"] = None
        q = k = v = cu_q = cu_k = None
        q4 = k4 = v4 = None
        o_ours = o_fa2 = o_cudnn = None
        try:
            q = torch.randn(batch, heads, d, device="cuda", dtype=dtype)          # total_q = batch
            k = torch.randn(batch * seqlen_k, kv_heads, d, device="cuda", dtype=dtype)
            v = torch.randn(batch * seqlen_k, kv_heads, d, device="cuda", dtype=dtype)
            cu_q = torch.arange(0, batch + 1, device="cuda", dtype=torch.int32)
            cu_k = torch.arange(0, batch + 1, device="cuda", dtype=torch.int32) * seqlen_k

            if heuristic is not None:
                try:
                    row["splits"] = int(heuristic(batch, heads, kv_heads, 1, seqlen_k, d, num_sms, 0))
                except Exception:  # noqa: BLE001
                    row["splits"] = None

            # ours auto / ours no split
            for key, ns in (("ours", 0), ("nosplit", 1)):
                if ours_err is not None:
                    row["notes"].append(f"{key}: {ours_err}")
                    continue
                res, note, o = time_impl(
                    lambda: (lambda: varlen(q, k, v, cu_q, cu_k, 1, seqlen_k, dropout_p=0.0,
                                            softmax_scale=scale, causal=True, num_splits=ns)),
                    None, kw)
                if res is not None:
                    row[f"{key}_us"] = res.median_us
                else:
                    row["notes"].append(f"{key}: {note}")
                if key == "ours":
                    o_ours = o
                else:
                    del o
            if args.graph and ours_err is None and o_ours is not None:
                g = bench_graph(lambda: varlen(q, k, v, cu_q, cu_k, 1, seqlen_k, dropout_p=0.0,
                                               softmax_scale=scale, causal=True, num_splits=0),
                                calls_per_graph=20, reps=5 if args.quick else 10)
                if g is not None:
                    row["ours_graph_us"] = g.median_us
                else:
                    row["notes"].append("ours_graph: CUDA graph capture/replay failed")

            # PyTorch's vendored FA2 varlen
            if fa2_call is not None:
                res, note, o_fa2 = time_impl(
                    lambda: (lambda: fa2_call(q, k, v, cu_q, cu_k, 1, seqlen_k, scale)), None, kw)
                if res is not None:
                    row["torch_fa2_varlen_us"] = res.median_us
                else:
                    row["notes"].append(f"torch_fa2: {note}")
            else:
                row["notes"].append(f"torch_fa2: {fa2_err}")

            # cuDNN SDPA on (b, h, 1, d) / (b, kv_h, s, d) strided views of the same memory
            if cudnn_ctx is not None:
                q4 = q.view(batch, heads, 1, d)
                k4 = k.view(batch, seqlen_k, kv_heads, d).transpose(1, 2)
                v4 = v.view(batch, seqlen_k, kv_heads, d).transpose(1, 2)
                gqa = heads != kv_heads

                def make_cudnn(kk, vv, use_gqa):
                    if use_gqa:
                        return lambda: F.scaled_dot_product_attention(q4, kk, vv, is_causal=False, scale=scale,
                                                                      enable_gqa=True)
                    return lambda: F.scaled_dot_product_attention(q4, kk, vv, is_causal=False, scale=scale)

                res, note, o_cudnn = time_impl(lambda: make_cudnn(k4, v4, gqa), cudnn_ctx, kw)
                if res is None and gqa:
                    exp_bytes = kv_bytes_of(batch, seqlen_k, heads)
                    if exp_bytes <= args.max_expand_gib * 2 ** 30:
                        try:
                            # expansion happens here, OUTSIDE the timed region
                            ke = k4.repeat_interleave(heads // kv_heads, dim=1)
                            ve = v4.repeat_interleave(heads // kv_heads, dim=1)
                            res, note2, o_cudnn = time_impl(lambda: make_cudnn(ke, ve, False), cudnn_ctx, kw)
                            del ke, ve
                            if res is not None:
                                row["cudnn_kv_expanded"] = True
                                row["notes"].append("cudnn: GQA refused (" + note[:120]
                                                    + "); timed on K/V expanded to heads outside timing")
                            else:
                                note = note + " | expanded: " + note2
                        except Exception as e:  # noqa: BLE001
                            note = note + " | expansion failed: " + short_err(e)
                    else:
                        note = note + f" | expansion to {exp_bytes / 2**30:.0f} GiB skipped"
                if res is not None:
                    row["cudnn_us"] = res.median_us
                else:
                    row["notes"].append(f"cudnn: {note}")
            else:
                row["notes"].append(f"cudnn: {cudnn_err}")

            # cheap correctness check, outside timing
            if o_ours is not None:
                if o_fa2 is not None:
                    row["maxdiff"] = (o_ours.float() - o_fa2.float()).abs().max().item()
                if o_cudnn is not None:
                    row["cudnn_maxdiff"] = (o_ours.float() - o_cudnn.reshape(batch, heads, d).float()
                                            ).abs().max().item()
                    if row["maxdiff"] is None:
                        row["maxdiff"] = row["cudnn_maxdiff"]
                        row["notes"].append("maxdiff vs cuDNN (torch FA2 n/a)")
        except Exception as e:  # noqa: BLE001
            row["notes"].append("cell: " + short_err(e))
        finally:
            del q, k, v, cu_q, cu_k, q4, k4, v4, o_ours, o_fa2, o_cudnn
            gc.collect()
            torch.cuda.empty_cache()

        if row["ours_us"] and copy_bw:
            row["bw_frac"] = (kvb / (row["ours_us"] * 1e-6)) / copy_bw
        rows.append(row)
        print(f"{name:22s} splits {fmt(row['splits'], 'd', '?'):>3s}  ours {fmt(row['ours_us'], '8.1f')}  "
              f"nosplit {fmt(row['nosplit_us'], '8.1f')}  torch_fa2 {fmt(row['torch_fa2_varlen_us'], '8.1f')}  "
              f"cudnn {fmt(row['cudnn_us'], '8.1f')}{'*' if row['cudnn_kv_expanded'] else ''} us  "
              f"bw_frac {fmt(row['bw_frac'], '.2f')}  maxdiff {fmt(row['maxdiff'], '.1e')}"
              + (f"  graph {fmt(row.get('ours_graph_us'), '.1f')} us" if args.graph else ""), flush=True)
        for n in row["notes"]:
            notes.append(f"{name}: {n}")
        if any(not n.startswith("cudnn: GQA refused") for n in row["notes"]):
            dead = sticky_cuda_error()
            if dead:
                print(f"CUDA context is unusable after {name}: {dead}; stopping.")
                notes.append(f"stopped after {name}: CUDA context unusable ({dead})")

    elapsed = time.time() - t0

    # ---- table
    def ratio(a, b):
        return a / b if a and b else None

    headers = ["batch", "seqlen_k", "heads", "kv_heads", "splits", "ours_us", "nosplit_us",
               "torch_fa2_varlen_us", "cudnn_us", "speedup vs nosplit", "speedup vs torch_fa2",
               "ours/cudnn", "bw_frac", "maxdiff"]
    if args.graph:
        headers.append("ours_graph_us")
    trows = []
    for r in rows:
        tr = [r["batch"], r["seqlen_k"], r["heads"], r["kv_heads"], fmt(r["splits"], "d", "?"),
              fmt(r["ours_us"]), fmt(r["nosplit_us"]), fmt(r["torch_fa2_varlen_us"]),
              fmt(r["cudnn_us"]) + ("*" if r["cudnn_kv_expanded"] else ""),
              fmt(ratio(r["nosplit_us"], r["ours_us"]), ".2f"),
              fmt(ratio(r["torch_fa2_varlen_us"], r["ours_us"]), ".2f"),
              fmt(ratio(r["ours_us"], r["cudnn_us"]), ".2f"),
              fmt(r["bw_frac"], ".2f"), fmt(r["maxdiff"], ".1e")]
        if args.graph:
            tr.append(fmt(r.get("ours_graph_us")))
        trows.append(tr)
    table = markdown_table(headers, trows)
    print()
    print(table)
    if any(r["cudnn_kv_expanded"] for r in rows):
        print("* cuDNN refused GQA: K/V expanded to `heads` with repeat_interleave outside the timed region.")
    if notes:
        print("\nn/a and other notes:")
        for n in notes:
            print("  - " + n)
    print(f"\nelapsed {elapsed:.1f} s (cells only)")

    # ---- outputs
    json_keys = ["batch", "seqlen_k", "heads", "kv_heads", "ours_us", "nosplit_us", "torch_fa2_varlen_us",
                 "cudnn_us", "bw_frac", "splits", "maxdiff", "cudnn_maxdiff", "cudnn_kv_expanded", "kv_bytes",
                 "copy_bw_bytes_per_s"] + (["ours_graph_us"] if args.graph else []) + ["notes"]
    os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
    with open(json_path, "w") as f:
        json.dump([{k: r.get(k) for k in json_keys} for r in rows], f, indent=1)
    print(f"wrote {json_path}")

    body = [
        "fp16, head dim 128, one query per sequence (flash_attn_varlen_func, max_seqlen_q=1, causal=True), "
        "time per call in microseconds (CUDA events, L2 flushed before each call, median"
        + (", --quick" if args.quick else "") + "). "
        "ours = num_splits=0 (heuristic, `splits` = its choice), nosplit = num_splits=1, "
        "torch_fa2_varlen = torch.ops.aten._flash_attention_forward, cuDNN = SDPA CUDNN_ATTENTION on "
        "strided (b, h, s, d) views of the same K/V (enable_gqa for GQA). speedups = other/ours; "
        "ours/cudnn = time ratio; bw_frac = (K+V bytes / ours time) / copy bandwidth"
        + (f" ({copy_bw / 1e12:.2f} TB/s read+write, 2 GiB D2D copy)" if copy_bw else "") + ".",
        "",
        "; ".join(env[2:]) if len(env) > 2 else "",
        "",
        table,
    ]
    if any(r["cudnn_kv_expanded"] for r in rows):
        body += ["", "\\* cuDNN refused GQA: K/V expanded to `heads` (repeat_interleave) outside the timed "
                     "region, so that kernel reads heads/kv_heads times more bytes."]
    if skipped:
        body += ["", "Skipped (K+V > %.0f GiB): " % args.max_kv_gib
                 + ", ".join(f"b{c['batch']} s{c['seqlen_k']} h{c['heads']}/{c['kv_heads']}" for c in skipped)]
    if notes:
        body += ["", "Notes:"] + [f"- {n}" for n in notes]
    write_section(md_path, "Decode (seqlen_q = 1, fp16, head dim 128)", gpu_name(), today_utc(), "\n".join(body))
    print(f"wrote {md_path}")
    return 0 if not dead else 2


if __name__ == "__main__":
    sys.exit(main())
