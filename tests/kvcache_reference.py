"""Reference helpers for flash_attn_with_kvcache and paged KV (pure PyTorch, CPU or GPU).

Semantics (upstream flash-attn 2.8's):
  * cache_seqlens[i] is the END of entry i's valid cache rows (an absolute row index, counting the
    left padding). New rows k[i], v[i] (seqlen_new of them) are written at rows
    cache_seqlens[i] .. cache_seqlens[i] + seqlen_new - 1 of cache batch row cache_batch_idx[i]
    (i if None), or, for a paged cache, logical row j of entry i lives at
    cache[block_table[i, j // page_block_size], j % page_block_size];
  * attention of entry i covers the keys [cache_leftpad[i], cache_seqlens[i] + seqlen_new); keys
    are indexed from the leftpad start, so causal / window masks are aligned to the bottom-right
    with seqlen_k_i = cache_seqlens[i] + seqlen_new - cache_leftpad[i];
  * rotary (only with new k): the first rotary_dim features of the new k row t are rotated at
    position cache_seqlens[i] + t before being written; q row t is rotated at position
    cache_seqlens[i] + t when causal or a window is set (a window side >= the cache's capacity
    counts as unset, as upstream normalises it), else every q row at cache_seqlens[i].
    Rotary is computed in float32 and rounded to the input dtype (as the kernel stores it).

Everything here is written for clarity, not speed (python loops over the batch are fine for the
small shapes of the tests).
"""

import math

import torch

from reference import attention_ref, lengths_to_mask

# ---------------------------------------------------------------------------------------------
# Rotary embedding
# ---------------------------------------------------------------------------------------------


def make_rotary_cos_sin(seqlen_ro, rotary_dim, dtype, device="cpu", random_angles=True, base=10000.0):
    """(cos, sin) of shape (seqlen_ro, rotary_dim // 2) in `dtype`.

    random_angles=True: an independent uniform angle in [0, 2*pi) for every (position, pair) -
    any position off by one gives a very different rotation, so wrong positions cannot hide.
    Otherwise the usual position * base^(-2j / rotary_dim) angles.
    """
    assert rotary_dim % 2 == 0
    half = rotary_dim // 2
    if random_angles:
        angle = torch.rand(seqlen_ro, half, device=device, dtype=torch.float32) * (2 * math.pi)
    else:
        inv_freq = base ** (-torch.arange(half, device=device, dtype=torch.float32) * 2 / rotary_dim)
        angle = torch.arange(seqlen_ro, device=device, dtype=torch.float32).view(-1, 1) * inv_freq.view(1, -1)
    return torch.cos(angle).to(dtype), torch.sin(angle).to(dtype)


def apply_rotary_ref(x, cos, sin, positions, interleaved, out_dtype=None):
    """Rotary embedding of the first rotary_dim = 2 * cos.shape[1] features of x.

    x: (b, s, h, d); cos, sin: (seqlen_ro, rotary_dim / 2); positions: (b, s) long, the position
    of every row. interleaved=True rotates the pairs (x[2j], x[2j+1]) by the angle of (cos[p, j],
    sin[p, j]); interleaved=False (GPT-NeoX) the pairs (x[j], x[j + rotary_dim / 2]):
        out0 = x0 * cos - x1 * sin,  out1 = x0 * sin + x1 * cos.
    Features past rotary_dim are copied. Computed in float32 from the given cos / sin (whatever
    their dtype), returned in out_dtype (default x.dtype, i.e. rounded to the input dtype).
    """
    b, s, h, d = x.shape
    half = cos.shape[-1]
    rd = 2 * half
    assert sin.shape == cos.shape and rd <= d, (cos.shape, sin.shape, d)
    assert positions.shape == (b, s), (positions.shape, (b, s))
    out_dtype = x.dtype if out_dtype is None else out_dtype
    xf = x.float()
    pos = positions.to(device=x.device, dtype=torch.long)
    c = cos.float()[pos].unsqueeze(2)  # (b, s, 1, half)
    sn = sin.float()[pos].unsqueeze(2)
    if interleaved:
        x0, x1 = xf[..., 0:rd:2], xf[..., 1:rd:2]
    else:
        x0, x1 = xf[..., :half], xf[..., half:rd]
    o0 = x0 * c - x1 * sn
    o1 = x0 * sn + x1 * c
    if interleaved:
        rot = torch.stack([o0, o1], dim=-1).reshape(b, s, h, rd)
    else:
        rot = torch.cat([o0, o1], dim=-1)
    out = torch.cat([rot, xf[..., rd:]], dim=-1)
    if out_dtype != torch.float32:
        out = out.to(out_dtype)
    # Features past rotary_dim are copied bit for bit (no round trip through float32 needed for
    # fp16/bf16, which are exact in float32, but keep it explicit).
    out[..., rd:] = x[..., rd:].to(out_dtype)
    return out


