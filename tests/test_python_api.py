"""CPU-only tests of the Python layer (flash_attn package): upstream 2.8.3's signatures, the
arguments handed to the native functions (positional, in upstream's order), autograd plumbing,
the custom ops and their fake implementations, torch.compile tracing, bert_padding, benchmark
utils. They need neither a GPU nor the compiled extension: the extension is replaced by a
pure-PyTorch stand-in (float32 math, autograd for the backward) that records every native call."""

import inspect
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import flash_attn
import flash_attn.flash_attn_interface as fai
from flash_attn.bert_padding import index_first_axis, index_put_first_axis, pad_input, unpad_input

_REQ = inspect.Parameter.empty

# ------------------------------------------------------------------------------------------
# Signatures (upstream flash-attn v2.8.3, flash_attn/flash_attn_interface.py; ours add the
# trailing num_splits where noted)
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

_BWD_TAIL = [
    ("dropout_p", _REQ), ("softmax_scale", _REQ), ("causal", _REQ), ("window_size_left", _REQ),
    ("window_size_right", _REQ), ("softcap", _REQ), ("alibi_slopes", _REQ),
    ("deterministic", _REQ), ("rng_state", None),
]
_BWD_HEAD = [
    ("dout", _REQ), ("q", _REQ), ("k", _REQ), ("v", _REQ), ("out", _REQ), ("softmax_lse", _REQ),
    ("dq", _REQ), ("dk", _REQ), ("dv", _REQ),
]
EXPECTED_PRIVATE_SIGNATURES = {
    "_flash_attn_forward": [
        ("q", _REQ), ("k", _REQ), ("v", _REQ), ("dropout_p", _REQ), ("softmax_scale", _REQ),
        ("causal", _REQ), ("window_size_left", _REQ), ("window_size_right", _REQ),
        ("softcap", _REQ), ("alibi_slopes", _REQ), ("return_softmax", _REQ),
        ("num_splits", 0),  # ours
    ],
    "_flash_attn_varlen_forward": [
        ("q", _REQ), ("k", _REQ), ("v", _REQ), ("cu_seqlens_q", _REQ), ("cu_seqlens_k", _REQ),
        ("max_seqlen_q", _REQ), ("max_seqlen_k", _REQ), ("dropout_p", _REQ),
        ("softmax_scale", _REQ), ("causal", _REQ), ("window_size_left", -1),
        ("window_size_right", -1), ("softcap", 0.0), ("alibi_slopes", None),
        ("return_softmax", False), ("block_table", None), ("leftpad_k", None),
        ("seqused_k", None), ("zero_tensors", False),
        ("num_splits", 0),  # ours
    ],
    "_flash_attn_backward": [*_BWD_HEAD, *_BWD_TAIL],
    "_flash_attn_varlen_backward": [
        *_BWD_HEAD, ("cu_seqlens_q", _REQ), ("cu_seqlens_k", _REQ), ("max_seqlen_q", _REQ),
        ("max_seqlen_k", _REQ), *_BWD_TAIL, ("zero_tensors", False),
    ],
}

_FN_TAIL = ["deterministic", "return_softmax", "is_grad_enabled"]
_FN_OPTS = ["dropout_p", "softmax_scale", "causal", "window_size", "softcap", "alibi_slopes"]
EXPECTED_FUNCTION_FORWARDS = {
    "FlashAttnQKVPackedFunc": ["ctx", "qkv", *_FN_OPTS, *_FN_TAIL],
    "FlashAttnKVPackedFunc": ["ctx", "q", "kv", *_FN_OPTS, *_FN_TAIL],
    "FlashAttnFunc": ["ctx", "q", "k", "v", *_FN_OPTS, *_FN_TAIL, "num_splits"],
    "FlashAttnVarlenQKVPackedFunc": ["ctx", "qkv", "cu_seqlens", "max_seqlen", *_FN_OPTS,
                                     *_FN_TAIL],
    "FlashAttnVarlenKVPackedFunc": ["ctx", "q", "kv", "cu_seqlens_q", "cu_seqlens_k",
                                    "max_seqlen_q", "max_seqlen_k", *_FN_OPTS, *_FN_TAIL],
    "FlashAttnVarlenFunc": ["ctx", "q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q",
                            "max_seqlen_k", *_FN_OPTS, "deterministic", "return_softmax",
                            "block_table", "is_grad_enabled", "num_splits"],
}

# torch.library infers int arguments as SymInt; the schemas are upstream's plus num_splits on
# the forwards, and the kv-cache op of ours.
EXPECTED_SCHEMAS = {
    "_flash_attn_forward":
        "flash_attn::_flash_attn_forward(Tensor q, Tensor k, Tensor v, float dropout_p, "
        "float softmax_scale, bool causal, SymInt window_size_left, SymInt window_size_right, "
        "float softcap, Tensor? alibi_slopes, bool return_softmax, SymInt num_splits=0) "
        "-> (Tensor, Tensor, Tensor, Tensor)",
    "_flash_attn_varlen_forward":
        "flash_attn::_flash_attn_varlen_forward(Tensor q, Tensor k, Tensor v, "
        "Tensor cu_seqlens_q, Tensor cu_seqlens_k, SymInt max_seqlen_q, SymInt max_seqlen_k, "
        "float dropout_p, float softmax_scale, bool causal, SymInt window_size_left=-1, "
        "SymInt window_size_right=-1, float softcap=0., Tensor? alibi_slopes=None, "
        "bool return_softmax=False, Tensor? block_table=None, Tensor? leftpad_k=None, "
        "Tensor? seqused_k=None, bool zero_tensors=False, SymInt num_splits=0) "
        "-> (Tensor, Tensor, Tensor, Tensor)",
    "_flash_attn_backward":
        "flash_attn::_flash_attn_backward(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, "
        "Tensor softmax_lse, Tensor(a6!)? dq, Tensor(a7!)? dk, Tensor(a8!)? dv, float dropout_p, "
        "float softmax_scale, bool causal, SymInt window_size_left, SymInt window_size_right, "
        "float softcap, Tensor? alibi_slopes, bool deterministic, Tensor? rng_state=None) "
        "-> Tensor",
    "_flash_attn_varlen_backward":
        "flash_attn::_flash_attn_varlen_backward(Tensor dout, Tensor q, Tensor k, Tensor v, "
        "Tensor out, Tensor softmax_lse, Tensor(a6!)? dq, Tensor(a7!)? dk, Tensor(a8!)? dv, "
        "Tensor cu_seqlens_q, Tensor cu_seqlens_k, SymInt max_seqlen_q, SymInt max_seqlen_k, "
        "float dropout_p, float softmax_scale, bool causal, SymInt window_size_left, "
        "SymInt window_size_right, float softcap, Tensor? alibi_slopes, bool deterministic, "
        "Tensor? rng_state=None, bool zero_tensors=False) -> Tensor",
    "_flash_attn_with_kvcache":
        "flash_attn::_flash_attn_with_kvcache(Tensor q, Tensor(a1!) k_cache, Tensor(a2!) v_cache, "
        "Tensor? k, Tensor? v, Tensor? cache_seqlens, Tensor? rotary_cos, Tensor? rotary_sin, "
        "Tensor? cache_batch_idx, Tensor? cache_leftpad, Tensor? block_table, "
        "Tensor? alibi_slopes, float softmax_scale, bool causal, SymInt window_size_left, "
        "SymInt window_size_right, float softcap, bool rotary_interleaved, SymInt num_splits) "
        "-> (Tensor, Tensor)",
}

