"""flash_attn.ops.activations on CPU: the forwards against torch.nn.functional, the hand-written
backwards against autograd (float64 gradcheck), the dtypes returned."""

import pytest
import torch
import torch.nn.functional as F

from flash_attn.ops.activations import (
    FastGeLUFunction,
    GeLUFunction,
    SwiGLUFunction,
    bias_gelu,
    bias_gelu_back,
    bias_gelu_impl,
    fast_gelu_impl,
    gelu_bwd,
    gelu_fwd,
    relu_bwd,
    sqrelu_bwd,
    sqrelu_fwd,
    swiglu,
)


def _x(*shape, dtype=torch.float64):
    return torch.randn(*shape, dtype=dtype, requires_grad=True)


def _autograd_grad(fn, x, g):
    (grad,) = torch.autograd.grad(fn(x), x, g)
    return grad


def test_gelu_is_tanh_gelu():
    x = _x(6, 5)
    # Upstream's constants are rounded to 8 digits, hence the tolerance.
    torch.testing.assert_close(gelu_fwd(x), F.gelu(x, approximate="tanh"), atol=1e-7, rtol=1e-7)
    g = torch.randn(6, 5, dtype=torch.float64)
    torch.testing.assert_close(gelu_bwd(g, x), _autograd_grad(gelu_fwd, x, g), atol=1e-7, rtol=1e-7)


def test_bias_gelu():
    y, bias = _x(6, 5), _x(5)
    torch.testing.assert_close(bias_gelu(y, bias), gelu_fwd(y + bias))
    g = torch.randn(6, 5, dtype=torch.float64)
    grad_y, grad_bias = bias_gelu_back(g, y, bias)
    torch.testing.assert_close(grad_y, gelu_bwd(g, y + bias))
    torch.testing.assert_close(grad_bias, grad_y.sum(0))


def test_relu_and_sqrelu():
    x = _x(7, 3)
    g = torch.randn(7, 3, dtype=torch.float64)
    torch.testing.assert_close(relu_bwd(g, x), _autograd_grad(F.relu, x, g))
    torch.testing.assert_close(relu_bwd(g, torch.zeros(7, 3, dtype=torch.float64)), g)  # passes at 0
    torch.testing.assert_close(sqrelu_fwd(x), F.relu(x) ** 2)
    torch.testing.assert_close(sqrelu_bwd(g, x), _autograd_grad(lambda t: F.relu(t) ** 2, x, g))


@pytest.mark.parametrize("fn,n_inputs", [(fast_gelu_impl, 1), (swiglu, 2)])
def test_autograd_functions_gradcheck(fn, n_inputs):
    inputs = [_x(4, 3) for _ in range(n_inputs)]
    assert torch.autograd.gradcheck(fn, inputs)


def test_bias_gelu_impl_gradcheck():
    assert torch.autograd.gradcheck(bias_gelu_impl, (_x(4, 3), _x(3)))


def test_swiglu_is_silu_gate_times_value():
    x, y = _x(5, 4), _x(5, 4)
    torch.testing.assert_close(swiglu(x, y), F.silu(x) * y)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dtypes_are_kept(dtype):
    x = torch.randn(3, 4, dtype=dtype)
    for out in (gelu_fwd(x), sqrelu_fwd(x), swiglu(x, x), gelu_bwd(x, x), relu_bwd(x, x), sqrelu_bwd(x, x)):
        assert out.dtype == dtype
    # swiglu computes in float32 before rounding, as upstream's kernel does.
    expected = (F.silu(x.float()) * x.float()).to(dtype)
    torch.testing.assert_close(swiglu(x, x), expected, atol=0, rtol=0)


def test_upstream_names():
    assert bias_gelu_impl == GeLUFunction.apply and fast_gelu_impl == FastGeLUFunction.apply
    assert swiglu == SwiGLUFunction.apply
