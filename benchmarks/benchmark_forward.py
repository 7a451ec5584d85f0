#!/usr/bin/env python
"""Forward-pass throughput (TFLOP/s): ours vs PyTorch SDPA (flash backend = PyTorch's vendored
FlashAttention-2) vs PyTorch SDPA (cuDNN backend), in one run.

Configurations (upstream flash-attn's benchmark_flash_attention.py grid):
  model dim 2048, nheads = 2048 / headdim, (batch, seqlen) in (32,512) (16,1024) (8,2048)
  (4,4096) (2,8192) (1,16384), head dim 64 and 128, causal and not, fp16.
FLOPs = 4 * batch * seqlen^2 * nheads * headdim, halved for causal (upstream's convention).

Inputs: ours gets (batch, seqlen, nheads, headdim) tensors (flash_attn_func layout); SDPA gets
contiguous (batch, nheads, seqlen, headdim) copies of the same values. Timing: CUDA events per
call, 256 MiB L2 flush before each call (outside the timed window), median (see timing.py).
A failing implementation prints "n/a" in its cell; the reason is listed under the table.

Usage (from the repository root, on the GPU machine):
  python benchmarks/benchmark_forward.py            # ~15-40 s on an H100
  python benchmarks/benchmark_forward.py --quick    # fewer repeats, ~10-20 s
Outputs: benchmarks/results/forward_h100.json (list of rows) and
         benchmarks/results/forward_h100.md (a "## ..." section for RESULTS.md).
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
# The repository's flash_attn package (and an in-place built flash_attn_2_cuda) take precedence.
for _p in (REPO, HERE):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from timing import (bench, require_cuda, environment_lines, gpu_name, today_utc, fmt,  # noqa: E402
                    markdown_table, short_err, sticky_cuda_error)
from write_results import write_json, write_section  # noqa: E402

SHAPES = [(32, 512), (16, 1024), (8, 2048), (4, 4096), (2, 8192), (1, 16384)]
HEADDIMS = [64, 128]
MODEL_DIM = 2048


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", default=os.path.join(HERE, "results"))
    p.add_argument("--json", default=None, help="JSON output path (default OUT_DIR/forward_h100.json)")
    p.add_argument("--results-md", default=None,
                   help="markdown section output path (default OUT_DIR/forward_h100.md)")
    p.add_argument("--quick", action="store_true", help="fewer repeats (smoke run)")
    p.add_argument("--dtype", choices=["fp16", "bf16"], default="fp16")
    p.add_argument("--headdims", default=None, help="comma list, e.g. 128 (default 64,128)")
    p.add_argument("--causal", choices=["both", "true", "false"], default="both")
    p.add_argument("--time-budget-s", type=float, default=75.0,
                   help="after this many seconds, remaining cells use the minimum number of repeats")
    return p.parse_args(argv)


def flops(batch, seqlen, nheads, headdim, causal):
    f = 4 * batch * seqlen * seqlen * nheads * headdim
    return f // 2 if causal else f


def tflops(batch, seqlen, nheads, headdim, causal, t_us):
    if t_us is None or t_us <= 0:
        return None
    return flops(batch, seqlen, nheads, headdim, causal) / (t_us * 1e-6) / 1e12


def time_impl(make_fn, ctx_factory, bench_kw):
    """Run make_fn() -> fn inside ctx; returns (BenchResult|None, note|None, first_output|None).
    Every exception is caught; captured warnings (e.g. SDPA's reasons for refusing a backend)
    are appended to the note."""
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
        except Exception as e:  # noqa: BLE001 - report every failure as n/a
            note = short_err(e)
            msgs = [str(w.message).replace("\n", " ") for w in caught]
            if msgs:
                note += " [warning: " + msgs[0][:200] + "]"
            return None, note, None


def main(argv=None) -> int:
    args = parse_args(argv)
    require_cuda("benchmark_forward.py")

    out_dir = args.out_dir
    os.makedirs(out_dir, exist_ok=True)
    json_path = args.json or os.path.join(out_dir, "forward_h100.json")
    md_path = args.results_md or os.path.join(out_dir, "forward_h100.md")
    dtype = torch.float16 if args.dtype == "fp16" else torch.bfloat16
    headdims = [int(x) for x in args.headdims.split(",")] if args.headdims else HEADDIMS
    causals = {"both": [False, True], "true": [True], "false": [False]}[args.causal]

    env = environment_lines(REPO)
    for line in env:
        print(line)

    # ---- implementations
    ours_err = None
    flash_attn_func = None
    try:
        import flash_attn  # noqa: F401
        from flash_attn import flash_attn_func
        print(f"flash_attn {getattr(flash_attn, '__version__', '?')} from {os.path.dirname(flash_attn.__file__)}")
    except Exception as e:  # noqa: BLE001
        ours_err = "import flash_attn failed: " + short_err(e)
        print(ours_err)

    try:
        from torch.nn.attention import sdpa_kernel, SDPBackend

        def fa2_ctx():
            return sdpa_kernel([SDPBackend.FLASH_ATTENTION])

        def cudnn_ctx():
            return sdpa_kernel([SDPBackend.CUDNN_ATTENTION])
        sdpa_err = None
    except Exception as e:  # noqa: BLE001
        sdpa_err = "torch.nn.attention.sdpa_kernel unavailable: " + short_err(e)
        fa2_ctx = cudnn_ctx = None
        print(sdpa_err)

    if args.quick:
        base_kw = dict(warmup=2, reps=10, min_reps=3, max_time_s=0.1)
    else:
        base_kw = dict(warmup=3, reps=50, min_reps=5, max_time_s=0.4)
    late_kw = dict(warmup=1, reps=3, min_reps=3, max_time_s=0.05)
    print(f"timing: CUDA events, 256 MiB L2 flush before each call, median; "
          f"{'quick' if args.quick else 'full'} ({base_kw})")
    print()

    t0 = time.time()
    rows, notes = [], []
    torch.manual_seed(0)
    dead = None

    for headdim in headdims:
        nheads = MODEL_DIM // headdim
        for causal in causals:
            for batch, seqlen in SHAPES:
                if dead:
                    break
                kw = base_kw if time.time() - t0 < args.time_budget_s else late_kw
                cell = f"hd{headdim} {'causal' if causal else 'full'} b{batch} s{seqlen}"
                row = dict(batch=batch, seqlen=seqlen, headdim=headdim, nheads=nheads, causal=causal,
                           ours_tflops=None, torch_fa2_tflops=None, cudnn_tflops=None,
                           ours_us=None, torch_fa2_us=None, cudnn_us=None, maxdiff=None, notes=[])
                q = k = v = qt = kt = vt = None
                o_ours = o_fa2 = o_cudnn = None
                try:
                    q = torch.randn(batch, seqlen, nheads, headdim, device="cuda", dtype=dtype)
                    k = torch.randn_like(q)
                    v = torch.randn_like(q)
                    qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (q, k, v))

                    # ours
                    if ours_err is None:
                        res, note, o_ours = time_impl(
                            lambda: (lambda: flash_attn_func(q, k, v, dropout_p=0.0, causal=causal)),
                            None, kw)
                    else:
                        res, note = None, ours_err
                    if res is not None:
                        row["ours_us"] = res.median_us
                    elif note:
                        row["notes"].append("ours: " + note)

                    # SDPA flash (PyTorch's vendored FA2) and SDPA cuDNN
                    for key, ctx in (("torch_fa2", fa2_ctx), ("cudnn", cudnn_ctx)):
                        if ctx is None:
                            row["notes"].append(f"{key}: {sdpa_err}")
                            continue
                        res, note, o = time_impl(
                            lambda: (lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)),
                            ctx, kw)
                        if res is not None:
                            row[f"{key}_us"] = res.median_us
                        else:
                            row["notes"].append(f"{key}: {note}")
                        if key == "torch_fa2":
                            o_fa2 = o
                        else:
                            o_cudnn = o

                    # cheap correctness check (outside timing): ours vs torch FA2 (else vs cuDNN)
                    ref = o_fa2 if o_fa2 is not None else o_cudnn
                    if o_ours is not None and ref is not None:
                        row["maxdiff"] = (o_ours.float() - ref.transpose(1, 2).float()).abs().max().item()
                        if ref is o_cudnn:
                            row["notes"].append("maxdiff vs cuDNN (torch FA2 n/a)")
                except Exception as e:  # noqa: BLE001
                    row["notes"].append("cell: " + short_err(e))
                finally:
                    del q, k, v, qt, kt, vt, o_ours, o_fa2, o_cudnn
                    gc.collect()
                    torch.cuda.empty_cache()

                for key in ("ours", "torch_fa2", "cudnn"):
                    row[f"{key}_tflops"] = tflops(batch, seqlen, nheads, headdim, causal, row[f"{key}_us"])
                rows.append(row)
                ratio = (row["ours_tflops"] / row["torch_fa2_tflops"]
                         if row["ours_tflops"] and row["torch_fa2_tflops"] else None)
                print(f"{cell:28s} ours {fmt(row['ours_tflops'], '7.1f')}  torch_fa2 "
                      f"{fmt(row['torch_fa2_tflops'], '7.1f')}  cudnn {fmt(row['cudnn_tflops'], '7.1f')} "
                      f"TFLOP/s  ours/fa2 {fmt(ratio, '.2f')}  maxdiff {fmt(row['maxdiff'], '.1e')}",
                      flush=True)
                for n in row["notes"]:
                    notes.append(f"{cell}: {n}")
                if row["notes"]:
                    dead = sticky_cuda_error()
                    if dead:
                        print(f"CUDA context is unusable after {cell}: {dead}; stopping.")
                        notes.append(f"stopped after {cell}: CUDA context unusable ({dead})")

    elapsed = time.time() - t0

    # ---- table
    headers = ["headdim", "causal", "batch", "seqlen", "nheads", "ours TFLOP/s", "torch FA2 TFLOP/s",
               "cuDNN TFLOP/s", "ours/torch_fa2", "ours/cudnn", "maxdiff"]
    trows = []
    for r in rows:
        r1 = r["ours_tflops"] / r["torch_fa2_tflops"] if r["ours_tflops"] and r["torch_fa2_tflops"] else None
        r2 = r["ours_tflops"] / r["cudnn_tflops"] if r["ours_tflops"] and r["cudnn_tflops"] else None
        trows.append([r["headdim"], r["causal"], r["batch"], r["seqlen"], r["nheads"],
                      fmt(r["ours_tflops"]), fmt(r["torch_fa2_tflops"]), fmt(r["cudnn_tflops"]),
                      fmt(r1, ".2f"), fmt(r2, ".2f"), fmt(r["maxdiff"], ".1e")])
    table = markdown_table(headers, trows)
    print()
    print(table)
    if notes:
        print("\nn/a and other notes:")
        for n in notes:
            print("  - " + n)
    print(f"\nelapsed {elapsed:.1f} s")

    # ---- outputs
    json_rows = []
    for r in rows:
        jr = {k: r[k] for k in ("batch", "seqlen", "headdim", "causal", "ours_tflops", "torch_fa2_tflops",
                                "cudnn_tflops")}
        jr.update(nheads=r["nheads"], ours_us=r["ours_us"], torch_fa2_us=r["torch_fa2_us"],
                  cudnn_us=r["cudnn_us"], maxdiff=r["maxdiff"], dtype=args.dtype, notes=r["notes"])
        json_rows.append(jr)
    write_json(json_path, json_rows)

    body = [
        f"{args.dtype}, model dim {MODEL_DIM} (nheads = {MODEL_DIM} / headdim). "
        "TFLOP/s with FLOPs = 4*batch*seqlen^2*nheads*headdim, halved for causal. "
        "ours = flash_attn.flash_attn_func; torch FA2 = SDPA with SDPBackend.FLASH_ATTENTION; "
        "cuDNN = SDPA with SDPBackend.CUDNN_ATTENTION. CUDA events, L2 flushed before each call, median"
        + (" (--quick)" if args.quick else "") + ".",
        "",
        "; ".join(env[2:]) if len(env) > 2 else "",
        "",
        table,
    ]
    if notes:
        body += ["", "Notes:"] + [f"- {n}" for n in notes]
    write_section(md_path, f"Forward ({args.dtype})", gpu_name(), today_utc(), "\n".join(body))
    print(f"wrote {md_path}")
    return 0 if not dead else 2


if __name__ == "__main__":
    sys.exit(main())
