"""flash_attn.utils.torch, flash_attn.layers.patch_embed, flash_attn.utils.testing and
flash_attn.utils.pretrained, on CPU."""

import builtins
import inspect
import json
import math

import pytest
import torch
import torch.nn.functional as F

from flash_attn.layers.patch_embed import PatchEmbed
from flash_attn.utils import testing
from flash_attn.utils.pretrained import state_dict_from_pretrained
from flash_attn.utils.torch import custom_bwd, custom_fwd

# ------------------------------------------------------------------------------------------
# utils.torch
# ------------------------------------------------------------------------------------------


class _Double(torch.autograd.Function):
    @staticmethod
    @custom_fwd
    def forward(ctx, x):
        return x * 2

    @staticmethod
    @custom_bwd
    def backward(ctx, grad):
        return grad * 2


class _DoubleCast(torch.autograd.Function):
    @staticmethod
    @custom_fwd(cast_inputs=torch.float16)
    def forward(ctx, x):
        return x * 2

    @staticmethod
    @custom_bwd
    def backward(ctx, grad):
        return grad * 2


def test_custom_fwd_bwd_decorate_with_and_without_arguments():
    x = torch.ones(3, requires_grad=True)
    _Double.apply(x).sum().backward()
    assert x.grad.tolist() == [2.0, 2.0, 2.0]
    # Outside CUDA autocast, cast_inputs leaves the inputs alone.
    assert _DoubleCast.apply(x).dtype == torch.float32


# ------------------------------------------------------------------------------------------
# layers.patch_embed
# ------------------------------------------------------------------------------------------


def test_patch_embed_signature_is_upstreams():
    assert list(inspect.signature(PatchEmbed).parameters) == [
        "img_size", "patch_size", "in_chans", "embed_dim", "norm_layer", "flatten", "bias", "fused_bias_fc"]


@pytest.mark.parametrize("flatten", [True, False])
def test_patch_embed_is_a_strided_conv(flatten):
    embed = PatchEmbed(img_size=(8, 12), patch_size=4, in_chans=3, embed_dim=16, flatten=flatten)
    assert embed.grid_size == (2, 3) and embed.num_patches == 6
    x = torch.randn(2, 3, 8, 12)
    conv_weight = embed.proj.weight.reshape(16, 3, 4, 4)
    ref = F.conv2d(x, conv_weight, embed.proj.bias, stride=4)  # (b, 16, 2, 3)
    ref = ref.flatten(2).transpose(1, 2) if flatten else ref.permute(0, 2, 3, 1)
    torch.testing.assert_close(embed(x), ref, rtol=1e-5, atol=1e-5)


def test_patch_embed_norm_and_fused_linear():
    embed = PatchEmbed(img_size=4, patch_size=2, in_chans=1, embed_dim=8, norm_layer=torch.nn.LayerNorm,
                       fused_bias_fc=True)
    from flash_attn.ops.fused_dense import FusedDense

    assert isinstance(embed.proj, FusedDense) and isinstance(embed.norm, torch.nn.LayerNorm)
    out = embed(torch.randn(2, 1, 4, 4))
    assert out.shape == (2, 4, 8)
    torch.testing.assert_close(out.mean(-1), torch.zeros(2, 4), atol=1e-5, rtol=0)


def test_patch_embed_bad_arguments():
    with pytest.raises(ValueError, match="img_size"):
        PatchEmbed(img_size=10, patch_size=4)
    embed = PatchEmbed(img_size=8, patch_size=4, in_chans=3, embed_dim=4)
    with pytest.raises(ValueError, match="img_size"):
        embed(torch.randn(1, 3, 8, 12))


# ------------------------------------------------------------------------------------------
# utils.testing
# ------------------------------------------------------------------------------------------


def test_testing_exports():
    for name in testing.__all__:
        assert callable(getattr(testing, name))
    assert set(testing.__all__) == {
        "generate_random_padding_mask", "generate_qkv", "construct_local_mask", "construct_chunk_mask",
        "attention_ref"}


