"""Multi-head attention layers with the API of flash-attn 2.8.3's flash_attn.modules.mha.

FlashSelfAttention / FlashCrossAttention wrap the FlashAttention kernels (fp16/bf16, padded or
varlen, causal, sliding window, ALiBi, dropout); SelfAttention / CrossAttention compute the same
attention in PyTorch (any dtype, any device, key_padding_mask). MHA adds the projections, GQA/MQA,
cross-attention, rotary embeddings and kv-cache decoding with InferenceParams. ParallelMHA is the
self-attention of MHA with its heads split over a process group (tensor parallelism) through the
ColumnParallelLinear / RowParallelLinear layers of flash_attn.ops.fused_dense.

Where this module differs from upstream's:
  * bad arguments raise ValueError / TypeError naming the argument instead of a bare assert
    (ParallelMHA with process_group=None included);
  * the Triton rotary layer is imported when an MHA asks for rotary_emb_dim > 0, so importing
    this module needs neither triton nor a GPU;
  * ParallelMHA splits its heads over the ranks in whole kv groups (a kv head and its query
    heads), so Wqkv, out_proj, the head counts and the ALiBi slopes agree when the kv heads do
    not divide evenly over the ranks (upstream then splits the query heads separately, which
    disagrees with its own Wqkv); for an even split the layouts are upstream's;
  * decoding through flash_attn_with_kvcache keeps the layer's window_size (upstream drops it
    and so decodes a local-attention model with full attention), and xPos rotary decodes through
    the unfused rotary path instead of failing an assert;
  * dwconv also works where q and kv are projected separately (GQA, cross_attn);
  * the ALiBi slopes are handed to the kernels in float32 without rewriting the buffer.
"""

import math
import operator
from functools import partial

import torch
import torch.distributed as dist
import torch.nn as nn
from einops import rearrange
from torch.utils.checkpoint import checkpoint

from flash_attn.flash_attn_interface import (
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_varlen_qkvpacked_func,
    flash_attn_with_kvcache,
)
from flash_attn.ops.fused_dense import ColumnParallelLinear, RowParallelLinear
from flash_attn.utils.distributed import get_dim_for_local_rank

__all__ = [
    "get_alibi_slopes",
    "FlashSelfAttention",
    "FlashCrossAttention",
    "SelfAttention",
    "CrossAttention",
    "MHA",
    "ParallelMHA",
]


def get_alibi_slopes(nheads):
    """ALiBi slopes (Press et al., https://arxiv.org/abs/2108.12409) as a list of nheads floats.

    For a power of two n they are the geometric sequence r, r^2, ..., r^n with r = 2^(-8/n). For
    other n: the n' slopes of the largest power of two n' < n, then every other slope of 2n'
    (the ones that fall between them) until there are n.
    """
    nheads = operator.index(nheads)  # TypeError for anything but an integer
    if nheads < 1:
        raise ValueError(f"nheads must be positive, got {nheads}")

    def geometric(n):
        ratio = 2.0 ** (-8.0 / n)
        return [ratio * ratio**i for i in range(n)]

    if nheads & (nheads - 1) == 0:
        return geometric(nheads)
    lower = 1 << (nheads.bit_length() - 1)
    return geometric(lower) + geometric(2 * lower)[0::2][: nheads - lower]


# Added to (or written over) the scores of masked keys by the PyTorch attention. It is finite, so
# a query row whose keys are all masked gets finite weights instead of NaN, as in upstream.
_MASKED_SCORE = -10000.0


def _check_flash_dtype(name, tensor):
    if tensor.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(
            f"{name} must be float16 or bfloat16 for FlashAttention, got {tensor.dtype}"
        )


def _check_varlen_args(cu_name, cu_seqlens, max_name, max_seqlen):
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype != torch.int32:
        got = getattr(cu_seqlens, "dtype", type(cu_seqlens).__name__)
        raise ValueError(f"{cu_name} must be a torch.int32 tensor of cumulative lengths, got {got}")
    if not isinstance(max_seqlen, int):
        raise TypeError(f"{max_name} must be an int when {cu_name} is given, got {max_seqlen!r}")


def _kernel_alibi(slopes):
    # model.half() turns the buffer into fp16; the kernels take float32 slopes.
    return None if slopes is None else slopes.float()


