"""Argument errors of flash_attn_with_kvcache (and paged KV), through the public API.

Argument checks (dtypes, page size, k without v, block_table dtype, rotary without k, cache_batch_idx
together with block_table) run before the device check, so they are exercised on CPU tensors
where the extension is importable, and on CUDA tensors where a GPU is present.

Bad index *values* (cache_seqlens past the cache's end, block_table entries out of range,
cache_batch_idx, cache_leftpad) are found by the kernels without a device-to-host copy: they clamp
the value (never touching memory out of bounds), drop appended rows that have no valid slot, and
report the argument; the error is raised by the next call on the device once the bad call's
kernels ran, or by flash_attn_2_cuda.check_index_errors() (which synchronises), or right at the bad
call with FLASH_ATTN_STRICT_INDEX_CHECKS=1.

Every message must name the offending argument; only the name is matched.
"""

import re

import pytest
import torch

try:
    import flash_attn_2_cuda as flash_attn_gpu
except ImportError:  # pragma: no cover - not built on this machine
    flash_attn_gpu = None

try:
    import flash_attn
except ImportError:  # pragma: no cover
    flash_attn = None

API_ERRORS = (RuntimeError, ValueError)
HAS_KVCACHE = flash_attn_gpu is not None and hasattr(flash_attn_gpu, "fwd_kvcache")
needs_api = pytest.mark.skipif(
    flash_attn is None or not HAS_KVCACHE,
    reason="flash_attn / flash_attn_2_cuda with fwd_kvcache not importable")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

B, SQ, H, HK, D = 2, 1, 4, 2, 64
S_CACHE = 48
PAGE, BLOCKS_PER_SEQ, NUM_BLOCKS = 16, 3, 8
F16 = torch.float16


def name_re(arg):
    """`arg` as a whole identifier (not part of e.g. k_cache or cache_seqlens_k)."""
    return rf"(?<![A-Za-z0-9_]){re.escape(arg)}(?![A-Za-z0-9_])"


def _t(*shape, dtype=F16, device="cpu"):
    return torch.randn(*shape, device=device).to(dtype)


def _i32(vals, device):
    return torch.tensor(vals, dtype=torch.int32, device=device)


def valid_kwargs(device, paged=False, s_new=0):
    """Valid arguments of flash_attn_with_kvcache: contiguous (B, S_CACHE) or paged cache."""
    kw = dict(q=_t(B, SQ, H, D, device=device))
    if paged:
        kw["k_cache"] = _t(NUM_BLOCKS, PAGE, HK, D, device=device)
        kw["v_cache"] = _t(NUM_BLOCKS, PAGE, HK, D, device=device)
        kw["block_table"] = _i32([[5, 0, 3], [1, 7, 2]], device)
    else:
        kw["k_cache"] = _t(B, S_CACHE, HK, D, device=device)
        kw["v_cache"] = _t(B, S_CACHE, HK, D, device=device)
    if s_new:
        kw["k"] = _t(B, s_new, HK, D, device=device)
        kw["v"] = _t(B, s_new, HK, D, device=device)
    kw["cache_seqlens"] = _i32([20, 3], device)
    return kw