UPSTREAM_EXPORTS = [
    "flash_attn_func", "flash_attn_kvpacked_func", "flash_attn_qkvpacked_func",
    "flash_attn_varlen_func", "flash_attn_varlen_kvpacked_func",
    "flash_attn_varlen_qkvpacked_func", "flash_attn_with_kvcache",
]


def _params(fn):
    return [(p.name, p.default) for p in inspect.signature(fn).parameters.values()]


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


@pytest.mark.parametrize("name", sorted(EXPECTED_PRIVATE_SIGNATURES))
def test_private_signature(name):
    assert _params(getattr(fai, name)) == EXPECTED_PRIVATE_SIGNATURES[name]


@pytest.mark.parametrize("name", sorted(EXPECTED_FUNCTION_FORWARDS))
def test_autograd_function_forward_arguments(name):
    fn = getattr(fai, name)
    assert issubclass(fn, torch.autograd.Function)
    assert [p for p, _ in _params(fn.forward)] == EXPECTED_FUNCTION_FORWARDS[name]
    if "num_splits" in EXPECTED_FUNCTION_FORWARDS[name]:
        assert _params(fn.forward)[-1] == ("num_splits", 0)  # upstream's argument list works


@pytest.mark.parametrize("name", sorted(EXPECTED_SCHEMAS))
def test_op_schema(name):
    op = getattr(torch.ops.flash_attn, name)
    assert str(op.default._schema) == EXPECTED_SCHEMAS[name]


def test_package_exports():
    assert flash_attn.__version__ == "2.8.3"
    for name in [*UPSTREAM_EXPORTS, "__version__", "num_splits_heuristic", "build_info"]:
        assert name in flash_attn.__all__, name
        assert getattr(flash_attn, name) is not None
    for name in UPSTREAM_EXPORTS:
        # the same objects are reachable through the upstream module path
        assert getattr(flash_attn, name) is getattr(fai, name)


# ------------------------------------------------------------------------------------------
# A stand-in flash_attn_2_cuda: float32 PyTorch math that records every call (all arguments
# positional, bound to the native parameter names below) and checks the contract's conventions
# ------------------------------------------------------------------------------------------

NATIVE_PARAMS = {
    "fwd": ["q", "k", "v", "out", "alibi_slopes", "dropout_p", "softmax_scale", "causal",
            "window_size_left", "window_size_right", "softcap", "return_softmax", "gen",
            "num_splits"],
    "varlen_fwd": ["q", "k", "v", "out", "cu_seqlens_q", "cu_seqlens_k", "seqused_k", "leftpad_k",
                   "block_table", "alibi_slopes", "max_seqlen_q", "max_seqlen_k", "dropout_p",
                   "softmax_scale", "zero_tensors", "causal", "window_size_left",
                   "window_size_right", "softcap", "return_softmax", "gen", "num_splits"],
    "bwd": ["dout", "q", "k", "v", "out", "softmax_lse", "dq", "dk", "dv", "alibi_slopes",
            "dropout_p", "softmax_scale", "causal", "window_size_left", "window_size_right",
            "softcap", "deterministic", "gen", "rng_state"],
    "varlen_bwd": ["dout", "q", "k", "v", "out", "softmax_lse", "dq", "dk", "dv", "cu_seqlens_q",
                   "cu_seqlens_k", "alibi_slopes", "max_seqlen_q", "max_seqlen_k", "dropout_p",
                   "softmax_scale", "zero_tensors", "causal", "window_size_left",
                   "window_size_right", "softcap", "deterministic", "gen", "rng_state"],
    "fwd_kvcache": ["q", "k_cache", "v_cache", "k", "v", "cache_seqlens", "rotary_cos",
                    "rotary_sin", "cache_batch_idx", "cache_leftpad", "block_table",
                    "alibi_slopes", "out", "softmax_scale", "causal", "window_size_left",
                    "window_size_right", "softcap", "rotary_interleaved", "num_splits"],
}


def _ref_attention(q, k, v, scale, causal, wl, wr, softcap, alibi):
    """q: (sq, h, d), k/v: (sk, hk, d); alibi: (h,) or None. float32 out (sq, h, d), lse (h, sq);
    differentiable."""
    sq, h, _ = q.shape
    sk, hk, _ = k.shape
    rep = h // hk
    k = k.float().repeat_interleave(rep, dim=1)
    v = v.float().repeat_interleave(rep, dim=1)
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
    return out, lse


def _ref_attention_grads(q, k, v, dout, scale, causal, wl, wr, softcap, alibi):
    """dq, dk, dv (float32) of _ref_attention's out for the output gradient dout."""
    sq, h, d = q.shape
    sk, hk, _ = k.shape
    rep = h // hk
    q, dout = q.float(), dout.float()
    ke = k.float().repeat_interleave(rep, dim=1)
    ve = v.float().repeat_interleave(rep, dim=1)
    s = torch.einsum("qhd,khd->hqk", q, ke) * scale
    capped = softcap * torch.tanh(s / softcap) if softcap > 0 else s
    with torch.no_grad():
        out, lse = _ref_attention(q, k, v, scale, causal, wl, wr, softcap, alibi)
    i = torch.arange(sq).view(-1, 1) + sk - sq
    j = torch.arange(sk).view(1, -1)
    bias = 0.0 if alibi is None else -alibi.float().view(-1, 1, 1) * (i - j).abs()
    p = torch.exp(capped + bias - lse.unsqueeze(-1)).nan_to_num(0.0)  # lse = +inf: p = 0
    p = torch.where(torch.isfinite(lse).unsqueeze(-1), p, torch.zeros_like(p))
    allowed = torch.ones(sq, sk, dtype=torch.bool)
    wr = 0 if causal else wr
    if wl >= 0:
        allowed &= j >= i - wl
    if wr >= 0:
        allowed &= j <= i + wr
    p = p * allowed
    dv = torch.einsum("hqk,qhd->khd", p, dout)
    dp = torch.einsum("qhd,khd->hqk", dout, ve)
    delta = (dout * out).sum(-1).transpose(0, 1).unsqueeze(-1)  # (h, sq, 1)
    ds = p * (dp - delta)
    if softcap > 0:
        ds = ds * (1 - torch.tanh(s / softcap) ** 2)
    dq = torch.einsum("hqk,khd->qhd", ds, ke) * scale
    dk = torch.einsum("hqk,qhd->khd", ds, q) * scale
    # MQA/GQA: each kv head receives the sum over the query heads that share it.
    dk = dk.view(sk, hk, rep, d).sum(2)
    dv = dv.view(sk, hk, rep, d).sum(2)
    return dq, dk, dv


def _alibi_row(alibi_slopes, b, nheads):
    if alibi_slopes is None:
        return None
    return alibi_slopes.view(-1, nheads)[b if alibi_slopes.dim() == 2 else 0]


def _check_head_dims(*xs):
    for x in xs:
        assert x.shape[-1] % 8 == 0, "the extension takes head dims that are multiples of 8"


