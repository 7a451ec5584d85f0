"""flash_attn.modules.mha and flash_attn.utils.generation.InferenceParams.

CPU: SelfAttention / CrossAttention against a float64 softmax reference; MHA with
use_flash_attn=False (projection layout, GQA, cross-attention, mixer_subset, return_residual,
dwconv, checkpointing, decoding with InferenceParams); the flash path's wiring through the
stand-in extension of test_python_api (float32 math behind the real Python interface); errors;
upstream 2.8.3's signatures; ParallelMHA against MHA with the same weights over gloo (one rank
in-process, two spawned ranks). MHA with rotary runs Triton kernels: on CPU only under
TRITON_INTERPRET=1.

GPU: FlashSelfAttention / FlashCrossAttention and MHA(use_flash_attn=True) against float32
references, forward and backward, with the rule of tests/helpers.py: max|ours - ref| <=
2 max|pt - ref| + eps, pt being the same computation by PyTorch in the input dtype (here the
PyTorch classes, or MHA(use_flash_attn=False), run in that dtype). Varlen, GQA, rotary, ALiBi,
sliding window, and token-by-token decoding through flash_attn_with_kvcache.
"""

import copy
import dataclasses
import inspect
import os
import pathlib
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import flash_attn.flash_attn_interface as fai
import flash_attn.utils.generation as generation
from flash_attn.modules import mha
from flash_attn.modules.mha import (
    MHA,
    CrossAttention,
    FlashCrossAttention,
    FlashSelfAttention,
    ParallelMHA,
    SelfAttention,
    _update_kv_cache,
    get_alibi_slopes,
)
from flash_attn.utils.generation import InferenceParams
from helpers import DEVICE, assert_grad_close, assert_out_close, requires_gpu
from process_groups import run_on_ranks, single_rank_group
from reference import attention_ref, cu_seqlens_from_lengths, lengths_to_mask
from test_python_api import FakeExt

REPO = pathlib.Path(__file__).resolve().parents[1]
DTYPES = [torch.float16, torch.bfloat16]

try:
    import triton  # noqa: F401

    HAVE_TRITON = True
except ImportError:
    HAVE_TRITON = False

# Rotary runs Triton kernels: on a GPU, or on CPU tensors under Triton's interpreter.
ROTARY_DEVICE = "cuda" if torch.cuda.is_available() else (
    "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else None
)
requires_rotary = pytest.mark.skipif(
    not HAVE_TRITON or ROTARY_DEVICE is None,
    reason="rotary runs Triton kernels: needs triton and a CUDA GPU (or TRITON_INTERPRET=1)",
)


def gpu(test):
    for mark in requires_gpu:
        test = mark(test)
    return test


# ------------------------------------------------------------------------------------------
# Signatures of flash-attn v2.8.3 (flash_attn/modules/mha.py, flash_attn/utils/generation.py),
# written out by hand: a bare name is required, (name, default) has a default.
# ------------------------------------------------------------------------------------------

_MHA_INIT = [
    "embed_dim", "num_heads", ("num_heads_kv", None), ("cross_attn", False),
    ("qkv_proj_bias", True), ("out_proj_bias", True), ("dropout", 0.0), ("softmax_scale", None),
    ("causal", False), ("layer_idx", None), ("dwconv", False), ("rotary_emb_dim", 0),
    ("rotary_emb_base", 10000.0), ("rotary_emb_scale_base", None),
    ("rotary_emb_interleaved", False), ("use_alibi", False), ("window_size", (-1, -1)),
    ("fused_bias_fc", False), ("use_flash_attn", False), ("return_residual", False),
    ("checkpointing", False), ("device", None), ("dtype", None),
]
_PARALLEL_MHA_INIT = [
    "embed_dim", "num_heads", "process_group", ("num_heads_kv", None), ("qkv_proj_bias", True),
    ("out_proj_bias", True), ("dropout", 0.0), ("softmax_scale", None), ("causal", False),
    ("layer_idx", None), ("rotary_emb_dim", 0), ("rotary_emb_base", 10000.0),
    ("rotary_emb_scale_base", None), ("rotary_emb_interleaved", False), ("use_alibi", False),
    ("window_size", (-1, -1)), ("use_flash_attn", False), ("checkpointing", False),
    ("sequence_parallel", True), ("device", None), ("dtype", None),
]
_TORCH_ATTN_INIT = [("causal", False), ("softmax_scale", None), ("attention_dropout", 0.0)]

UPSTREAM_SIGNATURES = {
    "get_alibi_slopes": (get_alibi_slopes, ["nheads"]),
    "_update_kv_cache": (_update_kv_cache, ["kv", "inference_params", "layer_idx"]),
    "FlashSelfAttention": (FlashSelfAttention, [
        ("causal", False), ("softmax_scale", None), ("attention_dropout", 0.0),
        ("window_size", (-1, -1)), ("alibi_slopes", None), ("deterministic", False)]),
    "FlashSelfAttention.forward": (FlashSelfAttention.forward, [
        "self", "qkv", ("causal", None), ("cu_seqlens", None), ("max_seqlen", None)]),
    "FlashCrossAttention": (FlashCrossAttention, [
        ("causal", False), ("softmax_scale", None), ("attention_dropout", 0.0),
        ("alibi_slopes", None), ("window_size", (-1, -1)), ("deterministic", False)]),
    "FlashCrossAttention.forward": (FlashCrossAttention.forward, [
        "self", "q", "kv", ("causal", None), ("cu_seqlens", None), ("max_seqlen", None),
        ("cu_seqlens_k", None), ("max_seqlen_k", None)]),
    "SelfAttention": (SelfAttention, _TORCH_ATTN_INIT),
    "SelfAttention.forward": (SelfAttention.forward, [
        "self", "qkv", ("causal", None), ("key_padding_mask", None)]),
    "CrossAttention": (CrossAttention, _TORCH_ATTN_INIT),
    "CrossAttention.forward": (CrossAttention.forward, [
        "self", "q", "kv", ("causal", None), ("key_padding_mask", None)]),
    "MHA": (MHA, _MHA_INIT),
    "MHA.forward": (MHA.forward, [
        "self", "x", ("x_kv", None), ("key_padding_mask", None), ("cu_seqlens", None),
        ("max_seqlen", None), ("mixer_subset", None), ("inference_params", None), "**kwargs"]),
    "MHA.allocate_inference_cache": (MHA.allocate_inference_cache, [
        "self", "batch_size", "max_seqlen", ("dtype", None)]),
    "MHA._update_kv_cache": (MHA._update_kv_cache, ["self", "kv", "inference_params"]),
    "MHA._apply_rotary_update_kvcache_attention": (
        MHA._apply_rotary_update_kvcache_attention, ["self", "q", "kv", "inference_params"]),
    "MHA._update_kvcache_attention": (
        MHA._update_kvcache_attention, ["self", "q", "kv", "inference_params"]),
    "ParallelMHA": (ParallelMHA, _PARALLEL_MHA_INIT),
    "InferenceParams.reset": (InferenceParams.reset, ["self", "max_seqlen", "max_batch_size"]),
}


