"""GPU tests of a GQA group's query heads packed, with a few queries each, into the rows of one tile
(the plan's pack_groups: 1 < seqlen_q, heads per kv head x seqlen_q <= 16 rows in the decode kernel,
or past 16 the largest part of the group whose rows fit it, else <= 64 in the split kernel;
batch-strided queries, no ALiBi and no left window edge). The mask then
compares keys with each row's query position, and out and softmax_lse go back to the caller's
(batch, seqlen_q, heads) layout.

Rule as in test_split_kv: max|out - ref| <= 2 * max|out_pt - ref| + 1e-5 against the fp32 reference,
and the packed result (num_splits 0 or n > 1) against the unpacked one (num_splits=1: upstream's
unsplit kernel, which never packs) within the same bound.
"""

import pytest
import torch

from helpers import (
    DEVICE, assert_lse_close, assert_out_close, ext_fwd, flash_attn, max_abs_diff, randn, requires_gpu
)
from reference import attention_ref, lengths_to_mask

pytestmark = requires_gpu

DTYPES = [torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp16", "bf16"]
# (heads, kv heads, seqlen_q): 8, 16, 9, 15 and 16 packed rows (decode kernel) of the whole group
# (4, 4, 3, 5 and 8 heads per kv head); 16 and 10 rows (decode kernel) of two heads of a group of 4
# and of 8; 64 and 27 rows (split kernel) of the whole group of 4 and of 3.
SHAPES = {"32-8-q2": (32, 8, 2), "32-8-q4": (32, 8, 4), "12-4-q3": (12, 4, 3), "15-3-q5": (15, 3, 5),
          "16-2-q2": (16, 2, 2), "32-8-q8": (32, 8, 8), "16-2-q5": (16, 2, 5), "32-8-q16": (32, 8, 16),
          "12-4-q9": (12, 4, 9)}
FEATURES = {
    "none": dict(),
    "causal": dict(causal=True),
    "right3": dict(window_size=(-1, 3)),
    "causal_softcap": dict(causal=True, softcap=30.0),
}
# 1 and 3: fewer keys than queries (under the causal mask some rows see no key); 63, 1000, 4097: not
# multiples of the key block.
SEQLENS_K = [1, 3, 63, 1000, 4097]


def _check(out, lse, out_unsplit, out_ref, out_pt, lse_ref, lse_pt, softcap, name):
    assert_out_close(out, out_ref, out_pt, name=name)
    err_pt = max_abs_diff(out_pt, out_ref)
    diff = max_abs_diff(out, out_unsplit)
    assert diff <= 2 * err_pt + 1e-5, f"{name}: max|packed - unpacked| = {diff:.3e} > 2 * pt err ({err_pt:.3e}) + 1e-5"
    assert_lse_close(lse, lse_ref, lse_pt, pt_factor=2.0 if softcap > 0 else 0.0)


@pytest.mark.parametrize("num_splits", [0, 3])
@pytest.mark.parametrize("seqlen_k", SEQLENS_K)
@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_packed_gqa_matches_reference(dtype, d, shape, feature, seqlen_k, num_splits, require_kernel):
    """flash_attn_func, and the extension with a NaN-poisoned out: every row written, in the caller's layout."""
    require_kernel(d, dtype)
    nheads, nheads_k, seqlen_q = SHAPES[shape]
    kw = dict(FEATURES[feature])
    # The reference sees the window as upstream's argument normalisation leaves it: an edge
    # >= seqlen_k is no edge (window (-1, 3) over 1 or 3 keys is no window at all).
    ref_kw = dict(kw)
    if "window_size" in kw:
        ref_kw["window_size"] = tuple(-1 if w >= seqlen_k else w for w in kw["window_size"])
    batch = 3
    q = randn(batch, seqlen_q, nheads, d, dtype=dtype)
    k = randn(batch, seqlen_k, nheads_k, d, dtype=dtype)
    v = randn(batch, seqlen_k, nheads_k, d, dtype=dtype)
    out_ref, lse_ref = attention_ref(q, k, v, **ref_kw)
    out_pt, lse_pt = attention_ref(q, k, v, upcast=False, **ref_kw)
    out_unsplit = flash_attn.flash_attn_func(q, k, v, num_splits=1, **kw)
    assert_out_close(out_unsplit, out_ref, out_pt, name="out (num_splits=1)")

    softcap = kw.get("softcap", 0.0)
    out, lse, _ = flash_attn.flash_attn_func(q, k, v, num_splits=num_splits, return_attn_probs=True, **kw)
    assert lse.shape == (batch, nheads, seqlen_q)
    _check(out, lse, out_unsplit, out_ref, out_pt, lse_ref, lse_pt, softcap, f"out (num_splits={num_splits})")
    out2, lse2 = ext_fwd(q, k, v, num_splits=num_splits, **kw)
    _check(out2, lse2, out_unsplit, out_ref, out_pt, lse_ref, lse_pt, softcap, f"ext out (num_splits={num_splits})")


@pytest.mark.parametrize("paged", [None, 64], ids=["contiguous", "paged64"])
@pytest.mark.parametrize("num_splits", [0, 1, 4])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_packed_gqa_kvcache(dtype, shape, num_splits, paged, require_kernel):
    """flash_attn_with_kvcache, causal, over ragged cache lengths (0 and 1 included) with appended keys."""
    d = 128
    require_kernel(d, dtype)
    nheads, nheads_k, seqlen_q = SHAPES[shape]
    cache_lens = [0, 1, 700, 3001]
    batch, capacity = len(cache_lens), 3072 + seqlen_q
    q = randn(batch, seqlen_q, nheads, d, dtype=dtype)
    k_new = randn(batch, seqlen_q, nheads_k, d, dtype=dtype)
    v_new = randn(batch, seqlen_q, nheads_k, d, dtype=dtype)
    k_full = randn(batch, capacity, nheads_k, d, dtype=dtype)
    v_full = randn(batch, capacity, nheads_k, d, dtype=dtype)
    lens = torch.tensor(cache_lens, dtype=torch.int32, device=DEVICE)
    if paged:
        pages_per_seq = capacity // paged + 1
        perm = torch.randperm(batch * pages_per_seq, device=DEVICE).to(torch.int32)
        block_table = perm.view(batch, pages_per_seq)
        k_cache = torch.zeros(batch * pages_per_seq, paged, nheads_k, d, dtype=dtype, device=DEVICE)
        v_cache = torch.zeros_like(k_cache)
        padded = pages_per_seq * paged
        k_pad = torch.nn.functional.pad(k_full, (0, 0, 0, 0, 0, padded - capacity))
        v_pad = torch.nn.functional.pad(v_full, (0, 0, 0, 0, 0, padded - capacity))
        k_cache[block_table.flatten().long()] = k_pad.view(batch * pages_per_seq, paged, nheads_k, d)
        v_cache[block_table.flatten().long()] = v_pad.view(batch * pages_per_seq, paged, nheads_k, d)
    else:
        block_table = None
        k_cache, v_cache = k_full.clone(), v_full.clone()
    out = flash_attn.flash_attn_with_kvcache(q, k_cache, v_cache, k=k_new, v=v_new, cache_seqlens=lens,
                                             block_table=block_table, causal=True, num_splits=num_splits)
    # The reference: the cache with the new keys written at each sequence's end.
    k_ref, v_ref = k_full.clone(), v_full.clone()
    for b, n in enumerate(cache_lens):
        k_ref[b, n:n + seqlen_q], v_ref[b, n:n + seqlen_q] = k_new[b], v_new[b]
    kmask = lengths_to_mask(torch.tensor(cache_lens) + seqlen_q, capacity).to(DEVICE)
    out_ref, _ = attention_ref(q, k_ref, v_ref, key_padding_mask=kmask, causal=True)
    out_pt, _ = attention_ref(q, k_ref, v_ref, key_padding_mask=kmask, causal=True, upcast=False)
    assert_out_close(out, out_ref, out_pt, name=f"kvcache out (num_splits={num_splits})")
