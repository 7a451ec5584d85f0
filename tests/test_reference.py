"""Self-checks of tests/reference.py on the CPU (no GPU, no extension needed)."""

import math

import pytest
import torch
import torch.nn.functional as F

from reference import (
    allowed_mask,
    attention_ref,
    generate_seqlens,
    kernel_headdim,
    lengths_to_mask,
    pack,
    pack_lse,
    unpack,
)


def _sdpa(q, k, v, causal=False, attn_mask=None, scale=None):
    # SDPA layout is (batch, heads, seq, d).
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=attn_mask,
        is_causal=causal, scale=scale,
    )
    return out.transpose(1, 2)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seqlen,d", [(1, 32), (17, 64), (128, 40), (200, 128)])
def test_matches_sdpa_square(seqlen, d, causal):
    q, k, v = (torch.randn(2, seqlen, 3, d) for _ in range(3))
    out, lse = attention_ref(q, k, v, causal=causal)
    assert out.dtype == torch.float32 and out.shape == q.shape
    assert lse.shape == (2, 3, seqlen)
    torch.testing.assert_close(out, _sdpa(q, k, v, causal=causal), atol=1e-5, rtol=1e-5)
    # lse against an explicit computation.
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d)
    if causal:
        scores = scores.masked_fill(torch.ones(seqlen, seqlen, dtype=torch.bool).triu(1), float("-inf"))
    torch.testing.assert_close(lse, torch.logsumexp(scores, -1), atol=1e-5, rtol=1e-5)


def test_matches_sdpa_float64_and_scale():
    q, k, v = (torch.randn(2, 33, 2, 16, dtype=torch.float64) for _ in range(3))
    out, _ = attention_ref(q, k, v, softmax_scale=0.3, ref_dtype=torch.float64)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, _sdpa(q, k, v, scale=0.3), atol=1e-12, rtol=1e-12)


