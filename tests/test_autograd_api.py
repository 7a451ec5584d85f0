"""GPU tests of the backward pass through the six public autograd paths (flash_attn_func,
flash_attn_kvpacked_func, flash_attn_qkvpacked_func and their varlen versions).

Rule (as upstream's suite, per gradient): max|grad - ref| <= 2 * max|grad_pt - ref| + atol, with
ref the gradient of a float32 PyTorch reference, grad_pt the gradient of the same math done by
PyTorch in the input dtype, atol 1e-4 (fp16) / 1e-3 (bf16). Also: packed gradients equal the
unpacked ones bitwise (deterministic backward), deterministic=True repeated gives bitwise-equal
gradients, a head dim of 59 (zero-padded to 64 for the kernels) gets gradients of its own shape,
and varlen batches with sequences of length 1 and 0.
"""

import pytest
import torch

from helpers import DEVICE, flash_attn, flash_attn_gpu, max_abs_diff, requires_gpu

pytestmark = [
    *requires_gpu,
    pytest.mark.skipif(flash_attn_gpu is not None and not hasattr(flash_attn_gpu, "bwd"),
                       reason="this flash_attn_2_cuda build has no backward kernel (bwd)"),
]

DTYPES = [torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp16", "bf16"]
ATOL = {torch.float16: 1e-4, torch.bfloat16: 1e-3}

# ---------------------------------------------------------------------------------------------
# Reference: softmax(QK^T * scale [softcapped] + alibi + mask) V, differentiable
# ---------------------------------------------------------------------------------------------


def attention_reference(q, k, v, softmax_scale=None, causal=False, window_size=(-1, -1),
                        softcap=0.0, alibi_slopes=None, upcast=True):
    """q: (batch, seqlen_q, nheads, d), k/v: (batch, seqlen_k, nheads_k, d). upcast: float32 math,
    float32 out; else PyTorch's math in the input dtype (softmax in float32), out in that dtype.
    Causal and windows align to the bottom-right corner; rows with no allowed key give 0."""
    batch, seqlen_q, nheads, d = q.shape
    seqlen_k, nheads_k = k.shape[1], k.shape[2]
    scale = d ** -0.5 if softmax_scale is None else softmax_scale
    dtype = torch.float32 if upcast else q.dtype
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    k = k.repeat_interleave(nheads // nheads_k, dim=2)
    v = v.repeat_interleave(nheads // nheads_k, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q * scale, k).float()
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    i = torch.arange(seqlen_q, device=q.device).view(-1, 1) + seqlen_k - seqlen_q
    j = torch.arange(seqlen_k, device=q.device).view(1, -1)
    if alibi_slopes is not None:
        scores = scores - alibi_slopes.float().view(-1, nheads, 1, 1) * (i - j).abs()
    left, right = window_size
    right = 0 if causal else right
    allowed = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=q.device)
    if left >= 0:
        allowed &= j >= i - left
    if right >= 0:
        allowed &= j <= i + right
    # Rows without an allowed key get finite scores before the softmax (no NaN, in the forward
    # or the backward), then probability 0.
    scores = scores.masked_fill(~allowed, float("-inf"))
    scores = scores.masked_fill(~allowed.any(-1, keepdim=True), 0.0)
    probs = torch.softmax(scores, dim=-1) * allowed
    return torch.einsum("bhqk,bkhd->bqhd", probs.to(dtype), v)


def varlen_reference(q, k, v, cu_seqlens_q, cu_seqlens_k, **kw):
    """The reference per sequence of a varlen batch: q (total_q, h, d), k/v (total_k, hk, d)."""
    cu_q, cu_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    outs = [
        attention_reference(q[None, cu_q[b]:cu_q[b + 1]], k[None, cu_k[b]:cu_k[b + 1]],
                            v[None, cu_k[b]:cu_k[b + 1]], **kw)[0]
        for b in range(len(cu_q) - 1)
    ]
    return torch.cat(outs)


def assert_grads_close(grads, grads_ref, grads_pt, dtype, names):
    for g, r, p, name in zip(grads, grads_ref, grads_pt, names):
        assert g.shape == r.shape, (name, g.shape, r.shape)
        assert not torch.isnan(g).any(), f"{name} has NaN entries"
        err, err_pt = max_abs_diff(g, r), max_abs_diff(p, r)
        assert err <= 2 * err_pt + ATOL[dtype], (
            f"{name}: max|grad - ref| = {err:.3e} > 2 * max|grad_pt - ref| ({err_pt:.3e}) "
            f"+ {ATOL[dtype]}")


def gradients(out, inputs, dout):
    return torch.autograd.grad(out, inputs, dout)


def randn(*shape, dtype, requires_grad=True):
    return torch.randn(*shape, device=DEVICE, dtype=dtype).requires_grad_(requires_grad)


def cu_seqlens(lengths):
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths).cumsum(0)
    return cu.to(DEVICE)


# ---------------------------------------------------------------------------------------------
# The six autograd paths, each as (inputs, flash call, reference call on the same inputs)
# ---------------------------------------------------------------------------------------------

BATCH = 2
SHAPES = dict(seqlen_q=113, seqlen_k=203, varlen_q=[113, 1, 64, 37], varlen_k=[203, 1, 64, 90])


def make_case(path, dtype, d, nheads, nheads_k, shapes=SHAPES, **kw):
    """(inputs, run(*inputs, **more_kw) -> out, reference(*inputs, upcast) -> out) for one
    autograd path, with the attention options kw. Packed qkv needs nheads_k == nheads, and the
    varlen qkv path uses the varlen_k lengths for queries and keys alike."""
    sq, sk = shapes["seqlen_q"], shapes["seqlen_k"]
    lens_q, lens_k = shapes["varlen_q"], shapes["varlen_k"]
    cu_q, cu_k = cu_seqlens(lens_q), cu_seqlens(lens_k)
    total_q, total_k, max_q, max_k = sum(lens_q), sum(lens_k), max(lens_q), max(lens_k)

    def ref(f):
        return lambda *x, upcast: f(*x, upcast=upcast, **kw)

    if path == "func":
        inputs = (randn(BATCH, sq, nheads, d, dtype=dtype),
                  randn(BATCH, sk, nheads_k, d, dtype=dtype),
                  randn(BATCH, sk, nheads_k, d, dtype=dtype))
        run = lambda q, k, v, **more: flash_attn.flash_attn_func(  # noqa: E731
            q, k, v, **kw, **more)
        return inputs, run, ref(attention_reference)
    if path == "kvpacked":
        inputs = (randn(BATCH, sq, nheads, d, dtype=dtype),
                  randn(BATCH, sk, 2, nheads_k, d, dtype=dtype))
        run = lambda q, kv, **more: flash_attn.flash_attn_kvpacked_func(  # noqa: E731
            q, kv, **kw, **more)
        return inputs, run, ref(
            lambda q, kv, **r: attention_reference(q, kv[:, :, 0], kv[:, :, 1], **r))
    if path == "qkvpacked":
        inputs = (randn(BATCH, sk, 3, nheads, d, dtype=dtype),)
        run = lambda qkv, **more: flash_attn.flash_attn_qkvpacked_func(  # noqa: E731
            qkv, **kw, **more)
        return inputs, run, ref(
            lambda qkv, **r: attention_reference(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], **r))
    if path == "varlen":
        inputs = (randn(total_q, nheads, d, dtype=dtype), randn(total_k, nheads_k, d, dtype=dtype),
                  randn(total_k, nheads_k, d, dtype=dtype))
        run = lambda q, k, v, **more: flash_attn.flash_attn_varlen_func(  # noqa: E731
            q, k, v, cu_q, cu_k, max_q, max_k, **kw, **more)
        return inputs, run, ref(lambda q, k, v, **r: varlen_reference(q, k, v, cu_q, cu_k, **r))
    if path == "varlen_kvpacked":
        inputs = (randn(total_q, nheads, d, dtype=dtype),
                  randn(total_k, 2, nheads_k, d, dtype=dtype))
        run = lambda q, kv, **more: flash_attn.flash_attn_varlen_kvpacked_func(  # noqa: E731
            q, kv, cu_q, cu_k, max_q, max_k, **kw, **more)
        return inputs, run, ref(
            lambda q, kv, **r: varlen_reference(q, kv[:, 0], kv[:, 1], cu_q, cu_k, **r))
    assert path == "varlen_qkvpacked"
    inputs = (randn(total_k, 3, nheads, d, dtype=dtype),)
    run = lambda qkv, **more: flash_attn.flash_attn_varlen_qkvpacked_func(  # noqa: E731
        qkv, cu_k, max_k, **kw, **more)
    return inputs, run, ref(
        lambda qkv, **r: varlen_reference(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu_k, cu_k, **r))


