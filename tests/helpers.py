"""Helpers shared by the GPU test modules: device selection, build_info-based skips, direct
extension calls with NaN-poisoned outputs, and the correctness rules.

FLASH_ATTN_TEST_DEVICE (default "cuda") exists only to exercise the test plumbing against a
CPU stand-in of the extension; the real suite always runs on CUDA.
"""

import functools
import os

import pytest
import torch

from reference import kernel_headdim

DEVICE = os.environ.get("FLASH_ATTN_TEST_DEVICE", "cuda")

try:  # the compiled extension
    import flash_attn_2_cuda as flash_attn_gpu
except ImportError:  # pragma: no cover - not built on this machine
    flash_attn_gpu = None

try:  # the Python layer
    import flash_attn
except ImportError:  # pragma: no cover
    flash_attn = None


def device_available():
    if DEVICE == "cuda":
        return torch.cuda.is_available()
    return True


# Module-level marks for GPU test modules.
requires_gpu = [
    pytest.mark.skipif(not device_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(flash_attn_gpu is None, reason="flash_attn_2_cuda extension not built"),
    pytest.mark.skipif(flash_attn is None, reason="flash_attn package not importable"),
]

DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16"}


@functools.lru_cache(maxsize=None)
def build_info():
    if flash_attn is not None and hasattr(flash_attn, "build_info"):
        info = flash_attn.build_info()
    else:
        info = flash_attn_gpu.build_info()
    return {
        "headdims": [int(x) for x in info.get("headdims", [])],
        "dtypes": [str(x) for x in info.get("dtypes", [])],
    }


def require_kernel(d, dtype):
    """Skip unless the kernel serving head dim d (rounded up to 32/64/96/128/192/256) and dtype
    was compiled into this build."""
    info = build_info()
    kd = kernel_headdim(d)
    if kd is None or kd not in info["headdims"]:
        pytest.skip(f"head dim {d} -> kernel {kd} not compiled (headdims={info['headdims']})")
    if DTYPE_NAMES[dtype] not in info["dtypes"]:
        pytest.skip(f"{DTYPE_NAMES[dtype]} not compiled (dtypes={info['dtypes']})")


# ---------------------------------------------------------------------------------------------
# Direct extension calls with a NaN-poisoned preallocated `out`
# ---------------------------------------------------------------------------------------------


def nan_like(x):
    return torch.full_like(x, float("nan"))


def with_nan_tail(x, extra=None):
    """A contiguous copy of x that is a leading slice of a larger buffer whose tail (along dim 0)
    is NaN: a kernel reading past the end of x sees NaN."""
    extra = extra if extra is not None else max(1, min(x.shape[0], 64))
    buf = torch.full((x.shape[0] + extra, *x.shape[1:]), float("nan"), dtype=x.dtype, device=x.device)
    buf[: x.shape[0]] = x
    return buf[: x.shape[0]]


def _poisoned_out(shape, dtype, device):
    """NaN-filled `out` that is a leading slice of a larger NaN buffer; returns (out, canary)."""
    extra = 1 if len(shape) == 4 else 64  # one more batch entry / 64 more varlen rows
    buf = torch.full((shape[0] + extra, *shape[1:]), float("nan"), dtype=dtype, device=device)
    return buf[: shape[0]], buf[shape[0]:]


def _check_poisoned(o, out, canary):
    # The kernel must write the result into the buffer it was given (the returned tensor holds the
    # same values; NaN left in `out` means unwritten), and nothing past the buffer's end.
    assert o.shape == out.shape, (o.shape, out.shape)
    assert o.data_ptr() == out.data_ptr() or torch.equal(o, out), (
        "preallocated out does not hold the returned result (unwritten NaN left in it?)"
    )
    assert torch.isnan(canary).all(), "kernel wrote past the end of the preallocated out"


def ext_fwd(q, k, v, *, alibi_slopes=None, softmax_scale=None, causal=False, window_size=(-1, -1),
            softcap=0.0, num_splits=0, nan_tail=True):
    """flash_attn_gpu.fwd with a NaN-poisoned preallocated out (checked not to be overrun) and,
    with nan_tail, q/k/v followed in memory by NaN. Returns (out, lse)."""
    if softmax_scale is None:
        softmax_scale = q.shape[-1] ** (-0.5)
    if nan_tail:
        q, k, v = with_nan_tail(q, 1), with_nan_tail(k, 1), with_nan_tail(v, 1)
    out, canary = _poisoned_out(q.shape, q.dtype, q.device)
    res = flash_attn_gpu.fwd(
        q, k, v, out, alibi_slopes, 0.0, float(softmax_scale), bool(causal),
        int(window_size[0]), int(window_size[1]), float(softcap), False, None, int(num_splits),
    )
    o, lse = res[0], res[1]
    _check_poisoned(o, out, canary)
    return out, lse


def ext_varlen_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *,
                   seqused_k=None, alibi_slopes=None, softmax_scale=None, causal=False,
                   window_size=(-1, -1), softcap=0.0, num_splits=0, nan_tail=True):
    """flash_attn_gpu.varlen_fwd with a NaN-poisoned preallocated out (checked not to be overrun)
    and, with nan_tail, q/k/v followed in memory by NaN rows. Returns (out, lse)."""
    if softmax_scale is None:
        softmax_scale = q.shape[-1] ** (-0.5)
    if nan_tail:
        q, k, v = with_nan_tail(q), with_nan_tail(k), with_nan_tail(v)
    out, canary = _poisoned_out(q.shape, q.dtype, q.device)
    res = flash_attn_gpu.varlen_fwd(
        q, k, v, out, cu_seqlens_q, cu_seqlens_k, seqused_k, None, None, alibi_slopes,
        int(max_seqlen_q), int(max_seqlen_k), 0.0, float(softmax_scale), False, bool(causal),
        int(window_size[0]), int(window_size[1]), float(softcap), False, None, int(num_splits),
    )
    o, lse = res[0], res[1]
    _check_poisoned(o, out, canary)
    return out, lse


