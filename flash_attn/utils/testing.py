"""Test helpers of upstream flash-attn 2.8.3 (flash_attn.utils.testing): random padding masks,
padded / unpadded copies of q, k, v for the varlen functions, and a PyTorch attention reference
with the masking rules of the kernels (causal and local windows aligned to the bottom-right,
attention sinks, chunked attention, left-padded keys, softcap, dropout masks, descaling).

Windows here use None for "unbounded" (the kernels' API uses -1).
"""

import math
from typing import Optional

import torch
from einops import rearrange, repeat

from flash_attn.bert_padding import pad_input, unpad_input

__all__ = [
    "generate_random_padding_mask",
    "generate_qkv",
    "construct_local_mask",
    "construct_chunk_mask",
    "attention_ref",
]

_PADDING_MODES = ("full", "random", "third")


def generate_random_padding_mask(max_seqlen, batch_size, device, mode="random", zero_lengths=False):
    """(batch_size, max_seqlen) bool mask, True for the first `length` positions of each row.

    mode: "full" (every row max_seqlen long), "random" (lengths in [max_seqlen - 20, max_seqlen],
        at least 1 unless zero_lengths), "third" (lengths in [max_seqlen // 3, max_seqlen]).
    zero_lengths: also makes rows 0, 5, 10, ... and the last row empty.
    """
    if mode not in _PADDING_MODES:
        raise ValueError(f"mode must be one of {_PADDING_MODES}, got {mode!r}")
    if mode == "full":
        lengths = torch.full((batch_size, 1), max_seqlen, device=device, dtype=torch.int32)
    elif mode == "random":
        shortest = max(0 if zero_lengths else 1, max_seqlen - 20)
        lengths = torch.randint(shortest, max_seqlen + 1, (batch_size, 1), device=device)
    else:
        lengths = torch.randint(max_seqlen // 3, max_seqlen + 1, (batch_size, 1), device=device)
    if zero_lengths:
        lengths[::5] = 0
        lengths[-1] = 0
    positions = repeat(torch.arange(max_seqlen, device=device), "s -> b s", b=batch_size)
    return positions < lengths


def _unpadded(x, padding_mask, unused_mask):
    """x (batch, seqlen, ...) as (total, ...) with its cu_seqlens, max_seqlen, seqused and a
    function that pads a (total, ...) tensor back to (batch, seqlen, ...)."""
    batch_size, seqlen = x.shape[:2]
    if padding_mask is None:
        cu_seqlens = torch.arange(
            0, (batch_size + 1) * seqlen, step=seqlen, dtype=torch.int32, device=x.device
        )
        pad_fn = lambda t: rearrange(t, "(b s) ... -> b s ...", b=batch_size)
        return rearrange(x, "b s ... -> (b s) ..."), None, cu_seqlens, seqlen, None, pad_fn
    x_unpad, indices, cu_seqlens, max_seqlen, seqused = unpad_input(x, padding_mask, unused_mask)
    pad_fn = lambda t: pad_input(t, indices, batch_size, seqlen)
    return x_unpad, indices, cu_seqlens, max_seqlen, seqused, pad_fn


def generate_qkv(
    q, k, v, query_padding_mask=None, key_padding_mask=None, qv=None, kvpacked=False, qkvpacked=False,
    query_unused_mask=None, key_unused_mask=None,
):
    """Unpadded (varlen) copies of q, k, v and the functions that pad results back.

    Arguments:
        q: (batch_size, seqlen_q, nheads, d)
        k: (batch_size, seqlen_k, nheads_k, d)
        v: (batch_size, seqlen_k, nheads_k, d_v)
        query_padding_mask, key_padding_mask: (batch_size, seqlen) bool, True for valid tokens.
        qv: optional (batch_size, seqlen_q, nheads, d_v), unpadded like q (returned without grad).
        query_unused_mask, key_unused_mask: tokens kept in the unpadded tensors but not counted
            in seqused (not with kvpacked / qkvpacked).
    Returns, every q / k / v / kv / qkv tensor detached with requires_grad set:
        qkvpacked: (qkv_unpad, cu_seqlens_q, max_seqlen_q, qkv, output_pad_fn, dqkv_pad_fn)
        kvpacked: (q_unpad, kv_unpad, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
            q, kv, output_pad_fn, dq_pad_fn, dkv_pad_fn)
        else: (q_unpad, k_unpad, v_unpad, qv_unpad, cu_seqlens_q, cu_seqlens_k, seqused_q,
            seqused_k, max_seqlen_q, max_seqlen_k, q, k, v, qv, output_pad_fn, dq_pad_fn,
            dk_pad_fn)
    """
    if kvpacked and qkvpacked:
        raise ValueError("kvpacked and qkvpacked are exclusive")
    batch_size, seqlen_q, nheads, d = q.shape
    _, seqlen_k, nheads_k, _ = k.shape
    d_v = v.shape[-1]
    if k.shape != (batch_size, seqlen_k, nheads_k, d):
        raise ValueError(f"k must be {(batch_size, seqlen_k, nheads_k, d)}, got {tuple(k.shape)}")
    if v.shape != (batch_size, seqlen_k, nheads_k, d_v):
        raise ValueError(f"v must be {(batch_size, seqlen_k, nheads_k, d_v)}, got {tuple(v.shape)}")
    if (query_unused_mask is not None or key_unused_mask is not None) and (kvpacked or qkvpacked):
        raise ValueError("query_unused_mask / key_unused_mask work only without kvpacked / qkvpacked")

    q_unpad, indices_q, cu_seqlens_q, max_seqlen_q, seqused_q, output_pad_fn = _unpadded(
        q, query_padding_mask, query_unused_mask
    )
    qv_unpad = None
    if qv is not None:
        qv_flat = rearrange(qv, "b s ... -> (b s) ...")
        qv_unpad = qv_flat if indices_q is None else qv_flat[indices_q]
    k_unpad, _, cu_seqlens_k, max_seqlen_k, seqused_k, dk_pad_fn = _unpadded(
        k, key_padding_mask, key_unused_mask
    )
    v_unpad = _unpadded(v, key_padding_mask, key_unused_mask)[0]
    leaf = lambda t: t.detach().requires_grad_()

    if qkvpacked:
        if nheads != nheads_k:
            raise ValueError(f"qkvpacked needs as many kv heads as heads, got {nheads_k} and {nheads}")
        same_masks = (query_padding_mask is None and key_padding_mask is None) or (
            query_padding_mask is not None
            and key_padding_mask is not None
            and bool((query_padding_mask == key_padding_mask).all())
        )
        if not same_masks:
            raise ValueError("qkvpacked needs query_padding_mask equal to key_padding_mask")
        qkv_unpad = torch.stack([q_unpad, k_unpad, v_unpad], dim=1)
        qkv = torch.stack([q, k, v], dim=2)
        return (leaf(qkv_unpad), cu_seqlens_q, max_seqlen_q, leaf(qkv), output_pad_fn, output_pad_fn)
    if kvpacked:
        kv_unpad = torch.stack([k_unpad, v_unpad], dim=1)
        kv = torch.stack([k, v], dim=2)
        return (
            leaf(q_unpad), leaf(kv_unpad), cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
            leaf(q), leaf(kv), output_pad_fn, output_pad_fn, dk_pad_fn,
        )
    return (
        leaf(q_unpad), leaf(k_unpad), leaf(v_unpad), None if qv is None else qv_unpad.detach(),
        cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k, max_seqlen_q, max_seqlen_k,
        leaf(q), leaf(k), leaf(v), None if qv is None else qv.detach(),
        output_pad_fn, output_pad_fn, dk_pad_fn,
    )


def _mask_coordinates(seqlen_q, seqlen_k, query_padding_mask, key_padding_mask, key_leftpad, device):
    """Row and column indices, and the per-batch query / key lengths, broadcastable to
    (batch, nheads, seqlen_q, seqlen_k). Columns before a row's key_leftpad get an index past
    every window, so every mask treats them as out of range."""
    row_idx = rearrange(torch.arange(seqlen_q, device=device, dtype=torch.long), "s -> s 1")
    col_idx = torch.arange(seqlen_k, device=device, dtype=torch.long)
    if key_leftpad is not None:
        key_leftpad = rearrange(key_leftpad, "b -> b 1 1 1")
        col_idx = repeat(col_idx, "s -> b 1 1 s", b=key_leftpad.shape[0])
        col_idx = torch.where(col_idx >= key_leftpad, col_idx - key_leftpad, 2**32)
    lengths = lambda mask, full: (
        torch.tensor(full, device=device) if mask is None else rearrange(mask.sum(-1), "b -> b 1 1 1")
    )
    return row_idx, col_idx, lengths(query_padding_mask, seqlen_q), lengths(key_padding_mask, seqlen_k)


def construct_local_mask(
    seqlen_q,
    seqlen_k,
    window_size=(None, None),
    sink_token_length=0,
    query_padding_mask=None,
    key_padding_mask=None,
    key_leftpad=None,
    device=None,
):
    """True where a query may NOT attend: keys right of the query's diagonal (aligned to the
    bottom-right corner) by more than window_size[1], or left of it by more than window_size[0]
    except the first sink_token_length keys. None in window_size means unbounded on that side;
    keys past a row's length are masked whenever the left side is bounded."""
    row_idx, col_idx, sq, sk = _mask_coordinates(
        seqlen_q, seqlen_k, query_padding_mask, key_padding_mask, key_leftpad, device
    )
    diagonal = row_idx + sk - sq
    left, right = window_size
    if left is None:
        if right is None:
            return torch.zeros_like(col_idx > diagonal)
        return col_idx > diagonal + right
    right_limit = sk if right is None else torch.minimum(diagonal + right, sk)
    too_far_left = (col_idx < diagonal - left) & (col_idx >= sink_token_length)
    return (col_idx > right_limit) | too_far_left


def construct_chunk_mask(
    seqlen_q,
    seqlen_k,
    attention_chunk,
    query_padding_mask=None,
    key_padding_mask=None,
    key_leftpad=None,
    device=None,
):
    """True where a query may NOT attend under chunked attention: keys outside the chunk of
    attention_chunk keys that holds the query's diagonal (aligned to the bottom-right)."""
    row_idx, col_idx, sq, sk = _mask_coordinates(
        seqlen_q, seqlen_k, query_padding_mask, key_padding_mask, key_leftpad, device
    )
    diagonal = row_idx + sk - sq
    # The remainder is a floor modulo, so a negative diagonal rounds down to its chunk's start.
    chunk_start = diagonal - diagonal % attention_chunk
    return (col_idx < chunk_start) | (col_idx >= chunk_start + attention_chunk)


def attention_ref(
    q,
    k,
    v,
    query_padding_mask=None,
    key_padding_mask=None,
    key_leftpad=None,
    attn_bias=None,
    dropout_p=0.0,
    dropout_mask=None,
    causal=False,
    qv=None,
    q_descale=None, k_descale=None, v_descale=None,
    window_size=(None, None),
    attention_chunk=0,
    sink_token_length=0,
    learnable_sink: Optional[torch.Tensor] = None,
    softcap=0.0,
    upcast=True,
    reorder_ops=False,
    intermediate_dtype=None,
):
    """Attention in PyTorch with the kernels' masking rules.

    Arguments:
        q: (batch_size, seqlen_q, nheads, head_dim)
        k: (batch_size, seqlen_k, nheads_k, head_dim), nheads a multiple of nheads_k
        v: (batch_size, seqlen_k, nheads_k, head_dim_v)
        qv: (batch_size, seqlen_q, nheads, head_dim_v), extra scores qv . v
        query_padding_mask: (batch_size, seqlen_q); key_padding_mask: (batch_size, seqlen_k)
        key_leftpad: (batch_size,) number of left-padding keys per sequence
        attn_bias: broadcastable to (batch_size, nheads, seqlen_q, seqlen_k), added after masking
        dropout_p: float; dropout_mask: (batch_size, nheads, seqlen_q, seqlen_k), True = kept
        causal: sets window_size[1] to 0
        q_descale, k_descale, v_descale: (batch_size, nheads_k) scales applied before the matmuls
        attention_chunk: > 0 restricts each query to its chunk of keys
        learnable_sink: (nheads,) logit of a virtual key that takes probability mass
        softcap: > 0 applies softcap * tanh(scores / softcap)
        upcast: compute in float32 and cast the results back to q's dtype
        reorder_ops: scale k instead of q (the same math, rounded differently)
        intermediate_dtype: rounds the probabilities through this dtype before the second matmul
    Output:
        output: (batch_size, seqlen_q, nheads, head_dim_v)
        attention: (batch_size, nheads, seqlen_q, seqlen_k), the softmax before dropout
    """
    if causal:
        window_size = (window_size[0], 0)
    dtype_og = q.dtype
    if upcast:
        q, k, v = q.float(), k.float(), v.float()
        qv = qv.float() if qv is not None else None
    if q_descale is not None:
        q_descale = repeat(q_descale, "b h -> b 1 (h g) 1", g=q.shape[2] // k.shape[2])
        q = (q.float() * q_descale).to(q.dtype)
        qv = (qv.float() * q_descale).to(qv.dtype) if qv is not None else None
    if k_descale is not None:
        k = (k.float() * rearrange(k_descale, "b h -> b 1 h 1")).to(dtype=k.dtype)
    if v_descale is not None:
        v = (v.float() * rearrange(v_descale, "b h -> b 1 h 1")).to(dtype=v.dtype)
    seqlen_q, seqlen_k = q.shape[1], k.shape[1]
    k = repeat(k, "b s h d -> b s (h g) d", g=q.shape[2] // k.shape[2])
    v = repeat(v, "b s h d -> b s (h g) d", g=q.shape[2] // v.shape[2])
    softmax_scale = 1.0 / math.sqrt(q.shape[-1] if qv is None else q.shape[-1] + v.shape[-1])
    if reorder_ops:
        scores = torch.einsum("bthd,bshd->bhts", q, k * softmax_scale)
    else:
        scores = torch.einsum("bthd,bshd->bhts", q * softmax_scale, k)
    if qv is not None:
        scores = scores + torch.einsum("bthd,bshd->bhts", qv * softmax_scale, v)
    if softcap > 0:
        scores = torch.tanh(scores / softcap) * softcap
    if key_padding_mask is not None:
        scores.masked_fill_(rearrange(~key_padding_mask, "b s -> b 1 1 s"), float("-inf"))
    mask_args = dict(
        query_padding_mask=query_padding_mask,
        key_padding_mask=key_padding_mask,
        key_leftpad=key_leftpad,
        device=q.device,
    )
    masked = None
    if window_size[0] is not None or window_size[1] is not None:
        masked = construct_local_mask(seqlen_q, seqlen_k, window_size, sink_token_length, **mask_args)
    if attention_chunk > 0:
        chunk_mask = construct_chunk_mask(seqlen_q, seqlen_k, attention_chunk, **mask_args)
        masked = chunk_mask if masked is None else masked | chunk_mask
    if masked is not None:
        scores.masked_fill_(masked, float("-inf"))
    if attn_bias is not None:
        scores = scores + attn_bias
    if learnable_sink is None:
        attention = torch.softmax(scores, dim=-1).to(v.dtype)
    else:
        # The sink is one more logit in the normalizer, with no value row.
        scores = scores.float()
        sink = rearrange(learnable_sink, "h -> h 1 1")
        row_max = torch.maximum(sink, torch.amax(scores, dim=-1, keepdim=True))
        unnormalized = torch.exp(scores - row_max)
        normalizer = unnormalized.sum(dim=-1, keepdim=True) + torch.exp(sink - row_max)
        attention = (unnormalized / normalizer).to(v.dtype)
    # Zeros instead of the NaNs of fully masked rows, and for padded queries and keys, so that
    # gradients through the reference stay finite.
    if query_padding_mask is not None:
        attention = attention.masked_fill(rearrange(~query_padding_mask, "b s -> b 1 s 1"), 0.0)
    if key_padding_mask is not None:
        attention = attention.masked_fill(rearrange(~key_padding_mask, "b s -> b 1 1 s"), 0.0)
    if masked is not None:
        attention = attention.masked_fill(torch.all(masked, dim=-1, keepdim=True), 0.0)
    attention_drop = attention if dropout_mask is None else attention.masked_fill(~dropout_mask, 0.0)
    if intermediate_dtype is not None:
        attention_drop = attention_drop.to(intermediate_dtype).to(attention_drop.dtype)
    output = torch.einsum("bhts,bshd->bthd", attention_drop, v * (1.0 / (1 - dropout_p)))
    if query_padding_mask is not None:
        output.masked_fill_(rearrange(~query_padding_mask, "b s -> b s 1 1"), 0.0)
    return output.to(dtype=dtype_og), attention.to(dtype=dtype_og)
