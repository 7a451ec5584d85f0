"""GPU tests of torch.compile(fullgraph=True) through the custom ops (a graph break raises):

  * a training step through flash_attn_func, flash_attn_varlen_func and the packed variants:
    forward and loss compiled, loss.backward() runs the backward graph AOTAutograd compiled with
    it; loss and gradients match eager (deterministic backward, so the kernels see the same
    inputs and do the same work);
  * a decode loop with flash_attn_with_kvcache appending k / v into the cache: outputs and the
    cache contents match eager.
"""

import pytest
import torch

from helpers import DEVICE, flash_attn, flash_attn_gpu, requires_gpu

pytestmark = [
    *requires_gpu,
    pytest.mark.skipif(not hasattr(torch.library, "custom_op"),
                       reason="torch < 2.4: no torch.library.custom_op to compile through"),
]

needs_bwd = pytest.mark.skipif(
    flash_attn_gpu is not None and not hasattr(flash_attn_gpu, "bwd"),
    reason="this flash_attn_2_cuda build has no backward kernel (bwd)")

DTYPES = [torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp16", "bf16"]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def randn(*shape, dtype, requires_grad=False):
    return torch.randn(*shape, device=DEVICE, dtype=dtype).requires_grad_(requires_grad)


def loss_of(attention):
    return lambda *inputs: (attention(*inputs).float() ** 2).sum()


def training_step(loss_fn, inputs):
    """(loss, gradients) of one step; the inputs are fresh leaves each call."""
    leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
    loss = loss_fn(*leaves)
    loss.backward()
    return loss.detach(), [x.grad for x in leaves]


def assert_same_step(loss_fn, inputs):
    compiled = torch.compile(loss_fn, fullgraph=True)
    loss_c, grads_c = training_step(compiled, inputs)
    loss_e, grads_e = training_step(loss_fn, inputs)
    # The compiled float32 sum reduces in another order: the loss agrees to float32 rounding.
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-4, atol=0)
    for gc, ge in zip(grads_c, grads_e):
        assert gc.shape == ge.shape and not torch.isnan(gc).any()
        torch.testing.assert_close(gc, ge)


def cu_seqlens(lengths):
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths).cumsum(0)
    return cu.to(DEVICE)


@needs_bwd
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("d", [64, 59])
def test_training_step_flash_attn_func(d, dtype, require_kernel):
    require_kernel(d, dtype)
    inputs = (randn(2, 129, 8, d, dtype=dtype), randn(2, 257, 2, d, dtype=dtype),
              randn(2, 257, 2, d, dtype=dtype))
    assert_same_step(loss_of(lambda q, k, v: flash_attn.flash_attn_func(
        q, k, v, causal=True, deterministic=True)), inputs)


@needs_bwd
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_training_step_flash_attn_varlen_func(dtype, require_kernel):
    require_kernel(64, dtype)
    lens_q, lens_k = [129, 1, 64, 17], [257, 1, 64, 100]
    cu_q, cu_k = cu_seqlens(lens_q), cu_seqlens(lens_k)
    inputs = (randn(sum(lens_q), 8, 64, dtype=dtype), randn(sum(lens_k), 2, 64, dtype=dtype),
              randn(sum(lens_k), 2, 64, dtype=dtype))
    assert_same_step(loss_of(lambda q, k, v: flash_attn.flash_attn_varlen_func(
        q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), causal=True, window_size=(64, 0),
        deterministic=True)), inputs)


@needs_bwd
def test_training_step_packed(require_kernel):
    require_kernel(64, torch.bfloat16)
    lens = [129, 1, 64]
    cu = cu_seqlens(lens)

    def attention(qkv, q, kv):
        a = flash_attn.flash_attn_varlen_qkvpacked_func(qkv, cu, max(lens), deterministic=True)
        b = flash_attn.flash_attn_varlen_kvpacked_func(q, kv, cu, cu, max(lens), max(lens),
                                                       causal=True, deterministic=True)
        return a + b

    total = sum(lens)
    bf16 = torch.bfloat16
    inputs = (randn(total, 3, 4, 64, dtype=bf16), randn(total, 4, 64, dtype=bf16),
              randn(total, 2, 4, 64, dtype=bf16))
    assert_same_step(loss_of(attention), inputs)


def decode_step(q, k_cache, v_cache, k, v, cache_seqlens):
    out, lse = flash_attn.flash_attn_with_kvcache(
        q, k_cache, v_cache, k, v, cache_seqlens=cache_seqlens, causal=True,
        return_softmax_lse=True)
    return out * 2, lse


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_decode_loop_appends_to_cache(dtype, require_kernel):
    require_kernel(128, dtype)
    batch, nheads, nheads_k, d, capacity = 3, 16, 4, 128, 512
    k_cache = randn(batch, capacity, nheads_k, d, dtype=dtype)
    v_cache = randn(batch, capacity, nheads_k, d, dtype=dtype)
    caches = {"eager": (k_cache.clone(), v_cache.clone()),
              "compiled": (k_cache.clone(), v_cache.clone())}
    steps = {"eager": decode_step, "compiled": torch.compile(decode_step, fullgraph=True)}
    seqlens = torch.tensor([100, 1, 300], dtype=torch.int32, device=DEVICE)
    for _ in range(4):
        q = randn(batch, 1, nheads, d, dtype=dtype)
        k, v = randn(batch, 1, nheads_k, d, dtype=dtype), randn(batch, 1, nheads_k, d, dtype=dtype)
        results = {name: steps[name](q, *caches[name], k, v, seqlens) for name in steps}
        torch.testing.assert_close(results["compiled"][0], results["eager"][0])
        torch.testing.assert_close(results["compiled"][1], results["eager"][1])
        assert torch.equal(caches["compiled"][0], caches["eager"][0])
        assert torch.equal(caches["compiled"][1], caches["eager"][1])
        seqlens = seqlens + 1
    rows = torch.arange(batch, device=DEVICE)
    assert torch.equal(caches["compiled"][0][rows, seqlens - 1], k[:, 0])  # the last append
