"""Python interface of the flash_attn_2_cuda extension.

Public functions keep upstream flash-attn 2.x's signatures, defaults and return values.
Differences from upstream:
  * forward only: calling backward raises NotImplementedError; dropout_p > 0 raises RuntimeError;
  * flash_attn_func and flash_attn_varlen_func take one extra trailing keyword, num_splits
    (0 = heuristic, 1 = never split the KV sequence, n > 1 = n splits), like flash_attn_with_kvcache;
  * with return_attn_probs=True the third returned value (S_dmask) is None: without dropout the
    kernels never materialise the attention probabilities.
"""

from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F

__all__ = [
    "flash_attn_func",
    "flash_attn_kvpacked_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_varlen_kvpacked_func",
    "flash_attn_varlen_qkvpacked_func",
    "flash_attn_with_kvcache",
    "num_splits_heuristic",
    "build_info",
]

# --------------------------------------------------------------------------------------------
# The compiled extension, imported on first use so that `import flash_attn` (signatures,
# bert_padding, benchmark utils) works on machines where it has not been built.
# --------------------------------------------------------------------------------------------

_ext_module = None


def _ext():
    global _ext_module
    if _ext_module is None:
        try:
            import flash_attn_2_cuda
        except ImportError as e:
            raise ImportError(
                "flash_attn_2_cuda extension is not built: pip install . (or "
                "`python setup.py build_ext --inplace`) from the flash_attn repository root, "
                f"on a machine with CUDA and the CUDA toolkit. Original error: {e}"
            ) from e
        _ext_module = flash_attn_2_cuda
    return _ext_module


def build_info() -> dict:
    """What the extension was compiled with: {"headdims": [...], "dtypes": [...], "archs": [...]}."""
    return dict(_ext().build_info())


def num_splits_heuristic(
    batch, nheads, nheads_k, seqlen_q, seqlen_k, headdim, num_sms=None, num_splits=0
) -> int:
    """Number of KV splits the dispatcher would use for these shapes (no dropout, window or alibi).

    num_splits is the requested value (0 = heuristic); paged and contiguous K/V plan alike. num_sms
    defaults to the current CUDA device's multiprocessor count, or 132 (H100 SXM) when CUDA is
    unavailable.
    """
    if num_sms is None:
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(torch.cuda.current_device())
            num_sms = props.multi_processor_count
        else:
            num_sms = 132
    return int(
        _ext().num_splits_heuristic(
            int(batch), int(nheads), int(nheads_k), int(seqlen_q), int(seqlen_k), int(headdim),
            int(num_sms), int(num_splits),
        )
    )


# --------------------------------------------------------------------------------------------
# Argument plumbing shared by all entry points
# --------------------------------------------------------------------------------------------

def _pad_to_multiple_of_8(x, head_size):
    return x if head_size % 8 == 0 else F.pad(x, [0, 8 - head_size % 8])


def _check_no_dropout(dropout_p):
    if dropout_p > 0:
        raise RuntimeError(
            "dropout_p > 0 is not supported by this flash_attn build (forward-only, no dropout)"
        )


def _prepare_qkv(q, k, v, softmax_scale):
    """Default softmax_scale (from the original head dim) and head-dim padding. Written for the
    decode hot path: one attribute read when the head dim is a multiple of 8. A strided last
    dimension is made contiguous by the extension (flash_api.cpp, contiguous_last_dim), as
    upstream's maybe_contiguous does here."""
    head_size = q.shape[-1]
    if softmax_scale is None:
        softmax_scale = head_size ** (-0.5)
    if head_size % 8 != 0:
        q, k, v = [_pad_to_multiple_of_8(x, head_size) for x in (q, k, v)]
    return q, k, v, float(softmax_scale), head_size


def _unpad(out, head_size):
    # A slice is a tensor op (about a microsecond): only when the head dim was padded.
    return out if head_size % 8 == 0 else out[..., :head_size]


# --------------------------------------------------------------------------------------------
# Extension calls, registered as torch.library custom ops (opaque to torch.compile, with fake
# implementations for shape propagation) when this torch supports it.
# --------------------------------------------------------------------------------------------

def _fwd_impl(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    alibi_slopes: Optional[torch.Tensor],
    dropout_p: float,
    softmax_scale: float,
    causal: bool,
    window_size_left: int,
    window_size_right: int,
    softcap: float,
    num_splits: int,
) -> Tuple[torch.Tensor, torch.Tensor]:
    out, lse = (_ext_module or _ext()).fwd(
        q, k, v, None, alibi_slopes, dropout_p, softmax_scale, causal,
        window_size_left, window_size_right, softcap, False, num_splits,
    )
    return out, lse


