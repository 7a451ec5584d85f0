"""GPU tests of the last-wave split (heuristics.h last_wave_pieces): a single-split decode grid
whose last wave would be at most half full runs the tiles of that wave in pieces merged by the
combine kernel, the other tiles whole (flagged so the combine leaves them alone). Checked against
the fp32 reference and the unsplit kernel, with ragged and empty sequences, seqused_k, windows,
softcap, the kv-cache API (contiguous and paged) and bitwise repeats.

Rule as elsewhere: max|out - ref| <= 2 * max|out_pt - ref| + 1e-5.
"""

import pytest
import torch

from helpers import (
    DEVICE,
    assert_empty_rows_zero,
    assert_lse_close,
    assert_out_close,
    ext_varlen_fwd,
    flash_attn,
    flash_attn_gpu,
    max_abs_diff,
    requires_gpu,
)
from reference import attention_ref, lengths_to_mask, pack, pack_lse

pytestmark = requires_gpu

DTYPES = [torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp16", "bf16"]
# Lengths cycle through: 1 key, fewer than a sub-block, not multiples of a round, an empty
# sequence, and long ones.
CYCLE = [1, 7, 300, 0, 1000, 129, 4097, 63]


def _sms():
    return torch.cuda.get_device_properties(0).multi_processor_count


def _planned(batch, nheads, nheads_k, max_sk, d, **kw):
    return flash_attn_gpu.tail_tiles_planned(batch, nheads, nheads_k, 1, max_sk, d, _sms(), 0, **kw) > 0


def _tail_batch(nheads, nheads_k, max_sk, d):
    """The smallest batch (>= 8, so every CYCLE length occurs) whose last wave is split."""
    for batch in range(8, 4096):
        if _planned(batch, nheads, nheads_k, max_sk, d):
            return batch
    raise AssertionError("no batch plans a last-wave split")


def _inputs(k_lens, nheads, nheads_k, d, dtype):
    batch, max_sk = len(k_lens), max(k_lens)
    q = torch.randn(batch, 1, nheads, d, device=DEVICE, dtype=dtype)
    k = torch.randn(batch, max_sk, nheads_k, d, device=DEVICE, dtype=dtype)
    v = torch.randn(batch, max_sk, nheads_k, d, device=DEVICE, dtype=dtype)
    qmask = torch.ones(batch, 1, dtype=torch.bool, device=DEVICE)
    kmask = lengths_to_mask(torch.tensor(k_lens), max_sk).to(DEVICE)
    q_u, cu_q, _, _ = pack(q, qmask)
    k_u, cu_k, _, _ = pack(k, kmask)
    v_u, _, _, _ = pack(v, kmask)
    return q, k, v, qmask, kmask, q_u, k_u, v_u, cu_q, cu_k, max_sk


# (heads, kv heads): tiles per sequence after the GQA swap = kv heads.
LAYOUTS = {"mha": (12, 12), "gqa": (32, 8), "mqa": (8, 1)}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_tail_split_varlen_decode(dtype, d, layout, require_kernel):
    require_kernel(d, dtype)
    nheads, nheads_k = LAYOUTS[layout]
    batch = _tail_batch(nheads, nheads_k, max(CYCLE), d)
    k_lens = [CYCLE[i % len(CYCLE)] for i in range(batch)]
    q, k, v, qmask, kmask, q_u, k_u, v_u, cu_q, cu_k, max_sk = _inputs(k_lens, nheads, nheads_k, d, dtype)
    out_ref, lse_ref = attention_ref(q, k, v, qmask, kmask)
    out_pt, _ = attention_ref(q, k, v, qmask, kmask, upcast=False)
    out_ref, out_pt = pack(out_ref, qmask)[0], pack(out_pt, qmask)[0]
    lse_ref = pack_lse(lse_ref, qmask)

    out, lse = ext_varlen_fwd(q_u, k_u, v_u, cu_q, cu_k, 1, max_sk, num_splits=0)
    assert_out_close(out, out_ref, out_pt)
    assert_lse_close(lse, lse_ref)
    assert_empty_rows_zero(out, torch.isposinf(lse_ref).transpose(0, 1))  # the empty sequences
    out_unsplit = flash_attn.flash_attn_varlen_func(q_u, k_u, v_u, cu_q, cu_k, 1, max_sk, num_splits=1)
    err_pt = max_abs_diff(out_pt, out_ref)
    assert max_abs_diff(out, out_unsplit) <= 2 * err_pt + 1e-5
    # The same bits on every call.
    for _ in range(2):
        again, lse_again = ext_varlen_fwd(q_u, k_u, v_u, cu_q, cu_k, 1, max_sk, num_splits=0)
        assert torch.equal(again, out) and torch.equal(lse_again, lse)


@pytest.mark.parametrize("case", ["seqused_k", "window", "causal", "softcap"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_tail_split_varlen_decode_masks(dtype, case, require_kernel):
    """seqused_k (keys past it are NaN and must not be read), a local window, causal and softcap
    (the score-modifier kernel) with a split last wave; without the GQA swap (window) tiles are
    query heads."""
    d = 128
    require_kernel(d, dtype)
    nheads, nheads_k = 16, 4
    batch = _tail_batch(nheads, nheads if case == "window" else nheads_k, max(CYCLE) + 5, d)
    k_lens = [CYCLE[i % len(CYCLE)] + 5 for i in range(batch)]
    q, k, v, qmask, kmask, q_u, k_u, v_u, cu_q, cu_k, max_sk = _inputs(k_lens, nheads, nheads_k, d, dtype)
    kw, used_t, mask = {}, None, kmask
    if case == "seqused_k":
        used = [max(0, n - (i % 3) * 40) for i, n in enumerate(k_lens)]
        cu = cu_k.tolist()
        k_u, v_u = k_u.clone(), v_u.clone()
        for b in range(batch):
            k_u[cu[b] + used[b]: cu[b + 1]] = float("nan")
            v_u[cu[b] + used[b]: cu[b + 1]] = float("nan")
        used_t = torch.tensor(used, dtype=torch.int32, device=DEVICE)
        mask = lengths_to_mask(torch.tensor(used), max_sk).to(DEVICE)
    elif case == "window":
        kw["window_size"] = (200, 0)
    elif case == "softcap":
        kw["softcap"] = 3.0
    else:
        kw["causal"] = True
    ref_kw = {k_: v_ for k_, v_ in kw.items()}
    out_ref, lse_ref = attention_ref(q, k, v, qmask, mask, **ref_kw)
    out_pt, _ = attention_ref(q, k, v, qmask, mask, upcast=False, **ref_kw)
    out_ref, out_pt = pack(out_ref, qmask)[0], pack(out_pt, qmask)[0]
    lse_ref = pack_lse(lse_ref, qmask)
    out, lse = ext_varlen_fwd(q_u, k_u, v_u, cu_q, cu_k, 1, max_sk, seqused_k=used_t, num_splits=0, **kw)
    assert_out_close(out, out_ref, out_pt)
    assert_lse_close(lse, lse_ref)
    assert_empty_rows_zero(out, torch.isposinf(lse_ref).transpose(0, 1))


@pytest.mark.parametrize("page", [None, 16, 48], ids=["contiguous", "paged16", "paged48"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_tail_split_kvcache(dtype, page, require_kernel):
    """flash_attn_with_kvcache with a split last wave: ragged cache_seqlens, one new key appended,
    then the same cache paged (the paged-only kernel) with a shuffled block table."""
    d = 128
    require_kernel(d, dtype)
    nheads, nheads_k = 12, 12
    cache_len = 1104
    batch = _tail_batch(nheads, nheads_k, cache_len, d)
    lens = [min(cache_len - 1, CYCLE[i % len(CYCLE)]) for i in range(batch)]
    q = torch.randn(batch, 1, nheads, d, device=DEVICE, dtype=dtype)
    k_new = torch.randn(batch, 1, nheads_k, d, device=DEVICE, dtype=dtype)
    v_new = torch.randn(batch, 1, nheads_k, d, device=DEVICE, dtype=dtype)
    k_cache = torch.randn(batch, cache_len, nheads_k, d, device=DEVICE, dtype=dtype)
    v_cache = torch.randn(batch, cache_len, nheads_k, d, device=DEVICE, dtype=dtype)
    seqlens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    kc, vc = k_cache.clone(), v_cache.clone()
    out = flash_attn.flash_attn_with_kvcache(q, kc, vc, k_new, v_new, cache_seqlens=seqlens)
    # Reference on the cache after the append.
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    for b, n in enumerate(lens):
        k_ref[b, n], v_ref[b, n] = k_new[b, 0], v_new[b, 0]
    total = [n + 1 for n in lens]
    qmask = torch.ones(batch, 1, dtype=torch.bool, device=DEVICE)
    kmask = lengths_to_mask(torch.tensor(total), cache_len).to(DEVICE)
    out_ref, _ = attention_ref(q, k_ref, v_ref, qmask, kmask)
    out_pt, _ = attention_ref(q, k_ref, v_ref, qmask, kmask, upcast=False)
    assert_out_close(out, out_ref, out_pt)
    assert torch.equal(kc, k_ref) and torch.equal(vc, v_ref)
    if page is not None:
        blocks_per_seq = cache_len // page
        perm = torch.randperm(batch * blocks_per_seq, device=DEVICE)
        table = perm.view(batch, blocks_per_seq).to(torch.int32)
        k_pages = torch.empty(batch * blocks_per_seq, page, nheads_k, d, device=DEVICE, dtype=dtype)
        v_pages = torch.empty_like(k_pages)
        k_pages[perm] = k_cache.view(batch * blocks_per_seq, page, nheads_k, d)
        v_pages[perm] = v_cache.view(batch * blocks_per_seq, page, nheads_k, d)
        out_p = flash_attn.flash_attn_with_kvcache(q, k_pages, v_pages, k_new, v_new, cache_seqlens=seqlens,
                                                   block_table=table)
        assert_out_close(out_p, out_ref, out_pt, name="out (paged)")
        assert max_abs_diff(out_p, out) <= 2 * max_abs_diff(out_pt, out_ref) + 1e-5
