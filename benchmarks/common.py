"""What the benchmark scripts share: arguments, the cell loop, the prefill and decode grids, paged caches,
and result files (OUT_DIR/<measurement>_<card>.json and .md, headed by the card description)."""

import argparse
import functools
import gc
import json
import math
import os
import re
import sys
import time

import torch

import timing

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
# Appended, not prepended: a flash_attn on PYTHONPATH (the --baseline tree of gpu_check.sh) or an
# installed one wins over the checkout holding these scripts.
if REPO not in sys.path:
    sys.path.append(REPO)


def parser(doc: str, time_budget_s=None, grid=None) -> argparse.ArgumentParser:
    """The common options, with the subset filters of the prefill or the decode grid (grid="prefill" / "decode")."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: fewer repeats, one timing pass, or a smaller grid")
    p.add_argument("--out-dir", default=os.path.join(HERE, "results"), help="default %(default)s")
    if time_budget_s:
        p.add_argument("--time-budget-s", type=float, default=time_budget_s,
                       help="cells started after this many seconds get the minimum repeats (default %(default)s)")
    if grid == "prefill":
        p.add_argument("--dtypes", default="fp16,bf16", help="default %(default)s")
        p.add_argument("--headdims", default="64,128,256", help="default %(default)s")
    if grid == "decode":
        p.add_argument("--cells", default=None, help="filter: KEY=V1|V2 clauses joined by commas, all must match, "
                       "over " + ", ".join(CELL_KEYS) + ', e.g. "batch=1|16,seqlen_k=32768"')
    return p


def start() -> dict:
    """Exit 1 without CUDA; print and return the card description; seed the inputs."""
    if not torch.cuda.is_available():
        raise SystemExit(f"{os.path.basename(sys.argv[0])}: no CUDA device (torch {torch.__version__}, CUDA "
                         f"{torch.version.cuda}); this benchmark needs an NVIDIA GPU. Nothing was measured.")
    desc = timing.describe_device(REPO)
    import flash_attn
    desc["flash_attn"] = os.path.dirname(flash_attn.__file__)
    print(timing.device_line(desc))
    print(f"flash_attn from {desc['flash_attn']}")
    torch.manual_seed(0)
    return desc


def fmt(x, spec: str = ".1f") -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def ratio(a, b):
    return a / b if a and b else None


def count(rows, a, b, factor) -> str:
    both = [r for r in rows if r.get(a) and r.get(b)]
    return f"{sum(r[a] <= factor * r[b] for r in both)}/{len(both)}"


def markdown_table(headers, rows) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


def maxdiff(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


def on_sm80_kernels(make, switch: str):
    """make_fn for time_impl: make's call between flash_attn_2_cuda.<switch>(False) and (True), on compute
    capability 9.0 the SM80 kernels that the Hopper ones replace, timed in the same cell."""
    import flash_attn_2_cuda
    set_hopper = getattr(flash_attn_2_cuda, switch)

    def run(call):
        set_hopper(False)
        try:
            return call()
        finally:
            set_hopper(True)
    return lambda: functools.partial(run, make())


def context_dead() -> bool:
    """After a failure: is the CUDA context unusable (illegal address and the like)?"""
    try:
        torch.cuda.synchronize()
        torch.zeros(1, device="cuda").add_(1).item()
        return False
    except Exception:  # noqa: BLE001
        return True


def save(args, measurement: str, desc: dict, rows, report: str) -> None:
    """Print the report; write it (markdown) and the rows (JSON, under the card description)."""
    print("\n" + report)
    m = re.search(r"\b([A-Z]{1,2}\d{2,4})\b", desc["card"])  # "NVIDIA H100 80GB HBM3" -> h100
    card = m.group(1).lower() if m else re.sub(r"[^a-z0-9]+", "_", desc["card"].lower()).strip("_")
    os.makedirs(args.out_dir, exist_ok=True)
    path = os.path.join(args.out_dir, f"{measurement}_{card}")
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


def run_cells(cells, measure, args, kw, fields):
    """measure(cell, bench kwargs, late) over the cells, each row printed as its cell's name and `fields`;
    cells started after --time-budget-s get LATE_KW (late=True); a failing cell is a row with its error."""
    t0, rows = time.time(), []
    for c in cells:
        late = time.time() - t0 > args.time_budget_s
        try:
            new = measure(c, LATE_KW if late else kw, late)
        except Exception as e:  # noqa: BLE001 - one broken cell is reported, the run goes on
            new = [dict(c, notes=["cell: " + timing.short_err(e)])]
        for r in new:
            values = (f"{f} {fmt(r.get(f), '.5g' if isinstance(r.get(f), float) else '')}" for f in fields)
            print("  ".join([cell_name(r), *values]) + "".join(f"\n    {n}" for n in r["notes"]), flush=True)
        rows += new
        gc.collect()
        torch.cuda.empty_cache()
        if any(r["notes"] for r in new) and context_dead():
            print("the CUDA context is unusable; stopping")
            break
    print(f"elapsed {time.time() - t0:.0f} s")
    return rows


# ---------------------------------------------------------------------------- prefill grid
MODEL_DIM = 2048
TOKENS = 16384
PREFILL_SEQLENS = [512, 1024, 2048, 4096, 8192, 16384]
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def prefill_cells(args):
    return [dict(dtype=dtype, headdim=headdim, causal=causal, seqlen=seqlen) for dtype in args.dtypes.split(",")
            for headdim in map(int, args.headdims.split(",")) for causal in (False, True) for seqlen in PREFILL_SEQLENS]


def prefill_inputs(c, **kw):
    """q, k, v (batch, seqlen, heads, head dim) of a prefill cell, with its batch and heads."""
    heads, batch = MODEL_DIM // c["headdim"], TOKENS // c["seqlen"]
    qkv = [torch.randn(batch, c["seqlen"], heads, c["headdim"], device="cuda", dtype=DTYPES[c["dtype"]], **kw)
           for _ in range(3)]
    return qkv, batch, heads


def forward_flops(c, batch, heads) -> float:
    return 4 * batch * heads * c["seqlen"] ** 2 * c["headdim"] / (2 if c["causal"] else 1)


# ---------------------------------------------------------------------------- decode grid
DECODE_SEQLENS_K = [2048, 4096, 8192, 32768]
DECODE_BATCHES = [1, 16, 128]
DECODE_HEADS = [(12, 12), (32, 8), (32, 32)]
CELL_KEYS = ("batch", "seqlen_k", "heads", "kv_heads", "seqlen_q")
MAX_KV_GIB = 16  # cells whose K+V exceed this are skipped (named in a printed line)


def parse_cells(spec):
    conds = {}
    for clause in filter(None, (c.strip() for c in (spec or "").split(","))):
        key, _, vals = clause.partition("=")
        if key not in CELL_KEYS or not re.fullmatch(r"\d+(\|\d+)*", vals):
            raise SystemExit(f"--cells: bad clause {clause!r} (want KEY=V1|V2 with KEY in {', '.join(CELL_KEYS)})")
        conds[key] = {int(v) for v in vals.split("|")}
    return conds


def kv_bytes(c) -> int:
    return 2 * c["batch"] * c["seqlen_k"] * c["kv_heads"] * c.get("headdim", 128) * 2  # K and V, fp16


def cell_matches(cell, spec) -> bool:
    """Whether a cell passes the --cells filter (keys the cell does not have are not checked)."""
    return all(cell[k] in v for k, v in parse_cells(spec).items() if k in cell)


def select_cells(cells, args):
    """Cells matching --cells, less those over MAX_KV_GIB."""
    cells = [c for c in cells if cell_matches(c, args.cells)]
    big = [c for c in cells if kv_bytes(c) > MAX_KV_GIB * 2 ** 30]
    if big:
        print(f"skipped (K+V > {MAX_KV_GIB} GiB): " + ", ".join(map(cell_name, big)))
    return [c for c in cells if c not in big]


def decode_cells():
    return [dict(batch=b, seqlen_k=s, heads=h, kv_heads=hk)
            for s in DECODE_SEQLENS_K for b in DECODE_BATCHES for h, hk in DECODE_HEADS]


def cell_name(c) -> str:
    """A prefill or decode cell's name (head dim and mask first where the cell has them)."""
    head = f"hd{c['headdim']} {'causal' if c['causal'] else 'full'} " if "headdim" in c else ""
    if "seqlen" in c:
        return f"{c['dtype']} {head}s{c['seqlen']}"
    q = f" q{c['seqlen_q']}" if "seqlen_q" in c else ""
    return f"{head}b{c['batch']}{q} s{c['seqlen_k']} h{c['heads']}/{c['kv_heads']}"


def make_paged(k, v, batch: int, seqlen_k: int, page: int):
    """K/V (batch * seqlen_k, kv_heads, d) copied into `page`-token pages in random order (consecutive
    pages of a sequence not adjacent): (k_paged, v_paged, block_table (batch, seqlen_k / page) int32)."""
    nblocks = batch * seqlen_k // page
    perm = torch.randperm(nblocks, device=k.device)  # logical page i lives in physical page perm[i]
    paged = []
    for x in (k, v):
        lin = x.view(nblocks, page, *x.shape[1:])
        paged.append(torch.empty_like(lin).index_copy_(0, perm, lin))
    return paged[0], paged[1], perm.view(batch, -1).to(torch.int32)
