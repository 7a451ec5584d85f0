"""Attention dropout (upstream flash-attn 2.8.3 semantics), through the native entry points and the
public Python API.

The mask is never stored: the kernels regenerate it from Philox (seed, offset) in rng_state. With
return_softmax the forward returns S_dmask, (batch, heads, seqlen_q and seqlen_k rounded up to 128),
holding the un-normalised probabilities with every dropped entry negated; its sign bits are the
mask. The checks:
  * the dropped fraction over visible entries is p within statistical bounds, and heads differ;
  * out and dq / dk / dv match a float32 reference that uses the SAME mask (rebuilt from S_dmask):
    (softmax(QK^T * scale + bias) o keep / (1 - p)) V with autograd, under
    max|x - ref| <= 2 * max|x_pt - ref| + eps  (x_pt: the same math in the input dtype);
  * the same torch seed gives bitwise equal results, another seed a different mask;
  * a forward + backward captured in a CUDA graph draws a fresh mask per replay, and each replay
    equals an eager call on a generator set to that replay's (seed, offset);
  * deterministic=True is bitwise repeatable; split / decode plans are not used with dropout.
"""

import math

import pytest
import torch

from helpers import (
    DEVICE, capture_graph, device_available, flash_attn, flash_attn_gpu, kernel_names, max_abs_diff, randn,
    require_kernel
)
from reference import alibi_bias, allowed_mask, kernel_headdim, lengths_to_mask, make_alibi_slopes, pack, unpack

gpu_only = [
    pytest.mark.skipif(not device_available() or DEVICE != "cuda", reason="needs a CUDA GPU"),
    pytest.mark.skipif(flash_attn_gpu is None, reason="flash_attn_2_cuda extension not built"),
    pytest.mark.skipif(flash_attn is None, reason="flash_attn package not importable"),
]
needs_ext = pytest.mark.skipif(flash_attn_gpu is None, reason="flash_attn_2_cuda extension not built")


def gpu_test(fn):
    for mark in gpu_only:
        fn = mark(fn)
    return fn


def _round128(x):
    return (x + 127) // 128 * 128


def _native_fwd(q, k, v, p, *, causal=False, window=(-1, -1), softcap=0.0, alibi=None, num_splits=0, gen=None):
    """fwd with return_softmax: (out, lse, S_dmask, rng_state)."""
    scale = q.shape[-1] ** -0.5
    return flash_attn_gpu.fwd(q, k, v, None, alibi, p, scale, causal, window[0], window[1], softcap, True, gen,
                              num_splits)


def _native_bwd(dout, q, k, v, out, lse, rng_state, p, *, causal=False, window=(-1, -1), softcap=0.0, alibi=None,
                deterministic=False):
    scale = q.shape[-1] ** -0.5
    return flash_attn_gpu.bwd(dout, q, k, v, out, lse, None, None, None, alibi, p, scale, causal, window[0],
                              window[1], softcap, deterministic, None, rng_state)


def _keep_from_s_dmask(s_dmask, seqlen_q, seqlen_k):
    """The keep mask (batch, heads, seqlen_q, seqlen_k): dropped entries carry a sign bit (-0.0
    included, for probabilities that underflowed)."""
    return ~torch.signbit(s_dmask[:, :, :seqlen_q, :seqlen_k])


