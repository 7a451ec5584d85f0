"""Rotary position embedding as one Triton kernel.

Each program rotates a (BLOCK_M positions x BLOCK_H heads x rotary_dim) tile: it loads the two
halves of every rotated pair (first/second half of the rotary dims, or even/odd dims when
interleaved), computes in float32 and stores in the output dtype. Dimensions past rotary_dim are
not touched by the kernel.
"""

from typing import Optional, Union

import torch
import triton
import triton.language as tl

from flash_attn.ops.triton.launch import check_device, device_guard

# Elements per tile: four float32 tiles of this size (two inputs, two outputs) stay in registers
# at four warps.
_TILE_ELEMENTS = 2048


@triton.jit
def _rotary_kernel(
    OUT,
    X,
    COS,
    SIN,
    CU_SEQLENS,
    SEQLEN_OFFSETS,  # an int, or a pointer to one offset per sequence
    seqlen,
    nheads,
    seqlen_ro,
    stride_out_batch,
    stride_out_seqlen,
    stride_out_nheads,
    stride_out_headdim,
    stride_x_batch,
    stride_x_seqlen,
    stride_x_nheads,
    stride_x_headdim,
    # constexpr so the compiler sees that the mask is uniform over vectors and emits wide loads
    ROTARY_DIM_HALF: tl.constexpr,
    IS_SEQLEN_OFFSETS_TENSOR: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    CONJUGATE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # Axis 0 walks (sequence, position block) pairs: only it may exceed 65535 programs.
    num_m_blocks = tl.cdiv(seqlen, BLOCK_M)
    pid_batch = tl.program_id(0) // num_m_blocks
    pid_m = tl.program_id(0) % num_m_blocks
    pid_head = tl.program_id(1)

    if IS_VARLEN:
        seq_start = tl.load(CU_SEQLENS + pid_batch).to(tl.int64)
        seq_len = tl.load(CU_SEQLENS + pid_batch + 1).to(tl.int64) - seq_start
        X = X + seq_start * stride_x_seqlen
        OUT = OUT + seq_start * stride_out_seqlen
    else:
        seq_len = seqlen
        X = X + pid_batch.to(tl.int64) * stride_x_batch
        OUT = OUT + pid_batch.to(tl.int64) * stride_out_batch

    if IS_SEQLEN_OFFSETS_TENSOR:
        offset = tl.load(SEQLEN_OFFSETS + pid_batch)
    else:
        offset = SEQLEN_OFFSETS

    # int64 positions: position * seqlen stride overflows int32 on long packed batches.
    rm = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rh = pid_head * BLOCK_H + tl.arange(0, BLOCK_H)
    rk = tl.arange(0, BLOCK_K)
    row_ok = rm < seq_len
    k_ok = rk < ROTARY_DIM_HALF

    # Positions past the cos/sin table are left unrotated (cos=1, sin=0).
    pos = rm + offset
    cs_mask = (row_ok & (pos < seqlen_ro))[:, None] & k_ok[None, :]
    cs_offsets = pos[:, None] * ROTARY_DIM_HALF + rk[None, :]
    cos = tl.load(COS + cs_offsets, mask=cs_mask, other=1.0).to(tl.float32)[:, None, :]
    sin = tl.load(SIN + cs_offsets, mask=cs_mask, other=0.0).to(tl.float32)[:, None, :]
    if CONJUGATE:
        sin = -sin

    if INTERLEAVED:
        k_first = 2 * rk
        k_second = 2 * rk + 1
    else:
        k_first = rk
        k_second = rk + ROTARY_DIM_HALF

    mask = row_ok[:, None, None] & (rh < nheads)[None, :, None] & k_ok[None, None, :]
    x_rows = X + rm[:, None, None] * stride_x_seqlen + rh[None, :, None] * stride_x_nheads
    out_rows = OUT + rm[:, None, None] * stride_out_seqlen + rh[None, :, None] * stride_out_nheads
    x0 = tl.load(x_rows + k_first[None, None, :] * stride_x_headdim, mask=mask, other=0.0)
    x1 = tl.load(x_rows + k_second[None, None, :] * stride_x_headdim, mask=mask, other=0.0)
    x0 = x0.to(tl.float32)
    x1 = x1.to(tl.float32)
    out0 = x0 * cos - x1 * sin
    out1 = x0 * sin + x1 * cos
    out_dtype = OUT.dtype.element_ty
    tl.store(out_rows + k_first[None, None, :] * stride_out_headdim, out0.to(out_dtype), mask=mask)
    tl.store(out_rows + k_second[None, None, :] * stride_out_headdim, out1.to(out_dtype), mask=mask)


def apply_rotary(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    seqlen_offsets: Union[int, torch.Tensor] = 0,
    cu_seqlens: Optional[torch.Tensor] = None,
    max_seqlen: Optional[int] = None,
    interleaved=False,
    inplace=False,
    conjugate=False,
) -> torch.Tensor:
    """Rotates the first rotary_dim = 2 * cos.shape[-1] dims of every head of x.

    x: (batch, seqlen, nheads, headdim), or (total_seqlen, nheads, headdim) with cu_seqlens
        (batch + 1,) int32 and max_seqlen.
    cos, sin: (seqlen_ro, rotary_dim / 2); position p of sequence b uses row p + offset[b].
    seqlen_offsets: int, or (batch,) int32/int64 tensor.
    interleaved: rotate pairs (2i, 2i+1) (GPT-J) instead of (i, i + rotary_dim/2) (GPT-NeoX).
    inplace: write into x and return it.
    conjugate: rotate by -angle (the backward of the forward rotation).
    Returns the rotated tensor, same shape and dtype as x.
    """
    is_varlen = cu_seqlens is not None
    if is_varlen:
        if max_seqlen is None:
            raise ValueError("apply_rotary: max_seqlen must be given with cu_seqlens")
        if x.dim() != 3:
            raise ValueError(f"apply_rotary: varlen x must be (total, nheads, headdim), got {tuple(x.shape)}")
        _, nheads, headdim = x.shape
        batch = cu_seqlens.shape[0] - 1
        seqlen = max_seqlen
    else:
        if x.dim() != 4:
            raise ValueError(f"apply_rotary: x must be (batch, seqlen, nheads, headdim), got {tuple(x.shape)}")
        batch, seqlen, nheads, headdim = x.shape
    if cos.dim() != 2 or cos.shape != sin.shape:
        raise ValueError(
            f"apply_rotary: cos and sin must both be (seqlen_ro, rotary_dim / 2), "
            f"got {tuple(cos.shape)} and {tuple(sin.shape)}"
        )
    seqlen_ro, rotary_dim_half = cos.shape
    if 2 * rotary_dim_half > headdim:
        raise ValueError(f"apply_rotary: rotary_dim {2 * rotary_dim_half} exceeds headdim {headdim}")
    if seqlen_ro < seqlen:
        raise ValueError(f"apply_rotary: cos/sin cover {seqlen_ro} positions, need {seqlen}")
    if isinstance(seqlen_offsets, torch.Tensor):
        if seqlen_offsets.shape != (batch,) or seqlen_offsets.dtype not in (torch.int32, torch.int64):
            raise ValueError("apply_rotary: a seqlen_offsets tensor must be (batch,) int32 or int64")
        seqlen_offsets = seqlen_offsets.contiguous()
    elif seqlen_offsets + seqlen > seqlen_ro:
        raise ValueError(
            f"apply_rotary: seqlen_offsets {seqlen_offsets} + seqlen {seqlen} exceeds the "
            f"{seqlen_ro} positions of cos/sin"
        )
    check_device(x, cos, sin, cu_seqlens, seqlen_offsets if isinstance(seqlen_offsets, torch.Tensor) else None)
    cos, sin = cos.contiguous(), sin.contiguous()

    out = x if inplace else torch.empty_like(x)
    if not inplace and 2 * rotary_dim_half < headdim:
        out[..., 2 * rotary_dim_half :].copy_(x[..., 2 * rotary_dim_half :])
    if batch == 0 or seqlen == 0 or nheads == 0 or rotary_dim_half == 0:
        return out

    block_k = triton.next_power_of_2(rotary_dim_half)
    block_h = min(triton.next_power_of_2(nheads), max(1, _TILE_ELEMENTS // (8 * block_k)))
    block_m = max(1, _TILE_ELEMENTS // (block_k * block_h))
    block_m = min(block_m, triton.next_power_of_2(seqlen))
    grid = (batch * triton.cdiv(seqlen, block_m), triton.cdiv(nheads, block_h))
    with device_guard(x):
        _rotary_kernel[grid](
            out,
            x,
            cos,
            sin,
            cu_seqlens,
            seqlen_offsets,
            seqlen,
            nheads,
            seqlen_ro,
            0 if is_varlen else out.stride(0),
            out.stride(-3),
            out.stride(-2),
            out.stride(-1),
            0 if is_varlen else x.stride(0),
            x.stride(-3),
            x.stride(-2),
            x.stride(-1),
            ROTARY_DIM_HALF=rotary_dim_half,
            IS_SEQLEN_OFFSETS_TENSOR=isinstance(seqlen_offsets, torch.Tensor),
            IS_VARLEN=is_varlen,
            INTERLEAVED=interleaved,
            CONJUGATE=conjugate,
            BLOCK_M=block_m,
            BLOCK_H=block_h,
            BLOCK_K=block_k,
            num_warps=4,
        )
    return out
