"""Python interface of the flash_attn_2_cuda extension: upstream flash-attn 2.8.3's surface.

Public functions, autograd Functions (FlashAttnFunc, FlashAttnKVPackedFunc, ...) and the private
_flash_attn_forward / _flash_attn_varlen_forward / _flash_attn_backward /
_flash_attn_varlen_backward keep upstream's signatures, defaults and return values; the private
functions are the custom ops torch.ops.flash_attn.<name> (with fake implementations), so that
torch.compile(fullgraph=True) traces a training step, forward and backward, without a graph break.

Differences from upstream:
  * flash_attn_func, flash_attn_varlen_func, their autograd Functions and the private forwards
    take one extra trailing argument, num_splits (0 = heuristic, 1 = never split the KV sequence,
    n > 1 = n splits), like flash_attn_with_kvcache;
  * flash_attn_with_kvcache is a custom op too, torch.ops.flash_attn._flash_attn_with_kvcache,
    declaring its in-place writes into k_cache and v_cache;
  * eager calls that autograd does not record go straight to the extension: the autograd.Function
    and the custom-op dispatch cost microseconds that a decode loop pays at every step;
  * the custom ops are registered for every device type (upstream: "cuda"), so that their
    plumbing can be checked on the CPU with a stand-in extension.
"""

import functools
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
    unavailable. This is the plan of the SM80 kernels; where the Hopper forward takes a call
    (compute capability 9.0), more than 64 query rows may split too:
    flash_attn_2_cuda.num_splits_heuristic(..., sm90_prefill=True) gives that plan. It is the plan
    of batch-strided queries (flash_attn_func, flash_attn_with_kvcache), which pack a GQA group's
    heads with a few queries each into one decode tile; a varlen call with several queries per
    sequence keeps the heads apart.
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
# Argument plumbing
# --------------------------------------------------------------------------------------------

def _maybe_contiguous(x):
    return x.contiguous() if x is not None and x.stride(-1) != 1 else x


def _contiguous(x):
    # The dispatcher takes the small int32 index tensors contiguous only; .contiguous() of a
    # contiguous tensor costs less host time than testing its strides first.
    return None if x is None else x.contiguous()


def _pad_head_dim(x):
    """Zero-pads the last dimension to a multiple of 8, the granularity of the kernels' head dims:
    zero features change neither QK^T nor the first head_size features of PV."""
    head_size = x.shape[-1]
    return x if head_size % 8 == 0 else F.pad(x, [0, 8 - head_size % 8])


def _softmax_dmask(S_dmask, q):
    # The extension returns None when it did not materialise the probabilities (no dropout);
    # upstream returns an empty tensor there, and the custom ops' schemas return a Tensor.
    return torch.empty((0,), dtype=q.dtype, device=q.device) if S_dmask is None else S_dmask


def _round_multiple(x, m):
    return (x + m - 1) // m * m


# --------------------------------------------------------------------------------------------
# Custom ops: each private function is registered as torch.ops.flash_attn.<its name>. Under
# torch.compile a call goes through the op (opaque to the compiler, shapes from its fake
# implementation); in eager mode it calls the extension directly. `<function>.direct` is the
# function without that routing, for callers that already know they are not compiling.
# --------------------------------------------------------------------------------------------

if hasattr(torch.library, "custom_op"):
    _is_compiling = torch.compiler.is_compiling

    def _registered_op(name, mutates_args):
        def register(fn):
            torch.library.custom_op(f"flash_attn::{name}", fn, mutates_args=mutates_args)
            op = getattr(torch.ops.flash_attn, name)

            @functools.wraps(fn)
            def call(*args, **kwargs):
                return (op if _is_compiling() else fn)(*args, **kwargs)

            call.register_fake = functools.partial(torch.library.register_fake,
                                                   f"flash_attn::{name}")
            call.direct = fn
            return call

        return register

else:  # torch < 2.4: no custom ops; the functions call the extension directly

    def _is_compiling():
        return False

    def _registered_op(name, mutates_args):
        def register(fn):
            fn.register_fake = lambda fake: fake
            fn.direct = fn
            return fn

        return register


