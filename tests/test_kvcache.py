"""GPU tests of flash_attn_with_kvcache against the float32 reference (tests/kvcache_reference.py).

Every call is checked for:
  * out: max|out - ref| <= 2 * max|out_pt - ref| + 1e-5 (out_pt: the same math done by PyTorch in
    the input dtype), no NaN, exact 0 in rows with no allowed key;
  * softmax_lse (return_softmax_lse=True): within 1e-3 of the reference, +inf for empty rows;
  * the caches: the new rows land in exactly the expected slots - bit-identical to k / v, or,
    with rotary, within one rounding step of the float32 rotary rounded to the input dtype (the
    kernel's float32 arithmetic may differ from PyTorch's by an FMA contraction); every other row
    of both caches (unused pages, other batch rows, rows past the end) is bitwise unchanged;
  * q, k, v are not modified.
Split-KV (num_splits 0 = heuristic, n > 1) and paged results must equal the unsplit / contiguous
ones within rounding: max|a - b| <= 2 * max|out_pt - ref| + 1e-5 (the kernels round P to 16 bits
with different running maxima; simulated on CPU, that difference reaches ~1.6x the PyTorch
error, so a tighter factor would be unsound), lse within 2e-4.

Rows the kernel must never read (the left padding, rows past cache_seqlens + seqlen_new in the
edge-case test, pages not in the block table, cache batch rows not selected by cache_batch_idx)
hold NaN in some tests: any read that is only "masked" by a zero weight shows up as NaN.
"""

import pytest
import torch

from helpers import (
    DEVICE, assert_empty_rows_zero, assert_lse_close, assert_out_close, flash_attn, lse_checkable,
    max_abs_diff, randn, requires_gpu
)
from kvcache_reference import (
    assert_bitwise_equal,
    assert_rounding_close,
    kvcache_attention_pt,
    kvcache_attention_ref,
    make_rotary_cos_sin,
    num_pages,
    paged_from_contiguous,
    written_mask,
)
from reference import make_alibi_slopes

pytestmark = requires_gpu

