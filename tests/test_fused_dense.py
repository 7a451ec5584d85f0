"""flash_attn.ops.fused_dense on CPU in float32: the layers against torch.nn.Linear and hand-written
MLPs (outputs and every gradient), what FusedMLPFunc saves for each checkpoint_lvl, the argument
errors, upstream's signatures, and the tensor-parallel layers over gloo (one rank in-process, two
spawned ranks) against the unsplit layers with the same weights."""

import inspect

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from flash_attn.ops.fused_dense import (
    ColumnParallelLinear,
    FusedDense,
    FusedMLP,
    ParallelFusedMLP,
    RowParallelLinear,
    fused_dense_func,
    fused_mlp_func,
)
from flash_attn.utils.distributed import get_dim_for_local_rank
from process_groups import run_on_ranks, single_rank_group

REFERENCE_ACTIVATIONS = {
    "gelu_approx": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "sqrelu": lambda x: F.relu(x) ** 2,
}

REQUIRED = object()
UPSTREAM_SIGNATURES = {
    fused_dense_func: ["x", "weight", ("bias", None), ("return_residual", False), ("process_group", None),
                       ("sequence_parallel", True)],
    FusedDense: ["in_features", "out_features", ("bias", True), ("return_residual", False), ("device", None),
                 ("dtype", None)],
    FusedDense.forward: ["self", "x", ("process_group", None)],
    ColumnParallelLinear: ["in_features", "out_features", "process_group", ("bias", True),
                           ("sequence_parallel", True), ("multiple_of", 1), ("device", None), ("dtype", None)],
    RowParallelLinear: ["in_features", "out_features", "process_group", ("bias", True),
                        ("sequence_parallel", True), ("multiple_of", 1), ("device", None), ("dtype", None)],
    fused_mlp_func: ["x", "weight1", "weight2", ("bias1", None), ("bias2", None), ("activation", "gelu_approx"),
                     ("save_pre_act", True), ("return_residual", False), ("checkpoint_lvl", 0), ("heuristic", 0),
                     ("process_group", None), ("sequence_parallel", True)],
    FusedMLP: ["in_features", ("hidden_features", None), ("out_features", None), ("bias1", True), ("bias2", True),
               ("activation", "gelu_approx"), ("return_residual", False), ("checkpoint_lvl", 0),
               ("heuristic", "auto"), ("device", None), ("dtype", None)],
    FusedMLP.forward: ["self", "x", ("process_group", None)],
    ParallelFusedMLP: ["in_features", ("hidden_features", None), ("out_features", None),
                       ("activation", "gelu_approx"), ("process_group", None), ("bias1", True), ("bias2", True),
                       ("sequence_parallel", True), ("checkpoint_lvl", 0), ("heuristic", "auto"), ("device", None),
                       ("dtype", None)],
}


@pytest.mark.parametrize("obj", list(UPSTREAM_SIGNATURES), ids=lambda o: o.__qualname__)
def test_upstream_signatures(obj):
    params = inspect.signature(obj).parameters.values()
    got = [p.name if p.default is inspect.Parameter.empty else (p.name, p.default) for p in params]
    assert got == UPSTREAM_SIGNATURES[obj]


def _grads(*tensors):
    return [t.grad for t in tensors]


def _reference_mlp(x, weight1, weight2, bias1, bias2, activation):
    return F.linear(REFERENCE_ACTIVATIONS[activation](F.linear(x, weight1, bias1)), weight2, bias2)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("return_residual", [False, True])
