"""Tensor- and sequence-parallel collectives with the API of flash-attn 2.8.3's
flash_attn.utils.distributed, on torch.distributed.

The *_raw functions work on the first dimension of a tensor, have no autograd and can run
asynchronously: they return (output, handle), handle being None unless async_op=True, in which
case the caller waits on it before reading output. all_gather, reduce_scatter and all_reduce are
their autograd counterparts (synchronous): the backward of a gather is a reduce-scatter and the
other way round, and the backward of an all-reduce passes the gradient through, since every rank
receives the gradient of the same sum.

Parameters flagged by the tensor-parallel modules (flash_attn.modules.block marks norms) are kept
in step by sync_shared_params (p._shared_params: broadcast from the group's first rank) and
allreduce_sequence_parallel_grad (p._sequence_parallel: gradients summed over the group, since
each rank saw only its slice of the sequence).
"""

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import ProcessGroup

__all__ = [
    "all_gather_raw",
    "reduce_scatter_raw",
    "all_reduce_raw",
    "AllGatherFunc",
    "ReduceScatterFunc",
    "AllReduceFunc",
    "all_gather",
    "reduce_scatter",
    "all_reduce",
    "sync_shared_params",
    "allreduce_sequence_parallel_grad",
    "get_dim_for_local_rank",
]


def _collective(name, deprecated_name):
    # Newer torch calls all_gather_into_tensor / reduce_scatter_tensor *_single and warns on the
    # old names; older torch only has the old ones.
    return getattr(dist, name, None) or getattr(dist, deprecated_name)


def all_gather_raw(input_: Tensor, process_group: ProcessGroup, async_op: bool = False):
    """Concatenates every rank's input_ along the first dimension (rank order)."""
    world_size = dist.get_world_size(process_group)
    output = input_.new_empty((world_size * input_.shape[0], *input_.shape[1:]))
    handle = _collective("all_gather_single", "all_gather_into_tensor")(
        output, input_.contiguous(), group=process_group, async_op=async_op
    )
    return output, handle


def reduce_scatter_raw(input_: Tensor, process_group: ProcessGroup, async_op: bool = False):
    """Sums input_ over the ranks; rank r keeps the r-th of world_size equal slices of the first
    dimension, which must therefore be divisible by the group's size."""
    world_size = dist.get_world_size(process_group)
    if input_.shape[0] % world_size != 0:
        raise ValueError(
            f"reduce_scatter: the first dimension ({input_.shape[0]}) must be divisible by the "
            f"process group's size ({world_size})"
        )
    output = input_.new_empty((input_.shape[0] // world_size, *input_.shape[1:]))
    handle = _collective("reduce_scatter_single", "reduce_scatter_tensor")(
        output, input_.contiguous(), group=process_group, async_op=async_op
    )
    return output, handle


def all_reduce_raw(input_: Tensor, process_group: ProcessGroup, async_op: bool = False):
    """Sums input_ over the ranks, in place when input_ is contiguous (else in a contiguous
    copy); returns the summed tensor."""
    input_ = input_.contiguous()
    handle = dist.all_reduce(input_, group=process_group, async_op=async_op)
    return input_, handle


class AllGatherFunc(torch.autograd.Function):
    """all_gather_raw with autograd: the backward reduce-scatters the gradient."""

    @staticmethod
    def forward(ctx, input_: Tensor, process_group: ProcessGroup) -> Tensor:
        ctx.process_group = process_group
        output, _ = all_gather_raw(input_, process_group)
        return output

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        grad_input, _ = reduce_scatter_raw(grad_output, ctx.process_group)
        return grad_input, None


class ReduceScatterFunc(torch.autograd.Function):
    """reduce_scatter_raw with autograd: the backward all-gathers the gradient."""

    @staticmethod
    def forward(ctx, input_: Tensor, process_group: ProcessGroup) -> Tensor:
        ctx.process_group = process_group
        output, _ = reduce_scatter_raw(input_, process_group)
        return output

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        grad_input, _ = all_gather_raw(grad_output, ctx.process_group)
        return grad_input, None


class AllReduceFunc(torch.autograd.Function):
    """Sum over the ranks with autograd. The input is copied first, so the caller's tensor keeps
    its value; the backward passes the gradient through."""

    @staticmethod
    def forward(ctx, input_: Tensor, process_group: ProcessGroup) -> Tensor:
        output, _ = all_reduce_raw(input_.clone(memory_format=torch.contiguous_format), process_group)
        return output

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        return grad_output, None


all_gather = AllGatherFunc.apply
reduce_scatter = ReduceScatterFunc.apply
all_reduce = AllReduceFunc.apply


def _flagged_params(model, flag):
    # Sorted by name, so every rank walks the same list even where ranks hold different
    # parameters (only rank 0 of a RowParallelLinear has a bias).
    named = {name: p for name, p in model.named_parameters() if getattr(p, flag, False)}
    return [p for _, p in sorted(named.items())]


def sync_shared_params(model: torch.nn.Module, process_group: ProcessGroup):
    """Broadcasts every parameter flagged _shared_params from the group's first rank."""
    # broadcast takes a global rank as its source.
    source = dist.get_global_rank(process_group, 0)
    with torch.no_grad():
        for p in _flagged_params(model, "_shared_params"):
            dist.broadcast(p, src=source, group=process_group)


def allreduce_sequence_parallel_grad(model: torch.nn.Module, process_group: ProcessGroup):
    """Sums over the group the gradients of the parameters flagged _sequence_parallel, in one
    all-reduce of their concatenation."""
    grads = [p.grad for p in _flagged_params(model, "_sequence_parallel")]
    if not grads:
        return
    with torch.no_grad():
        flat = torch._utils._flatten_dense_tensors(grads)
        dist.all_reduce(flat, group=process_group)
        for grad, summed in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
            grad.copy_(summed)


def get_dim_for_local_rank(dim: int, world_size: int, local_rank: int, multiple_of: int = 1) -> int:
    """This rank's share of dim split over world_size ranks in units of multiple_of: the first
    (dim // multiple_of) % world_size ranks get one unit more than the others."""
    units = dim // multiple_of
    local_units = units // world_size + int(local_rank < units % world_size)
    return local_units * multiple_of