DTYPES = [torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp16", "bf16"]
HEADDIMS = [64, 128, 256]
HEAD_LAYOUTS = {"mha": (6, 6), "gqa": (6, 2), "mqa": (6, 1)}
SPLIT_LSE_ATOL = 2e-4
NAN = float("nan")


def _i32(vals):
    return torch.tensor(vals, dtype=torch.int32, device=DEVICE)


def _randint(lo, hi):
    """Uniform int in [lo, hi] from the per-test seeded generator."""
    return int(torch.randint(lo, hi + 1, ()).item())


def _rotary(kind, seqlen_ro, rotary_dim, dtype):
    """kwargs for a rotary variant: None (off), "interleaved" or "neox"."""
    if kind is None:
        return {}
    cos, sin = make_rotary_cos_sin(seqlen_ro, rotary_dim, dtype, device=DEVICE)
    return dict(rotary_cos=cos, rotary_sin=sin, rotary_interleaved=(kind == "interleaved"))


def _new_kv(batch, seqlen_new, nheads_k, d, dtype):
    if seqlen_new == 0:
        return None, None
    return randn(batch, seqlen_new, nheads_k, d, dtype=dtype), randn(batch, seqlen_new, nheads_k, d, dtype=dtype)


def _check_cache(actual, expected, written, rotated, name):
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, name
    assert_bitwise_equal(actual[~written], expected[~written], f"{name}: rows that must not change")
    if rotated:
        assert_rounding_close(actual[written], expected[written], f"{name}: new (rotated) rows")
    else:
        assert_bitwise_equal(actual[written], expected[written], f"{name}: new rows")


def _check_kvcache(q, k_cache, v_cache, k=None, v=None, num_splits=0, **kw):
    """Run flash_attn_with_kvcache (modifying k_cache / v_cache in place) and check everything
    against the reference. kw: the API's keyword arguments. Returns (out, lse, out_ref, out_pt,
    lse_ref)."""
    batch, seqlen_q, nheads, _ = q.shape
    seqlen_new = 0 if k is None else k.shape[1]
    q0, kc0, vc0 = q.clone(), k_cache.clone(), v_cache.clone()
    k0 = None if k is None else k.clone()
    v0 = None if v is None else v.clone()

    out, lse = flash_attn.flash_attn_with_kvcache(
        q, k_cache, v_cache, k, v, num_splits=num_splits, return_softmax_lse=True, **kw)

    out_ref, lse_ref, exp_k, exp_v = kvcache_attention_ref(q0, kc0, vc0, k0, v0, **kw)
    out_pt, lse_pt, _, _ = kvcache_attention_pt(q0, kc0, vc0, k0, v0, **kw)

    assert out.shape == q.shape and out.dtype == q.dtype, (out.shape, out.dtype)
    assert lse.shape == (batch, nheads, seqlen_q) and lse.dtype == torch.float32, (lse.shape, lse.dtype)
    what = f"out (num_splits={num_splits})"
    assert_out_close(out, out_ref, out_pt, name=what)
    assert_empty_rows_zero(out, torch.isposinf(lse_ref).transpose(1, 2))
    window = kw.get("window_size", (-1, -1))
    capacity = (k_cache.shape[1] * kw["block_table"].shape[1] if kw.get("block_table") is not None
                else k_cache.shape[1])
    if lse_checkable(kw.get("alibi_slopes"), kw.get("causal", False), window, capacity):
        pt_factor = 2.0 if kw.get("softcap", 0.0) > 0 else 0.0
        assert_lse_close(lse, lse_ref, lse_pt, pt_factor=pt_factor)
    else:
        assert not torch.isnan(lse).any(), "softmax_lse has NaN"

    written = written_mask(k_cache, batch, kw["cache_seqlens"], seqlen_new,
                           kw.get("cache_batch_idx"), kw.get("block_table"))
    rotated = kw.get("rotary_cos") is not None
    _check_cache(k_cache, exp_k, written, rotated, "k_cache")
    _check_cache(v_cache, exp_v, written, False, "v_cache")

    assert_bitwise_equal(q, q0, "q (must not be modified)")
    if k is not None:
        assert_bitwise_equal(k, k0, "k (must not be modified)")
        assert_bitwise_equal(v, v0, "v (must not be modified)")
    return out, lse, out_ref, out_pt, lse_ref


def _assert_same_within_rounding(out_a, lse_a, out_b, lse_b, out_ref, out_pt, what):
    err_pt = max_abs_diff(out_pt, out_ref)
    diff = max_abs_diff(out_a, out_b)
    assert diff <= 2 * err_pt + 1e-5, (
        f"{what}: max|a - b| = {diff:.3e} > 2 * pt err ({err_pt:.3e}) + 1e-5")
    fin_a, fin_b = torch.isfinite(lse_a), torch.isfinite(lse_b)
    assert torch.equal(fin_a, fin_b), f"{what}: softmax_lse finite in one and not the other"
    if fin_a.any():
        dl = (lse_a[fin_a] - lse_b[fin_a]).abs().max().item()
        assert dl <= SPLIT_LSE_ATOL, f"{what}: max|lse_a - lse_b| = {dl:.3e} > {SPLIT_LSE_ATOL}"


# ---------------------------------------------------------------------------------------------
# Contiguous cache: head layouts, seqlen_q, new rows, causal
# ---------------------------------------------------------------------------------------------

# (seqlen_q, seqlen_new): seqlen_new == 0 means k = v = None (read-only decode).
SQ_NEW = [(1, 0), (1, 1), (4, 0), (4, 4), (128, 3)]
SQ_NEW_IDS = [f"sq{a}_new{b}" for a, b in SQ_NEW]


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize("seqlen_q,seqlen_new", SQ_NEW, ids=SQ_NEW_IDS)
@pytest.mark.parametrize("layout", list(HEAD_LAYOUTS))
@pytest.mark.parametrize("d", HEADDIMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_kvcache_output(dtype, d, layout, seqlen_q, seqlen_new, causal, require_kernel):
    """Ragged cache_seqlens: a full cache, a random length and 0 / 1 (with seqlen_q = 128 and
    causal, most query rows of that entry see no key)."""
    require_kernel(d, dtype)
    nheads, nheads_k = HEAD_LAYOUTS[layout]
    batch, s_cache = 3, 261
    cs = [s_cache - seqlen_new, _randint(1, s_cache - seqlen_new - 1), 0 if seqlen_new else 1]
    q = randn(batch, seqlen_q, nheads, d, dtype=dtype)
    k_cache = randn(batch, s_cache, nheads_k, d, dtype=dtype)
    v_cache = randn(batch, s_cache, nheads_k, d, dtype=dtype)
    k, v = _new_kv(batch, seqlen_new, nheads_k, d, dtype)
    _check_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=_i32(cs), causal=causal)


# ---------------------------------------------------------------------------------------------
# Rotary
# ---------------------------------------------------------------------------------------------

ROTARY_DIMS = [(64, 64), (128, 128), (128, 48), (256, 32)]  # (head dim, rotary_dim)
ROTARY_SQ_NEW = [(1, 1), (4, 4), (128, 5)]


@pytest.mark.parametrize("seqlen_q,seqlen_new", ROTARY_SQ_NEW, ids=[f"sq{a}_new{b}" for a, b in ROTARY_SQ_NEW])
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize("interleaved", [True, False], ids=["interleaved", "neox"])
@pytest.mark.parametrize("d,rotary_dim", ROTARY_DIMS, ids=[f"d{a}_rd{b}" for a, b in ROTARY_DIMS])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_kvcache_rotary(dtype, d, rotary_dim, interleaved, causal, seqlen_q, seqlen_new, require_kernel):
    """New k rows rotated at positions cache_seqlens + t before being written; q rotated at
    cache_seqlens + t (causal) or at cache_seqlens for every row (not causal)."""
    require_kernel(d, dtype)
    nheads, nheads_k = 6, 2
    batch, s_cache = 3, 200
    cs = [s_cache - seqlen_new, _randint(1, s_cache - seqlen_new - 1), 0]
    q = randn(batch, seqlen_q, nheads, d, dtype=dtype)
    k_cache = randn(batch, s_cache, nheads_k, d, dtype=dtype)
    v_cache = randn(batch, s_cache, nheads_k, d, dtype=dtype)
    k, v = _new_kv(batch, seqlen_new, nheads_k, d, dtype)
    rot = _rotary("interleaved" if interleaved else "neox", s_cache + seqlen_q, rotary_dim, dtype)
    _check_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=_i32(cs), causal=causal, **rot)


