"""flash_attn.ops.layer_norm and flash_attn.ops.rms_norm (upstream's dropout_layer_norm API over
the Triton layer norm).

CPU: signatures against flash-attn 2.8.3's, the modules' parameters, the row-subset arguments'
NotImplementedError. Triton (GPU, or TRITON_INTERPRET=1 on CPU): outputs and gradients in float32
against a PyTorch reference, the dropout masks against the outputs they produced.
"""

import inspect

import pytest
import torch
import torch.nn.functional as F

from flash_attn.ops import layer_norm as ln
from flash_attn.ops import rms_norm as rms
from triton_testing import DEVICE
from triton_testing import requires_device as requires_triton

REQUIRED = inspect.Parameter.empty
_DROPOUT_ADD = ["x0", "residual", "weight", "bias", "dropout_p", "epsilon", ("rowscale", None),
                ("layerscale", None), ("prenorm", False), ("residual_in_fp32", False),
                ("return_dropout_mask", False)]
_SUBSET = ["x0", "residual", "weight", "bias", "dropout_p", "epsilon", ("layerscale", None), ("x0_subset", None),
           ("out_subset", None), ("rowscale_const", 1.0), ("out_numrows", 0), ("prenorm", False),
           ("residual_in_fp32", False), ("return_dropout_mask", False)]
_PARALLEL = ["x0", "x1", "residual", "weight0", "bias0", "weight1", "bias1", "dropout_p", "epsilon",
             ("prenorm", False), ("residual_in_fp32", False), ("return_dropout_mask", False)]
_MODULE = ["hidden_size", ("prenorm", False), ("p", 0.0), ("eps", 1e-5), ("residual_in_fp32", False),
           ("device", None), ("dtype", None)]
UPSTREAM_SIGNATURES = {
    ln.layer_norm: ["x", "weight", "bias", "epsilon"],
    ln.dropout_add_layer_norm: _DROPOUT_ADD,
    ln.dropout_add_layer_norm_subset: _SUBSET,
    ln.dropout_add_layer_norm_parallel_residual: _PARALLEL,
    ln.DropoutAddLayerNorm: _MODULE,
    ln.DropoutAddLayerNorm.forward: ["self", "x0", ("residual", None)],
    rms.rms_norm: ["x", "weight", "epsilon"],
    rms.dropout_add_rms_norm: _DROPOUT_ADD,
    rms.dropout_add_rms_norm_subset: _SUBSET,
    rms.dropout_add_rms_norm_parallel_residual: _PARALLEL,
    rms.RMSNorm: ["hidden_size", ("eps", 1e-5), ("device", None), ("dtype", None)],
    rms.DropoutAddRMSNorm: _MODULE,
    rms.DropoutAddRMSNorm.forward: ["self", "x0", ("residual", None)],
}


@pytest.mark.parametrize("obj", list(UPSTREAM_SIGNATURES), ids=lambda o: f"{o.__module__}.{o.__qualname__}")
def test_upstream_signatures(obj):
    params = inspect.signature(obj).parameters.values()
    got = [p.name if p.default is REQUIRED else (p.name, p.default) for p in params]
    assert got == UPSTREAM_SIGNATURES[obj]


def test_module_parameters():
    assert {k: tuple(v.shape) for k, v in ln.DropoutAddLayerNorm(6).state_dict().items()} == {
        "weight": (6,), "bias": (6,)}
    for cls in (rms.RMSNorm, rms.DropoutAddRMSNorm):
        module = cls(6, dtype=torch.float64)
        assert module.bias is None and list(module.state_dict()) == ["weight"]
        assert module.weight.dtype == torch.float64 and bool((module.weight == 1).all())


@pytest.mark.parametrize("fn", [ln.dropout_add_layer_norm_subset, rms.dropout_add_rms_norm_subset])
@pytest.mark.parametrize("argument", ["x0_subset", "out_subset"])
def test_row_subsets_are_not_implemented(fn, argument):
    x0 = torch.randn(4, 8)
    with pytest.raises(NotImplementedError, match=argument):
        fn(x0, None, torch.ones(8), None, 0.0, 1e-5, **{argument: torch.arange(2)})


def _norm(x, weight, bias, eps, is_rms_norm):
    if is_rms_norm:
        out = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight
        return out + bias if bias is not None else out
    return F.layer_norm(x, x.shape[-1:], weight, bias, eps)


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_() if t is not None else None for t in tensors]


def _assert_grads(got, expected):
    for g, e in zip(got, expected):
        if g is not None:
            torch.testing.assert_close(g.grad, e.grad, atol=1e-4, rtol=1e-4)