def _described(obj):
    out = []
    for p in inspect.signature(obj).parameters.values():
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            out.append(f"**{p.name}")
        elif p.default is inspect.Parameter.empty:
            out.append(p.name)
        else:
            out.append((p.name, p.default))
    return out


@pytest.mark.parametrize("name", list(UPSTREAM_SIGNATURES))
def test_upstream_signature(name):
    obj, expected = UPSTREAM_SIGNATURES[name]
    assert _described(obj) == expected


def test_inference_params_fields():
    fields = [(f.name, f.default, f.default_factory) for f in dataclasses.fields(InferenceParams)]
    missing = dataclasses.MISSING
    assert fields == [
        ("max_seqlen", missing, missing),
        ("max_batch_size", missing, missing),
        ("seqlen_offset", 0, missing),
        ("batch_size_offset", 0, missing),
        ("key_value_memory_dict", missing, dict),
        ("lengths_per_sample", None, missing),
    ]


def test_module_names():
    for name in ["get_alibi_slopes", "FlashSelfAttention", "FlashCrossAttention", "SelfAttention",
                 "CrossAttention", "MHA", "ParallelMHA", "_update_kv_cache"]:
        assert hasattr(mha, name), name
    # Gone from upstream's module since 2.8.0 (MHA builds nn.Linear itself); not here either.
    assert not hasattr(mha, "LinearResidual")


def test_import_needs_no_triton():
    code = (
        "import sys, flash_attn.modules, flash_attn.modules.mha, flash_attn.utils.generation; "
        "assert 'triton' not in sys.modules, 'importing flash_attn.modules.mha pulled in triton'"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr


# ------------------------------------------------------------------------------------------
# get_alibi_slopes, InferenceParams, and generation's decoding names
# ------------------------------------------------------------------------------------------


def test_alibi_slopes():
    assert get_alibi_slopes(8) == [2.0**-i for i in range(1, 9)]
    assert get_alibi_slopes(1) == [2.0**-8]
    # Not a power of two: the 4-head slopes, then the odd-indexed ones of the 8-head sequence.
    assert get_alibi_slopes(6) == [2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8, 2.0**-1, 2.0**-3]
    twelve = get_alibi_slopes(12)
    assert twelve[:8] == [2.0**-i for i in range(1, 9)]
    assert twelve[8:] == pytest.approx([2.0**-0.5, 2.0**-1.5, 2.0**-2.5, 2.0**-3.5], rel=1e-15)
    with pytest.raises(ValueError, match="nheads"):
        get_alibi_slopes(0)


def test_inference_params_reset():
    a = InferenceParams(max_seqlen=16, max_batch_size=2)
    b = InferenceParams(max_seqlen=16, max_batch_size=2)
    assert a.key_value_memory_dict is not b.key_value_memory_dict
    cache = torch.ones(3)
    a.key_value_memory_dict[0] = cache
    a.seqlen_offset, a.lengths_per_sample = 7, torch.tensor([7, 5], dtype=torch.int32)
    a.reset(32, 4)
    assert (a.max_seqlen, a.max_batch_size, a.seqlen_offset) == (32, 4, 0)
    assert a.lengths_per_sample.tolist() == [0, 0]
    assert a.key_value_memory_dict[0] is cache


@pytest.mark.parametrize("name", [
    "decode", "sample", "GenerationMixin", "DecodingCGCache", "update_graph_cache", "capture_graph",
    "decode_speculative", "sample_speculative", "allocate_inference_cache",
    "modify_logits_for_top_k_filtering", "modify_logits_for_top_p_filtering",
    "GreedySearchDecoderOnlyOutput", "SampleDecoderOnlyOutput",
])
def test_generation_names_provided(name):
    namespace = {}
    exec(f"from flash_attn.utils.generation import {name}", namespace)
    assert callable(namespace[name])


def test_generation_unknown_name_is_attribute_error():
    assert not hasattr(generation, "no_such_name")


# ------------------------------------------------------------------------------------------
# SelfAttention / CrossAttention against a float64 reference (CPU)
# ------------------------------------------------------------------------------------------


def softmax_attention_ref(q, k, v, allowed, softmax_scale=None):
    """float64 attention; q (b, sq, h, d), k / v (b, sk, hk, d), allowed bool (b, sq, sk).
    Returns out (b, sq, h, d) and the rows (b, sq) that have an allowed key."""
    q, k, v = q.double(), k.double(), v.double()
    group = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return torch.einsum("bhqk,bkhd->bqhd", probs, v), allowed.any(-1)


def random_key_padding_mask(batch, seqlen):
    mask = torch.rand(batch, seqlen) > 0.3
    mask[:, 0] = True  # every query keeps a key under the causal mask too
    return mask


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padding", [False, True])
@pytest.mark.parametrize("softmax_scale", [None, 0.3])
def test_self_attention_matches_reference(causal, padding, softmax_scale):
    b, s, h, d = 2, 9, 3, 16
    qkv = torch.randn(b, s, 3, h, d)
    mask = random_key_padding_mask(b, s) if padding else None
    out = SelfAttention(causal=causal, softmax_scale=softmax_scale)(qkv, key_padding_mask=mask)
    # SelfAttention's causal mask is the upper triangle whatever the padding.
    allowed = torch.ones(b, s, s, dtype=torch.bool)
    if causal:
        allowed &= torch.ones(s, s, dtype=torch.bool).tril()
    if padding:
        allowed &= mask[:, None, :]
    ref, _ = softmax_attention_ref(*qkv.unbind(2), allowed, softmax_scale)
    assert out.shape == (b, s, h, d) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, atol=2e-6, rtol=0)


def test_self_attention_causal_argument_overrides():
    qkv = torch.randn(2, 7, 3, 2, 8)
    causal_module, plain_module = SelfAttention(causal=True), SelfAttention(causal=False)
    torch.testing.assert_close(causal_module(qkv, causal=False), plain_module(qkv))
    torch.testing.assert_close(plain_module(qkv, causal=True), causal_module(qkv))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padding", [False, True])
@pytest.mark.parametrize("nheads_kv", [4, 2, 1])
@pytest.mark.parametrize("seqlens", [(5, 11), (11, 11)], ids=["sq<sk", "sq=sk"])
def test_cross_attention_matches_reference(causal, padding, nheads_kv, seqlens):
    b, h, d = 3, 4, 16
    sq, sk = seqlens
    q = torch.randn(b, sq, h, d)
    kv = torch.randn(b, sk, 2, nheads_kv, d)
    mask = random_key_padding_mask(b, sk) if padding else None
    out = CrossAttention(causal=causal, softmax_scale=0.2)(q, kv, key_padding_mask=mask)
    allowed = torch.ones(b, sq, sk, dtype=torch.bool)
    if causal:
        # Bottom-right alignment: the queries are the last positions of the kept keys.
        kept = mask.sum(-1) if padding else torch.full((b,), sk)
        rows, cols = torch.arange(sq)[:, None], torch.arange(sk)
        allowed &= cols <= rows + (kept - sq)[:, None, None]
    if padding:
        allowed &= mask[:, None, :]
    ref, rows = softmax_attention_ref(q, *kv.unbind(2), allowed, 0.2)
    assert out.shape == (b, sq, h, d)
    torch.testing.assert_close(out.double()[rows], ref[rows], atol=2e-6, rtol=0)