# ---------------------------------------------------------------------------------------------
# Paged KV cache vs contiguous
# ---------------------------------------------------------------------------------------------

# id -> (seqlen_q, seqlen_new, rotary)
PAGED_CASES = {
    "read": (1, 0, None),
    "append1": (1, 1, None),
    "append4_rot_il": (4, 4, "interleaved"),
    "sq128_new2_rot_neox": (128, 2, "neox"),
}


def _paged_pair(k_cache, v_cache, page):
    """Paged copies of both caches sharing one shuffled block table; 3 spare blocks full of NaN
    (referenced by no sequence: never read, never written)."""
    k_paged, table = paged_from_contiguous(k_cache, page, fill=NAN)
    v_paged, _ = paged_from_contiguous(v_cache, page, block_table=table, num_blocks=k_paged.shape[0],
                                       fill=NAN)
    return k_paged, v_paged, table


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize("case", list(PAGED_CASES))
@pytest.mark.parametrize("page", [16, 48, 64, 256])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_kvcache_paged(dtype, d, page, case, causal, require_kernel):
    """Paged cache (shuffled block table, more blocks than needed) == contiguous cache; the
    second entry's new rows start at the last row of its first page (they cross a page)."""
    require_kernel(d, dtype)
    seqlen_q, seqlen_new, rotary = PAGED_CASES[case]
    nheads, nheads_k = 6, 2
    batch, s_cache = 3, 300
    cs = [s_cache - seqlen_new, page - 1, 0 if seqlen_new else 1]
    q = randn(batch, seqlen_q, nheads, d, dtype=dtype)
    k_cache = randn(batch, s_cache, nheads_k, d, dtype=dtype)
    v_cache = randn(batch, s_cache, nheads_k, d, dtype=dtype)
    k, v = _new_kv(batch, seqlen_new, nheads_k, d, dtype)
    k_paged, v_paged, table = _paged_pair(k_cache, v_cache, page)
    capacity = num_pages(s_cache, page) * page
    rotary_dim = d if rotary == "interleaved" else d // 2
    rot = _rotary(rotary, capacity + seqlen_q, rotary_dim, dtype)
    kw = dict(cache_seqlens=_i32(cs), causal=causal, **rot)

    out_c, lse_c, out_ref, out_pt, _ = _check_kvcache(q, k_cache, v_cache, k, v, **kw)
    out_p, lse_p, _, _, _ = _check_kvcache(q, k_paged, v_paged, k, v, block_table=table, **kw)
    _assert_same_within_rounding(out_p, lse_p, out_c, lse_c, out_ref, out_pt, f"paged (page {page}) vs contiguous")


