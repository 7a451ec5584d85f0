"""What the benchmark scripts share: arguments, the per-cell timing of several implementations,
PyTorch's FA2 op, the decode grid, paged copies of a cache, and result files
(OUT_DIR/<measurement>_<card>.json and .md, headed by the card description)."""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import re
import sys
import time
import warnings

import torch

import timing

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
# Appended, not prepended: a flash_attn on PYTHONPATH (the --baseline tree of gpu_check.sh) or an
# installed one wins over the checkout holding these scripts.
if REPO not in sys.path:
    sys.path.append(REPO)


def parser(doc: str, time_budget_s=None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer repeats, one timing pass (smoke run)")
    p.add_argument("--out-dir", default=os.path.join(HERE, "results"), help="default %(default)s")
    if time_budget_s:
        p.add_argument("--time-budget-s", type=float, default=time_budget_s,
                       help="cells started after this many seconds get the minimum repeats (default %(default)s)")
    return p


def start(script: str, args) -> dict:
    """Exit 1 without CUDA; print and return the card description."""
    timing.require_cuda(script)
    desc = timing.describe_device(REPO)
    import flash_attn
    desc["flash_attn"] = os.path.dirname(flash_attn.__file__)
    print(timing.device_line(desc))
    print(f"flash_attn from {desc['flash_attn']}; L2 flush: {timing.FLUSH_MODE}")
    return desc


def fmt(x, spec: str = ".1f") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return format(x, spec)


def ratio(a, b):
    return a / b if a and b else None


def markdown_table(headers, rows) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


def short_err(e: BaseException, limit: int = 200) -> str:
    msg = f"{type(e).__name__}: {e}".replace("\n", " ").replace("|", "/")
    return msg[:limit]


def context_dead() -> bool:
    """After a failure: is the CUDA context unusable (illegal address and the like)?"""
    try:
        torch.cuda.synchronize()
        torch.zeros(1, device="cuda").add_(1).item()
        return False
    except Exception:  # noqa: BLE001
        return True


def card_slug(name: str) -> str:
    m = re.search(r"\b([A-Z]{1,2}\d{2,4})\b", name)
    return m.group(1).lower() if m else re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def save(args, measurement: str, desc: dict, rows, report: str) -> None:
    """Write the rows (JSON, under the card description) and the printed report (markdown)."""
    stem = f"{measurement}_{card_slug(desc['card'])}"
    os.makedirs(args.out_dir, exist_ok=True)
    path = os.path.join(args.out_dir, stem)
    with open(path + ".json", "w") as f:
        json.dump({"device": desc, "rows": rows}, f, indent=1)
    with open(path + ".md", "w", encoding="utf-8") as f:
        f.write(f"## {measurement} — {timing.device_line(desc)}\n\n{report.rstrip()}\n")
    print(f"wrote {path}.json, {path}.md")


def bench_kwargs(args, max_time_s: float) -> dict:
    if args.quick:
        return dict(warmup=2, reps=10, min_reps=3, max_time_s=max_time_s / 3)
    return dict(warmup=3, reps=50, min_reps=5, max_time_s=max_time_s)


LATE_KW = dict(warmup=1, reps=3, min_reps=3, max_time_s=0.03)


def run_cells(cells, measure, args, kw, line):
    """rows of measure(cell, bench kwargs, late) over the cells, each printed with line(row); cells
    started after --time-budget-s get LATE_KW (late=True), so that one run keeps to its time. A
    failing cell becomes a row holding its error; an unusable CUDA context ends the run."""
    t0, rows = time.time(), []
    for c in cells:
        late = time.time() - t0 > args.time_budget_s
        try:
            new = measure(c, LATE_KW if late else kw, late)
        except Exception as e:  # noqa: BLE001 - one broken cell is reported, the run goes on
            new = [dict(c, notes=["cell: " + short_err(e)])]
        for r in new:
            print(line(r) + "".join(f"\n    {n}" for n in r["notes"]), flush=True)
        rows += new
        gc.collect()
        torch.cuda.empty_cache()
        if any(r["notes"] for r in new) and context_dead():
            print("the CUDA context is unusable; stopping")
            break
    print(f"elapsed {time.time() - t0:.0f} s")
    return rows


def time_impl(make_fn, kw, ctx=None):
    """(median us or None, note or None, first output or None); never raises. make_fn builds the
    callable (setup outside the timing); SDPA's warnings say why it refused a backend."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with ctx() if ctx else contextlib.nullcontext():
                fn = make_fn()
                out = fn()
                return timing.bench(fn, **kw).median_us, None, out[0] if isinstance(out, (tuple, list)) else out
        except Exception as e:  # noqa: BLE001 - a failing implementation is n/a, not a crash
            note = short_err(e) + "".join(f" [warning: {str(w.message)[:160]}]" for w in caught[:1])
            return None, note, None


def time_impls(impls: dict, kw, passes: int = 2, repeat=None):
    """Time {name: (make_fn, ctx)} in order, then the names in `repeat` (default all) again in
    reverse order, each keeping its lower median, so that no implementation gains from its place in
    the cell. Returns ({name: us or None}, {name: note}, {name: first output})."""
    times, notes, outs = {}, {}, {}
    for name, (make_fn, ctx) in impls.items():
        times[name], note, outs[name] = time_impl(make_fn, kw, ctx)
        if note:
            notes[name] = note
    if passes > 1:
        for name in reversed([n for n in impls if repeat is None or n in repeat]):
            if times[name] is not None:
                t, _, _ = time_impl(impls[name][0], kw, impls[name][1])
                times[name] = min(times[name], t) if t is not None else times[name]
    return times, notes, outs


def sdpa_context(backend: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return lambda: sdpa_kernel([getattr(SDPBackend, backend)])


def torch_fa2_forward():
    """PyTorch's vendored FlashAttention-2 forward as call(q, k, v, cu_q, cu_k, max_q, max_k, causal)
    (cu_q = cu_k = None: dense (batch, seqlen, heads, d) inputs), or (None, why)."""
    try:
        op = torch.ops.aten._flash_attention_forward.default
        names = [a.name for a in op._schema.arguments]
    except Exception as e:  # noqa: BLE001
        return None, "aten._flash_attention_forward unavailable: " + short_err(e)
    expected = ["query", "key", "value", "cum_seq_q", "cum_seq_k", "max_q", "max_k", "dropout_p", "is_causal",
                "return_debug_mask"]
    if names[:len(expected)] != expected:
        return None, f"unexpected schema {op._schema}"

    def call(q, k, v, cu_q, cu_k, max_q, max_k, causal):
        return op(q, k, v, cu_q, cu_k, max_q, max_k, 0.0, causal, False, scale=q.shape[-1] ** -0.5)[0]
    return call, None


# ---------------------------------------------------------------------------- decode grid
DECODE_SEQLENS_K = [2048, 4096, 8192, 32768]
DECODE_BATCHES = [1, 16, 128]
DECODE_HEADS = [(12, 12), (32, 8), (32, 32)]
CELL_KEYS = ("batch", "seqlen_k", "heads", "kv_heads", "seqlen_q")


def add_cell_args(p, max_kv_gib: float = 16.0) -> None:
    p.add_argument("--cells", default=None, help="filter: KEY=V1|V2 clauses joined by commas, all must match, over "
                   + ", ".join(CELL_KEYS) + ', e.g. "batch=1|16,seqlen_k=32768"')
    p.add_argument("--max-kv-gib", type=float, default=max_kv_gib,
                   help="skip cells whose K+V exceed this many GiB (default %(default)s)")


def parse_cells(spec):
    conds = {}
    for clause in filter(None, (c.strip() for c in (spec or "").split(","))):
        key, _, vals = clause.partition("=")
        if key not in CELL_KEYS or not re.fullmatch(r"\d+(\|\d+)*", vals):
            raise SystemExit(f"--cells: bad clause {clause!r} (want KEY=V1|V2 with KEY in {', '.join(CELL_KEYS)})")
        conds[key] = {int(v) for v in vals.split("|")}
    return conds


def kv_bytes(c, headdim: int = 128, elem: int = 2) -> int:
    return 2 * c["batch"] * c["seqlen_k"] * c["kv_heads"] * headdim * elem


def cell_matches(cell, spec) -> bool:
    """Whether a cell passes the --cells filter (keys the cell does not have are not checked)."""
    return all(cell[k] in v for k, v in parse_cells(spec).items() if k in cell)


def select_cells(cells, args):
    """Cells matching --cells, less those over --max-kv-gib (named in a printed line)."""
    cells = [c for c in cells if cell_matches(c, args.cells)]
    big = [c for c in cells if kv_bytes(c) > args.max_kv_gib * 2 ** 30]
    if big:
        print(f"skipped (K+V > {args.max_kv_gib:g} GiB): " + ", ".join(map(cell_name, big)))
    return [c for c in cells if c not in big]


def decode_cells():
    return [dict(batch=b, seqlen_k=s, heads=h, kv_heads=hk)
            for s in DECODE_SEQLENS_K for b in DECODE_BATCHES for h, hk in DECODE_HEADS]


def cell_name(c) -> str:
    q = f" q{c['seqlen_q']}" if "seqlen_q" in c else ""
    return f"b{c['batch']}{q} s{c['seqlen_k']} h{c['heads']}/{c['kv_heads']}"


def make_paged(k, v, batch: int, seqlen_k: int, page: int):
    """K/V of layout (batch * seqlen_k, kv_heads, d) copied into a cache of `page`-token pages in a
    random order (no two consecutive pages of a sequence adjacent, in general): (k_paged, v_paged,
    block_table (batch, seqlen_k / page) int32)."""
    nblocks = batch * seqlen_k // page
    perm = torch.randperm(nblocks, device=k.device)  # logical page i lives in physical page perm[i]
    paged = []
    for x in (k, v):
        lin = x.view(nblocks, page, *x.shape[1:])
        paged.append(torch.empty_like(lin).index_copy_(0, perm, lin))
    return paged[0], paged[1], perm.view(batch, -1).to(torch.int32)
