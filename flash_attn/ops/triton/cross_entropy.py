"""Cross-entropy loss with label smoothing, logit scaling and z-loss, as two Triton kernels, with
the API of flash-attn 2.8's flash_attn.ops.triton.cross_entropy.

Forward, one program per row: an online max / sum-of-exponentials over column blocks gives the
row's logsumexp without materializing the softmax; loss = lse - logit[label] (smoothed), plus the
z-loss lse_square_scale * lse^2. Backward, one program per (row, column block): recomputes the
softmax from the saved lse and writes dloss * (softmax - target), optionally over the logits
themselves to save a vocabulary-sized buffer.
"""

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from flash_attn.ops.triton.launch import check_device, device_guard

_FWD_MAX_BLOCK = 16384
_BWD_MAX_BLOCK = 4096


@triton.jit
def _cross_entropy_fwd_kernel(
    LOSS,
    LSE,
    Z_LOSS,
    LOGITS,
    LABELS,
    smoothing,
    logit_scale,
    lse_square_scale,
    ignore_index,
    n_cols,
    stride_logits_row,
    HAS_SMOOTHING: tl.constexpr,
    PRECOMPUTED_LSE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_logits = LOGITS + row * stride_logits_row
    logit_sum = 0.0
    if PRECOMPUTED_LSE:
        lse = tl.load(LSE + row)
    else:
        running_max = -float("inf")
        running_sum = 0.0
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            z = tl.load(row_logits + cols, mask=cols < n_cols, other=-float("inf")).to(tl.float32) * logit_scale
            if HAS_SMOOTHING:
                logit_sum += tl.sum(tl.where(cols < n_cols, z, 0.0), axis=0)
            new_max = tl.maximum(running_max, tl.max(z, axis=0))
            running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(z - new_max), axis=0)
            running_max = new_max
        lse = running_max + tl.log(running_sum)
        tl.store(LSE + row, lse)

    label = tl.load(LABELS + row)
    ignored = label == ignore_index
    label_in_row = (label >= 0) & (label < n_cols) & ~ignored
    z_label = tl.load(row_logits + label, mask=label_in_row, other=0.0).to(tl.float32) * logit_scale
    # Smoothing spreads `smoothing` of the target mass evenly over all classes.
    mean_logit = logit_sum / n_cols
    loss = tl.where(
        label_in_row,
        lse - smoothing * mean_logit - (1.0 - smoothing) * z_label,
        smoothing * (lse - mean_logit),
    )
    z_loss = lse_square_scale * lse * lse
    tl.store(LOSS + row, tl.where(ignored, 0.0, loss + z_loss))
    tl.store(Z_LOSS + row, tl.where(ignored, 0.0, z_loss))


