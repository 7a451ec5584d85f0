"""flash_attn.losses.cross_entropy against eager PyTorch cross entropy (+ z-loss), gradients included.

GPU: pytest tests/test_cross_entropy.py. CPU: TRITON_INTERPRET=1 pytest tests/test_cross_entropy.py.
"""

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton", reason="flash_attn.losses.cross_entropy runs Triton kernels; triton is not installed")

# poison_empty is imported for pytest to find the fixture named in pytestmark.
from triton_testing import DEVICE, DTYPES, assert_close, gpu_only, poison_empty, requires_device  # noqa: E402, F401

from flash_attn.losses.cross_entropy import CrossEntropyLoss  # noqa: E402
from flash_attn.ops.triton.cross_entropy import cross_entropy_loss  # noqa: E402

pytestmark = [requires_device, pytest.mark.usefixtures("poison_empty")]


def loss_reference(logits, labels, ignore_index, smoothing, logit_scale, lse_square_scale, reduction):
    """(loss, z_loss) computed in the dtype of logits."""
    z = logits * logit_scale
    kept = labels != ignore_index
    per_row = F.cross_entropy(z, labels, ignore_index=ignore_index, label_smoothing=smoothing, reduction="none")
    z_loss = torch.where(kept, lse_square_scale * torch.logsumexp(z, dim=-1) ** 2, torch.zeros_like(per_row))
    per_row = per_row + z_loss
    if reduction == "mean":
        return per_row.sum() / kept.sum(), z_loss.sum() / kept.sum()
    if reduction == "sum":
        return per_row.sum(), z_loss.sum()
    return per_row, z_loss


