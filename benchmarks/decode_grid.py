"""The decode benchmark grid, shared by benchmark_decode.py and sweep_num_splits.py.

Grid: seqlen_k in {2048, 4096, 8192, 32768} x batch in {1, 16, 128} x (heads, kv_heads) in
{(12,12), (32,8), (32,32)}, head dim 128, fp16. Cells whose K and V together exceed --max-kv-gib
(default 16 GiB) are skipped. --cells filters the grid with KEY=V1|V2 clauses.

Pure Python (no CUDA needed).
"""

from __future__ import annotations

SEQLENS_K = [2048, 4096, 8192, 32768]
BATCHES = [1, 16, 128]
HEAD_CONFIGS = [(12, 12), (32, 8), (32, 32)]
HEADDIM = 128
CELL_KEYS = ("batch", "seqlen_k", "heads", "kv_heads")
DEFAULT_MAX_KV_GIB = 16.0

CELLS_HELP = ('filter: comma-separated KEY=V1|V2 clauses over batch, seqlen_k, heads, kv_heads, '
              'all must match, e.g. "batch=1" or "batch=1|16,seqlen_k=32768"')


def add_grid_args(p) -> None:
    """--cells and --max-kv-gib, with the same meaning in every decode script."""
    p.add_argument("--cells", default=None, help=CELLS_HELP)
    p.add_argument("--max-kv-gib", type=float, default=DEFAULT_MAX_KV_GIB,
                   help="skip cells whose K+V bytes exceed this many GiB (default %(default)s)")


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


def cell_name(c) -> str:
    return f"b{c['batch']} s{c['seqlen_k']} h{c['heads']}/{c['kv_heads']}"


def select_cells(conds, max_kv_gib=DEFAULT_MAX_KV_GIB):
    """Grid cells in benchmark order (seqlen_k, batch, head config) -> (cells, skipped_for_size)."""
    cells, skipped = [], []
    for seqlen_k in SEQLENS_K:
        for batch in BATCHES:
            for heads, kv_heads in HEAD_CONFIGS:
                c = dict(batch=batch, seqlen_k=seqlen_k, heads=heads, kv_heads=kv_heads)
                if not cell_matches(conds, c):
                    continue
                if kv_bytes_of(batch, seqlen_k, kv_heads) > max_kv_gib * 2 ** 30:
                    skipped.append(c)
                    continue
                cells.append(c)
    return cells, skipped


def skipped_line(skipped, max_kv_gib) -> str:
    return ("Skipped (K+V > %.0f GiB): " % max_kv_gib) + ", ".join(cell_name(c) for c in skipped)
