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
  paged16     (--paged, on by default; --no-paged skips) ours (num_splits=0) with a paged K/V cache:
  paged256    the same K/V data copied into pages of 16 / 256 tokens, k/v (num_blocks, page, kv_heads, 128),
              block_table (batch, seqlen_k / page) int32 holding a random permutation of the pages (no
              two consecutive pages of a sequence are adjacent in memory, in general). One page size at
              a time is allocated (peak 2x K+V); the paged columns of a cell are skipped when the free
              GPU memory after allocating the contiguous K/V is below K+V bytes + --paged-margin-gib.
              The page copy and the output check happen outside the timed region.

Columns: speedups are time ratios nosplit/ours and torch_fa2/ours (>1 = ours faster);
ours/cudnn is ours_us / cudnn_us (<1 = ours faster). bw_frac = (K+V bytes / ours time) /
copy bandwidth, where copy bandwidth = (bytes read + written) / time of a 2 GiB D2D copy.
maxdiff = max |ours auto - torch FA2| (outside timing; vs cuDNN when torch FA2 is n/a).
paged16/ours and paged256/ours are time ratios (target <= 1.10: paged within 10% of contiguous);
paged maxdiff = max |paged - contiguous ours| over both page sizes (same kernel plan: expected 0).

Timing: CUDA events per call, 256 MiB L2 flush before each call (outside the event window),
median (timing.py). Each cell first runs ours for >= 30 ms (timing.settle: the first thing timed
after a heavy cell reads slow), and ours and cuDNN are timed a second time in reverse order, each
keeping the lower of its two medians. --graph adds an "ours_graph_us" column: CUDA-graph replay of 20
back-to-back calls (no flush: L2-warm for small cells, no launch overhead).

Usage (repository root, GPU machine):
  python benchmarks/benchmark_decode.py                 # ~40-60 s on an H100 (~30 s with --no-paged)
  python benchmarks/benchmark_decode.py --quick
  python benchmarks/benchmark_decode.py --cells "batch=1"  --cells "batch=1|16,kv_heads=8"
Outputs: benchmarks/results/decode_h100.json and benchmarks/results/decode_h100.md.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
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

from timing import (FLUSH_MODE, bench, bench_graph, settle, require_cuda, environment_lines, gpu_name, today_utc, fmt,  # noqa: E402
                    markdown_table, short_err, sticky_cuda_error, measure_copy_bandwidth)
from write_results import write_json, write_section  # noqa: E402
from paged_cache import make_paged  # noqa: E402
from decode_grid import (SEQLENS_K, BATCHES, HEAD_CONFIGS, HEADDIM, CELL_KEYS,  # noqa: E402,F401
                         add_grid_args, parse_cells, cell_matches, kv_bytes_of, cell_name, select_cells,
                         skipped_line)

DEVICE = "cuda"
PAGE_SIZES = (16, 256)
PAGED_TARGET = 1.10  # paged time / contiguous time