def _fwd_fake(q, k, v, alibi_slopes, dropout_p, softmax_scale, causal,
              window_size_left, window_size_right, softcap, num_splits):
    batch, seqlen_q, nheads, _ = q.shape
    lse = torch.empty((batch, nheads, seqlen_q), dtype=torch.float32, device=q.device)
    return torch.empty_like(q), lse


def _varlen_fwd_impl(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    block_table: Optional[torch.Tensor],
    alibi_slopes: Optional[torch.Tensor],
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float,
    softmax_scale: float,
    causal: bool,
    window_size_left: int,
    window_size_right: int,
    softcap: float,
    num_splits: int,
) -> Tuple[torch.Tensor, torch.Tensor]:
    out, lse = (_ext_module or _ext()).varlen_fwd(
        q, k, v, None, cu_seqlens_q, cu_seqlens_k, None, None, block_table, alibi_slopes,
        max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, False, causal,
        window_size_left, window_size_right, softcap, False, num_splits,
    )
    return out, lse


def _varlen_fwd_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, block_table, alibi_slopes,
                     max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal,
                     window_size_left, window_size_right, softcap, num_splits):
    total_q, nheads, _ = q.shape
    lse = torch.empty((nheads, total_q), dtype=torch.float32, device=q.device)
    return torch.empty_like(q), lse


if hasattr(torch.library, "custom_op") and hasattr(torch.compiler, "is_compiling"):
    _fwd_op = torch.library.custom_op("flash_attn_fwd_only::fwd", _fwd_impl, mutates_args=())
    _fwd_op.register_fake(_fwd_fake)
    _varlen_fwd_op = torch.library.custom_op(
        "flash_attn_fwd_only::varlen_fwd", _varlen_fwd_impl, mutates_args=()
    )
    _varlen_fwd_op.register_fake(_varlen_fwd_fake)

    # The custom op costs ~10 us of dispatch per call, which matters for decoding; eager calls
    # go straight to the extension and only torch.compile traces see the op.
    _is_compiling = torch.compiler.is_compiling

else:  # older torch: call the extension directly
    _fwd_op, _varlen_fwd_op = _fwd_impl, _varlen_fwd_impl

    def _is_compiling():
        return False


# --------------------------------------------------------------------------------------------
# Forward passes, and the autograd.Functions wrapping them (backward is not implemented)
# --------------------------------------------------------------------------------------------

def _flash_attn_forward(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap,
                        alibi_slopes, num_splits):
    _check_no_dropout(dropout_p)
    q, k, v, softmax_scale, head_size = _prepare_qkv(q, k, v, softmax_scale)
    args = (q, k, v, alibi_slopes, float(dropout_p), softmax_scale, bool(causal),
            int(window_size[0]), int(window_size[1]), float(softcap), int(num_splits))
    out, lse = _fwd_op(*args) if _is_compiling() else _fwd_impl(*args)
    return _unpad(out, head_size), lse


def _flash_attn_varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                               dropout_p, softmax_scale, causal, window_size, softcap,
                               alibi_slopes, block_table, num_splits):
    # The decode hot path: kept flat (each Python call level costs host time per step).
    if dropout_p:
        _check_no_dropout(dropout_p)
    q, k, v, softmax_scale, head_size = _prepare_qkv(q, k, v, softmax_scale)
    args = (q, k, v, cu_seqlens_q, cu_seqlens_k, block_table, alibi_slopes,
            int(max_seqlen_q), int(max_seqlen_k), 0.0, softmax_scale, bool(causal),
            int(window_size[0]), int(window_size[1]), float(softcap), int(num_splits))
    out, lse = _varlen_fwd_op(*args) if _is_compiling() else _varlen_fwd_impl(*args)
    return (out if head_size % 8 == 0 else out[..., :head_size]), lse


_NO_BACKWARD = (
    "flash_attn: backward is not implemented in this build (forward-only FlashAttention-2 "
    "with split-KV decoding); use it under torch.no_grad() / torch.inference_mode(), or use "
    "upstream flash-attn for training"
)


class FlashAttnFunc(torch.autograd.Function):
    @staticmethod
    def forward(ctx, *args):
        out, lse = _flash_attn_forward(*args)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, *grads):
        raise NotImplementedError(_NO_BACKWARD)