def random_labels(n_rows, n_cols, ignore_index, n_ignored):
    labels = torch.randint(0, n_cols, (n_rows,), device=DEVICE)
    labels[torch.randperm(n_rows, device=DEVICE)[:n_ignored]] = ignore_index
    return labels


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("logit_scale,lse_square_scale", [(1.0, 0.0), (0.7, 1e-3)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("inplace_backward", [False, True])
def test_cross_entropy_loss(dtype, smoothing, logit_scale, lse_square_scale, reduction, inplace_backward):
    n_rows, n_cols, ignore_index = 13, 1000, -100
    logits = (3 * torch.randn(n_rows, n_cols, device=DEVICE)).to(dtype).requires_grad_()
    labels = random_labels(n_rows, n_cols, ignore_index, n_ignored=3)
    module = CrossEntropyLoss(ignore_index=ignore_index, reduction=reduction, label_smoothing=smoothing,
                              logit_scale=logit_scale, lse_square_scale=lse_square_scale,
                              inplace_backward=inplace_backward, return_z_loss=True)

    logits_in = logits.detach().clone().requires_grad_() if inplace_backward else logits
    loss, z_loss = module(logits_in, labels)
    assert loss.dtype == torch.float32 and loss.shape == ((n_rows,) if reduction == "none" else ())
    grad = torch.randn_like(loss)
    loss.backward(grad)
    dlogits = logits_in.grad
    if inplace_backward:
        assert torch.equal(logits_in.detach(), dlogits), "the gradient must be written over the logits"

    results = []
    for ref_dtype in (torch.float32, dtype):
        logits_r = logits.detach().to(ref_dtype).requires_grad_()
        loss_r, z_loss_r = loss_reference(logits_r, labels, ignore_index, smoothing, logit_scale,
                                          lse_square_scale, reduction)
        loss_r.backward(grad.to(ref_dtype))
        results.append((loss_r, z_loss_r, logits_r.grad))
    (loss_ref, z_ref, dlogits_ref), (loss_lowp, z_lowp, dlogits_lowp) = results
    assert_close(loss, loss_ref, loss_lowp, "loss")
    assert_close(z_loss, z_ref, z_lowp, "z_loss")
    assert dlogits.dtype == dtype
    assert_close(dlogits, dlogits_ref, dlogits_lowp, "dlogits")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_vocab_larger_than_one_block(dtype):
    # 40000 classes take three column blocks in the forward and ten in the backward.
    n_rows, n_cols = 3, 40000
    logits = (2 * torch.randn(n_rows, n_cols, device=DEVICE)).to(dtype).requires_grad_()
    labels = torch.tensor([0, n_cols - 1, 17000], device=DEVICE)
    loss = CrossEntropyLoss(label_smoothing=0.05)(logits, labels)
    loss.backward()
    results = []
    for ref_dtype in (torch.float32, dtype):
        logits_r = logits.detach().to(ref_dtype).requires_grad_()
        loss_r, _ = loss_reference(logits_r, labels, -100, 0.05, 1.0, 0.0, "mean")
        loss_r.backward()
        results.append((loss_r, logits_r.grad))
    assert_close(loss, results[0][0], results[1][0], "loss")
    assert_close(logits.grad, results[0][1], results[1][1], "dlogits")


def test_custom_ignore_index_and_all_ignored_rows():
    logits = torch.randn(4, 10, device=DEVICE, requires_grad=True)
    labels = torch.tensor([3, 3, 3, 3], device=DEVICE)
    loss = CrossEntropyLoss(ignore_index=3, reduction="none")(logits, labels)
    loss.sum().backward()
    assert torch.equal(loss, torch.zeros(4, device=DEVICE))
    assert torch.equal(logits.grad, torch.zeros_like(logits))
    # As in flash-attn, the mean over zero counted rows is 0 / 0.
    assert torch.isnan(CrossEntropyLoss(ignore_index=3)(logits, labels))


def test_non_contiguous_logits():
    base = torch.randn(6, 2 * 50, device=DEVICE)
    logits = base[:, ::2].requires_grad_()
    labels = torch.randint(0, 50, (6,), device=DEVICE)
    loss = CrossEntropyLoss()(logits, labels)
    loss.backward()
    logits_ref = logits.detach().clone().requires_grad_()
    loss_ref = F.cross_entropy(logits_ref, labels)
    loss_ref.backward()
    torch.testing.assert_close(loss, loss_ref)
    torch.testing.assert_close(logits.grad, logits_ref.grad)


def test_precomputed_lse():
    logits = torch.randn(5, 64, device=DEVICE, requires_grad=True)
    labels = torch.randint(0, 64, (5,), device=DEVICE)
    lse = torch.logsumexp(logits.detach(), dim=-1)
    losses, z_losses = cross_entropy_loss(logits, labels, precomputed_lse=lse, lse_square_scale=0.01)
    losses.sum().backward()
    logits_ref = logits.detach().clone().requires_grad_()
    losses_ref, z_ref = loss_reference(logits_ref, labels, -100, 0.0, 1.0, 0.01, "none")
    losses_ref.sum().backward()
    torch.testing.assert_close(losses, losses_ref)
    torch.testing.assert_close(z_losses, z_ref)
    torch.testing.assert_close(logits.grad, logits_ref.grad)


def test_unsupported_arguments():
    with pytest.raises(NotImplementedError, match="process_group"):
        CrossEntropyLoss(process_group=object())
    with pytest.raises(NotImplementedError, match="process_group"):
        cross_entropy_loss(torch.randn(2, 3, device=DEVICE), torch.zeros(2, dtype=torch.long, device=DEVICE),
                           process_group=object())
    with pytest.raises(NotImplementedError, match="reduction"):
        CrossEntropyLoss(reduction="batchmean")


@gpu_only
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n_rows,n_cols", [(8192, 32000), (1024, 128256)])
def test_cross_entropy_llm_vocab(dtype, n_rows, n_cols):
    logits = torch.randn(n_rows, n_cols, device=DEVICE, dtype=dtype, requires_grad=True)
    labels = random_labels(n_rows, n_cols, -100, n_ignored=n_rows // 10)
    loss, z_loss = CrossEntropyLoss(lse_square_scale=1e-4, return_z_loss=True)(logits, labels)
    loss.backward()
    results = []
    for ref_dtype in (torch.float32, dtype):
        logits_r = logits.detach().to(ref_dtype).requires_grad_()
        loss_r, z_r = loss_reference(logits_r, labels, -100, 0.0, 1.0, 1e-4, "mean")
        loss_r.backward()
        results.append((loss_r, z_r, logits_r.grad))
        del logits_r
    assert_close(loss, results[0][0], results[1][0], "loss")
    assert_close(z_loss, results[0][1], results[1][1], "z_loss")
    assert_close(logits.grad, results[0][2], results[1][2], "dlogits")