def test_attention_dropout_only_in_training():
    torch.manual_seed(0)
    attn = SelfAttention(attention_dropout=0.5)
    qkv = torch.randn(2, 8, 3, 2, 8)
    evaluated = attn.eval()(qkv)
    dropped = attn.train()(qkv)
    assert not torch.allclose(evaluated, dropped)
    torch.testing.assert_close(attn.eval()(qkv), evaluated)


def test_torch_attention_bad_inputs():
    with pytest.raises(ValueError, match="qkv must be"):
        SelfAttention()(torch.randn(2, 5, 2, 4, 8))
    with pytest.raises(ValueError, match="key_padding_mask must be a bool"):
        SelfAttention()(torch.randn(2, 5, 3, 4, 8), key_padding_mask=torch.ones(2, 5))
    with pytest.raises(ValueError, match="key_padding_mask must be a bool"):
        SelfAttention()(torch.randn(2, 5, 3, 4, 8), key_padding_mask=torch.ones(2, 4).bool())
    with pytest.raises(ValueError, match="kv must be"):
        CrossAttention()(torch.randn(2, 5, 4, 8), torch.randn(2, 5, 4, 8))
    with pytest.raises(ValueError, match="batch size and head dim"):
        CrossAttention()(torch.randn(2, 5, 4, 8), torch.randn(3, 5, 2, 4, 8))
    with pytest.raises(ValueError, match="not a multiple"):
        CrossAttention()(torch.randn(2, 5, 4, 8), torch.randn(2, 5, 2, 3, 8))


# ------------------------------------------------------------------------------------------
# MHA with PyTorch attention (CPU)
# ------------------------------------------------------------------------------------------


def mha_reference(m, x, x_kv=None, allowed=None):
    """MHA's forward in float64 from its weights (no rotary, no dwconv): the projection layout
    (q heads, then k heads, then v heads), attention, out_proj. allowed: (b, sq, sk) bool."""
    x = x.double()
    d = m.head_dim

    def linear(layer, inp):
        bias = None if layer.bias is None else layer.bias.double()
        return F.linear(inp, layer.weight.double(), bias)

    if m.cross_attn:
        q = linear(m.Wq, x)
        kv = linear(m.Wkv, x if x_kv is None else x_kv.double())
    else:
        qkv = linear(m.Wqkv, x)
        q, kv = qkv[..., : m.num_heads * d], qkv[..., m.num_heads * d :]
    q = q.unflatten(-1, (m.num_heads, d))
    k, v = kv.unflatten(-1, (2, m.num_heads_kv, d)).unbind(2)
    if allowed is None:
        allowed = torch.ones(q.shape[0], q.shape[1], k.shape[1], dtype=torch.bool)
    out, _ = softmax_attention_ref(q, k, v, allowed, m.inner_attn.softmax_scale)
    return linear(m.out_proj, out.flatten(-2))


@pytest.mark.parametrize("num_heads_kv", [None, 2, 1])
@pytest.mark.parametrize("causal", [False, True])
def test_mha_torch_matches_reference(num_heads_kv, causal):
    m = MHA(64, 4, num_heads_kv=num_heads_kv, causal=causal)
    hkv = num_heads_kv or 4
    assert (m.num_heads, m.num_heads_kv, m.head_dim) == (4, hkv, 16)
    assert m.Wqkv.weight.shape == (64 + 2 * hkv * 16, 64)
    assert type(m.inner_attn) is SelfAttention and type(m.inner_cross_attn) is CrossAttention
    x = torch.randn(2, 9, 64)
    out = m(x)
    allowed = torch.ones(2, 9, 9, dtype=torch.bool)
    if causal:
        allowed &= torch.ones(9, 9, dtype=torch.bool).tril()
    assert out.shape == x.shape
    ref = mha_reference(m, x, allowed=allowed)
    torch.testing.assert_close(out.double(), ref, atol=2e-6, rtol=0)


def test_mha_key_padding_mask():
    m = MHA(32, 2, softmax_scale=0.25)
    x = torch.randn(3, 8, 32)
    mask = random_key_padding_mask(3, 8)
    out = m(x, key_padding_mask=mask)
    ref = mha_reference(m, x, allowed=mask[:, None, :].expand(3, 8, 8))
    torch.testing.assert_close(out.double(), ref, atol=2e-6, rtol=0)


@pytest.mark.parametrize("num_heads_kv", [None, 2])
def test_mha_cross_attn(num_heads_kv):
    m = MHA(32, 4, num_heads_kv=num_heads_kv, cross_attn=True)
    assert not hasattr(m, "Wqkv")
    assert m.Wq.weight.shape == (32, 32) and m.Wkv.weight.shape == (2 * (num_heads_kv or 4) * 8, 32)
    x, x_kv = torch.randn(2, 5, 32), torch.randn(2, 11, 32)
    out = m(x, x_kv=x_kv)
    assert out.shape == (2, 5, 32)
    torch.testing.assert_close(out.double(), mha_reference(m, x, x_kv), atol=2e-6, rtol=0)
    # Without x_kv the keys come from x.
    torch.testing.assert_close(m(x).double(), mha_reference(m, x), atol=2e-6, rtol=0)
    # mixer_subset picks the query positions (e.g. a CLS token); keys still cover all of x.
    torch.testing.assert_close(m(x, mixer_subset=slice(0, 1)), m(x)[:, :1])


def test_mha_biases_and_state_dict_names():
    m = MHA(32, 4, qkv_proj_bias=False, out_proj_bias=False)
    assert m.Wqkv.bias is None and m.out_proj.bias is None
    assert set(MHA(32, 4).state_dict()) == {
        "Wqkv.weight", "Wqkv.bias", "out_proj.weight", "out_proj.bias"}
    assert set(MHA(32, 4, cross_attn=True).state_dict()) == {
        "Wq.weight", "Wq.bias", "Wkv.weight", "Wkv.bias", "out_proj.weight", "out_proj.bias"}
    assert {"dwconv_qkv.weight", "dwconv_qkv.bias"} <= set(MHA(32, 4, dwconv=True).state_dict())
    gqa = MHA(32, 4, num_heads_kv=2, dwconv=True)
    assert gqa.dwconv_q.weight.shape == (32, 1, 3) and gqa.dwconv_kv.weight.shape == (32, 1, 3)


def test_mha_return_residual():
    m = MHA(32, 4, return_residual=True)
    x = torch.randn(2, 5, 32)
    out, residual = m(x)
    assert residual is x
    m.return_residual = False
    torch.testing.assert_close(out, m(x))


