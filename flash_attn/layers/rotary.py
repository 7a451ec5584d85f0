"""Rotary position embeddings (RoFormer, https://arxiv.org/abs/2104.09864), with xPos scaling.

Same public API as flash-attn 2.8's flash_attn.layers.rotary. The rotation itself runs in the
Triton kernel of flash_attn.ops.triton.rotary; the gradient of a rotation is the rotation by the
opposite angle, so every backward reuses the forward kernel with conjugate=True.
"""

from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from flash_attn.ops.triton.rotary import apply_rotary


def rotate_half(x, interleaved=False):
    """Maps each pair (a, b) to (-b, a): pairs are (i, i + d/2), or (2i, 2i+1) when interleaved."""
    if interleaved:
        even, odd = x[..., 0::2], x[..., 1::2]
        return torch.stack((-odd, even), dim=-1).flatten(-2)
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rotary_emb_torch(x, cos, sin, interleaved=False):
    """Eager PyTorch rotary embedding.

    x: (batch, seqlen, nheads, headdim); cos, sin: (seqlen, rotary_dim / 2) or
    (batch, seqlen, rotary_dim / 2). Dims past rotary_dim pass through unchanged.
    """
    rotary_dim = 2 * cos.shape[-1]
    if rotary_dim > x.shape[-1]:
        raise ValueError(f"rotary_dim {rotary_dim} exceeds headdim {x.shape[-1]}")

    def per_dim(table):
        # One angle per pair, repeated onto both members of the pair, broadcast over heads.
        table = table.repeat_interleave(2, dim=-1) if interleaved else torch.cat((table, table), dim=-1)
        return table.unsqueeze(-2)

    rotated = x[..., :rotary_dim]
    rotated = rotated * per_dim(cos) + rotate_half(rotated, interleaved) * per_dim(sin)
    return torch.cat((rotated, x[..., rotary_dim:]), dim=-1)


def _save_offsets(ctx, seqlen_offsets, *tensors):
    # save_for_backward takes tensors only, so an int offset rides on ctx.
    if isinstance(seqlen_offsets, Tensor):
        ctx.save_for_backward(*tensors, seqlen_offsets)
        ctx.seqlen_offsets = None
    else:
        ctx.save_for_backward(*tensors)
        ctx.seqlen_offsets = seqlen_offsets


def _saved_with_offsets(ctx):
    saved = ctx.saved_tensors
    if ctx.seqlen_offsets is None:
        return saved[:-1], saved[-1]
    return saved, ctx.seqlen_offsets


def _private_copy(grad):
    # The incoming gradient may be the caller's tensor (out.backward(grad)) or have overlapping
    # memory (the stride-0 gradient of a sum), so the backward never rotates it in place.
    return grad.clone(memory_format=torch.contiguous_format)


class ApplyRotaryEmb(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        x,
        cos,
        sin,
        interleaved=False,
        inplace=False,
        seqlen_offsets: Union[int, Tensor] = 0,
        cu_seqlens: Optional[Tensor] = None,
        max_seqlen: Optional[int] = None,
    ):
        out = apply_rotary(
            x,
            cos,
            sin,
            seqlen_offsets=seqlen_offsets,
            cu_seqlens=cu_seqlens,
            max_seqlen=max_seqlen,
            interleaved=interleaved,
            inplace=inplace,
        )
        _save_offsets(ctx, seqlen_offsets, cos, sin, cu_seqlens)
        ctx.interleaved = interleaved
        ctx.max_seqlen = max_seqlen
        return out

    @staticmethod
    def backward(ctx, dout):
        (cos, sin, cu_seqlens), seqlen_offsets = _saved_with_offsets(ctx)
        dx = apply_rotary(
            dout,
            cos,
            sin,
            seqlen_offsets=seqlen_offsets,
            cu_seqlens=cu_seqlens,
            max_seqlen=ctx.max_seqlen,
            interleaved=ctx.interleaved,
            conjugate=True,
        )
        return dx, None, None, None, None, None, None, None


