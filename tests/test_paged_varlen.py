"""GPU tests of flash_attn_varlen_func with a paged KV cache (block_table).

k / v are (num_blocks, page_block_size, nheads_k, d); key row j of sequence i is
k[block_table[i, j // page_block_size], j % page_block_size], and sequence i has
cu_seqlens_k[i + 1] - cu_seqlens_k[i] keys. The result must equal the same call on the packed
contiguous K / V within rounding (max|paged - contiguous| <= 2 * max|out_pt - ref| + 1e-5, lse
within 2e-4), and both must pass the usual bound against the float32 reference.

The block tables are shuffled, the pool has more blocks than needed (the spare ones are NaN), and
the rows of every sequence's pages past its length are NaN: none of them may be read.
"""

import pytest
import torch

from helpers import (
    DEVICE,
    _check_poisoned,
    _poisoned_out,
    assert_empty_rows_zero,
    assert_lse_close,
    assert_out_close,
    flash_attn,
    flash_attn_gpu,
    max_abs_diff,
    requires_gpu,
)
from kvcache_reference import assert_bitwise_equal, num_pages, paged_from_contiguous
from reference import attention_ref, lengths_to_mask, pack, pack_lse

pytestmark = requires_gpu

DTYPES = [torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp16", "bf16"]
HEAD_LAYOUTS = {"mha": (6, 6), "gqa": (6, 2)}
PAGES = [16, 48, 64, 256]  # 48: a page size that is not a power of two
SPLIT_LSE_ATOL = 2e-4
NAN = float("nan")

# mode -> (q lengths, k lengths). "decode": max_seqlen_q == 1 (the split-KV path);
# "ragged": seqlen_q > 1, with a sequence without keys (output 0, lse +inf) and one without queries.
MODES = {
    "decode": ([1, 1, 1, 1, 1], [1, 300, 1000, 77, 513]),
    "ragged": ([37, 1, 128, 5, 0, 64], [200, 1, 513, 0, 64, 1000]),
}


def _make_inputs(q_lens, k_lens, nheads, nheads_k, d, dtype, page):
    batch = len(q_lens)
    max_sq, max_sk = max(1, max(q_lens)), max(1, max(k_lens))
    capacity = num_pages(max_sk, page) * page
    q = torch.randn(batch, max_sq, nheads, d, device=DEVICE, dtype=dtype)
    k_full = torch.randn(batch, capacity, nheads_k, d, device=DEVICE, dtype=dtype)
    v_full = torch.randn(batch, capacity, nheads_k, d, device=DEVICE, dtype=dtype)
    kmask_full = lengths_to_mask(torch.tensor(k_lens), capacity).to(DEVICE)
    k_full[~kmask_full] = NAN  # rows past each sequence's end: never read
    v_full[~kmask_full] = NAN
    k_paged, table = paged_from_contiguous(k_full, page, fill=NAN)
    v_paged, _ = paged_from_contiguous(v_full, page, block_table=table, num_blocks=k_paged.shape[0], fill=NAN)

    qmask = lengths_to_mask(torch.tensor(q_lens), max_sq).to(DEVICE)
    kmask = kmask_full[:, :max_sk]
    # Reference inputs: padded, zeros (not NaN) past the ends.
    k_ref = torch.where(kmask[..., None, None], k_full[:, :max_sk], torch.zeros((), dtype=dtype, device=DEVICE))
    v_ref = torch.where(kmask[..., None, None], v_full[:, :max_sk], torch.zeros((), dtype=dtype, device=DEVICE))
    q_u, cu_q, _, _ = pack(q, qmask)
    k_u, cu_k, _, _ = pack(k_ref, kmask)
    v_u, _, _, _ = pack(v_ref, kmask)
    return dict(q=q, k_ref=k_ref, v_ref=v_ref, qmask=qmask, kmask=kmask, q_u=q_u, k_u=k_u, v_u=v_u,
                cu_q=cu_q, cu_k=cu_k, max_sq=max(q_lens), max_sk=max(k_lens),
                k_paged=k_paged, v_paged=v_paged, table=table)


def _ext_paged(t, causal, num_splits):
    """flash_attn_gpu.varlen_fwd with the block table and a NaN-poisoned preallocated out."""
    q = t["q_u"]
    out, canary = _poisoned_out(q.shape, q.dtype, q.device)
    res = flash_attn_gpu.varlen_fwd(
        q, t["k_paged"], t["v_paged"], out, t["cu_q"], t["cu_k"], None, None, t["table"], None,
        int(t["max_sq"]), int(t["max_sk"]), 0.0, float(q.shape[-1] ** -0.5), False, bool(causal),
        -1, -1, 0.0, False, None, int(num_splits),
    )
    _check_poisoned(res[0], out, canary)
    return out, res[1]


def _same_within_rounding(out_a, lse_a, out_b, lse_b, out_ref, out_pt, what):
    err_pt = max_abs_diff(out_pt, out_ref)
    diff = max_abs_diff(out_a, out_b)
    assert diff <= 2 * err_pt + 1e-5, f"{what}: max|a - b| = {diff:.3e} > 2 * pt err ({err_pt:.3e}) + 1e-5"
    fin = torch.isfinite(lse_b)
    assert torch.equal(torch.isfinite(lse_a), fin), f"{what}: lse finite in one and not the other"
    if fin.any():
        dl = (lse_a[fin] - lse_b[fin]).abs().max().item()
        assert dl <= SPLIT_LSE_ATOL, f"{what}: max|lse_a - lse_b| = {dl:.3e}"


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("layout", list(HEAD_LAYOUTS))
@pytest.mark.parametrize("page", PAGES)
@pytest.mark.parametrize("d", [128, 64])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_paged_varlen(dtype, d, page, layout, mode, causal, require_kernel):
    require_kernel(d, dtype)
    nheads, nheads_k = HEAD_LAYOUTS[layout]
    q_lens, k_lens = MODES[mode]
    t = _make_inputs(q_lens, k_lens, nheads, nheads_k, d, dtype, page)
    k_paged0, v_paged0 = t["k_paged"].clone(), t["v_paged"].clone()

    out_ref, lse_ref = attention_ref(t["q"], t["k_ref"], t["v_ref"], t["qmask"], t["kmask"], causal=causal)
    out_pt, _ = attention_ref(t["q"], t["k_ref"], t["v_ref"], t["qmask"], t["kmask"], causal=causal, upcast=False)
    out_ref, out_pt = pack(out_ref, t["qmask"])[0], pack(out_pt, t["qmask"])[0]
    lse_ref = pack_lse(lse_ref, t["qmask"])
    empty_rows = torch.isposinf(lse_ref).transpose(0, 1)  # (total_q, nheads)
    if mode == "ragged":
        assert empty_rows.any(), "the ragged mode is meant to contain a sequence without keys"

    args = (t["cu_q"], t["cu_k"], t["max_sq"], t["max_sk"])
    splits = (1, 0) if mode == "decode" else (0,)
    results = {}
    for ns in splits:
        out_c, lse_c, _ = flash_attn.flash_attn_varlen_func(
            t["q_u"], t["k_u"], t["v_u"], *args, causal=causal, num_splits=ns, return_attn_probs=True)
        out_p, lse_p, _ = flash_attn.flash_attn_varlen_func(
            t["q_u"], t["k_paged"], t["v_paged"], *args, causal=causal, block_table=t["table"],
            num_splits=ns, return_attn_probs=True)
        assert out_p.shape == t["q_u"].shape and out_p.dtype == dtype
        assert lse_p.shape == (nheads, t["q_u"].shape[0]) and lse_p.dtype == torch.float32
        for name, o, lse in (("contiguous", out_c, lse_c), ("paged", out_p, lse_p)):
            assert_out_close(o, out_ref, out_pt, name=f"out ({name}, num_splits={ns})")
            assert_empty_rows_zero(o, empty_rows)
            assert_lse_close(lse, lse_ref)
        _same_within_rounding(out_p, lse_p, out_c, lse_c, out_ref, out_pt,
                              f"paged (page {page}) vs contiguous, num_splits={ns}")

        out_e, lse_e = _ext_paged(t, causal, ns)
        assert_out_close(out_e, out_ref, out_pt, name=f"out (varlen_fwd paged, preallocated, num_splits={ns})")
        assert_empty_rows_zero(out_e, empty_rows)
        assert_lse_close(lse_e, lse_ref)
        results[ns] = (out_p, lse_p)

    if mode == "decode":
        _same_within_rounding(results[0][0], results[0][1], results[1][0], results[1][1], out_ref,
                              out_pt, "paged num_splits=0 vs 1")
    # The paged K / V are only read.
    assert_bitwise_equal(t["k_paged"], k_paged0, "k (paged) must not be modified")
    assert_bitwise_equal(t["v_paged"], v_paged0, "v (paged) must not be modified")
