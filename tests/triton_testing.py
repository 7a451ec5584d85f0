"""Shared pieces of the Triton-op tests (rotary, layer norm, cross entropy).

* DEVICE: "cuda" when a GPU is present, else "cpu" under Triton's interpreter
  (TRITON_INTERPRET=1), else None and the tests skip;
* poison_empty: a fixture under which torch.empty & co. return NaN-filled memory, so any element
  a kernel forgets to write shows up as NaN;
* assert_close: the tolerance rule: our error against the float32 reference may be at most twice
  the error of the same computation done by PyTorch in the input dtype, plus about one ulp of the
  reference's largest magnitude.
"""

import os

import pytest
import torch

if torch.cuda.is_available():
    DEVICE = "cuda"
elif os.environ.get("TRITON_INTERPRET") == "1":
    DEVICE = "cpu"
else:
    DEVICE = None

INTERPRETED = DEVICE == "cpu"

requires_device = pytest.mark.skipif(
    DEVICE is None,
    reason="needs a CUDA GPU (or TRITON_INTERPRET=1 to run the Triton kernels on CPU)",
)
gpu_only = pytest.mark.skipif(
    DEVICE != "cuda", reason="large shape: needs a CUDA GPU, too slow for the Triton interpreter"
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

_ULP_EPS = {torch.float32: 1e-5, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


@pytest.fixture
def poison_empty():
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    was_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    was_filling = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.utils.deterministic.fill_uninitialized_memory = was_filling
    torch.use_deterministic_algorithms(was_deterministic, warn_only=was_warn_only)


def assert_close(out, ref, torch_lowp, name="output"):
    """out: ours; ref: float32 reference; torch_lowp: PyTorch's result in the input dtype."""
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    if ref.numel() == 0:
        return
    out, ref, torch_lowp = out.detach().float(), ref.detach().float(), torch_lowp.detach()
    assert torch.isfinite(out).all(), f"{name}: non-finite values (unwritten or overflowed)"
    err = (out - ref).abs().max().item()
    torch_err = (torch_lowp.float() - ref).abs().max().item()
    # The smallest normal number keeps an all-zero reference from demanding exact zeros.
    eps = _ULP_EPS[torch_lowp.dtype] * ref.abs().max().item() + torch.finfo(torch_lowp.dtype).tiny
    assert err <= 2 * torch_err + eps, (
        f"{name}: max error {err:.3g} > 2 x {torch_err:.3g} (PyTorch in {torch_lowp.dtype}) + {eps:.3g}"
    )