def test_fused_dense_matches_linear(bias, return_residual):
    layer = FusedDense(12, 7, bias=bias, return_residual=return_residual)
    reference = nn.Linear(12, 7, bias=bias)
    reference.load_state_dict(layer.state_dict())
    x = torch.randn(2, 5, 12, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    grad = torch.randn(2, 5, 7)

    out = layer(x)
    if return_residual:
        out, residual = out
        torch.testing.assert_close(residual, x)
        (out * grad).sum().add((residual**2).sum()).backward()
        (reference(x_ref) * grad).sum().add((x_ref**2).sum()).backward()
    else:
        out.backward(grad)
        reference(x_ref).backward(grad)
    torch.testing.assert_close(out, reference(x_ref))
    torch.testing.assert_close(x.grad, x_ref.grad)
    for p, p_ref in zip(layer.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad)


def test_fused_dense_bias_gradient_without_weight_gradient():
    weight = torch.randn(4, 6)
    bias = torch.randn(4, requires_grad=True)
    x = torch.randn(3, 2, 6)
    grad = torch.randn(3, 2, 4)
    fused_dense_func(x, weight, bias).backward(grad)
    torch.testing.assert_close(bias.grad, grad.sum(dim=(0, 1)))


@pytest.mark.parametrize("activation", ["gelu_approx", "relu", "sqrelu"])
@pytest.mark.parametrize("checkpoint_lvl", [0, 1, 2])
def test_fused_mlp_matches_reference(activation, checkpoint_lvl):
    mlp = FusedMLP(8, 20, 6, activation=activation, checkpoint_lvl=checkpoint_lvl, return_residual=True)
    x = torch.randn(3, 4, 8, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    params_ref = [p.detach().clone().requires_grad_() for p in (mlp.fc1.weight, mlp.fc2.weight, mlp.fc1.bias,
                                                                 mlp.fc2.bias)]
    grad = torch.randn(3, 4, 6)

    out, residual = mlp(x)
    expected = _reference_mlp(x_ref, *params_ref, activation)
    torch.testing.assert_close(out, expected)
    (out * grad).sum().add(residual.sum()).backward()
    (expected * grad).sum().add(x_ref.sum()).backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    got = _grads(mlp.fc1.weight, mlp.fc2.weight, mlp.fc1.bias, mlp.fc2.bias)
    for g, p_ref in zip(got, params_ref):
        torch.testing.assert_close(g, p_ref.grad)


def test_fused_mlp_without_biases_and_input_gradient():
    weight1 = torch.randn(10, 4, requires_grad=True)
    weight2 = torch.randn(3, 10, requires_grad=True)
    x = torch.randn(5, 4)
    out = fused_mlp_func(x, weight1, weight2, activation="relu")
    torch.testing.assert_close(out, _reference_mlp(x, weight1, weight2, None, None, "relu"))
    out.sum().backward()
    assert weight1.grad is not None and weight2.grad is not None


@pytest.mark.parametrize(
    "activation,checkpoint_lvl,save_pre_act,kept",
    [
        ("gelu_approx", 0, True, ["x", "weight1", "weight2", "pre_act", "output1"]),
        ("gelu_approx", 1, True, ["x", "weight1", "weight2", "pre_act"]),
        ("relu", 1, True, ["x", "weight1", "weight2", "pre_act", "output1"]),
        ("sqrelu", 2, True, ["x", "weight1", "weight2", "bias1"]),
        ("gelu_approx", 0, False, ["x", "weight1", "weight2", "bias1"]),
    ],
)
def test_fused_mlp_saves_per_checkpoint_lvl(activation, checkpoint_lvl, save_pre_act, kept):
    x = torch.randn(5, 4)
    weight1, bias1 = torch.randn(12, 4, requires_grad=True), torch.randn(12)
    weight2 = torch.randn(3, 12, requires_grad=True)
    out = fused_mlp_func(x, weight1, weight2, bias1, activation=activation, save_pre_act=save_pre_act,
                         checkpoint_lvl=checkpoint_lvl)
    shapes = {"x": (5, 4), "weight1": (12, 4), "weight2": (3, 12), "pre_act": (5, 12), "output1": (5, 12),
              "bias1": (12,)}
    assert [tuple(t.shape) for t in out.grad_fn.saved_tensors] == [shapes[name] for name in kept]


def test_fused_mlp_keeps_nothing_extra_in_eval_mode():
    mlp = FusedMLP(4, 12).eval()
    out = mlp(torch.randn(5, 4, requires_grad=True))
    assert len(out.grad_fn.saved_tensors) == 4  # x, weight1, weight2, bias1: checkpoint_lvl 2


def test_argument_errors():
    with pytest.raises(ValueError, match="activation"):
        FusedMLP(4, activation="gelu")
    with pytest.raises(ValueError, match="checkpoint_lvl"):
        FusedMLP(4, checkpoint_lvl=3)
    with pytest.raises(ValueError, match="heuristic"):
        FusedMLP(4, heuristic=5)
    with pytest.raises(ValueError, match="heuristic"):
        fused_mlp_func(torch.randn(2, 4), torch.randn(8, 4), torch.randn(4, 8), heuristic="auto")
    with pytest.raises(ValueError, match="activation"):
        fused_mlp_func(torch.randn(2, 4), torch.randn(8, 4), torch.randn(4, 8), activation="swish")
    for cls in (ColumnParallelLinear, RowParallelLinear):
        with pytest.raises(ValueError, match="process_group"):
            cls(4, 8, None)
    with pytest.raises(ValueError, match="process_group"):
        ParallelFusedMLP(4)


def test_sqrelu_heuristic_is_unfused():
    assert FusedMLP(4, activation="sqrelu", heuristic=0).heuristic == -1
    assert FusedMLP(4, heuristic=2).heuristic == 2


def test_parallel_layers_single_rank_are_plain_layers():
    with single_rank_group() as group:
        column = ColumnParallelLinear(6, 10, group)
        row = RowParallelLinear(10, 6, group)
        reference_column, reference_row = nn.Linear(6, 10), nn.Linear(10, 6)
        reference_column.load_state_dict(column.state_dict())
        reference_row.load_state_dict(row.state_dict())
        x = torch.randn(4, 6)
        torch.testing.assert_close(row(column(x)), reference_row(reference_column(x)))

        mlp = ParallelFusedMLP(6, 10, process_group=group, activation="sqrelu")
        assert set(mlp.state_dict()) == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}
        expected = _reference_mlp(x, mlp.fc1.weight, mlp.fc2.weight, mlp.fc1.bias, mlp.fc2.bias, "sqrelu")
        torch.testing.assert_close(mlp(x), expected)


def _offset(dim, world_size, rank, multiple_of=1):
    return sum(get_dim_for_local_rank(dim, world_size, r, multiple_of) for r in range(rank))


def _shard(dim, world_size, rank, multiple_of=1):
    start = _offset(dim, world_size, rank, multiple_of)
    return slice(start, start + get_dim_for_local_rank(dim, world_size, rank, multiple_of))


def _copy_shards(fc1, fc2, reference_fc1, reference_fc2, hidden, world_size, rank):
    cols = _shard(hidden, world_size, rank)
    with torch.no_grad():
        fc1.weight.copy_(reference_fc1.weight[cols])
        fc1.bias.copy_(reference_fc1.bias[cols])
        fc2.weight.copy_(reference_fc2.weight[:, cols])
        if fc2.bias is not None:
            fc2.bias.copy_(reference_fc2.bias)
    return cols


def _check_sharded_grads(fc1, fc2, reference_fc1, reference_fc2, cols, rank):
    torch.testing.assert_close(fc1.weight.grad, reference_fc1.weight.grad[cols])
    torch.testing.assert_close(fc1.bias.grad, reference_fc1.bias.grad[cols])
    torch.testing.assert_close(fc2.weight.grad, reference_fc2.weight.grad[:, cols])
    if rank == 0:
        torch.testing.assert_close(fc2.bias.grad, reference_fc2.bias.grad)
    else:
        assert fc2.bias is None


def _two_rank_worker(rank, group):
    world_size = 2
    torch.manual_seed(0)  # the same reference layers and data on both ranks
    tokens, dim, hidden = 8, 6, 10
    reference_fc1, reference_fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
    x_full = torch.randn(tokens, dim)
    grad_full = torch.randn(tokens, dim)

    for activation in ["identity", "gelu_approx", "relu", "sqrelu"]:
        act = REFERENCE_ACTIVATIONS.get(activation, lambda t: t)
        x_ref = x_full.clone().requires_grad_()
        reference_fc1.zero_grad()
        reference_fc2.zero_grad()
        expected = reference_fc2(act(reference_fc1(x_ref)))
        expected.backward(grad_full)
        for sequence_parallel in (True, False):
            # Sequence parallel: each rank holds half of the tokens, in and out.
            rows = slice(rank * tokens // 2, (rank + 1) * tokens // 2) if sequence_parallel else slice(None)
            options = dict(sequence_parallel=sequence_parallel)
            if activation == "identity":
                fc1 = ColumnParallelLinear(dim, hidden, group, **options)
                fc2 = RowParallelLinear(hidden, dim, group, **options)
                layer = lambda t: fc2(fc1(t))  # noqa: E731
            else:
                mlp = ParallelFusedMLP(dim, hidden, activation=activation, process_group=group,
                                       checkpoint_lvl=2 if activation == "relu" else 0, **options)
                fc1, fc2, layer = mlp.fc1, mlp.fc2, mlp
            cols = _copy_shards(fc1, fc2, reference_fc1, reference_fc2, hidden, world_size, rank)
            x = x_full[rows].clone().requires_grad_()
            out = layer(x)
            torch.testing.assert_close(out, expected[rows])
            out.backward(grad_full[rows])
            torch.testing.assert_close(x.grad, x_ref.grad[rows])
            _check_sharded_grads(fc1, fc2, reference_fc1, reference_fc2, cols, rank)

    # An uneven split in units of multiple_of: 5 units of 2 features, 3 on rank 0 and 2 on rank 1.
    column = ColumnParallelLinear(dim, 10, group, multiple_of=2, sequence_parallel=False)
    assert column.weight.shape == ((6, dim) if rank == 0 else (4, dim))
    row = RowParallelLinear(10, dim, group, multiple_of=2, sequence_parallel=False)
    assert row.weight.shape == ((dim, 6) if rank == 0 else (dim, 4))
    with pytest.raises(ValueError, match="multiple_of"):
        ColumnParallelLinear(dim, 9, group, multiple_of=2)

    # FusedMLP with a process_group gathers the tokens and reduce-scatters its output: with the
    # same full weights on both ranks, each gets twice its half of the single-device result.
    mlp = FusedMLP(dim, hidden)
    with torch.no_grad():
        for p, p_ref in zip(mlp.parameters(), [reference_fc1.weight, reference_fc1.bias, reference_fc2.weight,
                                               reference_fc2.bias]):
            p.copy_(p_ref)
    rows = slice(rank * tokens // 2, (rank + 1) * tokens // 2)
    single = _reference_mlp(x_full, reference_fc1.weight, reference_fc2.weight, reference_fc1.bias,
                            reference_fc2.bias, "gelu_approx")
    torch.testing.assert_close(mlp(x_full[rows], process_group=group), 2 * single[rows].detach())

    # FusedDense with a process_group gathers the tokens before the matmul.
    dense = FusedDense(dim, 3)
    torch.testing.assert_close(dense(x_full[rows], process_group=group), dense(x_full))


def test_parallel_layers_two_ranks(tmp_path):
    run_on_ranks(_two_rank_worker, 2, tmp_path)
