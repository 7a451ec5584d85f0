"""GPU correctness tests of the backward kernels, through the native entry points.

Each case runs the native forward (`fwd` / `varlen_fwd`), then `bwd` / `varlen_bwd` with
NaN-poisoned preallocated dq / dk / dv, and compares the gradients with PyTorch autograd through the
reference attention (tests/reference.py) in float32. Rule, as upstream's suite:
    max|grad - ref| <= 2 * max|grad_pt - ref| + eps
where grad_pt is the same autograd computed in the input dtype and eps covers the input dtype's
rounding of the reference. softmax_d must equal rowsum(dout * out).
"""

import math

import pytest
import torch

from helpers import DEVICE, assert_grad_close, flash_attn_gpu, max_abs_diff, randn, requires_gpu
from reference import lengths_to_mask, make_alibi_slopes, pack, ref_grads

pytestmark = requires_gpu

DTYPES = [torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp16", "bf16"]
HEADDIMS = [32, 64, 96, 128, 192, 256]
MHA_TYPES = {"mha": (8, 8), "gqa2": (8, 4), "gqa8": (8, 1)}

# (seqlen_q, seqlen_k): none a multiple of the 64-row / 128-key tiles except through the others;
# seqlen_q > seqlen_k with causal leaves rows with no visible key (dq = 0 there).
SEQLENS = [(1, 255), (17, 113), (113, 17), (255, 1000), (1000, 255)]

FEATURES = {
    "win32_0": dict(window_size=(32, 0)),
    "win17_5": dict(window_size=(17, 5)),
    "winm1_7": dict(window_size=(-1, 7)),
    "softcap30": dict(softcap=30.0),
    "softcap3": dict(softcap=3.0),
    "alibi_h": dict(alibi="h"),
    "alibi_bh_causal": dict(alibi="bh", causal=True),
    "win_softcap_alibi": dict(window_size=(17, 5), softcap=3.0, alibi="h"),
}


def _native_fwd(q, k, v, scale, causal, window, softcap, alibi):
    res = flash_attn_gpu.fwd(q, k, v, None, alibi, 0.0, scale, causal, window[0], window[1], softcap, False)
    return res[0], res[1]


def _native_bwd(dout, q, k, v, out, lse, scale, causal, window, softcap, alibi, deterministic=False, grads=None):
    dq, dk, dv = grads if grads is not None else (torch.full_like(q, math.nan), torch.full_like(k, math.nan),
                                                  torch.full_like(v, math.nan))
    res = flash_attn_gpu.bwd(dout, q, k, v, out, lse, dq, dk, dv, alibi, 0.0, scale, causal, window[0], window[1],
                             softcap, deterministic, None, None)
    assert res[0].data_ptr() == dq.data_ptr() and res[1].data_ptr() == dk.data_ptr()
    assert res[2].data_ptr() == dv.data_ptr()
    return res


def _check_dense(dtype, d, seqlen_q, seqlen_k, nheads, nheads_k, causal=False, window=(-1, -1), softcap=0.0,
                 alibi_kind=None, deterministic=False, batch=2):
    q = randn(batch, seqlen_q, nheads, d, dtype=dtype)
    k = randn(batch, seqlen_k, nheads_k, d, dtype=dtype)
    v = randn(batch, seqlen_k, nheads_k, d, dtype=dtype)
    dout = randn(batch, seqlen_q, nheads, d, dtype=dtype)
    alibi = make_alibi_slopes(alibi_kind, batch, nheads, DEVICE)
    scale = d ** -0.5
    out, lse = _native_fwd(q, k, v, scale, causal, window, softcap, alibi)
    dq, dk, dv, softmax_d = _native_bwd(dout, q, k, v, out, lse, scale, causal, window, softcap, alibi,
                                        deterministic)
    kw = dict(causal=causal, window_size=window, softcap=softcap, alibi_slopes=alibi)
    ref = ref_grads(q, k, v, dout, True, **kw)
    pt = ref_grads(q, k, v, dout, False, **kw)
    for name, g, g_ref, g_pt in zip(("dq", "dk", "dv"), (dq, dk, dv), ref, pt):
        assert_grad_close(name, g, g_ref, g_pt)
    d_ref = (dout.float() * out.float()).sum(-1).transpose(1, 2)
    assert softmax_d.shape == (batch, nheads, seqlen_q) and softmax_d.dtype == torch.float32
    assert max_abs_diff(softmax_d, d_ref) <= 1e-3 * max(1.0, d_ref.abs().max().item())
    return q, k, v, dout, out, lse, alibi, (dq, dk, dv)


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize("seqlen_q,seqlen_k", SEQLENS)
@pytest.mark.parametrize("d", HEADDIMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_bwd_dense(dtype, d, seqlen_q, seqlen_k, causal, require_kernel):
    require_kernel(d, dtype)
    _check_dense(dtype, d, seqlen_q, seqlen_k, 4, 4, causal=causal)


@pytest.mark.parametrize("mha_type", list(MHA_TYPES))
@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_bwd_features(dtype, d, feature, mha_type, require_kernel):
    require_kernel(d, dtype)
    f = FEATURES[feature]
    nheads, nheads_k = MHA_TYPES[mha_type]
    seqlen_q, seqlen_k = (113, 203) if mha_type != "gqa2" else (199, 77)
    _check_dense(dtype, d, seqlen_q, seqlen_k, nheads, nheads_k, causal=f.get("causal", False),
                 window=f.get("window_size", (-1, -1)), softcap=f.get("softcap", 0.0), alibi_kind=f.get("alibi"))


@pytest.mark.parametrize("mha_type", ["mha", "gqa8"])
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize("d", HEADDIMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_bwd_gqa(dtype, d, causal, mha_type, require_kernel):
    require_kernel(d, dtype)
    nheads, nheads_k = MHA_TYPES[mha_type]
    _check_dense(dtype, d, 255, 300, nheads, nheads_k, causal=causal)


@pytest.mark.parametrize("feature", ["plain", "causal_gqa", "window_softcap_alibi"])
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_bwd_deterministic(dtype, d, feature, require_kernel):
    """deterministic=True: correct, and bitwise identical over 10 calls."""
    require_kernel(d, dtype)
    kw = {
        "plain": dict(nheads=4, nheads_k=4),
        "causal_gqa": dict(nheads=8, nheads_k=2, causal=True),
        "window_softcap_alibi": dict(nheads=4, nheads_k=4, window=(40, 9), softcap=5.0, alibi_kind="h"),
    }[feature]
    nheads, nheads_k = kw.pop("nheads"), kw.pop("nheads_k")
    q, k, v, dout, out, lse, alibi, first = _check_dense(dtype, d, 300, 457, nheads, nheads_k, deterministic=True,
                                                         **kw)
    causal, window = kw.get("causal", False), kw.get("window", (-1, -1))
    for _ in range(9):
        again = _native_bwd(dout, q, k, v, out, lse, d ** -0.5, causal, window, kw.get("softcap", 0.0), alibi,
                            deterministic=True)
        for name, a, b in zip(("dq", "dk", "dv"), first, again):
            assert torch.equal(a, b), f"{name} differs between deterministic calls"


def test_bwd_packed_views(require_kernel):
    """dq / dk / dv as strided views of one packed (batch, seqlen, 3, heads, d) tensor."""
    dtype, d = torch.float16, 64
    require_kernel(d, dtype)
    batch, seqlen, nheads = 2, 211, 4
    q, k, v = (randn(batch, seqlen, nheads, d, dtype=dtype) for _ in range(3))
    dout = randn(batch, seqlen, nheads, d, dtype=dtype)
    scale = d ** -0.5
    out, lse = _native_fwd(q, k, v, scale, True, (-1, -1), 0.0, None)
    dqkv = torch.full((batch, seqlen, 3, nheads, d), math.nan, dtype=dtype, device=DEVICE)
    views = (dqkv[:, :, 0], dqkv[:, :, 1], dqkv[:, :, 2])
    _native_bwd(dout, q, k, v, out, lse, scale, True, (-1, -1), 0.0, None, grads=views)
    ref = ref_grads(q, k, v, dout, True, causal=True)
    pt = ref_grads(q, k, v, dout, False, causal=True)
    for name, g, g_ref, g_pt in zip(("dq", "dk", "dv"), views, ref, pt):
        assert_grad_close(name, g, g_ref, g_pt)


def test_bwd_dropout_rejected(require_kernel):
    dtype, d = torch.float16, 64
    require_kernel(d, dtype)
    q = randn(1, 8, 2, d, dtype=dtype)
    lse = torch.zeros(1, 2, 8, device=DEVICE)
    with pytest.raises(RuntimeError, match="dropout_p"):
        flash_attn_gpu.bwd(q, q, q, q, q, lse, None, None, None, None, 0.1, 0.125, False, -1, -1, 0.0, False,
                           None, None)


# ---------------------------------------------------------------------------------------------
# varlen
# ---------------------------------------------------------------------------------------------

# Ragged lengths with empty and one-row sequences on both sides.
VARLEN_LENGTHS = {
    "ragged": ([300, 1, 0, 77, 129], [260, 0, 5, 77, 1]),
    "longer_k": ([64, 17, 1], [1000, 40, 3]),
}


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("lengths", list(VARLEN_LENGTHS))
@pytest.mark.parametrize("mha_type", ["mha", "gqa8"])
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize("d", [32, 128, 256])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_bwd_varlen(dtype, d, causal, mha_type, lengths, deterministic, require_kernel):
    require_kernel(d, dtype)
    nheads, nheads_k = MHA_TYPES[mha_type]
    lens_q, lens_k = (torch.tensor(x) for x in VARLEN_LENGTHS[lengths])
    batch = len(lens_q)
    max_q, max_k = int(lens_q.max()), int(lens_k.max())
    qmask = lengths_to_mask(lens_q, max_q).to(DEVICE)
    kmask = lengths_to_mask(lens_k, max_k).to(DEVICE)
    q = randn(batch, max_q, nheads, d, dtype=dtype)
    k = randn(batch, max_k, nheads_k, d, dtype=dtype)
    v = randn(batch, max_k, nheads_k, d, dtype=dtype)
    dout = randn(batch, max_q, nheads, d, dtype=dtype)
    q_p, cu_q, _, _ = pack(q, qmask)
    k_p, cu_k, _, _ = pack(k, kmask)
    v_p, _, _, _ = pack(v, kmask)
    dout_p, _, _, _ = pack(dout, qmask)
    scale = d ** -0.5
    res = flash_attn_gpu.varlen_fwd(q_p, k_p, v_p, None, cu_q, cu_k, None, None, None, None, max_q, max_k, 0.0,
                                    scale, False, causal, -1, -1, 0.0, False)
    out_p, lse = res[0], res[1]
    grads = (torch.full_like(q_p, math.nan), torch.full_like(k_p, math.nan), torch.full_like(v_p, math.nan))
    dq, dk, dv, softmax_d = flash_attn_gpu.varlen_bwd(
        dout_p, q_p, k_p, v_p, out_p, lse, *grads, cu_q, cu_k, None, max_q, max_k, 0.0, scale, False, causal, -1, -1,
        0.0, deterministic, None, None)
    assert dq.data_ptr() == grads[0].data_ptr()
    kw = dict(query_padding_mask=qmask, key_padding_mask=kmask, causal=causal)
    ref = ref_grads(q, k, v, dout, True, **kw)
    pt = ref_grads(q, k, v, dout, False, **kw)
    masks = (qmask, kmask, kmask)
    for name, g, g_ref, g_pt, mask in zip(("dq", "dk", "dv"), (dq, dk, dv), ref, pt, masks):
        assert_grad_close(name, g, pack(g_ref, mask)[0], pack(g_pt, mask)[0])
    d_ref = (dout_p.float() * out_p.float()).sum(-1).transpose(0, 1)
    assert softmax_d.shape == (nheads, q_p.shape[0])
    assert max_abs_diff(softmax_d, d_ref) <= 1e-3 * max(1.0, d_ref.abs().max().item())
