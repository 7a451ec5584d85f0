"""Feed-forward (MLP) blocks with the API of flash-attn 2.8.3's flash_attn.modules.mlp.

Mlp and GatedMlp are single-device. ParallelMLP and ParallelGatedMlp split their hidden features
over a process group (tensor parallelism) with ColumnParallelLinear / RowParallelLinear of
flash_attn.ops.fused_dense, whose FusedMLP and ParallelFusedMLP this module re-exports, as
upstream's does.
"""

import torch.nn as nn
import torch.nn.functional as F

from flash_attn.ops.fused_dense import ColumnParallelLinear, FusedMLP, ParallelFusedMLP, RowParallelLinear

__all__ = ["Mlp", "ParallelMLP", "GatedMlp", "ParallelGatedMlp", "FusedMLP", "ParallelFusedMLP"]


def _gated_hidden_features(in_features, hidden_features, multiple_of):
    """Width of the gated branch: 8/3 of the input width by default (so that the two input
    projections hold about as many weights as a 4x Mlp's one), rounded up to multiple_of."""
    if multiple_of <= 0:
        raise ValueError(f"multiple_of must be positive, got {multiple_of}")
    if hidden_features is None:
        hidden_features = int(8 * in_features / 3)
    return -(-hidden_features // multiple_of) * multiple_of


def _gated(projected, activation):
    """value * activation(gate), (value, gate) being the halves of projected's last dim."""
    if activation is F.sigmoid:
        # F.glu computes value * sigmoid(gate) in one op (one saved tensor for the backward).
        return F.glu(projected, dim=-1)
    value, gate = projected.chunk(2, dim=-1)
    return value * activation(gate)


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
        out = self.fc2(_gated(self.fc1(x), self.activation))
        return (out, x) if self.return_residual else out


class ParallelMLP(nn.Module):
    """Tensor-parallel Mlp: fc1 is a ColumnParallelLinear and fc2 a RowParallelLinear over
    process_group, so each rank holds a slice of the hidden features (and only the first rank
    fc2's bias). sequence_parallel: forward takes and returns this rank's slice of the tokens
    (the first dimension, so pass (batch * seqlen, features)); otherwise all tokens in and out.
    """

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
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        parallel = dict(sequence_parallel=sequence_parallel, **factory)
        hidden_features = 4 * in_features if hidden_features is None else hidden_features
        out_features = in_features if out_features is None else out_features
        self.fc1 = ColumnParallelLinear(in_features, hidden_features, process_group, bias=bias1, **parallel)
        self.activation = activation
        self.fc2 = RowParallelLinear(hidden_features, out_features, process_group, bias=bias2, **parallel)

    def forward(self, x):
        return self.fc2(self.activation(self.fc1(x)))


class ParallelGatedMlp(nn.Module):
    """Tensor-parallel GatedMlp (fc1 a ColumnParallelLinear, fc2 a RowParallelLinear over
    process_group). fc1's 2 * hidden_features outputs are split over the ranks as one block, and
    each rank halves its own slice into (value, gate): rank r's fc1 rows are its value rows, then
    its gate rows. sequence_parallel: as in ParallelMLP.
    """

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
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        parallel = dict(sequence_parallel=sequence_parallel, **factory)
        out_features = in_features if out_features is None else out_features
        hidden_features = _gated_hidden_features(in_features, hidden_features, multiple_of)
        self.fc1 = ColumnParallelLinear(in_features, 2 * hidden_features, process_group, bias=bias1, **parallel)
        self.activation = activation
        self.fc2 = RowParallelLinear(hidden_features, out_features, process_group, bias=bias2, **parallel)

    def forward(self, x):
        return self.fc2(_gated(self.fc1(x), self.activation))
