"""Argument validation (CPU only; runs in CI without a GPU, with the extension built).

The extension checks dtypes, shapes, head dim, divisibility, cu_seqlens, window, alibi, dropout,
num_splits and softcap BEFORE the device check, so each bad argument can be exercised with CPU
fp16 tensors. Every message must name the offending argument; only the name is matched, so the
exact wording may vary.
"""

import re

import pytest
import torch

flash_attn_gpu = pytest.importorskip("flash_attn_2_cuda")

B, SQ, SK, H, HK, D = 2, 5, 7, 4, 2, 64
F16 = torch.float16


def name_re(arg):
    """Regex matching `arg` as a word (not as part of e.g. seqlen_q / cu_seqlens_q)."""
    return rf"(?<![A-Za-z0-9_]){re.escape(arg)}(?![A-Za-z0-9])"


HEAD_DIM_RE = r"[Hh]ead[ _]?(dim|size)"


def _t(*shape, dtype=F16):
    return torch.randn(*shape).to(dtype)


def fwd_args(**over):
    """Valid positional arguments of flash_attn_gpu.fwd (CPU tensors), with overrides."""
    a = dict(
        q=_t(B, SQ, H, D), k=_t(B, SK, HK, D), v=_t(B, SK, HK, D), out=None, alibi_slopes=None,
        dropout_p=0.0, softmax_scale=D ** -0.5, causal=False, window_size_left=-1,
        window_size_right=-1, softcap=0.0, return_softmax=False, gen=None, num_splits=0,
    )
    a.update(over)
    return list(a.values())


LENS_Q, LENS_K = [3, 2], [7, 4]
TQ, TK = sum(LENS_Q), sum(LENS_K)


def _cu(lens, dtype=torch.int32):
    cu = [0]
    for n in lens:
        cu.append(cu[-1] + n)
    return torch.tensor(cu, dtype=dtype)


def varlen_args(**over):
    """Valid positional arguments of flash_attn_gpu.varlen_fwd (CPU tensors), with overrides."""
    a = dict(
        q=_t(TQ, H, D), k=_t(TK, HK, D), v=_t(TK, HK, D), out=None,
        cu_seqlens_q=_cu(LENS_Q), cu_seqlens_k=_cu(LENS_K), seqused_k=None, leftpad_k=None,
        block_table=None, alibi_slopes=None, max_seqlen_q=max(LENS_Q), max_seqlen_k=max(LENS_K),
        dropout_p=0.0, softmax_scale=D ** -0.5, zero_tensors=False, causal=False,
        window_size_left=-1, window_size_right=-1, softcap=0.0, return_softmax=False, gen=None, num_splits=0,
    )
    a.update(over)
    return list(a.values())


def _transposed(*shape):
    """Tensor of `shape` whose last dim is not contiguous."""
    return _t(*shape[:-2], shape[-1], shape[-2]).transpose(-1, -2)