def _pieces(c, batch):
    """(batch index, query rows, key rows) of each sequence of a varlen call."""
    cu_q, cu_k = c["cu_seqlens_q"].tolist(), c["cu_seqlens_k"].tolist()
    return [(b, slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])) for b in range(batch)]


def _paged(kv, block_table, b, rows):
    """Rows `rows` of sequence b of a paged (num_blocks, page_block_size, hk, d) cache."""
    return kv[block_table[b].long()].flatten(0, 1)[rows]


class FakeExt:
    def __init__(self):
        self.calls = []
        self.rng_states = []  # one per forward, to check that the backward gets it back

    def _rng_state(self):
        self.rng_states.append(torch.tensor([5, 11], dtype=torch.int64))
        return self.rng_states[-1]

    def _record(self, name, args):
        params = NATIVE_PARAMS[name]
        assert len(args) == len(params), (
            f"{name}: {len(args)} positional args, {len(params)} expected")
        call = dict(zip(params, args))
        self.calls.append((name, call))
        assert call.get("gen") is None  # no generator: the default CUDA generator
        return call

    def named(self, name):
        return [c for n, c in self.calls if n == name]

    @staticmethod
    def _check_dropout(c):
        # The extension's range check; the stand-in itself computes without dropout (plumbing only).
        if not 0.0 <= c["dropout_p"] < 1.0:
            raise RuntimeError(f"dropout_p must be in [0, 1), got {c['dropout_p']}")

    def fwd(self, *args):
        c = self._record("fwd", args)
        self._check_dropout(c)
        assert c["out"] is None and isinstance(c["softmax_scale"], float)
        assert isinstance(c["num_splits"], int)
        q, k, v = c["q"], c["k"], c["v"]
        _check_head_dims(q, k, v)
        outs, lses = [], []
        for b in range(q.shape[0]):
            o, l = _ref_attention(q[b], k[b], v[b], c["softmax_scale"], c["causal"],
                                  c["window_size_left"], c["window_size_right"], c["softcap"],
                                  _alibi_row(c["alibi_slopes"], b, q.shape[2]))
            outs.append(o)
            lses.append(l)
        return [torch.stack(outs).to(q.dtype), torch.stack(lses), None, self._rng_state()]

    def varlen_fwd(self, *args):
        c = self._record("varlen_fwd", args)
        self._check_dropout(c)
        assert c["cu_seqlens_q"].dtype == torch.int32 and c["cu_seqlens_k"].dtype == torch.int32
        assert c["out"] is None and c["zero_tensors"] is False
        assert c["seqused_k"] is None and c["leftpad_k"] is None
        q, k, v, bt = c["q"], c["k"], c["v"], c["block_table"]
        _check_head_dims(q, k, v)
        out = torch.zeros(q.shape, dtype=torch.float32)
        lse = torch.full((q.shape[1], q.shape[0]), float("inf"))
        for b, rq, rk in _pieces(c, c["cu_seqlens_q"].numel() - 1):
            if bt is not None:  # paged: sequence b's keys are rows 0.. of its pages
                rows = slice(0, rk.stop - rk.start)
                kb, vb = _paged(k, bt, b, rows), _paged(v, bt, b, rows)
            else:
                kb, vb = k[rk], v[rk]
            if rq.stop == rq.start:
                continue
            o, l = _ref_attention(q[rq], kb, vb, c["softmax_scale"], c["causal"],
                                  c["window_size_left"], c["window_size_right"], c["softcap"],
                                  _alibi_row(c["alibi_slopes"], b, q.shape[1]))
            out[rq], lse[:, rq] = o, l
        return [out.to(q.dtype), lse, None, self._rng_state()]

    @staticmethod
    def _grads(q, k, v, dout, c, alibi):
        """float32 gradients of the reference for one sequence, in closed form: the stand-in runs
        inside the custom ops, below autograd, where torch.autograd.grad records nothing."""
        return _ref_attention_grads(q, k, v, dout, c["softmax_scale"], c["causal"],
                                    c["window_size_left"], c["window_size_right"], c["softcap"],
                                    alibi)

    @staticmethod
    def _write_grads(c, dq, dk, dv):
        """Writes into the preallocated dq/dk/dv in place (allocating the ones not given)."""
        res = []
        for name, g in (("dq", dq), ("dk", dk), ("dv", dv)):
            buf = c[name] if c[name] is not None else torch.empty_like(c[name[1:]])
            assert buf.shape == c[name[1:]].shape and buf.stride(-1) == 1
            buf.copy_(g)
            res.append(buf)
        return res

    def bwd(self, *args):
        c = self._record("bwd", args)
        self._check_dropout(c)
        q, k, v, dout = c["q"], c["k"], c["v"], c["dout"]
        _check_head_dims(q, k, v, dout)
        assert c["rng_state"] is not None and c["rng_state"].dtype == torch.int64
        grads = [torch.zeros(x.shape) for x in (q, k, v)]
        for b in range(q.shape[0]):
            alibi = _alibi_row(c["alibi_slopes"], b, q.shape[2])
            g = self._grads(q[b], k[b], v[b], dout[b], c, alibi)
            for acc, gb in zip(grads, g):
                acc[b] = gb
        dq, dk, dv = self._write_grads(c, *grads)
        batch, seqlen_q, nheads, _ = q.shape
        softmax_d = torch.zeros(batch, nheads, seqlen_q)  # the extension's unpadded layout
        return [dq, dk, dv, softmax_d]

    def varlen_bwd(self, *args):
        c = self._record("varlen_bwd", args)
        self._check_dropout(c)
        q, k, v, dout = c["q"], c["k"], c["v"], c["dout"]
        _check_head_dims(q, k, v, dout)
        batch = c["cu_seqlens_q"].numel() - 1
        grads = [torch.zeros(x.shape) for x in (q, k, v)]
        for b, rq, rk in _pieces(c, batch):
            if rq.stop == rq.start:
                continue
            g = self._grads(q[rq], k[rk], v[rk], dout[rq], c,
                            _alibi_row(c["alibi_slopes"], b, q.shape[1]))
            grads[0][rq], grads[1][rk], grads[2][rk] = g
        dq, dk, dv = self._write_grads(c, *grads)
        softmax_d = torch.zeros(q.shape[1], q.shape[0])
        return [dq, dk, dv, softmax_d]

    def fwd_kvcache(self, *args):
        c = self._record("fwd_kvcache", args)
        assert c["out"] is None and c["rotary_cos"] is None and c["block_table"] is None
        q, k_cache, v_cache, k, v = c["q"], c["k_cache"], c["v_cache"], c["k"], c["v"]
        seqlens = c["cache_seqlens"]
        if seqlens is not None:
            assert seqlens.dtype == torch.int32 and seqlens.is_contiguous()
        outs, lses = [], []
        for b in range(q.shape[0]):
            n = k_cache.shape[1] if seqlens is None else int(seqlens[b])
            if k is not None:  # append in place, as the kernel does
                k_cache[b, n:n + k.shape[1]] = k[b]
                v_cache[b, n:n + v.shape[1]] = v[b]
                n += k.shape[1]
            o, l = _ref_attention(q[b], k_cache[b, :n], v_cache[b, :n], c["softmax_scale"],
                                  c["causal"], c["window_size_left"], c["window_size_right"],
                                  c["softcap"], _alibi_row(c["alibi_slopes"], b, q.shape[2]))
            outs.append(o)
            lses.append(l)
        return [torch.stack(outs).to(q.dtype), torch.stack(lses)]

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