def test_mha_device_and_dtype():
    m = MHA(32, 4, num_heads_kv=2, cross_attn=True, dwconv=True, dtype=torch.float64)
    assert {p.dtype for p in m.parameters()} == {torch.float64}
    assert m(torch.randn(2, 5, 32, dtype=torch.float64)).dtype == torch.float64


def test_mha_fused_bias_fc_has_no_effect():
    # As in upstream 2.8.3, whose MHA builds nn.Linear projections whatever fused_bias_fc says.
    fused, plain = MHA(32, 4, fused_bias_fc=True), MHA(32, 4)
    assert type(fused.Wqkv) is nn.Linear and type(fused.out_proj) is nn.Linear
    fused.load_state_dict(plain.state_dict())
    x = torch.randn(2, 5, 32)
    torch.testing.assert_close(fused(x), plain(x))


@pytest.mark.parametrize("layout", ["mha", "gqa", "cross"])
def test_mha_dwconv_is_causal(layout):
    kwargs = {"mha": {}, "gqa": {"num_heads_kv": 2}, "cross": {"cross_attn": True}}[layout]
    m = MHA(32, 4, causal=True, dwconv=True, **kwargs)
    x = torch.randn(2, 10, 32)
    y = x.clone()
    y[:, 6] += 1.0
    out_x, out_y = m(x), m(y)
    torch.testing.assert_close(out_x[:, :6], out_y[:, :6])
    assert not torch.allclose(out_x[:, 6], out_y[:, 6])


@pytest.mark.parametrize("num_heads_kv", [None, 2])
def test_mha_checkpointing(num_heads_kv):
    plain = MHA(32, 4, num_heads_kv=num_heads_kv, causal=True)
    ckpt = MHA(32, 4, num_heads_kv=num_heads_kv, causal=True, checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    x1 = torch.randn(2, 7, 32, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    dout = torch.randn(2, 7, 32)
    out1, out2 = plain(x1), ckpt(x2)
    out1.backward(dout)
    out2.backward(dout)
    torch.testing.assert_close(out1, out2)
    torch.testing.assert_close(x1.grad, x2.grad)
    torch.testing.assert_close(plain.Wqkv.weight.grad, ckpt.Wqkv.weight.grad)


def decode(m, x, prompt_len, inference_params, step=1, track_lengths=False):
    """Runs x's first prompt_len tokens, then the rest step tokens at a time, advancing the
    offsets as a decoding loop does; returns the outputs concatenated along the sequence."""
    outs = [m(x[:, :prompt_len], inference_params=inference_params)]
    pos = prompt_len
    while pos < x.shape[1]:
        inference_params.seqlen_offset = pos
        if track_lengths:
            inference_params.lengths_per_sample.fill_(pos)
        outs.append(m(x[:, pos : pos + step], inference_params=inference_params))
        pos += step
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("num_heads_kv", [None, 2, 1])
@pytest.mark.parametrize("step", [1, 3])
def test_mha_torch_decoding_matches_full_forward(num_heads_kv, step):
    m = MHA(64, 4, num_heads_kv=num_heads_kv, causal=True, layer_idx=3).eval()
    x = torch.randn(2, 11, 64)
    params = InferenceParams(max_seqlen=16, max_batch_size=2)
    cache = m.allocate_inference_cache(2, 16)
    assert cache.shape == (2, 16, 2, num_heads_kv or 4, 16) and cache.dtype == torch.float32
    params.key_value_memory_dict[3] = cache
    with torch.no_grad():
        decoded = decode(m, x, 5, params, step=step)
        full = m(x)
    torch.testing.assert_close(decoded, full, atol=1e-5, rtol=0)
    # The layer wrote into the cache it was given.
    assert params.key_value_memory_dict[3] is cache
    qkv = m.Wqkv(x).detach().unflatten(-1, (-1, 16))
    torch.testing.assert_close(cache[:, :11, 1], qkv[:, :, 4 + (num_heads_kv or 4) :])


def test_allocate_inference_cache_dtype():
    m = MHA(32, 4, num_heads_kv=1, dtype=torch.float64)
    assert m.allocate_inference_cache(3, 7).dtype == torch.float64
    assert m.allocate_inference_cache(3, 7, dtype=torch.float16).shape == (3, 7, 2, 1, 8)


def test_update_kv_cache_batch_offset_and_overflow():
    params = InferenceParams(max_seqlen=6, max_batch_size=3, batch_size_offset=1, seqlen_offset=2)
    kv = torch.randn(2, 3, 2, 1, 4)
    view = _update_kv_cache(kv, params, layer_idx=0)
    cache = params.key_value_memory_dict[0]
    assert cache.shape == (3, 6, 2, 1, 4)
    assert view.shape == (2, 5, 2, 1, 4) and view.data_ptr() == cache[1:].data_ptr()
    torch.testing.assert_close(cache[1:3, 2:5], kv)
    params.seqlen_offset = 4
    with pytest.raises(ValueError, match="overflows it"):
        _update_kv_cache(kv, params, layer_idx=0)


# ------------------------------------------------------------------------------------------
# Errors (CPU)
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,match", [
    (dict(embed_dim=30, num_heads=4), "embed_dim .* divisible by num_heads"),
    (dict(num_heads_kv=3), "num_heads .* divisible by num_heads_kv"),
    (dict(use_alibi=True), "use_alibi=True needs use_flash_attn=True"),
    (dict(window_size=(4, 0)), r"window_size=\(4, 0\) .*needs use_flash_attn=True"),
    (dict(rotary_emb_dim=8, cross_attn=True), "rotary_emb_dim .* cross_attn"),
])
def test_mha_constructor_errors(kwargs, match):
    args = dict(embed_dim=32, num_heads=4)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        MHA(**args)


def test_parallel_mha_needs_a_process_group():
    with pytest.raises(ValueError, match="process_group"):
        ParallelMHA(64, 4, process_group=None)


def _parallel_mha_shards(num_heads, num_heads_kv, head_dim, world_size, rank):
    """(rows of MHA's Wqkv, columns of its out_proj) that rank holds in a ParallelMHA: the query
    heads of its kv heads, then its k heads, then its v heads."""
    kv_per_rank = num_heads_kv // world_size
    queries_per_kv = num_heads // num_heads_kv
    kv_heads = torch.arange(rank * kv_per_rank, (rank + 1) * kv_per_rank)
    q_heads = torch.arange(kv_heads[0] * queries_per_kv, (kv_heads[-1] + 1) * queries_per_kv)

    def rows(heads, offset):
        return (offset + heads[:, None] * head_dim + torch.arange(head_dim)).flatten()

    q_rows = rows(q_heads, 0)
    k_rows = rows(kv_heads, num_heads * head_dim)
    v_rows = rows(kv_heads, (num_heads + num_heads_kv) * head_dim)
    return torch.cat([q_rows, k_rows, v_rows]), q_rows