PATHS = ["func", "kvpacked", "qkvpacked", "varlen", "varlen_kvpacked", "varlen_qkvpacked"]
FEATURES = {
    "plain": dict(),
    "causal": dict(causal=True),
    "window": dict(window_size=(17, 5)),
    "causal_window": dict(causal=True, window_size=(32, -1)),
    "softcap": dict(softcap=3.0),
    "alibi": dict(alibi="h"),
    "scale_causal": dict(softmax_scale=0.3, causal=True),
}


def check_path(path, dtype, d, nheads, nheads_k, shapes=SHAPES, **features):
    kw = dict(features)
    if kw.pop("alibi", None):
        kw["alibi_slopes"] = torch.rand(nheads, device=DEVICE) * 0.3
    inputs, run, reference = make_case(path, dtype, d, nheads, nheads_k, shapes, **kw)
    out = run(*inputs)
    dout = torch.randn_like(out)
    grads = gradients(out, inputs, dout)
    grads_ref = gradients(reference(*inputs, upcast=True), inputs, dout.float())
    grads_pt = gradients(reference(*inputs, upcast=False), inputs, dout)
    assert_grads_close(grads, grads_ref, grads_pt, dtype, [f"grad {i}" for i in range(len(inputs))])
    return grads


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("feature", sorted(FEATURES))
@pytest.mark.parametrize("path", PATHS)
def test_gradients(path, feature, dtype, require_kernel):
    require_kernel(64, dtype)
    gqa = path in ("func", "kvpacked", "varlen", "varlen_kvpacked")
    check_path(path, dtype, 64, 6, 2 if gqa else 6, **FEATURES[feature])


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("d", [32, 59, 96, 128, 256])
@pytest.mark.parametrize("path", ["func", "qkvpacked", "varlen", "varlen_kvpacked"])
def test_gradients_head_dims(path, d, dtype, require_kernel):
    # 59 is not a multiple of 8: the Python layer zero-pads q/k/v and dout to 64 and slices the
    # gradients back to 59.
    require_kernel(d, dtype)
    gqa = path in ("func", "varlen", "varlen_kvpacked")
    grads = check_path(path, dtype, d, 4, 2 if gqa else 4, causal=True)
    assert all(g.shape[-1] == d for g in grads)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("path", ["varlen", "varlen_kvpacked", "varlen_qkvpacked"])
