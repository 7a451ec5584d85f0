"""Dropout + residual add + RMSNorm with the API of flash-attn 2.8.3's flash_attn.ops.rms_norm:
the functions of flash_attn.ops.layer_norm with x / rms(x) in place of the LayerNorm (same
arguments, return values, Triton kernel and differences from upstream; see that module)."""

import torch
from torch.nn import init

from flash_attn.ops.layer_norm import (
    _dropout_add_norm,
    _dropout_add_norm_parallel_residual,
    _dropout_add_norm_subset,
)

__all__ = [
    "rms_norm",
    "dropout_add_rms_norm",
    "dropout_add_rms_norm_subset",
    "dropout_add_rms_norm_parallel_residual",
    "RMSNorm",
    "DropoutAddRMSNorm",
]


def rms_norm(x, weight, epsilon):
    """RMSNorm of x's last dimension, without bias."""
    return dropout_add_rms_norm(x, None, weight, None, 0.0, epsilon)


def dropout_add_rms_norm(
    x0,
    residual,
    weight,
    bias,
    dropout_p,
    epsilon,
    rowscale=None,
    layerscale=None,
    prenorm=False,
    residual_in_fp32=False,
    return_dropout_mask=False,
):
    """RMSNorm of dropout(x0 * layerscale) * rowscale + residual, times weight (+ bias).
    residual_in_fp32 only has an effect if residual is None; otherwise x has residual's dtype."""
    return _dropout_add_norm(
        x0, residual, weight, bias, dropout_p, epsilon, rowscale, layerscale, prenorm, residual_in_fp32,
        return_dropout_mask, is_rms_norm=True,
    )


def dropout_add_rms_norm_subset(
    x0,
    residual,
    weight,
    bias,
    dropout_p,
    epsilon,
    layerscale=None,
    x0_subset=None,
    out_subset=None,
    rowscale_const=1.0,
    out_numrows=0,
    prenorm=False,
    residual_in_fp32=False,
    return_dropout_mask=False,
):
    """dropout_add_rms_norm with every row scaled by rowscale_const. x0_subset and out_subset
    raise NotImplementedError; out_numrows is only read with out_subset."""
    return _dropout_add_norm_subset(
        x0, residual, weight, bias, dropout_p, epsilon, layerscale, x0_subset, out_subset, rowscale_const,
        prenorm, residual_in_fp32, return_dropout_mask, is_rms_norm=True,
    )


def dropout_add_rms_norm_parallel_residual(
    x0,
    x1,
    residual,
    weight0,
    bias0,
    weight1,
    bias1,
    dropout_p,
    epsilon,
    prenorm=False,
    residual_in_fp32=False,
    return_dropout_mask=False,
):
    """dropout_add_layer_norm_parallel_residual with RMSNorm."""
    return _dropout_add_norm_parallel_residual(
        x0, x1, residual, weight0, bias0, weight1, bias1, dropout_p, epsilon, prenorm, residual_in_fp32,
        return_dropout_mask, is_rms_norm=True,
    )


class RMSNorm(torch.nn.Module):
    """rms_norm as a module (weight only; bias is registered as None, as upstream)."""

    def __init__(self, hidden_size, eps=1e-5, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.empty(hidden_size, device=device, dtype=dtype))
        self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self):
        init.ones_(self.weight)

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


class DropoutAddRMSNorm(torch.nn.Module):
    """dropout_add_rms_norm as a module: forward(x0, residual=None), dropout p in training only."""

    def __init__(
        self,
        hidden_size,
        prenorm=False,
        p=0.0,
        eps=1e-5,
        residual_in_fp32=False,
        device=None,
        dtype=None,
    ):
        super().__init__()
        self.prenorm = prenorm
        self.p = p
        self.eps = eps
        self.residual_in_fp32 = residual_in_fp32
        self.weight = torch.nn.Parameter(torch.empty(hidden_size, device=device, dtype=dtype))
        self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self):
        init.ones_(self.weight)

    def forward(self, x0, residual=None):
        return dropout_add_rms_norm(
            x0,
            residual,
            self.weight,
            None,
            self.p if self.training else 0.0,
            self.eps,
            prenorm=self.prenorm,
            residual_in_fp32=self.residual_in_fp32,
        )
