"""flash_attn.modules.mlp, .block and .embedding.

CPU: Mlp, GatedMlp, Block, ParallelBlock and the embeddings against hand-written PyTorch, the
signatures against flash-attn 2.8.3's, the tensor-parallel MLPs and embeddings over gloo process
groups (one rank in-process, two ranks spawned) against the single-device modules.
Triton (GPU, or TRITON_INTERPRET=1 on CPU): the fused dropout + add + norm path against the
unfused one. GPU: Block with the default MHA mixer, fused against unfused, in fp16.
"""

import functools
import inspect

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

from flash_attn.modules.block import Block, ParallelBlock, StochasticDepth
from flash_attn.modules.embedding import (
    BertEmbeddings,
    ColumnParallelEmbedding,
    GPT2Embeddings,
    ParallelGPT2Embeddings,
    VocabParallelEmbedding,
)
from flash_attn.modules.mlp import FusedMLP, GatedMlp, Mlp, ParallelFusedMLP, ParallelGatedMlp, ParallelMLP
from helpers import requires_gpu
from process_groups import run_on_ranks, single_rank_group
from triton_testing import DEVICE as TRITON_DEVICE
from triton_testing import requires_device as requires_triton

REQUIRED = inspect.Parameter.empty

# ---------------------------------------------------------------------------------------------
# Signatures: names, order and defaults of flash-attn 2.8.3 (read from its v2.8.3 sources)
# ---------------------------------------------------------------------------------------------

UPSTREAM_SIGNATURES = {
    Mlp: [
        ("in_features", REQUIRED), ("hidden_features", None), ("out_features", None), ("activation", F.gelu),
        ("bias1", True), ("bias2", True), ("return_residual", False), ("device", None), ("dtype", None),
    ],
    Mlp.forward: [("x", REQUIRED)],
    GatedMlp: [
        ("in_features", REQUIRED), ("hidden_features", None), ("out_features", None), ("activation", F.sigmoid),
        ("bias1", True), ("bias2", True), ("multiple_of", 128), ("return_residual", False), ("device", None),
        ("dtype", None),
    ],
    GatedMlp.forward: [("x", REQUIRED)],
    ParallelMLP: [
        ("in_features", REQUIRED), ("hidden_features", None), ("out_features", None), ("activation", F.gelu),
        ("process_group", None), ("sequence_parallel", True), ("bias1", True), ("bias2", True), ("device", None),
        ("dtype", None),
    ],
    ParallelGatedMlp: [
        ("in_features", REQUIRED), ("process_group", REQUIRED), ("hidden_features", None), ("out_features", None),
        ("activation", F.sigmoid), ("bias1", True), ("bias2", True), ("multiple_of", 128),
        ("sequence_parallel", True), ("device", None), ("dtype", None),
    ],
    FusedMLP: [
        ("in_features", REQUIRED), ("hidden_features", None), ("out_features", None), ("bias1", True),
        ("bias2", True), ("activation", "gelu_approx"), ("return_residual", False), ("checkpoint_lvl", 0),
        ("heuristic", "auto"), ("device", None), ("dtype", None),
    ],
    ParallelFusedMLP: [
        ("in_features", REQUIRED), ("hidden_features", None), ("out_features", None),
        ("activation", "gelu_approx"), ("process_group", None), ("bias1", True), ("bias2", True),
        ("sequence_parallel", True), ("checkpoint_lvl", 0), ("heuristic", "auto"), ("device", None),
        ("dtype", None),
    ],
    Block: [
        ("dim", REQUIRED), ("mixer_cls", None), ("mlp_cls", None), ("norm_cls", nn.LayerNorm),
        ("dropout_cls", nn.Dropout), ("prenorm", True), ("resid_dropout1", 0.0), ("resid_dropout2", 0.0),
        ("drop_path1", 0.0), ("drop_path2", 0.0), ("fused_dropout_add_ln", False), ("return_residual", False),
        ("residual_in_fp32", False), ("sequence_parallel", False), ("mark_shared_params", False),
    ],
    Block.forward: [("hidden_states", REQUIRED), ("residual", None), ("mixer_subset", None), ("mixer_kwargs", None)],
    Block.allocate_inference_cache: [("batch_size", REQUIRED), ("max_seqlen", REQUIRED), ("dtype", None),
                                     ("**kwargs", REQUIRED)],
    ParallelBlock: [
        ("dim", REQUIRED), ("mixer_cls", None), ("mlp_cls", None), ("norm_cls", nn.LayerNorm),
        ("dropout_cls", nn.Dropout), ("resid_dropout1", 0.0), ("resid_dropout2", 0.0), ("tied_norm", False),
        ("fused_dropout_add_ln", False), ("residual_in_fp32", False), ("sequence_parallel", False),
        ("mark_shared_params", False),
    ],
    ParallelBlock.forward: [("hidden_states1", REQUIRED), ("hidden_states2", None), ("residual", None),
                            ("mixer_kwargs", None)],
    ParallelBlock.allocate_inference_cache: [("batch_size", REQUIRED), ("max_seqlen", REQUIRED), ("dtype", None),
                                             ("**kwargs", REQUIRED)],
    GPT2Embeddings: [
        ("embed_dim", REQUIRED), ("vocab_size", REQUIRED), ("max_position_embeddings", REQUIRED),
        ("padding_idx", None), ("word_embed_proj_dim", None), ("device", None), ("dtype", None),
    ],
    GPT2Embeddings.forward: [("input_ids", REQUIRED), ("position_ids", None)],
    BertEmbeddings: [
        ("embed_dim", REQUIRED), ("vocab_size", REQUIRED), ("max_position_embeddings", REQUIRED),
        ("type_vocab_size", REQUIRED), ("padding_idx", None), ("device", None), ("dtype", None),
    ],
    BertEmbeddings.forward: [("input_ids", REQUIRED), ("position_ids", None), ("token_type_ids", None)],
    VocabParallelEmbedding: [
        ("num_embeddings", REQUIRED), ("*args", REQUIRED), ("process_group", None), ("padding_idx", None),
        ("**kwargs", REQUIRED),
    ],
    ColumnParallelEmbedding: [
        ("num_embeddings", REQUIRED), ("embedding_dim", REQUIRED), ("*args", REQUIRED), ("process_group", None),
        ("**kwargs", REQUIRED),
    ],
    ParallelGPT2Embeddings: [
        ("embed_dim", REQUIRED), ("vocab_size", REQUIRED), ("max_position_embeddings", REQUIRED),
        ("process_group", REQUIRED), ("padding_idx", None), ("sequence_parallel", True), ("device", None),
        ("dtype", None),
    ],
    ParallelGPT2Embeddings.forward: [("input_ids", REQUIRED), ("position_ids", None),
                                     ("combine_batch_seqlen_dim", False)],
}