# (case id, overrides, regex the message must match)
FWD_CASES = [
    ("q_fp32", dict(q=_t(B, SQ, H, D, dtype=torch.float32), k=_t(B, SK, HK, D, dtype=torch.float32),
                    v=_t(B, SK, HK, D, dtype=torch.float32)), name_re("q")),
    ("k_dtype", dict(k=_t(B, SK, HK, D, dtype=torch.bfloat16)), name_re("k")),
    ("v_dtype", dict(v=_t(B, SK, HK, D, dtype=torch.bfloat16)), name_re("v")),
    ("k_batch", dict(k=_t(B + 1, SK, HK, D), v=_t(B + 1, SK, HK, D)), name_re("k")),
    ("k_headdim", dict(k=_t(B, SK, HK, 32), v=_t(B, SK, HK, 32)), rf"{name_re('k')}|{HEAD_DIM_RE}"),
    ("v_seqlen", dict(v=_t(B, SK + 1, HK, D)), name_re("v")),
    ("v_heads", dict(v=_t(B, SK, HK * 2, D)), name_re("v")),
    ("headdim_264", dict(q=_t(B, SQ, H, 264), k=_t(B, SK, HK, 264), v=_t(B, SK, HK, 264)), HEAD_DIM_RE),
    ("headdim_60", dict(q=_t(B, SQ, H, 60), k=_t(B, SK, HK, 60), v=_t(B, SK, HK, 60)), HEAD_DIM_RE),
    ("num_heads_6_4", dict(q=_t(B, SQ, 6, D), k=_t(B, SK, 4, D), v=_t(B, SK, 4, D)), r"num_heads"),
    ("out_shape", dict(out=_t(B, SQ, H, D + 8)), name_re("out")),
    ("out_dtype", dict(out=_t(B, SQ, H, D, dtype=torch.bfloat16)), name_re("out")),
    ("window_left_m2", dict(window_size_left=-2), r"window_size_left"),
    ("window_right_m2", dict(window_size_right=-2), r"window_size_right"),
    ("alibi_fp16", dict(alibi_slopes=torch.rand(H).half()), r"alibi_slopes"),
    ("alibi_shape", dict(alibi_slopes=torch.rand(H + 1)), r"alibi_slopes"),
    ("alibi_shape_2d", dict(alibi_slopes=torch.rand(B + 1, H)), r"alibi_slopes"),
    ("dropout_one", dict(dropout_p=1.0), r"dropout_p"),
    ("dropout_negative", dict(dropout_p=-0.1), r"dropout_p"),
    ("return_softmax_without_dropout", dict(return_softmax=True), r"return_softmax"),
    ("num_splits_m1", dict(num_splits=-1), r"num_splits"),
    ("softcap_m1", dict(softcap=-1.0), r"softcap"),
]


@pytest.mark.parametrize("over,pattern", [c[1:] for c in FWD_CASES], ids=[c[0] for c in FWD_CASES])
def test_fwd_bad_argument(over, pattern):
    with pytest.raises(RuntimeError, match=pattern):
        flash_attn_gpu.fwd(*fwd_args(**over))


@pytest.mark.parametrize("name", ["q", "k", "v"])
def test_strided_last_dim_accepted(name):
    """A strided last dimension of q, k or v is copied by the extension (as upstream's Python
    maybe_contiguous does), not refused: with CPU tensors the call gets past every argument check
    to the device check. (tests/test_flash_attn.py checks the results on the GPU.)"""
    shapes = {"q": (B, SQ, H, D), "k": (B, SK, HK, D), "v": (B, SK, HK, D)}
    with pytest.raises(RuntimeError, match="q must be on a CUDA device"):
        flash_attn_gpu.fwd(*fwd_args(**{name: _transposed(*shapes[name])}))
    vshapes = {"q": (TQ, H, D), "k": (TK, HK, D), "v": (TK, HK, D)}
    with pytest.raises(RuntimeError, match="q must be on a CUDA device"):
        flash_attn_gpu.varlen_fwd(*varlen_args(**{name: _transposed(*vshapes[name])}))


def _misaligned(*shape):
    """A (shape) view one element past a 16-byte boundary: its rows are not 16-byte aligned."""
    return _t(int(torch.Size(shape).numel()) + 1)[1:].view(*shape)


def test_misaligned_out_refused():
    """out is written in place with 16-byte stores: a misaligned view raises, naming out."""
    with pytest.raises(RuntimeError, match=name_re("out")):
        flash_attn_gpu.fwd(*fwd_args(out=_misaligned(B, SQ, H, D)))


@pytest.mark.parametrize("name", ["q", "k", "v"])
def test_misaligned_input_copied(name):
    """A misaligned q, k or v is copied (read only), so the call reaches the device check."""
    shapes = {"q": (B, SQ, H, D), "k": (B, SK, HK, D), "v": (B, SK, HK, D)}
    with pytest.raises(RuntimeError, match="q must be on a CUDA device"):
        flash_attn_gpu.fwd(*fwd_args(**{name: _misaligned(*shapes[name])}))


