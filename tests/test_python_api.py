"""CPU-only tests of the Python layer (flash_attn package): signatures, argument plumbing,
bert_padding, benchmark utils. They need neither a GPU nor the compiled extension: the
extension is replaced by a pure-PyTorch fake that checks the contract's argument conventions."""

import inspect
import math
import types

import pytest
import torch

import flash_attn
import flash_attn.flash_attn_interface as fai
from flash_attn.bert_padding import index_first_axis, index_put_first_axis, pad_input, unpad_input

# ------------------------------------------------------------------------------------------
# Signatures
# ------------------------------------------------------------------------------------------

_COMMON = [
    ("dropout_p", 0.0),
    ("softmax_scale", None),
    ("causal", False),
    ("window_size", (-1, -1)),
    ("softcap", 0.0),
    ("alibi_slopes", None),
    ("deterministic", False),
    ("return_attn_probs", False),
]
_REQ = inspect.Parameter.empty

EXPECTED_SIGNATURES = {
    "flash_attn_func": [("q", _REQ), ("k", _REQ), ("v", _REQ), *_COMMON, ("num_splits", 0)],
    "flash_attn_qkvpacked_func": [("qkv", _REQ), *_COMMON],
    "flash_attn_kvpacked_func": [("q", _REQ), ("kv", _REQ), *_COMMON],
    "flash_attn_varlen_func": [
        ("q", _REQ), ("k", _REQ), ("v", _REQ), ("cu_seqlens_q", _REQ), ("cu_seqlens_k", _REQ),
        ("max_seqlen_q", _REQ), ("max_seqlen_k", _REQ), *_COMMON, ("block_table", None),
        ("num_splits", 0),
    ],
    "flash_attn_varlen_qkvpacked_func": [
        ("qkv", _REQ), ("cu_seqlens", _REQ), ("max_seqlen", _REQ), *_COMMON,
    ],
    "flash_attn_varlen_kvpacked_func": [
        ("q", _REQ), ("kv", _REQ), ("cu_seqlens_q", _REQ), ("cu_seqlens_k", _REQ),
        ("max_seqlen_q", _REQ), ("max_seqlen_k", _REQ), *_COMMON,
    ],
    "flash_attn_with_kvcache": [
        ("q", _REQ), ("k_cache", _REQ), ("v_cache", _REQ), ("k", None), ("v", None),
        ("rotary_cos", None), ("rotary_sin", None), ("cache_seqlens", None),
        ("cache_batch_idx", None), ("cache_leftpad", None), ("block_table", None),
        ("softmax_scale", None), ("causal", False), ("window_size", (-1, -1)), ("softcap", 0.0),
        ("rotary_interleaved", True), ("alibi_slopes", None), ("num_splits", 0),
        ("return_softmax_lse", False),
    ],
    "num_splits_heuristic": [
        ("batch", _REQ), ("nheads", _REQ), ("nheads_k", _REQ), ("seqlen_q", _REQ),
        ("seqlen_k", _REQ), ("headdim", _REQ), ("num_sms", None), ("num_splits", 0),
    ],
    "build_info": [],
    "unpad_input": [("hidden_states", _REQ), ("attention_mask", _REQ), ("unused_mask", None)],
    "pad_input": [("hidden_states", _REQ), ("indices", _REQ), ("batch", _REQ), ("seqlen", _REQ)],
}


def _public(name):
    if hasattr(flash_attn, name):
        return getattr(flash_attn, name)
    import flash_attn.bert_padding as bp

    return getattr(bp, name)


@pytest.mark.parametrize("name", sorted(EXPECTED_SIGNATURES))
def test_signature(name):
    params = list(inspect.signature(_public(name)).parameters.values())
    assert [(p.name, p.default) for p in params] == EXPECTED_SIGNATURES[name]
    assert all(p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD for p in params)


def test_package_exports():
    assert flash_attn.__version__ == "2.8.3"
    for name in EXPECTED_SIGNATURES:
        if name not in ("unpad_input", "pad_input"):
            assert callable(getattr(flash_attn, name))
            assert name in flash_attn.__all__
    # the same objects are reachable through the upstream module path
    assert flash_attn.flash_attn_func is fai.flash_attn_func


# ------------------------------------------------------------------------------------------
# A fake flash_attn_2_cuda: a pure-PyTorch reference that checks the contract's conventions
# ------------------------------------------------------------------------------------------