class FlashAttnVarlenFunc(torch.autograd.Function):
    @staticmethod
    def forward(ctx, *args):
        out, lse = _flash_attn_varlen_forward(*args)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, *grads):
        raise NotImplementedError(_NO_BACKWARD)


def _needs_autograd(q, k, v):
    # Going through autograd.Function costs a few microseconds per call; only pay it when
    # autograd would record the call (so that backward reports that it is not implemented).
    return torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)


def _result(out, lse, return_attn_probs):
    # Upstream returns (out, softmax_lse, S_dmask); S_dmask only exists with dropout.
    return (out, lse, None) if return_attn_probs else out


# --------------------------------------------------------------------------------------------
# Public API (upstream flash-attn 2.x signatures)
# --------------------------------------------------------------------------------------------

def flash_attn_func(
    q,
    k,
    v,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),  # -1 means infinite context window
    softcap=0.0,  # 0.0 means deactivated
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
    num_splits=0,
):
    """Attention over padded batches.

    Arguments:
        q: (batch_size, seqlen_q, nheads, headdim)
        k, v: (batch_size, seqlen_k, nheads_k, headdim); nheads % nheads_k == 0 (MQA/GQA:
            query head h uses kv head h // (nheads // nheads_k)).
        dropout_p: must be 0.0 (this build has no dropout).
        softmax_scale: scaling of QK^T before softmax; default 1 / sqrt(headdim).
        causal: causal mask aligned to the bottom-right corner of the attention matrix
            (query i attends key j iff j <= i + seqlen_k - seqlen_q).
        window_size: (left, right) sliding window; -1 means unbounded. Query i attends keys in
            [i + seqlen_k - seqlen_q - left, i + seqlen_k - seqlen_q + right].
        softcap: > 0 applies softcap * tanh(score / softcap).
        alibi_slopes: (nheads,) or (batch_size, nheads), fp32; adds
            -slope * |i + seqlen_k - seqlen_q - j| to the score.
        deterministic: accepted for compatibility (concerns the backward pass only).
        return_attn_probs: also return softmax_lse (and None in place of S_dmask).
        num_splits: split-KV parallelism (0 = heuristic, 1 = no split, n > 1 = n splits).
    Return:
        out: (batch_size, seqlen_q, nheads, headdim), or
        (out, softmax_lse (batch_size, nheads, seqlen_q) fp32, None) if return_attn_probs.
    """
    fwd = FlashAttnFunc.apply if _needs_autograd(q, k, v) else _flash_attn_forward
    out, lse = fwd(
        q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, num_splits
    )
    return _result(out, lse, return_attn_probs)


def flash_attn_qkvpacked_func(
    qkv,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),  # -1 means infinite context window
    softcap=0.0,  # 0.0 means deactivated
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
):
    """flash_attn_func with qkv: (batch_size, seqlen, 3, nheads, headdim)."""
    return flash_attn_func(
        qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], dropout_p, softmax_scale, causal, window_size,
        softcap, alibi_slopes, deterministic, return_attn_probs,
    )


def flash_attn_kvpacked_func(
    q,
    kv,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),  # -1 means infinite context window
    softcap=0.0,  # 0.0 means deactivated
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
):
    """flash_attn_func with q: (batch_size, seqlen_q, nheads, headdim) and
    kv: (batch_size, seqlen_k, 2, nheads_k, headdim)."""
    return flash_attn_func(
        q, kv[:, :, 0], kv[:, :, 1], dropout_p, softmax_scale, causal, window_size, softcap,
        alibi_slopes, deterministic, return_attn_probs,
    )


def flash_attn_varlen_func(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),  # -1 means infinite context window
    softcap=0.0,  # 0.0 means deactivated
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
    block_table=None,
    num_splits=0,
):
    """Attention over variable-length sequences packed along the first axis.

    Arguments:
        q: (total_q, nheads, headdim)
        k, v: (total_k, nheads_k, headdim), or (num_blocks, page_block_size, nheads_k, headdim)
            when block_table is given (paged KV).
        cu_seqlens_q, cu_seqlens_k: (batch_size + 1,) int32 cumulative sequence lengths.
        max_seqlen_q, max_seqlen_k: int, longest query / key sequence in the batch.
        block_table: optional (batch_size, max_num_blocks_per_seq) int32.
        Other arguments as in flash_attn_func.
    Return:
        out: (total_q, nheads, headdim), or
        (out, softmax_lse (nheads, total_q) fp32, None) if return_attn_probs.
    """
    fwd = FlashAttnVarlenFunc.apply if _needs_autograd(q, k, v) else _flash_attn_varlen_forward
    out, lse = fwd(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale,
        causal, window_size, softcap, alibi_slopes, block_table, num_splits,
    )
    return (out, lse, None) if return_attn_probs else out


