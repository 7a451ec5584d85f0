"""flash_attn.utils.distributed over gloo on CPU: the raw collectives (sync and async), the
autograd ones with their backwards, the flagged-parameter helpers, and get_dim_for_local_rank;
one rank in-process and two spawned ranks."""

import pytest
import torch
import torch.nn as nn

from flash_attn.utils.distributed import (
    all_gather,
    all_gather_raw,
    all_reduce,
    all_reduce_raw,
    allreduce_sequence_parallel_grad,
    get_dim_for_local_rank,
    reduce_scatter,
    reduce_scatter_raw,
    sync_shared_params,
)
from process_groups import run_on_ranks, single_rank_group


def test_get_dim_for_local_rank():
    assert [get_dim_for_local_rank(8, 2, r) for r in range(2)] == [4, 4]
    assert [get_dim_for_local_rank(10, 3, r) for r in range(3)] == [4, 3, 3]
    # 5 units of 2: 2 + 2 + 1 units.
    assert [get_dim_for_local_rank(10, 3, r, multiple_of=2) for r in range(3)] == [4, 4, 2]


def test_single_rank_collectives_are_identities():
    with single_rank_group() as group:
        x = torch.randn(4, 3, requires_grad=True)
        for fn in (all_gather, reduce_scatter, all_reduce):
            out = fn(x, group)
            torch.testing.assert_close(out, x)
            (grad,) = torch.autograd.grad(out, x, torch.ones_like(out))
            torch.testing.assert_close(grad, torch.ones_like(x))
        gathered, handle = all_gather_raw(x.detach(), group, async_op=True)
        handle.wait()
        torch.testing.assert_close(gathered, x)


def _two_rank_worker(rank, group):
    world_size = 2
    per_rank = [torch.arange(6.0).reshape(2, 3) + 10 * r for r in range(world_size)]
    mine = per_rank[rank].clone()

    gathered, handle = all_gather_raw(mine, group)
    assert handle is None
    torch.testing.assert_close(gathered, torch.cat(per_rank))
    gathered, handle = all_gather_raw(mine, group, async_op=True)
    handle.wait()
    torch.testing.assert_close(gathered, torch.cat(per_rank))

    total = sum(per_rank)  # (2, 3): row r goes to rank r
    scattered, _ = reduce_scatter_raw(mine, group)
    torch.testing.assert_close(scattered, total[rank : rank + 1])
    with pytest.raises(ValueError, match="divisible"):
        reduce_scatter_raw(torch.ones(3, 2), group)

    buffer = mine.clone()
    reduced, _ = all_reduce_raw(buffer, group)
    torch.testing.assert_close(reduced, total)
    assert reduced.data_ptr() == buffer.data_ptr()  # in place, as upstream

    # Autograd versions: the backward of a gather is a reduce-scatter and the other way round.
    x = mine.clone().requires_grad_()
    out = all_gather(x, group)
    out.backward(torch.ones(4, 3) * (rank + 1))  # the ranks' gradients of the gathered tensor sum
    torch.testing.assert_close(x.grad, torch.full((2, 3), 3.0))

    x = mine.clone().requires_grad_()
    out = reduce_scatter(x, group)
    out.backward(torch.full((1, 3), float(rank + 1)))
    torch.testing.assert_close(x.grad, torch.tensor([[1.0] * 3, [2.0] * 3]))

    x = mine.clone().requires_grad_()
    out = all_reduce(x, group)
    torch.testing.assert_close(out, total)
    torch.testing.assert_close(x, per_rank[rank])  # the caller's tensor is not overwritten
    out.backward(torch.ones(2, 3))
    torch.testing.assert_close(x.grad, torch.ones(2, 3))

    # Flagged parameters: shared ones take rank 0's values, sequence-parallel grads are summed.
    model = nn.Sequential(nn.Linear(3, 2), nn.LayerNorm(2))
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float(rank + 1))
    model[1].weight._shared_params = True
    model[1].bias._sequence_parallel = True
    model[0].weight._sequence_parallel = True
    sync_shared_params(model, group)
    torch.testing.assert_close(model[1].weight, torch.ones(2))
    torch.testing.assert_close(model[1].bias, torch.full((2,), float(rank + 1)))
    for p in model.parameters():
        p.grad = torch.full_like(p, float(rank + 1))
    allreduce_sequence_parallel_grad(model, group)
    torch.testing.assert_close(model[1].bias.grad, torch.full((2,), 3.0))
    torch.testing.assert_close(model[0].weight.grad, torch.full((2, 3), 3.0))
    torch.testing.assert_close(model[0].bias.grad, torch.full((2,), float(rank + 1)))


def test_collectives_two_ranks(tmp_path):
    run_on_ranks(_two_rank_worker, 2, tmp_path)