def _ref_attention(q, k, v, scale, causal, wl, wr, softcap, alibi):
    """q: (sq, h, d), k/v: (sk, hk, d); alibi: (h,) or None. Returns out (sq, h, d), lse (h, sq)."""
    sq, h, _ = q.shape
    sk, hk, _ = k.shape
    rep = h // hk
    k = k.repeat_interleave(rep, dim=1).float()
    v = v.repeat_interleave(rep, dim=1).float()
    s = torch.einsum("qhd,khd->hqk", q.float(), k) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    i = torch.arange(sq).view(-1, 1) + sk - sq
    j = torch.arange(sk).view(1, -1)
    if alibi is not None:
        s = s - alibi.float().view(-1, 1, 1) * (i - j).abs()
    if causal:
        wr = 0
    allowed = torch.ones(sq, sk, dtype=torch.bool)
    if wl >= 0:
        allowed &= j >= i - wl
    if wr >= 0:
        allowed &= j <= i + wr
    s = s.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse.unsqueeze(-1)).nan_to_num(0.0)
    out = torch.einsum("hqk,khd->qhd", p, v)
    lse = lse.masked_fill(~allowed.any(-1), float("inf"))
    return out.to(q.dtype), lse


def _check_qkv(q, k, v):
    """The contract of the real extension: head dims padded to a multiple of 8 by the wrapper; a
    strided last dimension is accepted (flash_api.cpp copies it, contiguous_last_dim)."""
    for x in (q, k, v):
        assert x.shape[-1] % 8 == 0, "head dim must be a multiple of 8"
        assert x.dtype == q.dtype


class FakeExt:
    def __init__(self):
        self.calls = []

    def fwd(self, q, k, v, out, alibi_slopes, dropout_p, softmax_scale, causal, wl, wr, softcap,
            return_softmax, num_splits):
        self.calls.append(("fwd", dict(q=q, k=k, v=v, softmax_scale=softmax_scale,
                                       num_splits=num_splits, dropout_p=dropout_p)))
        assert out is None and return_softmax is False
        assert isinstance(softmax_scale, float) and isinstance(num_splits, int)
        _check_qkv(q, k, v)
        outs, lses = [], []
        for b in range(q.shape[0]):
            alibi = None if alibi_slopes is None else alibi_slopes.view(-1, q.shape[2])[
                b if alibi_slopes.dim() == 2 else 0]
            o, l = _ref_attention(q[b], k[b], v[b], softmax_scale, causal, wl, wr, softcap, alibi)
            outs.append(o)
            lses.append(l)
        return torch.stack(outs), torch.stack(lses)

    def varlen_fwd(self, q, k, v, out, cu_seqlens_q, cu_seqlens_k, seqused_k, leftpad_k,
                   block_table, alibi_slopes, max_seqlen_q, max_seqlen_k, dropout_p,
                   softmax_scale, zero_tensors, causal, wl, wr, softcap, return_softmax,
                   num_splits):
        self.calls.append(("varlen_fwd", dict(q=q, k=k, v=v, softmax_scale=softmax_scale,
                                              num_splits=num_splits, block_table=block_table,
                                              max_seqlen_q=max_seqlen_q,
                                              max_seqlen_k=max_seqlen_k)))
        assert cu_seqlens_q.dtype == torch.int32 and cu_seqlens_k.dtype == torch.int32
        assert out is None and zero_tensors is False and return_softmax is False
        assert seqused_k is None and leftpad_k is None and block_table is None
        _check_qkv(q, k, v)
        out = torch.empty_like(q)
        lse = torch.empty(q.shape[1], q.shape[0], dtype=torch.float32)
        for b in range(cu_seqlens_q.numel() - 1):
            q0, q1 = cu_seqlens_q[b].item(), cu_seqlens_q[b + 1].item()
            k0, k1 = cu_seqlens_k[b].item(), cu_seqlens_k[b + 1].item()
            o, l = _ref_attention(q[q0:q1], k[k0:k1], v[k0:k1], softmax_scale, causal, wl, wr,
                                  softcap, alibi_slopes)
            out[q0:q1] = o
            lse[:, q0:q1] = l
        return out, lse

    def fwd_kvcache(self, q, k_cache, v_cache, k, v, cache_seqlens, rotary_cos, rotary_sin,
                    cache_batch_idx, cache_leftpad, block_table, alibi_slopes, out,
                    softmax_scale, causal, wl, wr, softcap, rotary_interleaved, num_splits):
        self.calls.append(("fwd_kvcache", dict(q=q, k=k, v=v, cache_seqlens=cache_seqlens,
                                               softmax_scale=softmax_scale,
                                               num_splits=num_splits,
                                               rotary_interleaved=rotary_interleaved)))
        assert out is None and k is None and v is None and rotary_cos is None
        outs, lses = [], []
        for b in range(q.shape[0]):
            n = k_cache.shape[1] if cache_seqlens is None else int(cache_seqlens[b])
            o, l = _ref_attention(q[b], k_cache[b, :n], v_cache[b, :n], softmax_scale, causal,
                                  wl, wr, softcap, None)
            outs.append(o)
            lses.append(l)
        return torch.stack(outs), torch.stack(lses)

    def num_splits_heuristic(self, batch, nheads, nheads_k, seqlen_q, seqlen_k, headdim,
                             num_sms, num_splits):
        self.calls.append(("num_splits_heuristic", dict(num_sms=num_sms, num_splits=num_splits)))
        if num_splits > 0:
            return num_splits
        return 1 if seqlen_q > 1 else 4

    def build_info(self):
        return {"headdims": [64, 128], "dtypes": ["fp16", "bf16"], "archs": ["90"]}