def flash_attn_varlen_qkvpacked_func(
    qkv,
    cu_seqlens,
    max_seqlen,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),  # -1 means infinite context window
    softcap=0.0,  # 0.0 means deactivated
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
):
    """flash_attn_varlen_func with qkv: (total, 3, nheads, headdim)."""
    return flash_attn_varlen_func(
        qkv[:, 0], qkv[:, 1], qkv[:, 2], cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
        dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
        return_attn_probs,
    )


def flash_attn_varlen_kvpacked_func(
    q,
    kv,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),  # -1 means infinite context window
    softcap=0.0,  # 0.0 means deactivated
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
):
    """flash_attn_varlen_func with q: (total_q, nheads, headdim) and
    kv: (total_k, 2, nheads_k, headdim)."""
    return flash_attn_varlen_func(
        q, kv[:, 0], kv[:, 1], cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
        dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
        return_attn_probs,
    )


def flash_attn_with_kvcache(
    q,
    k_cache,
    v_cache,
    k=None,
    v=None,
    rotary_cos=None,
    rotary_sin=None,
    cache_seqlens: Optional[Union[int, torch.Tensor]] = None,
    cache_batch_idx: Optional[torch.Tensor] = None,
    cache_leftpad: Optional[torch.Tensor] = None,
    block_table: Optional[torch.Tensor] = None,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),  # -1 means infinite context window
    softcap=0.0,  # 0.0 means deactivated
    rotary_interleaved=True,
    alibi_slopes=None,
    num_splits=0,
    return_softmax_lse=False,
):
    """Attention against a KV cache, optionally appending k / v to it in place first
    (and applying rotary embedding to q and k when rotary_cos / rotary_sin are given).

    Arguments:
        q: (batch_size, seqlen_q, nheads, headdim)
        k_cache, v_cache: (batch_size_cache, seqlen_cache, nheads_k, headdim), or
            (num_blocks, page_block_size, nheads_k, headdim) with block_table (paged KV cache).
        k, v: optional (batch_size, seqlen_new, nheads_k, headdim), written into the cache at
            positions cache_seqlens, cache_seqlens + 1, ...
        rotary_cos, rotary_sin: optional (seqlen_ro, rotary_dim / 2).
        cache_seqlens: int, or (batch_size,) int32: current lengths of the cache.
        cache_batch_idx: optional (batch_size,) int32 indices into the cache's batch axis.
        cache_leftpad: optional (batch_size,) int32, where each cache sequence starts.
        block_table: optional (batch_size, max_num_blocks_per_seq) int32.
        num_splits: 0 = heuristic, 1 = no split, n > 1 = n splits.
        Other arguments as in flash_attn_func. No backward pass.
    Return:
        out: (batch_size, seqlen_q, nheads, headdim), and softmax_lse
        (batch_size, nheads, seqlen_q) fp32 if return_softmax_lse.
    """
    ext = _ext()
    if not hasattr(ext, "fwd_kvcache"):  # an extension built from an older tree
        raise RuntimeError(
            "flash_attn_with_kvcache: this build of the flash_attn_2_cuda extension has no "
            "fwd_kvcache kernel"
        )
    # Argument checks (cache layout included) live in the dispatcher, with messages naming them;
    # it also copies a strided last dimension of q, k and v (not of the caches, written in place).
    if softmax_scale is None:
        softmax_scale = q.shape[-1] ** (-0.5)
    if isinstance(cache_seqlens, int):
        cache_seqlens = torch.full((q.shape[0],), cache_seqlens, dtype=torch.int32, device=q.device)
    cache_seqlens, cache_batch_idx, cache_leftpad, block_table = [
        x.contiguous() if x is not None else None
        for x in (cache_seqlens, cache_batch_idx, cache_leftpad, block_table)
    ]
    res = ext.fwd_kvcache(
        q, k_cache, v_cache, k, v, cache_seqlens, rotary_cos, rotary_sin, cache_batch_idx,
        cache_leftpad, block_table, alibi_slopes, None, float(softmax_scale), bool(causal),
        int(window_size[0]), int(window_size[1]), float(softcap), bool(rotary_interleaved),
        int(num_splits),
    )
    out, lse = res[0], res[1]
    return (out, lse) if return_softmax_lse else out
