"""Dense layers with tensor and sequence parallelism, with the API of flash-attn 2.8.3's
flash_attn.ops.fused_dense.

Upstream runs these on its fused_dense_lib CUDA extension (cuBLASLt GEMMs with bias and GeLU /
ReLU epilogues). Here every matmul is torch.nn.functional.linear and the activation a separate
PyTorch op, so the layers run on any device and dtype; the module names, signatures, parameter
names and state-dict keys are upstream's. The collectives come from flash_attn.utils.distributed.

Tensor parallelism over process_group: ColumnParallelLinear holds a slice of the output features
(its input is all-gathered first under sequence parallelism, where each rank holds a slice of the
tokens), RowParallelLinear a slice of the input features (its partial outputs are summed over the
ranks: reduce-scattered back to token slices under sequence parallelism, else all-reduced).

Where this module differs from upstream's:
  * fused_dense_func and fused_mlp_func always run FusedDenseFunc / FusedMLPFunc (upstream falls
    back to plain autograd for CPU or float32 inputs, where its fallback then rejects a
    process_group and computes "sqrelu" as ReLU); so checkpoint_lvl and process_group work on
    every device;
  * heuristic picks a cuBLASLt algorithm upstream; it is checked (-1..4 or "auto") and otherwise
    has no effect, as the GEMM and the activation are always separate ops (upstream's -1);
  * a bias-only gradient is the sum of grad_output over the tokens (upstream returns grad_output
    itself when the weight needs no gradient);
  * ColumnParallelLinear / RowParallelLinear / ParallelFusedMLP raise ValueError for
    process_group=None (upstream then splits over the default group but communicates over none);
  * bad arguments raise ValueError naming the argument instead of failing an assert.
"""

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.distributed import ProcessGroup

from flash_attn.ops.activations import gelu_bwd, relu_bwd, sqrelu_bwd, sqrelu_fwd
from flash_attn.utils.distributed import (
    all_gather_raw,
    all_reduce,
    all_reduce_raw,
    get_dim_for_local_rank,
    reduce_scatter,
    reduce_scatter_raw,
)

__all__ = [
    "FusedDenseFunc",
    "fused_dense_func",
    "FusedDense",
    "ColumnParallelLinear",
    "RowParallelLinear",
    "FusedMLPFunc",
    "fused_mlp_func",
    "FusedMLP",
    "ParallelFusedMLP",
]

_ACTIVATIONS = {
    # name: (forward, backward(grad, pre_activation))
    "gelu_approx": (lambda x: F.gelu(x, approximate="tanh"), gelu_bwd),
    "relu": (F.relu, relu_bwd),
    "sqrelu": (sqrelu_fwd, sqrelu_bwd),
}


def _check_activation(activation):
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}")


def _check_checkpoint_lvl(checkpoint_lvl):
    if checkpoint_lvl not in (0, 1, 2):
        raise ValueError(f"checkpoint_lvl must be 0, 1 or 2, got {checkpoint_lvl!r}")


def _check_heuristic(heuristic, allow_auto):
    valid = heuristic in range(-1, 5) or (allow_auto and heuristic == "auto")
    if not valid:
        choices = "-1..4 or 'auto'" if allow_auto else "-1..4"
        raise ValueError(f"heuristic must be {choices}, got {heuristic!r}")


def _check_process_group(cls_name, process_group):
    if process_group is None:
        raise ValueError(
            f"{cls_name} needs a process_group to split its weights over; use "
            "torch.nn.Linear / FusedDense / FusedMLP on a single device"
        )


def _autocast(*tensors):
    """The tensors (None passes through) cast to the autocast dtype when autocast is on for the
    first one's device, and contiguous: the autograd Functions below cast their inputs
    themselves, as upstream's do."""
    device_type = tensors[0].device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
    return tuple(None if t is None else t.to(dtype=dtype or t.dtype).contiguous() for t in tensors)


def _gather_tokens(x, process_group, sequence_parallel):
    """(all of x, handle): x gathered over the group under sequence parallelism (asynchronously:
    wait on the handle before reading it), else x itself and None."""
    if process_group is not None and sequence_parallel:
        return all_gather_raw(x, process_group, async_op=True)
    return x, None