VARLEN_CASES = [
    ("q_fp32", dict(q=_t(TQ, H, D, dtype=torch.float32), k=_t(TK, HK, D, dtype=torch.float32),
                    v=_t(TK, HK, D, dtype=torch.float32)), name_re("q")),
    ("k_dtype", dict(k=_t(TK, HK, D, dtype=torch.bfloat16)), name_re("k")),
    ("v_shape", dict(v=_t(TK + 1, HK, D)), name_re("v")),
    ("k_headdim", dict(k=_t(TK, HK, 32), v=_t(TK, HK, 32)), rf"{name_re('k')}|{HEAD_DIM_RE}"),
    ("headdim_264", dict(q=_t(TQ, H, 264), k=_t(TK, HK, 264), v=_t(TK, HK, 264)), HEAD_DIM_RE),
    ("headdim_60", dict(q=_t(TQ, H, 60), k=_t(TK, HK, 60), v=_t(TK, HK, 60)), HEAD_DIM_RE),
    ("num_heads_6_4", dict(q=_t(TQ, 6, D), k=_t(TK, 4, D), v=_t(TK, 4, D)), r"num_heads"),
    ("cu_seqlens_q_int64", dict(cu_seqlens_q=_cu(LENS_Q, torch.int64)), r"cu_seqlens_q"),
    ("cu_seqlens_k_int64", dict(cu_seqlens_k=_cu(LENS_K, torch.int64)), r"cu_seqlens_k"),
    # batch is usually taken from cu_seqlens_q, so a size mismatch may be reported on either one.
    ("cu_seqlens_q_size", dict(cu_seqlens_q=_cu(LENS_Q + [1])), r"cu_seqlens_[qk]"),
    ("cu_seqlens_k_size", dict(cu_seqlens_k=_cu(LENS_K + [1])), r"cu_seqlens_k"),
    ("cu_seqlens_q_not_contiguous", dict(cu_seqlens_q=torch.stack([_cu(LENS_Q)] * 2, 1)[:, 0]),
     r"cu_seqlens_q"),
    ("seqused_k_int64", dict(seqused_k=torch.tensor([3, 2], dtype=torch.int64)), r"seqused_k"),
    ("seqused_k_size", dict(seqused_k=torch.tensor([3, 2, 1], dtype=torch.int32)), r"seqused_k"),
    ("leftpad_k_int64", dict(leftpad_k=torch.tensor([0, 0], dtype=torch.int64)), r"leftpad_k"),
    ("out_shape", dict(out=_t(TQ + 1, H, D)), name_re("out")),
    ("window_left_m2", dict(window_size_left=-2), r"window_size_left"),
    ("alibi_fp16", dict(alibi_slopes=torch.rand(H).half()), r"alibi_slopes"),
    ("alibi_shape", dict(alibi_slopes=torch.rand(B, H + 1)), r"alibi_slopes"),
    ("dropout_one", dict(dropout_p=1.0), r"dropout_p"),
    ("dropout_negative", dict(dropout_p=-0.1), r"dropout_p"),
    ("return_softmax_without_dropout", dict(return_softmax=True), r"return_softmax"),
    ("num_splits_m1", dict(num_splits=-1), r"num_splits"),
    ("softcap_m1", dict(softcap=-1.0), r"softcap"),
]


@pytest.mark.parametrize("over,pattern", [c[1:] for c in VARLEN_CASES], ids=[c[0] for c in VARLEN_CASES])
def test_varlen_fwd_bad_argument(over, pattern):
    with pytest.raises(RuntimeError, match=pattern):
        flash_attn_gpu.varlen_fwd(*varlen_args(**over))


def _paged_args(block_table_dtype):
    # Paged KV: k/v are (num_blocks, page_block_size, nheads_k, d) with a (batch, blocks) table.
    bt = torch.tensor([[0, 1], [2, 3]], dtype=block_table_dtype)
    return varlen_args(k=_t(4, 256, HK, D), v=_t(4, 256, HK, D), block_table=bt)


def test_varlen_block_table_int64():
    with pytest.raises(RuntimeError, match=r"block_table"):
        flash_attn_gpu.varlen_fwd(*_paged_args(torch.int64))


def test_varlen_valid_paged_args_reach_the_device_check():
    # A valid int32 block table passes every argument check; on CPU tensors the device check fires.
    with pytest.raises(RuntimeError, match=r"(?i)cuda|device"):
        flash_attn_gpu.varlen_fwd(*_paged_args(torch.int32))


def test_varlen_paged_page_size_not_multiple_of_16():
    bt = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
    with pytest.raises(RuntimeError, match=r"page_block_size"):
        flash_attn_gpu.varlen_fwd(*varlen_args(k=_t(4, 24, HK, D), v=_t(4, 24, HK, D), block_table=bt))


