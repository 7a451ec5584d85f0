"""Activation functions and their hand-written gradients, with the API of flash-attn 2.8.3's
flash_attn.ops.activations.

GeLU here is the tanh approximation, x / 2 * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 x^3))), with
upstream's constants, so the forwards and backwards match upstream's TorchScript functions. The
*_bwd functions take the incoming gradient and the activation's input, which is how
flash_attn.ops.fused_dense recomputes gradients from a saved pre-activation. Everything is plain
PyTorch and runs on any device; swiglu computes fp16 / bf16 in float32 and returns its inputs'
dtype, as upstream's CUDA jiterator kernel does.
"""

import torch
import torch.nn.functional as F

__all__ = [
    "bias_gelu",
    "bias_gelu_back",
    "GeLUFunction",
    "bias_gelu_impl",
    "gelu_fwd",
    "gelu_bwd",
    "FastGeLUFunction",
    "fast_gelu_impl",
    "relu_bwd",
    "sqrelu_fwd",
    "sqrelu_bwd",
    "SwiGLUFunction",
    "swiglu",
]

# sqrt(2 / pi) and 3 * 0.044715 * sqrt(2 / pi), rounded as upstream rounds them.
_SQRT_2_OVER_PI = 0.79788456
_SQRT_2_OVER_PI_X3_COEF = 0.1070322243
_CUBIC_COEF = 0.044715


def _tanh_term(x):
    return torch.tanh(_SQRT_2_OVER_PI * x * (1 + _CUBIC_COEF * x * x))


def _gelu_derivative(x):
    tanh_out = _tanh_term(x)
    return 0.5 * x * ((1 - tanh_out * tanh_out) * (_SQRT_2_OVER_PI + _SQRT_2_OVER_PI_X3_COEF * x * x)) + 0.5 * (
        1 + tanh_out
    )


def gelu_fwd(x):
    """Tanh-approximate GeLU of x, in x's dtype."""
    return (x * 0.5 * (1.0 + _tanh_term(x))).to(dtype=x.dtype)


def gelu_bwd(g, x):
    """Gradient of gelu_fwd at x times the incoming gradient g, in x's dtype."""
    return (_gelu_derivative(x) * g).to(dtype=x.dtype)


def bias_gelu(y, bias):
    """gelu_fwd(y + bias), in y's dtype."""
    x = bias + y
    return (x * 0.5 * (1.0 + _tanh_term(x))).to(dtype=y.dtype)


def bias_gelu_back(g, y, bias):
    """Gradients of bias_gelu for y of shape (B, D) and bias of shape (D,): returns
    (grad_y in y's dtype, grad_bias = grad_y summed over the first dimension in bias's dtype)."""
    grad_y = _gelu_derivative(bias + y) * g
    return grad_y.to(dtype=y.dtype), grad_y.sum(dim=0, dtype=bias.dtype)


class GeLUFunction(torch.autograd.Function):
    """bias_gelu with autograd."""

    @staticmethod
    def forward(ctx, input, bias):
        ctx.save_for_backward(input, bias)
        return bias_gelu(input, bias)

    @staticmethod
    def backward(ctx, grad_output):
        input, bias = ctx.saved_tensors
        return bias_gelu_back(grad_output, input, bias)


bias_gelu_impl = GeLUFunction.apply


class FastGeLUFunction(torch.autograd.Function):
    """gelu_fwd with autograd (gelu_bwd as the backward)."""

    @staticmethod
    def forward(ctx, input):
        ctx.save_for_backward(input)
        return gelu_fwd(input)

    @staticmethod
    def backward(ctx, grad_output):
        (input,) = ctx.saved_tensors
        return gelu_bwd(grad_output, input)


fast_gelu_impl = FastGeLUFunction.apply


def relu_bwd(g, x):
    """Gradient of relu at x times g. Passes g where x >= 0 (x = 0 included, as upstream)."""
    return torch.where(x >= 0, g, 0.0).to(dtype=x.dtype)


def sqrelu_fwd(x):
    """relu(x) ** 2, in x's dtype."""
    r = F.relu(x)
    return (r * r).to(dtype=x.dtype)


def sqrelu_bwd(g, x):
    """Gradient of sqrelu_fwd at x times g: 2 g relu(x)."""
    return (2.0 * g * F.relu(x)).to(dtype=x.dtype)


def _at_least_float32(*tensors):
    # fp16 / bf16 compute in float32 as upstream's kernel does; float64 keeps its precision.
    return [t.to(torch.promote_types(t.dtype, torch.float32)) for t in tensors]


def _swiglu_fwd(x, y):
    x32, y32 = _at_least_float32(x, y)
    return (x32 * torch.sigmoid(x32) * y32).to(dtype=x.dtype)


def _swiglu_bwd(x, y, g):
    x32, y32, g32 = _at_least_float32(x, y, g)
    x_sigmoid = torch.sigmoid(x32)
    dx = x_sigmoid * (1 + x32 * (1 - x_sigmoid)) * g32 * y32
    dy = x32 * x_sigmoid * g32
    return dx.to(dtype=x.dtype), dy.to(dtype=y.dtype)


class SwiGLUFunction(torch.autograd.Function):
    """silu(x) * y with autograd; x is the gate."""

    @staticmethod
    def forward(ctx, x, y):
        ctx.save_for_backward(x, y)
        return _swiglu_fwd(x, y)

    @staticmethod
    def backward(ctx, dout):
        x, y = ctx.saved_tensors
        return _swiglu_bwd(x, y, dout)


swiglu = SwiGLUFunction.apply