def _qkv(b=2, sq=5, sk=7, h=4, hk=2, d=64, dtype=torch.float32, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, sq, h, d, generator=g, dtype=dtype)
    k = torch.randn(b, sk, hk, d, generator=g, dtype=dtype)
    v = torch.randn(b, sk, hk, d, generator=g, dtype=dtype)
    return [x.requires_grad_(requires_grad) for x in (q, k, v)]


def _ref_batched(q, k, v, scale=None, causal=False, window=(-1, -1), softcap=0.0, alibi=None):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    res = [_ref_attention(q[b], k[b], v[b], scale, causal, *window, softcap,
                          _alibi_row(alibi, b, q.shape[2])) for b in range(q.shape[0])]
    return torch.stack([r[0] for r in res]), torch.stack([r[1] for r in res])


def _varlen_inputs(seqlens_q, seqlens_k, h=4, hk=2, d=64, requires_grad=False):
    cu_q = torch.tensor([0, *torch.tensor(seqlens_q).cumsum(0).tolist()], dtype=torch.int32)
    cu_k = torch.tensor([0, *torch.tensor(seqlens_k).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(int(cu_q[-1]), h, d)
    k = torch.randn(int(cu_k[-1]), hk, d)
    v = torch.randn(int(cu_k[-1]), hk, d)
    return [x.requires_grad_(requires_grad) for x in (q, k, v)] + [cu_q, cu_k]


def _ref_varlen(q, k, v, cu_q, cu_k, causal=False, scale=None):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    outs, lses = [], []
    for b in range(cu_q.numel() - 1):
        q0, q1, k0, k1 = cu_q[b], cu_q[b + 1], cu_k[b], cu_k[b + 1]
        o, l = _ref_attention(q[q0:q1], k[k0:k1], v[k0:k1], scale, causal, -1, -1, 0.0, None)
        outs.append(o)
        lses.append(l)
    return torch.cat(outs), torch.cat(lses, dim=1)


# ------------------------------------------------------------------------------------------
# Forward plumbing
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("requires_grad", [False, True], ids=["direct", "autograd"])
def test_flash_attn_func_native_arguments(ext, requires_grad):
    q, k, v = _qkv(d=64, requires_grad=requires_grad)
    alibi = torch.rand(4)
    flash_attn.flash_attn_func(q, k, v, 0.0, 0.3, True, (5, 2), 4.0, alibi, True, False, 3)
    (name, c), = ext.calls
    assert name == "fwd"
    expected = dict(out=None, alibi_slopes=alibi, dropout_p=0.0, softmax_scale=0.3, causal=True,
                    window_size_left=5, window_size_right=2, softcap=4.0, return_softmax=False,
                    gen=None, num_splits=3)
    assert {n: c[n] for n in expected} == expected
    assert c["q"].data_ptr() == q.data_ptr() and c["k"].data_ptr() == k.data_ptr()


@pytest.mark.parametrize("requires_grad", [False, True], ids=["direct", "autograd"])
def test_flash_attn_varlen_func_native_arguments(ext, requires_grad):
    q, k, v, cu_q, cu_k = _varlen_inputs([3, 1, 4], [5, 2, 4], requires_grad=requires_grad)
    alibi = torch.rand(3, 4)
    flash_attn.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 4, 5, 0.0, 0.25, False, (-1, 3), 2.0,
                                      alibi, True, False, None, 2)
    (name, c), = ext.calls
    assert name == "varlen_fwd"
    expected = dict(out=None, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, seqused_k=None, leftpad_k=None,
                    block_table=None, alibi_slopes=alibi, max_seqlen_q=4, max_seqlen_k=5,
                    dropout_p=0.0, softmax_scale=0.25, zero_tensors=False, causal=False,
                    window_size_left=-1, window_size_right=3, softcap=2.0, return_softmax=False,
                    gen=None, num_splits=2)
    assert {n: c[n] for n in expected} == expected


def test_private_forward_native_arguments(ext):
    q, k, v = _qkv(d=32)
    res = fai._flash_attn_forward(q, k, v, 0.0, 0.5, False, 3, -1, 0.0, None, False)
    assert len(res) == 4
    out, lse, S_dmask, rng_state = res
    assert S_dmask.shape == (0,) and S_dmask.dtype == q.dtype
    assert rng_state.shape == (2,) and rng_state.dtype == torch.int64
    c = ext.named("fwd")[-1]
    assert (c["softmax_scale"], c["window_size_left"], c["num_splits"]) == (0.5, 3, 0)
    torch.testing.assert_close(out, _ref_batched(q, k, v, scale=0.5, window=(3, -1))[0])

    qv, kv, vv, cu_q, cu_k = _varlen_inputs([2, 3], [4, 1], d=32)
    seqused = torch.tensor([4, 1], dtype=torch.int32)
    with pytest.raises(AssertionError):  # the stand-in takes no seqused_k; it must arrive there
        fai._flash_attn_varlen_forward(qv, kv, vv, cu_q, cu_k, 3, 4, 0.0, 0.5, True,
                                       seqused_k=seqused)
    c = ext.named("varlen_fwd")[-1]
    assert c["seqused_k"] is seqused and c["max_seqlen_q"] == 3 and c["causal"] is True
    out, lse, S_dmask, rng_state = fai._flash_attn_varlen_forward(
        qv, kv, vv, cu_q, cu_k, 3, 4, 0.0, 0.5, True, num_splits=5)
    assert ext.named("varlen_fwd")[-1]["num_splits"] == 5 and S_dmask.shape == (0,)


@pytest.mark.parametrize("d", [8, 20, 59, 64, 100])
@pytest.mark.parametrize("causal", [False, True])
def test_flash_attn_func_headdim_padding_and_scale(ext, d, causal):
    q, k, v = _qkv(d=d)
    out, lse, S_dmask = flash_attn.flash_attn_func(q, k, v, causal=causal, return_attn_probs=True)
    assert S_dmask.shape == (0,)  # upstream's value without dropout: an empty tensor
    assert out.shape == q.shape and lse.shape == (2, 4, 5) and lse.dtype == torch.float32
    c = ext.named("fwd")[0]
    assert c["q"].shape[-1] == math.ceil(d / 8) * 8 == c["k"].shape[-1] == c["v"].shape[-1]
    assert c["softmax_scale"] == pytest.approx(d ** -0.5)  # scale of the ORIGINAL head dim
    ref_out, ref_lse = _ref_batched(q, k, v, causal=causal)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(lse, ref_lse)


def test_last_dim_strided_reaches_extension(ext):
    # The extension copies a strided last dimension (flash_api.cpp, contiguous_last_dim).
    q, k, v = _qkv(d=32)
    qt = q.transpose(-1, -2).contiguous().transpose(-1, -2)
    assert qt.stride(-1) != 1
    out = flash_attn.flash_attn_func(qt, k, v)
    torch.testing.assert_close(out, _ref_batched(q, k, v)[0])


def test_dropout_reaches_extension(ext):
    # dropout is the extension's to accept or reject; the Python layer passes it through, and the
    # forward's rng_state back to the backward.
    q, k, v = _qkv()
    flash_attn.flash_attn_func(q, k, v, dropout_p=0.1, return_attn_probs=True)
    c = ext.named("fwd")[-1]
    assert c["dropout_p"] == 0.1 and c["return_softmax"] is True
    with pytest.raises(RuntimeError, match="dropout_p"):
        flash_attn.flash_attn_func(q, k, v, dropout_p=1.0)
    qkv = torch.randn(4, 3, 2, 8, requires_grad=True)
    out = flash_attn.flash_attn_varlen_qkvpacked_func(qkv, torch.tensor([0, 4], dtype=torch.int32), 4, 0.5)
    assert ext.named("varlen_fwd")[-1]["dropout_p"] == 0.5
    assert ext.named("varlen_fwd")[-1]["return_softmax"] is False
    out.sum().backward()
    c = ext.named("varlen_bwd")[-1]
    assert c["dropout_p"] == 0.5 and c["rng_state"].data_ptr() == ext.rng_states[-1].data_ptr()


def test_qkvpacked_and_kvpacked_forward(ext):
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


@pytest.mark.parametrize("d", [16, 36])
def test_varlen_func(ext, d):
    sq, sk = [3, 1, 4, 0], [5, 2, 4, 3]
    q, k, v, cu_q, cu_k = _varlen_inputs(sq, sk, d=d)
    out, lse, s = flash_attn.flash_attn_varlen_func(
        q, k, v, cu_q, cu_k, max(sq), max(sk), causal=True, return_attn_probs=True, num_splits=2)
    assert s.shape == (0,) and out.shape == q.shape and lse.shape == (4, q.shape[0])
    c = ext.named("varlen_fwd")[0]
    assert c["num_splits"] == 2 and c["max_seqlen_q"] == 4 and c["max_seqlen_k"] == 5
    assert c["softmax_scale"] == pytest.approx(d ** -0.5)
    ref_out, ref_lse = _ref_varlen(q, k, v, cu_q, cu_k, causal=True)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(lse, ref_lse)


def test_varlen_paged_block_table_reaches_extension(ext):
    page, hk, d = 4, 2, 16
    q, _, _, cu_q, cu_k = _varlen_inputs([1, 1], [6, 3], d=d)
    k_pages, v_pages = torch.randn(5, page, hk, d), torch.randn(5, page, hk, d)
    block_table = torch.tensor([[3, 0], [4, 1]], dtype=torch.int32)
    out = flash_attn.flash_attn_varlen_func(q, k_pages, v_pages, cu_q, cu_k, 1, 6,
                                            block_table=block_table)
    assert ext.named("varlen_fwd")[0]["block_table"] is block_table
    for b, n in enumerate([6, 3]):
        kb = _paged(k_pages, block_table, b, slice(0, n))
        vb = _paged(v_pages, block_table, b, slice(0, n))
        ref, _ = _ref_attention(q[b:b + 1], kb, vb, d ** -0.5, False, -1, -1, 0.0, None)
        torch.testing.assert_close(out[b:b + 1], ref)


def test_varlen_packed_forward(ext):
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


def test_no_autograd_graph_without_requires_grad(ext):
    q, k, v = _qkv()
    out = flash_attn.flash_attn_func(q, k, v)
    assert out.grad_fn is None and not out.requires_grad
    with torch.no_grad():
        q.requires_grad_(True)
        out = flash_attn.flash_attn_func(q, k, v)
    assert out.grad_fn is None


class _DispatchedOps(TorchDispatchMode):
    """Names of the operators dispatched while active (custom ops included)."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def test_direct_calls_skip_function_and_ops(ext, monkeypatch):
    # Calls autograd does not record reach the extension without the autograd.Function and
    # without the custom-op dispatch: the decode hot path.
    def forbidden(*args, **kwargs):
        raise AssertionError("hot path went through an autograd.Function")

    for fn in ["FlashAttnFunc", "FlashAttnVarlenFunc", "FlashAttnQKVPackedFunc",
               "FlashAttnKVPackedFunc", "FlashAttnVarlenQKVPackedFunc",
               "FlashAttnVarlenKVPackedFunc"]:
        monkeypatch.setattr(getattr(fai, fn), "apply", forbidden)
    q, k, v = _qkv()
    qv, kv, vv, cu_q, cu_k = _varlen_inputs([2, 3], [4, 1])
    for ctx in (torch.no_grad, torch.enable_grad):
        with ctx(), _DispatchedOps() as dispatched:
            flash_attn.flash_attn_func(q, k, v)
            flash_attn.flash_attn_qkvpacked_func(torch.stack([q, q, q], dim=2))
            flash_attn.flash_attn_kvpacked_func(q, torch.stack([k, v], dim=2))
            flash_attn.flash_attn_varlen_func(qv, kv, vv, cu_q, cu_k, 3, 4)
            flash_attn.flash_attn_varlen_qkvpacked_func(torch.stack([qv, qv, qv], 1), cu_q, 3)
            flash_attn.flash_attn_varlen_kvpacked_func(qv, torch.stack([kv, vv], 1), cu_q, cu_k,
                                                       3, 4)
            flash_attn.flash_attn_with_kvcache(q, k, v, cache_seqlens=3)
        assert not [n for n in dispatched.names if n.startswith("flash_attn.")]
    assert [n for n, _ in ext.calls] == [
        "fwd", "fwd", "fwd", "varlen_fwd", "varlen_fwd", "varlen_fwd", "fwd_kvcache"] * 2

    with _DispatchedOps() as dispatched:  # private functions called eagerly: direct too
        fai._flash_attn_with_kvcache(q, k, v, None, None, None, None, None, None, None, None,
                                     None, 0.1, False, -1, -1, 0.0, True, 0)
    assert not [n for n in dispatched.names if n.startswith("flash_attn.")]
    with _DispatchedOps() as dispatched:  # the control: the mode does see the op
        torch.ops.flash_attn._flash_attn_with_kvcache(q, k, v, None, None, None, None, None, None,
                                                      None, None, None, 0.1, False, -1, -1, 0.0,
                                                      True, 0)
    assert "flash_attn._flash_attn_with_kvcache.default" in dispatched.names


# ------------------------------------------------------------------------------------------
# Backward plumbing
# ------------------------------------------------------------------------------------------

def _grads_of(out, inputs, dout):
    return torch.autograd.grad(out, inputs, dout)


@pytest.mark.parametrize("d", [64, 59])
@pytest.mark.parametrize("deterministic", [False, True])
def test_flash_attn_func_backward(ext, d, deterministic):
    q, k, v = _qkv(sq=5, sk=7, h=4, hk=2, d=d, requires_grad=True)
    alibi = torch.rand(2, 4)
    kw = dict(softmax_scale=0.2, causal=True, window_size=(4, -1), softcap=3.0,
              alibi_slopes=alibi)
    out = flash_attn.flash_attn_func(q, k, v, deterministic=deterministic, **kw)
    dout = torch.randn_like(out)
    dq, dk, dv = _grads_of(out, (q, k, v), dout)
    ref, _ = _ref_batched(q, k, v, scale=0.2, causal=True, window=(4, -1), softcap=3.0,
                          alibi=alibi)
    for g, r in zip((dq, dk, dv), _grads_of(ref, (q, k, v), dout)):
        assert g.shape == r.shape  # sliced back to the original head dim; dk/dv of k's shape
        torch.testing.assert_close(g, r)

    (c,) = ext.named("bwd")
    fwd = ext.named("fwd")[0]
    d_pad = math.ceil(d / 8) * 8
    assert c["dout"].shape[-1] == d_pad and c["dq"].shape[-1] == d_pad
    if d % 8:
        assert torch.all(c["dout"][..., d:] == 0)  # zero-padded, not garbage
    expected = dict(alibi_slopes=alibi, dropout_p=0.0, softmax_scale=0.2, causal=True,
                    window_size_left=4, window_size_right=-1, softcap=3.0,
                    deterministic=deterministic, gen=None)
    assert {n: c[n] for n in expected} == expected
    assert c["rng_state"].data_ptr() == ext.rng_states[0].data_ptr()  # the forward's
    assert c["softmax_lse"].shape == (2, 4, 5)
    assert c["dk"].shape == c["k"].shape  # GQA: dk/dv of k's shape
    for name in ("q", "k", "v"):  # the tensors the forward used
        assert c[name].data_ptr() == fwd[name].data_ptr()


def _assert_views_of_one_buffer(tensors, base_shape):
    """The tensors are slices of one (contiguous) buffer of base_shape along the packing axis."""
    storage = {t.untyped_storage().data_ptr() for t in tensors}
    assert len(storage) == 1, "dq/dk/dv are not views of one buffer"
    nbytes = math.prod(base_shape) * tensors[0].element_size()
    assert tensors[0].untyped_storage().nbytes() == nbytes
    step = tensors[1].data_ptr() - tensors[0].data_ptr()
    assert step > 0 and all(
        b.data_ptr() - a.data_ptr() == step for a, b in zip(tensors, tensors[1:]))


@pytest.mark.parametrize("d", [64, 59])
def test_qkvpacked_backward_writes_one_buffer(ext, d):
    b, s, h = 2, 6, 4
    qkv = torch.randn(b, s, 3, h, d, requires_grad=True)
    out = flash_attn.flash_attn_qkvpacked_func(qkv, causal=True, deterministic=True)
    dout = torch.randn_like(out)
    (dqkv,) = _grads_of(out, (qkv,), dout)
    ref, _ = _ref_batched(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], causal=True)
    torch.testing.assert_close(dqkv, _grads_of(ref, (qkv,), dout)[0])
    (c,) = ext.named("bwd")
    d_pad = math.ceil(d / 8) * 8
    _assert_views_of_one_buffer([c["dq"], c["dk"], c["dv"]], (b, s, 3, h, d_pad))
    assert c["deterministic"] is True
    # no copy: the returned gradient is (a head-dim slice of) that buffer
    assert dqkv.untyped_storage().data_ptr() == c["dq"].untyped_storage().data_ptr()


@pytest.mark.parametrize("d", [64, 59])
def test_kvpacked_backward_writes_one_buffer(ext, d):
    q = torch.randn(2, 3, 4, d, requires_grad=True)
    kv = torch.randn(2, 6, 2, 2, d, requires_grad=True)
    out = flash_attn.flash_attn_kvpacked_func(q, kv, window_size=(2, 1))
    dout = torch.randn_like(out)
    dq, dkv = _grads_of(out, (q, kv), dout)
    ref, _ = _ref_batched(q, kv[:, :, 0], kv[:, :, 1], window=(2, 1))
    for g, r in zip((dq, dkv), _grads_of(ref, (q, kv), dout)):
        torch.testing.assert_close(g, r)
    (c,) = ext.named("bwd")
    _assert_views_of_one_buffer([c["dk"], c["dv"]], (2, 6, 2, 2, math.ceil(d / 8) * 8))
    assert c["deterministic"] is False
    assert dkv.untyped_storage().data_ptr() == c["dk"].untyped_storage().data_ptr()


@pytest.mark.parametrize("d", [64, 59])
@pytest.mark.parametrize("deterministic", [False, True])
def test_varlen_backward(ext, d, deterministic):
    sq, sk = [3, 1, 0, 4], [5, 2, 3, 0]
    q, k, v, cu_q, cu_k = _varlen_inputs(sq, sk, d=d, requires_grad=True)
    out = flash_attn.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(sq), max(sk), causal=True,
                                            deterministic=deterministic)
    dout = torch.randn_like(out)
    grads = _grads_of(out, (q, k, v), dout)
    ref, _ = _ref_varlen(q, k, v, cu_q, cu_k, causal=True)
    for g, r in zip(grads, _grads_of(ref, (q, k, v), dout, )):
        assert g.shape == r.shape
        torch.testing.assert_close(g, r)
    (c,) = ext.named("varlen_bwd")
    expected = dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, alibi_slopes=None, max_seqlen_q=4,
                    max_seqlen_k=5, dropout_p=0.0, zero_tensors=False, causal=True,
                    window_size_left=-1, window_size_right=-1, softcap=0.0,
                    deterministic=deterministic, gen=None)
    assert {n: c[n] for n in expected} == expected
    assert c["softmax_scale"] == pytest.approx(d ** -0.5)
    assert c["dout"].shape[-1] == math.ceil(d / 8) * 8
    assert c["rng_state"].data_ptr() == ext.rng_states[0].data_ptr()


@pytest.mark.parametrize("d", [64, 59])
def test_varlen_packed_backward_writes_one_buffer(ext, d):
    sq, sk = [3, 1, 4], [5, 2, 4]
    q, k, v, cu_q, cu_k = _varlen_inputs(sq, sk, h=2, hk=2, d=d)
    qkv = torch.stack([q, q, q], dim=1).requires_grad_(True)  # self-attention: seqlens sq
    out = flash_attn.flash_attn_varlen_qkvpacked_func(qkv, cu_q, max(sq), causal=True)
    dout = torch.randn_like(out)
    (dqkv,) = _grads_of(out, (qkv,), dout)
    ref, _ = _ref_varlen(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu_q, cu_q, causal=True)
    torch.testing.assert_close(dqkv, _grads_of(ref, (qkv,), dout)[0])
    c = ext.named("varlen_bwd")[-1]
    d_pad = math.ceil(d / 8) * 8
    _assert_views_of_one_buffer([c["dq"], c["dk"], c["dv"]], (q.shape[0], 3, 2, d_pad))
    assert c["cu_seqlens_q"] is cu_q and c["cu_seqlens_k"] is cu_q

    kv = torch.stack([k, v], dim=1).requires_grad_(True)
    qq = q.clone().requires_grad_(True)
    out = flash_attn.flash_attn_varlen_kvpacked_func(qq, kv, cu_q, cu_k, max(sq), max(sk),
                                                     deterministic=True)
    dq, dkv = _grads_of(out, (qq, kv), dout)
    ref, _ = _ref_varlen(qq, kv[:, 0], kv[:, 1], cu_q, cu_k)
    for g, r in zip((dq, dkv), _grads_of(ref, (qq, kv), dout)):
        torch.testing.assert_close(g, r)
    c = ext.named("varlen_bwd")[-1]
    _assert_views_of_one_buffer([c["dk"], c["dv"]], (k.shape[0], 2, 2, d_pad))
    assert c["deterministic"] is True


def test_packed_gradients_equal_unpacked(ext):
    qkv = torch.randn(2, 5, 3, 4, 32, requires_grad=True)
    q, k, v = [qkv.detach()[:, :, i].clone().requires_grad_(True) for i in range(3)]
    dout = torch.randn(2, 5, 4, 32)
    (dqkv,) = _grads_of(flash_attn.flash_attn_qkvpacked_func(qkv, causal=True), (qkv,), dout)
    grads = _grads_of(flash_attn.flash_attn_func(q, k, v, causal=True), (q, k, v), dout)
    assert torch.equal(dqkv, torch.stack(grads, dim=2))


def test_functions_with_upstream_argument_lists(ext):
    # External code calls the Functions with upstream's arguments (no num_splits).
    q, k, v = _qkv(d=32, requires_grad=True)
    out = fai.FlashAttnFunc.apply(q, k, v, 0.0, None, True, (-1, -1), 0.0, None, False, False,
                                  True)
    out.sum().backward()
    assert q.grad is not None and ext.named("fwd")[0]["num_splits"] == 0
    qv, kv, vv, cu_q, cu_k = _varlen_inputs([2, 3], [4, 1], d=32, requires_grad=True)
    out, lse, S_dmask = fai.FlashAttnVarlenFunc.apply(
        qv, kv, vv, cu_q, cu_k, 3, 4, 0.0, None, False, (-1, -1), 0.0, None, False, True, None,
        True)
    out.sum().backward()
    assert kv.grad is not None and S_dmask.shape == (0,) and lse.shape == (4, 5)


def test_private_backward_fills_gradients(ext):
    q, k, v = _qkv(d=32)
    out, lse, _, rng_state = fai._flash_attn_forward(q, k, v, 0.0, 0.3, True, -1, -1, 0.0, None,
                                                     False)
    dout = torch.randn_like(out)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    softmax_d = fai._flash_attn_backward(dout, q, k, v, out, lse, dq, dk, dv, 0.0, 0.3, True,
                                         -1, -1, 0.0, None, True, rng_state)
    assert softmax_d.shape == (2, 4, 5) and softmax_d.dtype == torch.float32
    qr, kr, vr = [x.clone().requires_grad_(True) for x in (q, k, v)]
    ref, _ = _ref_batched(qr, kr, vr, scale=0.3, causal=True)
    for g, r in zip((dq, dk, dv), _grads_of(ref, (qr, kr, vr), dout)):
        torch.testing.assert_close(g, r)
    assert ext.named("bwd")[0]["dq"] is dq and ext.named("bwd")[0]["deterministic"] is True

    qv, kv, vv, cu_q, cu_k = _varlen_inputs([2, 3], [4, 1], d=32)
    out, lse, _, rng_state = fai._flash_attn_varlen_forward(qv, kv, vv, cu_q, cu_k, 3, 4, 0.0,
                                                            0.3, False)
    dq, dk, dv = torch.empty_like(qv), torch.empty_like(kv), torch.empty_like(vv)
    softmax_d = fai._flash_attn_varlen_backward(torch.randn_like(out), qv, kv, vv, out, lse, dq,
                                                dk, dv, cu_q, cu_k, 3, 4, 0.0, 0.3, False, -1,
                                                -1, 0.0, None, False, rng_state)
    assert softmax_d.shape == (4, 5)
    assert ext.named("varlen_bwd")[0]["dk"] is dk


# ------------------------------------------------------------------------------------------
# Custom ops and torch.compile (CPU: aot_eager runs the ops' real implementations on the
# stand-in extension)
# ------------------------------------------------------------------------------------------

def test_opcheck_forward_ops(ext):
    q, k, v = _qkv(d=32)
    torch.library.opcheck(torch.ops.flash_attn._flash_attn_forward.default,
                          (q, k, v, 0.0, 0.2, True, -1, -1, 0.0, None, False, 0))
    qv, kv, vv, cu_q, cu_k = _varlen_inputs([3, 2], [4, 4], d=32)
    torch.library.opcheck(torch.ops.flash_attn._flash_attn_varlen_forward.default,
                          (qv, kv, vv, cu_q, cu_k, 3, 4, 0.0, 0.2, False))


def test_opcheck_backward_ops(ext):
    q, k, v = _qkv(d=32)
    out, lse, _, rng = fai._flash_attn_forward(q, k, v, 0.0, 0.2, True, -1, -1, 0.0, None, False)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    torch.library.opcheck(
        torch.ops.flash_attn._flash_attn_backward.default,
        (torch.randn_like(out), q, k, v, out, lse, dq, dk, dv, 0.0, 0.2, True, -1, -1, 0.0, None,
         False, rng))
    qv, kv, vv, cu_q, cu_k = _varlen_inputs([3, 2], [4, 4], d=32)
    out, lse, _, rng = fai._flash_attn_varlen_forward(qv, kv, vv, cu_q, cu_k, 3, 4, 0.0, 0.2,
                                                      False)
    dq, dk, dv = torch.empty_like(qv), torch.empty_like(kv), torch.empty_like(vv)
    torch.library.opcheck(
        torch.ops.flash_attn._flash_attn_varlen_backward.default,
        (torch.randn_like(out), qv, kv, vv, out, lse, dq, dk, dv, cu_q, cu_k, 3, 4, 0.0, 0.2,
         False, -1, -1, 0.0, None, False, rng))


def test_opcheck_kvcache_op(ext):
    q = torch.randn(2, 1, 4, 32)
    k_cache, v_cache = torch.randn(2, 8, 2, 32), torch.randn(2, 8, 2, 32)
    k, v = torch.randn(2, 1, 2, 32), torch.randn(2, 1, 2, 32)
    seqlens = torch.tensor([3, 5], dtype=torch.int32)
    torch.library.opcheck(
        torch.ops.flash_attn._flash_attn_with_kvcache.default,
        (q, k_cache, v_cache, k, v, seqlens, None, None, None, None, None, None, 0.2, True, -1, -1,
         0.0, True, 0))


class _GraphRecorder:
    """An aot_eager-like backend that keeps the forward and backward graphs' code."""

    def __init__(self):
        from torch._dynamo.backends.common import aot_autograd
        from torch._functorch.aot_autograd import make_boxed_func

        self.forward, self.backward = [], []

        def keep(store):
            def compiler(gm, example_inputs):
                store.append(gm.code)
                return make_boxed_func(gm.forward)

            return compiler

        self.backend = aot_autograd(fw_compiler=keep(self.forward), bw_compiler=keep(self.backward))


def _compiled_training_step(fn, backend):
    """Forward and loss compiled with fullgraph=True (a graph break raises); AOTAutograd traces
    the joint graph, so the backward graph is compiled there too, and loss.backward() runs it."""
    compiled_loss = torch.compile(lambda *inputs: (fn(*inputs).float() ** 2).sum(),
                                  backend=backend, fullgraph=True)

    def step(*inputs):
        loss = compiled_loss(*inputs)
        loss.backward()
        return loss

    return step


@pytest.mark.parametrize("d", [64, 59])
def test_compile_training_step_flash_attn_func(ext, d):
    torch._dynamo.reset()
    rec = _GraphRecorder()
    def fn(q, k, v):
        return flash_attn.flash_attn_func(q, k, v, causal=True, num_splits=2)

    inputs = _qkv(d=d, requires_grad=True)
    loss = _compiled_training_step(fn, rec.backend)(*inputs)
    grads = [x.grad.clone() for x in inputs]
    assert "flash_attn._flash_attn_forward" in rec.forward[0]
    assert "flash_attn._flash_attn_backward" in rec.backward[0]
    assert ext.named("fwd")[-1]["num_splits"] == 2

    eager = [x.detach().clone().requires_grad_(True) for x in inputs]
    out = fn(*eager)
    eager_loss = (out.float() ** 2).sum()
    eager_loss.backward()
    torch.testing.assert_close(loss, eager_loss)
    for g, x in zip(grads, eager):
        torch.testing.assert_close(g, x.grad)


def test_compile_training_step_varlen_and_packed(ext):
    torch._dynamo.reset()
    rec = _GraphRecorder()
    q, k, v, cu_q, cu_k = _varlen_inputs([3, 1, 4], [5, 2, 4], d=40, requires_grad=True)

    def fn(q, k, v):
        a = flash_attn.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 4, 5, causal=True,
                                              deterministic=True)
        kv = torch.stack([k, v], dim=1)
        # one tensor as both cu_seqlens, as self-attention callers pass it
        b = flash_attn.flash_attn_varlen_kvpacked_func(q, kv[:8], cu_q, cu_q, 4, 4)
        return a + b

    loss = _compiled_training_step(fn, rec.backend)(q, k, v)
    grads = [x.grad.clone() for x in (q, k, v)]
    assert rec.forward[0].count("flash_attn._flash_attn_varlen_forward") == 2
    assert rec.backward[0].count("flash_attn._flash_attn_varlen_backward") == 2
    assert sorted(c["deterministic"] for c in ext.named("varlen_bwd")) == [False, True]
    eager = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]
    eager_loss = (fn(*eager).float() ** 2).sum()
    eager_loss.backward()
    torch.testing.assert_close(loss, eager_loss)
    for g, x in zip(grads, eager):
        torch.testing.assert_close(g, x.grad)