def _check_parallel_mha(rank, group, world_size):
    batch, seqlen, embed_dim, num_heads, head_dim = 2, 4, 32, 4, 8
    for num_heads_kv in (None, 2):
        torch.manual_seed(0)  # the same reference and data on every rank
        reference = MHA(embed_dim, num_heads, num_heads_kv=num_heads_kv, causal=True)
        x_full = torch.randn(batch, seqlen, embed_dim)
        grad_full = torch.randn(batch, seqlen, embed_dim)
        x_ref = x_full.clone().requires_grad_()
        expected = reference(x_ref)
        expected.backward(grad_full)
        wqkv_rows, out_cols = _parallel_mha_shards(num_heads, num_heads_kv or num_heads, head_dim, world_size,
                                                   rank)
        for sequence_parallel in (True, False):
            parallel = ParallelMHA(embed_dim, num_heads, group, num_heads_kv=num_heads_kv, causal=True,
                                   sequence_parallel=sequence_parallel)
            assert parallel.num_heads_per_rank == num_heads // world_size
            with torch.no_grad():
                parallel.Wqkv.weight.copy_(reference.Wqkv.weight[wqkv_rows])
                parallel.Wqkv.bias.copy_(reference.Wqkv.bias[wqkv_rows])
                parallel.out_proj.weight.copy_(reference.out_proj.weight[:, out_cols])
                if rank == 0:
                    parallel.out_proj.bias.copy_(reference.out_proj.bias)
            if sequence_parallel:
                # (batch * seqlen, embed_dim), each rank holding its slice of the tokens.
                tokens = batch * seqlen // world_size
                rows = slice(rank * tokens, (rank + 1) * tokens)
                x = x_full.flatten(0, 1)[rows].clone().requires_grad_()
                out = parallel(x, seqlen=seqlen)
                torch.testing.assert_close(out, expected.flatten(0, 1)[rows])
                out.backward(grad_full.flatten(0, 1)[rows])
                torch.testing.assert_close(x.grad, x_ref.grad.flatten(0, 1)[rows])
            else:
                x = x_full.clone().requires_grad_()
                out = parallel(x)
                torch.testing.assert_close(out, expected)
                out.backward(grad_full)
                torch.testing.assert_close(x.grad, x_ref.grad)
            torch.testing.assert_close(parallel.Wqkv.weight.grad, reference.Wqkv.weight.grad[wqkv_rows])
            torch.testing.assert_close(parallel.out_proj.weight.grad, reference.out_proj.weight.grad[:, out_cols])
            cache = parallel.allocate_inference_cache(3, 7)
            assert cache.shape == (3, 7, 2, (num_heads_kv or num_heads) // world_size, head_dim)


def test_parallel_mha_single_rank():
    with single_rank_group() as group:
        _check_parallel_mha(0, group, 1)


def _parallel_mha_worker(rank, group):
    _check_parallel_mha(rank, group, 2)


def test_parallel_mha_two_ranks(tmp_path):
    run_on_ranks(_parallel_mha_worker, 2, tmp_path)


def test_mha_forward_errors():
    x = torch.randn(2, 5, 32)
    cu = torch.tensor([0, 5, 10], dtype=torch.int32)
    with pytest.raises(ValueError, match="x_kv and mixer_subset are for cross_attn"):
        MHA(32, 4)(x, x_kv=x)
    with pytest.raises(ValueError, match="cu_seqlens .* needs use_flash_attn=True"):
        MHA(32, 4)(x.flatten(0, 1), cu_seqlens=cu, max_seqlen=5)
    with pytest.raises(ValueError, match="max_seqlen must be given"):
        MHA(32, 4, use_flash_attn=True)(x.flatten(0, 1), cu_seqlens=cu)
    with pytest.raises(ValueError, match="key_padding_mask is for use_flash_attn=False"):
        MHA(32, 4, use_flash_attn=True)(x, key_padding_mask=torch.ones(2, 5, dtype=torch.bool))
    params = InferenceParams(max_seqlen=8, max_batch_size=2)
    with pytest.raises(ValueError, match="needs layer_idx"):
        MHA(32, 4, causal=True)(x, inference_params=params)
    with pytest.raises(ValueError, match="not supported with dwconv"):
        MHA(32, 4, dwconv=True, layer_idx=0)(x, inference_params=params)
    with pytest.raises(ValueError, match="cannot be combined"):
        MHA(32, 4, layer_idx=0)(x, key_padding_mask=torch.ones(2, 5, dtype=torch.bool),
                                inference_params=params)


def test_flash_attention_bad_inputs():
    qkv = torch.randn(2, 5, 3, 4, 8)
    with pytest.raises(ValueError, match="qkv must be float16 or bfloat16"):
        FlashSelfAttention()(qkv)
    packed = qkv.half().flatten(0, 1)
    with pytest.raises(ValueError, match="cu_seqlens must be a torch.int32 tensor"):
        FlashSelfAttention()(packed, cu_seqlens=torch.tensor([0, 5, 10]), max_seqlen=5)
    with pytest.raises(TypeError, match="max_seqlen must be an int"):
        FlashSelfAttention()(packed, cu_seqlens=torch.tensor([0, 5, 10], dtype=torch.int32),
                             max_seqlen=torch.tensor(5))
    q, kv = torch.randn(2, 5, 4, 8).half(), torch.randn(2, 5, 2, 4, 8).half()
    with pytest.raises(ValueError, match="kv must be float16 or bfloat16"):
        FlashCrossAttention()(q, kv.float())
    with pytest.raises(ValueError, match="batch size and head dim"):
        FlashCrossAttention()(q, kv[:1])
    cu = torch.tensor([0, 5, 10], dtype=torch.int32)
    with pytest.raises(ValueError, match="cu_seqlens_k"):
        FlashCrossAttention()(q.flatten(0, 1), kv.flatten(0, 1), cu_seqlens=cu, max_seqlen=5)


def test_rotary_needs_triton(monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn.layers.rotary", None)  # import fails
    with pytest.raises(ImportError, match="rotary_emb_dim > 0 needs flash_attn.layers.rotary"):
        MHA(32, 4, rotary_emb_dim=8)


# ------------------------------------------------------------------------------------------
# Flash path wiring on CPU: the real interface over a float32 stand-in of the extension
# ------------------------------------------------------------------------------------------


@pytest.fixture
def ext(monkeypatch):
    fake = FakeExt()
    monkeypatch.setattr(fai, "_ext_module", fake)
    return fake


def flash_and_torch_pair(dtype=torch.float16, **kwargs):
    """MHA(use_flash_attn=True) in dtype and float32 MHA(use_flash_attn=False) with its weights."""
    flash = MHA(use_flash_attn=True, dtype=dtype, **kwargs)
    ref = MHA(use_flash_attn=False, **kwargs)
    ref.load_state_dict({k: v.float() for k, v in flash.state_dict().items()})
    return flash, ref


@pytest.mark.parametrize("num_heads_kv", [None, 2])
@pytest.mark.parametrize("causal", [False, True])
def test_flash_wiring_matches_torch(ext, num_heads_kv, causal):
    flash, ref = flash_and_torch_pair(embed_dim=128, num_heads=4, num_heads_kv=num_heads_kv,
                                      causal=causal, softmax_scale=0.1)
    x = torch.randn(2, 9, 128, dtype=torch.float16, requires_grad=True)
    x_ref = x.detach().float().requires_grad_(True)
    out, out_ref = flash(x), ref(x_ref)
    torch.testing.assert_close(out.float(), out_ref, atol=2e-3, rtol=0)
    dout = torch.randn_like(out)
    out.backward(dout)
    out_ref.backward(dout.float())
    torch.testing.assert_close(x.grad.float(), x_ref.grad, atol=2e-3, rtol=0)
    name, call = ext.calls[0]
    assert name == "fwd"
    assert (call["causal"], call["softmax_scale"]) == (causal, 0.1)
    assert (call["window_size_left"], call["window_size_right"]) == (-1, -1)
    assert call["q"].shape[2] == 4 and call["k"].shape[2] == (num_heads_kv or 4)


def test_flash_wiring_alibi_window_dropout_deterministic(ext):
    slopes = torch.tensor(get_alibi_slopes(4)).half()  # what model.half() leaves in the buffer
    attn = FlashSelfAttention(causal=True, attention_dropout=0.25, window_size=(3, 0),
                              alibi_slopes=slopes, deterministic=True)
    qkv = torch.randn(2, 6, 3, 4, 16, dtype=torch.float16, requires_grad=True)
    attn.train()(qkv).sum().backward()
    attn.eval()(qkv)
    train_fwd, eval_fwd = ext.named("fwd")
    assert train_fwd["dropout_p"] == 0.25 and eval_fwd["dropout_p"] == 0.0
    assert train_fwd["alibi_slopes"].dtype == torch.float32
    assert attn.alibi_slopes.dtype == torch.float16  # the buffer is left as it is
    assert (train_fwd["window_size_left"], train_fwd["window_size_right"]) == (3, 0)
    assert ext.named("bwd")[0]["deterministic"] is True


@pytest.mark.parametrize("num_heads_kv", [None, 2])
def test_flash_wiring_varlen(ext, num_heads_kv):
    flash, _ = flash_and_torch_pair(embed_dim=64, num_heads=4, num_heads_kv=num_heads_kv,
                                    causal=True)
    lengths = [7, 3, 5]
    xs = [torch.randn(1, n, 64, dtype=torch.float16) for n in lengths]
    cu = cu_seqlens_from_lengths(lengths)
    kwargs = {} if num_heads_kv is None else {"cu_seqlens_k": cu, "max_seqlen_k": 7}
    packed = flash(torch.cat(xs, 1)[0], cu_seqlens=cu, max_seqlen=7, **kwargs)
    assert packed.shape == (15, 64)
    expected = torch.cat([flash(x)[0] for x in xs])
    torch.testing.assert_close(packed, expected, atol=1e-3, rtol=0)
    assert torch.equal(ext.named("varlen_fwd")[0]["cu_seqlens_q"], cu)


@pytest.mark.parametrize("num_heads_kv", [None, 2])
@pytest.mark.parametrize("lengths_per_sample", [False, True])
def test_flash_wiring_decoding(ext, num_heads_kv, lengths_per_sample):
    m = MHA(64, 4, num_heads_kv=num_heads_kv, causal=True, layer_idx=0, use_flash_attn=True,
            use_alibi=True, window_size=(4, 0), softmax_scale=0.2, dtype=torch.float16)
    x = torch.randn(2, 10, 64, dtype=torch.float16)
    params = InferenceParams(max_seqlen=12, max_batch_size=2)
    if lengths_per_sample:
        params.lengths_per_sample = torch.zeros(2, dtype=torch.int32)
    with torch.no_grad():
        decoded = decode(m, x, 4, params, track_lengths=lengths_per_sample)
        full = m(x)
    torch.testing.assert_close(decoded, full, atol=1e-3, rtol=0)
    steps = ext.named("fwd_kvcache")
    assert len(steps) == 6  # the prompt goes through the flash forward, each token here
    call = steps[-1]
    assert call["k_cache"].data_ptr() == params.key_value_memory_dict[0].data_ptr()
    assert call["cache_seqlens"].tolist() == [9, 9]
    assert (call["window_size_left"], call["window_size_right"], call["causal"]) == (4, 0, True)
    assert call["softmax_scale"] == 0.2 and call["alibi_slopes"].dtype == torch.float32


# ------------------------------------------------------------------------------------------
# Rotary (Triton: GPU, or CPU under TRITON_INTERPRET=1) with PyTorch attention
# ------------------------------------------------------------------------------------------


def rotate_ref(x, base, rotary_dim, interleaved, offset=0):
    """float64 rotary of the first rotary_dim dims of x (b, s, h, d) at positions offset.."""
    x = x.double()
    inv_freq = 1.0 / base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64, device=x.device) / rotary_dim)
    positions = torch.arange(offset, offset + x.shape[1], dtype=torch.float64, device=x.device)
    angles = torch.outer(positions, inv_freq)
    cos, sin = angles.cos()[:, None, :], angles.sin()[:, None, :]
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    if interleaved:
        a, b = rot[..., 0::2], rot[..., 1::2]
        rot = torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2)
    else:
        a, b = rot.chunk(2, dim=-1)
        rot = torch.cat((a * cos - b * sin, a * sin + b * cos), dim=-1)
    return torch.cat((rot, rest), dim=-1)