def _parameters(obj):
    prefix = {inspect.Parameter.VAR_POSITIONAL: "*", inspect.Parameter.VAR_KEYWORD: "**"}
    return [
        (prefix.get(p.kind, "") + p.name, p.default)
        for p in inspect.signature(obj).parameters.values()
        if p.name != "self"
    ]


@pytest.mark.parametrize("obj", list(UPSTREAM_SIGNATURES), ids=lambda obj: obj.__qualname__)
def test_upstream_signature(obj):
    assert _parameters(obj) == UPSTREAM_SIGNATURES[obj]


# ---------------------------------------------------------------------------------------------
# Mlp, GatedMlp and the tensor-parallel MLPs
# ---------------------------------------------------------------------------------------------


def test_mlp_matches_formula_and_defaults():
    mlp = Mlp(6, hidden_features=10, out_features=5, activation=F.relu, bias2=False)
    assert mlp.fc2.bias is None
    x = torch.randn(2, 3, 6)
    expected = F.linear(F.relu(F.linear(x, mlp.fc1.weight, mlp.fc1.bias)), mlp.fc2.weight)
    torch.testing.assert_close(mlp(x), expected)

    default = Mlp(8)
    assert (default.fc1.in_features, default.fc1.out_features, default.fc2.out_features) == (8, 32, 8)
    assert default.activation is F.gelu


def test_mlp_return_residual():
    mlp = Mlp(4, return_residual=True)
    x = torch.randn(3, 4)
    out, residual = mlp(x)
    assert residual is x
    torch.testing.assert_close(out, mlp.fc2(F.gelu(mlp.fc1(x))))


def test_mlp_device_and_dtype():
    mlp = Mlp(4, device="cpu", dtype=torch.float64)
    gated = GatedMlp(4, dtype=torch.bfloat16)
    assert {p.dtype for p in mlp.parameters()} == {torch.float64}
    assert {p.dtype for p in gated.parameters()} == {torch.bfloat16}