def _start_input_grad_reduction(grad_input, process_group, sequence_parallel):
    """Each rank holds a partial input gradient (its slice of the features' contributions): they
    are summed over the group, reduce-scattered back to token slices under sequence parallelism.
    Returns (grad_input, handle to wait on, or None)."""
    if process_group is None:
        return grad_input, None
    reduce = reduce_scatter_raw if sequence_parallel else all_reduce_raw
    return reduce(grad_input, process_group, async_op=True)


def _wait(handle):
    if handle is not None:
        handle.wait()


def _weight_and_bias_grads(inputs, grad_output, needs_weight_grad, needs_bias_grad):
    """Gradients of F.linear's weight and bias from its 2-D inputs and output gradient."""
    grad_weight = grad_output.t() @ inputs if needs_weight_grad else None
    grad_bias = grad_output.sum(dim=0) if needs_bias_grad else None
    return grad_weight, grad_bias


def _input_grad(grad_output, weight, grad_residual):
    """grad_output @ weight, plus the gradient of the returned residual (x itself) if any."""
    if grad_residual is None:
        return grad_output @ weight
    return torch.addmm(grad_residual.reshape(grad_output.shape[0], -1), grad_output, weight)


class FusedDenseFunc(torch.autograd.Function):
    """F.linear(x, weight, bias) with sequence-parallel input and a summed input gradient.

    With a process_group: under sequence_parallel each rank passes its slice of the tokens, which
    are all-gathered before the matmul (and again in the backward, instead of saving the gathered
    input); the input gradient is reduce-scattered (sequence_parallel) or all-reduced. Only x and
    weight are saved for the backward (weight alone when it needs no gradient).
    return_residual: also return x, whose gradient is added into x's.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, return_residual=False, process_group=None, sequence_parallel=True):
        ctx.return_residual = return_residual
        ctx.process_group = process_group
        ctx.sequence_parallel = sequence_parallel
        (x,) = _autocast(x)
        total_x, gather = _gather_tokens(x, process_group, sequence_parallel)
        # The weight cast overlaps the gather.
        weight, bias = _autocast(weight, bias)
        _wait(gather)
        output = F.linear(total_x, weight, bias)
        if weight.requires_grad:
            ctx.save_for_backward(x, weight)
        else:
            ctx.save_for_backward(weight)
        return (output, x) if return_residual else output

    @staticmethod
    def backward(ctx, grad_output, *grad_residual):
        process_group, sequence_parallel = ctx.process_group, ctx.sequence_parallel
        weight = ctx.saved_tensors[-1]
        total_x, gather = None, None
        if ctx.needs_input_grad[1]:
            total_x, gather = _gather_tokens(ctx.saved_tensors[0], process_group, sequence_parallel)
        batch_shape = grad_output.shape[:-1]
        tokens = batch_shape.numel()
        grad_output = grad_output.contiguous().reshape(tokens, grad_output.shape[-1])
        grad_input, reduction = None, None
        if ctx.needs_input_grad[0]:
            residual_grad = grad_residual[0] if ctx.return_residual else None
            grad_input = _input_grad(grad_output, weight, residual_grad)
            grad_input = grad_input.reshape(*batch_shape, grad_input.shape[-1])
            grad_input, reduction = _start_input_grad_reduction(grad_input, process_group, sequence_parallel)
        _wait(gather)
        grad_weight, grad_bias = _weight_and_bias_grads(
            None if total_x is None else total_x.reshape(tokens, total_x.shape[-1]),
            grad_output,
            ctx.needs_input_grad[1],
            ctx.needs_input_grad[2],
        )
        _wait(reduction)
        return grad_input, grad_weight, grad_bias, None, None, None


def fused_dense_func(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    return_residual: bool = False,
    process_group: Optional[ProcessGroup] = None,
    sequence_parallel: bool = True,
):
    """F.linear(x, weight, bias) through FusedDenseFunc (see there for process_group and
    sequence_parallel). Returns out, or (out, x) with return_residual."""
    return FusedDenseFunc.apply(x, weight, bias, return_residual, process_group, sequence_parallel)


class FusedDense(nn.Linear):
    """nn.Linear through fused_dense_func. return_residual: forward returns (out, x)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        return_residual: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.return_residual = return_residual

    def forward(self, x, process_group=None):
        """process_group: x is this rank's slice of the tokens, all-gathered before the matmul
        (sequence parallelism)."""
        return fused_dense_func(
            x, self.weight, self.bias, return_residual=self.return_residual, process_group=process_group
        )