@pytest.mark.parametrize("mode", ["full", "random", "third"])
def test_random_padding_mask_is_a_prefix(mode):
    mask = testing.generate_random_padding_mask(30, 7, "cpu", mode=mode)
    lengths = mask.sum(-1)
    assert torch.equal(mask, torch.arange(30) < lengths[:, None])
    assert lengths.min() >= {"full": 30, "random": 10, "third": 10}[mode]


def test_random_padding_mask_zero_lengths_and_bad_mode():
    mask = testing.generate_random_padding_mask(8, 11, "cpu", zero_lengths=True)
    assert mask.sum(-1)[[0, 5, 10]].tolist() == [0, 0, 0]
    with pytest.raises(ValueError, match="mode"):
        testing.generate_random_padding_mask(8, 2, "cpu", mode="half")


def _naive_attention(q, k, v, allowed):
    """float64 softmax attention; allowed (b or 1, 1, sq, sk) bool; empty rows give zeros."""
    group = q.shape[2] // k.shape[2]
    q, k, v = q.double(), k.double().repeat_interleave(group, 2), v.double().repeat_interleave(group, 2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1).nan_to_num(0.0)
    return torch.einsum("bhqk,bkhd->bqhd", probs, v)


def test_attention_ref_causal_gqa_matches_naive():
    q, k, v = torch.randn(2, 5, 4, 8), torch.randn(2, 7, 2, 8), torch.randn(2, 7, 2, 8)
    out, attn = testing.attention_ref(q, k, v, causal=True)
    # Bottom-right alignment: query i sees keys up to i + (7 - 5).
    allowed = torch.arange(7)[None, :] <= torch.arange(5)[:, None] + 2
    torch.testing.assert_close(out.double(), _naive_attention(q, k, v, allowed), rtol=1e-5, atol=1e-5)
    assert attn.shape == (2, 4, 5, 7)
    torch.testing.assert_close(attn.sum(-1), torch.ones(2, 4, 5))


def test_attention_ref_padding_and_window():
    q, k, v = torch.randn(3, 6, 2, 8), torch.randn(3, 6, 2, 8), torch.randn(3, 6, 2, 8)
    qmask = testing.generate_random_padding_mask(6, 3, "cpu", mode="third")
    kmask = qmask.clone()
    out, _ = testing.attention_ref(q, k, v, qmask, kmask, window_size=(1, 1))
    for b in range(3):
        n = int(kmask[b].sum())
        rows, cols = torch.arange(n)[:, None], torch.arange(n)[None, :]
        allowed = (cols - rows).abs() <= 1
        ref = _naive_attention(q[b : b + 1, :n], k[b : b + 1, :n], v[b : b + 1, :n], allowed)
        torch.testing.assert_close(out[b : b + 1, :n].double(), ref, rtol=1e-5, atol=1e-5)
        assert (out[b, n:] == 0).all()


def test_local_mask_sink_and_chunk_mask():
    mask = testing.construct_local_mask(4, 6, window_size=(1, 0), sink_token_length=1)
    # Query i sits at key i + 2; it sees keys i + 1, i + 2 and the sink key 0.
    allowed = ~mask
    for i in range(4):
        assert allowed[i].nonzero().flatten().tolist() == sorted({0, i + 1, i + 2})
    chunk = testing.construct_chunk_mask(4, 6, attention_chunk=3)
    # Query i sits at key i + 2, in chunk (i + 2) // 3.
    for i in range(4):
        start = (i + 2) // 3 * 3
        assert (~chunk[i]).nonzero().flatten().tolist() == list(range(start, min(start + 3, 6)))