@pytest.fixture
def ext(monkeypatch):
    fake = FakeExt()
    monkeypatch.setattr(fai, "_ext_module", fake)
    return fake


def _qkv(b=2, sq=5, sk=7, h=4, hk=2, d=64, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, sq, h, d, generator=g, dtype=dtype)
    k = torch.randn(b, sk, hk, d, generator=g, dtype=dtype)
    v = torch.randn(b, sk, hk, d, generator=g, dtype=dtype)
    return q, k, v


def _ref_batched(q, k, v, scale=None, causal=False, window=(-1, -1), softcap=0.0):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    res = [_ref_attention(q[b], k[b], v[b], scale, causal, *window, softcap, None)
           for b in range(q.shape[0])]
    return torch.stack([r[0] for r in res]), torch.stack([r[1] for r in res])


# ------------------------------------------------------------------------------------------
# Plumbing through the fake extension
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("d", [8, 20, 64, 100])
@pytest.mark.parametrize("causal", [False, True])
def test_flash_attn_func_headdim_padding_and_scale(ext, d, causal):
    q, k, v = _qkv(d=d)
    out, lse, s = flash_attn.flash_attn_func(q, k, v, causal=causal, return_attn_probs=True)
    assert s is None
    assert out.shape == q.shape and lse.shape == (2, 4, 5) and lse.dtype == torch.float32
    (name, call), = ext.calls
    assert name == "fwd"
    assert call["q"].shape[-1] == math.ceil(d / 8) * 8
    assert call["softmax_scale"] == pytest.approx(d ** -0.5)  # scale of the ORIGINAL head dim
    assert call["num_splits"] == 0
    ref_out, ref_lse = _ref_batched(q, k, v, causal=causal)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(lse, ref_lse)


def test_flash_attn_func_passes_arguments(ext):
    q, k, v = _qkv()
    out = flash_attn.flash_attn_func(q, k, v, softmax_scale=0.3, window_size=(2, 1), softcap=5.0,
                                     num_splits=3)
    assert ext.calls[0][1]["softmax_scale"] == pytest.approx(0.3)
    assert ext.calls[0][1]["num_splits"] == 3
    ref, _ = _ref_batched(q, k, v, scale=0.3, window=(2, 1), softcap=5.0)
    torch.testing.assert_close(out, ref)
    assert isinstance(out, torch.Tensor)  # no tuple unless return_attn_probs


def test_no_copy_when_already_fine(ext):
    q, k, v = _qkv(d=64)
    flash_attn.flash_attn_func(q, k, v)
    call = ext.calls[0][1]
    assert call["q"].data_ptr() == q.data_ptr() and call["k"].data_ptr() == k.data_ptr()


def test_last_dim_made_contiguous(ext):
    q, k, v = _qkv(d=32)
    qt = q.transpose(-1, -2).contiguous().transpose(-1, -2)  # same values, stride(-1) != 1
    assert qt.stride(-1) != 1
    out = flash_attn.flash_attn_func(qt, k, v)
    torch.testing.assert_close(out, _ref_batched(q, k, v)[0])


def test_dropout_rejected(ext):
    q, k, v = _qkv()
    with pytest.raises(RuntimeError, match="dropout_p > 0 is not supported"):
        flash_attn.flash_attn_func(q, k, v, dropout_p=0.1)
    with pytest.raises(RuntimeError, match="dropout_p > 0 is not supported"):
        flash_attn.flash_attn_varlen_qkvpacked_func(
            torch.randn(4, 3, 2, 8), torch.tensor([0, 4], dtype=torch.int32), 4, 0.5)
    assert ext.calls == []