@_registered_op("_flash_attn_forward", mutates_args=())
def _flash_attn_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dropout_p: float,
    softmax_scale: float,
    causal: bool,
    window_size_left: int,
    window_size_right: int,
    softcap: float,
    alibi_slopes: Optional[torch.Tensor],
    return_softmax: bool,
    num_splits: int = 0,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Padded-batch forward of head dims that are multiples of 8.
    Returns (out, softmax_lse, S_dmask (empty unless return_softmax), rng_state)."""
    out, softmax_lse, S_dmask, rng_state = _ext().fwd(
        q, k, v, None, alibi_slopes, dropout_p, softmax_scale, causal, window_size_left,
        window_size_right, softcap, return_softmax, None, num_splits,
    )
    return out, softmax_lse, _softmax_dmask(S_dmask, q), rng_state


@_flash_attn_forward.register_fake
def _flash_attn_forward_fake(q, k, v, dropout_p, softmax_scale, causal, window_size_left,
                             window_size_right, softcap, alibi_slopes, return_softmax,
                             num_splits=0):
    batch, seqlen_q, nheads, _ = q.shape
    seqlen_k = k.shape[1]
    softmax_lse = torch.empty((batch, nheads, seqlen_q), dtype=torch.float32, device=q.device)
    S_dmask_shape = (
        (batch, nheads, _round_multiple(seqlen_q, 128), _round_multiple(seqlen_k, 128))
        if return_softmax else (0,)
    )
    S_dmask = torch.empty(S_dmask_shape, dtype=q.dtype, device=q.device)
    rng_state = torch.empty((2,), dtype=torch.int64, device=q.device)
    return torch.empty_like(q), softmax_lse, S_dmask, rng_state


@_registered_op("_flash_attn_varlen_forward", mutates_args=())
def _flash_attn_varlen_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float,
    softmax_scale: float,
    causal: bool,
    window_size_left: int = -1,
    window_size_right: int = -1,
    softcap: float = 0.0,
    alibi_slopes: Optional[torch.Tensor] = None,
    return_softmax: bool = False,
    block_table: Optional[torch.Tensor] = None,
    leftpad_k: Optional[torch.Tensor] = None,
    seqused_k: Optional[torch.Tensor] = None,
    zero_tensors: bool = False,
    num_splits: int = 0,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Variable-length forward of head dims that are multiples of 8.
    Returns (out, softmax_lse, S_dmask (empty unless return_softmax), rng_state)."""
    out, softmax_lse, S_dmask, rng_state = _ext().varlen_fwd(
        q, k, v, None, cu_seqlens_q, cu_seqlens_k, seqused_k, leftpad_k, block_table,
        alibi_slopes, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, zero_tensors, causal,
        window_size_left, window_size_right, softcap, return_softmax, None, num_splits,
    )
    return out, softmax_lse, _softmax_dmask(S_dmask, q), rng_state


@_flash_attn_varlen_forward.register_fake
def _flash_attn_varlen_forward_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                    max_seqlen_k, dropout_p, softmax_scale, causal,
                                    window_size_left=-1, window_size_right=-1, softcap=0.0,
                                    alibi_slopes=None, return_softmax=False, block_table=None,
                                    leftpad_k=None, seqused_k=None, zero_tensors=False,
                                    num_splits=0):
    total_q, nheads, _ = q.shape
    batch = cu_seqlens_q.shape[0] - 1
    softmax_lse = torch.empty((nheads, total_q), dtype=torch.float32, device=q.device)
    S_dmask_shape = (
        (batch, nheads, _round_multiple(max_seqlen_q, 128), _round_multiple(max_seqlen_k, 128))
        if return_softmax else (0,)
    )
    S_dmask = torch.empty(S_dmask_shape, dtype=q.dtype, device=q.device)
    rng_state = torch.empty((2,), dtype=torch.int64, device=q.device)
    return torch.empty_like(q), softmax_lse, S_dmask, rng_state


