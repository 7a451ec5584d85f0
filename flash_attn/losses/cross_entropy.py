"""CrossEntropyLoss module with the API of flash-attn 2.8's flash_attn.losses.cross_entropy,
running the fused Triton kernels of flash_attn.ops.triton.cross_entropy."""

import torch.nn as nn

from flash_attn.ops.triton.cross_entropy import cross_entropy_loss

_REDUCTIONS = ("mean", "none", "sum")


class CrossEntropyLoss(nn.Module):
    def __init__(
        self,
        ignore_index=-100,
        reduction="mean",
        label_smoothing=0.0,
        logit_scale=1.0,
        lse_square_scale=0.0,
        inplace_backward=False,
        process_group=None,
        return_z_loss=False,
    ):
        """
        ignore_index: rows with this label get loss 0 and no gradient; "mean" averages over the
            other rows.
        reduction: "mean", "sum" or "none".
        label_smoothing: weight of the uniform distribution in the target.
        logit_scale: logits are multiplied by it first.
        lse_square_scale: adds the z-loss lse_square_scale * logsumexp(logits)^2 to the loss.
        inplace_backward: the backward writes the gradient over the logits, saving memory.
        process_group (vocabulary split across ranks): not implemented in this build.
        return_z_loss: forward also returns the z-loss part, reduced alike, for logging only.
        """
        super().__init__()
        if reduction not in _REDUCTIONS:
            raise NotImplementedError(f"CrossEntropyLoss: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
        if process_group is not None:
            raise NotImplementedError(
                "CrossEntropyLoss: process_group (vocabulary split across ranks) is not implemented in this build"
            )
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.logit_scale = logit_scale
        self.lse_square_scale = lse_square_scale
        self.inplace_backward = inplace_backward
        self.process_group = process_group
        self.return_z_loss = return_z_loss

    def _reduce(self, per_row, target):
        if self.reduction == "mean":
            return per_row.sum() / (target != self.ignore_index).sum()
        if self.reduction == "sum":
            return per_row.sum()
        return per_row

    def forward(self, input, target, precomputed_lse=None):
        """input: (rows, classes) logits; target: (rows,) labels.
        Returns the float32 loss ((rows,) for reduction "none", else a scalar), and the z-loss
        likewise when return_z_loss."""
        loss, z_loss = cross_entropy_loss(
            input,
            target,
            precomputed_lse=precomputed_lse,
            label_smoothing=self.label_smoothing,
            logit_scale=self.logit_scale,
            lse_square_scale=self.lse_square_scale,
            ignore_index=self.ignore_index,
            inplace_backward=self.inplace_backward,
        )
        loss = self._reduce(loss, target)
        if not self.return_z_loss:
            return loss
        return loss, self._reduce(z_loss, target)
