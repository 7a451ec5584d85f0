"""Reference attention and test helpers for the flash_attn test suite.

Pure PyTorch (no dependency on flash_attn), usable on CPU or GPU.

attention_ref(...) implements exactly the semantics of the contract:
  * scores = q.k * softmax_scale (default 1 / sqrt(head_dim));
  * softcap > 0: scores = softcap * tanh(scores / softcap)  (applied before the alibi bias);
  * alibi: scores += -slope * |i + sk - sq - j|, slopes of shape (nheads,) or (batch, nheads);
  * causal / sliding window aligned to the bottom-right corner, per batch entry, using that
    entry's actual seqlen_q / seqlen_k (from the padding masks): key j is allowed for query i
    iff i + sk - sq - left <= j <= i + sk - sq + right (-1 = unbounded; causal means right = 0);
  * GQA/MQA: query head h uses kv head h // (nheads // nheads_k);
  * rows with no allowed key: output 0 and softmax_lse = +inf.

Varlen helpers: generate ragged lengths, build (prefix) padding masks, pack padded tensors into
the varlen layout (total, ...) with int32 cu_seqlens, and unpack back.
"""

import math

import torch

STANDARD_HEADDIMS = (32, 64, 96, 128, 192, 256)


# ---------------------------------------------------------------------------------------------
# Reference attention
# ---------------------------------------------------------------------------------------------


def _seqlens_from_mask(mask, full_len, batch, device):
    """Per-batch actual sequence length, shaped (batch, 1, 1, 1)."""
    if mask is None:
        lens = torch.full((batch,), full_len, dtype=torch.long, device=device)
    else:
        lens = mask.sum(-1).to(torch.long)
    return lens.view(batch, 1, 1, 1)


def allowed_mask(
    batch,
    seqlen_q,
    seqlen_k,
    query_padding_mask=None,
    key_padding_mask=None,
    causal=False,
    window_size=(-1, -1),
    device=None,
):
    """Boolean (batch, 1, seqlen_q, seqlen_k): True where query i may attend key j.

    Padding masks must be prefix masks (the first L positions valid), as produced by
    lengths_to_mask; padded query rows are all False.
    """
    left, right = int(window_size[0]), int(window_size[1])
    if causal:
        right = 0
    sq = _seqlens_from_mask(query_padding_mask, seqlen_q, batch, device)
    sk = _seqlens_from_mask(key_padding_mask, seqlen_k, batch, device)
    row = torch.arange(seqlen_q, device=device).view(1, 1, seqlen_q, 1)
    col = torch.arange(seqlen_k, device=device).view(1, 1, 1, seqlen_k)
    diag = row + sk - sq  # key index aligned with query i (bottom-right alignment)
    allowed = torch.ones(batch, 1, seqlen_q, seqlen_k, dtype=torch.bool, device=device)
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask.view(batch, 1, 1, seqlen_k)
    if query_padding_mask is not None:
        allowed = allowed & query_padding_mask.view(batch, 1, seqlen_q, 1)
    if right >= 0:
        allowed = allowed & (col <= diag + right)
    if left >= 0:
        allowed = allowed & (col >= diag - left)
    return allowed


def alibi_bias(
    alibi_slopes, batch, nheads, seqlen_q, seqlen_k, query_padding_mask=None, key_padding_mask=None,
    dtype=torch.float32,
):
    """(batch or 1, nheads, seqlen_q, seqlen_k) bias -slope * |i + sk - sq - j|."""
    device = alibi_slopes.device
    if alibi_slopes.dim() == 1:
        slopes = alibi_slopes.view(1, nheads, 1, 1)
    else:
        slopes = alibi_slopes.view(batch, nheads, 1, 1)
    sq = _seqlens_from_mask(query_padding_mask, seqlen_q, batch, device)
    sk = _seqlens_from_mask(key_padding_mask, seqlen_k, batch, device)
    row = torch.arange(seqlen_q, device=device).view(1, 1, seqlen_q, 1)
    col = torch.arange(seqlen_k, device=device).view(1, 1, 1, seqlen_k)
    dist = (row + sk - sq - col).abs().to(dtype)
    return -slopes.to(dtype) * dist