def test_grad_mode_forward_runs_backward_raises(ext):
    q, k, v = _qkv(d=24)
    q.requires_grad_(True)
    out, lse, _ = flash_attn.flash_attn_func(q, k, v, return_attn_probs=True, deterministic=True)
    assert out.requires_grad and not lse.requires_grad
    torch.testing.assert_close(out.detach(), _ref_batched(q.detach(), k, v)[0])
    with pytest.raises(NotImplementedError, match="backward is not implemented"):
        out.sum().backward()


def test_qkvpacked_and_kvpacked(ext):
    b, s, h, d = 2, 6, 4, 40
    qkv = torch.randn(b, s, 3, h, d)
    out = flash_attn.flash_attn_qkvpacked_func(qkv, causal=True)
    torch.testing.assert_close(
        out, _ref_batched(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], causal=True)[0])
    q = torch.randn(b, 3, h, d)
    kv = torch.randn(b, s, 2, 2, d)
    out, lse, _ = flash_attn.flash_attn_kvpacked_func(q, kv, return_attn_probs=True)
    ref_out, ref_lse = _ref_batched(q, kv[:, :, 0], kv[:, :, 1])
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(lse, ref_lse)
    assert all(c[1]["num_splits"] == 0 for c in ext.calls)


def _varlen_inputs(seqlens_q, seqlens_k, h=4, hk=2, d=64):
    cu_q = torch.tensor([0, *torch.tensor(seqlens_q).cumsum(0).tolist()], dtype=torch.int32)
    cu_k = torch.tensor([0, *torch.tensor(seqlens_k).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(int(cu_q[-1]), h, d)
    k = torch.randn(int(cu_k[-1]), hk, d)
    v = torch.randn(int(cu_k[-1]), hk, d)
    return q, k, v, cu_q, cu_k


@pytest.mark.parametrize("d", [16, 36])
def test_varlen_func(ext, d):
    sq, sk = [3, 1, 4], [5, 2, 4]
    q, k, v, cu_q, cu_k = _varlen_inputs(sq, sk, d=d)
    out, lse, s = flash_attn.flash_attn_varlen_func(
        q, k, v, cu_q, cu_k, max(sq), max(sk), causal=True, return_attn_probs=True, num_splits=2)
    assert s is None and out.shape == q.shape and lse.shape == (4, q.shape[0])
    call = ext.calls[0][1]
    assert call["num_splits"] == 2 and call["max_seqlen_q"] == 4 and call["max_seqlen_k"] == 5
    assert call["softmax_scale"] == pytest.approx(d ** -0.5)
    for b in range(3):
        q0, q1, k0, k1 = cu_q[b], cu_q[b + 1], cu_k[b], cu_k[b + 1]
        ro, rl = _ref_attention(q[q0:q1], k[k0:k1], v[k0:k1], d ** -0.5, True, -1, -1, 0.0, None)
        torch.testing.assert_close(out[q0:q1], ro)
        torch.testing.assert_close(lse[:, q0:q1], rl)


def test_varlen_packed(ext):
    sq = [3, 5]
    q, k, v, cu, _ = _varlen_inputs(sq, sq, h=2, hk=2)
    out = flash_attn.flash_attn_varlen_qkvpacked_func(torch.stack([q, k, v], dim=1), cu, max(sq))
    out2 = flash_attn.flash_attn_varlen_kvpacked_func(
        q, torch.stack([k, v], dim=1), cu, cu, max(sq), max(sq))
    ref = flash_attn.flash_attn_varlen_func(q, k, v, cu, cu, max(sq), max(sq))
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(out2, ref)


def test_empty_rows_output_zero_lse_inf(ext):
    # seqlen_q > seqlen_k with causal: the first rows see no key
    q, k, v = _qkv(sq=5, sk=2)
    out, lse, _ = flash_attn.flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    assert torch.all(out[:, :3] == 0) and torch.all(lse[:, :, :3] == float("inf"))


def test_kvcache(ext):
    b, h, hk, d, cache_len = 3, 4, 2, 64, 16
    q = torch.randn(b, 1, h, d)
    k_cache = torch.randn(b, cache_len, hk, d)
    v_cache = torch.randn(b, cache_len, hk, d)
    out, lse = flash_attn.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=9,
                                                  return_softmax_lse=True)
    call = ext.calls[0][1]
    cs = call["cache_seqlens"]
    assert cs.dtype == torch.int32 and cs.shape == (b,) and cs.device == q.device
    assert cs.tolist() == [9] * b
    assert call["softmax_scale"] == pytest.approx(d ** -0.5) and call["num_splits"] == 0
    assert call["rotary_interleaved"] is True
    ref_out, ref_lse = _ref_batched(q, k_cache[:, :9], v_cache[:, :9])
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(lse, ref_lse)
    out = flash_attn.flash_attn_with_kvcache(q, k_cache, v_cache, num_splits=5)
    assert isinstance(out, torch.Tensor) and ext.calls[1][1]["num_splits"] == 5
    assert ext.calls[1][1]["cache_seqlens"] is None


def test_kvcache_missing_in_extension(monkeypatch):
    fake = types.SimpleNamespace(fwd=None)
    monkeypatch.setattr(fai, "_ext_module", fake)
    q = torch.randn(1, 1, 2, 64)
    with pytest.raises(RuntimeError, match="fwd_kvcache"):
        flash_attn.flash_attn_with_kvcache(q, torch.randn(1, 4, 2, 64), torch.randn(1, 4, 2, 64))


def test_num_splits_heuristic_and_build_info(ext, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert flash_attn.num_splits_heuristic(1, 32, 8, 1, 8192, 128) == 4
    assert ext.calls[-1][1] == {"num_sms": 132, "num_splits": 0}
    assert flash_attn.num_splits_heuristic(1, 32, 8, 1, 8192, 128, num_sms=78, num_splits=3) == 3
    assert ext.calls[-1][1] == {"num_sms": 78, "num_splits": 3}
    assert flash_attn.num_splits_heuristic(1, 32, 8, 7, 8192, 128) == 1
    info = flash_attn.build_info()
    assert info["headdims"] == [64, 128] and isinstance(info, dict)


def test_missing_extension_message(monkeypatch):
    try:
        import flash_attn_2_cuda  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("extension is built here")
    monkeypatch.setattr(fai, "_ext_module", None)
    q, k, v = _qkv()
    with pytest.raises(ImportError, match="flash_attn_2_cuda extension is not built"):
        flash_attn.flash_attn_func(q, k, v)


def test_custom_op_opcheck(ext):
    if not hasattr(fai, "_fwd_op"):
        pytest.skip("torch.library.custom_op unavailable")
    q, k, v = _qkv(d=32)
    torch.library.opcheck(fai._fwd_op, (q, k, v, None, 0.0, 0.2, True, -1, -1, 0.0, 0))
    qv, kv, vv, cu_q, cu_k = _varlen_inputs([3, 2], [4, 4], d=32)
    torch.library.opcheck(
        fai._varlen_fwd_op, (qv, kv, vv, cu_q, cu_k, None, None, 3, 4, 0.0, 0.2, False, -1, -1, 0.0, 0))


def test_torch_compile_traces_forward(ext):
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(str(gm.graph))
        return gm.forward

    torch._dynamo.reset()
    q, k, v = _qkv(d=20)
    compiled = torch.compile(
        lambda q, k, v: flash_attn.flash_attn_func(q, k, v, causal=True), backend=backend,
        fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v), _ref_batched(q, k, v, causal=True)[0])
    assert len(graphs) == 1 and "flash_attn_fwd_only" in graphs[0]  # the custom op, opaque


def test_torch_compile_with_requires_grad_falls_back(ext):
    # The backward cannot be traced (it only raises), so dynamo graph-breaks around the call;
    # the forward still runs and backward raises NotImplementedError, as in eager mode.
    torch._dynamo.reset()
    q, k, v = _qkv(d=32)
    q.requires_grad_(True)
    compiled = torch.compile(lambda q, k, v: flash_attn.flash_attn_func(q * 1, k, v),
                             backend="aot_eager")
    out = compiled(q, k, v)
    assert out.requires_grad
    torch.testing.assert_close(out.detach(), _ref_batched(q.detach(), k, v)[0])
    with pytest.raises(NotImplementedError, match="backward is not implemented"):
        out.sum().backward()


def test_no_autograd_graph_without_requires_grad(ext):
    q, k, v = _qkv()
    out = flash_attn.flash_attn_func(q, k, v)
    assert out.grad_fn is None and not out.requires_grad
    with torch.no_grad():
        q.requires_grad_(True)
        out = flash_attn.flash_attn_func(q, k, v)
    assert out.grad_fn is None


# ------------------------------------------------------------------------------------------
# bert_padding (no extension needed)
# ------------------------------------------------------------------------------------------

def _random_mask(batch, seqlen, seed):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, seqlen + 1, (batch,), generator=g)
    lengths[1] = 0  # an all-zero row
    lengths[-1] = seqlen  # a full row
    mask = torch.arange(seqlen).view(1, -1) < lengths.view(-1, 1)
    return mask, lengths


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int64])
def test_unpad_pad_round_trip(seed, mask_dtype):
    batch, seqlen, h, d = 4, 9, 3, 5
    mask, lengths = _random_mask(batch, seqlen, seed)
    x = torch.randn(batch, seqlen, h, d)
    x_unpad, indices, cu_seqlens, max_seqlen, seqused = unpad_input(x, mask.to(mask_dtype))
    assert x_unpad.shape == (int(lengths.sum()), h, d)
    assert cu_seqlens.dtype == torch.int32 and seqused.dtype == torch.int32
    assert cu_seqlens.tolist() == [0, *lengths.cumsum(0).tolist()]
    assert seqused.tolist() == lengths.tolist()
    assert isinstance(max_seqlen, int) and max_seqlen == int(lengths.max())
    torch.testing.assert_close(x_unpad, x[mask])
    x_pad = pad_input(x_unpad, indices, batch, seqlen)
    torch.testing.assert_close(x_pad, x * mask.view(batch, seqlen, 1, 1))