# ---------------------------------------------------------------------------------------------
# cache_batch_idx
# ---------------------------------------------------------------------------------------------

# id -> (cache batch size, cache_batch_idx); rows of the cache batch not selected hold NaN.
BATCH_IDX = {"perm": (3, [2, 0, 1]), "subset": (5, [3, 0, 4])}
SMALL_CASES = {"read": (1, 0, None), "append1": (1, 1, None), "append4_rot_il": (4, 4, "interleaved")}


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize("case", list(SMALL_CASES))
@pytest.mark.parametrize("idx_kind", list(BATCH_IDX))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_kvcache_batch_idx(dtype, idx_kind, case, causal, require_kernel):
    d = 128
    require_kernel(d, dtype)
    seqlen_q, seqlen_new, rotary = SMALL_CASES[case]
    batch_cache, idx = BATCH_IDX[idx_kind]
    nheads, nheads_k = 6, 2
    batch, s_cache = len(idx), 150
    cs = [s_cache - seqlen_new, 33, 0 if seqlen_new else 1]
    q = randn(batch, seqlen_q, nheads, d, dtype=dtype)
    k_cache = randn(batch_cache, s_cache, nheads_k, d, dtype=dtype)
    v_cache = randn(batch_cache, s_cache, nheads_k, d, dtype=dtype)
    unused = [r for r in range(batch_cache) if r not in idx]
    k_cache[unused] = NAN
    v_cache[unused] = NAN
    k, v = _new_kv(batch, seqlen_new, nheads_k, d, dtype)
    rot = _rotary(rotary, s_cache + seqlen_q, d, dtype)
    _check_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=_i32(cs), cache_batch_idx=_i32(idx),
                   causal=causal, **rot)


# ---------------------------------------------------------------------------------------------
# cache_leftpad
# ---------------------------------------------------------------------------------------------

LEFTPAD_CASES = {
    "read": (1, 0, None),
    "append1": (1, 1, None),
    "append4_rot_il": (4, 4, "interleaved"),
    "sq16_new3_rot_neox": (16, 3, "neox"),
}


@pytest.mark.parametrize("paged", [None, 48], ids=["contiguous", "paged48"])
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize("case", list(LEFTPAD_CASES))
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_kvcache_leftpad(dtype, d, case, causal, paged, require_kernel):
    """Keys [cache_leftpad, cache_seqlens + seqlen_new); the rows before cache_leftpad are NaN
    (never read). With new rows, one entry has cache_leftpad == cache_seqlens (only new keys).
    paged48: the same through 48-token pages (not a power of two; left padding off the 16-row
    page groups)."""
    require_kernel(d, dtype)
    seqlen_q, seqlen_new, rotary = LEFTPAD_CASES[case]
    nheads, nheads_k = 6, 2
    batch, s_cache = 4, 200
    cs = [s_cache - seqlen_new, 100, 40, 5]
    lp = [0, 37, 40 if seqlen_new else 39, 2]
    q = randn(batch, seqlen_q, nheads, d, dtype=dtype)
    k_cache = randn(batch, s_cache, nheads_k, d, dtype=dtype)
    v_cache = randn(batch, s_cache, nheads_k, d, dtype=dtype)
    for i in range(batch):
        k_cache[i, :lp[i]] = NAN
        v_cache[i, :lp[i]] = NAN
    k, v = _new_kv(batch, seqlen_new, nheads_k, d, dtype)
    rotary_dim = d if rotary == "interleaved" else 32
    capacity = num_pages(s_cache, paged) * paged if paged else s_cache  # rotary tables cover the whole cache
    rot = _rotary(rotary, capacity + seqlen_q, rotary_dim, dtype)
    kw = dict(cache_seqlens=_i32(cs), cache_leftpad=_i32(lp), causal=causal, **rot)
    if paged:
        k_cache, v_cache, kw["block_table"] = _paged_pair(k_cache, v_cache, paged)
    _check_kvcache(q, k_cache, v_cache, k, v, **kw)