@pytest.mark.parametrize(
    "activation",
    [F.sigmoid, F.silu, F.gelu, functools.partial(F.gelu, approximate="tanh"), F.relu],
    ids=["sigmoid_glu", "silu_swiglu", "gelu", "gelu_tanh", "relu"],
)
def test_gated_mlp_matches_formula(activation):
    mlp = GatedMlp(8, hidden_features=16, out_features=6, activation=activation, multiple_of=8)
    x = torch.randn(2, 5, 8, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    w1, b1 = mlp.fc1.weight.detach().clone().requires_grad_(), mlp.fc1.bias.detach().clone().requires_grad_()
    # The first half of fc1's output is the value, the second half the gate.
    h = F.linear(x_ref, w1, b1)
    expected = F.linear(h[..., :16] * activation(h[..., 16:]), mlp.fc2.weight.detach(), mlp.fc2.bias.detach())
    out = mlp(x)
    torch.testing.assert_close(out, expected)
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(mlp.fc1.weight.grad, w1.grad)
    torch.testing.assert_close(mlp.fc1.bias.grad, b1.grad)


def test_gated_mlp_hidden_size_rounding():
    def widths(mlp):
        return mlp.fc1.out_features, mlp.fc2.in_features

    assert widths(GatedMlp(96)) == (2 * 256, 256)  # int(8 * 96 / 3) = 256, already a multiple of 128
    assert widths(GatedMlp(100)) == (2 * 384, 384)  # int(266.67) = 266 -> 384
    assert widths(GatedMlp(64, hidden_features=100, multiple_of=32)) == (2 * 128, 128)
    assert widths(GatedMlp(64, hidden_features=96, multiple_of=32)) == (2 * 96, 96)
    assert GatedMlp(10, out_features=3, bias1=False).fc1.bias is None
    assert GatedMlp(10, out_features=3).fc2.out_features == 3
    with pytest.raises(ValueError, match="multiple_of"):
        GatedMlp(64, multiple_of=0)


def test_gated_mlp_return_residual():
    mlp = GatedMlp(4, hidden_features=8, multiple_of=4, return_residual=True)
    x = torch.randn(3, 4)
    out, residual = mlp(x)
    assert residual is x and out.shape == (3, 4)


def test_fused_mlp_classes_come_from_ops_fused_dense():
    from flash_attn.ops import fused_dense

    assert FusedMLP is fused_dense.FusedMLP and ParallelFusedMLP is fused_dense.ParallelFusedMLP


@pytest.mark.parametrize("make", [lambda: ParallelMLP(16), lambda: ParallelGatedMlp(16, None)],
                         ids=["ParallelMLP", "ParallelGatedMlp"])
def test_parallel_mlps_need_a_process_group(make):
    with pytest.raises(ValueError, match="process_group"):
        make()


def test_parallel_mlps_single_rank():
    with single_rank_group() as group:
        x = torch.randn(6, 8)
        reference, parallel = Mlp(8, 12), ParallelMLP(8, 12, process_group=group)
        parallel.load_state_dict(reference.state_dict())
        torch.testing.assert_close(parallel(x), reference(x))
        reference = GatedMlp(8, 12, activation=F.silu, multiple_of=4)
        parallel = ParallelGatedMlp(8, group, 12, activation=F.silu, multiple_of=4)
        parallel.load_state_dict(reference.state_dict())
        torch.testing.assert_close(parallel(x), reference(x))


def _parallel_mlps_worker(rank, group):
    torch.manual_seed(0)  # the same reference weights and data on both ranks
    tokens, dim, hidden = 8, 6, 12
    x_full, grad_full = torch.randn(tokens, dim), torch.randn(tokens, dim)
    # Built before any parallel layer: those draw different amounts of randomness on each rank.
    references = [Mlp(dim, hidden, activation=F.relu), GatedMlp(dim, hidden, activation=F.silu, multiple_of=4)]
    hidden_rows = slice(rank * hidden // 2, (rank + 1) * hidden // 2)
    for gated, reference in zip((False, True), references):
        fc1_rows = torch.arange(hidden)[hidden_rows]
        if gated:
            # Rank r's fc1 rows are its slice of the value rows, then its slice of the gate rows.
            fc1_rows = torch.cat([fc1_rows, hidden + fc1_rows])
        x_ref = x_full.clone().requires_grad_()
        expected = reference(x_ref)
        expected.backward(grad_full)
        for sequence_parallel in (True, False):
            if gated:
                parallel = ParallelGatedMlp(dim, group, hidden, activation=F.silu, multiple_of=4,
                                            sequence_parallel=sequence_parallel)
            else:
                parallel = ParallelMLP(dim, hidden, activation=F.relu, process_group=group,
                                       sequence_parallel=sequence_parallel)
            with torch.no_grad():
                parallel.fc1.weight.copy_(reference.fc1.weight[fc1_rows])
                parallel.fc1.bias.copy_(reference.fc1.bias[fc1_rows])
                parallel.fc2.weight.copy_(reference.fc2.weight[:, hidden_rows])
                if rank == 0:
                    parallel.fc2.bias.copy_(reference.fc2.bias)
            assert (parallel.fc2.bias is None) == (rank == 1)
            rows = slice(rank * tokens // 2, (rank + 1) * tokens // 2) if sequence_parallel else slice(None)
            x = x_full[rows].clone().requires_grad_()
            out = parallel(x)
            torch.testing.assert_close(out, expected[rows])
            out.backward(grad_full[rows])
            torch.testing.assert_close(x.grad, x_ref.grad[rows])
            torch.testing.assert_close(parallel.fc1.weight.grad, reference.fc1.weight.grad[fc1_rows])
            torch.testing.assert_close(parallel.fc2.weight.grad, reference.fc2.weight.grad[:, hidden_rows])


def test_parallel_mlps_two_ranks(tmp_path):
    run_on_ranks(_parallel_mlps_worker, 2, tmp_path)


# ---------------------------------------------------------------------------------------------
# Block and ParallelBlock against hand-written PyTorch
# ---------------------------------------------------------------------------------------------


class LinearMixer(nn.Module):
    """A stand-in for attention: a linear map, recording the keyword arguments it gets. With
    mixer_subset it computes only those positions, as MHA does."""

    def __init__(self, dim, return_residual=False):
        super().__init__()
        self.proj = nn.Linear(dim, dim)
        self.return_residual = return_residual
        self.calls = []

    def forward(self, x, mixer_subset=None, **kwargs):
        self.calls.append(dict(kwargs, mixer_subset=mixer_subset))
        out = self.proj(x if mixer_subset is None else x[:, mixer_subset])
        return (out, x) if self.return_residual else out

    def allocate_inference_cache(self, batch_size, max_seqlen, dtype=None, **kwargs):
        return ("cache", batch_size, max_seqlen, dtype, kwargs)


def _norm(norm, x):
    return F.layer_norm(x, x.shape[-1:], norm.weight, norm.bias, norm.eps)


def _randomize_norms(module):
    # Non-trivial norm weights, so that a swapped or skipped norm shows up.
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.startswith("norm"):
                p.copy_(torch.randn_like(p))


def _block(prenorm=True, mlp_cls=None, **kwargs):
    block = Block(
        16,
        mixer_cls=LinearMixer,
        mlp_cls=mlp_cls or functools.partial(Mlp, hidden_features=32),
        prenorm=prenorm,
        **kwargs,
    )
    _randomize_norms(block)
    return block


@pytest.mark.parametrize("has_residual", [False, True])
def test_block_prenorm_matches_formula(has_residual):
    block = _block()
    x = torch.randn(2, 5, 16, requires_grad=True)
    residual = torch.randn(2, 5, 16) if has_residual else None
    out, new_residual = block(x, residual)

    summed = x + residual if has_residual else x
    mixed = block.mixer.proj(_norm(block.norm1, summed))
    expected_residual = mixed + summed
    expected = block.mlp(_norm(block.norm2, expected_residual))
    torch.testing.assert_close(new_residual, expected_residual)
    torch.testing.assert_close(out, expected)
    if not has_residual:
        # The first block's residual is its input: the gradient reaches it through both paths.
        (out.sum() + new_residual.sum()).backward()
        assert x.grad is not None and torch.isfinite(x.grad).all()


def test_block_prenorm_dropout_and_drop_path_in_training():
    block = _block(resid_dropout1=0.3, resid_dropout2=0.2, drop_path1=0.25, drop_path2=0.5).train()
    x, residual = torch.randn(4, 3, 16), torch.randn(4, 3, 16)
    torch.manual_seed(7)
    out, new_residual = block(x, residual)

    # The same random draws, in the same order: dropout1, drop path 1, dropout2, drop path 2.
    def drop_path(h, p):
        keep = torch.empty(h.shape[0], 1, 1).bernoulli_(1 - p)
        return h * keep / (1 - p)

    torch.manual_seed(7)
    r1 = drop_path(F.dropout(x, 0.3), 0.25) + residual
    mixed = block.mixer.proj(_norm(block.norm1, r1))
    r2 = drop_path(F.dropout(mixed, 0.2), 0.5) + r1
    torch.testing.assert_close(new_residual, r2)
    torch.testing.assert_close(out, block.mlp(_norm(block.norm2, r2)))

    block.eval()
    out_eval, residual_eval = block(x, residual)
    mixed = block.mixer.proj(_norm(block.norm1, x + residual))
    torch.testing.assert_close(residual_eval, mixed + x + residual)


def test_block_residual_in_fp32():
    block = _block(residual_in_fp32=True).to(torch.bfloat16)
    x = torch.randn(2, 3, 16, dtype=torch.bfloat16)
    out, residual = block(x)
    assert out.dtype == torch.bfloat16 and residual.dtype == torch.float32
    mixed = block.mixer.proj(_norm(block.norm1, x))
    torch.testing.assert_close(residual, mixed.float() + x.float())

    out2, residual2 = block(out, residual)
    assert residual2.dtype == torch.float32

    with pytest.raises(ValueError, match="residual_in_fp32"):
        Block(16, mixer_cls=LinearMixer, prenorm=False, residual_in_fp32=True)


def test_block_postnorm_matches_formula():
    block = _block(prenorm=False)
    x = torch.randn(2, 5, 16)
    h = _norm(block.norm1, block.mixer.proj(x) + x)
    expected = _norm(block.norm2, block.mlp(h) + h)
    torch.testing.assert_close(block(x), expected)

    with pytest.raises(ValueError, match="residual must be None"):
        block(x, torch.randn(2, 5, 16))
    with pytest.raises(ValueError, match="mixer_subset"):
        block(x, mixer_subset=slice(0, 1))


def test_block_postnorm_return_residual():
    # The sub-layers return (output, input) and the block adds that input back.
    block = Block(
        16,
        mixer_cls=functools.partial(LinearMixer, return_residual=True),
        mlp_cls=functools.partial(Mlp, hidden_features=32, return_residual=True),
        prenorm=False,
        return_residual=True,
    )
    _randomize_norms(block)
    x = torch.randn(2, 5, 16)
    h = _norm(block.norm1, block.mixer.proj(x) + x)
    mlp_out, _ = block.mlp(h)
    torch.testing.assert_close(block(x), _norm(block.norm2, mlp_out + h))


def test_block_mixer_subset_and_kwargs():
    block = _block()
    x, residual = torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    kwargs = {"key_padding_mask": None}
    out, new_residual = block(x, residual, mixer_subset=slice(0, 2), mixer_kwargs=kwargs)
    assert kwargs == {"key_padding_mask": None}, "the caller's mixer_kwargs were modified"
    assert block.mixer.calls[-1] == {"key_padding_mask": None, "mixer_subset": slice(0, 2)}

    summed = x + residual
    mixed = block.mixer.proj(_norm(block.norm1, summed)[:, :2])
    torch.testing.assert_close(new_residual, mixed + summed[:, :2])
    assert out.shape == (2, 2, 16)


def test_block_identity_mlp():
    block = _block(mlp_cls=lambda dim: nn.Identity())
    assert not any(hasattr(block, name) for name in ("dropout2", "drop_path2", "norm2"))
    x = torch.randn(2, 3, 16)
    out, residual = block(x)
    torch.testing.assert_close(out, block.mixer.proj(_norm(block.norm1, x)))
    torch.testing.assert_close(residual, x)

    post = _block(prenorm=False, mlp_cls=lambda dim: nn.Identity())
    torch.testing.assert_close(post(x), _norm(post.norm1, post.mixer.proj(x) + x))


def test_block_state_dict_keys_match_upstream():
    block = Block(16, mixer_cls=LinearMixer, mlp_cls=Mlp)
    assert sorted(block.state_dict()) == sorted([
        "mixer.proj.weight", "mixer.proj.bias", "norm1.weight", "norm1.bias", "mlp.fc1.weight", "mlp.fc1.bias",
        "mlp.fc2.weight", "mlp.fc2.bias", "norm2.weight", "norm2.bias",
    ])
    assert isinstance(block.drop_path1, StochasticDepth) and block.drop_path1.mode == "row"


def test_block_parameter_flags_and_inference_cache():
    block = _block(sequence_parallel=True, mark_shared_params=True)
    for name, p in block.named_parameters():
        is_norm = name.startswith(("norm1", "norm2"))
        assert getattr(p, "_sequence_parallel", False) == is_norm, name
        assert getattr(p, "_shared_params", False) == is_norm, name
    assert not any(hasattr(p, "_sequence_parallel") for p in _block().parameters())
    assert block.allocate_inference_cache(2, 64, dtype=torch.float16, extra=1) == (
        "cache", 2, 64, torch.float16, {"extra": 1})


def test_block_fused_needs_fusable_norm_and_dropout():
    with pytest.raises(TypeError, match="norm_cls"):
        Block(16, mixer_cls=LinearMixer, norm_cls=lambda dim: nn.Identity(), fused_dropout_add_ln=True)
    with pytest.raises(TypeError, match="dropout_cls"):
        Block(16, mixer_cls=LinearMixer, dropout_cls=lambda p: nn.Identity(), fused_dropout_add_ln=True)
    with pytest.raises(TypeError, match="norm_cls"):
        ParallelBlock(16, mixer_cls=LinearMixer, norm_cls=nn.BatchNorm1d, fused_dropout_add_ln=True)


@pytest.mark.parametrize("cls", [Block, ParallelBlock])
def test_default_mixer_and_mlp(cls):
    # mixer_cls=None is MHA with dim // 64 heads (its PyTorch attention runs on the CPU), and
    # mlp_cls=None an Mlp with a 4 * dim hidden layer.
    from flash_attn.modules.mha import MHA

    block = cls(128)
    assert isinstance(block.mixer, MHA) and block.mixer.num_heads == 2
    assert isinstance(block.mlp, Mlp) and block.mlp.fc1.out_features == 512
    outs = block(torch.randn(2, 5, 128))
    assert [tuple(o.shape) for o in outs] == [(2, 5, 128)] * len(outs)
    cache = block.allocate_inference_cache(2, 16, dtype=torch.float32)
    assert torch.is_tensor(cache) and cache.shape[:2] == (2, 16)


def test_stochastic_depth():
    x = torch.randn(64, 3, 5) + 3.0
    sd = StochasticDepth(0.5, "row")
    out = sd(x)
    per_sample = out / x
    kept = per_sample[:, 0, 0]
    assert set(torch.unique(kept).tolist()) <= {0.0, 2.0} and 0 < (kept == 0).sum() < 64
    torch.testing.assert_close(per_sample, kept[:, None, None].expand_as(x))
    batch = StochasticDepth(0.5, "batch")(x) / x
    assert len(torch.unique(batch)) == 1
    assert (StochasticDepth(1.0, "row")(x) == 0).all()
    assert StochasticDepth(0.0, "row")(x) is x
    assert sd.eval()(x) is x
    with pytest.raises(ValueError, match="p must be"):
        StochasticDepth(1.5, "row")
    with pytest.raises(ValueError, match="mode"):
        StochasticDepth(0.1, "col")


def _parallel_block(**kwargs):
    block = ParallelBlock(16, mixer_cls=LinearMixer, mlp_cls=functools.partial(Mlp, hidden_features=32), **kwargs)
    _randomize_norms(block)
    return block


@pytest.mark.parametrize("tied_norm", [False, True])
def test_parallel_block_matches_formula(tied_norm):
    block = _parallel_block(tied_norm=tied_norm)
    assert hasattr(block, "norm2") != tied_norm
    norm2 = block.norm1 if tied_norm else block.norm2
    h1, h2, residual = (torch.randn(2, 4, 16) for _ in range(3))

    out1, out2, new_residual = block(h1)
    torch.testing.assert_close(new_residual, h1)
    torch.testing.assert_close(out1, block.mixer.proj(_norm(block.norm1, h1)))
    torch.testing.assert_close(out2, block.mlp(_norm(norm2, h1)))

    out1, out2, new_residual = block(h1, h2, residual, mixer_kwargs={"cu_seqlens": None})
    summed = residual + h1 + h2
    torch.testing.assert_close(new_residual, summed)
    torch.testing.assert_close(out1, block.mixer.proj(_norm(block.norm1, summed)))
    torch.testing.assert_close(out2, block.mlp(_norm(norm2, summed)))
    assert block.mixer.calls[-1] == {"cu_seqlens": None, "mixer_subset": None}


def test_parallel_block_dropout_and_residual_in_fp32():
    block = _parallel_block(resid_dropout1=0.3, resid_dropout2=0.6, residual_in_fp32=True).train()
    h1, h2 = torch.randn(2, 4, 16, dtype=torch.bfloat16), torch.randn(2, 4, 16, dtype=torch.bfloat16)
    block.to(torch.bfloat16)
    torch.manual_seed(3)
    _, _, residual = block(h1, h2)
    torch.manual_seed(3)
    expected = F.dropout(h1, 0.3) + F.dropout(h2, 0.6)
    assert residual.dtype == torch.float32
    torch.testing.assert_close(residual, expected.float())


# ---------------------------------------------------------------------------------------------
# The fused dropout + add + norm path (Triton) against the unfused one
# ---------------------------------------------------------------------------------------------


def _norm_classes():
    from flash_attn.ops.triton.layer_norm import RMSNorm

    return {"layernorm": nn.LayerNorm, "rmsnorm": functools.partial(RMSNorm, eps=1e-5)}


def _fused_and_unfused(cls, norm, device, **kwargs):
    """Two copies of one module, with and without fused_dropout_add_ln."""
    norm_cls = _norm_classes()[norm]
    unfused = cls(norm_cls=norm_cls, fused_dropout_add_ln=False, **kwargs).to(device)
    _randomize_norms(unfused)
    fused = cls(norm_cls=norm_cls, fused_dropout_add_ln=True, **kwargs).to(device)
    fused.load_state_dict(unfused.state_dict())
    return fused, unfused


def _run(module, inputs, seed):
    """Outputs and input/parameter gradients of one forward + backward (fixed upstream gradient)."""
    inputs = [t.detach().clone().requires_grad_() if t is not None else None for t in inputs]
    module.zero_grad()
    torch.manual_seed(seed)
    outs = module(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    torch.manual_seed(seed + 1)
    torch.autograd.backward(outs, [torch.randn_like(o) for o in outs])
    grads = [t.grad for t in inputs if t is not None] + [p.grad for p in module.parameters()]
    return outs, grads


def _assert_all_close(actual, expected, **tol):
    assert len(actual) == len(expected)
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert a.dtype == e.dtype, (i, a.dtype, e.dtype)
        torch.testing.assert_close(a, e, msg=lambda m: f"item {i}: {m}", **tol)


@requires_triton
@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
@pytest.mark.parametrize("prenorm,has_residual,residual_in_fp32",
                         [(True, False, False), (True, True, False), (True, False, True), (False, False, False)])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "drop_path"])
def test_block_fused_matches_unfused(norm, prenorm, has_residual, residual_in_fp32, training):
    # Training exercises stochastic depth (drawn in PyTorch with the same generator on both paths,
    # and passed to the kernel as a row scale); dropout stays off so the outputs must match.
    fused, unfused = _fused_and_unfused(
        functools.partial(Block, 32, mixer_cls=LinearMixer, mlp_cls=functools.partial(Mlp, hidden_features=64)),
        norm, TRITON_DEVICE, prenorm=prenorm, residual_in_fp32=residual_in_fp32, drop_path1=0.5, drop_path2=0.5,
    )
    fused.train(training)
    unfused.train(training)
    x = torch.randn(4, 3, 32, device=TRITON_DEVICE)
    residual = torch.randn(4, 3, 32, device=TRITON_DEVICE) if has_residual else None
    outs, grads = _run(fused, [x, residual], seed=11)
    outs_ref, grads_ref = _run(unfused, [x, residual], seed=11)
    _assert_all_close(outs, outs_ref, atol=1e-4, rtol=1e-4)
    _assert_all_close(grads, grads_ref, atol=1e-4, rtol=1e-4)


@requires_triton
@pytest.mark.parametrize("subset", [slice(1, 3), [0, 4, 5]], ids=["slice", "index"])
def test_block_fused_mixer_subset(subset):
    # The sliced residual reaching the second fused norm is not contiguous.
    fused, unfused = _fused_and_unfused(
        functools.partial(Block, 32, mixer_cls=LinearMixer), "layernorm", TRITON_DEVICE)
    if isinstance(subset, list):
        subset = torch.tensor(subset, device=TRITON_DEVICE)
    x, residual = torch.randn(2, 6, 32, device=TRITON_DEVICE), torch.randn(2, 6, 32, device=TRITON_DEVICE)
    outs = fused(x, residual, mixer_subset=subset)
    outs_ref = unfused(x, residual, mixer_subset=subset)
    _assert_all_close(outs, outs_ref, atol=1e-4, rtol=1e-4)


@requires_triton
@pytest.mark.parametrize("prenorm", [True, False])
def test_block_fused_with_default_mixer(prenorm):
    fused, unfused = _fused_and_unfused(functools.partial(Block, 64), "layernorm", TRITON_DEVICE, prenorm=prenorm)
    x = torch.randn(2, 4, 64, device=TRITON_DEVICE)
    outs, grads = _run(fused, [x], seed=2)
    outs_ref, grads_ref = _run(unfused, [x], seed=2)
    _assert_all_close(outs, outs_ref, atol=1e-4, rtol=1e-4)
    _assert_all_close(grads, grads_ref, atol=1e-4, rtol=1e-4)


@requires_triton
def test_block_fused_dropout_keeps_or_scales_each_entry():
    # Without an MLP, the returned residual is dropout1(x) + residual: each entry of x is either
    # dropped or scaled by 1 / (1 - p).
    block = Block(32, mixer_cls=LinearMixer, mlp_cls=lambda dim: nn.Identity(), resid_dropout1=0.5,
                  fused_dropout_add_ln=True).to(TRITON_DEVICE)
    x, residual = torch.randn(2, 8, 32, device=TRITON_DEVICE), torch.randn(2, 8, 32, device=TRITON_DEVICE)
    with torch.no_grad():
        dropped = block.train()(x, residual)[1] - residual
        assert torch.equal(block.eval()(x, residual)[1], x + residual)
    kept = dropped.abs() > 1e-6
    assert 0 < kept.sum() < kept.numel()
    torch.testing.assert_close(dropped[kept], 2 * x[kept], atol=1e-5, rtol=1e-5)


@requires_triton
@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
@pytest.mark.parametrize("tied_norm", [False, True])
@pytest.mark.parametrize("inputs", ["first_block", "all", "no_residual"])
@pytest.mark.parametrize("residual_in_fp32", [False, True])
def test_parallel_block_fused_matches_unfused(norm, tied_norm, inputs, residual_in_fp32):
    fused, unfused = _fused_and_unfused(
        functools.partial(ParallelBlock, 32, mixer_cls=LinearMixer,
                          mlp_cls=functools.partial(Mlp, hidden_features=64)),
        norm, TRITON_DEVICE, tied_norm=tied_norm, residual_in_fp32=residual_in_fp32,
    )
    h1, h2, residual = (torch.randn(2, 3, 32, device=TRITON_DEVICE) for _ in range(3))
    args = {"first_block": [h1, None, None], "all": [h1, h2, residual], "no_residual": [h1, h2, None]}[inputs]
    outs, grads = _run(fused, args, seed=5)
    outs_ref, grads_ref = _run(unfused, args, seed=5)
    _assert_all_close(outs, outs_ref, atol=1e-4, rtol=1e-4)
    _assert_all_close(grads, grads_ref, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# Block with the default MHA mixer on the GPU, fused against unfused in fp16
# ---------------------------------------------------------------------------------------------


class TestBlockWithMHA:
    pytestmark = requires_gpu

    @pytest.mark.parametrize("prenorm", [True, False])
    @pytest.mark.parametrize("use_flash_attn", [None, True], ids=["default_mixer", "flash_mixer"])
    def test_fused_matches_unfused_fp16(self, prenorm, use_flash_attn):
        from flash_attn.modules.mha import MHA

        dim = 256
        if use_flash_attn is None:
            mixer_cls = ref_mixer_cls = None
        else:
            # The float32 reference runs MHA's PyTorch attention: flash attention takes fp16/bf16.
            # Both have the same parameters, so one state dict serves all three blocks.
            mixer_cls = functools.partial(MHA, num_heads=dim // 64, use_flash_attn=True, causal=True)
            ref_mixer_cls = functools.partial(MHA, num_heads=dim // 64, use_flash_attn=False, causal=True)
        ref = Block(dim, mixer_cls=ref_mixer_cls, prenorm=prenorm).cuda()
        _randomize_norms(ref)
        unfused = Block(dim, mixer_cls=mixer_cls, prenorm=prenorm).cuda().half()
        fused = Block(dim, mixer_cls=mixer_cls, prenorm=prenorm, fused_dropout_add_ln=True).cuda().half()
        unfused.load_state_dict(ref.state_dict())
        fused.load_state_dict(ref.state_dict())
        x = torch.randn(2, 128, dim, device="cuda")
        residual = torch.randn(2, 128, dim, device="cuda") if prenorm else None

        def run(module, dtype):
            return _run(module, [x.to(dtype), residual.to(dtype) if residual is not None else None], seed=3)

        outs_ref, grads_ref = run(ref, torch.float32)
        outs_pt, grads_pt = run(unfused, torch.float16)
        outs, grads = run(fused, torch.float16)
        # Fused fp16 must be about as close to the fp32 reference as unfused fp16 is.
        for name, a, pt, r in zip(
            [f"out{i}" for i in range(len(outs))] + [f"grad{i}" for i in range(len(grads))],
            list(outs) + grads, list(outs_pt) + grads_pt, list(outs_ref) + grads_ref,
        ):
            err = (a.float() - r).abs().max().item()
            err_pt = (pt.float() - r).abs().max().item()
            assert err <= 2 * err_pt + 1e-3 * r.abs().max().item() + 1e-5, (name, err, err_pt)


# ---------------------------------------------------------------------------------------------
# Embeddings
# ---------------------------------------------------------------------------------------------


def test_gpt2_embeddings():
    emb = GPT2Embeddings(8, 20, 16)
    ids = torch.randint(0, 20, (3, 5))
    expected = emb.word_embeddings.weight[ids] + emb.position_embeddings.weight[:5]
    torch.testing.assert_close(emb(ids), expected)
    positions = torch.randint(0, 16, (3, 5))
    expected = emb.word_embeddings.weight[ids] + emb.position_embeddings.weight[positions]
    torch.testing.assert_close(emb(ids, position_ids=positions), expected)

    no_positions = GPT2Embeddings(8, 20, 0)
    assert not hasattr(no_positions, "position_embeddings") and no_positions.project_in is None
    torch.testing.assert_close(no_positions(ids), no_positions.word_embeddings.weight[ids])

    with pytest.raises(ValueError, match="input_ids"):
        emb(ids[0])


def test_gpt2_embeddings_projection_and_padding():
    emb = GPT2Embeddings(8, 20, 16, padding_idx=0, word_embed_proj_dim=4, dtype=torch.float64)
    assert emb.word_embeddings.embedding_dim == 4 and emb.project_in.bias is None
    assert emb.project_in.weight.dtype == torch.float64
    ids = torch.tensor([[3, 0, 7], [0, 0, 1]])
    out = emb(ids)
    expected = emb.word_embeddings.weight[ids] @ emb.project_in.weight.T + emb.position_embeddings.weight[:3]
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    assert (emb.word_embeddings.weight.grad[0] == 0).all()
    assert (emb.word_embeddings.weight[0] == 0).all()


def test_bert_embeddings():
    emb = BertEmbeddings(8, 30, 10, 2, padding_idx=1)
    ids = torch.randint(0, 30, (2, 6))
    types = torch.randint(0, 2, (2, 6))
    positions = torch.randint(0, 10, (2, 6))
    w = emb.word_embeddings.weight
    default = w[ids] + emb.position_embeddings.weight[:6] + emb.token_type_embeddings.weight[0]
    torch.testing.assert_close(emb(ids), default)
    explicit = w[ids] + emb.position_embeddings.weight[positions] + emb.token_type_embeddings.weight[types]
    torch.testing.assert_close(emb(ids, position_ids=positions, token_type_ids=types), explicit)
    assert (w[1] == 0).all()

    bare = BertEmbeddings(8, 30, 0, 0)
    assert not hasattr(bare, "position_embeddings") and not hasattr(bare, "token_type_embeddings")
    torch.testing.assert_close(bare(ids), bare.word_embeddings.weight[ids])


@pytest.fixture
def one_rank_group():
    with single_rank_group() as group:
        yield group


def test_parallel_embeddings_single_rank(one_rank_group):
    group = one_rank_group
    vocab = VocabParallelEmbedding(12, 4, process_group=group, padding_idx=2)
    assert vocab.num_embeddings == 12 and vocab.padding_idx == 2
    ids = torch.randint(0, 12, (2, 5))
    torch.testing.assert_close(vocab(ids), vocab.weight[ids])
    column = ColumnParallelEmbedding(7, 6, process_group=group)
    assert column.weight.shape == (7, 6)

    for sequence_parallel in (True, False):
        reference = GPT2Embeddings(8, 12, 5)
        parallel = ParallelGPT2Embeddings(8, 12, 5, group, sequence_parallel=sequence_parallel)
        parallel.load_state_dict(reference.state_dict())
        torch.testing.assert_close(parallel(ids), reference(ids))
        flat = parallel(ids, combine_batch_seqlen_dim=True)
        torch.testing.assert_close(flat, reference(ids).reshape(10, 8))

    with pytest.raises(ValueError, match="process_group"):
        ParallelGPT2Embeddings(8, 12, 5, None)


def test_parallel_embeddings_without_group_are_plain():
    vocab = VocabParallelEmbedding(12, 4)
    ids = torch.randint(0, 12, (3,))
    torch.testing.assert_close(vocab(ids), vocab.weight[ids])
    assert ColumnParallelEmbedding(5, 6).weight.shape == (5, 6)


def _two_rank_worker(rank, init_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        group = dist.group.WORLD
        with pytest.raises(ValueError, match="num_embeddings"):
            VocabParallelEmbedding(11, 4, process_group=group)
        with pytest.raises(RuntimeError, match="padding_idx"):
            VocabParallelEmbedding(12, 4, process_group=group, padding_idx=0)
        with pytest.raises(ValueError, match="embedding_dim"):
            ColumnParallelEmbedding(5, 7, process_group=group)

        torch.manual_seed(0)  # the same reference weights and inputs on both ranks
        reference = GPT2Embeddings(8, 12, 6)
        ids = torch.randint(0, 12, (4, 6))
        positions = torch.randint(0, 6, (4, 6))
        grad = torch.randn(4, 6, 8)
        reference.zero_grad()
        expected = reference(ids, positions)
        expected.backward(grad)
        for sequence_parallel in (True, False):
            parallel = ParallelGPT2Embeddings(8, 12, 6, group, sequence_parallel=sequence_parallel)
            assert parallel.word_embeddings.weight.shape == (6, 8)
            assert parallel.position_embeddings.weight.shape == (6, 4)
            rows, cols = slice(6 * rank, 6 * rank + 6), slice(4 * rank, 4 * rank + 4)
            with torch.no_grad():
                parallel.word_embeddings.weight.copy_(reference.word_embeddings.weight[rows])
                parallel.position_embeddings.weight.copy_(reference.position_embeddings.weight[:, cols])
            out = parallel(ids, positions)
            # Reduce-scatter leaves each rank half of the batch; all-reduce the whole of it.
            batch = slice(2 * rank, 2 * rank + 2) if sequence_parallel else slice(None)
            torch.testing.assert_close(out, expected[batch])
            out.backward(grad[batch])
            torch.testing.assert_close(parallel.word_embeddings.weight.grad,
                                       reference.word_embeddings.weight.grad[rows])
            torch.testing.assert_close(parallel.position_embeddings.weight.grad,
                                       reference.position_embeddings.weight.grad[:, cols])
        flat = ParallelGPT2Embeddings(8, 12, 6, group)(ids, combine_batch_seqlen_dim=True)
        assert flat.shape == (12, 8)
    finally:
        dist.destroy_process_group()


def test_parallel_embeddings_two_ranks(tmp_path):
    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this torch build")
    mp.spawn(_two_rank_worker, args=(str(tmp_path / "init"),), nprocs=2)