def _local_features(features, process_group, multiple_of, name):
    if features % multiple_of:
        raise ValueError(f"{name} ({features}) must be a multiple of multiple_of ({multiple_of})")
    world_size = dist.get_world_size(process_group)
    return get_dim_for_local_rank(features, world_size, dist.get_rank(process_group), multiple_of)


class ColumnParallelLinear(nn.Linear):
    """Linear layer holding this rank's slice of the output features: out_features is split over
    process_group in units of multiple_of, the first ranks taking one unit more when it does not
    divide evenly. sequence_parallel: the input is this rank's slice of the tokens and is
    all-gathered first; otherwise every rank passes all of them. Returns this rank's output
    features for all tokens."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        process_group: ProcessGroup,
        bias: bool = True,
        sequence_parallel=True,
        multiple_of=1,
        device=None,
        dtype=None,
    ) -> None:
        _check_process_group("ColumnParallelLinear", process_group)
        local_out = _local_features(out_features, process_group, multiple_of, "out_features")
        super().__init__(in_features, local_out, bias=bias, device=device, dtype=dtype)
        self.process_group = process_group
        self.sequence_parallel = sequence_parallel

    def forward(self, x):
        return fused_dense_func(
            x,
            self.weight,
            self.bias,
            process_group=self.process_group,
            sequence_parallel=self.sequence_parallel,
        )


class RowParallelLinear(nn.Linear):
    """Linear layer holding this rank's slice of the input features (split as in
    ColumnParallelLinear); the partial outputs are summed over process_group, reduce-scattered
    to token slices under sequence_parallel, else all-reduced. Only the group's first rank holds
    the bias, so that it is added once."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        process_group: ProcessGroup,
        bias: bool = True,
        sequence_parallel=True,
        multiple_of=1,
        device=None,
        dtype=None,
    ) -> None:
        _check_process_group("RowParallelLinear", process_group)
        local_in = _local_features(in_features, process_group, multiple_of, "in_features")
        has_bias = bias and dist.get_rank(process_group) == 0
        super().__init__(local_in, out_features, bias=has_bias, device=device, dtype=dtype)
        self.process_group = process_group
        self.sequence_parallel = sequence_parallel

    def forward(self, x):
        out = fused_dense_func(x, self.weight, self.bias)
        reduce = reduce_scatter if self.sequence_parallel else all_reduce
        return reduce(out, self.process_group)