@requires_triton
@pytest.mark.parametrize("is_rms_norm", [False, True])
@pytest.mark.parametrize("prenorm", [False, True])
def test_dropout_add_norm_matches_reference(is_rms_norm, prenorm):
    fn = rms.dropout_add_rms_norm if is_rms_norm else ln.dropout_add_layer_norm
    x0, residual = torch.randn(3, 5, 16, device=DEVICE), torch.randn(3, 5, 16, device=DEVICE)
    weight, bias = torch.randn(16, device=DEVICE), torch.randn(16, device=DEVICE)
    rowscale, layerscale = torch.rand(3, 5, device=DEVICE), torch.rand(16, device=DEVICE)
    inputs = _leaves(x0, residual, weight, bias, layerscale)
    inputs_ref = _leaves(x0, residual, weight, bias, layerscale)

    x0_, residual_, weight_, bias_, layerscale_ = inputs
    out = fn(x0_, residual_, weight_, bias_, 0.0, 1e-5, rowscale=rowscale, layerscale=layerscale_,
             prenorm=prenorm)
    x0r, residualr, weightr, biasr, layerscaler = inputs_ref
    x_ref = x0r * layerscaler * rowscale[..., None] + residualr
    z_ref = _norm(x_ref, weightr, biasr, 1e-5, is_rms_norm)
    if prenorm:
        z, x = out
        torch.testing.assert_close(x, x_ref)
        (z.sum() + (x**2).sum()).backward()
        (z_ref.sum() + (x_ref**2).sum()).backward()
    else:
        z = out
        z.sum().backward()
        z_ref.sum().backward()
    torch.testing.assert_close(z, z_ref, atol=1e-4, rtol=1e-4)
    _assert_grads(inputs, inputs_ref)


@requires_triton
@pytest.mark.parametrize("is_rms_norm", [False, True])
def test_dropout_mask_and_fp32_residual(is_rms_norm):
    fn = rms.dropout_add_rms_norm if is_rms_norm else ln.dropout_add_layer_norm
    x0 = torch.randn(6, 32, device=DEVICE, dtype=torch.float16)
    weight, bias = torch.ones(32, device=DEVICE), torch.zeros(32, device=DEVICE)
    z, x, mask = fn(x0, None, weight, bias, 0.25, 1e-5, prenorm=True, residual_in_fp32=True,
                    return_dropout_mask=True)
    assert mask.dtype == torch.uint8 and x.dtype == torch.float32 and z.dtype == torch.float16
    torch.testing.assert_close(x, x0.float() * mask / 0.75)
    _, mask = fn(x0, None, weight, bias, 0.0, 1e-5, return_dropout_mask=True)
    assert bool((mask == 1).all())


@requires_triton
def test_subset_without_subsets_scales_rows():
    x0, residual = torch.randn(4, 16, device=DEVICE), torch.randn(4, 16, device=DEVICE)
    weight, bias = torch.randn(16, device=DEVICE), torch.randn(16, device=DEVICE)
    z, x = ln.dropout_add_layer_norm_subset(x0, residual, weight, bias, 0.0, 1e-5, rowscale_const=0.5,
                                            prenorm=True)
    torch.testing.assert_close(x, 0.5 * x0 + residual)
    torch.testing.assert_close(z, _norm(0.5 * x0 + residual, weight, bias, 1e-5, False), atol=1e-4, rtol=1e-4)


@requires_triton
@pytest.mark.parametrize("is_rms_norm", [False, True])
def test_parallel_residual_matches_reference(is_rms_norm):
    fn = rms.dropout_add_rms_norm_parallel_residual if is_rms_norm else ln.dropout_add_layer_norm_parallel_residual
    tensors = [torch.randn(4, 16, device=DEVICE) for _ in range(3)] + [torch.randn(16, device=DEVICE)
                                                                       for _ in range(4)]
    inputs, inputs_ref = _leaves(*tensors), _leaves(*tensors)
    z0, z1, x = fn(*inputs, 0.0, 1e-5, prenorm=True)
    x0, x1, residual, weight0, bias0, weight1, bias1 = inputs_ref
    x_ref = x0 + x1 + residual
    z0_ref, z1_ref = _norm(x_ref, weight0, bias0, 1e-5, is_rms_norm), _norm(x_ref, weight1, bias1, 1e-5, is_rms_norm)
    torch.testing.assert_close(x, x_ref)
    torch.testing.assert_close(z0, z0_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(z1, z1_ref, atol=1e-4, rtol=1e-4)
    (z0.sum() + (z1**2).sum() + x.sum()).backward()
    (z0_ref.sum() + (z1_ref**2).sum() + x_ref.sum()).backward()
    _assert_grads(inputs, inputs_ref)

    # Without weight1 the second output is None; the masks are those of x0 and x1.
    x0, x1 = tensors[:2]
    z0, z1, mask0, mask1 = fn(x0, x1, None, tensors[3], tensors[4], None, None, 0.5, 1e-5,
                              return_dropout_mask=True)
    assert z1 is None and mask0.dtype == mask1.dtype == torch.uint8
    expected = _norm(x0 * mask0 * 2 + x1 * mask1 * 2, tensors[3], tensors[4], 1e-5, is_rms_norm)
    torch.testing.assert_close(z0, expected, atol=1e-4, rtol=1e-4)


@requires_triton
def test_modules_and_plain_norms():
    x0 = torch.randn(3, 16, device=DEVICE)
    module = ln.DropoutAddLayerNorm(16, prenorm=True, p=0.5, device=DEVICE).eval()
    z, x = module(x0)
    torch.testing.assert_close(x, x0)
    torch.testing.assert_close(z, F.layer_norm(x0, (16,), eps=1e-5), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(rms.RMSNorm(16, device=DEVICE)(x0), _norm(x0, 1.0, None, 1e-5, True),
                               atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(rms.DropoutAddRMSNorm(16, device=DEVICE)(x0, x0), _norm(2 * x0, 1.0, None, 1e-5, True),
                               atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ln.layer_norm(x0, torch.ones(16, device=DEVICE), None, 1e-5),
                               F.layer_norm(x0, (16,), eps=1e-5), atol=1e-4, rtol=1e-4)
