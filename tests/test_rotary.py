"""flash_attn.layers.rotary against an eager PyTorch rotary embedding, gradients included.

GPU: pytest tests/test_rotary.py. CPU: TRITON_INTERPRET=1 pytest tests/test_rotary.py.
"""

import math

import pytest
import torch

pytest.importorskip("triton", reason="flash_attn.layers.rotary runs Triton kernels; triton is not installed")

# poison_empty is imported for pytest to find the fixture named in pytestmark.
from triton_testing import DEVICE, DTYPES, assert_close, gpu_only, poison_empty, requires_device  # noqa: E402, F401

from flash_attn.layers.rotary import (  # noqa: E402
    RotaryEmbedding,
    apply_rotary_emb,
    apply_rotary_emb_func,
    apply_rotary_emb_kv_,
    apply_rotary_emb_qkv_,
)

pytestmark = [requires_device, pytest.mark.usefixtures("poison_empty")]


def rotary_reference(x, cos, sin, interleaved):
    """x: (batch, seqlen, nheads, headdim); cos, sin: (batch, seqlen, rotary_dim / 2)."""
    rotary_dim = 2 * cos.shape[-1]
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    if interleaved:
        a, b = rot[..., 0::2], rot[..., 1::2]
    else:
        a, b = rot[..., : rotary_dim // 2], rot[..., rotary_dim // 2 :]
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    ra, rb = a * c - b * s, a * s + b * c
    rot = torch.stack((ra, rb), dim=-1).flatten(-2) if interleaved else torch.cat((ra, rb), dim=-1)
    return torch.cat((rot, rest), dim=-1)


def tables(seqlen_ro, rotary_dim, dtype):
    angles = torch.rand(seqlen_ro, rotary_dim // 2, device=DEVICE) * 2 * math.pi
    return torch.cos(angles).to(dtype), torch.sin(angles).to(dtype)


def per_batch(table, offsets, seqlen):
    return torch.stack([table[o : o + seqlen] for o in offsets])


def offsets_arg(kind, batch, seqlen_ro, seqlen):
    """The seqlen_offsets argument and the per-sequence offsets it means."""
    if kind == "zero":
        return 0, [0] * batch
    if kind == "int":
        return seqlen_ro - seqlen, [seqlen_ro - seqlen] * batch
    offsets = torch.randint(0, seqlen_ro - seqlen + 1, (batch,), dtype=torch.int32)
    return offsets.to(DEVICE), offsets.tolist()


def reference_and_lowp(x, cos_b, sin_b, interleaved, grad):
    """(float32 reference, PyTorch in x's dtype): outputs and input gradients."""
    results = []
    for dtype in (torch.float32, x.dtype):
        xr = x.detach().to(dtype).requires_grad_()
        out = rotary_reference(xr, cos_b.to(dtype), sin_b.to(dtype), interleaved)
        out.backward(grad.to(dtype))
        results.append((out, xr.grad))
    return results


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("rotary_fraction", [1.0, 0.5])
@pytest.mark.parametrize("offsets_kind", ["zero", "int", "tensor"])
@pytest.mark.parametrize("inplace", [False, True])
def test_apply_rotary_emb(dtype, interleaved, rotary_fraction, offsets_kind, inplace):
    batch, seqlen, nheads, headdim, seqlen_ro = 3, 13, 3, 40, 20
    rotary_dim = int(headdim * rotary_fraction)
    cos, sin = tables(seqlen_ro, rotary_dim, dtype)
    seqlen_offsets, offsets = offsets_arg(offsets_kind, batch, seqlen_ro, seqlen)
    x = torch.randn(batch, seqlen, nheads, headdim, device=DEVICE, dtype=dtype, requires_grad=True)
    grad = torch.randn_like(x)

    x_in = x.clone() if inplace else x
    out = apply_rotary_emb(x_in, cos, sin, interleaved, inplace, seqlen_offsets)
    if inplace:
        assert out.data_ptr() == x_in.data_ptr()
    out.backward(grad)

    cos_b, sin_b = per_batch(cos, offsets, seqlen), per_batch(sin, offsets, seqlen)
    (out_ref, dx_ref), (out_lowp, dx_lowp) = reference_and_lowp(x, cos_b, sin_b, interleaved, grad)
    assert_close(out, out_ref, out_lowp, "out")
    assert_close(x.grad, dx_ref, dx_lowp, "dx")
    assert torch.equal(out[..., rotary_dim:], x[..., rotary_dim:].detach())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("offsets_kind", ["zero", "tensor"])
def test_apply_rotary_emb_varlen(dtype, interleaved, offsets_kind):
    seqlens = [5, 1, 0, 7]
    nheads, headdim, rotary_dim, seqlen_ro = 2, 24, 16, 12
    batch, max_seqlen = len(seqlens), max(seqlens)
    cu_seqlens = torch.tensor([0] + seqlens, device=DEVICE).cumsum(0).to(torch.int32)
    cos, sin = tables(seqlen_ro, rotary_dim, dtype)
    seqlen_offsets, offsets = offsets_arg(offsets_kind, batch, seqlen_ro, max_seqlen)
    x = torch.randn(sum(seqlens), nheads, headdim, device=DEVICE, dtype=dtype, requires_grad=True)
    grad = torch.randn_like(x)

    out = apply_rotary_emb_func(
        x, cos, sin, interleaved, False, seqlen_offsets, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen
    )
    out.backward(grad)

    starts = cu_seqlens.tolist()
    for name, ours, index in (("out", out, 0), ("dx", x.grad, 1)):
        for b, (start, end) in enumerate(zip(starts[:-1], starts[1:])):
            seq_cos = per_batch(cos, offsets[b : b + 1], end - start)
            seq_sin = per_batch(sin, offsets[b : b + 1], end - start)
            ref, lowp = reference_and_lowp(x[None, start:end], seq_cos, seq_sin, interleaved, grad[None, start:end])
            assert_close(ours[None, start:end], ref[index], lowp[index], f"{name} of sequence {b}")


def test_positions_past_the_table_are_not_rotated():
    seqlen_ro, rotary_dim = 6, 8
    cos, sin = tables(seqlen_ro, rotary_dim, torch.float32)
    x = torch.randn(2, 4, 1, rotary_dim, device=DEVICE)
    offsets = torch.tensor([0, 4], device=DEVICE, dtype=torch.int32)
    out = apply_rotary_emb(x, cos, sin, seqlen_offsets=offsets)
    # The second sequence runs from position 4 to 7; the table ends at 5.
    assert torch.equal(out[1, 2:], x[1, 2:])
    ref = rotary_reference(x[1:, :2], cos[None, 4:6], sin[None, 4:6], False)
    torch.testing.assert_close(out[1:, :2], ref)


def qkv_reference(qkv, cos_b, sin_b, cos_k_b, sin_k_b, interleaved, num_heads_q):
    if qkv.dim() == 5:
        q, k, v = qkv.unbind(2)
    else:
        num_heads_k = (qkv.shape[2] - num_heads_q) // 2
        q, k, v = qkv.split([num_heads_q, num_heads_k, num_heads_k], dim=2)
    q = rotary_reference(q, cos_b, sin_b, interleaved)
    k = rotary_reference(k, cos_k_b, sin_k_b, interleaved)
    return torch.stack((q, k, v), dim=2) if qkv.dim() == 5 else torch.cat((q, k, v), dim=2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["packed", "gqa"])
@pytest.mark.parametrize("separate_k_tables", [False, True])
@pytest.mark.parametrize("offsets_kind", ["int", "tensor"])
def test_apply_rotary_emb_qkv_(dtype, layout, separate_k_tables, offsets_kind):
    batch, seqlen, headdim, rotary_dim, seqlen_ro, interleaved = 2, 7, 32, 24, 9, layout == "gqa"
    if layout == "packed":
        shape, num_heads_q = (batch, seqlen, 3, 2, headdim), None
    else:
        shape, num_heads_q = (batch, seqlen, 4 + 2 * 2, headdim), 4
    cos, sin = tables(seqlen_ro, rotary_dim, dtype)
    cos_k, sin_k = tables(seqlen_ro, rotary_dim, dtype) if separate_k_tables else (None, None)
    seqlen_offsets, offsets = offsets_arg(offsets_kind, batch, seqlen_ro, seqlen)
    qkv = torch.randn(shape, device=DEVICE, dtype=dtype, requires_grad=True)
    grad = torch.randn_like(qkv)

    qkv_in = qkv.clone()
    out = apply_rotary_emb_qkv_(qkv_in, cos, sin, cos_k, sin_k, interleaved, seqlen_offsets, num_heads_q)
    assert out.data_ptr() == qkv_in.data_ptr()
    out.backward(grad)

    k_tables = (cos_k, sin_k) if separate_k_tables else (cos, sin)
    tables_b = [per_batch(t, offsets, seqlen) for t in (cos, sin, *k_tables)]
    results = []
    for ref_dtype in (torch.float32, dtype):
        qkv_r = qkv.detach().to(ref_dtype).requires_grad_()
        out_r = qkv_reference(qkv_r, *[t.to(ref_dtype) for t in tables_b], interleaved, num_heads_q)
        out_r.backward(grad.to(ref_dtype))
        results.append((out_r, qkv_r.grad))
    assert_close(out, results[0][0], results[1][0], "qkv")
    assert_close(qkv.grad, results[0][1], results[1][1], "dqkv")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleaved", [False, True])
def test_apply_rotary_emb_kv_(dtype, interleaved):
    batch, seqlen, nheads, headdim, seqlen_ro = 2, 5, 3, 16, 8
    cos, sin = tables(seqlen_ro, headdim, dtype)
    offsets = torch.tensor([3, 0], device=DEVICE, dtype=torch.int64)
    kv = torch.randn(batch, seqlen, 2, nheads, headdim, device=DEVICE, dtype=dtype, requires_grad=True)
    grad = torch.randn_like(kv)
    out = apply_rotary_emb_kv_(kv.clone(), cos, sin, interleaved, offsets)
    out.backward(grad)

    cos_b, sin_b = per_batch(cos, [3, 0], seqlen), per_batch(sin, [3, 0], seqlen)
    (k_ref, dk_ref), (k_lowp, dk_lowp) = reference_and_lowp(kv[:, :, 0], cos_b, sin_b, interleaved, grad[:, :, 0])
    assert_close(out[:, :, 0], k_ref, k_lowp, "k")
    assert_close(kv.grad[:, :, 0], dk_ref, dk_lowp, "dk")
    assert torch.equal(out[:, :, 1], kv[:, :, 1].detach())
    assert torch.equal(kv.grad[:, :, 1], grad[:, :, 1])


def cos_sin_reference(dim, base, seqlen, scale_base):
    """float64 tables: (cos, sin) for queries and (cos_k, sin_k) for keys."""
    inv_freq = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    angles = torch.arange(seqlen, dtype=torch.float64)[:, None] * inv_freq
    if scale_base is None:
        scale = torch.ones(())
    else:
        power = (torch.arange(seqlen, dtype=torch.float64) - seqlen // 2) / scale_base
        scale = ((torch.arange(0, dim, 2, dtype=torch.float64) + 0.4 * dim) / (1.4 * dim)) ** power[:, None]
    cos, sin = angles.cos(), angles.sin()
    return (cos * scale, sin * scale), (cos / scale, sin / scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scale_base", [None, 512])
@pytest.mark.parametrize("separate_kv", [False, True])
def test_rotary_embedding_module(dtype, scale_base, separate_kv):
    batch, seqlen, nheads, headdim, rotary_dim, offset = 2, 6, 2, 32, 16, 3
    module = RotaryEmbedding(rotary_dim, base=10000.0, interleaved=False, scale_base=scale_base, device=DEVICE)
    qkv = torch.randn(batch, seqlen, 3, nheads, headdim, device=DEVICE, dtype=dtype)
    if separate_kv:
        q, kv = module(qkv[:, :, 0].clone(), qkv[:, :, 1:].clone(), seqlen_offset=offset)
        result = torch.cat((q[:, :, None], kv), dim=2)
    else:
        result = module(qkv.clone(), seqlen_offset=offset)
        assert isinstance(result, torch.Tensor)

    (cos, sin), (cos_k, sin_k) = cos_sin_reference(rotary_dim, 10000.0, seqlen + offset, scale_base)
    assert module._cos_cached.dtype == dtype and module._cos_cached.shape == (seqlen + offset, rotary_dim // 2)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else {}
    torch.testing.assert_close(module._cos_cached.double().cpu(), cos.to(dtype).double(), **tol)
    torch.testing.assert_close(module._sin_cached.double().cpu(), sin.to(dtype).double(), **tol)

    window = slice(offset, offset + seqlen)
    tables_b = [t[window][None].to(device=DEVICE, dtype=dtype).float() for t in (cos, sin, cos_k, sin_k)]
    ref = qkv_reference(qkv.float(), *tables_b, False, None)
    torch.testing.assert_close(result.float(), ref, **(tol or dict(atol=3e-2, rtol=2e-2)))


@gpu_only
def test_many_sequences_beyond_grid_axis_limits():
    # 70000 sequences need more programs than grid axes 1 and 2 allow.
    batch, rotary_dim = 70000, 8
    cos, sin = tables(4, rotary_dim, torch.float16)
    x = torch.randn(batch, 1, 1, rotary_dim, device=DEVICE, dtype=torch.float16)
    offsets = torch.randint(0, 4, (batch,), device=DEVICE, dtype=torch.int32)
    out = apply_rotary_emb(x, cos, sin, seqlen_offsets=offsets)
    ref = rotary_reference(x.float(), cos.float()[offsets.long()][:, None], sin.float()[offsets.long()][:, None], False)
    torch.testing.assert_close(out.float(), ref, atol=2e-3, rtol=2e-3)


@gpu_only
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_apply_rotary_emb_llama_shape(dtype):
    batch, seqlen, nheads, headdim = 2, 4096, 32, 128
    cos, sin = tables(seqlen, headdim, dtype)
    x = torch.randn(batch, seqlen, nheads, headdim, device=DEVICE, dtype=dtype, requires_grad=True)
    grad = torch.randn_like(x)
    out = apply_rotary_emb(x, cos, sin)
    out.backward(grad)
    cos_b, sin_b = per_batch(cos, [0] * batch, seqlen), per_batch(sin, [0] * batch, seqlen)
    (out_ref, dx_ref), (out_lowp, dx_lowp) = reference_and_lowp(x, cos_b, sin_b, False, grad)
    assert_close(out, out_ref, out_lowp, "out")
    assert_close(x.grad, dx_ref, dx_lowp, "dx")