def test_compile_inference_traces_forward_op(ext):
    torch._dynamo.reset()
    rec = _GraphRecorder()
    q, k, v = _qkv(d=20)
    compiled = torch.compile(lambda q, k, v: flash_attn.flash_attn_func(q, k, v, causal=True),
                             backend=rec.backend, fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v), _ref_batched(q, k, v, causal=True)[0])
    assert "flash_attn._flash_attn_forward" in rec.forward[0]


def test_compile_private_functions_go_through_ops(ext):
    # Upstream's private functions are the custom ops; code calling them under torch.compile
    # traces without a graph break.
    torch._dynamo.reset()
    rec = _GraphRecorder()
    q, k, v = _qkv(d=32)

    def fn(q, k, v):
        out, lse, _, _ = fai._flash_attn_forward(q, k, v, 0.0, 0.3, False, -1, -1, 0.0, None,
                                                 False)
        return out * lse.transpose(1, 2).unsqueeze(-1)

    torch.testing.assert_close(torch.compile(fn, backend=rec.backend, fullgraph=True)(q, k, v),
                               fn(q, k, v))
    assert "flash_attn._flash_attn_forward" in rec.forward[0]


# ------------------------------------------------------------------------------------------
# flash_attn_with_kvcache
# ------------------------------------------------------------------------------------------