def attention_ref(
    q,
    k,
    v,
    query_padding_mask=None,
    key_padding_mask=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    upcast=True,
    softmax_scale=None,
    ref_dtype=torch.float32,
):
    """Reference attention.

    q: (batch, seqlen_q, nheads, d); k: (batch, seqlen_k, nheads_k, d); v: (batch, seqlen_k, nheads_k, dv).
    query_padding_mask: optional bool (batch, seqlen_q), key_padding_mask: optional bool
    (batch, seqlen_k); True = valid; must be prefix masks (first L positions valid).

    upcast=True: computed in ref_dtype (float32 by default, float64 on request); out is returned in
    ref_dtype. upcast=False: computed the way PyTorch would in the input dtype (scaled q and the
    matmuls in fp16/bf16, softmax in fp32 then cast back), out returned in the input dtype; used
    to measure "PyTorch's own error".

    Returns (out, lse): out (batch, seqlen_q, nheads, dv), zero in padded query rows and in rows
    with no allowed key; lse float32 (batch, nheads, seqlen_q), natural log of sum(exp(scores)),
    +inf for rows with no allowed key (and for padded query rows).
    """
    batch, seqlen_q, nheads, d = q.shape
    _, seqlen_k, nheads_k, _ = k.shape
    assert v.shape[:3] == k.shape[:3], (v.shape, k.shape)
    assert nheads % nheads_k == 0
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(d)
    dtype_og = q.dtype
    cdtype = ref_dtype if upcast else dtype_og
    q, k, v = q.to(cdtype), k.to(cdtype), v.to(cdtype)
    if nheads_k != nheads:
        g = nheads // nheads_k
        k = k.repeat_interleave(g, dim=2)
        v = v.repeat_interleave(g, dim=2)
    # (batch, nheads, seqlen, d)
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if upcast:
        scores = torch.matmul(qh, kh.transpose(-1, -2)) * softmax_scale
    else:
        scores = torch.matmul(qh * softmax_scale, kh.transpose(-1, -2))
    if softcap > 0:
        scores = torch.tanh(scores / softcap) * softcap
    if alibi_slopes is not None:
        bias = alibi_bias(
            alibi_slopes, batch, nheads, seqlen_q, seqlen_k, query_padding_mask, key_padding_mask,
            dtype=scores.dtype if upcast else torch.float32,
        )
        scores = scores + bias  # fp16/bf16 + fp32 bias promotes to fp32, as in upstream's reference
    allowed = allowed_mask(
        batch, seqlen_q, seqlen_k, query_padding_mask, key_padding_mask, causal, window_size,
        device=q.device,
    )
    scores = scores.masked_fill(~allowed, float("-inf"))
    row_valid = allowed.any(dim=-1, keepdim=True)  # (batch, 1, seqlen_q, 1)
    lse_dtype = torch.float64 if scores.dtype == torch.float64 else torch.float32
    lse = torch.logsumexp(scores.to(lse_dtype), dim=-1)
    lse = lse.masked_fill(~row_valid.squeeze(-1), float("inf")).to(torch.float32)
    if upcast:
        attn = torch.softmax(scores, dim=-1)
    else:
        attn = torch.softmax(scores.float(), dim=-1).to(dtype_og)
    attn = attn.masked_fill(~row_valid, 0.0)  # rows with no allowed key: 0 instead of NaN
    out = torch.matmul(attn, vh).transpose(1, 2)  # (batch, seqlen_q, nheads, dv)
    if query_padding_mask is not None:
        out = out.masked_fill(~query_padding_mask.view(batch, seqlen_q, 1, 1), 0.0)
    return out, lse


# ---------------------------------------------------------------------------------------------
# Varlen helpers
# ---------------------------------------------------------------------------------------------


