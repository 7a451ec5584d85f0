"""flash_attn.ops.triton.layer_norm against eager PyTorch LayerNorm / RMSNorm, gradients included.

GPU: pytest tests/test_layer_norm.py. CPU: TRITON_INTERPRET=1 pytest tests/test_layer_norm.py.
"""

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton", reason="flash_attn.ops.triton.layer_norm runs Triton kernels; triton is not installed")

# poison_empty is imported for pytest to find the fixture named in pytestmark.
from triton_testing import DEVICE, DTYPES, assert_close, gpu_only, poison_empty, requires_device  # noqa: E402, F401

from flash_attn.ops.triton.layer_norm import (  # noqa: E402
    LayerNorm,
    RMSNorm,
    layer_norm_fn,
    layer_norm_linear_fn,
    layer_norm_ref,
    rms_norm_fn,
    rms_norm_ref,
)

pytestmark = [requires_device, pytest.mark.usefixtures("poison_empty")]


def norm_reference(x, weight, bias, residual=None, rowscale=None, keep=None, dropout_p=0.0, eps=1e-6,
                   is_rms_norm=False, zero_centered_weight=False):
    """Returns (normalized output, pre-norm sum), computed in the dtype of the inputs."""
    h = x * rowscale[..., None] if rowscale is not None else x
    if keep is not None:
        h = torch.where(keep, h / (1.0 - dropout_p), torch.zeros_like(h))
    if residual is not None:
        h = h + residual
    w = weight + 1.0 if zero_centered_weight else weight
    if is_rms_norm:
        y = F.rms_norm(h, h.shape[-1:], weight=w, eps=eps)
        y = y + bias if bias is not None else y
    else:
        y = F.layer_norm(h, h.shape[-1:], weight=w, bias=bias, eps=eps)
    return y, h


def run_reference(dtype, tensors, grads, **kwargs):
    """norm_reference on copies of tensors in dtype; returns outputs and gradients of the inputs."""
    leaves = {k: (v.detach().to(dtype).requires_grad_(v.is_floating_point()) if v is not None else None)
              for k, v in tensors.items()}
    y, h = norm_reference(leaves["x"], leaves["weight"], leaves["bias"], leaves["residual"], **kwargs)
    torch.autograd.backward([y, h], [grads[0].to(dtype), grads[1].to(dtype)])
    return (y, h), {k: v.grad for k, v in leaves.items() if v is not None and v.requires_grad}