def apply_rotary_emb(
    x,
    cos,
    sin,
    interleaved=False,
    inplace=False,
    seqlen_offsets: Union[int, Tensor] = 0,
    cu_seqlens: Optional[Tensor] = None,
    max_seqlen: Optional[int] = None,
):
    """Applies rotary embedding to the first rotary_dim = 2 * cos.shape[-1] dims of x.

    x: (batch, seqlen, nheads, headdim), or (total_seqlen, nheads, headdim) with cu_seqlens.
    cos, sin: (seqlen_rotary, rotary_dim / 2).
    interleaved: rotate pairs of even and odd dims (GPT-J) instead of first and second half
        (GPT-NeoX).
    inplace: rotate x in place.
    seqlen_offsets: int or (batch,) tensor; sequence b starts at cos/sin row seqlen_offsets[b]
        (the cache length during decoding).
    cu_seqlens: (batch + 1,) int32 cumulative sequence lengths; max_seqlen: int.
    Returns a tensor shaped like x.
    """
    return ApplyRotaryEmb.apply(x, cos, sin, interleaved, inplace, seqlen_offsets, cu_seqlens, max_seqlen)


# Name kept by flash-attn for backward compatibility.
apply_rotary_emb_func = apply_rotary_emb


def _split_qk(qkv, num_heads_q):
    """Views of the query and key heads of a packed qkv: (b, s, 3, h, d) or (b, s, hq + 2 hk, d)."""
    if qkv.dim() == 5:
        if qkv.shape[2] != 3:
            raise ValueError(f"qkv must be (batch, seqlen, 3, nheads, headdim), got {tuple(qkv.shape)}")
        return qkv[:, :, 0], qkv[:, :, 1]
    if qkv.dim() != 4 or num_heads_q is None:
        raise ValueError("a 4-dim qkv (batch, seqlen, hq + 2 * hk, headdim) needs num_heads_q")
    num_heads_k = (qkv.shape[2] - num_heads_q) // 2
    if num_heads_q + 2 * num_heads_k != qkv.shape[2]:
        raise ValueError(f"qkv has {qkv.shape[2]} heads, not num_heads_q={num_heads_q} + 2 * num_heads_k")
    return qkv[:, :, :num_heads_q], qkv[:, :, num_heads_q : num_heads_q + num_heads_k]


def _joint_qk_view(qkv, num_heads_q):
    """Query and key heads as one (b, s, hq + hk, d) view, or None when the strides forbid it."""
    if qkv.dim() == 4:
        num_heads_k = (qkv.shape[2] - num_heads_q) // 2
        return qkv[:, :, : num_heads_q + num_heads_k]
    if qkv.stride(2) != qkv.shape[3] * qkv.stride(3):
        return None
    batch, seqlen, _, nheads, headdim = qkv.shape
    return qkv[:, :, :2].view(batch, seqlen, 2 * nheads, headdim)


def _rotate_qk_(qkv, cos, sin, cos_k, sin_k, interleaved, seqlen_offsets, num_heads_q, conjugate):
    q, k = _split_qk(qkv, num_heads_q)
    rotate = dict(interleaved=interleaved, inplace=True, conjugate=conjugate, seqlen_offsets=seqlen_offsets)
    joint = _joint_qk_view(qkv, num_heads_q) if cos_k is None and sin_k is None else None
    if joint is not None:
        # Q and K share cos/sin: one launch over both.
        apply_rotary(joint, cos, sin, **rotate)
    else:
        apply_rotary(q, cos, sin, **rotate)
        apply_rotary(k, cos if cos_k is None else cos_k, sin if sin_k is None else sin_k, **rotate)
    return qkv