@_registered_op("_flash_attn_backward", mutates_args=("dq", "dk", "dv"))
def _flash_attn_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    softmax_lse: torch.Tensor,
    dq: Optional[torch.Tensor],
    dk: Optional[torch.Tensor],
    dv: Optional[torch.Tensor],
    dropout_p: float,
    softmax_scale: float,
    causal: bool,
    window_size_left: int,
    window_size_right: int,
    softcap: float,
    alibi_slopes: Optional[torch.Tensor],
    deterministic: bool,
    rng_state: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Padded-batch backward of head dims that are multiples of 8: writes the gradients into dq,
    dk, dv (dk, dv of k's shape under MQA/GQA) and returns softmax_d."""
    dout, q, k, v, out = [_maybe_contiguous(x) for x in (dout, q, k, v, out)]
    _, _, _, softmax_d = _ext().bwd(
        dout, q, k, v, out, softmax_lse, dq, dk, dv, alibi_slopes, dropout_p, softmax_scale,
        causal, window_size_left, window_size_right, softcap, deterministic, None, rng_state,
    )
    return softmax_d


@_flash_attn_backward.register_fake
def _flash_attn_backward_fake(dout, q, k, v, out, softmax_lse, dq, dk, dv, dropout_p,
                              softmax_scale, causal, window_size_left, window_size_right, softcap,
                              alibi_slopes, deterministic, rng_state=None):
    # The kernels write softmax_d unpadded: (batch, nheads, seqlen_q) (upstream rounds seqlen_q up
    # to 128; only its first seqlen_q entries carry values there).
    batch, seqlen_q, nheads, _ = q.shape
    return torch.empty((batch, nheads, seqlen_q), dtype=torch.float32, device=q.device)


@_registered_op("_flash_attn_varlen_backward", mutates_args=("dq", "dk", "dv"))
def _flash_attn_varlen_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    softmax_lse: torch.Tensor,
    dq: Optional[torch.Tensor],
    dk: Optional[torch.Tensor],
    dv: Optional[torch.Tensor],
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float,
    softmax_scale: float,
    causal: bool,
    window_size_left: int,
    window_size_right: int,
    softcap: float,
    alibi_slopes: Optional[torch.Tensor],
    deterministic: bool,
    rng_state: Optional[torch.Tensor] = None,
    zero_tensors: bool = False,
) -> torch.Tensor:
    """Variable-length backward of head dims that are multiples of 8: writes the gradients into
    dq, dk, dv and returns softmax_d."""
    dout, q, k, v, out = [_maybe_contiguous(x) for x in (dout, q, k, v, out)]
    _, _, _, softmax_d = _ext().varlen_bwd(
        dout, q, k, v, out, softmax_lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k, alibi_slopes,
        max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, zero_tensors, causal,
        window_size_left, window_size_right, softcap, deterministic, None, rng_state,
    )
    return softmax_d


@_flash_attn_varlen_backward.register_fake
def _flash_attn_varlen_backward_fake(dout, q, k, v, out, softmax_lse, dq, dk, dv, cu_seqlens_q,
                                     cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                                     softmax_scale, causal, window_size_left, window_size_right,
                                     softcap, alibi_slopes, deterministic, rng_state=None,
                                     zero_tensors=False):
    # (nheads, total_q), as the kernels write it (upstream pads each sequence by 128 rows).
    total_q, nheads, _ = q.shape
    return torch.empty((nheads, total_q), dtype=torch.float32, device=q.device)