@triton.jit
def _cross_entropy_bwd_kernel(
    DLOGITS,
    DLOSS,
    LOGITS,
    LSE,
    LABELS,
    smoothing,
    logit_scale,
    lse_square_scale,
    ignore_index,
    n_cols,
    stride_logits_row,
    stride_dlogits_row,
    stride_dloss_row,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    in_row = cols < n_cols
    label = tl.load(LABELS + row)
    dloss = tl.load(DLOSS + row * stride_dloss_row).to(tl.float32)
    dloss = tl.where(label == ignore_index, 0.0, dloss)
    lse = tl.load(LSE + row)
    z = tl.load(LOGITS + row * stride_logits_row + cols, mask=in_row, other=0.0).to(tl.float32) * logit_scale
    # d(lse_square_scale * lse^2)/dz = 2 * lse_square_scale * lse * softmax.
    probs = tl.exp(z - lse) * (1.0 + 2.0 * lse_square_scale * lse)
    target = tl.where(cols == label, 1.0 - smoothing, 0.0) + smoothing / n_cols
    dz = (probs - target) * (dloss * logit_scale)
    tl.store(DLOGITS + row * stride_dlogits_row + cols, dz.to(DLOGITS.dtype.element_ty), mask=in_row)


def _fwd_num_warps(block):
    return 4 if block < 2048 else (8 if block < 8192 else 16)


class CrossEntropyLoss(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        logits,
        labels,
        precomputed_lse=None,
        smoothing=0.0,
        logit_scale=1.0,
        lse_square_scale=0.0,
        ignore_index=-100,
        inplace_backward=False,
        process_group=None,
    ):
        if process_group is not None:
            raise NotImplementedError(
                "cross_entropy_loss: process_group (vocabulary split across ranks) is not implemented in this build"
            )
        if logits.dim() != 2 or labels.shape != logits.shape[:1]:
            raise ValueError(
                f"cross_entropy_loss: logits must be (rows, classes) and labels (rows,), got "
                f"{tuple(logits.shape)} and {tuple(labels.shape)}"
            )
        if logit_scale <= 0.0:
            raise ValueError(f"cross_entropy_loss: logit_scale must be positive, got {logit_scale}")
        check_device(logits, labels, precomputed_lse)
        n_rows, n_cols = logits.shape
        if logits.stride(-1) != 1:
            logits = logits.contiguous()
        labels = labels.contiguous()
        # A given lse already includes everything the forward would recompute only without
        # smoothing (which needs the logit sum) and without scaling.
        use_precomputed_lse = precomputed_lse is not None and logit_scale == 1.0 and smoothing == 0.0
        if use_precomputed_lse:
            lse = precomputed_lse.to(torch.float32).contiguous()
        else:
            lse = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
        losses = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
        z_losses = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
        if n_rows > 0:
            block = min(triton.next_power_of_2(n_cols), _FWD_MAX_BLOCK)
            with device_guard(logits):
                _cross_entropy_fwd_kernel[(n_rows,)](
                    losses,
                    lse,
                    z_losses,
                    logits,
                    labels,
                    float(smoothing),
                    float(logit_scale),
                    float(lse_square_scale),
                    ignore_index,
                    n_cols,
                    logits.stride(0),
                    HAS_SMOOTHING=smoothing > 0.0,
                    PRECOMPUTED_LSE=use_precomputed_lse,
                    BLOCK=block,
                    num_warps=_fwd_num_warps(block),
                )
        ctx.save_for_backward(logits, lse, labels)
        ctx.mark_non_differentiable(z_losses)
        ctx.smoothing = float(smoothing)
        ctx.logit_scale = float(logit_scale)
        ctx.lse_square_scale = float(lse_square_scale)
        ctx.ignore_index = ignore_index
        ctx.inplace_backward = inplace_backward
        return losses, z_losses

    @staticmethod
    def backward(ctx, grad_losses, grad_z_losses):
        # z_losses are reported for logging; their gradient is ignored.
        logits, lse, labels = ctx.saved_tensors
        dlogits = logits if ctx.inplace_backward else torch.empty_like(logits)
        n_rows, n_cols = logits.shape
        if n_rows > 0 and n_cols > 0:
            block = min(triton.next_power_of_2(n_cols), _BWD_MAX_BLOCK)
            with device_guard(logits):
                _cross_entropy_bwd_kernel[(n_rows, triton.cdiv(n_cols, block))](
                    dlogits,
                    grad_losses,
                    logits,
                    lse,
                    labels,
                    ctx.smoothing,
                    ctx.logit_scale,
                    ctx.lse_square_scale,
                    ctx.ignore_index,
                    n_cols,
                    logits.stride(0),
                    dlogits.stride(0),
                    grad_losses.stride(0),
                    BLOCK=block,
                    num_warps=4 if block < 2048 else 8,
                )
        return dlogits, None, None, None, None, None, None, None, None


def cross_entropy_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    precomputed_lse: Optional[torch.Tensor] = None,
    label_smoothing: float = 0.0,
    logit_scale: float = 1.0,
    lse_square_scale: float = 0.0,
    ignore_index=-100,
    inplace_backward: bool = False,
    process_group=None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-row cross entropy of logits (rows, classes) against labels (rows,).

    label_smoothing: weight of the uniform distribution in the target.
    logit_scale: logits are multiplied by it first.
    lse_square_scale: adds the z-loss lse_square_scale * logsumexp(logits)^2 to every loss.
    ignore_index: rows with this label get loss 0 and no gradient.
    inplace_backward: the backward writes the gradient over the logits.
    precomputed_lse: (rows,) logsumexp of the logits, used when there is no smoothing or scaling.
    process_group (vocabulary split across ranks) raises NotImplementedError.
    Returns (losses, z_losses), both float32 (rows,); z_losses carries no gradient.
    """
    return CrossEntropyLoss.apply(
        logits,
        labels,
        precomputed_lse,
        label_smoothing,
        logit_scale,
        lse_square_scale,
        ignore_index,
        inplace_backward,
        process_group,
    )