def _rotary(device, rotary_dim=32, seqlen_ro=PAGE * BLOCKS_PER_SEQ + 8):
    return dict(rotary_cos=_t(seqlen_ro, rotary_dim // 2, device=device),
                rotary_sin=_t(seqlen_ro, rotary_dim // 2, device=device))


def _case_k_cache_dtype(dev):
    kw = valid_kwargs(dev)
    kw["k_cache"] = kw["k_cache"].to(torch.bfloat16)
    kw["v_cache"] = kw["v_cache"].to(torch.bfloat16)
    return kw


def _case_page_block_size(dev):
    kw = valid_kwargs(dev, paged=True)
    kw["k_cache"] = _t(NUM_BLOCKS * 2, 8, HK, D, device=dev)
    kw["v_cache"] = _t(NUM_BLOCKS * 2, 8, HK, D, device=dev)
    kw["block_table"] = _i32([[5, 0, 3, 4, 6, 8], [1, 7, 2, 9, 10, 11]], dev)
    return kw


def _case_k_without_v(dev):
    kw = valid_kwargs(dev, s_new=2)
    kw["v"] = None
    return kw


def _case_block_table_int64(dev):
    kw = valid_kwargs(dev, paged=True)
    kw["block_table"] = kw["block_table"].to(torch.int64)
    return kw


def _case_rotary_without_k(dev):
    kw = valid_kwargs(dev)
    kw.update(_rotary(dev))
    return kw


def _case_batch_idx_and_block_table(dev):
    kw = valid_kwargs(dev, paged=True)
    kw["cache_batch_idx"] = _i32([0, 1], dev)
    return kw


def _misaligned(t):
    """t's values in a view one element past a 16-byte boundary (rows no longer 16-byte aligned)."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    view = buf[1:].view(t.shape)
    view.copy_(t)
    return view


def _case_k_cache_misaligned(dev):
    kw = valid_kwargs(dev)
    kw["k_cache"] = _misaligned(kw["k_cache"])
    return kw


# (case id, builder(device) -> kwargs, regex the message must match)
ARG_CASES = [
    ("k_cache_misaligned", _case_k_cache_misaligned, r"k_cache"),
    ("k_cache_dtype", _case_k_cache_dtype, r"k_cache"),
    ("page_block_size_8", _case_page_block_size, r"page_block_size"),
    ("k_without_v", _case_k_without_v, name_re("v")),
    ("block_table_int64", _case_block_table_int64, r"block_table"),
    ("rotary_without_k", _case_rotary_without_k, rf"rotary_cos|{name_re('k')}"),
    ("cache_batch_idx_with_block_table", _case_batch_idx_and_block_table, r"cache_batch_idx|block_table"),
]

DEVICES = [
    pytest.param("cpu", marks=needs_api, id="cpu"),
    pytest.param("cuda", marks=[needs_api, needs_cuda], id="cuda"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("build,pattern", [c[1:] for c in ARG_CASES], ids=[c[0] for c in ARG_CASES])
def test_kvcache_bad_argument(build, pattern, device):
    kw = build(device)
    with pytest.raises(API_ERRORS, match=pattern):
        flash_attn.flash_attn_with_kvcache(**kw)


def _assert_device_error(excinfo):
    msg = str(excinfo.value)
    assert re.search(r"(?i)cuda|gpu|device", msg), msg


@needs_api
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
@pytest.mark.parametrize("s_new", [0, 2], ids=["read", "append"])
def test_kvcache_valid_on_cpu_raises_device_error(paged, s_new):
    """The baseline arguments of the cases above are valid: on CPU they get as far as the device
    check (so each case above fails on its own bad argument)."""
    kw = valid_kwargs("cpu", paged=paged, s_new=s_new)
    if s_new:
        kw.update(_rotary("cpu"))
    with pytest.raises(API_ERRORS) as excinfo:
        flash_attn.flash_attn_with_kvcache(**kw)
    _assert_device_error(excinfo)


# ---------------------------------------------------------------------------------------------
# Value checks (GPU): cache_seqlens past the end, block_table entries out of range
# ---------------------------------------------------------------------------------------------


def _value_case(name):
    dev = "cuda"
    if name == "cache_seqlens_past_end_read":
        kw = valid_kwargs(dev)
        kw["cache_seqlens"] = _i32([S_CACHE + 1, 3], dev)
    elif name == "cache_seqlens_negative_read":
        kw = valid_kwargs(dev)
        kw["cache_seqlens"] = _i32([3, -1], dev)  # reported, and read as length 0
    elif name == "cache_seqlens_int_past_end":
        kw = valid_kwargs(dev)
        kw["cache_seqlens"] = S_CACHE + 1
    elif name == "cache_seqlens_past_end_append":
        kw = valid_kwargs(dev, s_new=3)
        kw["cache_seqlens"] = _i32([3, S_CACHE - 2], dev)  # S_CACHE - 2 + 3 > S_CACHE
    elif name == "cache_seqlens_past_end_paged":
        kw = valid_kwargs(dev, paged=True, s_new=2)
        kw["cache_seqlens"] = _i32([PAGE * BLOCKS_PER_SEQ - 1, 3], dev)
    elif name == "block_table_too_large":
        kw = valid_kwargs(dev, paged=True)
        kw["block_table"] = _i32([[5, 0, 3], [NUM_BLOCKS, 7, 2]], dev)  # entry 0 of seq 1 is used
    elif name == "block_table_negative":
        kw = valid_kwargs(dev, paged=True, s_new=1)
        kw["cache_seqlens"] = _i32([20, 16], dev)  # seq 1 appends at row 16: its block 1 is used
        kw["block_table"] = _i32([[5, 0, 3], [1, -1, 2]], dev)
    elif name == "cache_batch_idx_out_of_range":
        kw = valid_kwargs(dev)
        kw["cache_batch_idx"] = _i32([1, B], dev)
    elif name == "cache_leftpad_past_cache_seqlens":
        kw = valid_kwargs(dev)
        kw["cache_leftpad"] = _i32([0, 4], dev)  # cache_seqlens[1] == 3
    else:  # pragma: no cover
        raise ValueError(name)
    return kw


VALUE_CASES = [
    ("cache_seqlens_past_end_read", r"cache_seqlens"),
    ("cache_seqlens_negative_read", r"cache_seqlens"),
    ("cache_seqlens_int_past_end", r"cache_seqlens"),
    ("cache_seqlens_past_end_append", r"cache_seqlens"),
    ("cache_seqlens_past_end_paged", r"cache_seqlens"),
    ("block_table_too_large", r"block_table"),
    ("block_table_negative", r"block_table"),
    # Not in the error list of the contract, but rejected by the implementation too.
    ("cache_batch_idx_out_of_range", r"cache_batch_idx"),
    ("cache_leftpad_past_cache_seqlens", r"cache_leftpad"),
]


def _raise_pending():
    """Synchronises and raises what the kernels reported (the documented check)."""
    flash_attn_gpu.check_index_errors()


@needs_api
@needs_cuda
@pytest.mark.parametrize("name,pattern", VALUE_CASES, ids=[c[0] for c in VALUE_CASES])
def test_kvcache_bad_value_reported_by_check(name, pattern, require_kernel):
    require_kernel(D, F16)
    _raise_pending()  # nothing left over from earlier tests
    kw = _value_case(name)
    out = flash_attn.flash_attn_with_kvcache(**kw)  # asynchronous: no copy, no sync, no error yet
    with pytest.raises(API_ERRORS, match=pattern):
        _raise_pending()
    _raise_pending()  # the report is cleared once raised
    assert out.shape == kw["q"].shape  # the CUDA context is still usable


@needs_api
@needs_cuda
@pytest.mark.parametrize("name,pattern", [c for c in VALUE_CASES if c[0] in ("cache_seqlens_past_end_read",
                                                                               "block_table_too_large")],
                         ids=["cache_seqlens", "block_table"])
def test_kvcache_bad_value_raised_by_next_call(name, pattern, require_kernel):
    require_kernel(D, F16)
    _raise_pending()
    flash_attn.flash_attn_with_kvcache(**_value_case(name))
    torch.cuda.synchronize()
    good = valid_kwargs("cuda", paged="block_table" in name)
    with pytest.raises(API_ERRORS, match=pattern):
        flash_attn.flash_attn_with_kvcache(**good)
    out = flash_attn.flash_attn_with_kvcache(**good)  # reported once
    torch.cuda.synchronize()
    assert not torch.isnan(out).any()


@needs_api
@needs_cuda
def test_kvcache_bad_rows_leave_other_sequences_untouched(require_kernel):
    """A new row whose page is out of range is dropped, not clamped into another page."""
    require_kernel(D, F16)
    _raise_pending()
    kw = _value_case("block_table_negative")
    k_cache0 = kw["k_cache"].clone()
    flash_attn.flash_attn_with_kvcache(**kw)
    with pytest.raises(API_ERRORS, match="block_table"):
        _raise_pending()
    # Sequence 0 appended its row 20 (entry 1 of [5, 0, 3]: page 0, row 4); nothing else changed.
    changed = (kw["k_cache"] != k_cache0).flatten(1).any(dim=1).nonzero().flatten().tolist()
    assert changed == [0], changed


@needs_api
@needs_cuda
def test_kvcache_strict_mode_raises_at_the_call(require_kernel, tmp_path):
    """FLASH_ATTN_STRICT_INDEX_CHECKS=1 (read once per process) synchronises after the call."""
    require_kernel(D, F16)
    import os
    import subprocess
    import sys

    script = tmp_path / "strict.py"
    script.write_text(
        "import torch, flash_attn\n"
        "q = torch.randn(1, 1, 4, 64, device='cuda', dtype=torch.float16)\n"
        "kc = torch.randn(1, 48, 2, 64, device='cuda', dtype=torch.float16)\n"
        "seqlens = torch.tensor([49], dtype=torch.int32, device='cuda')\n"
        "try:\n"
        "    flash_attn.flash_attn_with_kvcache(q, kc, kc.clone(), cache_seqlens=seqlens)\n"
        "except RuntimeError as e:\n"
        "    print('RAISED', 'cache_seqlens' in str(e))\n"
    )
    # The child imports what this process imports (its sys.path), wherever the suite runs from.
    env = dict(os.environ, FLASH_ATTN_STRICT_INDEX_CHECKS="1", PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    res = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert "RAISED True" in res.stdout, res.stdout + res.stderr


@needs_api
@needs_cuda
def test_kvcache_valid_baselines_run(require_kernel):
    """The value cases' baselines, with in-range values, run without error (the errors above
    come from the one bad value each)."""
    require_kernel(D, F16)
    for paged in (False, True):
        for s_new in (0, 1, 3):
            kw = valid_kwargs("cuda", paged=paged, s_new=s_new)
            kw["cache_seqlens"] = _i32([3, (PAGE * BLOCKS_PER_SEQ if paged else S_CACHE) - s_new], "cuda")
            out = flash_attn.flash_attn_with_kvcache(**kw)
            assert out.shape == kw["q"].shape and not torch.isnan(out).any()


@needs_api
@needs_cuda
@pytest.mark.parametrize("s_new", [0, 1], ids=["read", "append"])
def test_kvcache_block_table_padding_past_the_length_is_not_read(s_new, require_kernel):
    """Entries of a block table past a sequence's last page may hold any padding (-1 here): a
    sequence ending on a page boundary inside one of the decode kernel's 32-row sub-blocks neither
    reports them nor reads through them, and its output equals the same cache laid out contiguously."""
    require_kernel(D, F16)
    _raise_pending()
    kw = valid_kwargs("cuda", paged=True, s_new=s_new)
    kw["cache_seqlens"] = _i32([PAGE - s_new, 2 * PAGE - s_new], "cuda")  # each ends on a page boundary
    kw["block_table"] = _i32([[5, -1, -1], [1, 7, -1]], "cuda")
    contiguous = dict(kw, block_table=None)
    for name in ("k_cache", "v_cache"):
        pages = kw[name][kw["block_table"].clamp(min=0).long()]  # (B, BLOCKS_PER_SEQ, PAGE, HK, D)
        contiguous[name] = pages.flatten(1, 2).contiguous()
    out = flash_attn.flash_attn_with_kvcache(**kw)
    expected = flash_attn.flash_attn_with_kvcache(**contiguous)
    _raise_pending()  # nothing reported
    torch.testing.assert_close(out, expected, atol=2e-3, rtol=0)


@needs_api
@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_kvcache_head_dim_not_multiple_of_8_names_head_dim(device):
    """The caches are used in place (16-byte rows), so a head dim of 59 is refused with the fix."""
    q = _t(B, SQ, H, 59, device=device)
    k_cache = _t(B, S_CACHE, HK, 59, device=device)
    with pytest.raises(API_ERRORS, match=r"head_dim 59.*zero-padded to 64"):
        flash_attn.flash_attn_with_kvcache(q, k_cache, k_cache.clone(), cache_seqlens=_i32([3, 4], device))