# name: (has_residual, prenorm, residual_in_fp32, has_rowscale)
CONFIGS = {
    "plain": (False, False, False, False),
    "prenorm_no_residual": (False, True, False, False),
    "residual": (True, False, False, False),
    "residual_prenorm": (True, True, False, False),
    "fp32_stream_prenorm": (False, True, True, False),
    "fp32_residual_prenorm": (True, True, True, False),
    "rowscale_residual_prenorm": (True, True, False, True),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("is_rms_norm", [False, True])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_norm_fn(dtype, is_rms_norm, config):
    has_residual, prenorm, residual_in_fp32, has_rowscale = CONFIGS[config]
    shape, eps = (3, 5, 100), 1e-5
    n = shape[-1]
    x = torch.randn(shape, device=DEVICE, dtype=dtype, requires_grad=True)
    weight = (1 + 0.3 * torch.randn(n, device=DEVICE, dtype=dtype)).requires_grad_()
    bias = (0.3 * torch.randn(n, device=DEVICE, dtype=dtype)).requires_grad_()
    residual_dtype = torch.float32 if residual_in_fp32 else dtype
    residual = torch.randn(shape, device=DEVICE, dtype=residual_dtype, requires_grad=True) if has_residual else None
    rowscale = torch.rand(shape[:-1], device=DEVICE, dtype=dtype) + 0.5 if has_rowscale else None

    fn = rms_norm_fn if is_rms_norm else layer_norm_fn
    result = fn(x, weight, bias, residual=residual, eps=eps, rowscale=rowscale, prenorm=prenorm,
                residual_in_fp32=residual_in_fp32)
    y, pre_norm = result if prenorm else (result, None)
    if prenorm:
        expected_dtype = residual.dtype if has_residual else (torch.float32 if residual_in_fp32 else dtype)
        assert pre_norm.dtype == expected_dtype and pre_norm.shape == shape
    assert y.dtype == dtype
    dy = torch.randn_like(y)
    dpre = torch.randn(shape, device=DEVICE, dtype=pre_norm.dtype) if prenorm else torch.zeros(shape, device=DEVICE)
    torch.autograd.backward([y, pre_norm] if prenorm else [y], [dy, dpre] if prenorm else [dy])

    tensors = dict(x=x, weight=weight, bias=bias, residual=residual)
    kwargs = dict(rowscale=rowscale, eps=eps, is_rms_norm=is_rms_norm)
    (y_ref, h_ref), grads_ref = run_reference(torch.float32, tensors, (dy, dpre), **kwargs)
    (y_lowp, h_lowp), grads_lowp = run_reference(dtype, tensors, (dy, dpre), **kwargs)
    assert_close(y, y_ref, y_lowp, "y")
    if prenorm:
        assert_close(pre_norm, h_ref, h_lowp, "residual_out")
    ours = dict(x=x.grad, weight=weight.grad, bias=bias.grad, residual=residual.grad if has_residual else None)
    for name, grad_ref in grads_ref.items():
        assert ours[name].dtype == tensors[name].dtype, f"d{name} dtype"
        assert_close(ours[name], grad_ref, grads_lowp[name], f"d{name}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("is_rms_norm", [False, True])
def test_dropout_mask_is_reproduced_in_backward(dtype, is_rms_norm):
    shape, dropout_p = (6, 257), 0.3
    x = torch.randn(shape, device=DEVICE, dtype=dtype, requires_grad=True)
    weight = torch.randn(shape[-1], device=DEVICE, dtype=dtype, requires_grad=True)
    residual = torch.randn(shape, device=DEVICE, dtype=dtype, requires_grad=True)
    rowscale = torch.rand(shape[0], device=DEVICE, dtype=dtype) + 0.5
    y, pre_norm, mask, mask1 = layer_norm_fn(
        x, weight, None, residual=residual, dropout_p=dropout_p, rowscale=rowscale, prenorm=True,
        is_rms_norm=is_rms_norm, return_dropout_mask=True,
    )
    assert mask.dtype == torch.bool and mask.shape == shape and mask1 is None
    kept = mask.float().mean().item()
    assert abs(kept - (1 - dropout_p)) < 0.06, f"kept fraction {kept}"
    dy, dpre = torch.randn_like(y), torch.randn_like(pre_norm)
    torch.autograd.backward([y, pre_norm], [dy, dpre])

    tensors = dict(x=x, weight=weight, bias=None, residual=residual)
    kwargs = dict(rowscale=rowscale, keep=mask, dropout_p=dropout_p, is_rms_norm=is_rms_norm)
    (y_ref, h_ref), grads_ref = run_reference(torch.float32, tensors, (dy, dpre), **kwargs)
    (y_lowp, h_lowp), grads_lowp = run_reference(dtype, tensors, (dy, dpre), **kwargs)
    assert_close(y, y_ref, y_lowp, "y")
    assert_close(pre_norm, h_ref, h_lowp, "residual_out")
    assert_close(x.grad, grads_ref["x"], grads_lowp["x"], "dx")
    assert_close(residual.grad, grads_ref["residual"], grads_lowp["residual"], "dresidual")
    assert_close(weight.grad, grads_ref["weight"], grads_lowp["weight"], "dweight")


def test_dropout_draws_differ_between_calls():
    x = torch.randn(4, 128, device=DEVICE)
    weight = torch.ones(128, device=DEVICE)
    _, first, _ = layer_norm_fn(x, weight, None, dropout_p=0.5, return_dropout_mask=True)
    _, second, _ = layer_norm_fn(x, weight, None, dropout_p=0.5, return_dropout_mask=True)
    assert not torch.equal(first, second)


@pytest.mark.parametrize("is_rms_norm", [False, True])
def test_preallocated_outputs(is_rms_norm):
    shape = (4, 3, 72)
    x = torch.randn(shape, device=DEVICE, dtype=torch.float16)
    residual = torch.randn(shape, device=DEVICE, dtype=torch.float16)
    weight = torch.randn(shape[-1], device=DEVICE)
    bias = torch.randn(shape[-1], device=DEVICE)
    out = torch.full(shape, float("nan"), device=DEVICE, dtype=torch.float32)
    residual_out = torch.full(shape, float("nan"), device=DEVICE, dtype=torch.float16)
    y, pre_norm = layer_norm_fn(x, weight, bias, residual=residual, prenorm=True, is_rms_norm=is_rms_norm,
                                out_dtype=torch.float32, out=out, residual_out=residual_out)
    assert y.data_ptr() == out.data_ptr() and pre_norm.data_ptr() == residual_out.data_ptr()
    y_ref, h_ref = norm_reference(x.float(), weight, bias, residual.float(), is_rms_norm=is_rms_norm)
    y_lowp, h_lowp = norm_reference(x, weight.half(), bias.half(), residual, is_rms_norm=is_rms_norm)
    assert_close(out, y_ref, y_lowp, "out")
    assert_close(residual_out, h_ref, h_lowp, "residual_out")


@pytest.mark.parametrize("is_rms_norm", [False, True])
def test_zero_centered_weight(is_rms_norm):
    x = torch.randn(5, 48, device=DEVICE, requires_grad=True)
    weight = (0.2 * torch.randn(48, device=DEVICE)).requires_grad_()
    y = layer_norm_fn(x, weight, None, zero_centered_weight=True, is_rms_norm=is_rms_norm)
    dy = torch.randn_like(y)
    y.backward(dy)
    x_ref, w_ref = x.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    y_ref, _ = norm_reference(x_ref, w_ref, None, is_rms_norm=is_rms_norm, zero_centered_weight=True)
    y_ref.backward(dy)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(weight.grad, w_ref.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("argument", ["x1", "weight1", "bias1"])
def test_parallel_norm_is_not_implemented(argument):
    x = torch.randn(2, 16, device=DEVICE)
    weight = torch.ones(16, device=DEVICE)
    extra = {argument: x if argument == "x1" else weight}
    with pytest.raises(NotImplementedError, match=argument):
        layer_norm_fn(x, weight, None, **extra)
    with pytest.raises(NotImplementedError, match=argument):
        rms_norm_fn(x, weight, None, **extra)


@pytest.mark.parametrize("is_rms_norm", [False, True])
def test_reference_functions(is_rms_norm):
    x = torch.randn(3, 40, device=DEVICE, dtype=torch.bfloat16)
    residual = torch.randn(3, 40, device=DEVICE, dtype=torch.bfloat16)
    weight, bias = torch.randn(40, device=DEVICE), torch.randn(40, device=DEVICE)
    mask = torch.rand(3, 40, device=DEVICE) > 0.2
    ref_fn = rms_norm_ref if is_rms_norm else layer_norm_ref
    out, h = ref_fn(x, weight, bias, residual=residual, dropout_p=0.2, prenorm=True, dropout_mask=mask, upcast=True)
    y_ref, h_ref = norm_reference(x.float(), weight, bias, residual.float(), keep=mask, dropout_p=0.2,
                                  is_rms_norm=is_rms_norm)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(h, h_ref)
    torch.testing.assert_close(out, y_ref.bfloat16())


@pytest.mark.parametrize("module_class", [LayerNorm, RMSNorm])
def test_modules(module_class):
    hidden = 96
    module = module_class(hidden, eps=1e-5, device=DEVICE)
    is_rms_norm = module_class is RMSNorm
    assert set(module.state_dict()) == ({"weight"} if is_rms_norm else {"weight", "bias"})
    assert torch.equal(module.weight, torch.ones(hidden, device=DEVICE))
    with torch.no_grad():
        module.weight.mul_(2)
        if module.bias is not None:
            module.bias.add_(1)
    module.reset_parameters()
    assert torch.equal(module.weight, torch.ones(hidden, device=DEVICE))
    if module.bias is not None:
        assert torch.equal(module.bias, torch.zeros(hidden, device=DEVICE))

    with torch.no_grad():
        module.weight.normal_()
    x = torch.randn(2, 5, hidden, device=DEVICE)
    residual = torch.randn(2, 5, hidden, device=DEVICE)
    y, pre_norm = module(x, residual=residual, prenorm=True)
    y_ref, h_ref = norm_reference(x, module.weight, module.bias, residual, eps=1e-5, is_rms_norm=is_rms_norm)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pre_norm, h_ref)
    module_with_dropout = module_class(hidden, dropout_p=0.9, device=DEVICE).eval()
    torch.testing.assert_close(module_with_dropout(x), norm_reference(x, module_with_dropout.weight,
                               module_with_dropout.bias, is_rms_norm=is_rms_norm, eps=1e-5)[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("prenorm", [False, True])
def test_layer_norm_linear_fn(prenorm):
    x = torch.randn(4, 32, device=DEVICE, requires_grad=True)
    residual = torch.randn(4, 32, device=DEVICE)
    norm_weight, norm_bias = torch.randn(32, device=DEVICE), torch.randn(32, device=DEVICE)
    linear_weight = torch.randn(24, 32, device=DEVICE, requires_grad=True)
    linear_bias = torch.randn(24, device=DEVICE)
    result = layer_norm_linear_fn(x, norm_weight, norm_bias, linear_weight, linear_bias, residual=residual,
                                  prenorm=prenorm)
    out = result[0] if prenorm else result
    y_ref, h_ref = norm_reference(x, norm_weight, norm_bias, residual)
    out_ref = F.linear(y_ref, linear_weight, linear_bias)
    torch.testing.assert_close(out, out_ref, atol=1e-4, rtol=1e-4)
    if prenorm:
        torch.testing.assert_close(result[1], h_ref)
    dx, dw = torch.autograd.grad(out.sum(), [x, linear_weight])
    dx_ref, dw_ref = torch.autograd.grad(out_ref.sum(), [x, linear_weight])
    torch.testing.assert_close(dx, dx_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(dw, dw_ref, atol=1e-4, rtol=1e-4)


@gpu_only
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("is_rms_norm", [False, True])
@pytest.mark.parametrize("shape", [(4096, 4096), (1000, 8191), (64, 16384)])
def test_norm_fn_large(dtype, is_rms_norm, shape):
    x = torch.randn(shape, device=DEVICE, dtype=dtype, requires_grad=True)
    residual = torch.randn(shape, device=DEVICE, dtype=dtype, requires_grad=True)
    weight = torch.randn(shape[-1], device=DEVICE, dtype=dtype, requires_grad=True)
    bias = torch.randn(shape[-1], device=DEVICE, dtype=dtype, requires_grad=True)
    y, pre_norm = layer_norm_fn(x, weight, bias, residual=residual, prenorm=True, is_rms_norm=is_rms_norm)
    dy, dpre = torch.randn_like(y), torch.randn_like(pre_norm)
    torch.autograd.backward([y, pre_norm], [dy, dpre])
    tensors = dict(x=x, weight=weight, bias=bias, residual=residual)
    (y_ref, h_ref), grads_ref = run_reference(torch.float32, tensors, (dy, dpre), is_rms_norm=is_rms_norm)
    (y_lowp, h_lowp), grads_lowp = run_reference(dtype, tensors, (dy, dpre), is_rms_norm=is_rms_norm)
    assert_close(y, y_ref, y_lowp, "y")
    assert_close(pre_norm, h_ref, h_lowp, "residual_out")
    ours = dict(x=x.grad, weight=weight.grad, bias=bias.grad, residual=residual.grad)
    for name, grad_ref in grads_ref.items():
        assert_close(ours[name], grad_ref, grads_lowp[name], f"d{name}")
