"""Paged copies of a contiguous decode K/V cache, shared by the decode benchmark scripts."""

from __future__ import annotations

import torch


def make_paged(k, v, batch, seqlen_k, page, shuffle=True):
    """K/V of layout (batch * seqlen_k, kv_heads, d) as a paged cache of `page`-token pages:
    (k_paged, v_paged, block_table), k_paged (batch * seqlen_k / page, page, kv_heads, d) and
    block_table (batch, seqlen_k / page) int32, where block_table[b, j] is the physical page holding
    tokens j*page .. (j+1)*page - 1 of sequence b. shuffle=True copies the pages to a random
    permutation (no two consecutive pages of a sequence adjacent, in general; K+V bytes allocated
    once more, no larger temporary); shuffle=False returns views of k / v in logical order."""
    if seqlen_k % page:
        raise ValueError(f"seqlen_k {seqlen_k} is not a multiple of the page size {page}")
    npages = seqlen_k // page
    nblocks = batch * npages
    kv_heads, d = k.shape[1], k.shape[2]
    k_lin, v_lin = k.view(nblocks, page, kv_heads, d), v.view(nblocks, page, kv_heads, d)
    if not shuffle:
        perm = torch.arange(nblocks, device=k.device)
        return k_lin, v_lin, perm.view(batch, npages).to(torch.int32).contiguous()
    perm = torch.randperm(nblocks, device=k.device)  # logical page i -> physical page perm[i]
    k_paged, v_paged = torch.empty_like(k_lin), torch.empty_like(v_lin)
    k_paged.index_copy_(0, perm, k_lin)
    v_paged.index_copy_(0, perm, v_lin)
    return k_paged, v_paged, perm.view(batch, npages).to(torch.int32).contiguous()