def test_gqa_repeats_kv_heads():
    q = torch.randn(2, 9, 6, 32)
    k, v = torch.randn(2, 11, 2, 32), torch.randn(2, 11, 2, 32)
    out, _ = attention_ref(q, k, v)
    # head h uses kv head h // 3
    k_rep, v_rep = k.repeat_interleave(3, dim=2), v.repeat_interleave(3, dim=2)
    torch.testing.assert_close(out, _sdpa(q, k_rep, v_rep), atol=1e-5, rtol=1e-5)
    for h in range(6):
        torch.testing.assert_close(out[:, :, h], _sdpa(q[:, :, h:h + 1], k[:, :, h // 3:h // 3 + 1],
                                                       v[:, :, h // 3:h // 3 + 1])[:, :, 0],
                                   atol=1e-5, rtol=1e-5)


def test_causal_bottom_right_alignment():
    # Docstring example from upstream: seqlen_q = 2, seqlen_k = 5 and seqlen_q = 5, seqlen_k = 2.
    m = allowed_mask(1, 2, 5, causal=True)[0, 0].int().tolist()
    assert m == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    m = allowed_mask(1, 5, 2, causal=True)[0, 0].int().tolist()
    assert m == [[0, 0], [0, 0], [0, 0], [1, 0], [1, 1]]


def test_window_mask():
    # i + sk - sq - left <= j <= i + sk - sq + right, with sq = 3, sk = 6 -> diag = i + 3.
    m = allowed_mask(1, 3, 6, window_size=(1, 1))[0, 0].int().tolist()
    assert m == [[0, 0, 1, 1, 1, 0], [0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 1, 1]]
    # causal forces right = 0
    m = allowed_mask(1, 3, 6, causal=True, window_size=(1, 4))[0, 0].int().tolist()
    assert m == [[0, 0, 1, 1, 0, 0], [0, 0, 0, 1, 1, 0], [0, 0, 0, 0, 1, 1]]


def test_empty_rows_zero_output_inf_lse():
    q, k, v = torch.randn(1, 5, 2, 16), torch.randn(1, 2, 2, 16), torch.randn(1, 2, 2, 16)
    out, lse = attention_ref(q, k, v, causal=True)
    assert not torch.isnan(out).any()
    assert (out[:, :3] == 0).all()
    assert torch.isposinf(lse[:, :, :3]).all() and torch.isfinite(lse[:, :, 3:]).all()
    out_pt, lse_pt = attention_ref(q.half(), k.half(), v.half(), causal=True, upcast=False)
    assert out_pt.dtype == torch.float16 and not torch.isnan(out_pt).any()
    assert (out_pt[:, :3] == 0).all()


def test_per_batch_alignment_uses_actual_lengths():
    # Entry 1 has 3 queries and 4 keys out of padded 5 / 6: its causal mask is the (3, 4) one.
    qmask = lengths_to_mask(torch.tensor([5, 3]), 5)
    kmask = lengths_to_mask(torch.tensor([6, 4]), 6)
    m = allowed_mask(2, 5, 6, qmask, kmask, causal=True)[1, 0].int().tolist()
    assert m == [[1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0],
                 [0] * 6, [0] * 6]
    q, k, v = torch.randn(2, 5, 2, 8), torch.randn(2, 6, 2, 8), torch.randn(2, 6, 2, 8)
    out, lse = attention_ref(q, k, v, qmask, kmask, causal=True)
    out1, lse1 = attention_ref(q[1:, :3], k[1:, :4], v[1:, :4], causal=True)
    torch.testing.assert_close(out[1, :3], out1[0])
    torch.testing.assert_close(lse[1, :, :3], lse1[0])
    assert (out[1, 3:] == 0).all()


def test_softcap_and_alibi():
    q, k, v = torch.randn(2, 4, 3, 16), torch.randn(2, 7, 3, 16), torch.randn(2, 7, 3, 16)
    slopes = torch.rand(2, 3) * 0.3
    out, lse = attention_ref(q, k, v, softcap=2.0, alibi_slopes=slopes, causal=True)
    scale = 16 ** -0.5
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    s = 2.0 * torch.tanh(s / 2.0)
    i = torch.arange(4).view(4, 1)
    j = torch.arange(7).view(1, 7)
    s = s - slopes.view(2, 3, 1, 1) * (i + 7 - 4 - j).abs()
    s = s.masked_fill(j > i + 3, float("-inf"))
    ref = torch.einsum("bhqk,bkhd->bqhd", torch.softmax(s, -1), v)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, torch.logsumexp(s, -1), atol=1e-5, rtol=1e-5)
    # (nheads,) slopes broadcast over the batch.
    out_h, _ = attention_ref(q, k, v, alibi_slopes=slopes[0])
    out_bh, _ = attention_ref(q, k, v, alibi_slopes=slopes[0].expand(2, 3).contiguous())
    torch.testing.assert_close(out_h, out_bh)


def test_upcast_false_close_to_fp32():
    q, k, v = (torch.randn(2, 50, 2, 64) for _ in range(3))
    out, _ = attention_ref(q, k, v, causal=True)
    out_pt, _ = attention_ref(q.bfloat16(), k.bfloat16(), v.bfloat16(), causal=True, upcast=False)
    assert out_pt.dtype == torch.bfloat16
    err = (out_pt.float() - out).abs().max().item()
    assert 0 < err < 0.05


def test_pack_unpack_roundtrip():
    lens = generate_seqlens(6, 130, "random")
    assert lens[0] == 130 and lens[-1] == 1 and (lens >= 1).all() and (lens <= 130).all()
    mask = lengths_to_mask(lens, 130)
    x = torch.randn(6, 130, 3, 8)
    xp, cu, max_s, idx = pack(x, mask)
    assert cu.dtype == torch.int32 and cu.tolist()[-1] == xp.shape[0] == int(lens.sum())
    assert cu.shape == (7,) and max_s == 130
    for b in range(6):
        torch.testing.assert_close(xp[cu[b]:cu[b + 1]], x[b, : lens[b]])
    back = unpack(xp, idx, 6, 130)
    torch.testing.assert_close(back, x.masked_fill(~mask.view(6, 130, 1, 1), 0))
    lse = torch.randn(6, 3, 130)
    lp = pack_lse(lse, mask)
    assert lp.shape == (3, int(lens.sum()))
    torch.testing.assert_close(lp[:, cu[2]:cu[3]], lse[2, :, : lens[2]])


def test_zero_length_sequences():
    lens = torch.tensor([0, 3, 0, 2])
    mask = lengths_to_mask(lens, 3)
    x = torch.randn(4, 3, 2)
    xp, cu, _, _ = pack(x, mask)
    assert cu.tolist() == [0, 0, 3, 3, 5]
    q, k, v = torch.randn(4, 3, 1, 8), torch.randn(4, 3, 1, 8), torch.randn(4, 3, 1, 8)
    out, lse = attention_ref(q, k, v, lengths_to_mask(torch.tensor([3, 3, 3, 3]), 3), mask)
    assert (out[0] == 0).all() and torch.isposinf(lse[0]).all()
    assert torch.isfinite(lse[1]).all()


def test_kernel_headdim():
    assert [kernel_headdim(d) for d in (8, 20, 32, 40, 59, 64, 96, 100, 128, 160, 192, 224, 250, 256)] == [
        32, 32, 32, 64, 64, 64, 96, 128, 128, 192, 192, 256, 256, 256]
    assert kernel_headdim(264) is None