@requires_rotary
@pytest.mark.parametrize("num_heads_kv", [None, 2])
@pytest.mark.parametrize("interleaved", [False, True])
def test_mha_rotary_matches_reference(num_heads_kv, interleaved):
    m = MHA(64, 4, num_heads_kv=num_heads_kv, causal=True, rotary_emb_dim=8, rotary_emb_base=500.0,
            rotary_emb_interleaved=interleaved, device=ROTARY_DEVICE)
    rotary = m.rotary_emb
    assert (rotary.dim, rotary.base, rotary.interleaved) == (8, 500.0, interleaved)
    x = torch.randn(2, 9, 64, device=ROTARY_DEVICE)
    out = m(x)
    qkv = F.linear(x.double(), m.Wqkv.weight.double(), m.Wqkv.bias.double()).unflatten(-1, (-1, 16))
    hkv = num_heads_kv or 4
    q, k, v = qkv[:, :, :4], qkv[:, :, 4 : 4 + hkv], qkv[:, :, 4 + hkv :]
    q, k = rotate_ref(q, 500.0, 8, interleaved), rotate_ref(k, 500.0, 8, interleaved)
    allowed = torch.ones(9, 9, dtype=torch.bool, device=x.device).tril().expand(2, 9, 9)
    ctx, _ = softmax_attention_ref(q, k, v, allowed)
    ref = F.linear(ctx.flatten(-2), m.out_proj.weight.double(), m.out_proj.bias.double())
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=0)