def _scaled_scores(q, k, softmax_scale):
    """(batch, nheads, seqlen_q, seqlen_k) scores in the inputs' dtype; k is scaled before the
    product, which keeps fp16 scores in range for large head dims."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else softmax_scale
    return torch.einsum("bqhd,bkhd->bhqk", q, k * scale)


def _key_padding_bias(key_padding_mask, scores):
    batch, seqlen_k = scores.shape[0], scores.shape[-1]
    if key_padding_mask.shape != (batch, seqlen_k) or key_padding_mask.dtype != torch.bool:
        raise ValueError(
            f"key_padding_mask must be a bool tensor of shape (batch, seqlen_k) = "
            f"{(batch, seqlen_k)} (True = keep), got {key_padding_mask.dtype} "
            f"{tuple(key_padding_mask.shape)}"
        )
    bias = torch.zeros(batch, seqlen_k, dtype=scores.dtype, device=scores.device)
    bias.masked_fill_(~key_padding_mask, _MASKED_SCORE)
    return bias[:, None, None, :]


def _attend(scores, v, dropout):
    """Softmax over keys (in v's dtype, as PyTorch would run it), dropout, weighted sum of v."""
    weights = dropout(torch.softmax(scores, dim=-1, dtype=v.dtype))
    return torch.einsum("bhqk,bkhd->bqhd", weights, v)


class FlashSelfAttention(nn.Module):
    """Softmax attention over packed qkv with the FlashAttention kernels (fp16 / bf16, CUDA).

    causal: default for forward's causal argument.
    softmax_scale: scale of q k^T before the softmax (default 1 / sqrt(head_dim)).
    attention_dropout: dropout probability on the attention weights, applied in training mode.
    window_size: (left, right) sliding window, -1 for unbounded.
    alibi_slopes: optional (nheads,) or (batch, nheads) ALiBi slopes, kept as a buffer.
    deterministic: deterministic backward (slower; no atomic adds in dq).
    """

    def __init__(
        self,
        causal=False,
        softmax_scale=None,
        attention_dropout=0.0,
        window_size=(-1, -1),
        alibi_slopes=None,
        deterministic=False,
    ):
        super().__init__()
        self.causal = causal
        self.softmax_scale = softmax_scale
        self.drop = nn.Dropout(attention_dropout)
        self.register_buffer("alibi_slopes", alibi_slopes, persistent=False)
        self.window_size = window_size
        self.deterministic = deterministic

    def forward(self, qkv, causal=None, cu_seqlens=None, max_seqlen=None):
        """qkv: (batch, seqlen, 3, nheads, head_dim), or (total, 3, nheads, head_dim) with
        cu_seqlens ((batch + 1,) int32 cumulative lengths) and max_seqlen (int).
        causal: overrides self.causal when given.
        Returns (batch, seqlen, nheads, head_dim), or (total, nheads, head_dim) with cu_seqlens.
        """
        _check_flash_dtype("qkv", qkv)
        options = dict(
            softmax_scale=self.softmax_scale,
            causal=self.causal if causal is None else causal,
            alibi_slopes=_kernel_alibi(self.alibi_slopes),
            window_size=self.window_size,
            deterministic=self.deterministic,
        )
        dropout_p = self.drop.p if self.training else 0.0
        if cu_seqlens is None:
            return flash_attn_qkvpacked_func(qkv, dropout_p, **options)
        _check_varlen_args("cu_seqlens", cu_seqlens, "max_seqlen", max_seqlen)
        return flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p, **options)


class FlashCrossAttention(nn.Module):
    """Softmax attention of q over packed kv with the FlashAttention kernels (fp16 / bf16, CUDA).
    kv may have fewer heads than q (MQA / GQA). Arguments as FlashSelfAttention's (note that
    alibi_slopes comes before window_size here, as upstream)."""

    def __init__(
        self,
        causal=False,
        softmax_scale=None,
        attention_dropout=0.0,
        alibi_slopes=None,
        window_size=(-1, -1),
        deterministic=False,
    ):
        super().__init__()
        self.causal = causal
        self.softmax_scale = softmax_scale
        self.drop = nn.Dropout(attention_dropout)
        self.register_buffer("alibi_slopes", alibi_slopes, persistent=False)
        self.window_size = window_size
        self.deterministic = deterministic

    def forward(
        self,
        q,
        kv,
        causal=None,
        cu_seqlens=None,
        max_seqlen=None,
        cu_seqlens_k=None,
        max_seqlen_k=None,
    ):
        """q: (batch, seqlen_q, nheads, head_dim); kv: (batch, seqlen_k, 2, nheads_kv, head_dim).
        Varlen: q (total_q, nheads, head_dim), kv (total_k, 2, nheads_kv, head_dim), with
        cu_seqlens / max_seqlen for q and cu_seqlens_k / max_seqlen_k for kv (all four needed).
        causal: overrides self.causal when given; the mask is aligned to the bottom-right corner.
        Returns q's shape.
        """
        _check_flash_dtype("q", q)
        _check_flash_dtype("kv", kv)
        options = dict(
            softmax_scale=self.softmax_scale,
            causal=self.causal if causal is None else causal,
            alibi_slopes=_kernel_alibi(self.alibi_slopes),
            window_size=self.window_size,
            deterministic=self.deterministic,
        )
        dropout_p = self.drop.p if self.training else 0.0
        if cu_seqlens is None:
            if kv.dim() != 5 or kv.shape[0] != q.shape[0] or kv.shape[4] != q.shape[3]:
                raise ValueError(
                    f"kv {tuple(kv.shape)} must be (batch, seqlen_k, 2, nheads_kv, head_dim) with "
                    f"q's batch size and head dim, q is {tuple(q.shape)}"
                )
            return flash_attn_kvpacked_func(q, kv, dropout_p, **options)
        _check_varlen_args("cu_seqlens", cu_seqlens, "max_seqlen", max_seqlen)
        if cu_seqlens_k is None:
            raise ValueError("cu_seqlens_k (and max_seqlen_k) must be given with cu_seqlens")
        _check_varlen_args("cu_seqlens_k", cu_seqlens_k, "max_seqlen_k", max_seqlen_k)
        return flash_attn_varlen_kvpacked_func(
            q, kv, cu_seqlens, cu_seqlens_k, max_seqlen, max_seqlen_k, dropout_p, **options
        )


