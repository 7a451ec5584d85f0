"""GPU tests of split-KV decoding (seqlen_q == 1): every num_splits value must give the same
result as the unsplit kernel within rounding, and both must match the fp32 reference.

Rule: max|out - ref| <= 2 * max|out_pt - ref| + 1e-5 (out_pt: PyTorch in the input dtype), and
max|out_split - out_unsplit| <= 2 * max|out_pt - ref| + 1e-5. num_splits: 0 = heuristic,
1 = never split, n > 1 = n splits (clamped to the number of key blocks, e.g. 200).
"""

import pytest
import torch

from helpers import (
    DEVICE, assert_empty_rows_zero, assert_lse_close, assert_out_close, ext_fwd, ext_varlen_fwd, flash_attn,
    lse_checkable, max_abs_diff, randn, requires_gpu
)
from reference import attention_ref, lengths_to_mask, make_alibi_slopes, pack, pack_lse

pytestmark = requires_gpu

DTYPES = [torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp16", "bf16"]
HEADDIMS = [32, 64, 96, 128, 192, 256]
HEAD_LAYOUTS = {"mha": (12, 12), "gqa": (32, 8), "mqa": (8, 1)}
NUM_SPLITS = [0, 1, 2, 3, 7, 200]
# 1 and 7: fewer keys than one key block; 63/129/1000/4097: not multiples of the block size.
SEQLENS_K = [1, 7, 63, 129, 1000, 4097]


def _check_split(out, out_unsplit, out_ref, out_pt, num_splits):
    assert_out_close(out, out_ref, out_pt, name=f"out (num_splits={num_splits})")
    err_pt = max_abs_diff(out_pt, out_ref)
    diff = max_abs_diff(out, out_unsplit)
    assert diff <= 2 * err_pt + 1e-5, (
        f"num_splits={num_splits}: max|split - unsplit| = {diff:.3e} > 2 * pt err ({err_pt:.3e}) + 1e-5"
    )


@pytest.mark.parametrize("num_splits", NUM_SPLITS)
@pytest.mark.parametrize("seqlen_k", SEQLENS_K)
@pytest.mark.parametrize("layout", list(HEAD_LAYOUTS))
@pytest.mark.parametrize("d", HEADDIMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_split_kv_decode(dtype, d, layout, seqlen_k, num_splits, require_kernel):
    """flash_attn_func with seqlen_q == 1, and the extension with a NaN-poisoned out."""
    require_kernel(d, dtype)
    nheads, nheads_k = HEAD_LAYOUTS[layout]
    batch = 3
    q = randn(batch, 1, nheads, d, dtype=dtype)
    k = randn(batch, seqlen_k, nheads_k, d, dtype=dtype)
    v = randn(batch, seqlen_k, nheads_k, d, dtype=dtype)
    out_ref, lse_ref = attention_ref(q, k, v)
    out_pt, _ = attention_ref(q, k, v, upcast=False)

    out_unsplit = flash_attn.flash_attn_func(q, k, v, num_splits=1)
    assert_out_close(out_unsplit, out_ref, out_pt, name="out (num_splits=1)")

    out, lse, _ = flash_attn.flash_attn_func(q, k, v, num_splits=num_splits, return_attn_probs=True)
    assert out.shape == q.shape and lse.shape == (batch, nheads, 1)
    _check_split(out, out_unsplit, out_ref, out_pt, num_splits)
    assert_lse_close(lse, lse_ref)

    out2, lse2 = ext_fwd(q, k, v, num_splits=num_splits)
    assert lse2.shape == (batch, nheads, 1)
    _check_split(out2, out_unsplit, out_ref, out_pt, num_splits)
    assert_lse_close(lse2, lse_ref)


@pytest.mark.parametrize("num_splits", [0, 1, 3])
@pytest.mark.parametrize("seqlen_k", [129, 1000])
@pytest.mark.parametrize("layout", list(HEAD_LAYOUTS))
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_split_kv_decode_causal(dtype, d, layout, seqlen_k, num_splits, require_kernel):
    """causal=True with one query attends every key (bottom-right alignment)."""
    require_kernel(d, dtype)
    nheads, nheads_k = HEAD_LAYOUTS[layout]
    batch = 2
    q = randn(batch, 1, nheads, d, dtype=dtype)
    k = randn(batch, seqlen_k, nheads_k, d, dtype=dtype)
    v = randn(batch, seqlen_k, nheads_k, d, dtype=dtype)
    out_ref, lse_ref = attention_ref(q, k, v)  # no mask: the single query sees every key
    out_ref_c, _ = attention_ref(q, k, v, causal=True)
    assert torch.equal(out_ref, out_ref_c)
    out_pt, _ = attention_ref(q, k, v, upcast=False)
    out_unsplit = flash_attn.flash_attn_func(q, k, v, causal=False, num_splits=1)
    out, lse, _ = flash_attn.flash_attn_func(q, k, v, causal=True, num_splits=num_splits,
                                             return_attn_probs=True)
    _check_split(out, out_unsplit, out_ref, out_pt, num_splits)
    assert_lse_close(lse, lse_ref)
    out2, lse2 = ext_fwd(q, k, v, causal=True, num_splits=num_splits)
    _check_split(out2, out_unsplit, out_ref, out_pt, num_splits)
    assert_lse_close(lse2, lse_ref)


# ---------------------------------------------------------------------------------------------
# Split with window / softcap / alibi: the split kernel and the combine must carry them.
# ---------------------------------------------------------------------------------------------

FEATURES = {
    "win32_0": dict(window_size=(32, 0)),  # most splits see no key at all
    "win17_5": dict(window_size=(17, 5)),
    "win700_0": dict(window_size=(700, 0)),  # window spanning several splits
    "softcap30": dict(softcap=30.0),
    "softcap3": dict(softcap=3.0),
    "alibi_h": dict(alibi="h"),
    "alibi_bh": dict(alibi="bh"),
    "win_softcap_alibi": dict(window_size=(300, 0), softcap=3.0, alibi="bh"),
}


@pytest.mark.parametrize("num_splits", [0, 5])  # num_splits=1 runs in every case too
@pytest.mark.parametrize("seqlen_k", [129, 4097])
@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("layout", list(HEAD_LAYOUTS))
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_split_kv_features(dtype, d, layout, feature, seqlen_k, num_splits, require_kernel):
    require_kernel(d, dtype)
    nheads, nheads_k = HEAD_LAYOUTS[layout]
    batch = 2
    f = dict(FEATURES[feature])
    kw = dict(
        window_size=f.get("window_size", (-1, -1)),
        softcap=f.get("softcap", 0.0),
        alibi_slopes=make_alibi_slopes(f.get("alibi"), batch, nheads, DEVICE),
    )
    q = randn(batch, 1, nheads, d, dtype=dtype)
    k = randn(batch, seqlen_k, nheads_k, d, dtype=dtype)
    v = randn(batch, seqlen_k, nheads_k, d, dtype=dtype)
    out_ref, lse_ref = attention_ref(q, k, v, **kw)
    out_pt, lse_pt = attention_ref(q, k, v, upcast=False, **kw)
    pt_factor = 2.0 if kw["softcap"] > 0 else 0.0
    check_lse = lse_checkable(kw["alibi_slopes"], False, kw["window_size"], seqlen_k)

    out_unsplit = flash_attn.flash_attn_func(q, k, v, num_splits=1, **kw)
    assert_out_close(out_unsplit, out_ref, out_pt, name="out (num_splits=1)")
    out, lse, _ = flash_attn.flash_attn_func(q, k, v, num_splits=num_splits, return_attn_probs=True, **kw)
    _check_split(out, out_unsplit, out_ref, out_pt, num_splits)
    if check_lse:
        assert_lse_close(lse, lse_ref, lse_pt, pt_factor=pt_factor)
    out2, lse2 = ext_fwd(q, k, v, num_splits=num_splits, **kw)
    _check_split(out2, out_unsplit, out_ref, out_pt, num_splits)
    if check_lse:
        assert_lse_close(lse2, lse_ref, lse_pt, pt_factor=pt_factor)


# ---------------------------------------------------------------------------------------------
# Varlen decode: max_seqlen_q == 1, ragged seqlen_k, seqused_k
# ---------------------------------------------------------------------------------------------

RAGGED_K = [1, 7, 63, 129, 1000, 4097]


def _varlen_decode_inputs(k_lens, nheads, nheads_k, d, dtype):
    batch = len(k_lens)
    max_sk = max(k_lens)
    q = randn(batch, 1, nheads, d, dtype=dtype)
    k = randn(batch, max_sk, nheads_k, d, dtype=dtype)
    v = randn(batch, max_sk, nheads_k, d, dtype=dtype)
    qmask = torch.ones(batch, 1, dtype=torch.bool, device=DEVICE)
    kmask = lengths_to_mask(torch.tensor(k_lens), max_sk).to(DEVICE)
    q_u, cu_q, _, _ = pack(q, qmask)
    k_u, cu_k, _, _ = pack(k, kmask)
    v_u, _, _, _ = pack(v, kmask)
    return q, k, v, qmask, kmask, q_u, k_u, v_u, cu_q, cu_k, max_sk


def _packed_reference(q, k, v, qmask, kmask, **kw):
    """The fp32 reference and PyTorch in the input dtype, packed like the varlen output, and the lse."""
    out_ref, lse_ref = attention_ref(q, k, v, qmask, kmask, **kw)
    out_pt, _ = attention_ref(q, k, v, qmask, kmask, upcast=False, **kw)
    return pack(out_ref, qmask)[0], pack(out_pt, qmask)[0], pack_lse(lse_ref, qmask)


@pytest.mark.parametrize("num_splits", NUM_SPLITS)
@pytest.mark.parametrize("layout", list(HEAD_LAYOUTS))
@pytest.mark.parametrize("d", HEADDIMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_split_kv_varlen_decode(dtype, d, layout, num_splits, require_kernel):
    require_kernel(d, dtype)
    nheads, nheads_k = HEAD_LAYOUTS[layout]
    k_lens = list(RAGGED_K)
    q, k, v, qmask, kmask, q_u, k_u, v_u, cu_q, cu_k, max_sk = _varlen_decode_inputs(
        k_lens, nheads, nheads_k, d, dtype)
    out_ref, out_pt, lse_ref = _packed_reference(q, k, v, qmask, kmask)

    out_unsplit = flash_attn.flash_attn_varlen_func(q_u, k_u, v_u, cu_q, cu_k, 1, max_sk, num_splits=1)
    assert_out_close(out_unsplit, out_ref, out_pt, name="out (num_splits=1)")
    out, lse, _ = flash_attn.flash_attn_varlen_func(q_u, k_u, v_u, cu_q, cu_k, 1, max_sk,
                                                    num_splits=num_splits, return_attn_probs=True)
    assert out.shape == q_u.shape and lse.shape == (nheads, len(k_lens))
    _check_split(out, out_unsplit, out_ref, out_pt, num_splits)
    assert_lse_close(lse, lse_ref)
    out2, lse2 = ext_varlen_fwd(q_u, k_u, v_u, cu_q, cu_k, 1, max_sk, num_splits=num_splits)
    _check_split(out2, out_unsplit, out_ref, out_pt, num_splits)
    assert_lse_close(lse2, lse_ref)


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize("num_splits", [0, 1, 3, 200])
@pytest.mark.parametrize("layout", list(HEAD_LAYOUTS))
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_split_kv_varlen_decode_seqused_k(dtype, d, layout, num_splits, causal, require_kernel):
    """seqused_k: only the first seqused_k[b] keys count; the rest is NaN and must not be read."""
    require_kernel(d, dtype)
    nheads, nheads_k = HEAD_LAYOUTS[layout]
    k_lens = [64, 1, 1000, 4097, 130, 7]
    used = [63, 1, 0, 4000, 129, 7]
    q, k, v, qmask, kmask, q_u, k_u, v_u, cu_q, cu_k, max_sk = _varlen_decode_inputs(
        k_lens, nheads, nheads_k, d, dtype)
    cu = cu_k.tolist()
    k_u, v_u = k_u.clone(), v_u.clone()
    for b in range(len(k_lens)):
        k_u[cu[b] + used[b]: cu[b + 1]] = float("nan")
        v_u[cu[b] + used[b]: cu[b + 1]] = float("nan")
    used_t = torch.tensor(used, dtype=torch.int32, device=DEVICE)
    usedmask = lengths_to_mask(torch.tensor(used), max_sk).to(DEVICE)
    out_ref, out_pt, lse_ref = _packed_reference(q, k, v, qmask, usedmask, causal=causal)
    out, lse = ext_varlen_fwd(q_u, k_u, v_u, cu_q, cu_k, 1, max_sk, seqused_k=used_t, causal=causal,
                              num_splits=num_splits)
    assert_out_close(out, out_ref, out_pt)
    assert_empty_rows_zero(out, torch.isposinf(lse_ref).transpose(0, 1))  # used == 0 -> zeros
    assert_lse_close(lse, lse_ref)


@pytest.mark.parametrize("num_splits", [0, 1, 5])
@pytest.mark.parametrize("feature", ["win32_0", "softcap3", "alibi_bh", "win_softcap_alibi"])
@pytest.mark.parametrize("layout", list(HEAD_LAYOUTS))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_split_kv_varlen_decode_features(dtype, layout, feature, num_splits, require_kernel):
    d = 128
    require_kernel(d, dtype)
    nheads, nheads_k = HEAD_LAYOUTS[layout]
    k_lens = list(RAGGED_K)
    batch = len(k_lens)
    f = dict(FEATURES[feature])
    kw = dict(
        window_size=f.get("window_size", (-1, -1)),
        softcap=f.get("softcap", 0.0),
        alibi_slopes=make_alibi_slopes(f.get("alibi"), batch, nheads, DEVICE),
    )
    q, k, v, qmask, kmask, q_u, k_u, v_u, cu_q, cu_k, max_sk = _varlen_decode_inputs(
        k_lens, nheads, nheads_k, d, dtype)
    out_ref, lse_ref = attention_ref(q, k, v, qmask, kmask, **kw)
    out_pt, lse_pt = attention_ref(q, k, v, qmask, kmask, upcast=False, **kw)
    out_ref, out_pt = pack(out_ref, qmask)[0], pack(out_pt, qmask)[0]
    lse_ref, lse_pt = pack_lse(lse_ref, qmask), pack_lse(lse_pt, qmask)
    pt_factor = 2.0 if kw["softcap"] > 0 else 0.0
    check_lse = lse_checkable(kw["alibi_slopes"], False, kw["window_size"], max_sk)

    out_unsplit = flash_attn.flash_attn_varlen_func(q_u, k_u, v_u, cu_q, cu_k, 1, max_sk, num_splits=1, **kw)
    out, lse, _ = flash_attn.flash_attn_varlen_func(q_u, k_u, v_u, cu_q, cu_k, 1, max_sk,
                                                    num_splits=num_splits, return_attn_probs=True, **kw)
    _check_split(out, out_unsplit, out_ref, out_pt, num_splits)
    if check_lse:
        assert_lse_close(lse, lse_ref, lse_pt, pt_factor=pt_factor)
    out2, lse2 = ext_varlen_fwd(q_u, k_u, v_u, cu_q, cu_k, 1, max_sk, num_splits=num_splits, **kw)
    _check_split(out2, out_unsplit, out_ref, out_pt, num_splits)
    if check_lse:
        assert_lse_close(lse2, lse_ref, lse_pt, pt_factor=pt_factor)



# Head layouts with an odd number of decode blocks per sequence (kv heads after the GQA swap).
ODD_HEAD_LAYOUTS = {"mha": (9, 9), "gqa": (9, 3), "mqa": (8, 1)}


@pytest.mark.parametrize("parity", ["even", "odd"])
@pytest.mark.parametrize("layout", list(HEAD_LAYOUTS))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_single_split_decode_grids(dtype, layout, parity, require_kernel):
    """Ragged batches the heuristic runs in one split: on sm_90 the decode blocks launch in clusters
    of two when their number (batch x kv heads after the GQA swap) is even, unclustered when odd."""
    d = 128
    require_kernel(d, dtype)
    nheads, nheads_k = (HEAD_LAYOUTS if parity == "even" else ODD_HEAD_LAYOUTS)[layout]
    max_len = 300
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    batch = 34 if parity == "even" else 33
    while flash_attn.num_splits_heuristic(batch, nheads, nheads_k, 1, max_len, d, num_sms=sms) != 1:
        batch += 2  # keeps the parity
    assert batch * nheads_k % 2 == (0 if parity == "even" else 1)
    gen = torch.Generator().manual_seed(batch)
    k_lens = torch.randint(1, max_len + 1, (batch,), generator=gen).tolist()
    k_lens[0], k_lens[-1] = 1, max_len
    q, k, v, qmask, kmask, q_u, k_u, v_u, cu_q, cu_k, max_sk = _varlen_decode_inputs(
        k_lens, nheads, nheads_k, d, dtype)
    out_ref, out_pt, lse_ref = _packed_reference(q, k, v, qmask, kmask)
    out, lse = ext_varlen_fwd(q_u, k_u, v_u, cu_q, cu_k, 1, max_sk, causal=True, num_splits=0)
    assert_out_close(out, out_ref, out_pt)
    assert_lse_close(lse, lse_ref)
