"""GPU tests of the decode call (flash_attn_varlen_func, one query per sequence, causal, split-KV
heuristic) under CUDA graphs, and its run-to-run determinism.

* Captured once into a torch.cuda.CUDAGraph (after a warm-up on a side stream), the call must
  replay correctly when new q / k / v are copied into the captured (static) tensors: the graph's
  output must be bitwise equal to an eager call on the same data, at every replay. This is how
  serving code runs decode steps; a host-side read of device data, a buffer allocated outside the
  graph pool or a launch parameter taken from the inputs' contents would break it.
* Changing the sequence lengths (cu_seqlens_k contents, all <= max_seqlen_k) between replays must
  also match eager calls with the same max_seqlen_k.
* Repeated eager calls on the same inputs must give bitwise identical outputs (num_splits=0 and 8):
  the split results are combined in a fixed order, no atomics.
"""

import pytest
import torch

from helpers import DEVICE, capture_graph, flash_attn, requires_gpu

pytestmark = requires_gpu

needs_cuda_graphs = pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs need the CUDA device")

D = 128
DTYPE = torch.float16
HEAD_LAYOUTS = {"mha": (12, 12), "gqa": (32, 8)}
# Equal lengths (4096: 32 key blocks), and unequal ones that are not multiples of the key block.
SEQLENS_K = {"equal": [4096, 4096, 4096], "ragged": [1000, 4097, 77]}


def _inputs(seqlens_k, nheads, nheads_k):
    batch = len(seqlens_k)
    q = torch.randn(batch, nheads, D, device=DEVICE, dtype=DTYPE)
    k = torch.randn(sum(seqlens_k), nheads_k, D, device=DEVICE, dtype=DTYPE)
    v = torch.randn(sum(seqlens_k), nheads_k, D, device=DEVICE, dtype=DTYPE)
    cu_q = torch.arange(0, batch + 1, device=DEVICE, dtype=torch.int32)
    cu_k = torch.tensor([0] + seqlens_k, device=DEVICE, dtype=torch.int32).cumsum(0).to(torch.int32)
    return q, k, v, cu_q, cu_k


def _decode(q, k, v, cu_q, cu_k, max_seqlen_k, num_splits=0):
    return flash_attn.flash_attn_varlen_func(
        q, k, v, cu_q, cu_k, 1, max_seqlen_k, causal=True, num_splits=num_splits
    )


def _assert_bitwise(out, ref, what):
    assert out.shape == ref.shape, (what, out.shape, ref.shape)
    assert not torch.isnan(out).any(), f"{what}: NaN in the output"
    if not torch.equal(out, ref):
        diff = (out.float() - ref.float()).abs().max().item()
        raise AssertionError(f"{what}: not bitwise equal, max |diff| = {diff:.3e}")


@needs_cuda_graphs
@pytest.mark.parametrize("lengths", list(SEQLENS_K))
@pytest.mark.parametrize("layout", list(HEAD_LAYOUTS))
def test_cuda_graph_decode_replay(layout, lengths, require_kernel):
    require_kernel(D, DTYPE)
    nheads, nheads_k = HEAD_LAYOUTS[layout]
    seqlens_k = SEQLENS_K[lengths]
    max_k = max(seqlens_k)
    q, k, v, cu_q, cu_k = _inputs(seqlens_k, nheads, nheads_k)

    def fn():
        return _decode(q, k, v, cu_q, cu_k, max_k)

    graph, static_out = capture_graph(fn)
    prev = None
    for step in range(5):
        q.copy_(torch.randn_like(q))
        k.copy_(torch.randn_like(k))
        v.copy_(torch.randn_like(v))
        graph.replay()
        ref = fn()
        _assert_bitwise(static_out, ref, f"replay {step}")
        if prev is not None:
            assert not torch.equal(prev, static_out), f"replay {step}: output did not change with new inputs"
        prev = static_out.clone()


@needs_cuda_graphs
@pytest.mark.parametrize("layout", list(HEAD_LAYOUTS))
def test_cuda_graph_decode_new_lengths(layout, require_kernel):
    """Sequence lengths change between replays (as decode steps grow the cache): the graph reads
    cu_seqlens_k from device memory; max_seqlen_k (a host argument) stays fixed."""
    require_kernel(D, DTYPE)
    nheads, nheads_k = HEAD_LAYOUTS[layout]
    max_k, batch = 4096, 3
    q, k, v, cu_q, cu_k = _inputs([max_k] * batch, nheads, nheads_k)

    def fn():
        return _decode(q, k, v, cu_q, cu_k, max_k)

    graph, static_out = capture_graph(fn)
    for step, lens in enumerate([[4096, 1, 2000], [129, 4096, 4095], [1000, 3000, 64]]):
        offsets = torch.tensor([0] + lens, dtype=torch.int32).cumsum(0).to(torch.int32)
        cu_k.copy_(offsets.to(DEVICE))
        q.copy_(torch.randn_like(q))
        graph.replay()
        ref = fn()
        _assert_bitwise(static_out, ref, f"lengths {lens}")


@pytest.mark.parametrize("num_splits", [0, 8])
@pytest.mark.parametrize("lengths", list(SEQLENS_K))
@pytest.mark.parametrize("layout", list(HEAD_LAYOUTS))
def test_decode_deterministic(layout, lengths, num_splits, require_kernel):
    require_kernel(D, DTYPE)
    nheads, nheads_k = HEAD_LAYOUTS[layout]
    seqlens_k = SEQLENS_K[lengths]
    q, k, v, cu_q, cu_k = _inputs(seqlens_k, nheads, nheads_k)
    first = _decode(q, k, v, cu_q, cu_k, max(seqlens_k), num_splits)
    assert not torch.isnan(first).any()
    for i in range(1, 5):
        _assert_bitwise(_decode(q, k, v, cu_q, cu_k, max(seqlens_k), num_splits), first, f"call {i + 1}")