def test_varlen_ragged_lengths_with_1_and_0(path, causal, require_kernel):
    require_kernel(64, torch.float16)
    # Empty query sequences, empty key sequences (rows with no key: out 0, gradients 0) and
    # length-1 sequences next to longer ones. The packed qkv path has one set of lengths.
    lens_q, lens_k = [1, 0, 77, 5, 1, 130], [1, 9, 0, 5, 64, 130]
    if path == "varlen_qkvpacked":
        lens_k = lens_q
    shapes = dict(SHAPES, varlen_q=lens_q, varlen_k=lens_k)
    packed_qkv = path == "varlen_qkvpacked"
    check_path(path, torch.float16, 64, 4, 4 if packed_qkv else 2, shapes, causal=causal)


# ---------------------------------------------------------------------------------------------
# Packed == unpacked, determinism
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("d", [64, 59])
def test_packed_gradients_equal_unpacked_bitwise(d, dtype, require_kernel):
    # Packed against unpacked within one kind of call: the dense calls among themselves, the varlen
    # calls among themselves (on compute capability 9.0 the Hopper backward runs both, with the
    # sequences of a varlen call at their own row offsets).
    require_kernel(d, dtype)
    kw = dict(causal=True, deterministic=True)
    seqlen = 203
    qkv = randn(BATCH, seqlen, 3, 4, d, dtype=dtype)
    q, k, v = [qkv.detach()[:, :, i].clone().requires_grad_(True) for i in range(3)]
    dout = torch.randn(BATCH, seqlen, 4, d, device=DEVICE, dtype=dtype)
    (dqkv,) = gradients(flash_attn.flash_attn_qkvpacked_func(qkv, **kw), (qkv,), dout)
    grads = gradients(flash_attn.flash_attn_func(q, k, v, **kw), (q, k, v), dout)
    assert torch.equal(dqkv, torch.stack(grads, dim=2))
    kv = torch.stack([k.detach(), v.detach()], dim=2).requires_grad_(True)
    dq, dkv = gradients(flash_attn.flash_attn_kvpacked_func(q, kv, **kw), (q, kv), dout)
    assert torch.equal(dq, grads[0]) and torch.equal(dkv, torch.stack(grads[1:], dim=2))

    cu = cu_seqlens([seqlen] * BATCH)
    flat = lambda x: x.detach().flatten(0, 1).requires_grad_(True)  # noqa: E731
    qkv_v, q_v, k_v, v_v = flat(qkv), flat(q), flat(k), flat(v)
    dout_v = dout.flatten(0, 1)
    out = flash_attn.flash_attn_varlen_qkvpacked_func(qkv_v, cu, seqlen, **kw)
    (dqkv_v,) = gradients(out, (qkv_v,), dout_v)
    out = flash_attn.flash_attn_varlen_func(q_v, k_v, v_v, cu, cu, seqlen, seqlen, **kw)
    grads_v = gradients(out, (q_v, k_v, v_v), dout_v)
    assert torch.equal(dqkv_v, torch.stack(grads_v, dim=1))
    kv_v = torch.stack([k_v.detach(), v_v.detach()], dim=1).requires_grad_(True)
    out = flash_attn.flash_attn_varlen_kvpacked_func(q_v, kv_v, cu, cu, seqlen, seqlen, **kw)
    dq_v, dkv_v = gradients(out, (q_v, kv_v), dout_v)
    assert torch.equal(dq_v, grads_v[0]) and torch.equal(dkv_v, torch.stack(grads_v[1:], dim=1))