# ---------------------------------------------------------------------------------------------
# Correctness rules
# ---------------------------------------------------------------------------------------------


def max_abs_diff(a, b):
    if a.numel() == 0:
        return 0.0
    return (a.float() - b.float()).abs().max().item()


def assert_no_nan(x, name="out"):
    n = torch.isnan(x).sum().item()
    assert n == 0, f"{name} has {n} NaN entries (of {x.numel()}) - unwritten or NaN-producing"


def assert_grad_close(name, g, g_ref, g_pt):
    """A gradient against the fp32 reference: max|g - ref| <= 2 max|g_pt - ref| + eps (g_pt: PyTorch's
    autograd in the input dtype; eps covers the reference's own rounding to that dtype)."""
    assert g.shape == g_ref.shape, (name, g.shape, g_ref.shape)
    assert_no_nan(g, name)
    err = max_abs_diff(g, g_ref)
    err_pt = max_abs_diff(g_pt, g_ref)
    eps = 1e-4 + 2 * max_abs_diff(g_ref.to(g.dtype), g_ref)
    assert err <= 2 * err_pt + eps, f"{name}: max|g - ref| = {err:.3e} > 2 * {err_pt:.3e} + {eps:.3e}"


def assert_out_close(out, out_ref, out_pt, name="out", factor=2.0, atol=1e-5):
    """max|out - ref| <= factor * max|out_pt - ref| + atol (out_pt: PyTorch in the input dtype)."""
    assert out.shape == out_ref.shape, (name, out.shape, out_ref.shape)
    assert_no_nan(out, name)
    err = max_abs_diff(out, out_ref)
    err_pt = max_abs_diff(out_pt, out_ref)
    assert err <= factor * err_pt + atol, (
        f"{name}: max|out - ref| = {err:.3e} > {factor} * max|out_pt - ref| ({err_pt:.3e}) + {atol}"
    )


def assert_lse_close(lse, lse_ref, lse_pt=None, atol=1e-3, pt_factor=0.0):
    """lse (fp32) vs fp32 reference: rows with an allowed key (finite ref) within
    atol + pt_factor * max|lse_pt - lse_ref|; rows without (ref = +inf) must be +inf."""
    assert lse.dtype == torch.float32, lse.dtype
    assert lse.shape == lse_ref.shape, (lse.shape, lse_ref.shape)
    lse = lse.float()
    finite = torch.isfinite(lse_ref)
    assert not torch.isnan(lse).any(), "softmax_lse has NaN entries"
    tol = atol
    if lse_pt is not None and pt_factor > 0 and finite.any():
        tol += pt_factor * (lse_pt[finite] - lse_ref[finite]).abs().max().item()
    if finite.any():
        err = (lse[finite] - lse_ref[finite]).abs().max().item()
        assert err <= tol, f"softmax_lse: max err {err:.3e} > {tol:.3e}"
    empty = ~finite
    if empty.any():
        bad = ~torch.isposinf(lse[empty])
        assert not bad.any(), (
            f"softmax_lse of rows with no allowed key must be +inf; got e.g. "
            f"{lse[empty][bad][:4].tolist()}"
        )


def lse_checkable(alibi_slopes, causal, window_size, seqlen_k):
    """Whether softmax_lse has one well-defined value to compare against.

    With alibi and a causal-type mask (right window 0 and no effective left window; a left window
    >= seqlen_k counts as none, as in upstream's argument normalisation), upstream FA2 adds the
    alibi bias as +slope * j (one vector for every row) instead of -slope * |i + sk - sq - j|:
    the softmax and out are identical, but lse is shifted by a per-row constant. The contract does
    not pin which of the two this library returns, so lse is not compared in that case.
    """
    if alibi_slopes is None:
        return True
    left, right = window_size
    if causal:
        right = 0
    if left >= seqlen_k:
        left = -1
    return not (right == 0 and left < 0)


def assert_empty_rows_zero(out, empty_rows):
    """out (..., d) must be exactly 0 where empty_rows (out.shape[:-1]) is True."""
    assert empty_rows.shape == out.shape[:-1], (empty_rows.shape, out.shape)
    if empty_rows.any():
        vals = out[empty_rows]
        assert not torch.isnan(vals).any(), "rows with no allowed key contain NaN"
        assert (vals == 0).all(), (
            f"rows with no allowed key must be 0, max |out| there = {vals.abs().max().item():.3e}"
        )


def capture_graph(fn):
    """One fn() call captured in a CUDA graph, after warm-up calls on a side stream as torch's
    docs ask. Returns (graph, static output)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = fn()
    torch.cuda.synchronize()
    return graph, static_out


def randn(*shape, dtype):
    return torch.randn(*shape, device=DEVICE, dtype=dtype)


def kernel_names(fn):
    """Names of the CUDA kernels fn launches, from a profiler trace; [] where no trace is recorded
    (under compute-sanitizer), which callers read as "unknown"."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