def test_kvcache_native_arguments(ext):
    b, h, hk, d, cache_len = 3, 4, 2, 64, 16
    q = torch.randn(b, 1, h, d)
    k_cache = torch.randn(b, cache_len, hk, d)
    v_cache = torch.randn(b, cache_len, hk, d)
    out, lse = flash_attn.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=9,
                                                  return_softmax_lse=True)
    (c,) = ext.named("fwd_kvcache")
    cs = c["cache_seqlens"]
    assert cs.dtype == torch.int32 and cs.shape == (b,) and cs.device == q.device
    assert cs.tolist() == [9] * b
    expected = dict(k=None, v=None, rotary_cos=None, rotary_sin=None, cache_batch_idx=None,
                    cache_leftpad=None, block_table=None, alibi_slopes=None, out=None,
                    causal=False, window_size_left=-1, window_size_right=-1, softcap=0.0,
                    rotary_interleaved=True, num_splits=0)
    assert {n: c[n] for n in expected} == expected
    assert c["softmax_scale"] == pytest.approx(d ** -0.5)
    ref_out, ref_lse = _ref_batched(q, k_cache[:, :9], v_cache[:, :9])
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(lse, ref_lse)

    idx = torch.tensor([[2, 0, 1]], dtype=torch.int32).t()[:, 0]  # a strided view
    out = flash_attn.flash_attn_with_kvcache(q, k_cache, v_cache, cache_batch_idx=idx,
                                             softmax_scale=0.5, causal=True, window_size=(3, 0),
                                             softcap=2.0, rotary_interleaved=False, num_splits=5)
    c = ext.named("fwd_kvcache")[-1]
    assert isinstance(out, torch.Tensor)
    assert c["cache_batch_idx"].is_contiguous() and c["cache_batch_idx"].tolist() == [2, 0, 1]
    expected = dict(cache_seqlens=None, softmax_scale=0.5, causal=True, window_size_left=3,
                    window_size_right=0, softcap=2.0, rotary_interleaved=False, num_splits=5)
    assert {n: c[n] for n in expected} == expected