def rotary_positions(cache_seqlens, seqlen, per_row):
    """(b, seqlen) long positions: cache_seqlens[i] + t if per_row else cache_seqlens[i]."""
    cs = torch.as_tensor(cache_seqlens).to(torch.long).view(-1, 1)
    t = torch.arange(seqlen, device=cs.device, dtype=torch.long).view(1, -1)
    return cs + t if per_row else cs + 0 * t


def window_is_set(window_size):
    return int(window_size[0]) >= 0 or int(window_size[1]) >= 0


# ---------------------------------------------------------------------------------------------
# Paged <-> contiguous
# ---------------------------------------------------------------------------------------------


def num_pages(seqlen, page_block_size):
    return (seqlen + page_block_size - 1) // page_block_size


def make_block_table(batch, blocks_per_seq, num_blocks, device="cpu", generator=None):
    """(batch, blocks_per_seq) int32 table of distinct blocks drawn by a random permutation of
    range(num_blocks) (num_blocks >= batch * blocks_per_seq; the rest stay unreferenced)."""
    need = batch * blocks_per_seq
    assert num_blocks >= need, (num_blocks, need)
    perm = torch.randperm(num_blocks, generator=generator)[:need]
    return perm.view(batch, blocks_per_seq).to(torch.int32).to(device)


def paged_from_contiguous(cache, page_block_size, block_table=None, num_blocks=None, extra_blocks=3,
                          fill=None, generator=None):
    """Paged copy of a contiguous cache (batch, seqlen, h_k, d).

    seqlen is padded up to blocks_per_seq * page_block_size (the logical capacity); the rows of
    the last page past seqlen get random data. block_table: an existing (batch, blocks_per_seq)
    int32 table to reuse (e.g. the k cache's for the v cache), else a new shuffled one over
    num_blocks blocks (default batch * blocks_per_seq + extra_blocks). Blocks not referenced by
    the table hold `fill` (a float, e.g. nan) or random data if fill is None.
    Returns (paged (num_blocks, page, h_k, d), block_table int32 on cache's device).
    """
    batch, seqlen, hk, d = cache.shape
    bps = num_pages(seqlen, page_block_size)
    if block_table is None:
        if num_blocks is None:
            num_blocks = batch * bps + extra_blocks
        block_table = make_block_table(batch, bps, num_blocks, generator=generator)
    else:
        assert block_table.shape == (batch, bps), (block_table.shape, (batch, bps))
        if num_blocks is None:
            num_blocks = int(block_table.max()) + 1 + extra_blocks
    table = block_table.to(torch.int32).to(cache.device)
    if fill is None:
        paged = torch.randn(num_blocks, page_block_size, hk, d, generator=generator).to(cache.device, cache.dtype)
    else:
        paged = torch.full((num_blocks, page_block_size, hk, d), float(fill), dtype=cache.dtype,
                           device=cache.device)
    cap = bps * page_block_size
    padded = torch.randn(batch, cap, hk, d, generator=generator).to(cache.device, cache.dtype)
    padded[:, :seqlen] = cache
    paged[table.long()] = padded.view(batch, bps, page_block_size, hk, d)
    return paged, table


def contiguous_from_paged(paged, block_table):
    """Gather a paged cache back: (batch, blocks_per_seq * page_block_size, h_k, d)."""
    batch, bps = block_table.shape
    _, page, hk, d = paged.shape
    return paged[block_table.long()].reshape(batch, bps * page, hk, d)