class FusedMLPFunc(torch.autograd.Function):
    """F.linear(activation(F.linear(x, weight1, bias1)), weight2, bias2), with the
    process_group / sequence_parallel handling of FusedDenseFunc on x (the output is this rank's
    partial sum, which the caller reduces).

    checkpoint_lvl sets what the backward gets from the forward (higher saves memory, costs
    compute): 0: the pre-activation and the activation output; 1: the pre-activation only (the
    activation is recomputed), except for relu, which keeps both as at 0; 2: neither (the first
    matmul is recomputed too). save_pre_act=False means 2. x, weight1 and weight2 are always
    saved (and bias1 at level 2).
    """

    @staticmethod
    def forward(
        ctx,
        x,
        weight1,
        bias1,
        weight2,
        bias2,
        activation="gelu_approx",
        save_pre_act=True,
        return_residual=False,
        checkpoint_lvl=0,
        heuristic=0,
        process_group=None,
        sequence_parallel=True,
    ):
        _check_activation(activation)
        _check_checkpoint_lvl(checkpoint_lvl)
        _check_heuristic(heuristic, allow_auto=False)
        if not save_pre_act:
            checkpoint_lvl = 2
        ctx.return_residual = return_residual
        ctx.process_group = process_group
        ctx.sequence_parallel = sequence_parallel
        ctx.checkpoint_lvl = checkpoint_lvl
        ctx.activation = activation

        (x,) = _autocast(x)
        total_x, gather = _gather_tokens(x, process_group, sequence_parallel)
        weight1, bias1, weight2, bias2 = _autocast(weight1, bias1, weight2, bias2)
        _wait(gather)
        activation_fn = _ACTIVATIONS[activation][0]
        pre_act = F.linear(total_x, weight1, bias1)
        output1 = activation_fn(pre_act)
        output2 = F.linear(output1, weight2, bias2)
        if checkpoint_lvl == 0 or (checkpoint_lvl == 1 and activation == "relu"):
            ctx.save_for_backward(x, weight1, weight2, pre_act, output1)
        elif checkpoint_lvl == 1:
            ctx.save_for_backward(x, weight1, weight2, pre_act)
        else:
            ctx.save_for_backward(x, weight1, weight2, bias1)
        return (output2, x) if return_residual else output2

    @staticmethod
    def backward(ctx, grad_output, *grad_residual):
        process_group, sequence_parallel = ctx.process_group, ctx.sequence_parallel
        activation_fn, activation_grad_fn = _ACTIVATIONS[ctx.activation]
        x, weight1, weight2, *rest = ctx.saved_tensors
        total_x, gather = _gather_tokens(x, process_group, sequence_parallel)
        if ctx.checkpoint_lvl == 2:
            (bias1,) = rest
            _wait(gather)
            gather = None
            pre_act = F.linear(total_x, weight1, bias1)
            output1 = activation_fn(pre_act)
        elif len(rest) == 2:
            pre_act, output1 = rest
        else:
            (pre_act,) = rest
            output1 = activation_fn(pre_act)

        batch_shape = grad_output.shape[:-1]
        tokens = batch_shape.numel()
        grad_output = grad_output.contiguous().reshape(tokens, grad_output.shape[-1])
        output1 = output1.reshape(tokens, output1.shape[-1])
        pre_act = pre_act.reshape(tokens, pre_act.shape[-1])
        grad_weight2, grad_bias2 = _weight_and_bias_grads(
            output1, grad_output, ctx.needs_input_grad[3], ctx.needs_input_grad[4]
        )
        grad_pre_act = activation_grad_fn(grad_output @ weight2, pre_act)

        grad_input, reduction = None, None
        if ctx.needs_input_grad[0]:
            residual_grad = grad_residual[0] if ctx.return_residual else None
            grad_input = _input_grad(grad_pre_act, weight1, residual_grad)
            grad_input = grad_input.reshape(*batch_shape, grad_input.shape[-1])
            grad_input, reduction = _start_input_grad_reduction(grad_input, process_group, sequence_parallel)
        _wait(gather)
        grad_weight1, grad_bias1 = _weight_and_bias_grads(
            total_x.reshape(tokens, total_x.shape[-1]),
            grad_pre_act,
            ctx.needs_input_grad[1],
            ctx.needs_input_grad[2],
        )
        _wait(reduction)
        return (grad_input, grad_weight1, grad_bias1, grad_weight2, grad_bias2) + (None,) * 7


def fused_mlp_func(
    x: Tensor,
    weight1: Tensor,
    weight2: Tensor,
    bias1: Optional[Tensor] = None,
    bias2: Optional[Tensor] = None,
    activation: str = "gelu_approx",
    save_pre_act: bool = True,
    return_residual: bool = False,
    checkpoint_lvl: int = 0,
    heuristic: int = 0,
    process_group: Optional[ProcessGroup] = None,
    sequence_parallel: bool = True,
):
    """fc2(activation(fc1(x))) through FusedMLPFunc; activation is "gelu_approx" (tanh GeLU),
    "relu" or "sqrelu" (relu(x) ** 2). Returns out, or (out, x) with return_residual."""
    return FusedMLPFunc.apply(
        x,
        weight1,
        bias1,
        weight2,
        bias2,
        activation,
        save_pre_act,
        return_residual,
        checkpoint_lvl,
        heuristic,
        process_group,
        sequence_parallel,
    )


def _check_mlp_args(activation, checkpoint_lvl, heuristic):
    _check_activation(activation)
    _check_checkpoint_lvl(checkpoint_lvl)
    _check_heuristic(heuristic, allow_auto=True)


def _resolve_heuristic(heuristic):
    # "auto" picks a cuBLASLt algorithm upstream; here the GEMM and activation are always
    # separate ops, which is upstream's -1.
    return -1 if heuristic == "auto" else heuristic