@pytest.mark.parametrize("path", PATHS)
def test_deterministic_gradients_repeat_bitwise(path, require_kernel):
    require_kernel(128, torch.bfloat16)
    # Long enough key sequences that many key blocks contribute to each dq row (the part that
    # accumulates across thread blocks), GQA so that dk/dv sum over query heads.
    shapes = dict(seqlen_q=1024, seqlen_k=1024, varlen_q=[1024, 300, 1], varlen_k=[1024, 700, 9])
    gqa = path in ("func", "kvpacked", "varlen", "varlen_kvpacked")
    inputs, run, _ = make_case(path, torch.bfloat16, 128, 8, 2 if gqa else 8, shapes, causal=True)
    out = run(*inputs, deterministic=True)
    dout = torch.randn_like(out)
    first = gradients(out, inputs, dout)
    for _ in range(9):
        again = gradients(run(*inputs, deterministic=True), inputs, dout)
        assert all(torch.equal(a, b) for a, b in zip(first, again))


def test_lse_and_S_dmask_with_return_attn_probs(require_kernel):
    require_kernel(64, torch.float16)
    q, k, v = (randn(2, 33, 4, 64, dtype=torch.float16) for _ in range(3))
    out, lse, S_dmask = flash_attn.flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    assert out.requires_grad and lse.shape == (2, 4, 33) and S_dmask.shape == (0,)
    out.sum().backward()
    assert q.grad is not None and q.grad.shape == q.shape