def paged_row(block_table, page_block_size, i, j):
    """(block, offset) of logical row j of batch entry i."""
    return int(block_table[i, j // page_block_size]), j % page_block_size


# ---------------------------------------------------------------------------------------------
# flash_attn_with_kvcache reference
# ---------------------------------------------------------------------------------------------


def _as_long_vector(x, batch, device, default=None):
    if x is None:
        x = default
    if isinstance(x, int):
        return torch.full((batch,), x, dtype=torch.long, device=device)
    return torch.as_tensor(x).to(device=device, dtype=torch.long).view(batch)


def kvcache_attention_ref(
    q,
    k_cache,
    v_cache,
    k=None,
    v=None,
    rotary_cos=None,
    rotary_sin=None,
    cache_seqlens=None,
    cache_batch_idx=None,
    cache_leftpad=None,
    block_table=None,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    rotary_interleaved=True,
    alibi_slopes=None,
    upcast=True,
):
    """What flash_attn_with_kvcache must return and leave in the caches.

    Takes the same arguments as flash_attn_with_kvcache (the caches are NOT modified: pass the
    caches as they were before the call). upcast=True: attention in float32 (out float32);
    upcast=False: the same math the way PyTorch does it in the input dtype (out in q.dtype), for
    the error bound. Rotary is float32 rounded to the input dtype in both.

    Returns (out (b, sq, h, d), lse (b, h, sq) float32 (+inf for rows with no allowed key),
    expected_k_cache, expected_v_cache) - the expected caches have the caches' layout (paged
    when block_table is given) and dtype.
    """
    batch, seqlen_q, nheads, d = q.shape
    dev = q.device
    assert cache_seqlens is not None, "cache_seqlens is required by the reference"
    assert (k is None) == (v is None)
    assert not (cache_batch_idx is not None and block_table is not None)
    assert rotary_cos is None or k is not None, "rotary needs new k / v"
    cs = _as_long_vector(cache_seqlens, batch, dev)
    lp = _as_long_vector(cache_leftpad, batch, dev, default=0)
    s_new = 0 if k is None else k.shape[1]

    # Logical (batch, capacity, h_k, d) views of each entry's cache, as copies.
    if block_table is not None:
        page = k_cache.shape[1]
        k_log = contiguous_from_paged(k_cache, block_table)
        v_log = contiguous_from_paged(v_cache, block_table)
        batch_rows = None
    else:
        batch_rows = (torch.arange(batch, device=dev) if cache_batch_idx is None
                      else torch.as_tensor(cache_batch_idx).to(device=dev, dtype=torch.long))
        k_log = k_cache[batch_rows].clone()
        v_log = v_cache[batch_rows].clone()
    capacity = k_log.shape[1]
    assert bool(((cs + s_new) <= capacity).all()), "cache_seqlens + seqlen_new past the cache's end"
    assert bool((lp <= cs).all()), "cache_leftpad past cache_seqlens"

    # q's rotary positions are per row with a causal or local mask. As upstream, a window side
    # at least as long as the cache's capacity counts as no window.
    wl, wr = int(window_size[0]), int(window_size[1])
    per_row = bool(causal) or window_is_set((-1 if wl >= capacity else wl, -1 if wr >= capacity else wr))
    exp_k, exp_v = k_cache.clone(), v_cache.clone()
    bt_cpu = block_table.cpu() if block_table is not None else None
    if k is not None:
        k_new = k
        if rotary_cos is not None:
            k_new = apply_rotary_ref(k, rotary_cos, rotary_sin, rotary_positions(cs, s_new, True),
                                     rotary_interleaved)
        k_new = k_new.to(k_cache.dtype)
        v_new = v.to(v_cache.dtype)
        for i in range(batch):
            c = int(cs[i])
            k_log[i, c:c + s_new] = k_new[i]
            v_log[i, c:c + s_new] = v_new[i]
            for t in range(s_new):
                if block_table is not None:
                    blk, off = paged_row(bt_cpu, page, i, c + t)
                    exp_k[blk, off] = k_new[i, t]
                    exp_v[blk, off] = v_new[i, t]
            if block_table is None:
                r = int(batch_rows[i])
                exp_k[r, c:c + s_new] = k_new[i]
                exp_v[r, c:c + s_new] = v_new[i]

    if rotary_cos is not None:
        q = apply_rotary_ref(q, rotary_cos, rotary_sin, rotary_positions(cs, seqlen_q, per_row),
                             rotary_interleaved)

    # Keys of entry i: logical rows [lp_i, cs_i + s_new), left-aligned with a prefix mask.
    lens = cs + s_new - lp
    max_len = max(1, int(lens.max()))
    hk = k_log.shape[2]
    keys = torch.zeros(batch, max_len, hk, d, dtype=k_log.dtype, device=dev)
    vals = torch.zeros(batch, max_len, hk, v_log.shape[-1], dtype=v_log.dtype, device=dev)
    for i in range(batch):
        a, n = int(lp[i]), int(lens[i])
        keys[i, :n] = k_log[i, a:a + n]
        vals[i, :n] = v_log[i, a:a + n]
    kmask = lengths_to_mask(lens.cpu(), max_len).to(dev)
    out, lse = attention_ref(
        q, keys, vals, None, kmask, causal=causal, window_size=window_size, softcap=softcap,
        alibi_slopes=alibi_slopes, upcast=upcast, softmax_scale=softmax_scale,
    )
    return out, lse, exp_k, exp_v


def kvcache_attention_pt(*args, **kwargs):
    """kvcache_attention_ref with upcast=False: PyTorch's own math in the input dtype."""
    kwargs["upcast"] = False
    return kvcache_attention_ref(*args, **kwargs)


# ---------------------------------------------------------------------------------------------
# Comparisons
# ---------------------------------------------------------------------------------------------


def _bits(x):
    if x.element_size() == 2:
        return x.view(torch.int16)
    if x.element_size() == 4:
        return x.view(torch.int32)
    return x.view(torch.uint8)


def bitwise_equal(a, b):
    """Bit-for-bit equality (NaN payloads included)."""
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(_bits(a), _bits(b))


def assert_bitwise_equal(a, b, name="tensor"):
    assert a.shape == b.shape and a.dtype == b.dtype, (name, a.shape, b.shape, a.dtype, b.dtype)
    if not torch.equal(_bits(a), _bits(b)):
        diff = (_bits(a) != _bits(b))
        idx = diff.nonzero()[:4].tolist()
        raise AssertionError(f"{name}: {int(diff.sum())} element(s) differ bitwise, first at {idx}")


def rounding_tolerance(dtype):
    """(rtol, atol) of one rounding step of a float32 value to dtype: rtol = the unit roundoff
    spacing 2^-mantissa (one ulp at most, relative), atol for results near 0 that come from
    cancellation in float32 (x0*cos - x1*sin with FMA or not differs by ~1e-7 * |x|)."""
    if dtype == torch.float16:
        return 2.0 ** -10, 1e-5
    if dtype == torch.bfloat16:
        return 2.0 ** -7, 1e-5
    return 1e-6, 1e-6


def assert_rounding_close(actual, expected, name="tensor", max_mismatch_frac=0.01):
    """actual within one rounding step (see rounding_tolerance) of expected everywhere, and
    bit-identical for all but a small fraction of elements: a float32 rotary rounded to the
    input dtype may differ by one ulp (FMA contraction, operation order), nothing more."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, (
        name, actual.shape, expected.shape, actual.dtype, expected.dtype)
    if actual.numel() == 0:
        return
    assert not torch.isnan(actual).any(), f"{name} has NaN"
    rtol, atol = rounding_tolerance(actual.dtype)
    a, e = actual.float(), expected.float()
    bad = (a - e).abs() > atol + rtol * e.abs()
    if bad.any():
        idx = bad.nonzero()[:4].tolist()
        raise AssertionError(
            f"{name}: {int(bad.sum())} element(s) off by more than one rounding step, first at "
            f"{idx}: got {a[bad][:4].tolist()}, expected {e[bad][:4].tolist()}")
    frac = (_bits(actual) != _bits(expected)).float().mean().item()
    assert frac <= max_mismatch_frac, f"{name}: {frac:.2%} of elements not bit-identical"


def written_mask(cache, batch, cache_seqlens, seqlen_new, cache_batch_idx=None, block_table=None):
    """Bool (cache.shape[0], cache.shape[1]): the cache rows flash_attn_with_kvcache writes
    (new row t of entry i at row cache_seqlens[i] + t of cache batch row cache_batch_idx[i], or
    of its page when block_table is given)."""
    mask = torch.zeros(cache.shape[0], cache.shape[1], dtype=torch.bool, device=cache.device)
    cs = _as_long_vector(cache_seqlens, batch, "cpu").tolist()
    bidx = None if cache_batch_idx is None else torch.as_tensor(cache_batch_idx).tolist()
    bt_cpu = block_table.cpu() if block_table is not None else None
    for i in range(batch):
        for t in range(seqlen_new):
            j = cs[i] + t
            if block_table is not None:
                blk, off = paged_row(bt_cpu, cache.shape[1], i, j)
                mask[blk, off] = True
            else:
                mask[bidx[i] if bidx is not None else i, j] = True
    return mask