class FusedMLP(nn.Module):
    """fc2(activation(fc1(x))) through fused_mlp_func, with fc1: in_features -> hidden_features
    (default 4 * in_features) and fc2: hidden_features -> out_features (default in_features).

    activation: "gelu_approx", "relu" or "sqrelu".
    checkpoint_lvl: what the backward recomputes (see FusedMLPFunc); in eval mode nothing is kept
        (save_pre_act is self.training).
    heuristic: -1..4 or "auto", accepted for compatibility (upstream's cuBLASLt algorithm choice;
        forced to -1 for sqrelu, as upstream).
    return_residual: forward returns (out, x).
    """

    def __init__(
        self,
        in_features,
        hidden_features=None,
        out_features=None,
        bias1=True,
        bias2=True,
        activation="gelu_approx",
        return_residual=False,
        checkpoint_lvl=0,
        heuristic="auto",
        device=None,
        dtype=None,
    ):
        super().__init__()
        _check_mlp_args(activation, checkpoint_lvl, heuristic)
        factory_kwargs = {"device": device, "dtype": dtype}
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features * 4
        self.activation = activation
        self.return_residual = return_residual
        self.checkpoint_lvl = checkpoint_lvl
        self.heuristic = heuristic if activation != "sqrelu" else -1
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias1, **factory_kwargs)
        self.fc2 = nn.Linear(hidden_features, out_features, bias=bias2, **factory_kwargs)

    def forward(self, x, process_group=None):
        """process_group: x is this rank's slice of the tokens; it is all-gathered before fc1 and
        the output, this rank's partial sum, is reduce-scattered back over the group."""
        out = fused_mlp_func(
            x,
            self.fc1.weight,
            self.fc2.weight,
            self.fc1.bias,
            self.fc2.bias,
            activation=self.activation,
            save_pre_act=self.training,
            return_residual=self.return_residual,
            checkpoint_lvl=self.checkpoint_lvl,
            heuristic=_resolve_heuristic(self.heuristic),
            process_group=process_group,
        )
        if self.return_residual:
            out, x = out
        if process_group is not None:
            out = reduce_scatter(out, process_group)
        return (out, x) if self.return_residual else out


class ParallelFusedMLP(nn.Module):
    """Tensor-parallel FusedMLP: fc1 is a ColumnParallelLinear and fc2 a RowParallelLinear over
    process_group (so each rank holds a slice of the hidden features and only the first rank
    fc2's bias). sequence_parallel: forward takes and returns this rank's slice of the tokens
    (all-gathered before fc1, output reduce-scattered); otherwise all tokens in and out (output
    all-reduced). activation, checkpoint_lvl, heuristic: as in FusedMLP."""

    def __init__(
        self,
        in_features,
        hidden_features=None,
        out_features=None,
        activation="gelu_approx",
        process_group: ProcessGroup = None,
        bias1=True,
        bias2=True,
        sequence_parallel=True,
        checkpoint_lvl=0,
        heuristic="auto",
        device=None,
        dtype=None,
    ):
        super().__init__()
        _check_mlp_args(activation, checkpoint_lvl, heuristic)
        _check_process_group("ParallelFusedMLP", process_group)
        factory_kwargs = {"device": device, "dtype": dtype}
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features * 4
        self.activation = activation
        self.process_group = process_group
        self.sequence_parallel = sequence_parallel
        self.checkpoint_lvl = checkpoint_lvl
        self.heuristic = heuristic if activation != "sqrelu" else -1
        parallel_kwargs = dict(sequence_parallel=sequence_parallel, **factory_kwargs)
        self.fc1 = ColumnParallelLinear(in_features, hidden_features, process_group, bias=bias1, **parallel_kwargs)
        self.fc2 = RowParallelLinear(hidden_features, out_features, process_group, bias=bias2, **parallel_kwargs)

    def forward(self, x):
        out = fused_mlp_func(
            x,
            self.fc1.weight,
            self.fc2.weight,
            self.fc1.bias,
            self.fc2.bias,
            activation=self.activation,
            save_pre_act=self.training,
            checkpoint_lvl=self.checkpoint_lvl,
            heuristic=_resolve_heuristic(self.heuristic),
            process_group=self.process_group,
            sequence_parallel=self.sequence_parallel,
        )
        reduce = reduce_scatter if self.sequence_parallel else all_reduce
        return reduce(out, self.process_group)