class ApplyRotaryEmbQKV_(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        qkv,
        cos,
        sin,
        cos_k=None,
        sin_k=None,
        interleaved=False,
        seqlen_offsets: Union[int, Tensor] = 0,
        num_heads_q: Optional[int] = None,
    ):
        _rotate_qk_(qkv, cos, sin, cos_k, sin_k, interleaved, seqlen_offsets, num_heads_q, conjugate=False)
        _save_offsets(ctx, seqlen_offsets, cos, sin, cos_k, sin_k)
        ctx.interleaved = interleaved
        ctx.num_heads_q = num_heads_q
        return qkv

    @staticmethod
    def backward(ctx, dqkv):
        (cos, sin, cos_k, sin_k), seqlen_offsets = _saved_with_offsets(ctx)
        dqkv = _private_copy(dqkv)
        _rotate_qk_(dqkv, cos, sin, cos_k, sin_k, ctx.interleaved, seqlen_offsets, ctx.num_heads_q, conjugate=True)
        return dqkv, None, None, None, None, None, None, None


def apply_rotary_emb_qkv_(
    qkv,
    cos,
    sin,
    cos_k=None,
    sin_k=None,
    interleaved=False,
    seqlen_offsets: Union[int, Tensor] = 0,
    num_heads_q: Optional[int] = None,
):
    """Applies rotary embedding in place to the query and key heads of a packed qkv.

    qkv: (batch, seqlen, 3, nheads, headdim), or (batch, seqlen, hq + 2 * hk, headdim) for
        MQA/GQA, then with num_heads_q = hq.
    cos, sin: (seqlen, rotary_dim / 2) for Q, and for K unless cos_k, sin_k are given (xPos).
    seqlen_offsets: int or (batch,) tensor.
    Returns qkv.
    """
    return ApplyRotaryEmbQKV_.apply(qkv, cos, sin, cos_k, sin_k, interleaved, seqlen_offsets, num_heads_q)


class ApplyRotaryEmbKV_(torch.autograd.Function):
    @staticmethod
    def forward(ctx, kv, cos, sin, interleaved=False, seqlen_offsets: Union[int, Tensor] = 0):
        if kv.dim() != 5 or kv.shape[2] != 2:
            raise ValueError(f"kv must be (batch, seqlen, 2, nheads, headdim), got {tuple(kv.shape)}")
        apply_rotary(kv[:, :, 0], cos, sin, seqlen_offsets=seqlen_offsets, interleaved=interleaved, inplace=True)
        _save_offsets(ctx, seqlen_offsets, cos, sin)
        ctx.interleaved = interleaved
        return kv

    @staticmethod
    def backward(ctx, dkv):
        (cos, sin), seqlen_offsets = _saved_with_offsets(ctx)
        dkv = _private_copy(dkv)
        apply_rotary(
            dkv[:, :, 0],
            cos,
            sin,
            seqlen_offsets=seqlen_offsets,
            interleaved=ctx.interleaved,
            inplace=True,
            conjugate=True,
        )
        return dkv, None, None, None, None


def apply_rotary_emb_kv_(kv, cos, sin, interleaved=False, seqlen_offsets: Union[int, Tensor] = 0):
    """Applies rotary embedding in place to the keys of a packed kv (batch, seqlen, 2, nheads,
    headdim); the values are untouched. Returns kv."""
    return ApplyRotaryEmbKV_.apply(kv, cos, sin, interleaved, seqlen_offsets)