def test_unpad_input_unused_mask():
    batch, seqlen = 3, 6
    mask, lengths = _random_mask(batch, seqlen, 3)
    unused = torch.zeros(batch, seqlen, dtype=torch.bool)
    unused[0, lengths[0]:lengths[0] + 1] = True  # one allocated-but-unused slot after row 0
    x = torch.randn(batch, seqlen, 8)
    x_unpad, indices, cu_seqlens, max_seqlen, seqused = unpad_input(x, mask, unused)
    total = lengths.clone()
    total[0] += int(unused[0].sum())
    assert cu_seqlens.tolist() == [0, *total.cumsum(0).tolist()]
    assert seqused.tolist() == lengths.tolist()
    assert max_seqlen == int(total.max())
    torch.testing.assert_close(x_unpad, x[mask | unused])


def test_index_first_axis_and_grads():
    x = torch.randn(10, 3, 4, requires_grad=True)
    idx = torch.tensor([7, 0, 3, 3])
    y = index_first_axis(x, idx)
    torch.testing.assert_close(y, x.detach()[idx])
    y.backward(torch.ones_like(y))
    expected = torch.zeros(10, 3, 4)
    expected[torch.tensor([7, 0, 3])] = 1.0  # scatter (not add) semantics, as upstream
    torch.testing.assert_close(x.grad, expected)

    vals = torch.randn(3, 2, requires_grad=True)
    idx = torch.tensor([4, 1, 2])
    out = index_put_first_axis(vals, idx, 6)
    assert out.shape == (6, 2)
    torch.testing.assert_close(out[idx], vals.detach())
    assert torch.all(out[torch.tensor([0, 3, 5])] == 0)
    (out * torch.arange(6.0).view(-1, 1)).sum().backward()
    torch.testing.assert_close(vals.grad, idx.float().view(-1, 1).expand(3, 2))


# ------------------------------------------------------------------------------------------
# benchmark utils
# ------------------------------------------------------------------------------------------

def test_benchmark_utils_cpu():
    from flash_attn.utils import benchmark as bm

    for name in ["benchmark_forward", "benchmark_backward", "benchmark_combined",
                 "benchmark_fwd_bwd", "benchmark_all", "pytorch_profiler", "benchmark_memory"]:
        assert callable(getattr(bm, name))
    x = torch.randn(8, 8, requires_grad=True)
    fn = lambda x, scale=1.0: (x * scale).sin()  # noqa: E731
    t, m = bm.benchmark_forward(fn, x, repeats=2, verbose=False, scale=2.0)
    assert m.mean > 0 and hasattr(t, "timeit")
    res = bm.benchmark_all(fn, x, repeats=2, verbose=False)
    assert len(res) == 3 and all(len(r) == 2 for r in res)
    assert len(bm.benchmark_fwd_bwd(fn, x, repeats=2, verbose=False)) == 2
    with pytest.raises(RuntimeError, match="Grad shape"):
        bm.benchmark_backward(fn, x, grad=torch.randn(3), verbose=False)
