"""GPU correctness tests of the forward kernels against the fp32 reference (tests/reference.py).

Rule (as upstream's suite): max|out - ref| <= 2 * max|out_pt - ref| + 1e-5, where ref is the
fp32 reference and out_pt the same computation done by PyTorch in the input dtype. softmax_lse
(fp32) must be within 1e-3 of the reference on rows with at least one allowed key, and +inf on
rows without. Every case also calls the extension directly with a NaN-poisoned preallocated
`out` (sliced from a larger NaN buffer to catch writes past its end) and q/k/v followed in memory
by NaN (to catch reads past the end of the sequences).
"""

import pytest
import torch

from helpers import (
    DEVICE, assert_empty_rows_zero, assert_lse_close, assert_no_nan, assert_out_close, ext_fwd, ext_varlen_fwd,
    flash_attn, lse_checkable, randn, requires_gpu
)
from reference import attention_ref, generate_seqlens, lengths_to_mask, make_alibi_slopes, pack, pack_lse

pytestmark = requires_gpu

DTYPES = [torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp16", "bf16"]
HEADDIMS = [32, 40, 64, 96, 128, 160, 192, 224, 256]
MHA_TYPES = {"mha": (6, 6), "gqa": (6, 2), "mqa": (6, 1)}

# (seqlen_q, seqlen_k): seqlen_q == 1 takes the split-KV path; sq > sk with causal gives rows with
# no allowed key; most lengths are not multiples of the 64/128 tile sizes.
SEQLENS = [
    (1, 1),
    (1, 239),
    (3, 799),
    (64, 128),
    (113, 203),
    (128, 217),
    (239, 1),
    (256, 512),
    (512, 256),
    (1023, 1024),
]

# Masking / score-modifier variants. Windows are chosen smaller than seqlen_k (see the report on
# upstream's normalisation of window sizes >= seqlen_k).
FEATURES = {
    "win32_0": dict(window_size=(32, 0)),
    "win17_5": dict(window_size=(17, 5)),
    "win0_0": dict(window_size=(0, 0)),
    "winm1_7": dict(window_size=(-1, 7)),
    "softcap30": dict(softcap=30.0),
    "softcap3": dict(softcap=3.0),
    "alibi_h": dict(alibi="h"),
    "alibi_bh": dict(alibi="bh"),
    "softcap_alibi": dict(softcap=30.0, alibi="bh"),
    "win_softcap_alibi": dict(window_size=(17, 5), softcap=3.0, alibi="h"),
    "scale": dict(softmax_scale=0.3),
}
# (seqlen_q, seqlen_k, mha_type) for the feature tests: every head layout appears once.
FEATURE_SHAPES = [(113, 203, "mha"), (199, 77, "gqa"), (64, 640, "mqa")]


def _feature_kwargs(feature, batch, nheads):
    f = dict(FEATURES[feature]) if feature is not None else {}
    alibi = make_alibi_slopes(f.pop("alibi", None), batch, nheads, DEVICE)
    return dict(
        window_size=f.get("window_size", (-1, -1)),
        softcap=f.get("softcap", 0.0),
        alibi_slopes=alibi,
        softmax_scale=f.get("softmax_scale", None),
    )


def _check_batched(batch, seqlen_q, seqlen_k, nheads, nheads_k, d, dtype, causal, kw):
    q = randn(batch, seqlen_q, nheads, d, dtype=dtype)
    k = randn(batch, seqlen_k, nheads_k, d, dtype=dtype)
    v = randn(batch, seqlen_k, nheads_k, d, dtype=dtype)
    q0, k0, v0 = q.clone(), k.clone(), v.clone()

    res = flash_attn.flash_attn_func(q, k, v, causal=causal, return_attn_probs=True, **kw)
    assert isinstance(res, tuple) and len(res) == 3
    out, lse = res[0], res[1]
    assert out.shape == q.shape and out.dtype == dtype
    assert lse.shape == (batch, nheads, seqlen_q) and lse.dtype == torch.float32

    out_ref, lse_ref = attention_ref(q, k, v, causal=causal, **kw)
    out_pt, lse_pt = attention_ref(q, k, v, causal=causal, upcast=False, **kw)
    check_lse = lse_checkable(kw["alibi_slopes"], causal, kw["window_size"], seqlen_k)
    pt_factor = 2.0 if kw["softcap"] > 0 else 0.0
    empty_rows = torch.isposinf(lse_ref).transpose(1, 2)  # (batch, seqlen_q, nheads)

    assert_out_close(out, out_ref, out_pt)
    assert_empty_rows_zero(out, empty_rows)
    if check_lse:
        assert_lse_close(lse, lse_ref, lse_pt, pt_factor=pt_factor)
    else:
        assert not torch.isnan(lse).any()

    # The extension directly, with poisoned out and NaN past the end of q/k/v.
    if d % 8 == 0:
        out2, lse2 = ext_fwd(q, k, v, causal=causal, **kw)
        assert_out_close(out2, out_ref, out_pt, name="out (fwd, preallocated)")
        assert_empty_rows_zero(out2, empty_rows)
        assert lse2.shape == (batch, nheads, seqlen_q)
        if check_lse:
            assert_lse_close(lse2, lse_ref, lse_pt, pt_factor=pt_factor)

    # Inputs are not modified.
    assert torch.equal(q, q0) and torch.equal(k, k0) and torch.equal(v, v0)


# ---------------------------------------------------------------------------------------------
# flash_attn_func
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize("mha_type", list(MHA_TYPES))
@pytest.mark.parametrize("seqlen_q,seqlen_k", SEQLENS)
@pytest.mark.parametrize("d", HEADDIMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_flash_attn_output(dtype, d, seqlen_q, seqlen_k, mha_type, causal, require_kernel):
    require_kernel(d, dtype)
    nheads, nheads_k = MHA_TYPES[mha_type]
    batch = 3 if seqlen_q * seqlen_k <= 128 * 256 else 2
    kw = _feature_kwargs(None, batch, nheads)
    _check_batched(batch, seqlen_q, seqlen_k, nheads, nheads_k, d, dtype, causal, kw)


@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize("seqlen_q,seqlen_k,mha_type", FEATURE_SHAPES)
@pytest.mark.parametrize("d", HEADDIMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_flash_attn_features(dtype, d, seqlen_q, seqlen_k, mha_type, causal, feature, require_kernel):
    require_kernel(d, dtype)
    nheads, nheads_k = MHA_TYPES[mha_type]
    batch = 2
    kw = _feature_kwargs(feature, batch, nheads)
    _check_batched(batch, seqlen_q, seqlen_k, nheads, nheads_k, d, dtype, causal, kw)


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize("d", [20, 59, 100, 250])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_flash_attn_headdim_not_multiple_of_8(dtype, d, causal, require_kernel):
    """The Python layer pads the head dim to a multiple of 8 and slices the output back."""
    require_kernel(d, dtype)
    kw = _feature_kwargs(None, 2, 4)
    _check_batched(2, 97, 131, 4, 2, d, dtype, causal, kw)


# ---------------------------------------------------------------------------------------------
# flash_attn_varlen_func
# ---------------------------------------------------------------------------------------------

VARLEN_SEQLENS = [(1, 147), (3, 799), (113, 203), (128, 217), (256, 512), (512, 256)]
VARLEN_FEATURE_SHAPES = [(113, 203, "gqa"), (256, 128, "mha"), (1, 300, "mqa")]
VARLEN_FEATURE_HEADDIMS = [32, 64, 128, 160, 256]


def _make_varlen(batch, max_sq, max_sk, nheads, nheads_k, d, dtype, q_lens=None, k_lens=None):
    if q_lens is None:
        q_lens = generate_seqlens(batch, max_sq, "random")
    if k_lens is None:
        k_lens = generate_seqlens(batch, max_sk, "random")
    q_lens = torch.as_tensor(q_lens, dtype=torch.long)
    k_lens = torch.as_tensor(k_lens, dtype=torch.long)
    max_sq = max(int(q_lens.max()), 1)
    max_sk = max(int(k_lens.max()), 1)
    q = randn(batch, max_sq, nheads, d, dtype=dtype)
    k = randn(batch, max_sk, nheads_k, d, dtype=dtype)
    v = randn(batch, max_sk, nheads_k, d, dtype=dtype)
    qmask = lengths_to_mask(q_lens, max_sq).to(DEVICE)
    kmask = lengths_to_mask(k_lens, max_sk).to(DEVICE)
    q_u, cu_q, _, _ = pack(q, qmask)
    k_u, cu_k, _, _ = pack(k, kmask)
    v_u, _, _, _ = pack(v, kmask)
    return dict(q=q, k=k, v=v, qmask=qmask, kmask=kmask, q_u=q_u, k_u=k_u, v_u=v_u,
                cu_q=cu_q, cu_k=cu_k, max_sq=int(q_lens.max()), max_sk=int(k_lens.max()))


def _check_varlen(t, nheads, dtype, causal, kw):
    q_u, k_u, v_u = t["q_u"], t["k_u"], t["v_u"]
    total_q = q_u.shape[0]
    res = flash_attn.flash_attn_varlen_func(
        q_u, k_u, v_u, t["cu_q"], t["cu_k"], t["max_sq"], t["max_sk"],
        causal=causal, return_attn_probs=True, **kw,
    )
    assert isinstance(res, tuple) and len(res) == 3
    out, lse = res[0], res[1]
    assert out.shape == q_u.shape and out.dtype == dtype
    assert lse.shape == (nheads, total_q) and lse.dtype == torch.float32

    out_ref, lse_ref = attention_ref(t["q"], t["k"], t["v"], t["qmask"], t["kmask"], causal=causal, **kw)
    out_pt, lse_pt = attention_ref(t["q"], t["k"], t["v"], t["qmask"], t["kmask"], causal=causal,
                                   upcast=False, **kw)
    out_ref = pack(out_ref, t["qmask"])[0]
    out_pt = pack(out_pt, t["qmask"])[0]
    lse_ref = pack_lse(lse_ref, t["qmask"])
    lse_pt = pack_lse(lse_pt, t["qmask"])
    check_lse = lse_checkable(kw["alibi_slopes"], causal, kw["window_size"], t["max_sk"])
    pt_factor = 2.0 if kw["softcap"] > 0 else 0.0
    empty_rows = torch.isposinf(lse_ref).transpose(0, 1)  # (total_q, nheads)

    assert_out_close(out, out_ref, out_pt)
    assert_empty_rows_zero(out, empty_rows)
    if check_lse:
        assert_lse_close(lse, lse_ref, lse_pt, pt_factor=pt_factor)
    else:
        assert not torch.isnan(lse).any()

    if q_u.shape[-1] % 8 == 0:
        out2, lse2 = ext_varlen_fwd(q_u, k_u, v_u, t["cu_q"], t["cu_k"], t["max_sq"], t["max_sk"],
                                    causal=causal, **kw)
        assert_out_close(out2, out_ref, out_pt, name="out (varlen_fwd, preallocated)")
        assert_empty_rows_zero(out2, empty_rows)
        assert lse2.shape == (nheads, total_q)
        if check_lse:
            assert_lse_close(lse2, lse_ref, lse_pt, pt_factor=pt_factor)


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize("mha_type", list(MHA_TYPES))
@pytest.mark.parametrize("seqlen_q,seqlen_k", VARLEN_SEQLENS)
@pytest.mark.parametrize("d", HEADDIMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_flash_attn_varlen_output(dtype, d, seqlen_q, seqlen_k, mha_type, causal, require_kernel):
    require_kernel(d, dtype)
    nheads, nheads_k = MHA_TYPES[mha_type]
    batch = 5
    t = _make_varlen(batch, seqlen_q, seqlen_k, nheads, nheads_k, d, dtype)
    _check_varlen(t, nheads, dtype, causal, _feature_kwargs(None, batch, nheads))


@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize("seqlen_q,seqlen_k,mha_type", VARLEN_FEATURE_SHAPES)
@pytest.mark.parametrize("d", VARLEN_FEATURE_HEADDIMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_flash_attn_varlen_features(dtype, d, seqlen_q, seqlen_k, mha_type, causal, feature,
                                    require_kernel):
    require_kernel(d, dtype)
    nheads, nheads_k = MHA_TYPES[mha_type]
    batch = 4
    t = _make_varlen(batch, seqlen_q, seqlen_k, nheads, nheads_k, d, dtype)
    _check_varlen(t, nheads, dtype, causal, _feature_kwargs(feature, batch, nheads))


# Explicit ragged batches: lengths 1, block-boundary +-1, zero-length sequences.
RAGGED = {
    "ones": ([1, 1, 1, 1], [1, 1, 1, 1]),
    "edges": ([1, 63, 64, 65, 127, 128, 129], [129, 128, 127, 65, 64, 63, 1]),
    "k_zero_len": ([5, 17, 1, 40], [0, 33, 0, 200]),
    "q_zero_len": ([0, 17, 0, 40], [9, 33, 70, 200]),
    "both_zero_len": ([0, 3, 7], [0, 0, 77]),
}


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize("case", list(RAGGED))
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_flash_attn_varlen_ragged(dtype, d, case, causal, require_kernel):
    """Zero-length key sequences give output 0 (not NaN) and lse +inf."""
    require_kernel(d, dtype)
    q_lens, k_lens = RAGGED[case]
    batch = len(q_lens)
    nheads, nheads_k = 4, 2
    t = _make_varlen(batch, None, None, nheads, nheads_k, d, dtype, q_lens=q_lens, k_lens=k_lens)
    _check_varlen(t, nheads, dtype, causal, _feature_kwargs(None, batch, nheads))


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize("mha_type", list(MHA_TYPES))
@pytest.mark.parametrize("seqlen_q", [1, 37, 128])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_flash_attn_varlen_seqused_k(dtype, d, seqlen_q, mha_type, causal, require_kernel):
    """seqused_k[b] < len_k[b]: only the first seqused_k keys are used (the rest is NaN here and
    must never be read), and the causal alignment uses seqused_k."""
    require_kernel(d, dtype)
    nheads, nheads_k = MHA_TYPES[mha_type]
    k_lens = [300, 1, 129, 64, 1000]
    used = [17, 1, 128, 0, 999]
    batch = len(k_lens)
    q_lens = generate_seqlens(batch, seqlen_q, "random")
    t = _make_varlen(batch, None, None, nheads, nheads_k, d, dtype, q_lens=q_lens, k_lens=k_lens)
    used_t = torch.tensor(used, dtype=torch.int32, device=DEVICE)
    # Poison the unused tail of every key sequence.
    k_u, v_u = t["k_u"].clone(), t["v_u"].clone()
    cu_k = t["cu_k"].tolist()
    for b in range(batch):
        k_u[cu_k[b] + used[b]: cu_k[b + 1]] = float("nan")
        v_u[cu_k[b] + used[b]: cu_k[b + 1]] = float("nan")
    usedmask = lengths_to_mask(torch.tensor(used), t["kmask"].shape[1]).to(DEVICE)
    out_ref, lse_ref = attention_ref(t["q"], t["k"], t["v"], t["qmask"], usedmask, causal=causal)
    out_pt, _ = attention_ref(t["q"], t["k"], t["v"], t["qmask"], usedmask, causal=causal, upcast=False)
    out_ref = pack(out_ref, t["qmask"])[0]
    out_pt = pack(out_pt, t["qmask"])[0]
    lse_ref = pack_lse(lse_ref, t["qmask"])
    for num_splits in (0, 1):
        out, lse = ext_varlen_fwd(t["q_u"], k_u, v_u, t["cu_q"], t["cu_k"], t["max_sq"], t["max_sk"],
                                  seqused_k=used_t, causal=causal, num_splits=num_splits)
        assert_out_close(out, out_ref, out_pt, name=f"out (seqused_k, num_splits={num_splits})")
        assert_empty_rows_zero(out, torch.isposinf(lse_ref).transpose(0, 1))
        assert_lse_close(lse, lse_ref)


# ---------------------------------------------------------------------------------------------
# Packed variants (lightly), return values, determinism
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize("d", [40, 64, 128])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_flash_attn_packed(dtype, d, causal, require_kernel):
    require_kernel(d, dtype)
    batch, seqlen, nheads, nheads_k = 3, 157, 4, 2

    # qkvpacked (MHA): q, k, v are strided views into qkv.
    qkv = randn(batch, seqlen, 3, nheads, d, dtype=dtype)
    q, k, v = qkv.unbind(2)
    out_ref, _ = attention_ref(q, k, v, causal=causal)
    out_pt, _ = attention_ref(q, k, v, causal=causal, upcast=False)
    out = flash_attn.flash_attn_qkvpacked_func(qkv, causal=causal)
    assert_out_close(out, out_ref, out_pt, name="qkvpacked")

    # kvpacked (GQA), seqlen_q != seqlen_k.
    q = randn(batch, 61, nheads, d, dtype=dtype)
    kv = randn(batch, seqlen, 2, nheads_k, d, dtype=dtype)
    k, v = kv.unbind(2)
    out_ref, _ = attention_ref(q, k, v, causal=causal)
    out_pt, _ = attention_ref(q, k, v, causal=causal, upcast=False)
    res = flash_attn.flash_attn_kvpacked_func(q, kv, causal=causal, return_attn_probs=True)
    assert len(res) == 3 and res[1].shape == (batch, nheads, 61)
    assert_out_close(res[0], out_ref, out_pt, name="kvpacked")

    # varlen qkvpacked (MHA).
    t = _make_varlen(batch, seqlen, seqlen, nheads, nheads, d, dtype, q_lens=[157, 1, 90],
                     k_lens=[157, 1, 90])
    qkv_u = torch.stack([t["q_u"], t["k_u"], t["v_u"]], dim=1)  # (total, 3, nheads, d)
    out_ref, _ = attention_ref(t["q"], t["k"], t["v"], t["qmask"], t["kmask"], causal=causal)
    out_pt, _ = attention_ref(t["q"], t["k"], t["v"], t["qmask"], t["kmask"], causal=causal, upcast=False)
    out = flash_attn.flash_attn_varlen_qkvpacked_func(qkv_u, t["cu_q"], t["max_sq"], causal=causal)
    assert_out_close(out, pack(out_ref, t["qmask"])[0], pack(out_pt, t["qmask"])[0], name="varlen_qkvpacked")

    # varlen kvpacked (GQA).
    t = _make_varlen(batch, 70, seqlen, nheads, nheads_k, d, dtype)
    kv_u = torch.stack([t["k_u"], t["v_u"]], dim=1)  # (total_k, 2, nheads_k, d)
    out_ref, lse_ref = attention_ref(t["q"], t["k"], t["v"], t["qmask"], t["kmask"], causal=causal)
    out_pt, _ = attention_ref(t["q"], t["k"], t["v"], t["qmask"], t["kmask"], causal=causal, upcast=False)
    res = flash_attn.flash_attn_varlen_kvpacked_func(
        t["q_u"], kv_u, t["cu_q"], t["cu_k"], t["max_sq"], t["max_sk"], causal=causal,
        return_attn_probs=True,
    )
    assert len(res) == 3
    assert_out_close(res[0], pack(out_ref, t["qmask"])[0], pack(out_pt, t["qmask"])[0], name="varlen_kvpacked")
    assert_lse_close(res[1], pack_lse(lse_ref, t["qmask"]))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_return_values(dtype, require_kernel):
    """return_attn_probs=False returns a tensor; True returns a 3-tuple (out, lse, S_dmask)."""
    require_kernel(64, dtype)
    q = randn(2, 33, 4, 64, dtype=dtype)
    k = randn(2, 47, 4, 64, dtype=dtype)
    v = randn(2, 47, 4, 64, dtype=dtype)
    out = flash_attn.flash_attn_func(q, k, v)
    assert isinstance(out, torch.Tensor) and out.shape == q.shape
    res = flash_attn.flash_attn_func(q, k, v, return_attn_probs=True)
    assert isinstance(res, tuple) and len(res) == 3
    assert torch.equal(res[0], out)
    assert res[1].shape == (2, 4, 33) and res[1].dtype == torch.float32
    assert_no_nan(res[1], "softmax_lse")

    cu = torch.tensor([0, 33], dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor([0, 47], dtype=torch.int32, device=DEVICE)
    out_v = flash_attn.flash_attn_varlen_func(q[0], k[0], v[0], cu, cu_k, 33, 47)
    assert isinstance(out_v, torch.Tensor) and out_v.shape == (33, 4, 64)
    res_v = flash_attn.flash_attn_varlen_func(q[0], k[0], v[0], cu, cu_k, 33, 47, return_attn_probs=True)
    assert isinstance(res_v, tuple) and len(res_v) == 3
    assert res_v[1].shape == (4, 33)
    # Batch entry 0 of the batched call is the same computation.
    torch.testing.assert_close(out_v, out[0], atol=2e-3, rtol=0)
    torch.testing.assert_close(res_v[1], res[1][0], atol=1e-3, rtol=0)


def _repeat_equal(fn, n=3):
    first = fn()
    torch.cuda.synchronize() if DEVICE == "cuda" else None
    for _ in range(n - 1):
        again = fn()
        for a, b in zip(first, again):
            assert torch.equal(a, b), "outputs differ between identical calls (race / nondeterminism)"
    return first


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_deterministic(dtype, require_kernel):
    """Identical calls give bitwise-identical out and lse (also catches races)."""
    require_kernel(128, dtype)
    # Prefill, causal, GQA.
    q = randn(4, 1000, 8, 128, dtype=dtype)
    k = randn(4, 1000, 2, 128, dtype=dtype)
    v = randn(4, 1000, 2, 128, dtype=dtype)
    _repeat_equal(lambda: flash_attn.flash_attn_func(q, k, v, causal=True, return_attn_probs=True)[:2])
    # Split-KV decode (auto and explicit splits).
    qd = randn(2, 1, 32, 128, dtype=dtype)
    kd = randn(2, 5000, 8, 128, dtype=dtype)
    vd = randn(2, 5000, 8, 128, dtype=dtype)
    for ns in (0, 5):
        _repeat_equal(lambda: flash_attn.flash_attn_func(qd, kd, vd, num_splits=ns, return_attn_probs=True)[:2])
    # Varlen, ragged.
    t = _make_varlen(6, 300, 700, 8, 8, 128, dtype)
    _repeat_equal(lambda: flash_attn.flash_attn_varlen_func(
        t["q_u"], t["k_u"], t["v_u"], t["cu_q"], t["cu_k"], t["max_sq"], t["max_sk"],
        causal=True, return_attn_probs=True)[:2])


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_large_values_no_overflow(dtype, require_kernel):
    """Large-magnitude scores (online softmax rescaling must not overflow to inf/NaN)."""
    require_kernel(64, dtype)
    q = randn(2, 200, 4, 64, dtype=dtype) * 8
    k = randn(2, 300, 4, 64, dtype=dtype) * 8
    v = randn(2, 300, 4, 64, dtype=dtype)
    for causal in (False, True):
        out, lse, _ = flash_attn.flash_attn_func(q, k, v, causal=causal, return_attn_probs=True)
        out_ref, lse_ref = attention_ref(q, k, v, causal=causal)
        out_pt, _ = attention_ref(q, k, v, causal=causal, upcast=False)
        assert_out_close(out, out_ref, out_pt)
        assert_lse_close(lse, lse_ref, atol=1e-2)


# ---------------------------------------------------------------------------------------------
# A strided last dimension (stride(-1) != 1) is accepted and copied by the extension, as
# upstream's Python wrapper (maybe_contiguous) does.
# ---------------------------------------------------------------------------------------------

def _strided_last_dim(x):
    y = x.transpose(-1, -2).contiguous().transpose(-1, -2)
    assert y.stride(-1) != 1 and torch.equal(y, x)
    return y


@pytest.mark.parametrize("seqlen_q", [1, 77])
def test_strided_last_dim(seqlen_q, require_kernel):
    require_kernel(128, torch.float16)
    batch, seqlen_k, nheads, nheads_k, d = 2, 300, 8, 2, 128
    q = torch.randn(batch, seqlen_q, nheads, d, device=DEVICE, dtype=torch.float16)
    k = torch.randn(batch, seqlen_k, nheads_k, d, device=DEVICE, dtype=torch.float16)
    v = torch.randn(batch, seqlen_k, nheads_k, d, device=DEVICE, dtype=torch.float16)
    ref = flash_attn.flash_attn_func(q, k, v, causal=True)
    out = flash_attn.flash_attn_func(_strided_last_dim(q), _strided_last_dim(k), _strided_last_dim(v), causal=True)
    assert torch.equal(out, ref)
    qv, kv, vv = q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1)
    cu_q = torch.arange(0, batch + 1, device=DEVICE, dtype=torch.int32) * seqlen_q
    cu_k = torch.arange(0, batch + 1, device=DEVICE, dtype=torch.int32) * seqlen_k
    ref_v = flash_attn.flash_attn_varlen_func(qv, kv, vv, cu_q, cu_k, seqlen_q, seqlen_k, causal=True)
    out_v = flash_attn.flash_attn_varlen_func(_strided_last_dim(qv), _strided_last_dim(kv), _strided_last_dim(vv),
                                              cu_q, cu_k, seqlen_q, seqlen_k, causal=True)
    assert torch.equal(out_v, ref_v)
