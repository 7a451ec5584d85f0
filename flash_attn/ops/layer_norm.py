"""Dropout + residual add + LayerNorm with the API of flash-attn 2.8.3's flash_attn.ops.layer_norm.

Upstream runs these on its separately built dropout_layer_norm CUDA extension; here they run the
Triton kernel of flash_attn.ops.triton.layer_norm (layer_norm_fn), imported at call time, so
importing this module needs neither triton nor a GPU, and calling it needs both. The argument
order and return values are upstream's:

    x = dropout(x0 * layerscale) * rowscale + residual    (layerscale per column, rowscale per row)
    z = norm(x) * weight + bias
    returns z; (z, x) with prenorm; a dropout mask appended with return_dropout_mask.

Where this module differs from upstream's:
  * layerscale multiplies x0 in PyTorch before the kernel (the same value as upstream's fused
    column scale, since dropout and a column scale commute; one more elementwise op);
  * dropout_add_layer_norm_subset raises NotImplementedError for x0_subset / out_subset (row
    subsets, which the Triton kernel has no form of); without them it is dropout_add_layer_norm
    with every row scaled by rowscale_const;
  * dropout_add_layer_norm_parallel_residual drops out x1 and adds it to the residual in PyTorch,
    then runs the kernel on x0 and, for weight1, a second time on the sum (upstream: one kernel);
  * the dropout masks are uint8 (1 = kept) as upstream's, from the Triton kernel's random stream,
    so they differ from upstream's for the same seed; the kernel's z has x0's dtype.
"""

import torch
from torch.nn import init

__all__ = [
    "layer_norm",
    "dropout_add_layer_norm",
    "dropout_add_layer_norm_subset",
    "dropout_add_layer_norm_parallel_residual",
    "DropoutAddLayerNorm",
]


def _triton_layer_norm_fn():
    try:
        from flash_attn.ops.triton.layer_norm import layer_norm_fn
    except ImportError as e:
        raise ImportError(
            "flash_attn.ops.layer_norm runs the Triton kernel of flash_attn.ops.triton.layer_norm, "
            f"which could not be imported ({e}); install triton"
        ) from e
    return layer_norm_fn


def _upstream_mask(mask, x0, dropout_p):
    # The kernel returns a bool keep-mask, or None without dropout; upstream returns uint8 ones then.
    if mask is None or dropout_p == 0.0:
        return torch.ones(x0.shape, dtype=torch.uint8, device=x0.device)
    return mask.to(torch.uint8)


def _dropout_add_norm(
    x0,
    residual,
    weight,
    bias,
    dropout_p,
    epsilon,
    rowscale,
    layerscale,
    prenorm,
    residual_in_fp32,
    return_dropout_mask,
    is_rms_norm,
):
    """The computation of dropout_add_layer_norm and dropout_add_rms_norm (see the module's
    docstring)."""
    if layerscale is not None:
        x0 = x0 * layerscale
    outputs = _triton_layer_norm_fn()(
        x0,
        weight,
        bias,
        residual=residual,
        eps=epsilon,
        dropout_p=dropout_p,
        rowscale=rowscale,
        prenorm=prenorm,
        residual_in_fp32=residual_in_fp32,
        is_rms_norm=is_rms_norm,
        return_dropout_mask=return_dropout_mask,
    )
    if not return_dropout_mask:
        return outputs
    *normed, mask, _ = outputs
    return (*normed, _upstream_mask(mask, x0, dropout_p))


def _dropout_add_norm_subset(
    x0,
    residual,
    weight,
    bias,
    dropout_p,
    epsilon,
    layerscale,
    x0_subset,
    out_subset,
    rowscale_const,
    prenorm,
    residual_in_fp32,
    return_dropout_mask,
    is_rms_norm,
):
    """The computation of the *_subset functions: only the case without row subsets."""
    for name, value in (("x0_subset", x0_subset), ("out_subset", out_subset)):
        if value is not None:
            raise NotImplementedError(
                f"{name} (row subsets of dropout_add_layer_norm_subset / dropout_add_rms_norm_subset) "
                "is not implemented in this build: the Triton layer norm has no row subsets"
            )
    rowscale = None
    if rowscale_const != 1.0:
        rowscale = torch.full(x0.shape[:-1], rowscale_const, dtype=torch.float32, device=x0.device)
    return _dropout_add_norm(
        x0, residual, weight, bias, dropout_p, epsilon, rowscale, layerscale, prenorm, residual_in_fp32,
        return_dropout_mask, is_rms_norm,
    )