class SelfAttention(nn.Module):
    """Softmax attention over packed qkv in plain PyTorch (any dtype and device).

    causal: default for forward's causal argument.
    softmax_scale: scale of q k^T before the softmax (default 1 / sqrt(head_dim)).
    attention_dropout: dropout probability on the attention weights, applied in training mode.
    """

    def __init__(self, causal=False, softmax_scale=None, attention_dropout=0.0):
        super().__init__()
        self.causal = causal
        self.softmax_scale = softmax_scale
        self.drop = nn.Dropout(attention_dropout)

    def forward(self, qkv, causal=None, key_padding_mask=None):
        """qkv: (batch, seqlen, 3, nheads, head_dim).
        causal: overrides self.causal when given.
        key_padding_mask: optional bool (batch, seqlen), True for keys to keep.
        Returns (batch, seqlen, nheads, head_dim).
        """
        if qkv.dim() != 5 or qkv.shape[2] != 3:
            raise ValueError(
                f"qkv must be (batch, seqlen, 3, nheads, head_dim), got {tuple(qkv.shape)}"
            )
        q, k, v = qkv.unbind(dim=2)
        scores = _scaled_scores(q, k, self.softmax_scale)
        if key_padding_mask is not None:
            scores = scores + _key_padding_bias(key_padding_mask, scores)
        if self.causal if causal is None else causal:
            seqlen = qkv.shape[1]
            future = torch.ones(seqlen, seqlen, dtype=torch.bool, device=scores.device).triu(1)
            causal_bias = torch.zeros(seqlen, seqlen, dtype=scores.dtype, device=scores.device)
            scores = scores + causal_bias.masked_fill_(future, _MASKED_SCORE)
        return _attend(scores, v, self.drop)