@_registered_op("_flash_attn_with_kvcache", mutates_args=("k_cache", "v_cache"))
def _flash_attn_with_kvcache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: Optional[torch.Tensor],
    v: Optional[torch.Tensor],
    cache_seqlens: Optional[torch.Tensor],
    rotary_cos: Optional[torch.Tensor],
    rotary_sin: Optional[torch.Tensor],
    cache_batch_idx: Optional[torch.Tensor],
    cache_leftpad: Optional[torch.Tensor],
    block_table: Optional[torch.Tensor],
    alibi_slopes: Optional[torch.Tensor],
    softmax_scale: float,
    causal: bool,
    window_size_left: int,
    window_size_right: int,
    softcap: float,
    rotary_interleaved: bool,
    num_splits: int,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Attention against a KV cache, appending k / v into k_cache / v_cache in place first.
    Returns (out, softmax_lse)."""
    out, softmax_lse = (_ext_module or _ext()).fwd_kvcache(
        q, k_cache, v_cache, k, v, cache_seqlens, rotary_cos, rotary_sin, cache_batch_idx,
        cache_leftpad, block_table, alibi_slopes, None, softmax_scale, causal, window_size_left,
        window_size_right, softcap, rotary_interleaved, num_splits,
    )
    return out, softmax_lse


@_flash_attn_with_kvcache.register_fake
def _flash_attn_with_kvcache_fake(q, k_cache, v_cache, k, v, cache_seqlens, rotary_cos,
                                  rotary_sin, cache_batch_idx, cache_leftpad, block_table,
                                  alibi_slopes, softmax_scale, causal, window_size_left,
                                  window_size_right, softcap, rotary_interleaved, num_splits):
    batch, seqlen_q, nheads, _ = q.shape
    softmax_lse = torch.empty((batch, nheads, seqlen_q), dtype=torch.float32, device=q.device)
    return torch.empty_like(q), softmax_lse


# --------------------------------------------------------------------------------------------
# Autograd Functions (upstream's argument lists; FlashAttnFunc and FlashAttnVarlenFunc take a
# trailing num_splits). Head dims that are not multiples of 8 are zero-padded for the kernels
# and the outputs / gradients sliced back.
# --------------------------------------------------------------------------------------------

def _attention_forward(ctx, needs_grad, head_size, q, k, v, varlen, dropout_p, softmax_scale, causal,
                       window_size, softcap, alibi_slopes, deterministic, return_softmax,
                       block_table=None, num_splits=0):
    """The forward of every Function on head-dim-padded q, k, v; varlen is None or
    (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k). Saves what the backward needs."""
    if softmax_scale is None:
        softmax_scale = head_size ** (-0.5)
    return_S_dmask = return_softmax and dropout_p > 0
    if varlen is None:
        out, softmax_lse, S_dmask, rng_state = _flash_attn_forward(
            q, k, v, dropout_p, softmax_scale, causal, window_size[0], window_size[1], softcap,
            alibi_slopes, return_S_dmask, num_splits,
        )
        saved = (q, k, v, out, softmax_lse, rng_state)
    else:
        cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k = varlen
        out, softmax_lse, S_dmask, rng_state = _flash_attn_varlen_forward(
            q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
            softmax_scale, causal, window_size[0], window_size[1], softcap, alibi_slopes,
            return_S_dmask, block_table, num_splits=num_splits,
        )
        saved = (q, k, v, out, softmax_lse, rng_state, cu_seqlens_q, cu_seqlens_k)
        ctx.max_seqlen_q, ctx.max_seqlen_k = max_seqlen_q, max_seqlen_k
    if needs_grad:
        ctx.save_for_backward(*saved)
        ctx.varlen = varlen is not None
        ctx.dropout_p, ctx.softmax_scale, ctx.causal = dropout_p, softmax_scale, causal
        ctx.window_size, ctx.softcap, ctx.alibi_slopes = window_size, softcap, alibi_slopes
        ctx.deterministic = deterministic
    out = out[..., :head_size]
    return (out, softmax_lse, S_dmask) if return_softmax else out


def _attention_backward(ctx, saved, dout, dq, dk, dv):
    """The backward of every Function into dq, dk, dv (views of one buffer for the packed ones)."""
    q, k, v, out, softmax_lse, rng_state = saved[:6]
    dout = _pad_head_dim(dout)
    options = (ctx.dropout_p, ctx.softmax_scale, ctx.causal, ctx.window_size[0], ctx.window_size[1],
               ctx.softcap, ctx.alibi_slopes, ctx.deterministic, rng_state)
    if ctx.varlen:
        cu_seqlens_q, cu_seqlens_k = saved[6:]
        _flash_attn_varlen_backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, cu_seqlens_q,
                                    cu_seqlens_k, ctx.max_seqlen_q, ctx.max_seqlen_k, *options)
    else:
        _flash_attn_backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, *options)


def _unpad(*grads, head_size):
    return tuple(g[..., :head_size] for g in grads)


class FlashAttnQKVPackedFunc(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                deterministic, return_softmax, is_grad_enabled):
        q, k, v = [_pad_head_dim(qkv[:, :, i].detach()) for i in range(3)]
        return _attention_forward(ctx, is_grad_enabled and qkv.requires_grad, qkv.shape[-1], q, k, v,
                                  None, dropout_p, softmax_scale, causal, window_size, softcap,
                                  alibi_slopes, deterministic, return_softmax)

    @staticmethod
    def backward(ctx, dout, *args):
        saved = ctx.saved_tensors
        q = saved[0]
        # One buffer for the three gradients: the packed gradient needs no concatenation.
        dqkv = torch.empty((*q.shape[:-2], 3, *q.shape[-2:]), dtype=q.dtype, device=q.device)
        _attention_backward(ctx, saved, dout, dqkv[:, :, 0], dqkv[:, :, 1], dqkv[:, :, 2])
        return *_unpad(dqkv, head_size=dout.shape[-1]), *(None,) * 9


class FlashAttnKVPackedFunc(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, kv, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                deterministic, return_softmax, is_grad_enabled):
        k, v = [_pad_head_dim(kv[:, :, i].detach()) for i in range(2)]
        return _attention_forward(ctx, is_grad_enabled and (q.requires_grad or kv.requires_grad),
                                  q.shape[-1], _pad_head_dim(q), k, v, None, dropout_p, softmax_scale,
                                  causal, window_size, softcap, alibi_slopes, deterministic,
                                  return_softmax)

    @staticmethod
    def backward(ctx, dout, *args):
        saved = ctx.saved_tensors
        q, k = saved[0], saved[1]
        dq = torch.empty_like(q)
        dkv = torch.empty((*k.shape[:-2], 2, *k.shape[-2:]), dtype=k.dtype, device=k.device)
        _attention_backward(ctx, saved, dout, dq, dkv[:, :, 0], dkv[:, :, 1])
        return *_unpad(dq, dkv, head_size=dout.shape[-1]), *(None,) * 9


class FlashAttnFunc(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, dropout_p, softmax_scale, causal, window_size, softcap,
                alibi_slopes, deterministic, return_softmax, is_grad_enabled, num_splits=0):
        needs_grad = is_grad_enabled and (q.requires_grad or k.requires_grad or v.requires_grad)
        return _attention_forward(ctx, needs_grad, q.shape[-1], _pad_head_dim(q), _pad_head_dim(k),
                                  _pad_head_dim(v), None, dropout_p, softmax_scale, causal,
                                  window_size, softcap, alibi_slopes, deterministic, return_softmax,
                                  num_splits=num_splits)

    @staticmethod
    def backward(ctx, dout, *args):
        saved = ctx.saved_tensors
        dq, dk, dv = (torch.empty_like(t) for t in saved[:3])
        _attention_backward(ctx, saved, dout, dq, dk, dv)
        return *_unpad(dq, dk, dv, head_size=dout.shape[-1]), *(None,) * 10


class FlashAttnVarlenQKVPackedFunc(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv, cu_seqlens, max_seqlen, dropout_p, softmax_scale, causal, window_size,
                softcap, alibi_slopes, deterministic, return_softmax, is_grad_enabled):
        q, k, v = [_pad_head_dim(qkv[:, i].detach()) for i in range(3)]
        return _attention_forward(ctx, is_grad_enabled and qkv.requires_grad, qkv.shape[-1], q, k, v,
                                  (cu_seqlens, cu_seqlens, max_seqlen, max_seqlen), dropout_p,
                                  softmax_scale, causal, window_size, softcap, alibi_slopes,
                                  deterministic, return_softmax)

    @staticmethod
    def backward(ctx, dout, *args):
        saved = ctx.saved_tensors
        q = saved[0]
        dqkv = torch.empty((q.shape[0], 3, *q.shape[1:]), dtype=q.dtype, device=q.device)
        _attention_backward(ctx, saved, dout, dqkv[:, 0], dqkv[:, 1], dqkv[:, 2])
        return *_unpad(dqkv, head_size=dout.shape[-1]), *(None,) * 11


class FlashAttnVarlenKVPackedFunc(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                return_softmax, is_grad_enabled):
        k, v = [_pad_head_dim(kv[:, i].detach()) for i in range(2)]
        return _attention_forward(ctx, is_grad_enabled and (q.requires_grad or kv.requires_grad),
                                  q.shape[-1], _pad_head_dim(q), k, v,
                                  (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k), dropout_p,
                                  softmax_scale, causal, window_size, softcap, alibi_slopes,
                                  deterministic, return_softmax)

    @staticmethod
    def backward(ctx, dout, *args):
        saved = ctx.saved_tensors
        q, k = saved[0], saved[1]
        dq = torch.empty_like(q)
        dkv = torch.empty((k.shape[0], 2, *k.shape[1:]), dtype=k.dtype, device=k.device)
        _attention_backward(ctx, saved, dout, dq, dkv[:, 0], dkv[:, 1])
        return *_unpad(dq, dkv, head_size=dout.shape[-1]), *(None,) * 13


class FlashAttnVarlenFunc(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                return_softmax, block_table, is_grad_enabled, num_splits=0):
        needs_grad = is_grad_enabled and (q.requires_grad or k.requires_grad or v.requires_grad)
        return _attention_forward(ctx, needs_grad, q.shape[-1], _pad_head_dim(q), _pad_head_dim(k),
                                  _pad_head_dim(v), (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k),
                                  dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                                  deterministic, return_softmax, block_table, num_splits)

    @staticmethod
    def backward(ctx, dout, *args):
        saved = ctx.saved_tensors
        dq, dk, dv = (torch.empty_like(t) for t in saved[:3])
        _attention_backward(ctx, saved, dout, dq, dk, dv)
        return *_unpad(dq, dk, dv, head_size=dout.shape[-1]), *(None,) * 15


# --------------------------------------------------------------------------------------------
# Calls that autograd does not record and torch.compile does not trace: straight to the
# extension, flat (each Python call level costs host time at every decode step).
# --------------------------------------------------------------------------------------------

def _distinct(cu_seqlens_k, cu_seqlens_q):
    # Self-attention callers (transformers among them) pass one tensor as both cu_seqlens, and
    # torch.compile cannot trace an autograd.Function given the same tensor twice: a view is
    # another tensor to it, with the same values.
    return cu_seqlens_k[:] if cu_seqlens_k is cu_seqlens_q else cu_seqlens_k


def _direct_call(q, k, v):
    """Whether to skip the autograd.Function: nothing requires grad (or grad mode is off), and
    torch.compile is not tracing (it traces the Function and its custom ops)."""
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return False
    return not _is_compiling()


def _forward_direct(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap,
                    alibi_slopes, return_attn_probs, num_splits):
    head_size = q.shape[-1]
    if softmax_scale is None:
        softmax_scale = head_size ** (-0.5)
    if head_size % 8 != 0:
        q, k, v = _pad_head_dim(q), _pad_head_dim(k), _pad_head_dim(v)
    out, softmax_lse, S_dmask, _ = (_ext_module or _ext()).fwd(
        q, k, v, None, alibi_slopes, float(dropout_p), float(softmax_scale), bool(causal),
        int(window_size[0]), int(window_size[1]), float(softcap),
        bool(return_attn_probs) and dropout_p > 0, None, int(num_splits),
    )
    if head_size % 8 != 0:
        out = out[..., :head_size]
    return (out, softmax_lse, _softmax_dmask(S_dmask, q)) if return_attn_probs else out


def _varlen_forward_direct(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                           dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                           return_attn_probs, block_table, num_splits):
    head_size = q.shape[-1]
    if softmax_scale is None:
        softmax_scale = head_size ** (-0.5)
    if head_size % 8 != 0:
        q, k, v = _pad_head_dim(q), _pad_head_dim(k), _pad_head_dim(v)
    out, softmax_lse, S_dmask, _ = (_ext_module or _ext()).varlen_fwd(
        q, k, v, None, cu_seqlens_q, cu_seqlens_k, None, None, block_table, alibi_slopes,
        int(max_seqlen_q), int(max_seqlen_k), float(dropout_p), float(softmax_scale), False,
        bool(causal), int(window_size[0]), int(window_size[1]), float(softcap),
        bool(return_attn_probs) and dropout_p > 0, None, int(num_splits),
    )
    if head_size % 8 != 0:
        out = out[..., :head_size]
    return (out, softmax_lse, _softmax_dmask(S_dmask, q)) if return_attn_probs else out


# --------------------------------------------------------------------------------------------
# Public API (upstream flash-attn 2.8.3 signatures)
# --------------------------------------------------------------------------------------------

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
    """flash_attn_func with qkv: (batch_size, seqlen, 3, nheads, headdim). The backward pass
    writes the gradient into one (batch_size, seqlen, 3, nheads, headdim) tensor."""
    if _direct_call(qkv, qkv, qkv):
        return _forward_direct(
            qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], dropout_p, softmax_scale, causal,
            window_size, softcap, alibi_slopes, return_attn_probs, 0,
        )
    return FlashAttnQKVPackedFunc.apply(
        qkv, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
        return_attn_probs, torch.is_grad_enabled(),
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
    kv: (batch_size, seqlen_k, 2, nheads_k, headdim). The backward pass writes the gradient of kv
    into one tensor."""
    if _direct_call(q, kv, kv):
        return _forward_direct(
            q, kv[:, :, 0], kv[:, :, 1], dropout_p, softmax_scale, causal, window_size, softcap,
            alibi_slopes, return_attn_probs, 0,
        )
    return FlashAttnKVPackedFunc.apply(
        q, kv, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
        deterministic, return_attn_probs, torch.is_grad_enabled(),
    )


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
        dropout_p: dropout probability (0.0 at evaluation).
        softmax_scale: scaling of QK^T before softmax; default 1 / sqrt(headdim).
        causal: causal mask aligned to the bottom-right corner of the attention matrix
            (query i attends key j iff j <= i + seqlen_k - seqlen_q).
        window_size: (left, right) sliding window; -1 means unbounded. Query i attends keys in
            [i + seqlen_k - seqlen_q - left, i + seqlen_k - seqlen_q + right].
        softcap: > 0 applies softcap * tanh(score / softcap).
        alibi_slopes: (nheads,) or (batch_size, nheads), fp32; adds
            -slope * |i + seqlen_k - seqlen_q - j| to the score.
        deterministic: use the deterministic backward pass (slightly slower, more memory).
        return_attn_probs: also return softmax_lse and S_dmask (the attention probabilities
            with the dropout pattern; an empty tensor without dropout).
        num_splits: split-KV parallelism of the forward pass (0 = heuristic, 1 = no split,
            n > 1 = n splits).
    Return:
        out: (batch_size, seqlen_q, nheads, headdim), or (out, softmax_lse (batch_size, nheads,
        seqlen_q) fp32, S_dmask) if return_attn_probs.
    """
    if _direct_call(q, k, v):
        return _forward_direct(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap,
                               alibi_slopes, return_attn_probs, num_splits)
    return FlashAttnFunc.apply(
        q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
        deterministic, return_attn_probs, torch.is_grad_enabled(), num_splits,
    )


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
    """flash_attn_varlen_func with qkv: (total, 3, nheads, headdim). The backward pass writes the
    gradient into one (total, 3, nheads, headdim) tensor."""
    if _direct_call(qkv, qkv, qkv):
        return _varlen_forward_direct(
            qkv[:, 0], qkv[:, 1], qkv[:, 2], cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
            dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
            return_attn_probs, None, 0,
        )
    return FlashAttnVarlenQKVPackedFunc.apply(
        qkv, cu_seqlens, max_seqlen, dropout_p, softmax_scale, causal, window_size, softcap,
        alibi_slopes, deterministic, return_attn_probs, torch.is_grad_enabled(),
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
    kv: (total_k, 2, nheads_k, headdim). The backward pass writes the gradient of kv into one
    tensor."""
    if _direct_call(q, kv, kv):
        return _varlen_forward_direct(
            q, kv[:, 0], kv[:, 1], cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
            dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
            return_attn_probs, None, 0,
        )
    return FlashAttnVarlenKVPackedFunc.apply(
        q, kv, cu_seqlens_q, _distinct(cu_seqlens_k, cu_seqlens_q), max_seqlen_q, max_seqlen_k,
        dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic, return_attn_probs,
        torch.is_grad_enabled(),
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
        out: (total_q, nheads, headdim), or (out, softmax_lse (nheads, total_q) fp32, S_dmask)
        if return_attn_probs.
    """
    if _direct_call(q, k, v):
        return _varlen_forward_direct(
            q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
            softmax_scale, causal, window_size, softcap, alibi_slopes, return_attn_probs,
            block_table, num_splits,
        )
    return FlashAttnVarlenFunc.apply(
        q, k, v, cu_seqlens_q, _distinct(cu_seqlens_k, cu_seqlens_q), max_seqlen_q, max_seqlen_k,
        dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic, return_attn_probs, block_table,
        torch.is_grad_enabled(), num_splits,
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
    # Argument checks (cache layout included) live in the dispatcher, with messages naming them;
    # it also copies a strided last dimension of q, k and v (not of the caches, written in place).
    if softmax_scale is None:
        softmax_scale = q.shape[-1] ** (-0.5)
    if isinstance(cache_seqlens, int):
        cache_seqlens = torch.full((q.shape[0],), cache_seqlens, dtype=torch.int32, device=q.device)
    # One routing decision here instead of one more call level on the decode hot path.
    kvcache = _flash_attn_with_kvcache if _is_compiling() else _flash_attn_with_kvcache.direct
    out, softmax_lse = kvcache(
        q, k_cache, v_cache, k, v, _contiguous(cache_seqlens), rotary_cos, rotary_sin,
        _contiguous(cache_batch_idx), _contiguous(cache_leftpad), _contiguous(block_table),
        alibi_slopes, float(softmax_scale), bool(causal),
        int(window_size[0]), int(window_size[1]), float(softcap), bool(rotary_interleaved),
        int(num_splits),
    )
    return (out, softmax_lse) if return_softmax_lse else out
