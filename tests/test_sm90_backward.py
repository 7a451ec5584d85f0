"""The Hopper backward (csrc/flash_attn/src/sm90/bwd_kernel.h): on a compute capability 9.0 GPU the
dense backward at kernel head dims 64, 96, 128, 192 and 256 without softcap or ALiBi runs it,
deterministic or not, dropout or not. These tests check that the dispatcher picks it exactly where it applies
(the kernel's name in a profiler trace), that dq / dk / dv match autograd through the fp32
reference within the rule of
tests/test_backward.py, that the SM80 backward on the same call (set_sm90_backward(False)) meets
the same rule, that deterministic=True gives bitwise-equal gradients call after call, and that
calls outside its scope run the SM80 kernels with correct results.

FLASH_ATTN_TEST_SM90=0 (tests/conftest.py) turns it off for the whole suite.
"""

import math

import pytest
import torch

from helpers import (
    DEVICE, assert_grad_close, flash_attn, flash_attn_gpu, kernel_names, max_abs_diff, randn, requires_gpu
)
from reference import kernel_headdim, lengths_to_mask, pack, ref_grads

pytestmark = requires_gpu

DTYPES = [torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp16", "bf16"]
SM90_KERNEL = "flash_bwd_sm90_kernel"
SM80_KERNEL = "flash_bwd_dkdv_kernel"


def _hopper_backward_built(dtype, d=128):
    """Whether this build has the Hopper backward serving head dim d (rounded up) in dtype."""
    info = flash_attn_gpu.build_info() if flash_attn_gpu is not None else {}
    dtype_name = "bf16" if dtype == torch.bfloat16 else "fp16"
    return kernel_headdim(d) in [int(h) for h in info.get("sm90_backward_headdims", [])] and dtype_name in info.get(
        "dtypes", [])


@pytest.fixture
def hopper():
    """Skips unless the current GPU is compute capability 9.0; turns the Hopper backward on."""
    if DEVICE != "cuda" or torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("needs a compute capability 9.0 GPU")
    previous = flash_attn_gpu.set_sm90_backward(True)
    yield
    flash_attn_gpu.set_sm90_backward(previous)


def _runs_sm90(fn):
    """Whether fn launches the Hopper backward; None without a kernel trace (under compute-sanitizer)."""
    names = kernel_names(fn)
    return any(SM90_KERNEL in name for name in names) if names else None


def _native_fwd(q, k, v, scale, causal, window, softcap=0.0):
    res = flash_attn_gpu.fwd(q, k, v, None, None, 0.0, scale, causal, window[0], window[1], softcap, False)
    return res[0], res[1]


def _native_bwd(dout, q, k, v, out, lse, scale, causal, window, softcap=0.0, deterministic=False):
    """flash_attn_gpu.bwd into NaN-poisoned dq / dk / dv (every element must be written)."""
    dq, dk, dv = torch.full_like(q, math.nan), torch.full_like(k, math.nan), torch.full_like(v, math.nan)
    flash_attn_gpu.bwd(dout, q, k, v, out, lse, dq, dk, dv, None, 0.0, scale, causal, window[0], window[1], softcap,
                       deterministic, None, None)
    return dq, dk, dv


def _check(dtype, d, seqlen_q, seqlen_k, nheads, nheads_k, causal=False, window=(-1, -1), softcap=0.0,
           deterministic=False, expect_sm90=True, batch=2):
    """The native backward of one call: which kernel ran, its gradients against the reference and, where
    the Hopper backward ran, the SM80 backward's on the same inputs. Returns the gradients and
    run_as(deterministic), the same call again."""
    q = randn(batch, seqlen_q, nheads, d, dtype=dtype)
    k = randn(batch, seqlen_k, nheads_k, d, dtype=dtype)
    v = randn(batch, seqlen_k, nheads_k, d, dtype=dtype)
    dout = randn(batch, seqlen_q, nheads, d, dtype=dtype)
    scale = d ** -0.5
    out, lse = _native_fwd(q, k, v, scale, causal, window, softcap)
    run_as = lambda det: _native_bwd(dout, q, k, v, out, lse, scale, causal, window, softcap, det)  # noqa: E731
    run = lambda: run_as(deterministic)  # noqa: E731
    if expect_sm90:
        assert _runs_sm90(run) is not False, "expected the Hopper backward"
    else:
        assert _runs_sm90(run) is not True, "expected the SM80 backward"
    grads = run()
    kw = dict(causal=causal, window_size=window, softcap=softcap)
    ref = ref_grads(q, k, v, dout, True, **kw)
    pt = ref_grads(q, k, v, dout, False, **kw)
    for name, g, g_ref, g_pt in zip(("dq", "dk", "dv"), grads, ref, pt):
        assert_grad_close(name, g, g_ref, g_pt)
    if expect_sm90:
        previous = flash_attn_gpu.set_sm90_backward(False)
        try:
            assert _runs_sm90(run) is not True
            grads_sm80 = run()
        finally:
            flash_attn_gpu.set_sm90_backward(previous)
        for name, g, g_ref, g_pt in zip(("dq", "dk", "dv"), grads_sm80, ref, pt):
            assert_grad_close(f"{name} (SM80)", g, g_ref, g_pt)
    return grads, run_as


# (seqlen_q, seqlen_k): none a multiple of the query steps (64, or 128 at head dim 64) or the key
# blocks (128, or 96 at 192 and 64 at 256) but 128 itself and 192 (two blocks of 96, three of
# 64); seqlen_q > seqlen_k with causal leaves rows with no visible key (dq = 0 there), seqlen_q <
# seqlen_k leaves key blocks no causal query sees (dk = dv = 0 there).
SHAPES = [(1, 255), (17, 113), (113, 17), (128, 128), (200, 192), (255, 1000), (1000, 255), (333, 77)]
MASKS = {"none": dict(causal=False), "causal": dict(causal=True), "win32_0": dict(window=(32, 0)),
         "win17_5": dict(window=(17, 5)), "winm1_7": dict(window=(-1, 7)),
         "causal_win": dict(causal=True, window=(130, 0))}
HEADS = {"mha": (4, 4), "gqa": (8, 2), "mqa": (6, 1)}
# Each kernel head dim at its full width and one below it (columns past d read as zeros from TMA,
# never stored): 64 has 128-query steps, 96 the 64- and 32-byte swizzles and N = 48 dQ GEMMs, 192
# and 256 split the head dimension between three and two warpgroups (P and dS through shared
# memory, dK / dV transposed by stmatrix).
HEAD_DIMS = [256, 200, 192, 160, 128, 104, 96, 72, 64, 40]


@pytest.mark.parametrize("mask", list(MASKS))
@pytest.mark.parametrize("seqlen_q,seqlen_k", SHAPES)
@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_sm90_backward_matches_reference(dtype, d, seqlen_q, seqlen_k, mask, hopper):
    if not _hopper_backward_built(dtype, d):
        pytest.skip("this build has no Hopper backward for this head dim and dtype")
    m = MASKS[mask]
    _check(dtype, d, seqlen_q, seqlen_k, 4, 4, causal=m.get("causal", False), window=m.get("window", (-1, -1)))


@pytest.mark.parametrize("heads", ["gqa", "mqa"])
@pytest.mark.parametrize("mask", ["none", "causal", "win17_5"])
@pytest.mark.parametrize("seqlen_q,seqlen_k", [(255, 300), (300, 77)])
@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_sm90_backward_grouped_heads(dtype, d, seqlen_q, seqlen_k, mask, heads, hopper):
    """A block sums dK / dV over its kv head's query heads (every query head of the group in turn)."""
    if not _hopper_backward_built(dtype, d):
        pytest.skip("this build has no Hopper backward for this head dim and dtype")
    m = MASKS[mask]
    nheads, nheads_k = HEADS[heads]
    _check(dtype, d, seqlen_q, seqlen_k, nheads, nheads_k, causal=m.get("causal", False),
           window=m.get("window", (-1, -1)))


@pytest.mark.parametrize("d", [256, 192, 128, 96, 64])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_sm90_backward_autograd(dtype, d, hopper):
    """flash_attn_func's autograd path reaches the Hopper backward too."""
    if not _hopper_backward_built(dtype, d):
        pytest.skip("this build has no Hopper backward for this head dim and dtype")
    q, k, v = (randn(2, 300, 4, d, dtype=dtype).requires_grad_(True) for _ in range(3))
    dout = randn(2, 300, 4, d, dtype=dtype)
    out = flash_attn.flash_attn_func(q, k, v, causal=True)
    assert _runs_sm90(lambda: out.backward(dout, retain_graph=True)) is not False
    q.grad = k.grad = v.grad = None
    out.backward(dout)
    ref = ref_grads(q.detach(), k.detach(), v.detach(), dout, True, causal=True)
    pt = ref_grads(q.detach(), k.detach(), v.detach(), dout, False, causal=True)
    for name, g, g_ref, g_pt in zip(("dq", "dk", "dv"), (q.grad, k.grad, v.grad), ref, pt):
        assert_grad_close(name, g, g_ref, g_pt)


# Deterministic mode (sm90/bwd_dq_order.h): the key blocks that see a query block add their dQ
# parts in a fixed order, at every kernel head dim (both consumer loops; 128-query blocks and two
# row-stat warps at 64, three consumer warpgroups at 192). Shapes where many key blocks see each
# query block (300 x 1000), few do (1000 x 300: under causal, rows with no visible key and key
# blocks no query sees), ragged both ways (513 x 777), and one query row.
DETERMINISTIC_SHAPES = [(300, 1000), (1000, 300), (513, 777), (1, 255)]
KERNEL_HEAD_DIMS = [256, 192, 128, 96, 64]


def _assert_repeats_bitwise(first, run_as, calls=9, same_walk=True):
    """run_as(True) returns first again, bit for bit, call after call. The default variant's dk / dv
    equal the deterministic variant's bit for bit where both walk the query blocks in the same
    order (same_walk: under a causal or window mask); without a mask the deterministic variant may
    walk from rotated starts (sm90/bwd_dq_order.h), which sums dk / dv in another order: then
    within rounding."""
    for _ in range(calls):
        for name, a, b in zip(("dq", "dk", "dv"), first, run_as(True)):
            assert torch.equal(a, b), f"{name} differs between deterministic calls"
    _, dk, dv = run_as(False)
    for name, a, b in (("dk", dk, first[1]), ("dv", dv, first[2])):
        if same_walk:
            assert torch.equal(a, b), f"{name} differs between the two variants"
        else:
            # Two summation orders of the same fp32 terms, rounded to the gradient's dtype: at most
            # one rounding step of it apart (bf16's is 8x fp16's).
            step = 2 * torch.finfo(b.dtype).eps
            assert max_abs_diff(a, b) <= step * max(b.abs().max().item(), 1e-6), f"{name} differs between the variants"


@pytest.mark.parametrize("heads", ["mha", "gqa"])
@pytest.mark.parametrize("mask", ["none", "causal", "win17_5", "winm1_7", "causal_win"])
@pytest.mark.parametrize("seqlen_q,seqlen_k", DETERMINISTIC_SHAPES)
@pytest.mark.parametrize("d", KERNEL_HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_sm90_backward_deterministic(dtype, d, seqlen_q, seqlen_k, mask, heads, hopper):
    """deterministic=True runs the Hopper kernel: correct (the reference and the SM80 deterministic
    backward on the same call), bitwise repeatable."""
    if not _hopper_backward_built(dtype, d):
        pytest.skip("this build has no Hopper backward for this head dim and dtype")
    m = MASKS[mask]
    nheads, nheads_k = HEADS[heads]
    grads, run_as = _check(dtype, d, seqlen_q, seqlen_k, nheads, nheads_k, causal=m.get("causal", False),
                           window=m.get("window", (-1, -1)), deterministic=True)
    _assert_repeats_bitwise(grads, run_as, same_walk=mask != "none")


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize("d", KERNEL_HEAD_DIMS)
def test_sm90_backward_deterministic_many_blocks(d, causal, hopper):
    """More thread blocks than an H100 has SMs (512 to 1024 key blocks of 128, 96 or 64 keys):
    blocks wait for blocks that ran on the SMs before them. No hang, bitwise repeatable, dq within
    rounding of the default variant's."""
    if not _hopper_backward_built(torch.float16, d):
        pytest.skip("this build has no fp16 Hopper backward for this head dim")
    batch, seqlen, nheads = 2, 4096, 8
    q, k, v, dout = (randn(batch, seqlen, nheads, d, dtype=torch.float16) for _ in range(4))
    scale = d ** -0.5
    out, lse = _native_fwd(q, k, v, scale, causal, (-1, -1))
    run_as = lambda det: _native_bwd(dout, q, k, v, out, lse, scale, causal, (-1, -1), deterministic=det)  # noqa: E731
    assert _runs_sm90(lambda: run_as(True)) is not False, "expected the Hopper backward"
    first = run_as(True)
    _assert_repeats_bitwise(first, run_as, calls=4, same_walk=causal)
    dq_default = run_as(False)[0]
    # Two summation orders of the same fp32 terms: at most an fp16 rounding step apart.
    assert max_abs_diff(first[0], dq_default) <= 2e-3 * dq_default.abs().max().item()


# Keys per thread block of the Hopper backward at each kernel head dim (plan/tile_sizes.h).
BLOCK_N = {64: 128, 96: 128, 128: 128, 192: 96, 256: 64}


@pytest.mark.parametrize("d", KERNEL_HEAD_DIMS)
def test_sm90_backward_deterministic_both_walks(d, hopper):
    """Without a mask, and with no more key blocks than query blocks, the key blocks of a (batch, kv
    head) walk the query blocks from rotated starts when they take at most half the SMs
    (plan/heuristics.h, sm90_bwd_rotated_dq_walk), in lockstep beyond: self-attention just below
    and just above that bound, GQA, lengths off the block sizes. Both correct and bitwise
    repeatable."""
    if not _hopper_backward_built(torch.float16, d):
        pytest.skip("this build has no fp16 Hopper backward for this head dim")
    half_sms = torch.cuda.get_device_properties(DEVICE).multi_processor_count // 2
    for key_blocks in (half_sms, half_sms + 1):
        seqlen = key_blocks * BLOCK_N[d] - 5
        grads, run_as = _check(torch.float16, d, seqlen, seqlen, 2, 1, deterministic=True, batch=1)
        _assert_repeats_bitwise(grads, run_as, calls=3, same_walk=False)


# Calls the Hopper backward does not cover: each runs the SM80 kernels and stays correct.
@pytest.mark.parametrize("case", ["softcap", "headdim32"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_sm90_backward_fallback(dtype, case, hopper):
    if not _hopper_backward_built(dtype):
        pytest.skip("this build has no Hopper backward for this dtype")
    d = 32 if case == "headdim32" else 128
    if kernel_headdim(d) not in [int(h) for h in flash_attn_gpu.build_info()["headdims"]]:
        pytest.skip(f"head dim {d} not compiled")
    _check(dtype, d, 200, 300, 4, 2, causal=True, softcap=20.0 if case == "softcap" else 0.0, expect_sm90=False)


def test_sm90_backward_deterministic_fallback(hopper):
    """deterministic=True outside the Hopper backward's scope (softcap) runs the SM80 deterministic
    kernels: correct and bitwise repeatable."""
    if not _hopper_backward_built(torch.float16):
        pytest.skip("this build has no fp16 Hopper backward")
    grads, run_as = _check(torch.float16, 128, 200, 300, 4, 2, causal=True, softcap=20.0, deterministic=True,
                           expect_sm90=False)
    for _ in range(4):
        for name, a, b in zip(("dq", "dk", "dv"), grads, run_as(True)):
            assert torch.equal(a, b), f"{name} differs between deterministic calls"


def test_sm90_backward_headdims_of_the_build():
    """A build for sm_90 has the Hopper backward at each of its kernel head dims but 32."""
    info = flash_attn_gpu.build_info()
    if "90" not in info["archs"]:
        pytest.skip("this build has no sm_90 code")
    assert [int(h) for h in info["sm90_backward_headdims"]] == [int(h) for h in info["headdims"] if int(h) != 32]


def test_sm90_backward_used_for_dropout(hopper):
    """Dropout runs the Hopper backward through the autograd API too (its results:
    test_dropout.py::test_dropout_backward_hopper_and_sm80)."""
    if not _hopper_backward_built(torch.float16):
        pytest.skip("this build has no fp16 Hopper backward")
    q, k, v = (randn(2, 200, 4, 128, dtype=torch.float16).requires_grad_(True) for _ in range(3))
    out = flash_attn.flash_attn_func(q, k, v, dropout_p=0.1, causal=True)
    names = kernel_names(lambda: out.backward(torch.ones_like(out)))
    if not names:
        pytest.skip("no kernel trace (compute-sanitizer)")
    assert any(SM90_KERNEL in n for n in names)


# (query lengths, key lengths): ragged with one-row sequences; empty ones on either side.
VARLEN_CASES = {"ragged": ([300, 1, 129, 77], [260, 5, 200, 1]), "empty": ([200, 0, 65], [0, 130, 256])}


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic_dq", "deterministic"])
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize("case", list(VARLEN_CASES))
@pytest.mark.parametrize("d", [256, 128, 96, 64])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_sm90_backward_varlen(dtype, d, case, causal, deterministic, hopper):
    """Packed (varlen) tensors run the Hopper backward: gradients against the reference, with NaN in
    every row of the packed tensors past the last sequence (unused capacity, which whole-block TMA
    loads bring in and the consumers zero); deterministic calls repeat bitwise."""
    if not _hopper_backward_built(dtype, d):
        pytest.skip("this build has no Hopper backward for this head dim and dtype")
    lens_q, lens_k = (torch.tensor(x) for x in VARLEN_CASES[case])
    batch, nheads, nheads_k = len(lens_q), 6, 2
    max_q, max_k = int(lens_q.max()), int(lens_k.max())
    qmask, kmask = lengths_to_mask(lens_q, max_q).to(DEVICE), lengths_to_mask(lens_k, max_k).to(DEVICE)
    q, dout = randn(batch, max_q, nheads, d, dtype=dtype), randn(batch, max_q, nheads, d, dtype=dtype)
    k, v = randn(batch, max_k, nheads_k, d, dtype=dtype), randn(batch, max_k, nheads_k, d, dtype=dtype)

    def packed_with_nan_capacity(x, mask, extra=70):
        packed = pack(x, mask)[0]
        return torch.cat([packed, torch.full((extra, *packed.shape[1:]), math.nan, dtype=x.dtype, device=x.device)])

    (_, cu_q, _, _), (_, cu_k, _, _) = pack(q, qmask), pack(k, kmask)
    q_p, dout_p = packed_with_nan_capacity(q, qmask), packed_with_nan_capacity(dout, qmask)
    k_p, v_p = packed_with_nan_capacity(k, kmask), packed_with_nan_capacity(v, kmask)
    scale = d ** -0.5
    res = flash_attn_gpu.varlen_fwd(q_p, k_p, v_p, None, cu_q, cu_k, None, None, None, None, max_q, max_k, 0.0,
                                    scale, False, causal, -1, -1, 0.0, False)
    out_p, lse = res[0], res[1]

    total_q, total_k = int(lens_q.sum()), int(lens_k.sum())

    def run_as(det):
        """dq / dk / dv of the sequences' rows (the capacity rows past them stay unwritten)."""
        dq, dk, dv = torch.full_like(q_p, math.nan), torch.full_like(k_p, math.nan), torch.full_like(v_p, math.nan)
        flash_attn_gpu.varlen_bwd(dout_p, q_p, k_p, v_p, out_p, lse, dq, dk, dv, cu_q, cu_k, None, max_q, max_k, 0.0,
                                  scale, False, causal, -1, -1, 0.0, det, None, None)
        return dq[:total_q], dk[:total_k], dv[:total_k]

    run = lambda: run_as(deterministic)  # noqa: E731
    assert _runs_sm90(run) is not False, "expected the Hopper backward"
    grads = run()
    if deterministic:
        _assert_repeats_bitwise(grads, run_as, same_walk=causal)
    kw = dict(query_padding_mask=qmask, key_padding_mask=kmask, causal=causal)
    ref = ref_grads(q, k, v, dout, True, **kw)
    pt = ref_grads(q, k, v, dout, False, **kw)
    for name, g, g_ref, g_pt, mask in zip(("dq", "dk", "dv"), grads, ref, pt, (qmask, kmask, kmask)):
        assert_grad_close(name, g, pack(g_ref, mask)[0], pack(g_pt, mask)[0])


def test_sm90_backward_switch(hopper):
    """set_sm90_backward(False) sends an in-scope call to the SM80 backward and returns the previous setting."""
    if not _hopper_backward_built(torch.float16):
        pytest.skip("this build has no fp16 Hopper backward")
    q, k, v, dout = (randn(1, 256, 4, 128, dtype=torch.float16) for _ in range(4))
    out, lse = _native_fwd(q, k, v, 128 ** -0.5, False, (-1, -1))
    run = lambda: _native_bwd(dout, q, k, v, out, lse, 128 ** -0.5, False, (-1, -1))  # noqa: E731
    assert flash_attn_gpu.set_sm90_backward(False) is True
    try:
        names = kernel_names(run)
        assert not any(SM90_KERNEL in n for n in names)
        assert any(SM80_KERNEL in n for n in names) or not names
    finally:
        assert flash_attn_gpu.set_sm90_backward(True) is False
    assert _runs_sm90(run) is not False