FA2_POSITIONAL = ["query", "key", "value", "cum_seq_q", "cum_seq_k", "max_q", "max_k", "dropout_p",
                  "is_causal", "return_debug_mask"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", default=os.path.join(HERE, "results"))
    p.add_argument("--json", default=None, help="JSON output path (default OUT_DIR/decode_h100.json)")
    p.add_argument("--results-md", default=None,
                   help="markdown section output path (default OUT_DIR/decode_h100.md)")
    p.add_argument("--quick", action="store_true", help="fewer repeats (smoke run)")
    add_grid_args(p)
    p.add_argument("--max-expand-gib", type=float, default=16.0,
                   help="largest GQA-expanded K+V for the cuDNN fallback (default 16 GiB)")
    p.add_argument("--graph", action="store_true",
                   help="also time ours (auto) with CUDA-graph replay (no L2 flush, no launch overhead)")
    p.add_argument("--no-cudnn", action="store_true", help="skip the cuDNN column")
    p.add_argument("--paged", dest="paged", action="store_true", default=True,
                   help="time the paged-KV columns (pages of 16 and 256 tokens; default on)")
    p.add_argument("--no-paged", dest="paged", action="store_false", help="skip the paged-KV columns")
    p.add_argument("--paged-margin-gib", type=float, default=2.0,
                   help="free GPU memory to keep beyond the paged copy of K/V (default %(default)s GiB)")
    p.add_argument("--time-budget-s", type=float, default=75.0,
                   help="after this many seconds, remaining cells use the minimum number of repeats")
    return p.parse_args(argv)


def available_gpu_bytes():
    """Free device memory plus what PyTorch's caching allocator holds but does not use; None if unknown."""
    try:
        free, _total = torch.cuda.mem_get_info()
        return free + torch.cuda.memory_reserved() - torch.cuda.memory_allocated()
    except Exception:  # noqa: BLE001
        return None


def paged_summary(rows) -> str:
    """One line: how many cells meet paged/ours <= PAGED_TARGET, per page size and for both."""
    n = len(rows)
    parts = []
    for page in PAGE_SIZES:
        rs = [r.get(f"paged{page}_ratio") for r in rows]
        ok = sum(1 for x in rs if x is not None and x <= PAGED_TARGET)
        na = sum(1 for x in rs if x is None)
        worst = max((x for x in rs if x is not None), default=None)
        parts.append(f"{page}-token pages {ok}/{n}" + (f" ({na} n/a)" if na else "")
                     + f", worst {fmt(worst, '.2f')}")
    both = sum(1 for r in rows
               if all(r.get(f"paged{p}_ratio") is not None and r[f"paged{p}_ratio"] <= PAGED_TARGET
                      for p in PAGE_SIZES))
    return (f"paged KV within {round((PAGED_TARGET - 1) * 100)}% of contiguous (paged/ours <= {PAGED_TARGET:.2f}): "
            f"{both}/{n} cells for both page sizes; " + "; ".join(parts))


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
    print(f"timing: CUDA events, 256 MiB L2 flush ({FLUSH_MODE}) before each call, median; "
          f"{'quick' if args.quick else 'full'} ({base_kw})")
    print()

    cells, skipped = select_cells(conds, args.max_kv_gib)
    if skipped:
        print(skipped_line(skipped, args.max_kv_gib))
    if not cells:
        print("no cells selected")

    t0 = time.time()
    rows, notes = [], []
    torch.manual_seed(0)
    dead = None
    # per page size: None while the paged column is timed, else why it is skipped from then on
    paged_off = {page: (None if args.paged else "skipped (--no-paged)") for page in PAGE_SIZES}

    for c in cells:
        if dead:
            break
        batch, seqlen_k, heads, kv_heads = c["batch"], c["seqlen_k"], c["heads"], c["kv_heads"]
        kw = base_kw if time.time() - t0 < args.time_budget_s else late_kw
        paged_kw = dict(kw, max_time_s=min(kw["max_time_s"], 0.15))  # half the per-cell budget of the others
        name = cell_name(c)
        kvb = kv_bytes_of(batch, seqlen_k, kv_heads)
        row = dict(batch=batch, seqlen_k=seqlen_k, heads=heads, kv_heads=kv_heads,
                   ours_us=None, nosplit_us=None, torch_fa2_varlen_us=None, cudnn_us=None, bw_frac=None,
                   splits=None, maxdiff=None, cudnn_maxdiff=None, cudnn_kv_expanded=False,
                   kv_bytes=kvb, copy_bw_bytes_per_s=copy_bw, notes=[])
        for page in PAGE_SIZES:
            row.update({f"paged{page}_us": None, f"paged{page}_ratio": None, f"paged{page}_maxdiff": None})
        if args.graph:
            row["ours_graph_us"] = None
        q = k = v = cu_q = cu_k = None
        q4 = k4 = v4 = None
        o_ours = o_fa2 = o_cudnn = None
        try:
            q = torch.randn(batch, heads, d, device=DEVICE, dtype=dtype)          # total_q = batch
            k = torch.randn(batch * seqlen_k, kv_heads, d, device=DEVICE, dtype=dtype)
            v = torch.randn(batch * seqlen_k, kv_heads, d, device=DEVICE, dtype=dtype)
            cu_q = torch.arange(0, batch + 1, device=DEVICE, dtype=torch.int32)
            cu_k = torch.arange(0, batch + 1, device=DEVICE, dtype=torch.int32) * seqlen_k

            if heuristic is not None:
                try:
                    row["splits"] = int(heuristic(batch, heads, kv_heads, 1, seqlen_k, d, num_sms, 0))
                except Exception:  # noqa: BLE001
                    row["splits"] = None

            # Settle the GPU on this cell's work before any timing (see timing.settle).
            if ours_err is None:
                try:
                    settle(lambda: varlen(q, k, v, cu_q, cu_k, 1, seqlen_k, dropout_p=0.0, softmax_scale=scale,
                                          causal=True, num_splits=0))
                except Exception:  # noqa: BLE001
                    pass

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

            # ours on a paged K/V cache: same data in pages of 16 / 256 tokens, permuted page order
            for page in PAGE_SIZES:
                key = f"paged{page}"
                if paged_off[page] is not None:
                    continue
                if ours_err is not None or o_ours is None:
                    row["notes"].append(f"{key}: skipped (no contiguous ours output to compare with)")
                    continue
                if seqlen_k % page:
                    row["notes"].append(f"{key}: skipped (seqlen_k not a multiple of {page})")
                    continue
                avail = available_gpu_bytes()
                need = kvb + args.paged_margin_gib * 2 ** 30
                if avail is not None and avail < need:
                    row["notes"].append(f"{key}: skipped (available GPU memory {avail / 2**30:.1f} GiB < "
                                        f"K+V {kvb / 2**30:.2f} GiB + {args.paged_margin_gib:g} GiB margin)")
                    continue
                kp = vp = bt = o_p = None
                try:
                    kp, vp, bt = make_paged(k, v, batch, seqlen_k, page)
                    res, note, o_p = time_impl(
                        lambda: (lambda: varlen(q, kp, vp, cu_q, cu_k, 1, seqlen_k, dropout_p=0.0,
                                                softmax_scale=scale, causal=True, block_table=bt,
                                                num_splits=0)),
                        None, paged_kw)
                    if res is not None:
                        row[f"{key}_us"] = res.median_us
                        if row["ours_us"]:
                            row[f"{key}_ratio"] = res.median_us / row["ours_us"]
                        row[f"{key}_maxdiff"] = (o_p.float() - o_ours.float()).abs().max().item()
                    else:
                        row["notes"].append(f"{key}: {note}")
                        if "not supported" in note:
                            paged_off[page] = note
                            notes.append(f"{key} column skipped from {name} on: {note}")
                finally:
                    del kp, vp, bt, o_p
                    gc.collect()
                    torch.cuda.empty_cache()

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

            # Second pass for the two closest competitors, in reverse order (cuDNN, then ours): each
            # keeps the lower of its two medians, so neither gains from its position in the cell.
            if row.get("cudnn_us") is not None and cudnn_ctx is not None and not row.get("cudnn_kv_expanded"):
                res, _, o2 = time_impl(lambda: make_cudnn(k4, v4, heads != kv_heads), cudnn_ctx, kw)
                del o2
                if res is not None:
                    row["cudnn_us"] = min(row["cudnn_us"], res.median_us)
            if row.get("ours_us") is not None:
                res, _, o2 = time_impl(
                    lambda: (lambda: varlen(q, k, v, cu_q, cu_k, 1, seqlen_k, dropout_p=0.0,
                                            softmax_scale=scale, causal=True, num_splits=0)),
                    None, kw)
                del o2
                if res is not None:
                    row["ours_us"] = min(row["ours_us"], res.median_us)
                    for page in PAGE_SIZES:
                        if row.get(f"paged{page}_us"):
                            row[f"paged{page}_ratio"] = row[f"paged{page}_us"] / row["ours_us"]

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
              + (f"  paged16/ours {fmt(row['paged16_ratio'], '.2f')}  paged256/ours "
                 f"{fmt(row['paged256_ratio'], '.2f')}" if args.paged else "")
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
    if args.paged:
        headers += ["paged16_us", "paged256_us", "paged16/ours", "paged256/ours", "paged maxdiff"]
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
        if args.paged:
            pdiffs = [r[f"paged{p}_maxdiff"] for p in PAGE_SIZES if r[f"paged{p}_maxdiff"] is not None]
            tr += [fmt(r["paged16_us"]), fmt(r["paged256_us"]), fmt(r["paged16_ratio"], ".2f"),
                   fmt(r["paged256_ratio"], ".2f"), fmt(max(pdiffs) if pdiffs else None, ".1e")]
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
    psum = paged_summary(rows) if args.paged else None
    if psum:
        print("\n" + psum)
    print(f"\nelapsed {elapsed:.1f} s (cells only)")

    # ---- outputs
    json_keys = ["batch", "seqlen_k", "heads", "kv_heads", "ours_us", "nosplit_us", "torch_fa2_varlen_us",
                 "cudnn_us", "bw_frac", "splits", "maxdiff", "cudnn_maxdiff", "cudnn_kv_expanded", "kv_bytes",
                 "copy_bw_bytes_per_s"]
    json_keys += [f"paged{p}_{s}" for p in PAGE_SIZES for s in ("us", "ratio", "maxdiff")]
    json_keys += (["ours_graph_us"] if args.graph else []) + ["notes"]
    write_json(json_path, [{k: r.get(k) for k in json_keys} for r in rows])

    body = [
        "fp16, head dim 128, one query per sequence (flash_attn_varlen_func, max_seqlen_q=1, causal=True), "
        "time per call in microseconds (CUDA events, L2 flushed before each call, median"
        + (", --quick" if args.quick else "") + "). "
        "ours = num_splits=0 (heuristic, `splits` = its choice), nosplit = num_splits=1, "
        "torch_fa2_varlen = torch.ops.aten._flash_attention_forward, cuDNN = SDPA CUDNN_ATTENTION on "
        "strided (b, h, s, d) views of the same K/V (enable_gqa for GQA). speedups = other/ours; "
        "ours/cudnn = time ratio; bw_frac = (K+V bytes / ours time) / copy bandwidth"
        + (f" ({copy_bw / 1e12:.2f} TB/s read+write, 2 GiB D2D copy)" if copy_bw else "") + "."
        + (" paged16/paged256 = ours (num_splits=0) on the same K/V copied into a paged cache of 16 / 256-token "
           "pages in random order (block_table); paged16/ours, paged256/ours = time ratios (target <= "
           f"{PAGED_TARGET:.2f}); paged maxdiff = max |paged - contiguous| over both page sizes."
           if args.paged else ""),
        "",
        "; ".join(env[2:]) if len(env) > 2 else "",
        "",
        table,
    ]
    if any(r["cudnn_kv_expanded"] for r in rows):
        body += ["", "\\* cuDNN refused GQA: K/V expanded to `heads` (repeat_interleave) outside the timed "
                     "region, so that kernel reads heads/kv_heads times more bytes."]
    if psum:
        body += ["", psum + "."]
    if skipped:
        body += ["", skipped_line(skipped, args.max_kv_gib)]
    if notes:
        body += ["", "Notes:"] + [f"- {n}" for n in notes]
    write_section(md_path, "Decode (seqlen_q = 1, fp16, head dim 128)", gpu_name(), today_utc(), "\n".join(body))
    print(f"wrote {md_path}")
    return 0 if not dead else 2


if __name__ == "__main__":
    sys.exit(main())