@requires_rotary
@pytest.mark.parametrize("num_heads_kv", [None, 2])
@pytest.mark.parametrize("scale_base", [None, 512.0])
def test_mha_rotary_torch_decoding(num_heads_kv, scale_base):
    m = MHA(64, 4, num_heads_kv=num_heads_kv, causal=True, layer_idx=0, rotary_emb_dim=16,
            rotary_emb_scale_base=scale_base, device=ROTARY_DEVICE).eval()
    x = torch.randn(2, 9, 64, device=ROTARY_DEVICE)
    params = InferenceParams(max_seqlen=9, max_batch_size=2)
    with torch.no_grad():
        decoded = decode(m, x, 4, params)
        full = m(x)
    torch.testing.assert_close(decoded, full, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------
# GPU: the FlashAttention classes and MHA(use_flash_attn=True)
# ------------------------------------------------------------------------------------------


def grads_of(out, dout, *tensors):
    return torch.autograd.grad(out, tensors, dout)


def pack_sequences(t, lengths):
    """(batch, seqlen, ...) -> (sum(lengths), ...): the first lengths[i] positions of entry i."""
    return torch.cat([t[i, :n] for i, n in enumerate(lengths)])


def split_sequences(t, cu_seqlens):
    """(total, ...) -> one (1, length_i, ...) tensor per sequence."""
    bounds = cu_seqlens.tolist()
    return [t[a:b][None] for a, b in zip(bounds[:-1], bounds[1:])]


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("varlen", [False, True])
def test_flash_self_attention_matches_pytorch(dtype, causal, varlen, require_kernel):
    b, s, h, d = 3, 113, 4, 64
    require_kernel(d, dtype)
    qkv = torch.randn(b, s, 3, h, d, device=DEVICE, dtype=dtype, requires_grad=True)
    dout = torch.randn(b, s, h, d, device=DEVICE, dtype=dtype)
    lengths = [s, 61, 1] if varlen else [s] * b
    attn = FlashSelfAttention(causal=causal)
    if varlen:
        cu = cu_seqlens_from_lengths(lengths, device=DEVICE)
        packed = pack_sequences(qkv, lengths)
        out_packed = attn(packed, cu_seqlens=cu, max_seqlen=s)
        (dpacked,) = grads_of(out_packed, pack_sequences(dout, lengths), packed)
        outs, dqkvs = split_sequences(out_packed, cu), split_sequences(dpacked, cu)
    else:
        out = attn(qkv)
        (dqkv,) = grads_of(out, dout, qkv)
        outs, dqkvs = out.split(1), dqkv.split(1)
    for i, n in enumerate(lengths):  # each sequence on its own against the PyTorch module
        seq = qkv[i : i + 1, :n].detach()
        ref_in = seq.float().requires_grad_(True)
        pt_in = seq.clone().requires_grad_(True)
        ref, pt = SelfAttention(causal=causal)(ref_in), SelfAttention(causal=causal)(pt_in)
        g = dout[i : i + 1, :n]
        (dref,), (dpt,) = grads_of(ref, g.float(), ref_in), grads_of(pt, g, pt_in)
        assert_out_close(outs[i], ref, pt, name=f"out[{i}]")
        assert_grad_close(f"dqkv[{i}]", dqkvs[i], dref, dpt)


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("nheads_kv", [4, 1])
@pytest.mark.parametrize("varlen", [False, True])
def test_flash_cross_attention_matches_pytorch(dtype, causal, nheads_kv, varlen, require_kernel):
    b, sq, sk, h, d = 3, 67, 129, 4, 64
    require_kernel(d, dtype)
    q = torch.randn(b, sq, h, d, device=DEVICE, dtype=dtype, requires_grad=True)
    kv = torch.randn(b, sk, 2, nheads_kv, d, device=DEVICE, dtype=dtype, requires_grad=True)
    dout = torch.randn(b, sq, h, d, device=DEVICE, dtype=dtype)
    lens_q = [sq, 30, 1] if varlen else [sq] * b
    lens_k = [sk, 90, 40] if varlen else [sk] * b
    attn = FlashCrossAttention(causal=causal)
    if varlen:
        cu_q = cu_seqlens_from_lengths(lens_q, DEVICE)
        cu_k = cu_seqlens_from_lengths(lens_k, DEVICE)
        q_p, kv_p = pack_sequences(q, lens_q), pack_sequences(kv, lens_k)
        out_p = attn(q_p, kv_p, cu_seqlens=cu_q, max_seqlen=sq, cu_seqlens_k=cu_k, max_seqlen_k=sk)
        dq_p, dkv_p = grads_of(out_p, pack_sequences(dout, lens_q), q_p, kv_p)
        outs, dqs = split_sequences(out_p, cu_q), split_sequences(dq_p, cu_q)
        dkvs = split_sequences(dkv_p, cu_k)
    else:
        out = attn(q, kv)
        dq, dkv = grads_of(out, dout, q, kv)
        outs, dqs, dkvs = out.split(1), dq.split(1), dkv.split(1)
    for i in range(b):
        qi, kvi = q[i : i + 1, : lens_q[i]].detach(), kv[i : i + 1, : lens_k[i]].detach()
        g = dout[i : i + 1, : lens_q[i]]
        ref_in = [t.float().requires_grad_(True) for t in (qi, kvi)]
        pt_in = [t.clone().requires_grad_(True) for t in (qi, kvi)]
        ref, pt = CrossAttention(causal=causal)(*ref_in), CrossAttention(causal=causal)(*pt_in)
        dref, dpt = grads_of(ref, g.float(), *ref_in), grads_of(pt, g, *pt_in)
        # A query row with no allowed key (causal, seqlen_q > seqlen_k) is 0 in FlashAttention
        # and a uniform average in the PyTorch module; the lengths here leave none.
        assert_out_close(outs[i], ref, pt, name=f"out[{i}]")
        assert_grad_close(f"dq[{i}]", dqs[i], dref[0], dpt[0])
        assert_grad_close(f"dkv[{i}]", dkvs[i], dref[1], dpt[1])


def mha_triplet(dtype, **kwargs):
    """(MHA(use_flash_attn=True) in dtype, the same weights in MHA(use_flash_attn=False) in
    float32 (reference) and in dtype (PyTorch's own error))."""
    flash = MHA(use_flash_attn=True, device=DEVICE, dtype=dtype, **kwargs)
    ref = MHA(use_flash_attn=False, device=DEVICE, **kwargs)
    ref.load_state_dict({k: v.float() for k, v in flash.state_dict().items()})
    pt = copy.deepcopy(ref).to(dtype)
    return flash, ref, pt


def check_mha_forward_backward(flash, ref, pt, x, dout, x_kv=None):
    results = {}
    for name, m in (("flash", flash), ("ref", ref), ("pt", pt)):
        dtype = torch.float32 if name == "ref" else x.dtype
        inp = x.detach().to(dtype).requires_grad_(True)
        out = m(inp, x_kv=None if x_kv is None else x_kv.to(dtype))
        out.backward(dout.to(dtype))
        results[name] = (out, inp.grad, {n: p.grad for n, p in m.named_parameters()})
    assert_out_close(results["flash"][0], results["ref"][0], results["pt"][0])
    assert_grad_close("dx", results["flash"][1], results["ref"][1], results["pt"][1])
    for n in results["flash"][2]:
        assert_grad_close(n, results["flash"][2][n], results["ref"][2][n], results["pt"][2][n])


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_heads_kv", [8, 2, 1])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("rotary_emb_dim", [0, 32])
def test_mha_flash_matches_pytorch(dtype, num_heads_kv, causal, rotary_emb_dim, require_kernel):
    require_kernel(64, dtype)
    flash, ref, pt = mha_triplet(dtype, embed_dim=512, num_heads=8, num_heads_kv=num_heads_kv,
                                 causal=causal, rotary_emb_dim=rotary_emb_dim)
    x = torch.randn(2, 157, 512, device=DEVICE, dtype=dtype)
    check_mha_forward_backward(flash, ref, pt, x, torch.randn_like(x))


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_heads_kv", [8, 2])
def test_mha_flash_cross_attn(dtype, num_heads_kv, require_kernel):
    require_kernel(64, dtype)
    flash, ref, pt = mha_triplet(dtype, embed_dim=512, num_heads=8, num_heads_kv=num_heads_kv,
                                 cross_attn=True)
    x = torch.randn(2, 37, 512, device=DEVICE, dtype=dtype)
    x_kv = torch.randn(2, 150, 512, device=DEVICE, dtype=dtype)
    check_mha_forward_backward(flash, ref, pt, x, torch.randn_like(x), x_kv=x_kv)


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_heads_kv", [8, 2])
def test_mha_flash_varlen(dtype, num_heads_kv, require_kernel):
    require_kernel(64, dtype)
    flash, ref, pt = mha_triplet(dtype, embed_dim=512, num_heads=8, num_heads_kv=num_heads_kv,
                                 causal=True)
    lengths = [100, 37, 1, 64]
    cu = cu_seqlens_from_lengths(lengths, DEVICE)
    x = torch.randn(sum(lengths), 512, device=DEVICE, dtype=dtype)
    kwargs = {} if num_heads_kv == 8 else {"cu_seqlens_k": cu, "max_seqlen_k": 100}
    out = flash(x, cu_seqlens=cu, max_seqlen=100, **kwargs)
    for i, (out_i, x_i) in enumerate(zip(split_sequences(out, cu), split_sequences(x, cu))):
        assert_out_close(out_i, ref(x_i.float()), pt(x_i), name=f"sequence {i}")


def windowed_mha_reference(m, x, upcast):
    """MHA's forward (no rotary) from its weights with attention_ref, which knows ALiBi and
    sliding windows: in float32 (upcast) or the way PyTorch runs it in x's dtype."""
    dtype = torch.float32 if upcast else x.dtype
    qkv = F.linear(x.to(dtype), m.Wqkv.weight.to(dtype), m.Wqkv.bias.to(dtype))
    q_dim = m.num_heads * m.head_dim
    q = qkv[..., :q_dim].unflatten(-1, (m.num_heads, m.head_dim))
    k, v = qkv[..., q_dim:].unflatten(-1, (2, m.num_heads_kv, m.head_dim)).unbind(2)
    attn = m.inner_attn
    slopes = None if attn.alibi_slopes is None else attn.alibi_slopes.float()
    out, _ = attention_ref(q, k, v, causal=attn.causal, window_size=attn.window_size,
                           alibi_slopes=slopes, softmax_scale=attn.softmax_scale, upcast=upcast)
    out_proj = m.out_proj
    return F.linear(out.to(dtype).flatten(-2), out_proj.weight.to(dtype), out_proj.bias.to(dtype))


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("use_alibi,window_size",
                         [(True, (-1, -1)), (False, (32, 0)), (True, (16, 8))])
def test_mha_flash_alibi_window(dtype, use_alibi, window_size, require_kernel):
    require_kernel(64, dtype)
    m = MHA(512, 8, num_heads_kv=2, causal=window_size[1] == 0, use_alibi=use_alibi,
            window_size=window_size, use_flash_attn=True, device=DEVICE, dtype=dtype)
    assert m.inner_attn.alibi_slopes is None or torch.equal(
        m.inner_attn.alibi_slopes.cpu(), torch.tensor(get_alibi_slopes(8)))
    x = torch.randn(2, 150, 512, device=DEVICE, dtype=dtype)
    assert_out_close(m(x), windowed_mha_reference(m, x, True), windowed_mha_reference(m, x, False))


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_heads_kv", [8, 2])
@pytest.mark.parametrize("rotary", ["none", "fused", "unfused", "xpos"])
@pytest.mark.parametrize("lengths_per_sample", [False, True])
def test_mha_flash_decoding_matches_full_forward(dtype, num_heads_kv, rotary, lengths_per_sample,
                                                 require_kernel):
    """Prompt, then one token at a time through flash_attn_with_kvcache, against a full causal
    forward of the whole sequence. rotary: "fused" (dim 32) rotates inside the kv-cache kernel;
    "unfused" (dim 24, not a multiple of 16) and "xpos" rotate with the Triton layer first."""
    require_kernel(64, dtype)
    rotary_kwargs = {
        "none": {}, "fused": {"rotary_emb_dim": 32}, "unfused": {"rotary_emb_dim": 24},
        "xpos": {"rotary_emb_dim": 32, "rotary_emb_scale_base": 512},
    }[rotary]
    flash, ref, pt = mha_triplet(dtype, embed_dim=512, num_heads=8, num_heads_kv=num_heads_kv,
                                 causal=True, layer_idx=0, **rotary_kwargs)
    x = torch.randn(2, 40, 512, device=DEVICE, dtype=dtype)
    params = InferenceParams(max_seqlen=48, max_batch_size=2)
    params.key_value_memory_dict[0] = flash.allocate_inference_cache(2, 48)
    if lengths_per_sample:
        params.lengths_per_sample = torch.zeros(2, dtype=torch.int32, device=DEVICE)
    with torch.no_grad():
        decoded = decode(flash, x, 17, params, track_lengths=lengths_per_sample)
        assert_out_close(decoded, ref(x.float()), pt(x), name="decoded")


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_mha_flash_decoding_alibi_window(dtype, require_kernel):
    require_kernel(64, dtype)
    m = MHA(512, 8, num_heads_kv=2, causal=True, layer_idx=0, use_alibi=True, window_size=(9, 0),
            use_flash_attn=True, device=DEVICE, dtype=dtype)
    x = torch.randn(2, 40, 512, device=DEVICE, dtype=dtype)
    params = InferenceParams(max_seqlen=40, max_batch_size=2)
    with torch.no_grad():
        decoded = decode(m, x, 17, params)
        assert_out_close(decoded, windowed_mha_reference(m, x, True),
                         windowed_mha_reference(m, x, False), name="decoded")