class RotaryEmbedding(torch.nn.Module):
    """Rotary position embedding applied in place to packed qkv (or to q and packed kv).

    interleaved: rotate pairs of even and odd dims (GPT-J) instead of first and second half
        (GPT-NeoX).
    scale_base: if set, xPos (Sun et al., https://arxiv.org/abs/2212.10554): queries are scaled
        by scale ** (position / scale_base) and keys by its inverse; 512 is a common value.
    """

    def __init__(self, dim: int, base=10000.0, interleaved=False, scale_base=None, device=None):
        super().__init__()
        self.dim = dim
        self.base = float(base)
        self.interleaved = interleaved
        self.scale_base = scale_base
        self.register_buffer("inv_freq", self._compute_inv_freq(device), persistent=False)
        scale = None
        if scale_base is not None:
            scale = (torch.arange(0, dim, 2, device=device, dtype=torch.float32) + 0.4 * dim) / (1.4 * dim)
        self.register_buffer("scale", scale, persistent=False)
        self._seq_len_cached = 0
        self._cos_cached = None
        self._sin_cached = None
        self._cos_k_cached = None
        self._sin_k_cached = None

    def _compute_inv_freq(self, device=None):
        exponents = torch.arange(0, self.dim, 2, device=device, dtype=torch.float32) / self.dim
        return 1.0 / (self.base**exponents)

    def _update_cos_sin_cache(self, seqlen, device=None, dtype=None):
        cache = self._cos_cached
        stale = (
            cache is None
            or seqlen > self._seq_len_cached
            or cache.device != device
            or cache.dtype != dtype
            # Inference-mode tensors cannot be saved for backward once training resumes.
            or (self.training and cache.is_inference())
        )
        if not stale:
            return
        self._seq_len_cached = seqlen
        # Angles are computed in float32 whatever the model dtype: position * inv_freq reaches
        # thousands of radians, where bf16 would be off by whole turns.
        positions = torch.arange(seqlen, device=device, dtype=torch.float32)
        inv_freq = self.inv_freq if self.inv_freq.dtype == torch.float32 else self._compute_inv_freq(device)
        angles = torch.outer(positions, inv_freq.to(device))
        cos, sin = torch.cos(angles), torch.sin(angles)
        if self.scale is None:
            self._cos_cached = cos.to(dtype)
            self._sin_cached = sin.to(dtype)
            return
        power = (torch.arange(seqlen, dtype=self.scale.dtype, device=self.scale.device) - seqlen // 2) / self.scale_base
        scale = (self.scale.to(device=power.device) ** power[:, None]).to(device)
        self._cos_cached = (cos * scale).to(dtype)
        self._sin_cached = (sin * scale).to(dtype)
        self._cos_k_cached = (cos / scale).to(dtype)
        self._sin_k_cached = (sin / scale).to(dtype)

    def forward(
        self,
        qkv: Tensor,
        kv: Optional[Tensor] = None,
        seqlen_offset: Union[int, Tensor] = 0,
        max_seqlen: Optional[int] = None,
        num_heads_q: Optional[int] = None,
    ) -> Union[Tensor, Tuple[Tensor, Tensor]]:
        """Rotates in place and returns qkv, or (q, kv) when kv is given.

        qkv: (batch, seqlen, 3, nheads, headdim) or (batch, seqlen, hq + 2 * hk, headdim) with
            num_heads_q; when kv is given, qkv is just q (batch, seqlen, nheads, headdim).
        kv: (batch, seqlen, 2, nheads, headdim).
        seqlen_offset: int or (batch,) tensor of per-sequence start positions. With a tensor,
            pass max_seqlen so the cos/sin cache covers every position.
        """
        seqlen = qkv.shape[1]
        if max_seqlen is not None:
            self._update_cos_sin_cache(max_seqlen, device=qkv.device, dtype=qkv.dtype)
        elif isinstance(seqlen_offset, int):
            self._update_cos_sin_cache(seqlen + seqlen_offset, device=qkv.device, dtype=qkv.dtype)
        xpos = self.scale is not None
        if kv is None:
            return apply_rotary_emb_qkv_(
                qkv,
                self._cos_cached,
                self._sin_cached,
                self._cos_k_cached if xpos else None,
                self._sin_k_cached if xpos else None,
                interleaved=self.interleaved,
                seqlen_offsets=seqlen_offset,
                num_heads_q=num_heads_q,
            )
        q = apply_rotary_emb_func(
            qkv,
            self._cos_cached,
            self._sin_cached,
            interleaved=self.interleaved,
            inplace=True,
            seqlen_offsets=seqlen_offset,
        )
        kv = apply_rotary_emb_kv_(
            kv,
            self._cos_k_cached if xpos else self._cos_cached,
            self._sin_k_cached if xpos else self._sin_cached,
            interleaved=self.interleaved,
            seqlen_offsets=seqlen_offset,
        )
        return q, kv