@pytest.mark.parametrize("packing", ["none", "kv", "qkv"])
def test_generate_qkv_round_trips(packing):
    b, s, h, d = 3, 9, 2, 4
    q, k, v = torch.randn(b, s, h, d), torch.randn(b, s, h, d), torch.randn(b, s, h, d)
    mask = testing.generate_random_padding_mask(s, b, "cpu", mode="third")
    masked = lambda x: x.masked_fill(~mask[:, :, None, None], 0.0)
    result = testing.generate_qkv(q, k, v, mask, mask, kvpacked=packing == "kv", qkvpacked=packing == "qkv")
    total = int(mask.sum())
    if packing == "qkv":
        qkv_unpad, cu_seqlens, max_seqlen, qkv, output_pad_fn, dqkv_pad_fn = result
        assert qkv_unpad.shape == (total, 3, h, d) and qkv_unpad.requires_grad
        assert torch.equal(dqkv_pad_fn(qkv_unpad)[:, :, 0], masked(q))
    elif packing == "kv":
        q_unpad, kv_unpad, cu_q, cu_k, max_q, max_k, q_pad, kv, output_pad_fn, dq_pad_fn, dkv_pad_fn = result
        assert torch.equal(dkv_pad_fn(kv_unpad)[:, :, 1], masked(v))
        cu_seqlens = cu_q
    else:
        (q_unpad, k_unpad, v_unpad, qv_unpad, cu_q, cu_k, seqused_q, seqused_k, max_q, max_k,
         q_pad, k_pad, v_pad, qv, output_pad_fn, dq_pad_fn, dk_pad_fn) = result
        assert qv_unpad is None and qv is None
        assert torch.equal(seqused_q, mask.sum(-1, dtype=torch.int32))
        assert torch.equal(output_pad_fn(q_unpad), masked(q)) and torch.equal(dk_pad_fn(k_unpad), masked(k))
        cu_seqlens = cu_q
    assert cu_seqlens.tolist() == [0] + mask.sum(-1).cumsum(0).tolist()


def test_generate_qkv_bad_arguments():
    q = torch.randn(1, 4, 2, 8)
    with pytest.raises(ValueError, match="exclusive"):
        testing.generate_qkv(q, q, q, kvpacked=True, qkvpacked=True)
    with pytest.raises(ValueError, match="k must be"):
        testing.generate_qkv(q, torch.randn(1, 4, 2, 4), q)


# ------------------------------------------------------------------------------------------
# utils.pretrained
# ------------------------------------------------------------------------------------------


def test_state_dict_from_local_bin(tmp_path):
    sd = {"a": torch.randn(3), "b": torch.randn(2, 2)}
    torch.save(sd, tmp_path / "pytorch_model.bin")
    out = state_dict_from_pretrained(str(tmp_path), dtype=torch.float16)
    assert set(out) == {"a", "b"} and out["a"].dtype == torch.float16
    torch.testing.assert_close(out["b"].float(), sd["b"], atol=1e-3, rtol=1e-3)


def test_state_dict_from_local_sharded_safetensors(tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    sd = {"a": torch.randn(3), "b": torch.randn(2, 2)}
    safetensors_torch.save_file({"a": sd["a"]}, str(tmp_path / "one.safetensors"))
    safetensors_torch.save_file({"b": sd["b"]}, str(tmp_path / "two.safetensors"))
    index = {"weight_map": {"a": "one.safetensors", "b": "two.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    out = state_dict_from_pretrained(str(tmp_path))
    assert all(torch.equal(out[k], sd[k]) for k in sd)


def test_state_dict_from_pretrained_missing(tmp_path):
    with pytest.raises(EnvironmentError, match="not found"):
        state_dict_from_pretrained(str(tmp_path))


def test_state_dict_from_pretrained_names_missing_package(tmp_path, monkeypatch):
    (tmp_path / "model.safetensors").write_bytes(b"")
    real_import = builtins.__import__

    def no_safetensors(name, *args, **kwargs):
        if name.startswith("safetensors"):
            raise ImportError("no safetensors here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_safetensors)
    with pytest.raises(ImportError, match="'safetensors.torch' package .*pip install safetensors"):
        state_dict_from_pretrained(str(tmp_path))