def _dropout_add_norm_parallel_residual(
    x0,
    x1,
    residual,
    weight0,
    bias0,
    weight1,
    bias1,
    dropout_p,
    epsilon,
    prenorm,
    residual_in_fp32,
    return_dropout_mask,
    is_rms_norm,
):
    """The computation of the *_parallel_residual functions:
    x = dropout(x0) + dropout(x1) + residual, z0 = norm(x; weight0, bias0), z1 = norm(x; weight1,
    bias1) (None without weight1); returns (z0, z1), then x with prenorm, then the two masks."""
    mask1 = torch.ones(x0.shape, dtype=torch.uint8, device=x0.device)
    if x1 is not None:
        dropped1 = x1
        if dropout_p > 0.0:
            keep = torch.rand(x1.shape, device=x1.device) >= dropout_p
            dropped1 = x1 * keep / (1.0 - dropout_p)
            mask1 = keep.to(torch.uint8)
        if residual is not None:
            residual = residual + dropped1
        else:
            # The kernel's pre-norm sum takes the dtype of the residual it is given.
            residual = dropped1.to(torch.float32) if residual_in_fp32 else dropped1
    z0, x, *mask0 = _dropout_add_norm(
        x0, residual, weight0, bias0, dropout_p, epsilon, None, None, True, residual_in_fp32,
        return_dropout_mask, is_rms_norm,
    )
    z1 = None
    if weight1 is not None:
        z1 = _triton_layer_norm_fn()(x, weight1, bias1, eps=epsilon, is_rms_norm=is_rms_norm, out_dtype=z0.dtype)
    outputs = (z0, z1, x) if prenorm else (z0, z1)
    return outputs + (*mask0, mask1) if return_dropout_mask else outputs


def layer_norm(x, weight, bias, epsilon):
    """LayerNorm of x's last dimension."""
    return dropout_add_layer_norm(x, None, weight, bias, 0.0, epsilon)


def dropout_add_layer_norm(
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
    """LayerNorm of dropout(x0 * layerscale) * rowscale + residual (module docstring).
    residual_in_fp32 only has an effect if residual is None; otherwise x has residual's dtype."""
    return _dropout_add_norm(
        x0, residual, weight, bias, dropout_p, epsilon, rowscale, layerscale, prenorm, residual_in_fp32,
        return_dropout_mask, is_rms_norm=False,
    )


def dropout_add_layer_norm_subset(
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
    """dropout_add_layer_norm with every row scaled by rowscale_const. x0_subset and out_subset
    raise NotImplementedError; out_numrows is only read with out_subset."""
    return _dropout_add_norm_subset(
        x0, residual, weight, bias, dropout_p, epsilon, layerscale, x0_subset, out_subset, rowscale_const,
        prenorm, residual_in_fp32, return_dropout_mask, is_rms_norm=False,
    )


def dropout_add_layer_norm_parallel_residual(
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
    """x = dropout(x0) + dropout(x1) + residual (x1, residual optional); returns
    (LayerNorm(x; weight0, bias0), LayerNorm(x; weight1, bias1) or None without weight1), then x
    with prenorm, then the masks of x0 and x1 with return_dropout_mask."""
    return _dropout_add_norm_parallel_residual(
        x0, x1, residual, weight0, bias0, weight1, bias1, dropout_p, epsilon, prenorm, residual_in_fp32,
        return_dropout_mask, is_rms_norm=False,
    )


class DropoutAddLayerNorm(torch.nn.Module):
    """dropout_add_layer_norm as a module: forward(x0, residual=None), dropout p in training only."""

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
        factory_kwargs = {"device": device, "dtype": dtype}
        self.prenorm = prenorm
        self.p = p
        self.eps = eps
        self.residual_in_fp32 = residual_in_fp32
        self.weight = torch.nn.Parameter(torch.empty(hidden_size, **factory_kwargs))
        self.bias = torch.nn.Parameter(torch.empty(hidden_size, **factory_kwargs))
        self.reset_parameters()

    def reset_parameters(self):
        init.ones_(self.weight)
        init.zeros_(self.bias)

    def forward(self, x0, residual=None):
        return dropout_add_layer_norm(
            x0,
            residual,
            self.weight,
            self.bias,
            self.p if self.training else 0.0,
            self.eps,
            prenorm=self.prenorm,
            residual_in_fp32=self.residual_in_fp32,
        )