def _decode_step(q, k_cache, v_cache, k, v, seqlens):
    return flash_attn.flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=seqlens,
                                             causal=True, return_softmax_lse=True)


def test_kvcache_appends_in_place(ext):
    q = torch.randn(2, 1, 4, 32)
    k_cache, v_cache = torch.zeros(2, 8, 2, 32), torch.zeros(2, 8, 2, 32)
    k, v = torch.randn(2, 1, 2, 32), torch.randn(2, 1, 2, 32)
    _decode_step(q, k_cache, v_cache, k, v, torch.tensor([3, 5], dtype=torch.int32))
    assert torch.equal(k_cache[0, 3], k[0, 0]) and torch.equal(v_cache[1, 5], v[1, 0])


def test_compile_decode_step_appends_to_cache(ext):
    torch._dynamo.reset()
    rec = _GraphRecorder()
    q = torch.randn(2, 1, 4, 32)
    k_cache, v_cache = torch.randn(2, 8, 2, 32), torch.randn(2, 8, 2, 32)
    k, v = torch.randn(2, 1, 2, 32), torch.randn(2, 1, 2, 32)
    seqlens = torch.tensor([3, 5], dtype=torch.int32)
    kc_eager, vc_eager = k_cache.clone(), v_cache.clone()
    out_e, lse_e = _decode_step(q, kc_eager, vc_eager, k, v, seqlens)
    out_c, lse_c = torch.compile(_decode_step, backend=rec.backend, fullgraph=True)(
        q, k_cache, v_cache, k, v, seqlens)
    assert "flash_attn._flash_attn_with_kvcache" in rec.forward[0]
    torch.testing.assert_close(out_c, out_e)
    torch.testing.assert_close(lse_c, lse_e)
    assert torch.equal(k_cache, kc_eager) and torch.equal(v_cache, vc_eager)


# ------------------------------------------------------------------------------------------
# Other entry points
# ------------------------------------------------------------------------------------------

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