# ---------------------------------------------------------------------------------------------
# Split-KV: num_splits 0 (heuristic) and 3 vs 1
# ---------------------------------------------------------------------------------------------

# id -> (seqlen_q, seqlen_new, seqlen_k of the longest entry, causal)
SPLIT_SHAPES = {
    "decode_read_1000": (1, 0, 1000, False),
    "decode_append_3000": (1, 1, 3000, False),
    "sq4_append_3000_causal": (4, 4, 3000, True),
}


@pytest.mark.parametrize("paged", [None, 64], ids=["contiguous", "paged64"])
@pytest.mark.parametrize("shape", list(SPLIT_SHAPES))
@pytest.mark.parametrize("layout", list(HEAD_LAYOUTS))
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_kvcache_split(dtype, d, layout, shape, paged, require_kernel):
    require_kernel(d, dtype)
    seqlen_q, seqlen_new, seqlen_k, causal = SPLIT_SHAPES[shape]
    nheads, nheads_k = HEAD_LAYOUTS[layout]
    batch, s_cache = 2, seqlen_k + 37
    cs = [seqlen_k - seqlen_new, seqlen_k // 2 + 7]
    q = randn(batch, seqlen_q, nheads, d, dtype=dtype)
    k_cache = randn(batch, s_cache, nheads_k, d, dtype=dtype)
    v_cache = randn(batch, s_cache, nheads_k, d, dtype=dtype)
    k, v = _new_kv(batch, seqlen_new, nheads_k, d, dtype)
    kw = dict(cache_seqlens=_i32(cs), causal=causal)
    if paged:
        k_cache, v_cache, table = _paged_pair(k_cache, v_cache, paged)
        kw["block_table"] = table
    results = {}
    for ns in (1, 0, 3):
        # Every call appends to the cache: run each on a fresh copy.
        results[ns] = _check_kvcache(q, k_cache.clone(), v_cache.clone(), k, v, num_splits=ns, **kw)
    out1, lse1, out_ref, out_pt, _ = results[1]
    for ns in (0, 3):
        out, lse = results[ns][:2]
        _assert_same_within_rounding(out, lse, out1, lse1, out_ref, out_pt, f"num_splits={ns} vs 1")


# ---------------------------------------------------------------------------------------------
# cache_seqlens edge cases: int, empty caches (0 keys), appending to an empty cache, filling the
# cache to its last row, a 128-row prefill through the cache. Rows past cache_seqlens +
# seqlen_new are NaN (never read).
# ---------------------------------------------------------------------------------------------

EDGE_S_CACHE = 140
EDGE_CASES = {
    "int_read": dict(seqlen_q=1, seqlen_new=0, cs=77),
    "int_append_rot": dict(seqlen_q=3, seqlen_new=3, cs=50, rotary="interleaved"),
    # Entries 0 and 3 have no key at all: output 0, lse +inf.
    "ragged_empty": dict(seqlen_q=4, seqlen_new=0, cs=[0, 5, 130, 0]),
    "append_to_empty": dict(seqlen_q=2, seqlen_new=2, cs=[0, 0, 64, 129]),
    "fill_to_end": dict(seqlen_q=5, seqlen_new=5, cs=[EDGE_S_CACHE - 5] * 4),
    "prefill_into_empty": dict(seqlen_q=128, seqlen_new=128, cs=[0, 0, 12, 1], rotary="neox"),
}


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize("case", list(EDGE_CASES))
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_kvcache_seqlens_edge(dtype, d, case, causal, require_kernel):
    require_kernel(d, dtype)
    c = EDGE_CASES[case]
    seqlen_q, seqlen_new, cs = c["seqlen_q"], c["seqlen_new"], c["cs"]
    nheads, nheads_k = 4, 2
    batch, s_cache = 4, EDGE_S_CACHE
    cs_list = [cs] * batch if isinstance(cs, int) else list(cs)
    q = randn(batch, seqlen_q, nheads, d, dtype=dtype)
    k_cache = randn(batch, s_cache, nheads_k, d, dtype=dtype)
    v_cache = randn(batch, s_cache, nheads_k, d, dtype=dtype)
    for i in range(batch):
        k_cache[i, cs_list[i] + seqlen_new:] = NAN
        v_cache[i, cs_list[i] + seqlen_new:] = NAN
    k, v = _new_kv(batch, seqlen_new, nheads_k, d, dtype)
    rot = _rotary(c.get("rotary"), s_cache + seqlen_q, d, dtype)
    # An int goes through the API as an int.
    cache_seqlens = cs if isinstance(cs, int) else _i32(cs)
    kw = dict(cache_seqlens=cache_seqlens, causal=causal, **rot)
    res = {}
    for ns in (1, 0):
        kc, vc = k_cache.clone(), v_cache.clone()
        res[ns] = _check_kvcache(q, kc, vc, k, v, num_splits=ns, **kw)
    _assert_same_within_rounding(res[0][0], res[0][1], res[1][0], res[1][1], res[1][2], res[1][3],
                                 "num_splits=0 vs 1")
    # return_softmax_lse=False returns the output tensor alone.
    kc, vc = k_cache.clone(), v_cache.clone()
    out = flash_attn.flash_attn_with_kvcache(q, kc, vc, k, v, num_splits=1, **kw)
    assert isinstance(out, torch.Tensor), type(out)
    assert torch.equal(out, res[1][0]), "return_softmax_lse=False changed the output"


# ---------------------------------------------------------------------------------------------
# Lengths 0, 1, capacity - 1 and capacity, every row past a length NaN: the decode kernels must
# neither read those rows nor let them reach O, on a contiguous, paged or left-padded cache.
# ---------------------------------------------------------------------------------------------

CAPACITY_LAYOUTS = {
    "contiguous": dict(page=None, leftpad=False),
    "paged16": dict(page=16, leftpad=False),
    "leftpad": dict(page=None, leftpad=True),
    "paged16_leftpad": dict(page=16, leftpad=True),
}
# Decode sub-blocks of 32 keys (16 at head dim 256): 33, a last one of one row; 96, whole ones;
# 100, a partial one at the capacity; 1000, several splits.
CAPACITIES = [33, 96, 100, 1000]


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize("seqlen_q", [1, 16])
@pytest.mark.parametrize("capacity", CAPACITIES)
@pytest.mark.parametrize("layout", list(CAPACITY_LAYOUTS))
@pytest.mark.parametrize("d", [128, 256])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_kvcache_lengths_to_capacity(dtype, d, layout, capacity, seqlen_q, causal, require_kernel):
    """cache_seqlens [0, 1, capacity - 1, capacity], every row past a length NaN (and every row
    before cache_leftpad), num_splits 1, 0 and 3 against the reference and each other."""
    require_kernel(d, dtype)
    page, leftpad = CAPACITY_LAYOUTS[layout]["page"], CAPACITY_LAYOUTS[layout]["leftpad"]
    if page:
        capacity = num_pages(capacity, page) * page  # a paged cache holds whole pages
    nheads, nheads_k = 6, 2
    cs = [0, 1, capacity - 1, capacity]
    lp = [0, 1, 5, 31] if leftpad else [0] * len(cs)
    batch = len(cs)
    q = randn(batch, seqlen_q, nheads, d, dtype=dtype)
    k_cache = randn(batch, capacity, nheads_k, d, dtype=dtype)
    v_cache = randn(batch, capacity, nheads_k, d, dtype=dtype)
    for i in range(batch):
        for cache in (k_cache, v_cache):
            cache[i, :lp[i]] = NAN
            cache[i, cs[i]:] = NAN
    kw = dict(cache_seqlens=_i32(cs), causal=causal)
    if leftpad:
        kw["cache_leftpad"] = _i32(lp)
    if page:
        k_cache, v_cache, kw["block_table"] = _paged_pair(k_cache, v_cache, page)
    res = {ns: _check_kvcache(q, k_cache, v_cache, num_splits=ns, **kw) for ns in (1, 0, 3)}
    out1, lse1, out_ref, out_pt, _ = res[1]
    for ns in (0, 3):
        _assert_same_within_rounding(res[ns][0], res[ns][1], out1, lse1, out_ref, out_pt, f"num_splits={ns} vs 1")


# ---------------------------------------------------------------------------------------------
# Window / softcap / alibi / softmax_scale
# ---------------------------------------------------------------------------------------------

FEATURES = {
    # A window puts q's rotary positions per row, as causal does.
    "win32_0_rot": dict(window_size=(32, 0), rotary="interleaved"),
    "win17_5": dict(window_size=(17, 5)),
    "win40_m1_rot_neox": dict(window_size=(40, -1), rotary="neox"),
    "softcap3": dict(softcap=3.0),
    "alibi_bh": dict(alibi="bh"),
    "scale": dict(softmax_scale=0.3),
}
FEATURE_SQ_NEW = [(1, 1), (4, 4), (64, 2)]


@pytest.mark.parametrize("paged", [None, 48], ids=["contiguous", "paged48"])
@pytest.mark.parametrize("seqlen_q,seqlen_new", FEATURE_SQ_NEW, ids=[f"sq{a}_new{b}" for a, b in FEATURE_SQ_NEW])
@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_kvcache_features(dtype, feature, seqlen_q, seqlen_new, paged, require_kernel):
    d = 128
    require_kernel(d, dtype)
    f = FEATURES[feature]
    nheads, nheads_k = 6, 2
    batch, s_cache = 3, 300
    cs = [s_cache - seqlen_new, 150, 0]
    q = randn(batch, seqlen_q, nheads, d, dtype=dtype)
    k_cache = randn(batch, s_cache, nheads_k, d, dtype=dtype)
    v_cache = randn(batch, s_cache, nheads_k, d, dtype=dtype)
    k, v = _new_kv(batch, seqlen_new, nheads_k, d, dtype)
    capacity = num_pages(s_cache, paged) * paged if paged else s_cache  # rotary tables cover the whole cache
    kw = dict(cache_seqlens=_i32(cs), window_size=f.get("window_size", (-1, -1)),
              softcap=f.get("softcap", 0.0), **_rotary(f.get("rotary"), capacity + seqlen_q, 64, dtype))
    if "alibi" in f:
        kw["alibi_slopes"] = make_alibi_slopes(f["alibi"], batch, nheads, DEVICE)
    if "softmax_scale" in f:
        kw["softmax_scale"] = f["softmax_scale"]
    if paged:  # windows with paging: the decode kernel fetches page entries after the lengths
        k_cache, v_cache, kw["block_table"] = _paged_pair(k_cache, v_cache, paged)
    _check_kvcache(q, k_cache, v_cache, k, v, **kw)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_kvcache_strided_last_dim(dtype, require_kernel):
    """q and the new k / v with a strided head dim are copied by the dispatcher (as upstream's
    maybe_contiguous): the same bits as contiguous inputs."""
    d = 128
    require_kernel(d, dtype)
    batch, nheads, nheads_k, s_cache, s_new = 3, 6, 2, 300, 2
    k_cache = randn(batch, s_cache, nheads_k, d, dtype=dtype)
    v_cache = randn(batch, s_cache, nheads_k, d, dtype=dtype)
    seqlens = torch.tensor([5, 100, 250], dtype=torch.int32, device=DEVICE)
    wide = [randn(batch, n, h, 2 * d, dtype=dtype) for n, h in ((1, nheads), (s_new, nheads_k), (s_new, nheads_k))]
    q_s, k_s, v_s = [x[..., ::2] for x in wide]
    assert q_s.stride(-1) == 2
    kc1, vc1 = k_cache.clone(), v_cache.clone()
    out_s = flash_attn.flash_attn_with_kvcache(q_s, kc1, vc1, k_s, v_s, cache_seqlens=seqlens)
    kc2, vc2 = k_cache.clone(), v_cache.clone()
    out_c = flash_attn.flash_attn_with_kvcache(q_s.contiguous(), kc2, vc2, k_s.contiguous(), v_s.contiguous(),
                                               cache_seqlens=seqlens)
    assert torch.equal(out_s, out_c)
    assert torch.equal(kc1, kc2) and torch.equal(vc1, vc2)