def generate_seqlens(batch, max_seqlen, mode="random", min_len=1, device="cpu", generator=None):
    """Random ragged lengths (batch,) int64 in [min_len, max_seqlen].

    mode "random": uniform, with the first entry forced to max_seqlen (so max_seqlen is really
    used) and, when batch >= 3, the last forced to min_len (short sequences, often 1 and never a
    multiple of 64/128). mode "full": all max_seqlen. mode "third": uniform in
    [max(min_len, max_seqlen // 3), max_seqlen].
    """
    if mode == "full":
        return torch.full((batch,), max_seqlen, dtype=torch.long, device=device)
    lo = min_len if mode == "random" else max(min_len, max_seqlen // 3)
    lens = torch.randint(lo, max_seqlen + 1, (batch,), generator=generator, dtype=torch.long)
    if mode == "random":
        lens[0] = max_seqlen
        if batch >= 3:
            lens[-1] = min_len
    return lens.to(device)


def lengths_to_mask(lengths, max_len=None):
    """Prefix padding mask (batch, max_len): True for the first lengths[b] positions."""
    lengths = torch.as_tensor(lengths)
    if max_len is None:
        max_len = int(lengths.max().item()) if lengths.numel() else 0
    pos = torch.arange(max_len, device=lengths.device).view(1, max_len)
    return pos < lengths.view(-1, 1)


def cu_seqlens_from_lengths(lengths, device=None):
    lengths = torch.as_tensor(lengths, dtype=torch.long)
    cu = torch.zeros(lengths.numel() + 1, dtype=torch.int32, device=lengths.device)
    cu[1:] = torch.cumsum(lengths, 0).to(torch.int32)
    return cu.to(device) if device is not None else cu


def pack(x, mask):
    """Padded (batch, seqlen, ...) + prefix mask (batch, seqlen) -> packed varlen layout.

    Returns (x_packed (total, ...), cu_seqlens int32 (batch+1,) on x's device, max_seqlen (int),
    indices (total,) into the flattened (batch*seqlen) dimension).
    """
    batch, seqlen = mask.shape
    lengths = mask.sum(-1).to(torch.long)
    indices = torch.nonzero(mask.flatten(), as_tuple=False).flatten()
    x_packed = x.reshape(batch * seqlen, *x.shape[2:])[indices]
    cu = cu_seqlens_from_lengths(lengths.cpu()).to(x.device)
    max_seqlen = int(lengths.max().item()) if batch > 0 else 0
    return x_packed, cu, max_seqlen, indices


def unpack(x_packed, indices, batch, seqlen):
    """Inverse of pack: (total, ...) -> (batch, seqlen, ...), zeros in padded positions."""
    out = torch.zeros(batch * seqlen, *x_packed.shape[1:], dtype=x_packed.dtype, device=x_packed.device)
    out[indices] = x_packed
    return out.view(batch, seqlen, *x_packed.shape[1:])


def pack_lse(lse, query_padding_mask):
    """Reference lse (batch, nheads, seqlen_q) -> varlen layout (nheads, total_q)."""
    lse_bsh = lse.transpose(1, 2)  # (batch, seqlen_q, nheads)
    packed, _, _, _ = pack(lse_bsh, query_padding_mask)
    return packed.transpose(0, 1).contiguous()


# ---------------------------------------------------------------------------------------------
# Misc helpers
# ---------------------------------------------------------------------------------------------


def kernel_headdim(d):
    """Head dim of the kernel that serves head dim d: pad to a multiple of 8, then round up to the
    next of 32, 64, 96, 128, 192, 256. None if d > 256."""
    d8 = (d + 7) // 8 * 8
    for hd in STANDARD_HEADDIMS:
        if d8 <= hd:
            return hd
    return None


def make_alibi_slopes(kind, batch, nheads, device):
    """None, (nheads,) or (batch, nheads) fp32 slopes in [0, 0.3)."""
    if kind is None:
        return None
    if kind == "h":
        return (torch.rand(nheads, device=device) * 0.3).float()
    if kind == "bh":
        return (torch.rand(batch, nheads, device=device) * 0.3).float()
    raise ValueError(kind)


def ref_grads(q, k, v, dout, upcast, **kw):
    """dq, dk, dv of attention_ref by autograd: float32 leaves (upcast) or the input dtype."""
    leaves = [(x.float() if upcast else x).detach().clone().requires_grad_(True) for x in (q, k, v)]
    out, _ = attention_ref(*leaves, upcast=upcast, **kw)
    out.backward(dout.to(out.dtype))
    return [x.grad for x in leaves]