def dropout_attention_ref(q, k, v, keep, p, *, causal=False, window=(-1, -1), softcap=0.0, alibi=None,
                          query_padding_mask=None, key_padding_mask=None, upcast=True):
    """(softmax(q k^T * scale + bias) o keep / (1 - p)) v on padded tensors (b, s, h, d). upcast: in
    float32, else the way PyTorch computes in the input dtype (softmax in fp32, cast back)."""
    batch, seqlen_q, nheads, d = q.shape
    seqlen_k, nheads_k = k.shape[1], k.shape[2]
    dtype_og = q.dtype
    if upcast:
        q, k, v = q.float(), k.float(), v.float()
    if nheads_k != nheads:
        k = k.repeat_interleave(nheads // nheads_k, dim=2)
        v = v.repeat_interleave(nheads // nheads_k, dim=2)
    scale = d ** -0.5
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    scores = torch.matmul(qh, kh.transpose(-1, -2)) * scale if upcast else torch.matmul(qh * scale, kh.transpose(-1, -2))
    if softcap > 0:
        scores = torch.tanh(scores / softcap) * softcap
    if alibi is not None:
        scores = scores + alibi_bias(alibi, batch, nheads, seqlen_q, seqlen_k, query_padding_mask, key_padding_mask,
                                     dtype=torch.float32)
    allowed = allowed_mask(batch, seqlen_q, seqlen_k, query_padding_mask, key_padding_mask, causal, window,
                           device=q.device)
    scores = scores.float().masked_fill(~allowed, float("-inf"))
    attn = torch.softmax(scores, dim=-1).masked_fill(~allowed.any(-1, keepdim=True), 0.0)
    attn = attn.masked_fill(~keep, 0.0) / (1.0 - p)
    if not upcast:
        attn = attn.to(dtype_og)
    out = torch.matmul(attn, vh).transpose(1, 2)
    if query_padding_mask is not None:
        out = out.masked_fill(~query_padding_mask.view(batch, seqlen_q, 1, 1), 0.0)
    return out, allowed


def _ref_and_grads(q, k, v, dout, keep, p, upcast, **kw):
    leaves = [(x.float() if upcast else x).detach().clone().requires_grad_(True) for x in (q, k, v)]
    out, _ = dropout_attention_ref(*leaves, keep, p, upcast=upcast, **kw)
    out.backward(dout.to(out.dtype))
    return [out.detach()] + [x.grad for x in leaves]


def _assert_close(name, x, ref, pt):
    assert x.shape == ref.shape, (name, x.shape, ref.shape)
    assert not torch.isnan(x).any(), f"{name} has NaN"
    err, err_pt = max_abs_diff(x, ref), max_abs_diff(pt, ref)
    eps = 1e-4 + 2 * max_abs_diff(ref.to(x.dtype), ref)
    assert err <= 2 * err_pt + eps, f"{name}: max|x - ref| = {err:.3e} > 2 * {err_pt:.3e} + {eps:.3e}"


def _check_against_reference(results, q, k, v, dout, keep, p, **kw):
    """results: (out, dq, dk, dv) of the kernels, padded layout."""
    ref = _ref_and_grads(q, k, v, dout, keep, p, True, **kw)
    pt = _ref_and_grads(q, k, v, dout, keep, p, False, **kw)
    for name, x, r, t in zip(("out", "dq", "dk", "dv"), results, ref, pt):
        _assert_close(name, x, r, t)


# ---------------------------------------------------------------------------------------------
# The mask as a pure function of (seed, offset, b, h, i, j): a PyTorch replica of the kernels'
# Philox4x32-10 counter layout (csrc/flash_attn/src/common/dropout.h), in int64 arithmetic
# ---------------------------------------------------------------------------------------------

_MASK32 = 0xFFFFFFFF


def _mulhilo32(a, x):
    """(hi, lo) 32-bit halves of a * x, a a Python int, x an int64 tensor in [0, 2^32)."""
    p_lo, p_hi = a * (x & 0xFFFF), a * (x >> 16)  # each < 2^48
    mid = (p_lo >> 16) + p_hi
    return (mid >> 16) & _MASK32, (((mid & 0xFFFF) << 16) | (p_lo & 0xFFFF)) & _MASK32


def philox4x32_10(c0, c1, c2, c3, k0, k1):
    for _ in range(10):
        hi0, lo0 = _mulhilo32(0xD2511F53, c0)
        hi1, lo1 = _mulhilo32(0xCD9E8D57, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + 0x9E3779B9) & _MASK32, (k1 + 0xBB67AE85) & _MASK32
    return c0, c1, c2, c3


def keep_threshold(p):
    """The kernels' 8-bit threshold: a byte is kept iff it is below this."""
    return min(max(round((1.0 - p) * 256.0), 1), 256)


def drop_rate(p):
    """The probability of a drop the kernels implement for dropout_p = p (p at 8-bit resolution)."""
    return 1.0 - keep_threshold(p) / 256.0


def expected_keep(seed, offset, p, batch, nheads, seqlen_q, seqlen_k, device):
    """keep[b, h, i, j] as the kernels draw it."""
    seed, offset = seed & (2 ** 64 - 1), offset & (2 ** 64 - 1)
    b = torch.arange(batch, device=device).view(-1, 1, 1, 1)
    h = torch.arange(nheads, device=device).view(1, -1, 1, 1)
    i = torch.arange(seqlen_q, device=device).view(1, 1, -1, 1)
    j = torch.arange(seqlen_k, device=device).view(1, 1, 1, -1)
    stream = b * nheads + h + offset  # offsets of real calls stay far below 2^63
    shape = (batch, nheads, seqlen_q, seqlen_k)
    c0 = (j & ~9).expand(shape)  # the group of 16: rows {i0, i0 + 1, i0 + 8, i0 + 9} x keys {j0, j0 + 1, j0 + 8, j0 + 9}
    c1 = (i & ~9).expand(shape)
    c2, c3 = (stream & _MASK32).expand(shape), (stream >> 32).expand(shape)
    words = philox4x32_10(c0, c1, c2, c3, seed & _MASK32, seed >> 32)
    word_index = (2 * (i & 1) + (j & 1)).expand(shape)
    byte_index = (2 * ((i >> 3) & 1) + ((j >> 3) & 1)).expand(shape)
    chosen = torch.stack(words, dim=-1).gather(-1, word_index.unsqueeze(-1)).squeeze(-1)
    value = (chosen >> (8 * byte_index)) & 0xFF
    return value < keep_threshold(p)


def test_philox_replica_known_answers():
    # Random123's known-answer vectors for Philox4x32-10.
    def run(ctr, key):
        out = philox4x32_10(*(torch.tensor([c], dtype=torch.int64) for c in ctr), *key)
        return [int(x) for x in out]

    assert run([0, 0, 0, 0], [0, 0]) == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    assert run([_MASK32] * 4, [_MASK32, _MASK32]) == [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]
    assert run([0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344], [0xA4093822, 0x299F31D0]) == [
        0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]


# ---------------------------------------------------------------------------------------------
# Argument checks (CPU tensors: they run before the device checks)
# ---------------------------------------------------------------------------------------------


@needs_ext
def test_backward_needs_rng_state():
    q, k, v = (torch.randn(1, 8, 2, 64).half() for _ in range(3))
    lse = torch.zeros(1, 2, 8)
    with pytest.raises(RuntimeError, match="rng_state"):
        flash_attn_gpu.bwd(q, q, k, v, q, lse, None, None, None, None, 0.1, 0.125, False, -1, -1, 0.0, False, None,
                           None)


@needs_ext
@pytest.mark.parametrize("p", [1.0, -0.5, float("nan")])
def test_dropout_p_range(p):
    q, k, v = (torch.randn(1, 8, 2, 64).half() for _ in range(3))
    with pytest.raises(RuntimeError, match="dropout_p"):
        flash_attn_gpu.fwd(q, k, v, None, None, p, 0.125, False, -1, -1, 0.0, False, None, 0)


# ---------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("p", [0.1, 0.3, 0.5])
@pytest.mark.parametrize("shape", [(2, 4, 256, 512, False), (2, 3, 300, 700, True), (1, 2, 1000, 128, True)],
                         ids=["dense", "causal", "causal_sq_gt_sk"])
@gpu_test
def test_dropout_fraction(p, shape):
    require_kernel(64, torch.float16)
    batch, nheads, seqlen_q, seqlen_k, causal = shape
    q, k, v = (randn(batch, s, nheads, 64, dtype=torch.float16) for s in (seqlen_q, seqlen_k, seqlen_k))
    out, lse, s_dmask, rng_state = _native_fwd(q, k, v, p, causal=causal)
    assert s_dmask.shape == (batch, nheads, _round128(seqlen_q), _round128(seqlen_k))
    assert s_dmask.dtype == q.dtype and rng_state.shape == (2,) and rng_state.dtype == torch.int64
    visible = allowed_mask(batch, seqlen_q, seqlen_k, causal=causal, device=q.device).expand(-1, nheads, -1, -1)
    dropped = torch.signbit(s_dmask[:, :, :seqlen_q, :seqlen_k])
    n = visible.sum().item()
    frac = (dropped & visible).sum().item() / n
    rate = drop_rate(p)  # p at the kernels' 8-bit resolution: within 1/512 of p
    assert abs(rate - p) <= 1 / 512
    bound = 6 * math.sqrt(rate * (1 - rate) / n) + 1e-4
    assert abs(frac - rate) <= bound, f"dropped fraction {frac:.5f}, expected {rate:.5f} +- {bound:.5f}"
    # Outside the visible region (masked, padding to 128) everything is 0; kept entries are >= 0.
    assert (s_dmask[:, :, :seqlen_q, :seqlen_k].masked_fill(visible, 0) == 0).all()
    assert (s_dmask[:, :, seqlen_q:] == 0).all() and (s_dmask[:, :, :, seqlen_k:] == 0).all()
    # Every (batch, head) draws its own mask.
    assert not torch.equal(dropped[0, 0], dropped[0, 1])
    if batch > 1:
        assert not torch.equal(dropped[0, 0], dropped[1, 0])


@gpu_test
def test_dropout_mask_is_philox_of_rng_state():
    require_kernel(64, torch.float16)
    batch, nheads, seqlen_q, seqlen_k, p = 2, 3, 77, 150, 0.4
    q = randn(batch, seqlen_q, nheads, 64, dtype=torch.float16)
    k, v = (randn(batch, seqlen_k, nheads, 64, dtype=torch.float16) for _ in range(2))
    torch.manual_seed(99)
    _, _, s_dmask, rng_state = _native_fwd(q, k, v, p)
    seed, offset = (int(x) for x in rng_state.tolist())
    keep = _keep_from_s_dmask(s_dmask, seqlen_q, seqlen_k)
    assert torch.equal(keep, expected_keep(seed, offset, p, batch, nheads, seqlen_q, seqlen_k, q.device))


CASES = {
    "dense_d64_fp16": dict(d=64, dtype=torch.float16, sq=128, sk=256),
    "causal_d128_bf16": dict(d=128, dtype=torch.bfloat16, sq=200, sk=333, causal=True),
    "d32_odd": dict(d=32, dtype=torch.float16, sq=17, sk=113),
    "d96_sq_gt_sk_causal": dict(d=96, dtype=torch.bfloat16, sq=150, sk=70, causal=True),
    "d192_gqa": dict(d=192, dtype=torch.float16, sq=130, sk=257, nheads=6, nheads_k=2),
    "d256_window": dict(d=256, dtype=torch.bfloat16, sq=190, sk=190, window=(32, 8)),
    "d128_softcap": dict(d=128, dtype=torch.float16, sq=64, sk=300, softcap=30.0),
    "d64_alibi_causal": dict(d=64, dtype=torch.float16, sq=257, sk=257, alibi="bh", causal=True),
    "d128_gqa_window_softcap_alibi": dict(d=128, dtype=torch.bfloat16, sq=100, sk=220, nheads=8, nheads_k=2,
                                          window=(40, 3), softcap=5.0, alibi="h"),
}


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic_dq", "deterministic"])
@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
@gpu_test
def test_dropout_matches_reference(case, deterministic):
    d, dtype, sq, sk = case["d"], case["dtype"], case["sq"], case["sk"]
    require_kernel(d, dtype)
    nheads, nheads_k, batch, p = case.get("nheads", 4), case.get("nheads_k", case.get("nheads", 4)), 2, 0.17
    causal, window, softcap = case.get("causal", False), case.get("window", (-1, -1)), case.get("softcap", 0.0)
    alibi = make_alibi_slopes(case.get("alibi"), batch, nheads, DEVICE)
    q = randn(batch, sq, nheads, d, dtype=dtype)
    k, v = (randn(batch, sk, nheads_k, d, dtype=dtype) for _ in range(2))
    dout = randn(batch, sq, nheads, d, dtype=dtype)
    kw = dict(causal=causal, window=window, softcap=softcap, alibi=alibi)
    out, lse, s_dmask, rng_state = _native_fwd(q, k, v, p, **kw)
    dq, dk, dv, _ = _native_bwd(dout, q, k, v, out, lse, rng_state, p, deterministic=deterministic, **kw)
    keep = _keep_from_s_dmask(s_dmask, sq, sk)
    _check_against_reference((out, dq, dk, dv), q, k, v, dout, keep, p, **kw)


# The Hopper backward takes dropout at kernel head dims 64-256 (dense, no softcap or ALiBi): S^T
# fragments at 64 / 96 / 128, S at 192 / 256 (lanes l and l ^ 4 trade Philox words in both).
HOPPER_CASES = {
    "d64_fp16_gqa_causal": dict(d=64, dtype=torch.float16, sq=255, sk=300, nheads=8, nheads_k=2, causal=True),
    "d96_bf16_window": dict(d=96, dtype=torch.bfloat16, sq=200, sk=130, window=(40, 3)),
    "d128_fp16_dense": dict(d=128, dtype=torch.float16, sq=113, sk=333),
    "d192_bf16_causal": dict(d=192, dtype=torch.bfloat16, sq=130, sk=257, causal=True),
    "d256_fp16_gqa": dict(d=256, dtype=torch.float16, sq=77, sk=190, nheads=4, nheads_k=2),
}


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic_dq", "deterministic"])
@pytest.mark.parametrize("case", list(HOPPER_CASES.values()), ids=list(HOPPER_CASES))
@gpu_test
def test_dropout_backward_hopper_and_sm80(case, deterministic):
    """On a compute capability 9.0 GPU the Hopper backward runs (kernel trace) and regenerates the
    forward's mask: its gradients and the SM80 backward's on the same call meet the reference built
    from S_dmask; deterministic calls repeat bitwise."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("needs a compute capability 9.0 GPU")
    d, dtype, sq, sk = case["d"], case["dtype"], case["sq"], case["sk"]
    require_kernel(d, dtype)
    info = flash_attn_gpu.build_info()
    if kernel_headdim(d) not in [int(h) for h in info.get("sm90_backward_headdims", [])]:
        pytest.skip("this build has no Hopper backward for this head dim")
    nheads, nheads_k, batch, p = case.get("nheads", 4), case.get("nheads_k", case.get("nheads", 4)), 2, 0.23
    kw = dict(causal=case.get("causal", False), window=case.get("window", (-1, -1)))
    q = randn(batch, sq, nheads, d, dtype=dtype)
    k, v = (randn(batch, sk, nheads_k, d, dtype=dtype) for _ in range(2))
    dout = randn(batch, sq, nheads, d, dtype=dtype)
    out, lse, s_dmask, rng_state = _native_fwd(q, k, v, p, **kw)
    keep = _keep_from_s_dmask(s_dmask, sq, sk)

    def backward():
        return _native_bwd(dout, q, k, v, out, lse, rng_state, p, deterministic=deterministic, **kw)[:3]

    previous = flash_attn_gpu.set_sm90_backward(True)
    try:
        names = kernel_names(backward)
        if names:  # [] under compute-sanitizer: the kernel is unknown there
            assert any("flash_bwd_sm90_kernel" in n for n in names), names
        grads = backward()
        if deterministic:
            for name, a, b in zip(("dq", "dk", "dv"), grads, backward()):
                assert torch.equal(a, b), f"{name} differs between deterministic calls"
        flash_attn_gpu.set_sm90_backward(False)
        grads_sm80 = backward()
    finally:
        flash_attn_gpu.set_sm90_backward(previous)
    _check_against_reference((out, *grads), q, k, v, dout, keep, p, **kw)
    _check_against_reference((out, *grads_sm80), q, k, v, dout, keep, p, **kw)


@pytest.mark.parametrize("case", list(HOPPER_CASES.values()), ids=list(HOPPER_CASES))
@gpu_test
def test_dropout_forward_hopper_and_sm80(case):
    """On a compute capability 9.0 GPU the Hopper forward's dropout variant runs (kernel trace; no
    S_dmask from it, so the mask is the replica's, from its rng_state): out and lse against the
    reference with that mask, and the SM80 forward on the same generator state draws the same mask
    (its S_dmask equals the replica's) and meets the reference too."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("needs a compute capability 9.0 GPU")
    d, dtype, sq, sk = case["d"], case["dtype"], case["sq"], case["sk"]
    require_kernel(d, dtype)
    if kernel_headdim(d) not in [int(h) for h in flash_attn_gpu.build_info().get("sm90_forward_headdims", [])]:
        pytest.skip("this build has no Hopper forward for this head dim")
    nheads, nheads_k, batch, p = case.get("nheads", 4), case.get("nheads_k", case.get("nheads", 4)), 2, 0.23
    causal, window = case.get("causal", False), case.get("window", (-1, -1))
    q = randn(batch, sq, nheads, d, dtype=dtype)
    k, v = (randn(batch, sk, nheads_k, d, dtype=dtype) for _ in range(2))
    dout = randn(batch, sq, nheads, d, dtype=dtype)
    scale = d ** -0.5

    def forward(return_softmax, seed):
        gen = torch.Generator(device=DEVICE)
        gen.manual_seed(seed)
        return flash_attn_gpu.fwd(q, k, v, None, None, p, scale, causal, window[0], window[1], 0.0, return_softmax,
                                  gen, 0)

    previous = flash_attn_gpu.set_sm90_forward(True)
    try:
        names = kernel_names(lambda: forward(False, 7))
        if names:  # [] under compute-sanitizer: the kernel is unknown there
            assert any("flash_fwd_sm90_kernel" in n for n in names), names
        out, lse, _, rng_state = forward(False, 7)
        flash_attn_gpu.set_sm90_forward(False)
        out_sm80, _, s_dmask, rng_state_sm80 = forward(True, 7)
    finally:
        flash_attn_gpu.set_sm90_forward(previous)
    assert torch.equal(rng_state, rng_state_sm80)
    seed, offset = (int(x) for x in rng_state.tolist())
    keep = expected_keep(seed, offset, p, batch, nheads, sq, sk, q.device)
    visible = allowed_mask(batch, sq, sk, causal=causal, window_size=window, device=q.device)
    assert torch.equal(_keep_from_s_dmask(s_dmask, sq, sk) & visible, keep & visible)
    kw = dict(causal=causal, window=window)
    ref = _ref_and_grads(q, k, v, dout, keep, p, True, **kw)
    pt = _ref_and_grads(q, k, v, dout, keep, p, False, **kw)
    _assert_close("out", out, ref[0], pt[0])
    _assert_close("out (SM80)", out_sm80, ref[0], pt[0])
    dq, dk, dv, _ = _native_bwd(dout, q, k, v, out, lse, rng_state, p, **kw)
    for name, x, r, t in zip(("dq", "dk", "dv"), (dq, dk, dv), ref[1:], pt[1:]):
        _assert_close(name, x, r, t)


@gpu_test
def test_dropout_varlen_ragged():
    d, dtype, nheads, nheads_k, p = 64, torch.float16, 4, 2, 0.25
    require_kernel(d, dtype)
    lens_q, lens_k = [1, 0, 130, 77, 5], [0, 1, 200, 77, 300]
    batch, max_q, max_k = len(lens_q), max(lens_q), max(lens_k)
    qpm = lengths_to_mask(torch.tensor(lens_q), max_q).to(DEVICE)
    kpm = lengths_to_mask(torch.tensor(lens_k), max_k).to(DEVICE)
    q = randn(batch, max_q, nheads, d, dtype=dtype)
    k, v = (randn(batch, max_k, nheads_k, d, dtype=dtype) for _ in range(2))
    dout = randn(batch, max_q, nheads, d, dtype=dtype)
    qp, cu_q, _, idx_q = pack(q, qpm)
    kp, cu_k, _, idx_k = pack(k, kpm)
    vp, doutp = pack(v, kpm)[0], pack(dout, qpm)[0]
    scale = d ** -0.5
    for causal in (False, True):
        out, lse, s_dmask, rng_state = flash_attn_gpu.varlen_fwd(
            qp, kp, vp, None, cu_q, cu_k, None, None, None, None, max_q, max_k, p, scale, False, causal, -1, -1, 0.0,
            True, None, 0)
        assert s_dmask.shape == (batch, nheads, _round128(max_q), _round128(max_k))
        dq, dk, dv, _ = flash_attn_gpu.varlen_bwd(
            doutp, qp, kp, vp, out, lse, None, None, None, cu_q, cu_k, None, max_q, max_k, p, scale, False, causal,
            -1, -1, 0.0, False, None, rng_state)
        keep = _keep_from_s_dmask(s_dmask, max_q, max_k)
        results = (unpack(out, idx_q, batch, max_q), unpack(dq, idx_q, batch, max_q), unpack(dk, idx_k, batch, max_k),
                   unpack(dv, idx_k, batch, max_k))
        _check_against_reference(results, q, k, v, dout, keep, p, causal=causal, query_padding_mask=qpm,
                                 key_padding_mask=kpm)


def _api_run(q, k, v, dout, p, seed, deterministic=False, **kw):
    torch.manual_seed(seed)
    leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]
    out = flash_attn.flash_attn_func(*leaves, dropout_p=p, deterministic=deterministic, **kw)
    out.backward(dout)
    return [out.detach()] + [x.grad for x in leaves]


@gpu_test
def test_dropout_seed_reproducible():
    require_kernel(128, torch.bfloat16)
    q, k, v, dout = (randn(2, 300, 4, 128, dtype=torch.bfloat16) for _ in range(4))
    a = _api_run(q, k, v, dout, 0.3, seed=1234, causal=True)
    b = _api_run(q, k, v, dout, 0.3, seed=1234, causal=True)
    c = _api_run(q, k, v, dout, 0.3, seed=4321, causal=True)
    # dq accumulates with atomics here (order-dependent rounding); out, dk and dv are bitwise.
    for name, x, y in zip(("out", "dk", "dv"), (a[0], a[2], a[3]), (b[0], b[2], b[3])):
        assert torch.equal(x, y), f"{name} differs under the same seed"
    torch.testing.assert_close(a[1], b[1], atol=2e-2, rtol=0)
    assert not torch.equal(a[0], c[0]), "another seed gave the same output"


@gpu_test
def test_dropout_deterministic_repeatable():
    require_kernel(64, torch.float16)
    q, k, v, dout = (randn(2, 333, 4, 64, dtype=torch.float16) for _ in range(4))
    first = _api_run(q, k, v, dout, 0.2, seed=7, deterministic=True, window_size=(100, 20))
    for _ in range(9):
        again = _api_run(q, k, v, dout, 0.2, seed=7, deterministic=True, window_size=(100, 20))
        for name, x, y in zip(("out", "dq", "dk", "dv"), first, again):
            assert torch.equal(x, y), f"{name} not bitwise repeatable with deterministic=True"


@gpu_test
def test_dropout_cuda_graph_fresh_mask_per_replay():
    require_kernel(64, torch.float16)
    p, causal = 0.3, True
    q, k, v, dout = (randn(2, 200, 4, 64, dtype=torch.float16) for _ in range(4))

    def step():
        out, lse, s_dmask, rng_state = _native_fwd(q, k, v, p, causal=causal)
        dq, dk, dv, _ = _native_bwd(dout, q, k, v, out, lse, rng_state, p, causal=causal, deterministic=True)
        return out, s_dmask, rng_state, dq, dk, dv

    graph, static = capture_graph(step)
    replays = []
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        replays.append([x.clone() for x in static])
    assert not torch.equal(replays[0][0], replays[1][0]) and not torch.equal(replays[1][0], replays[2][0]), (
        "graph replays reused the mask")
    assert not torch.equal(replays[0][2], replays[1][2]), "replays recorded the same rng_state"
    for out, s_dmask, rng_state, dq, dk, dv in replays:
        # An eager call on a generator at this replay's (seed, offset) draws the same mask.
        seed, offset = (int(x) for x in rng_state.tolist())
        gen = torch.Generator(device=DEVICE)
        gen.manual_seed(seed)
        gen.set_offset(offset)
        e_out, e_lse, e_s_dmask, e_rng = _native_fwd(q, k, v, p, causal=causal, gen=gen)
        assert torch.equal(e_rng, rng_state) and torch.equal(e_out, out) and torch.equal(e_s_dmask, s_dmask)
        e_dq, e_dk, e_dv, _ = _native_bwd(dout, q, k, v, e_out, e_lse, e_rng, p, causal=causal, deterministic=True)
        for name, x, y in zip(("dq", "dk", "dv"), (dq, dk, dv), (e_dq, e_dk, e_dv)):
            assert torch.equal(x, y), f"replay {name} differs from the eager call"
    keep = _keep_from_s_dmask(replays[-1][1], 200, 200)
    out, _, _, dq, dk, dv = replays[-1]
    _check_against_reference((out, dq, dk, dv), q, k, v, dout, keep, p, causal=causal)


@pytest.mark.parametrize("nheads,nheads_k", [(8, 8), (8, 2)], ids=["mha", "gqa"])
@gpu_test
def test_dropout_single_query_ignores_splits(nheads, nheads_k):
    require_kernel(128, torch.float16)
    p, batch, sk = 0.4, 3, 1000
    q = randn(batch, 1, nheads, 128, dtype=torch.float16)
    k, v = (randn(batch, sk, nheads_k, 128, dtype=torch.float16) for _ in range(2))
    dout = randn(batch, 1, nheads, 128, dtype=torch.float16)
    out, lse, s_dmask, rng_state = _native_fwd(q, k, v, p, causal=True, num_splits=4)
    dq, dk, dv, _ = _native_bwd(dout, q, k, v, out, lse, rng_state, p, causal=True)
    keep = _keep_from_s_dmask(s_dmask, 1, sk)
    _check_against_reference((out, dq, dk, dv), q, k, v, dout, keep, p, causal=True)
    # The public API with num_splits > 1 runs as well.
    res = flash_attn.flash_attn_func(q, k, v, dropout_p=p, causal=True, num_splits=4, return_attn_probs=True)
    assert res[0].shape == q.shape and res[2].shape == (batch, nheads, 128, _round128(sk))
