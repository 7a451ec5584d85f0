"""Feed-forward (MLP) blocks with the API of flash-attn 2.8.3's flash_attn.modules.mlp.

Mlp and GatedMlp are plain PyTorch. ParallelMLP, ParallelGatedMlp, FusedMLP and ParallelFusedMLP
keep upstream's constructor signatures, but upstream builds them on flash_attn.ops.fused_dense
(ColumnParallelLinear, RowParallelLinear and the cuBLASLt GEMM + activation fusion of the
separately built fused_dense_lib CUDA extension), which this build does not provide: constructing
one raises NotImplementedError naming the module to use instead.
"""

import torch.nn as nn
import torch.nn.functional as F

_NO_FUSED_DENSE = (
    "{cls} is not available in this build of flash_attn: it needs {needs} from "
    "flash_attn.ops.fused_dense, built on the separate fused_dense_lib CUDA extension, which this "
    "build does not provide. Use {instead} instead."
)


def _gated_hidden_features(in_features, hidden_features, multiple_of):
    """Width of the gated branch: 8/3 of the input width by default (so that the two input
    projections hold about as many weights as a 4x Mlp's one), rounded up to multiple_of."""
    if multiple_of <= 0:
        raise ValueError(f"multiple_of must be positive, got {multiple_of}")
    if hidden_features is None:
        hidden_features = int(8 * in_features / 3)
    return -(-hidden_features // multiple_of) * multiple_of


class Mlp(nn.Module):
    """fc2(activation(fc1(x))), with fc1: in_features -> hidden_features (default 4 * in_features)
    and fc2: hidden_features -> out_features (default in_features).

    return_residual: forward returns (out, x), so that a post-norm block can add the input back.
    """

    def __init__(
        self,
        in_features,
        hidden_features=None,
        out_features=None,
        activation=F.gelu,
        bias1=True,
        bias2=True,
        return_residual=False,
        device=None,
        dtype=None,
    ):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        hidden_features = 4 * in_features if hidden_features is None else hidden_features
        out_features = in_features if out_features is None else out_features
        self.return_residual = return_residual
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias1, **factory)
        self.activation = activation
        self.fc2 = nn.Linear(hidden_features, out_features, bias=bias2, **factory)

    def forward(self, x):
        out = self.fc2(self.activation(self.fc1(x)))
        return (out, x) if self.return_residual else out


class GatedMlp(nn.Module):
    """Gated linear unit: fc1 projects to 2 * hidden_features, split into (value, gate) halves in
    that order; out = fc2(value * activation(gate)).

    activation=F.sigmoid is GLU, F.silu is SwiGLU, F.gelu is GeGLU. hidden_features defaults to
    int(8 * in_features / 3) and is always rounded up to a multiple of multiple_of.
    return_residual: forward returns (out, x).
    """

    def __init__(
        self,
        in_features,
        hidden_features=None,
        out_features=None,
        activation=F.sigmoid,
        bias1=True,
        bias2=True,
        multiple_of=128,
        return_residual=False,
        device=None,
        dtype=None,
    ):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        out_features = in_features if out_features is None else out_features
        hidden_features = _gated_hidden_features(in_features, hidden_features, multiple_of)
        self.return_residual = return_residual
        self.fc1 = nn.Linear(in_features, 2 * hidden_features, bias=bias1, **factory)
        self.activation = activation
        self.fc2 = nn.Linear(hidden_features, out_features, bias=bias2, **factory)

    def forward(self, x):
        projected = self.fc1(x)
        if self.activation is F.sigmoid:
            # F.glu computes value * sigmoid(gate) in one op (one saved tensor for the backward).
            gated = F.glu(projected, dim=-1)
        else:
            value, gate = projected.chunk(2, dim=-1)
            gated = value * self.activation(gate)
        out = self.fc2(gated)
        return (out, x) if self.return_residual else out


class ParallelMLP(nn.Module):
    """Tensor-parallel Mlp (fc1 split by columns, fc2 by rows over process_group). Not available
    in this build: constructing it raises NotImplementedError."""

    def __init__(
        self,
        in_features,
        hidden_features=None,
        out_features=None,
        activation=F.gelu,
        process_group=None,
        sequence_parallel=True,
        bias1=True,
        bias2=True,
        device=None,
        dtype=None,
    ):
        raise NotImplementedError(
            _NO_FUSED_DENSE.format(
                cls="ParallelMLP",
                needs="ColumnParallelLinear and RowParallelLinear",
                instead="flash_attn.modules.mlp.Mlp (one full copy per rank)",
            )
        )


class ParallelGatedMlp(nn.Module):
    """Tensor-parallel GatedMlp. Not available in this build: constructing it raises
    NotImplementedError."""

    def __init__(
        self,
        in_features,
        process_group,
        hidden_features=None,
        out_features=None,
        activation=F.sigmoid,
        bias1=True,
        bias2=True,
        multiple_of=128,
        sequence_parallel=True,
        device=None,
        dtype=None,
    ):
        raise NotImplementedError(
            _NO_FUSED_DENSE.format(
                cls="ParallelGatedMlp",
                needs="ColumnParallelLinear and RowParallelLinear",
                instead="flash_attn.modules.mlp.GatedMlp (one full copy per rank)",
            )
        )


class FusedMLP(nn.Module):
    """Mlp whose fc1 + activation runs as one cuBLASLt GEMM with epilogue. Not available in this
    build: constructing it raises NotImplementedError."""

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
        raise NotImplementedError(
            _NO_FUSED_DENSE.format(
                cls="FusedMLP",
                needs="the fused GEMM + activation kernels",
                instead=(
                    "flash_attn.modules.mlp.Mlp with the same activation as a function "
                    "(activation='gelu_approx' is functools.partial(F.gelu, approximate='tanh'), "
                    "'relu' is F.relu, 'sqrelu' is lambda x: F.relu(x) ** 2)"
                ),
            )
        )


class ParallelFusedMLP(nn.Module):
    """Tensor-parallel FusedMLP. Not available in this build: constructing it raises
    NotImplementedError."""

    def __init__(
        self,
        in_features,
        hidden_features=None,
        out_features=None,
        activation="gelu_approx",
        process_group=None,
        bias1=True,
        bias2=True,
        sequence_parallel=True,
        checkpoint_lvl=0,
        heuristic="auto",
        device=None,
        dtype=None,
    ):
        raise NotImplementedError(
            _NO_FUSED_DENSE.format(
                cls="ParallelFusedMLP",
                needs="ColumnParallelLinear, RowParallelLinear and the fused GEMM + activation kernels",
                instead=(
                    "flash_attn.modules.mlp.Mlp (one full copy per rank) with the same activation "
                    "as a function (activation='gelu_approx' is "
                    "functools.partial(F.gelu, approximate='tanh'))"
                ),
            )
        )
