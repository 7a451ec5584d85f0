"""The Hopper forward (csrc/flash_attn/src/sm90/): on a compute capability 9.0 GPU the dense
forward (dense or varlen, softcap and ALiBi too) at kernel head dims 64, 96, 128, 192 and 256 runs
it, and so does a paged K/V cache whose page size is a multiple of 128 at head dims up to 128;
unsplit or, for queries longer than the split tile's 64 rows, split over the keys (explicit
num_splits, or the plan's heuristic at small grids) with the combine kernel after it. These
tests check that the dispatcher picks it exactly where it applies (the kernels' names in a
profiler trace), that it matches the fp32 reference, the SM80 kernel and (split) its unsplit
result, that calls outside its scope fall back to the SM80 kernel with correct results, and that
its output is bitwise identical run to run.

The rest of the suite exercises it too wherever a dense call lands in its scope;
FLASH_ATTN_TEST_SM90=0 (tests/conftest.py) runs the whole suite on the SM80 kernels instead.
"""

import re
from types import SimpleNamespace

import pytest
import torch

from helpers import (
    DEVICE, assert_empty_rows_zero, assert_lse_close, assert_out_close, ext_fwd, ext_varlen_fwd, flash_attn,
    flash_attn_gpu, kernel_names, lse_checkable, max_abs_diff, require_kernel, requires_gpu
)
from kvcache_reference import num_pages, paged_from_contiguous
from reference import attention_ref, kernel_headdim, lengths_to_mask, make_alibi_slopes, pack, pack_lse

pytestmark = requires_gpu