class CrossAttention(nn.Module):
    """Softmax attention of q over packed kv in plain PyTorch (any dtype and device); kv may have
    fewer heads than q (MQA / GQA). Arguments as SelfAttention's."""

    def __init__(self, causal=False, softmax_scale=None, attention_dropout=0.0):
        super().__init__()
        self.causal = causal
        self.softmax_scale = softmax_scale
        self.drop = nn.Dropout(attention_dropout)

    def forward(self, q, kv, causal=None, key_padding_mask=None):
        """q: (batch, seqlen_q, nheads, head_dim); kv: (batch, seqlen_k, 2, nheads_kv, head_dim).
        causal: overrides self.causal when given. Query i sees the keys up to i + (L - seqlen_q),
            L being seqlen_k, or the number of kept keys of its sequence when key_padding_mask
            is given: the queries are the last positions of a right-padded key sequence.
        key_padding_mask: optional bool (batch, seqlen_k), True for keys to keep.
        Returns (batch, seqlen_q, nheads, head_dim).
        """
        if q.dim() != 4:
            raise ValueError(f"q must be (batch, seqlen_q, nheads, head_dim), got {tuple(q.shape)}")
        if kv.dim() != 5 or kv.shape[2] != 2:
            raise ValueError(
                f"kv must be (batch, seqlen_k, 2, nheads_kv, head_dim), got {tuple(kv.shape)}"
            )
        batch, seqlen_q, nheads, head_dim = q.shape
        if kv.shape[0] != batch or kv.shape[4] != head_dim:
            raise ValueError(
                f"kv {tuple(kv.shape)} must have q's batch size and head dim, q is {tuple(q.shape)}"
            )
        nheads_kv = kv.shape[3]
        if nheads % nheads_kv != 0:
            raise ValueError(f"q's {nheads} heads are not a multiple of kv's {nheads_kv}")
        if nheads_kv != nheads:
            # Query head h reads kv head h // (nheads / nheads_kv), as the kernels do.
            kv = kv.repeat_interleave(nheads // nheads_kv, dim=3)
        k, v = kv.unbind(dim=2)
        scores = _scaled_scores(q, k, self.softmax_scale)
        if key_padding_mask is not None:
            scores = scores + _key_padding_bias(key_padding_mask, scores)
        if self.causal if causal is None else causal:
            seqlen_k = kv.shape[1]
            rows = torch.arange(seqlen_q, device=q.device)[:, None]
            cols = torch.arange(seqlen_k, device=q.device)
            if key_padding_mask is None:
                future = cols > rows + (seqlen_k - seqlen_q)
            else:
                kept = key_padding_mask.sum(-1)[:, None, None, None]
                future = cols > rows + kept - seqlen_q
            scores = scores.masked_fill(future, _MASKED_SCORE)
        return _attend(scores, v, self.drop)


def _update_kv_cache(kv, inference_params, layer_idx):
    """Writes kv (batch, seqlen, 2, nheads_kv, head_dim) into layer layer_idx's cache at rows
    batch_size_offset.. and positions seqlen_offset.., allocating the cache
    (max_batch_size, max_seqlen, 2, nheads_kv, head_dim) on first use. Returns the cache's
    batch rows up to the last position written."""
    caches = inference_params.key_value_memory_dict
    if layer_idx not in caches:
        caches[layer_idx] = torch.empty(
            inference_params.max_batch_size,
            inference_params.max_seqlen,
            2,
            *kv.shape[-2:],
            dtype=kv.dtype,
            device=kv.device,
        )
    cache = caches[layer_idx]
    first = inference_params.batch_size_offset
    rows = slice(first, first + kv.shape[0])
    start = inference_params.seqlen_offset
    end = start + kv.shape[1]
    if rows.stop > cache.shape[0] or end > cache.shape[1]:
        raise ValueError(
            f"the kv cache of layer {layer_idx} holds {cache.shape[0]} sequences of "
            f"{cache.shape[1]} positions; writing batch rows up to {rows.stop} and positions up to "
            f"{end} overflows it (raise InferenceParams.max_batch_size / max_seqlen)"
        )
    cache[rows, start:end] = kv
    return cache[rows, :end]


def _causal_depthwise_conv(conv, x):
    """conv: a Conv1d with kernel 3 and padding 2 on both sides; x: (batch, seqlen, channels).
    The last two outputs are dropped, so output t depends on inputs t-2..t only."""
    y = conv(rearrange(x, "b s c -> b c s"))[..., :-2]
    return rearrange(y, "b c s -> b s c").contiguous()


def _rotary_embedding_cls():
    try:
        from flash_attn.layers.rotary import RotaryEmbedding
    except ImportError as e:
        raise ImportError(
            "MHA with rotary_emb_dim > 0 needs flash_attn.layers.rotary, which runs Triton "
            f"kernels and could not be imported ({e}); install triton, or pass rotary_emb_dim=0"
        ) from e
    return RotaryEmbedding


def _check_head_counts(embed_dim, num_heads, num_heads_kv):
    if embed_dim % num_heads != 0:
        raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
    if num_heads % num_heads_kv != 0:
        raise ValueError(f"num_heads ({num_heads}) must be divisible by num_heads_kv ({num_heads_kv})")


def _check_flash_only_options(use_alibi, window_size, use_flash_attn):
    if use_alibi and not use_flash_attn:
        raise ValueError("use_alibi=True needs use_flash_attn=True (SelfAttention has no ALiBi)")
    if tuple(window_size) != (-1, -1) and not use_flash_attn:
        raise ValueError(
            f"window_size={window_size} (local attention) needs use_flash_attn=True "
            "(SelfAttention has no sliding window)"
        )


class _AttentionLayer(nn.Module):
    """What MHA and ParallelMHA share: the inner attention modules and rotary embedding, the kv
    cache and decoding, and the attention between the input and output projections.

    Subclasses set head_dim, layer_idx, rotary_emb_dim, use_flash_attn, checkpointing and out_proj
    (whose weight gives the cache's device and dtype), call _build_attention, and name the kv
    heads the module holds in _local_num_heads_kv.
    """

    dwconv = False  # MHA's depthwise convolution, which ParallelMHA does not have

    def _build_attention(
        self,
        *,
        causal,
        softmax_scale,
        dropout,
        use_flash_attn,
        alibi_slopes,
        window_size,
        rotary_emb_dim,
        rotary_emb_base,
        rotary_emb_scale_base,
        rotary_emb_interleaved,
        device,
    ):
        """Builds rotary_emb (when rotary_emb_dim > 0), inner_attn and inner_cross_attn;
        alibi_slopes: a list of one slope per head this module holds, or None."""
        if rotary_emb_dim > 0:
            self.rotary_emb = _rotary_embedding_cls()(
                rotary_emb_dim,
                base=rotary_emb_base,
                scale_base=rotary_emb_scale_base,
                interleaved=rotary_emb_interleaved,
                device=device,
            )
        if use_flash_attn:
            if alibi_slopes is not None:
                alibi_slopes = torch.tensor(alibi_slopes, device=device)
            flash_options = dict(alibi_slopes=alibi_slopes, window_size=window_size)
            attn_cls = partial(FlashSelfAttention, **flash_options)
            cross_attn_cls = partial(FlashCrossAttention, **flash_options)
        else:
            attn_cls, cross_attn_cls = SelfAttention, CrossAttention
        attn_options = dict(causal=causal, softmax_scale=softmax_scale, attention_dropout=dropout)
        self.inner_attn = attn_cls(**attn_options)
        self.inner_cross_attn = cross_attn_cls(**attn_options)

    @property
    def _local_num_heads_kv(self):
        return self.num_heads_kv

    def allocate_inference_cache(self, batch_size, max_seqlen, dtype=None):
        """An uninitialized (batch_size, max_seqlen, 2, nheads_kv, head_dim) kv cache (nheads_kv: the
        kv heads this module holds) on the
        parameters' device (dtype: default the parameters'), to be stored as
        inference_params.key_value_memory_dict[layer_idx]."""
        weight = self.out_proj.weight
        return torch.empty(
            batch_size,
            max_seqlen,
            2,
            self._local_num_heads_kv,
            self.head_dim,
            dtype=weight.dtype if dtype is None else dtype,
            device=weight.device,
        )

    def _check_decodable(self):
        if self.dwconv:
            raise ValueError("decoding with inference_params is not supported with dwconv=True")
        if self.layer_idx is None:
            raise ValueError(
                "decoding with inference_params needs layer_idx in the MHA constructor"
            )

    def _update_kv_cache(self, kv, inference_params):
        """kv: (batch, seqlen, 2, nheads_kv, head_dim); see _update_kv_cache at module level."""
        self._check_decodable()
        return _update_kv_cache(kv, inference_params, self.layer_idx)

    def _flash_decode(self, q, kv, inference_params, rotary_cos=None, rotary_sin=None):
        """Appends kv to this layer's cache and attends q to the cache, in one
        flash_attn_with_kvcache call (which also rotates q and the new k when given cos / sin)."""
        self._check_decodable()
        if self.layer_idx not in inference_params.key_value_memory_dict:
            raise ValueError(
                "inference_params.key_value_memory_dict has no cache for "
                f"layer_idx={self.layer_idx}: run the prompt with seqlen_offset=0 first, or store "
                "allocate_inference_cache(...) there"
            )
        batch = q.shape[0]
        cache = inference_params.key_value_memory_dict[self.layer_idx][:batch]
        lengths = inference_params.lengths_per_sample
        cache_seqlens = lengths[:batch] if lengths is not None else inference_params.seqlen_offset
        attn = self.inner_cross_attn
        return flash_attn_with_kvcache(
            q,
            cache[:, :, 0],
            cache[:, :, 1],
            kv[:, :, 0],
            kv[:, :, 1],
            rotary_cos=rotary_cos,
            rotary_sin=rotary_sin,
            cache_seqlens=cache_seqlens,
            softmax_scale=attn.softmax_scale,
            causal=attn.causal,
            window_size=attn.window_size,
            rotary_interleaved=self.rotary_emb.interleaved if rotary_cos is not None else False,
            alibi_slopes=_kernel_alibi(attn.alibi_slopes),
        )

    def _apply_rotary_update_kvcache_attention(self, q, kv, inference_params):
        """Decoding step (seqlen_offset > 0, use_flash_attn) with rotary done by the kv-cache
        kernel: q (batch, seqlen_q, nheads, head_dim) and kv (batch, seqlen_q, 2, nheads_kv,
        head_dim) are not rotated yet."""
        offset = 0 if inference_params is None else inference_params.seqlen_offset
        if not self.use_flash_attn or offset == 0:
            raise ValueError(
                "the fused rotary decoding step needs use_flash_attn and seqlen_offset > 0"
            )
        if self.rotary_emb_dim == 0:
            return self._flash_decode(q, kv, inference_params)
        if self.rotary_emb.scale is not None:
            raise ValueError("the kv-cache kernel's rotary has no xPos (rotary_emb_scale_base)")
        rotary = self.rotary_emb
        rotary._update_cos_sin_cache(inference_params.max_seqlen, device=q.device, dtype=q.dtype)
        return self._flash_decode(q, kv, inference_params, rotary._cos_cached, rotary._sin_cached)

    def _update_kvcache_attention(self, q, kv, inference_params):
        """Writes kv (already rotated) into the cache and attends q to everything cached."""
        if inference_params.seqlen_offset == 0 or not self.use_flash_attn:
            # The prompt step (or PyTorch attention): the cache is written at seqlen_offset for the
            # whole batch; lengths_per_sample is not consulted.
            kv = self._update_kv_cache(kv, inference_params)
            return self.inner_cross_attn(q, kv)
        return self._flash_decode(q, kv, inference_params)

    def _fused_rotary_decode(self, inference_params):
        # The kv-cache kernel rotates q and k itself when rotary_dim is a multiple of 16 and
        # there is no xPos scaling; other decoding steps rotate with self.rotary_emb first.
        return (
            inference_params is not None
            and inference_params.seqlen_offset > 0
            and self.use_flash_attn
            and self.rotary_emb_dim > 0
            and self.rotary_emb_dim % 16 == 0
            and self.rotary_emb.scale is None
        )

    def _attention(self, module, *inputs, **kwargs):
        if self.checkpointing:
            return checkpoint(module, *inputs, use_reentrant=False, **kwargs)
        return module(*inputs, **kwargs)

    def _attend_heads(self, q_or_qkv, kv, inference_params, inner_kwargs):
        """Attention of the projected heads: q_or_qkv is packed qkv (..., 3, nheads, head_dim) when
        kv is None, else q (..., nheads, head_dim) with kv (..., 2, nheads_kv, head_dim). Applies
        the rotary embedding, writes and reads the kv cache when decoding with inference_params,
        and passes inner_kwargs to the inner attention. Returns (..., nheads, head_dim)."""
        packed = kv is None

        if self._fused_rotary_decode(inference_params):
            q, kv = (q_or_qkv[:, :, 0], q_or_qkv[:, :, 1:]) if packed else (q_or_qkv, kv)
            context = self._apply_rotary_update_kvcache_attention(q, kv, inference_params)
        else:
            if self.rotary_emb_dim > 0:
                if inference_params is None:
                    offset, rotary_max_seqlen = 0, None
                else:
                    lengths = inference_params.lengths_per_sample
                    offset = lengths if lengths is not None else inference_params.seqlen_offset
                    rotary_max_seqlen = inference_params.max_seqlen
                rotary_options = dict(seqlen_offset=offset, max_seqlen=rotary_max_seqlen)
                if packed:
                    q_or_qkv = self.rotary_emb(q_or_qkv, **rotary_options)
                else:
                    q_or_qkv, kv = self.rotary_emb(q_or_qkv, kv, **rotary_options)
            if inference_params is not None:
                q, kv = (q_or_qkv[:, :, 0], q_or_qkv[:, :, 1:]) if packed else (q_or_qkv, kv)
                context = self._update_kvcache_attention(q, kv, inference_params)
            elif packed:
                context = self._attention(self.inner_attn, q_or_qkv, **inner_kwargs)
            else:
                context = self._attention(self.inner_cross_attn, q_or_qkv, kv, **inner_kwargs)
        return context


class MHA(_AttentionLayer):
    """Multi-head self-attention or cross-attention with input and output projections.

    embed_dim, num_heads: model width and number of query heads (head_dim = embed_dim / num_heads).
    num_heads_kv: key/value heads for MQA / GQA (default num_heads); must divide num_heads.
    cross_attn: q is projected from x (Wq), k and v from x_kv (Wkv); otherwise one Wqkv.
    qkv_proj_bias, out_proj_bias: biases of the input and output projections.
    dropout: attention dropout probability.
    softmax_scale: default 1 / sqrt(head_dim).
    causal: causal attention.
    layer_idx: key of this layer's cache in InferenceParams.key_value_memory_dict (needed for
        decoding).
    dwconv: causal depthwise convolution (kernel 3) over the sequence after the projections.
    rotary_emb_dim, rotary_emb_base, rotary_emb_scale_base, rotary_emb_interleaved: rotary
        embedding of the first rotary_emb_dim dims of q and k (0 = none; scale_base enables xPos).
    use_alibi: ALiBi biases (get_alibi_slopes(num_heads)); needs use_flash_attn.
    window_size: (left, right) local attention, -1 for unbounded; needs use_flash_attn.
    fused_bias_fc: accepted for compatibility and without effect: upstream 2.8.3's MHA also
        builds plain nn.Linear projections whatever its value.
    use_flash_attn: FlashSelfAttention / FlashCrossAttention (fp16 / bf16, CUDA) inside instead of
        SelfAttention / CrossAttention.
    return_residual: forward returns (out, x), for callers that add the residual themselves.
    checkpointing: recompute the attention in the backward instead of storing it.
    device, dtype: of the parameters.
    """

    def __init__(
        self,
        embed_dim,
        num_heads,
        num_heads_kv=None,
        cross_attn=False,
        qkv_proj_bias=True,
        out_proj_bias=True,
        dropout=0.0,
        softmax_scale=None,
        causal=False,
        layer_idx=None,
        dwconv=False,
        rotary_emb_dim=0,
        rotary_emb_base=10000.0,
        rotary_emb_scale_base=None,
        rotary_emb_interleaved=False,
        use_alibi=False,
        window_size=(-1, -1),
        fused_bias_fc=False,
        use_flash_attn=False,
        return_residual=False,
        checkpointing=False,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        factory_kwargs = {"device": device, "dtype": dtype}
        self.embed_dim = embed_dim
        self.cross_attn = cross_attn
        self.causal = causal
        self.layer_idx = layer_idx
        self.dwconv = dwconv
        self.rotary_emb_dim = rotary_emb_dim
        self.use_flash_attn = use_flash_attn
        self.return_residual = return_residual
        self.checkpointing = checkpointing
        self.num_heads = num_heads
        self.num_heads_kv = num_heads_kv if num_heads_kv is not None else num_heads
        _check_head_counts(embed_dim, num_heads, self.num_heads_kv)
        _check_flash_only_options(use_alibi, window_size, use_flash_attn)
        self.head_dim = embed_dim // num_heads
        q_dim = self.head_dim * num_heads
        kv_dim = 2 * self.head_dim * self.num_heads_kv

        if rotary_emb_dim > 0 and cross_attn:
            raise ValueError("rotary_emb_dim > 0 is not supported with cross_attn=True")

        if cross_attn:
            self.Wq = nn.Linear(embed_dim, q_dim, bias=qkv_proj_bias, **factory_kwargs)
            self.Wkv = nn.Linear(embed_dim, kv_dim, bias=qkv_proj_bias, **factory_kwargs)
        else:
            self.Wqkv = nn.Linear(embed_dim, q_dim + kv_dim, bias=qkv_proj_bias, **factory_kwargs)
        if dwconv:
            conv = partial(nn.Conv1d, kernel_size=3, padding=2, **factory_kwargs)
            if self._packed_qkv:
                self.dwconv_qkv = conv(q_dim + kv_dim, q_dim + kv_dim, groups=q_dim + kv_dim)
            else:
                self.dwconv_q = conv(q_dim, q_dim, groups=q_dim)
                self.dwconv_kv = conv(kv_dim, kv_dim, groups=kv_dim)

        self._build_attention(
            causal=causal,
            softmax_scale=softmax_scale,
            dropout=dropout,
            use_flash_attn=use_flash_attn,
            alibi_slopes=get_alibi_slopes(num_heads) if use_alibi else None,
            window_size=window_size,
            rotary_emb_dim=rotary_emb_dim,
            rotary_emb_base=rotary_emb_base,
            rotary_emb_scale_base=rotary_emb_scale_base,
            rotary_emb_interleaved=rotary_emb_interleaved,
            device=device,
        )
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=out_proj_bias, **factory_kwargs)

    @property
    def _packed_qkv(self):
        # One (batch, seqlen, 3, nheads, head_dim) tensor feeds inner_attn; otherwise q and
        # packed kv feed inner_cross_attn.
        return not self.cross_attn and self.num_heads_kv == self.num_heads

    def _check_forward_args(
        self, x_kv, key_padding_mask, cu_seqlens, max_seqlen, mixer_subset, inference_params
    ):
        if not self.cross_attn and (x_kv is not None or mixer_subset is not None):
            raise ValueError("x_kv and mixer_subset are for cross_attn=True only")
        if cu_seqlens is not None:
            if not self.use_flash_attn:
                raise ValueError(
                    "cu_seqlens (varlen input) needs use_flash_attn=True; pass padded x with "
                    "key_padding_mask instead"
                )
            if max_seqlen is None:
                raise ValueError("max_seqlen must be given with cu_seqlens")
            if self.dwconv or self.rotary_emb_dim > 0:
                raise ValueError(
                    "cu_seqlens (varlen input) is not supported with dwconv or rotary_emb_dim > 0"
                )
        if key_padding_mask is not None:
            if self.use_flash_attn:
                raise ValueError(
                    "key_padding_mask is for use_flash_attn=False; with FlashAttention pass the "
                    "unpadded tokens with cu_seqlens and max_seqlen instead"
                )
            if cu_seqlens is not None or max_seqlen is not None:
                raise ValueError("key_padding_mask cannot be combined with cu_seqlens / max_seqlen")
        if inference_params is not None:
            if key_padding_mask is not None or cu_seqlens is not None or max_seqlen is not None:
                raise ValueError(
                    "inference_params cannot be combined with key_padding_mask, cu_seqlens or "
                    "max_seqlen"
                )

    def _project(self, x, x_kv, mixer_subset):
        """Returns (qkv, None) with qkv (..., 3, nheads, head_dim) when self._packed_qkv, else
        (q (..., nheads, head_dim), kv (..., 2, nheads_kv, head_dim))."""
        if self._packed_qkv:
            qkv = self.Wqkv(x)
            if self.dwconv:
                qkv = _causal_depthwise_conv(self.dwconv_qkv, qkv)
            qkv = rearrange(qkv, "... (three h d) -> ... three h d", three=3, d=self.head_dim)
            return qkv, None
        if self.cross_attn:
            q = self.Wq(x if mixer_subset is None else x[:, mixer_subset])
            kv = self.Wkv(x if x_kv is None else x_kv)
        else:
            q_dim = self.num_heads * self.head_dim
            q, kv = self.Wqkv(x).split([q_dim, 2 * self.num_heads_kv * self.head_dim], dim=-1)
        if self.dwconv:
            q = _causal_depthwise_conv(self.dwconv_q, q)
            kv = _causal_depthwise_conv(self.dwconv_kv, kv)
        q = rearrange(q, "... (h d) -> ... h d", d=self.head_dim)
        kv = rearrange(kv, "... (two h d) -> ... two h d", two=2, d=self.head_dim)
        return q, kv

    def forward(
        self,
        x,
        x_kv=None,
        key_padding_mask=None,
        cu_seqlens=None,
        max_seqlen=None,
        mixer_subset=None,
        inference_params=None,
        **kwargs,
    ):
        """
        x: (batch, seqlen, embed_dim), or (total, embed_dim) with cu_seqlens.
        x_kv: (batch, seqlen_k, embed_dim), the keys' source for cross_attn (default x).
        key_padding_mask: bool (batch, seqlen), True for keys to keep; use_flash_attn=False only.
        cu_seqlens: (batch + 1,) int32 cumulative lengths of x's sequences, with max_seqlen (int);
            use_flash_attn=True only.
        mixer_subset: cross_attn only: index into x's sequence dim selecting the queries (e.g. the
            CLS token of a ViT's last layer).
        inference_params: InferenceParams for decoding with a kv cache.
        kwargs: passed on to the inner attention (e.g. causal, or cu_seqlens_k / max_seqlen_k for
            varlen GQA and cross-attention).
        Returns out (same leading dims as x), or (out, x) with return_residual.
        """
        self._check_forward_args(
            x_kv, key_padding_mask, cu_seqlens, max_seqlen, mixer_subset, inference_params
        )
        if self.use_flash_attn:
            inner_kwargs = {"cu_seqlens": cu_seqlens, "max_seqlen": max_seqlen, **kwargs}
        else:
            inner_kwargs = {"key_padding_mask": key_padding_mask, **kwargs}
        q_or_qkv, kv = self._project(x, x_kv, mixer_subset)
        context = self._attend_heads(q_or_qkv, kv, inference_params, inner_kwargs)
        out = self.out_proj(rearrange(context, "... h d -> ... (h d)"))
        return (out, x) if self.return_residual else out


class ParallelMHA(_AttentionLayer):
    """Tensor-parallel MHA: the heads are split over the ranks of process_group, in whole groups
    of one kv head and its num_heads / num_heads_kv query heads (the first ranks take one group
    more when they do not divide evenly). Wqkv is a ColumnParallelLinear whose local rows are
    this rank's q heads, then its k heads, then its v heads; out_proj a RowParallelLinear over
    the same heads (its bias on the first rank only). Attention, rotary and decoding are MHA's.

    sequence_parallel: forward takes and returns this rank's slice of the first dimension
        (gathered before Wqkv, out_proj's output reduce-scattered); pass x as
        (batch * seqlen, embed_dim) with seqlen, so that the split runs over tokens.
    Other arguments as MHA's; use_alibi gives each rank the slopes of its own heads.
    """

    def __init__(
        self,
        embed_dim,
        num_heads,
        process_group,
        num_heads_kv=None,
        qkv_proj_bias=True,
        out_proj_bias=True,
        dropout=0.0,
        softmax_scale=None,
        causal=False,
        layer_idx=None,
        rotary_emb_dim=0,
        rotary_emb_base=10000.0,
        rotary_emb_scale_base=None,
        rotary_emb_interleaved=False,
        use_alibi=False,
        window_size=(-1, -1),
        use_flash_attn=False,
        checkpointing=False,
        sequence_parallel=True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if process_group is None:
            raise ValueError("ParallelMHA needs a process_group to split its heads over; use MHA on one device")
        factory_kwargs = {"device": device, "dtype": dtype}
        self.embed_dim = embed_dim
        self.causal = causal
        self.layer_idx = layer_idx
        self.rotary_emb_dim = rotary_emb_dim
        self.use_flash_attn = use_flash_attn
        self.checkpointing = checkpointing
        self.process_group = process_group
        self.world_size = dist.get_world_size(process_group)
        self.local_rank = dist.get_rank(process_group)
        self.num_heads = num_heads
        self.num_heads_kv = num_heads_kv if num_heads_kv is not None else num_heads
        _check_head_counts(embed_dim, num_heads, self.num_heads_kv)
        _check_flash_only_options(use_alibi, window_size, use_flash_attn)
        self.head_dim = embed_dim // num_heads
        queries_per_kv = num_heads // self.num_heads_kv

        def kv_heads_of(rank):
            return get_dim_for_local_rank(self.num_heads_kv, self.world_size, rank)

        self.num_heads_kv_per_rank = kv_heads_of(self.local_rank)
        self.num_heads_per_rank = self.num_heads_kv_per_rank * queries_per_kv
        first_head = sum(kv_heads_of(r) for r in range(self.local_rank)) * queries_per_kv
        alibi_slopes = None
        if use_alibi:
            alibi_slopes = get_alibi_slopes(num_heads)[first_head : first_head + self.num_heads_per_rank]
        self._build_attention(
            causal=causal,
            softmax_scale=softmax_scale,
            dropout=dropout,
            use_flash_attn=use_flash_attn,
            alibi_slopes=alibi_slopes,
            window_size=window_size,
            rotary_emb_dim=rotary_emb_dim,
            rotary_emb_base=rotary_emb_base,
            rotary_emb_scale_base=rotary_emb_scale_base,
            rotary_emb_interleaved=rotary_emb_interleaved,
            device=device,
        )
        parallel_kwargs = dict(sequence_parallel=sequence_parallel, **factory_kwargs)
        self.Wqkv = ColumnParallelLinear(
            embed_dim,
            self.head_dim * (num_heads + 2 * self.num_heads_kv),
            process_group,
            bias=qkv_proj_bias,
            multiple_of=self.head_dim * (queries_per_kv + 2),
            **parallel_kwargs,
        )
        self.out_proj = RowParallelLinear(
            embed_dim,
            embed_dim,
            process_group,
            bias=out_proj_bias,
            multiple_of=self.head_dim * queries_per_kv,
            **parallel_kwargs,
        )

    @property
    def _local_num_heads_kv(self):
        return self.num_heads_kv_per_rank

    def forward(self, x, seqlen=None, inference_params=None, **kwargs):
        """
        x: (batch, seqlen, embed_dim), or (batch * seqlen, embed_dim) with seqlen given (the form
            to pass under sequence parallelism, which splits the first dimension).
        inference_params: InferenceParams for decoding with a kv cache.
        kwargs: passed on to the inner attention (e.g. causal).
        Returns out with x's leading dimensions.
        """
        qkv = self.Wqkv(x)
        if seqlen is not None:
            qkv = rearrange(qkv, "(b s) ... -> b s ...", s=seqlen)
        if self.num_heads_kv == self.num_heads:
            q_or_qkv = rearrange(qkv, "... (three h d) -> ... three h d", three=3, d=self.head_dim)
            kv = None
        else:
            q_dim = self.num_heads_per_rank * self.head_dim
            q_or_qkv = rearrange(qkv[..., :q_dim], "... (h d) -> ... h d", d=self.head_dim)
            kv = rearrange(qkv[..., q_dim:], "... (two h d) -> ... two h d", two=2, d=self.head_dim)
        context = self._attend_heads(q_or_qkv, kv, inference_params, kwargs)
        context = rearrange(context, "... h d -> ... (h d)")
        if seqlen is not None:
            context = rearrange(context, "b s d -> (b s) d")
        return self.out_proj(context)
