"""GPU tests of split-KV decoding across chained calls: many calls of changing shapes in a row
(partials buffers reused by the caching allocator, split counts and grids changing every call), calls
on two streams at once, and a captured graph replayed between eager calls of another shape. Every
result is compared with the fp32 reference and with the unsplit kernel. (These were written for an
in-kernel split merge with per-stream counters, since dropped for the combine kernel; they still
guard the buffer and stream handling of the split path.)
"""

import random

import pytest
import torch

from helpers import DEVICE, assert_out_close, capture_graph, flash_attn, max_abs_diff, requires_gpu
from reference import attention_ref

pytestmark = requires_gpu

DTYPE = torch.float16
D = 128
# (batch, nheads, nheads_k, seqlen_k, num_splits): MHA, GQA and MQA, splits from 2 to 64, and one
# large grid (64 x 80 = 5120 query tiles).
SHAPES = [
    (1, 12, 12, 2048, 0),
    (3, 32, 8, 1000, 3),
    (2, 8, 1, 4097, 17),
    (64, 80, 80, 300, 3),
    (5, 16, 16, 77, 2),
    (1, 4, 4, 8192, 64),
]


def _decode_inputs(batch, nheads, nheads_k, seqlen_k, seed):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    q = torch.randn(batch, 1, nheads, D, device=DEVICE, dtype=DTYPE, generator=g)
    k = torch.randn(batch, seqlen_k, nheads_k, D, device=DEVICE, dtype=DTYPE, generator=g)
    v = torch.randn(batch, seqlen_k, nheads_k, D, device=DEVICE, dtype=DTYPE, generator=g)
    return q, k, v


def _check(out, q, k, v, num_splits):
    out_ref, _ = attention_ref(q, k, v)
    out_pt, _ = attention_ref(q, k, v, upcast=False)
    assert_out_close(out, out_ref, out_pt, name=f"out (num_splits={num_splits})")
    out_unsplit = flash_attn.flash_attn_func(q, k, v, num_splits=1)
    err_pt = max_abs_diff(out_pt, out_ref)
    assert max_abs_diff(out, out_unsplit) <= 2 * err_pt + 1e-5


def test_chained_calls_of_changing_shapes(require_kernel):
    """40 calls in a random order of shapes (tile counts and split counts change every call)."""
    require_kernel(D, DTYPE)
    rng = random.Random(0)
    inputs = [_decode_inputs(b, h, hk, sk, seed=i) for i, (b, h, hk, sk, _) in enumerate(SHAPES)]
    for step in range(40):
        i = rng.randrange(len(SHAPES))
        q, k, v = inputs[i]
        num_splits = SHAPES[i][4]
        out = flash_attn.flash_attn_func(q, k, v, causal=True, num_splits=num_splits)
        _check(out, q, k, v, num_splits)


def test_two_streams_concurrently(require_kernel):
    """Calls queued on two streams with no synchronisation between them: both results are right."""
    require_kernel(D, DTYPE)
    s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()
    a = _decode_inputs(4, 32, 8, 3000, seed=11)
    b = _decode_inputs(4, 32, 8, 3000, seed=12)
    torch.cuda.synchronize()
    outs_a, outs_b = [], []
    for _ in range(10):
        with torch.cuda.stream(s1):
            outs_a.append(flash_attn.flash_attn_func(*a, num_splits=7))
        with torch.cuda.stream(s2):
            outs_b.append(flash_attn.flash_attn_func(*b, num_splits=7))
    torch.cuda.synchronize()
    for out in outs_a:
        _check(out, *a, 7)
    for out in outs_b:
        _check(out, *b, 7)


@pytest.mark.parametrize("num_splits", [0, 4])
def test_graph_replay_between_eager_calls(num_splits, require_kernel):
    """A captured call replayed between eager calls of another shape on the same stream: both stay
    right and the graph equals eager bitwise."""
    require_kernel(D, DTYPE)
    q, k, v = _decode_inputs(2, 32, 8, 4097, seed=21)
    q2, k2, v2 = _decode_inputs(3, 12, 12, 1500, seed=22)
    fn = lambda: flash_attn.flash_attn_func(q, k, v, num_splits=num_splits)  # noqa: E731
    graph, static_out = capture_graph(fn)
    for _ in range(5):
        graph.replay()
        eager2 = flash_attn.flash_attn_func(q2, k2, v2, num_splits=num_splits)
        torch.cuda.synchronize()
        assert torch.equal(static_out, fn())
        _check(eager2, q2, k2, v2, num_splits)