DTYPES = [torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp16", "bf16"]
SM90_KERNEL = "flash_fwd_sm90_kernel"
COMBINE_KERNEL = "flash_fwd_combine_kernel"


def _hopper_forward_built(dtype, d=128):
    """Whether this build has the Hopper forward serving head dim d (rounded up) in dtype."""
    info = flash_attn_gpu.build_info() if flash_attn_gpu is not None else {}
    dtype_name = "bf16" if dtype == torch.bfloat16 else "fp16"
    kernel_d = kernel_headdim(d)
    return kernel_d in [int(h) for h in info.get("sm90_forward_headdims", [])] and dtype_name in info.get("dtypes", [])


@pytest.fixture
def hopper(request):
    """Skips unless the current GPU is compute capability 9.0 and this build has the Hopper forward."""
    if DEVICE != "cuda" or torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("needs a compute capability 9.0 GPU")
    previous = flash_attn_gpu.set_sm90_forward(True)
    yield
    flash_attn_gpu.set_sm90_forward(previous)


def _runs_sm90(fn):
    """Whether fn launches the Hopper kernel; None without a kernel trace (under compute-sanitizer)."""
    names = kernel_names(fn)
    return any(SM90_KERNEL in name for name in names) if names else None


def _runs_sm90_split(fn):
    """Whether fn launches the Hopper kernel and the combine kernel after it; None without a trace."""
    names = kernel_names(fn)
    if not names:
        return None
    return any(SM90_KERNEL in name for name in names) and any(COMBINE_KERNEL in name for name in names)


def _qkv(batch, seqlen_q, seqlen_k, nheads, nheads_k, d, dtype):
    q = torch.randn(batch, seqlen_q, nheads, d, device=DEVICE, dtype=dtype)
    k = torch.randn(batch, seqlen_k, nheads_k, d, device=DEVICE, dtype=dtype)
    v = torch.randn(batch, seqlen_k, nheads_k, d, device=DEVICE, dtype=dtype)
    return q, k, v


# (seqlen_q, seqlen_k): tiles and key blocks of 128 with ragged ends, seqlen_q > seqlen_k (causal
# rows with no key), one key, and several tiles and blocks.
SHAPES = [(1, 1), (17, 1), (113, 203), (128, 128), (239, 1), (256, 512), (512, 256), (1023, 1024), (2048, 77)]
MASKS = {"none": dict(causal=False), "causal": dict(causal=True), "win": dict(causal=False, window_size=(100, 37)),
         "causal_win": dict(causal=True, window_size=(130, 0))}
HEADS = {"mha": (4, 4), "gqa": (8, 2), "mqa": (6, 1)}


@pytest.mark.parametrize("heads", list(HEADS))
@pytest.mark.parametrize("mask", list(MASKS))
@pytest.mark.parametrize("seqlen_q,seqlen_k", SHAPES)
# Each kernel head dim at its full width and one below it (columns past d read as zeros): 96 has the
# 64-byte swizzle, 192 and 256 80-key blocks, 256 stages O in Q's buffer.
@pytest.mark.parametrize("d", [256, 224, 192, 160, 128, 104, 96, 80, 64, 40])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_sm90_forward_matches_reference(dtype, d, seqlen_q, seqlen_k, mask, heads, hopper):
    if not _hopper_forward_built(dtype, d):
        pytest.skip("this build has no Hopper forward for this dtype")
    nheads, nheads_k = HEADS[heads]
    q, k, v = _qkv(2, seqlen_q, seqlen_k, nheads, nheads_k, d, dtype)
    kw = dict(MASKS[mask])
    # Windows at least seqlen_k wide are unbounded (upstream's normalisation); keep them inside.
    window = tuple(min(w, seqlen_k - 1) if w >= 0 else w for w in kw.pop("window_size", (-1, -1)))
    causal = kw["causal"]
    # num_splits=1: short queries would otherwise take the split kernel's plan. One query with
    # grouped heads and no window becomes a tile of the group's heads (the SM80 kernel).
    run = lambda: ext_fwd(q, k, v, causal=causal, window_size=window, num_splits=1)  # noqa: E731
    if seqlen_q > 1 or nheads == nheads_k:
        assert _runs_sm90(run) is not False
    out, lse = run()
    out_ref, lse_ref = attention_ref(q, k, v, causal=causal, window_size=window)
    out_pt, _ = attention_ref(q, k, v, causal=causal, window_size=window, upcast=False)
    assert_out_close(out, out_ref, out_pt)
    assert_empty_rows_zero(out, torch.isposinf(lse_ref).transpose(1, 2))
    assert_lse_close(lse, lse_ref)

    # The SM80 kernel on the same call agrees within the same rule.
    flash_attn_gpu.set_sm90_forward(False)
    try:
        out_sm80, _ = run()
    finally:
        flash_attn_gpu.set_sm90_forward(True)
    assert_out_close(out_sm80, out_ref, out_pt, name="out (SM80)")


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_sm90_forward_running_max_climbs(dtype, d, causal, hopper):
    """Keys that grow along the sequence, so most rows' maxima climb by far more than the running
    max's lag (8 in log2 units) from key block to key block, while every other row, its query
    scaled down, stays within it: the O correction runs, is skipped, and runs for some rows of a
    warp only (head dim 256, where the kernel keeps the lagging max; at 64 and 128 the same inputs
    run the plain update); the result stays within the reference's tolerance."""
    if not _hopper_forward_built(dtype, d):
        pytest.skip("this build has no Hopper forward for this head dim and dtype")
    seqlen_q, seqlen_k = 256, 1024
    q, k, v = _qkv(2, seqlen_q, seqlen_k, 4, 4, d, dtype)
    growth = 1.0 + torch.arange(seqlen_k, device=DEVICE, dtype=torch.float32) / 32
    k = (k.float() * growth[None, :, None, None]).to(dtype)
    q[:, ::2] *= 0.01
    run = lambda: ext_fwd(q, k, v, causal=causal, num_splits=1)  # noqa: E731
    assert _runs_sm90(run) is not False
    out, lse = run()
    out_ref, lse_ref = attention_ref(q, k, v, causal=causal)
    out_pt, _ = attention_ref(q, k, v, causal=causal, upcast=False)
    assert_out_close(out, out_ref, out_pt)
    assert_lse_close(lse, lse_ref)


# Softcap and ALiBi run the Hopper kernel's score-modifier instantiation. ALiBi slopes per head or
# per (batch, head); "alibi" is make_alibi_slopes' kind.
SCORE_MODS = {
    "softcap30": dict(softcap=30.0),
    "softcap3": dict(softcap=3.0),
    "alibi_h": dict(alibi="h"),
    "alibi_bh": dict(alibi="bh"),
    "softcap_alibi": dict(softcap=3.0, alibi="bh"),
}
# (seqlen_q, seqlen_k, heads): ragged tiles and blocks, causal rows with no key (seqlen_q >
# seqlen_k), several tiles and blocks, one key block; every head layout.
SCORE_MOD_SHAPES = [(113, 203, "mha"), (512, 256, "gqa"), (1023, 1024, "gqa"), (2048, 77, "mqa")]


def _score_mod_kwargs(mods, batch, nheads):
    kw = dict(SCORE_MODS[mods])
    return dict(softcap=kw.get("softcap", 0.0), alibi_slopes=make_alibi_slopes(kw.get("alibi"), batch, nheads, DEVICE))


@pytest.mark.parametrize("mods", list(SCORE_MODS))
@pytest.mark.parametrize("mask", list(MASKS))
@pytest.mark.parametrize("seqlen_q,seqlen_k,heads", SCORE_MOD_SHAPES)
# Every kernel head dim (80 keys per block at 192 and 256, the 64-byte swizzle at 96), and one
# below a kernel head dim (columns past d read as zeros).
@pytest.mark.parametrize("d", [256, 192, 128, 96, 80, 64])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_sm90_forward_score_mods(dtype, d, seqlen_q, seqlen_k, heads, mask, mods, hopper):
    """Softcap, ALiBi and both, with causal / window masks and grouped heads, on the Hopper
    kernel: against the reference, and against the SM80 kernel on the same call."""
    if not _hopper_forward_built(dtype, d):
        pytest.skip("this build has no Hopper forward for this head dim and dtype")
    nheads, nheads_k = HEADS[heads]
    batch = 2
    q, k, v = _qkv(batch, seqlen_q, seqlen_k, nheads, nheads_k, d, dtype)
    kw = dict(MASKS[mask])
    window = tuple(min(w, seqlen_k - 1) if w >= 0 else w for w in kw.pop("window_size", (-1, -1)))
    causal = kw["causal"]
    mod_kw = _score_mod_kwargs(mods, batch, nheads)
    run = lambda: ext_fwd(q, k, v, causal=causal, window_size=window, num_splits=1, **mod_kw)  # noqa: E731
    assert _runs_sm90(run) is not False
    out, lse = run()
    out_ref, lse_ref = attention_ref(q, k, v, causal=causal, window_size=window, **mod_kw)
    out_pt, lse_pt = attention_ref(q, k, v, causal=causal, window_size=window, upcast=False, **mod_kw)
    assert_out_close(out, out_ref, out_pt)
    assert_empty_rows_zero(out, torch.isposinf(lse_ref).transpose(1, 2))
    pt_factor = 2.0 if mod_kw["softcap"] > 0 else 0.0
    if lse_checkable(mod_kw["alibi_slopes"], causal, window, seqlen_k):
        assert_lse_close(lse, lse_ref, lse_pt, pt_factor=pt_factor)

    # The SM80 kernel on the same call: the same rule against the reference, and the same lse
    # (both add ALiBi as -slope * |i + sk - sq - j|, so it is comparable even where the reference's
    # is not).
    flash_attn_gpu.set_sm90_forward(False)
    try:
        assert _runs_sm90(run) is not True
        out_sm80, lse_sm80 = run()
    finally:
        flash_attn_gpu.set_sm90_forward(True)
    assert_out_close(out_sm80, out_ref, out_pt, name="out (SM80)")
    assert_lse_close(lse, lse_sm80)


# Packed sequences: lengths around the 128-row tiles, 1 and 0, a query tile past a short
# sequence's end, and keys of the next sequence right after each sequence in memory.
VARLEN_LENGTHS = {
    "ragged": ([300, 1, 129, 128, 77], [290, 5, 200, 128, 513]),
    "zero_keys": ([200, 150, 3], [0, 180, 140]),
    "zero_queries": ([0, 260, 129], [64, 300, 1]),
}


def _varlen_inputs(q_lens, k_lens, d, dtype, nheads=6, nheads_k=2):
    """Padded q, k, v of these sequence lengths, their masks, and the packed tensors with their
    cu_seqlens."""
    q_lens, k_lens = torch.as_tensor(q_lens), torch.as_tensor(k_lens)
    batch = len(q_lens)
    max_sq, max_sk = int(q_lens.max()), int(k_lens.max())
    q, k, v = _qkv(batch, max_sq, max_sk, nheads, nheads_k, d, dtype)
    qmask, kmask = lengths_to_mask(q_lens, max_sq).to(DEVICE), lengths_to_mask(k_lens, max_sk).to(DEVICE)
    (q_u, cu_q, _, _), (k_u, cu_k, _, _), (v_u, _, _, _) = pack(q, qmask), pack(k, kmask), pack(v, kmask)
    return SimpleNamespace(q=q, k=k, v=v, qmask=qmask, kmask=kmask, max_sq=max_sq, max_sk=max_sk, q_u=q_u, k_u=k_u,
                           v_u=v_u, cu_q=cu_q, cu_k=cu_k, batch=batch, nheads=nheads)


def _assert_varlen_matches_reference(out, lse, vi, causal, mod_kw):
    """A packed call's output and lse against the reference of the padded inputs (_varlen_inputs);
    rows of sequences without keys are zero."""
    out_ref, lse_ref = attention_ref(vi.q, vi.k, vi.v, vi.qmask, vi.kmask, causal=causal, **mod_kw)
    out_pt, lse_pt = attention_ref(vi.q, vi.k, vi.v, vi.qmask, vi.kmask, causal=causal, upcast=False, **mod_kw)
    lse_ref, lse_pt = pack_lse(lse_ref, vi.qmask), pack_lse(lse_pt, vi.qmask)
    assert_out_close(out, pack(out_ref, vi.qmask)[0], pack(out_pt, vi.qmask)[0])
    assert_empty_rows_zero(out, torch.isposinf(lse_ref).transpose(0, 1))
    if lse_checkable(mod_kw["alibi_slopes"], causal, (-1, -1), vi.max_sk):
        assert_lse_close(lse, lse_ref, lse_pt, pt_factor=2.0 if mod_kw["softcap"] > 0 else 0.0)


@pytest.mark.parametrize("mods", [None, "softcap_alibi"], ids=["plain", "softcap_alibi"])
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize("case", list(VARLEN_LENGTHS))
@pytest.mark.parametrize("d", [256, 192, 128, 96, 64])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_sm90_forward_varlen(dtype, d, case, causal, mods, hopper):
    """Packed (varlen) calls run the Hopper kernel and match the reference; ALiBi aligns each
    sequence's queries to its own keys (bottom-right)."""
    if not _hopper_forward_built(dtype, d):
        pytest.skip("this build has no Hopper forward for this head dim and dtype")
    vi = _varlen_inputs(*VARLEN_LENGTHS[case], d, dtype)
    mod_kw = _score_mod_kwargs(mods, vi.batch, vi.nheads) if mods else dict(softcap=0.0, alibi_slopes=None)
    run = lambda: ext_varlen_fwd(vi.q_u, vi.k_u, vi.v_u, vi.cu_q, vi.cu_k, vi.max_sq, vi.max_sk,  # noqa: E731
                                 causal=causal, **mod_kw)
    assert _runs_sm90(run) is not False
    out, lse = run()
    _assert_varlen_matches_reference(out, lse, vi, causal, mod_kw)


# Split-KV on the Hopper kernel: query lengths past the split tile's 64 rows, keys over several
# blocks (128 keys at head dims up to 128, 80 beyond) with a ragged end; more splits than some
# tiles have blocks (empty splits), and causal rows with no key at all (seqlen_q > seqlen_k).
SPLIT_SHAPES = [(65, 1000), (200, 1000), (513, 2048), (300, 250)]


def _check_split_against_unsplit(out, lse, run_unsplit, out_ref, out_pt, lse_ref):
    """The split result against the reference, and against the unsplit Hopper kernel: it differs
    from that by at most twice PyTorch's own rounding error (the rule against the reference), and
    its lse by at most 1e-3."""
    out_unsplit, lse_unsplit = run_unsplit()
    assert_out_close(out, out_ref, out_pt)
    assert max_abs_diff(out, out_unsplit) <= 2 * max_abs_diff(out_pt, out_ref) + 1e-5
    assert_lse_close(lse, lse_unsplit)
    assert_lse_close(lse, lse_ref)


@pytest.mark.parametrize("mods", [None, "softcap_alibi"], ids=["plain", "softcap_alibi"])
@pytest.mark.parametrize("num_splits", [2, 3, 7])
@pytest.mark.parametrize("mask", list(MASKS))
@pytest.mark.parametrize("seqlen_q,seqlen_k", SPLIT_SHAPES)
@pytest.mark.parametrize("d", [256, 192, 128, 96, 64])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_sm90_forward_splits(dtype, d, seqlen_q, seqlen_k, mask, num_splits, mods, hopper):
    """An explicit num_splits on longer queries runs the Hopper kernel's split instantiation and
    the combine kernel; the result matches the reference and the unsplit Hopper kernel."""
    if not _hopper_forward_built(dtype, d):
        pytest.skip("this build has no Hopper forward for this head dim and dtype")
    nheads, nheads_k = HEADS["gqa"]
    batch = 2
    q, k, v = _qkv(batch, seqlen_q, seqlen_k, nheads, nheads_k, d, dtype)
    kw = dict(MASKS[mask])
    window = tuple(min(w, seqlen_k - 1) if w >= 0 else w for w in kw.pop("window_size", (-1, -1)))
    causal = kw["causal"]
    mod_kw = _score_mod_kwargs(mods, batch, nheads) if mods else dict(softcap=0.0, alibi_slopes=None)
    run = lambda n: lambda: ext_fwd(q, k, v, causal=causal, window_size=window, num_splits=n, **mod_kw)  # noqa: E731
    assert _runs_sm90_split(run(num_splits)) is not False
    out, lse = run(num_splits)()
    out_ref, lse_ref = attention_ref(q, k, v, causal=causal, window_size=window, **mod_kw)
    out_pt, _ = attention_ref(q, k, v, causal=causal, window_size=window, upcast=False, **mod_kw)
    assert_empty_rows_zero(out, torch.isposinf(lse_ref).transpose(1, 2))
    if not lse_checkable(mod_kw["alibi_slopes"], causal, window, seqlen_k):
        lse_ref = torch.where(torch.isposinf(lse_ref), lse_ref, lse)  # compared with the unsplit lse only
    _check_split_against_unsplit(out, lse, run(1), out_ref, out_pt, lse_ref)


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize("case", list(VARLEN_LENGTHS))
@pytest.mark.parametrize("d", [256, 128, 64])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_sm90_forward_varlen_splits(dtype, d, case, causal, hopper):
    """Packed sequences split over the keys: partial rows per sequence, empty splits of short
    sequences, the combine kernel's varlen rows."""
    if not _hopper_forward_built(dtype, d):
        pytest.skip("this build has no Hopper forward for this head dim and dtype")
    vi = _varlen_inputs(*VARLEN_LENGTHS[case], d, dtype)
    q, k, v, qmask, kmask, max_sq, max_sk = vi.q, vi.k, vi.v, vi.qmask, vi.kmask, vi.max_sq, vi.max_sk
    q_u, k_u, v_u, cu_q, cu_k = vi.q_u, vi.k_u, vi.v_u, vi.cu_q, vi.cu_k
    run = lambda n: lambda: ext_varlen_fwd(q_u, k_u, v_u, cu_q, cu_k, max_sq, max_sk, causal=causal,  # noqa: E731
                                           num_splits=n)
    assert _runs_sm90_split(run(3)) is not False
    out, lse = run(3)()
    out_ref, lse_ref = attention_ref(q, k, v, qmask, kmask, causal=causal)
    out_pt, _ = attention_ref(q, k, v, qmask, kmask, causal=causal, upcast=False)
    lse_ref = pack_lse(lse_ref, qmask)
    assert_empty_rows_zero(out, torch.isposinf(lse_ref).transpose(0, 1))
    _check_split_against_unsplit(out, lse, run(1), pack(out_ref, qmask)[0], pack(out_pt, qmask)[0], lse_ref)


# Many tiles per persistent block (the grid is at most one block per SM): 40 packed sequences of
# 12 heads, with key-block counts that change from tile to tile, sequences without keys (their
# tiles are written without any GEMM) or without queries between them, causal pairs of tiles and
# splits (some with no key block). The two consumer warpgroups take turns to issue their GEMMs
# across all of these, tile after tile; a turn lost hangs the kernel, one doubled races.
@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("mods", [None, "softcap_alibi"], ids=["plain", "softcap_alibi"])
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize("d", [256, 192, 128, 96, 64])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_sm90_forward_many_tiles_per_block(dtype, d, causal, mods, num_splits, hopper):
    """Packed sequences of mixed lengths, several tiles for every block: matches the reference."""
    if not _hopper_forward_built(dtype, d):
        pytest.skip("this build has no Hopper forward for this head dim and dtype")
    generator = torch.Generator().manual_seed(d + 2 * causal + num_splits)
    q_lens = torch.randint(1, 700, (40,), generator=generator)
    k_lens = torch.randint(1, 1100, (40,), generator=generator)
    q_lens[::9] = 0
    k_lens[4::7] = 0
    vi = _varlen_inputs(q_lens, k_lens, d, dtype, nheads=12, nheads_k=4)
    mod_kw = _score_mod_kwargs(mods, vi.batch, vi.nheads) if mods else dict(softcap=0.0, alibi_slopes=None)
    run = lambda: ext_varlen_fwd(vi.q_u, vi.k_u, vi.v_u, vi.cu_q, vi.cu_k, vi.max_sq, vi.max_sk,  # noqa: E731
                                 causal=causal, num_splits=num_splits, **mod_kw)
    assert (_runs_sm90_split if num_splits > 1 else _runs_sm90)(run) is not False
    out, lse = run()
    _assert_varlen_matches_reference(out, lse, vi, causal, mod_kw)


# (batch, heads, kv heads, seqlen_q, seqlen_k): a few query tiles against many key blocks, which
# the plan splits on the Hopper kernel (flash_attn_2_cuda.num_splits_heuristic(..., sm90_prefill=True)).
HEURISTIC_SPLIT_SHAPES = [(1, 2, 2, 256, 16384), (1, 8, 2, 65, 32768), (2, 4, 4, 300, 9000)]


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize("batch,nheads,nheads_k,seqlen_q,seqlen_k", HEURISTIC_SPLIT_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_sm90_forward_heuristic_splits(dtype, batch, nheads, nheads_k, seqlen_q, seqlen_k, causal, hopper):
    """Long keys at small batch: the default num_splits=0 splits on the Hopper kernel (the plan's
    count with sm90_prefill), with set_sm90_forward(False) the SM80 kernel runs unsplit."""
    d = 128
    if not _hopper_forward_built(dtype, d):
        pytest.skip("this build has no Hopper forward for this dtype")
    sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    splits = flash_attn_gpu.num_splits_heuristic(batch, nheads, nheads_k, seqlen_q, seqlen_k, d, sms, 0, True)
    assert splits > 1
    assert flash_attn_gpu.num_splits_heuristic(batch, nheads, nheads_k, seqlen_q, seqlen_k, d, sms, 0) == 1
    q, k, v = _qkv(batch, seqlen_q, seqlen_k, nheads, nheads_k, d, dtype)
    run = lambda n: lambda: ext_fwd(q, k, v, causal=causal, num_splits=n)  # noqa: E731
    assert _runs_sm90_split(run(0)) is not False
    out, lse = run(0)()
    out_ref, lse_ref = attention_ref(q, k, v, causal=causal)
    out_pt, _ = attention_ref(q, k, v, causal=causal, upcast=False)
    _check_split_against_unsplit(out, lse, run(1), out_ref, out_pt, lse_ref)

    flash_attn_gpu.set_sm90_forward(False)
    try:
        names = kernel_names(run(0))
        out_sm80, _ = run(0)()
    finally:
        flash_attn_gpu.set_sm90_forward(True)
    assert not any(SM90_KERNEL in n or COMBINE_KERNEL in n for n in names)
    assert_out_close(out_sm80, out_ref, out_pt, name="out (SM80)")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_sm90_forward_short_query_splits_stay_on_sm80(dtype, hopper):
    """Splits of up to 64 query rows (the split and decode kernels' regime) run the SM80 kernels."""
    if not _hopper_forward_built(dtype):
        pytest.skip("this build has no Hopper forward for this dtype")
    q, k, v = _qkv(2, 40, 4000, 8, 2, 128, dtype)
    run = lambda: ext_fwd(q, k, v, causal=True, num_splits=3)  # noqa: E731
    assert _runs_sm90(run) is not True
    out, _ = run()
    out_ref, _ = attention_ref(q, k, v, causal=True)
    out_pt, _ = attention_ref(q, k, v, causal=True, upcast=False)
    assert_out_close(out, out_ref, out_pt)


@pytest.mark.parametrize("d", [64, 96, 128, 192, 256])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_sm90_forward_bitwise_repeatable(dtype, d, hopper):
    if not _hopper_forward_built(dtype, d):
        pytest.skip("this build has no Hopper forward for this head dim and dtype")
    q, k, v = _qkv(2, 1000, 3000, 16, 4, d, dtype)
    first = flash_attn.flash_attn_func(q, k, v, causal=True)
    for _ in range(5):
        assert torch.equal(flash_attn.flash_attn_func(q, k, v, causal=True), first)


def _sm90_tiles(fn):
    """The (key block, query rows) of the Hopper forward kernels fn launches, from the traits in
    their names (Sm90FwdTraits<head dim, bf16, key block, query rows>); None without a kernel
    trace."""
    names = kernel_names(fn)
    if not names:
        return None
    return {(int(m.group(1)), int(m.group(2))) for name in names if SM90_KERNEL in name
            for m in [re.search(r"Sm90FwdTraits<\d+, \w+, (\d+), (\d+)>", name)] if m}


def _sm90_key_blocks(fn):
    """The key-block sizes of the Hopper forward kernels fn launches; None without a kernel trace."""
    tiles = _sm90_tiles(fn)
    return None if tiles is None else {block_n for block_n, _ in tiles}


def _sm90_query_rows(fn):
    """The query rows per tile of the Hopper forward kernels fn launches; None without a trace."""
    tiles = _sm90_tiles(fn)
    return None if tiles is None else {rows for _, rows in tiles}


# Head dims 192 and 256 take 64-key blocks up to 512 keys (sm90_fwd_short_keys) and 80 past it;
# key lengths on both sides of the bound, and not multiples of either block.
@pytest.mark.parametrize("seqlen_k,block_n", [(500, 64), (512, 64), (513, 80), (1000, 80)])
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize("d", [256, 192, 160])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_sm90_forward_key_block_sizes(dtype, d, causal, seqlen_k, block_n, hopper):
    if not _hopper_forward_built(dtype, d):
        pytest.skip("this build has no Hopper forward for this head dim and dtype")
    q, k, v = _qkv(2, 300, seqlen_k, 8, 2, d, dtype)
    run = lambda: ext_fwd(q, k, v, causal=causal, num_splits=1)  # noqa: E731
    assert _sm90_key_blocks(run) in (None, {block_n})
    out, lse = run()
    out_ref, lse_ref = attention_ref(q, k, v, causal=causal)
    out_pt, _ = attention_ref(q, k, v, causal=causal, upcast=False)
    assert_out_close(out, out_ref, out_pt)
    assert_lse_close(lse, lse_ref)
    # Score modifiers keep the 80-key kernel at every length.
    run_softcap = lambda: ext_fwd(q, k, v, causal=causal, softcap=20.0, num_splits=1)  # noqa: E731
    assert _sm90_key_blocks(run_softcap) in (None, {80})


# Head dim 64 without a mask takes 192-row tiles when the call has at least a wave of them
# (sm90_fwd_wide_rows); masks, score modifiers, splits and calls of fewer tiles keep 128 rows.
# Query lengths that are not multiples of 192 or 128, keys not multiples of 128; 16 heads of 4
# batch entries make 4 x 16 x 6 = 384 tiles of 192 rows at 1,100 queries, 64 at 150.
@pytest.mark.parametrize("seqlen_q,seqlen_k", [(1100, 1000), (150, 3000)])
@pytest.mark.parametrize("heads", ["mha", "gqa"])
@pytest.mark.parametrize("d", [64, 40])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_sm90_forward_wide_rows(dtype, d, heads, seqlen_q, seqlen_k, hopper):
    if not _hopper_forward_built(dtype, d):
        pytest.skip("this build has no Hopper forward for this head dim and dtype")
    nheads, nheads_k = (16, 16) if heads == "mha" else (16, 4)
    q, k, v = _qkv(4, seqlen_q, seqlen_k, nheads, nheads_k, d, dtype)
    wide = 4 * nheads * -(-seqlen_q // 192) >= torch.cuda.get_device_properties(0).multi_processor_count
    for kw, rows in ((dict(), 192 if wide else 128), (dict(causal=True), 128), (dict(window_size=(300, 300)), 128),
                     (dict(softcap=20.0), 128)):
        window = kw.pop("window_size", (-1, -1))
        run = lambda: ext_fwd(q, k, v, window_size=window, num_splits=1, **kw)  # noqa: E731
        assert _sm90_query_rows(run) in (None, {rows})
        out, lse = run()
        causal = kw.get("causal", False)
        mod_kw = dict(softcap=kw["softcap"]) if "softcap" in kw else {}
        out_ref, lse_ref = attention_ref(q, k, v, causal=causal, window_size=window, **mod_kw)
        out_pt, _ = attention_ref(q, k, v, causal=causal, window_size=window, upcast=False, **mod_kw)
        assert_out_close(out, out_ref, out_pt)
        if not mod_kw:
            assert_lse_close(lse, lse_ref)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_sm90_forward_wide_rows_varlen(dtype, hopper):
    """Packed sequences of ragged lengths (one of a single query, one without keys) on 192-row tiles."""
    if not _hopper_forward_built(dtype, 64):
        pytest.skip("this build has no Hopper forward for this head dim and dtype")
    vi = _varlen_inputs([700, 1, 193, 384, 77], [650, 9, 0, 384, 1000], 64, dtype, nheads=32, nheads_k=8)
    run = lambda: ext_varlen_fwd(vi.q_u, vi.k_u, vi.v_u, vi.cu_q, vi.cu_k, vi.max_sq, vi.max_sk,  # noqa: E731
                                 num_splits=1)
    assert _sm90_query_rows(run) in (None, {192})
    out, lse = run()
    _assert_varlen_matches_reference(out, lse, vi, False, dict(softcap=0.0, alibi_slopes=None))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_sm90_forward_fallback_headdim32(dtype, hopper):
    """Head dim 32 stays on the SM80 kernel, and its result is right."""
    if not _hopper_forward_built(dtype):
        pytest.skip("this build has no Hopper forward for this dtype")
    if 32 not in [int(h) for h in flash_attn_gpu.build_info()["headdims"]]:
        pytest.skip("head dim 32 not compiled")
    q, k, v = _qkv(2, 200, 300, 4, 2, 32, dtype)
    run = lambda: ext_fwd(q, k, v, causal=True, nan_tail=False)  # noqa: E731
    assert _runs_sm90(run) is not True
    out, _ = run()
    out_ref, _ = attention_ref(q, k, v, causal=True)
    out_pt, _ = attention_ref(q, k, v, causal=True, upcast=False)
    assert_out_close(out, out_ref, out_pt)


def test_sm90_forward_dropout_kernel_choice(hopper):
    """Dropout runs the Hopper kernel's dropout variant, except with return_softmax (S_dmask comes
    from the SM80 kernel) or with softcap / ALiBi (its results: test_dropout.py)."""
    if not _hopper_forward_built(torch.float16):
        pytest.skip("this build has no fp16 Hopper forward")
    q, k, v = _qkv(2, 200, 300, 4, 2, 128, torch.float16)
    assert _runs_sm90(lambda: flash_attn.flash_attn_func(q, k, v, dropout_p=0.1, causal=True)) is not False
    for kw in (dict(return_attn_probs=True), dict(softcap=10.0)):
        assert _runs_sm90(lambda: flash_attn.flash_attn_func(q, k, v, dropout_p=0.1, causal=True, **kw)) is not True


# num_splits 3: the last split of a sequence holds its partial block.
@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
# Every kernel head dim: the zeroed V rows are per head dim (80-key blocks at 192 and 256, 64-key
# ones there over short keys, the 64-byte swizzle at 96), and at 256 O is staged in Q's buffer.
@pytest.mark.parametrize("d", [256, 192, 128, 96, 64])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
# Long keys: past kSm90ShortKeysMax (512), where 192 and 256 leave their 64-key blocks.
@pytest.mark.parametrize("key_scale", [1, 5], ids=["short_keys", "long_keys"])
def test_sm90_forward_nan_past_the_used_keys(key_scale, dtype, d, causal, num_splits, hopper):
    """Keys past seqused_k, and rows of a packed k / v past cu_seqlens_k[-1], hold NaN: the Hopper
    kernel loads whole key blocks, so it must keep those V rows out of the P V GEMM."""
    if not _hopper_forward_built(dtype, d):
        pytest.skip("this build has no Hopper forward for this head dim and dtype")
    q_lens = [200, 150, 300]
    k_lens, used = [key_scale * n for n in (300, 130, 260)], [key_scale * n for n in (250, 17, 260)]
    batch, nheads, nheads_k = 3, 4, 2
    q, k, v = _qkv(batch, max(q_lens), max(k_lens), nheads, nheads_k, d, dtype)
    qmask = lengths_to_mask(torch.tensor(q_lens), max(q_lens)).to(DEVICE)
    kmask = lengths_to_mask(torch.tensor(k_lens), max(k_lens)).to(DEVICE)
    (q_u, cu_q, _, _), (k_u, cu_k, _, _), (v_u, _, _, _) = pack(q, qmask), pack(k, kmask), pack(v, kmask)
    # NaN in every unused key and in 50 extra rows after the last sequence.
    k_u = torch.cat([k_u, torch.full_like(k_u[:50], float("nan"))])
    v_u = torch.cat([v_u, torch.full_like(v_u[:50], float("nan"))])
    starts = cu_k.tolist()
    for b in range(batch):
        k_u[starts[b] + used[b]: starts[b + 1]] = float("nan")
        v_u[starts[b] + used[b]: starts[b + 1]] = float("nan")
    used_t = torch.tensor(used, dtype=torch.int32, device=DEVICE)
    run = lambda: ext_varlen_fwd(q_u, k_u, v_u, cu_q, cu_k, max(q_lens), max(k_lens),  # noqa: E731
                                 seqused_k=used_t, causal=causal, num_splits=num_splits, nan_tail=False)
    assert (_runs_sm90(run) if num_splits == 1 else _runs_sm90_split(run)) is not False
    out, lse = run()
    usedmask = lengths_to_mask(torch.tensor(used), max(k_lens)).to(DEVICE)
    out_ref, lse_ref = attention_ref(q, k, v, qmask, usedmask, causal=causal)
    out_pt, _ = attention_ref(q, k, v, qmask, usedmask, causal=causal, upcast=False)
    assert_out_close(out, pack(out_ref, qmask)[0], pack(out_pt, qmask)[0])
    assert_lse_close(lse, pack_lse(lse_ref, qmask))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_misaligned_q_is_copied(dtype, hopper):
    """q viewed one element past a 16-byte boundary: the extension copies it (the kernels load
    16-byte vectors), so the Hopper kernel still runs, and the result is right."""
    if not _hopper_forward_built(dtype):
        pytest.skip("this build has no Hopper forward for this dtype")
    q, k, v = _qkv(2, 200, 300, 4, 2, 128, dtype)
    buf = torch.empty(q.numel() + 1, device=DEVICE, dtype=dtype)
    q_view = buf[1:].view(q.shape)
    q_view.copy_(q)
    run = lambda: ext_fwd(q_view, k, v, causal=True, nan_tail=False)  # noqa: E731
    assert _runs_sm90(run) is not False
    out, _ = run()
    out_ref, _ = attention_ref(q, k, v, causal=True)
    out_pt, _ = attention_ref(q, k, v, causal=True, upcast=False)
    assert_out_close(out, out_ref, out_pt)


def test_sm90_forward_switch(hopper):
    """set_sm90_forward(False) sends an in-scope call to the SM80 kernel and returns the previous setting."""
    if not _hopper_forward_built(torch.float16):
        pytest.skip("this build has no fp16 Hopper forward")
    q, k, v = _qkv(1, 256, 256, 4, 4, 128, torch.float16)
    assert flash_attn_gpu.set_sm90_forward(False) is True
    try:
        assert _runs_sm90(lambda: flash_attn.flash_attn_func(q, k, v)) is not True
    finally:
        assert flash_attn_gpu.set_sm90_forward(True) is False
    assert _runs_sm90(lambda: flash_attn.flash_attn_func(q, k, v)) is not False


# Paged K/V (a block table): the Hopper kernel reads it where each key block lies inside one page,
# page sizes that are multiples of its 128-key block at kernel head dims up to 128; other page
# sizes (16, 64) and head dims (192: 80-key blocks) stay on the SM80 kernels.
PAGED_SIZES = [128, 256, 512, 16, 64]
# Cache lengths of a chunked prefill: empty, one key, ragged, several pages; the 200 queries sit at
# the end of each (causal rows before the first key see none).
PAGED_CACHE_LENS = [0, 1, 300, 777]


def _paged_takes_hopper(dtype, d, page):
    return _hopper_forward_built(dtype, d) and kernel_headdim(d) <= 128 and page % 128 == 0


def _paged_cache(k_lens, page, nheads_k, d, dtype):
    """A contiguous cache (batch, capacity, nheads_k, d), NaN past each length, and the same as
    pages in a shuffled table over a pool with NaN spare pages; table entries past each sequence's
    last page are -1 (padding the kernels must neither read nor report)."""
    capacity = max(1, num_pages(max(k_lens), page)) * page
    kmask = lengths_to_mask(torch.tensor(k_lens), capacity).to(DEVICE)
    caches = [torch.randn(len(k_lens), capacity, nheads_k, d, device=DEVICE, dtype=dtype) for _ in range(2)]
    for full in caches:
        full[~kmask] = float("nan")
    k_paged, table = paged_from_contiguous(caches[0], page, fill=float("nan"))
    v_paged, _ = paged_from_contiguous(caches[1], page, block_table=table, num_blocks=k_paged.shape[0],
                                       fill=float("nan"))
    table = table.clone()
    for b, n in enumerate(k_lens):
        table[b, num_pages(n, page):] = -1
    return caches, (k_paged, v_paged), table, kmask


@pytest.mark.parametrize("num_splits", [0, 3])
@pytest.mark.parametrize("heads", ["mha", "gqa"])
@pytest.mark.parametrize("mask", list(MASKS))
@pytest.mark.parametrize("page", PAGED_SIZES)
@pytest.mark.parametrize("d", [128, 96, 64, 192])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_sm90_forward_paged_kvcache(dtype, d, page, mask, heads, num_splits, hopper):
    """flash_attn_with_kvcache over a shuffled paged cache: the Hopper kernel exactly where the
    dispatcher's rule says (page size a multiple of 128, head dim up to 128), bitwise equal to the
    same cache laid out contiguously there (same plan, same key blocks), within rounding of it
    elsewhere; both against the reference; -1 padding past each length is not reported."""
    require_kernel(d, dtype)
    nheads, nheads_k = HEADS[heads]
    seqlen_q = 200
    kw = dict(MASKS[mask])
    window = kw.pop("window_size", (-1, -1))
    (k_full, v_full), (k_paged, v_paged), table, kmask = _paged_cache(PAGED_CACHE_LENS, page, nheads_k, d, dtype)
    batch = len(PAGED_CACHE_LENS)
    q = torch.randn(batch, seqlen_q, nheads, d, device=DEVICE, dtype=dtype)
    lens = torch.tensor(PAGED_CACHE_LENS, dtype=torch.int32, device=DEVICE)
    call = dict(cache_seqlens=lens, causal=kw["causal"], window_size=window, num_splits=num_splits,
                return_softmax_lse=True)
    flash_attn_gpu.check_index_errors()  # nothing left over
    run_paged = lambda: flash_attn.flash_attn_with_kvcache(q, k_paged, v_paged, block_table=table, **call)  # noqa: E731
    takes_hopper = _paged_takes_hopper(dtype, d, page)
    assert _runs_sm90(run_paged) is not (not takes_hopper)
    out_p, lse_p = run_paged()
    out_c, lse_c = flash_attn.flash_attn_with_kvcache(q, k_full, v_full, **call)
    flash_attn_gpu.check_index_errors()  # the -1 padding past the lengths was not reported

    zeros = torch.zeros((), dtype=dtype, device=DEVICE)
    k_ref = torch.where(kmask[..., None, None], k_full, zeros)
    v_ref = torch.where(kmask[..., None, None], v_full, zeros)
    ref_kw = dict(causal=kw["causal"], window_size=window)
    out_ref, lse_ref = attention_ref(q, k_ref, v_ref, None, kmask, **ref_kw)
    out_pt, _ = attention_ref(q, k_ref, v_ref, None, kmask, upcast=False, **ref_kw)
    assert_out_close(out_p, out_ref, out_pt, name="out (paged)")
    assert_empty_rows_zero(out_p, torch.isposinf(lse_ref).transpose(1, 2))
    assert_lse_close(lse_p, lse_ref)
    if takes_hopper and _runs_sm90(lambda: flash_attn.flash_attn_with_kvcache(q, k_full, v_full, **call)):
        assert torch.equal(out_p, out_c) and torch.equal(lse_p, lse_c)
    else:
        assert_out_close(out_c, out_ref, out_pt, name="out (contiguous)")


# (q lengths, k lengths) of varlen calls with a block table: a sequence without keys, one with one
# key, one without queries, keys ending inside and on a page, several pages.
PAGED_VARLEN_LENGTHS = ([200, 65, 130, 0, 300, 77], [1000, 0, 1, 513, 256, 640])


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize("heads", ["mha", "gqa"])
@pytest.mark.parametrize("page", [128, 256, 64])
@pytest.mark.parametrize("d", [128, 64])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_sm90_forward_paged_varlen(dtype, d, page, heads, causal, num_splits, hopper):
    """flash_attn_varlen_func with a block table: the Hopper kernel for page sizes that are
    multiples of 128 (the SM80 kernel for 64), and the result equals the packed contiguous call's
    within rounding, both against the reference."""
    require_kernel(d, dtype)
    nheads, nheads_k = HEADS[heads]
    q_lens, k_lens = PAGED_VARLEN_LENGTHS
    batch, max_sq, max_sk = len(q_lens), max(q_lens), max(k_lens)
    (k_full, v_full), (k_paged, v_paged), table, kmask_full = _paged_cache(k_lens, page, nheads_k, d, dtype)
    q = torch.randn(batch, max_sq, nheads, d, device=DEVICE, dtype=dtype)
    qmask = lengths_to_mask(torch.tensor(q_lens), max_sq).to(DEVICE)
    kmask = kmask_full[:, :max_sk]
    zeros = torch.zeros((), dtype=dtype, device=DEVICE)
    k_ref = torch.where(kmask[..., None, None], k_full[:, :max_sk], zeros)
    v_ref = torch.where(kmask[..., None, None], v_full[:, :max_sk], zeros)
    (q_u, cu_q, _, _), (k_u, cu_k, _, _), (v_u, _, _, _) = pack(q, qmask), pack(k_ref, kmask), pack(v_ref, kmask)
    flash_attn_gpu.check_index_errors()
    args = (cu_q, cu_k, max_sq, max_sk)
    run_paged = lambda: flash_attn.flash_attn_varlen_func(  # noqa: E731
        q_u, k_paged, v_paged, *args, causal=causal, block_table=table, num_splits=num_splits, return_attn_probs=True)
    takes_hopper = _paged_takes_hopper(dtype, d, page)
    assert (_runs_sm90(run_paged) if num_splits == 1 else _runs_sm90_split(run_paged)) is not (not takes_hopper)
    out_p, lse_p, _ = run_paged()
    out_c, lse_c, _ = flash_attn.flash_attn_varlen_func(q_u, k_u, v_u, *args, causal=causal, num_splits=num_splits,
                                                        return_attn_probs=True)
    flash_attn_gpu.check_index_errors()
    out_ref, lse_ref = attention_ref(q, k_ref, v_ref, qmask, kmask, causal=causal)
    out_pt, _ = attention_ref(q, k_ref, v_ref, qmask, kmask, causal=causal, upcast=False)
    out_ref, out_pt, lse_ref = pack(out_ref, qmask)[0], pack(out_pt, qmask)[0], pack_lse(lse_ref, qmask)
    for name, o, lse in (("paged", out_p, lse_p), ("contiguous", out_c, lse_c)):
        assert_out_close(o, out_ref, out_pt, name=f"out ({name})")
        assert_empty_rows_zero(o, torch.isposinf(lse_ref).transpose(0, 1))
        assert_lse_close(lse, lse_ref)
    assert max_abs_diff(out_p, out_c) <= 2 * max_abs_diff(out_pt, out_ref) + 1e-5


@pytest.mark.parametrize("entry", [-1, "num_pages"], ids=["negative", "past_the_pool"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_sm90_forward_paged_bad_page_reported(dtype, entry, hopper):
    """A block-table entry in use outside [0, number of pages) is clamped by the Hopper kernel and
    reported by name (block_table), as the SM80 kernels do."""
    if not _paged_takes_hopper(dtype, 128, 128):
        pytest.skip("this build has no Hopper forward at head dim 128 for this dtype")
    (_, _), (k_paged, v_paged), table, _ = _paged_cache([300, 500], 128, 2, 128, dtype)
    table[1, 2] = k_paged.shape[0] if entry == "num_pages" else -1  # rows 256..383 of sequence 1: in use
    q = torch.randn(2, 200, 4, 128, device=DEVICE, dtype=dtype)
    lens = torch.tensor([300, 500], dtype=torch.int32, device=DEVICE)
    flash_attn_gpu.check_index_errors()
    run = lambda: flash_attn.flash_attn_with_kvcache(q, k_paged, v_paged, cache_seqlens=lens,  # noqa: E731
                                                     block_table=table, causal=True, num_splits=1)
    assert _runs_sm90(run) is not False
    with pytest.raises(RuntimeError, match="block_table"):
        flash_attn_gpu.check_index_errors()
    run()
    with pytest.raises(RuntimeError, match="block_table"):
        flash_attn_gpu.check_index_errors()
    flash_attn_gpu.check_index_errors()  # cleared once raised