def test_varlen_leftpad_refused():
    # Not exposed by flash_attn_varlen_func; the kv-cache API's cache_leftpad is the supported path.
    with pytest.raises(RuntimeError, match=r"leftpad_k .*not supported"):
        flash_attn_gpu.varlen_fwd(*varlen_args(leftpad_k=torch.zeros(2, dtype=torch.int32)))


def _assert_device_error(excinfo, arg="q"):
    msg = str(excinfo.value)
    assert re.search(r"(?i)cuda|gpu|device", msg), msg
    assert re.search(name_re(arg), msg), msg


def test_fwd_valid_shapes_on_cpu_raise_device_error():
    with pytest.raises(RuntimeError) as excinfo:
        flash_attn_gpu.fwd(*fwd_args())
    _assert_device_error(excinfo)


def test_varlen_fwd_valid_shapes_on_cpu_raise_device_error():
    with pytest.raises(RuntimeError) as excinfo:
        flash_attn_gpu.varlen_fwd(*varlen_args())
    _assert_device_error(excinfo)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fwd_valid_shapes_gqa_decode_on_cpu_raise_device_error(dtype):
    # Valid GQA decode shapes (the split-KV path) get as far as the device check too.
    with pytest.raises(RuntimeError) as excinfo:
        flash_attn_gpu.fwd(*fwd_args(q=_t(B, 1, 8, 128, dtype=dtype), k=_t(B, 50, 2, 128, dtype=dtype),
                                     v=_t(B, 50, 2, 128, dtype=dtype), alibi_slopes=torch.rand(B, 8),
                                     num_splits=3, softcap=5.0, window_size_left=10,
                                     window_size_right=0))
    _assert_device_error(excinfo)


# ---------------------------------------------------------------------------------------------
# Through the public Python API
# ---------------------------------------------------------------------------------------------

try:
    import flash_attn
except ImportError:  # pragma: no cover
    flash_attn = None

API_ERRORS = (RuntimeError, ValueError)
needs_api = pytest.mark.skipif(flash_attn is None, reason="flash_attn package not importable")


@needs_api
def test_api_fp32_q():
    q, k, v = (torch.randn(B, SQ, H, D), torch.randn(B, SK, H, D), torch.randn(B, SK, H, D))
    with pytest.raises(API_ERRORS, match=name_re("q")):
        flash_attn.flash_attn_func(q, k, v)


@needs_api
def test_api_dropout():
    # 0 <= dropout_p < 1 is supported (tests/test_dropout.py); 1 drops everything and is refused.
    with pytest.raises(API_ERRORS, match=r"dropout_p"):
        flash_attn.flash_attn_func(_t(B, SQ, H, D), _t(B, SK, HK, D), _t(B, SK, HK, D), dropout_p=1.0)


@needs_api
def test_api_num_heads_not_divisible():
    with pytest.raises(API_ERRORS, match=r"num_heads"):
        flash_attn.flash_attn_func(_t(B, SQ, 6, D), _t(B, SK, 4, D), _t(B, SK, 4, D))


@needs_api
def test_api_head_dim_too_large():
    with pytest.raises(API_ERRORS, match=HEAD_DIM_RE):
        flash_attn.flash_attn_func(_t(B, SQ, H, 264), _t(B, SK, HK, 264), _t(B, SK, HK, 264))


@needs_api
def test_api_negative_num_splits():
    with pytest.raises(API_ERRORS, match=r"num_splits"):
        flash_attn.flash_attn_func(_t(B, SQ, H, D), _t(B, SK, HK, D), _t(B, SK, HK, D), num_splits=-1)


@needs_api
def test_api_varlen_cu_seqlens_int64():
    with pytest.raises(API_ERRORS, match=r"cu_seqlens_q"):
        flash_attn.flash_attn_varlen_func(
            _t(TQ, H, D), _t(TK, HK, D), _t(TK, HK, D), _cu(LENS_Q, torch.int64), _cu(LENS_K),
            max(LENS_Q), max(LENS_K),
        )


@needs_api
def test_api_valid_shapes_on_cpu_raise_device_error():
    with pytest.raises(API_ERRORS) as excinfo:
        flash_attn.flash_attn_func(_t(B, SQ, H, D), _t(B, SK, HK, D), _t(B, SK, HK, D), causal=True)
    _assert_device_error(excinfo)
