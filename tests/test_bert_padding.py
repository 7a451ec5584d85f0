"""flash_attn.bert_padding on the CPU: round trips, gradients, packed samples."""

import inspect

import torch

from flash_attn.bert_padding import (
    IndexFirstAxisResidual,
    index_first_axis,
    index_first_axis_residual,
    pad_input,
    unpad_input,
    unpad_input_for_concatenated_sequences,
)


def test_unpad_pad_round_trip_and_lengths():
    x = torch.randn(3, 5, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)
    packed, indices, cu, max_len, used = unpad_input(x, mask)
    assert packed.shape == (8, 4) and cu.tolist() == [0, 3, 8, 8] and max_len == 5
    assert used.tolist() == [3, 5, 0]
    back = pad_input(packed, indices, 3, 5)
    assert torch.equal(back[mask], x[mask]) and (back[~mask] == 0).all()


def test_index_first_axis_gradient_scatters_back():
    x = torch.randn(6, 3, requires_grad=True)
    idx = torch.tensor([4, 0, 2])
    index_first_axis(x, idx).sum().backward()
    assert x.grad[:, 0].tolist() == [1, 0, 1, 0, 1, 0]


def test_index_first_axis_residual_adds_both_gradients():
    x = torch.randn(5, 2, requires_grad=True)
    idx = torch.tensor([1, 3])
    selected, residual = index_first_axis_residual(x, idx)
    assert torch.equal(selected, x[idx].detach()) and torch.equal(residual, x.detach())
    (selected.sum() * 2 + residual.sum()).backward()
    assert x.grad[:, 0].tolist() == [1, 3, 1, 3, 1]


def test_unpad_concatenated_sequences():
    x = torch.arange(2 * 6, dtype=torch.float32).view(2, 6, 1)
    lengths = torch.tensor([[2, 3, 0, 0, 0, 0], [4, 0, 0, 0, 0, 0]])
    packed, indices, cu, max_len = unpad_input_for_concatenated_sequences(x, lengths)
    assert indices.tolist() == [0, 1, 2, 3, 4, 6, 7, 8, 9]
    assert cu.tolist() == [0, 2, 5, 9] and cu.dtype == torch.int32 and max_len == 4
    assert packed.flatten().tolist() == [0, 1, 2, 3, 4, 6, 7, 8, 9]


def test_index_first_axis_residual_matches_torch_indexing():
    # Against plain autograd on (x[indices], x), with repeated indices (their gradients add up)
    # and several trailing dimensions.
    assert index_first_axis_residual == IndexFirstAxisResidual.apply
    x = torch.randn(7, 2, 3, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    idx = torch.tensor([5, 1, 5, 0])
    selected, residual = index_first_axis_residual(x, idx)
    assert selected.requires_grad and residual.requires_grad  # both carry gradient back to x
    grad_selected, grad_residual = torch.randn(4, 2, 3), torch.randn(7, 2, 3)
    torch.autograd.backward([selected, residual], [grad_selected, grad_residual])
    torch.autograd.backward([x_ref[idx], x_ref * 1], [grad_selected, grad_residual])
    assert torch.equal(selected, x_ref[idx].detach()) and torch.equal(residual, x_ref.detach())
    torch.testing.assert_close(x.grad, x_ref.grad)


def test_index_first_axis_residual_non_contiguous_input():
    base = torch.randn(3, 6, 4)
    x = base.transpose(0, 1).requires_grad_()  # (6, 3, 4), not contiguous
    idx = torch.tensor([2, 4])
    selected, residual = index_first_axis_residual(x, idx)
    assert torch.equal(selected, x.detach()[idx]) and torch.equal(residual, x.detach())
    (selected.sum() + residual.sum()).backward()
    expected = torch.ones(6, 3, 4)
    expected[idx] += 1
    assert torch.equal(x.grad, expected)


def _concatenated_reference(hidden_states, lengths):
    """Loop over rows and their packed samples: each sample's tokens follow the previous one's."""
    batch, seqlen = lengths.shape
    indices, sample_lengths = [], []
    for b in range(batch):
        start = 0
        for n in lengths[b].tolist():
            if n == 0:
                continue
            indices += range(b * seqlen + start, b * seqlen + start + n)
            sample_lengths.append(n)
            start += n
    cu_seqlens = [0]
    for n in sample_lengths:
        cu_seqlens.append(cu_seqlens[-1] + n)
    indices = torch.tensor(indices, dtype=torch.long)
    return hidden_states.flatten(0, 1)[indices], indices, cu_seqlens, max(sample_lengths)


def test_unpad_concatenated_sequences_matches_loop_reference():
    lengths = torch.tensor([
        [3, 1, 4, 0, 0, 0, 0, 0, 0, 0],  # three samples, 2 padding tokens
        [10, 0, 0, 0, 0, 0, 0, 0, 0, 0],  # one sample filling the row
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 0],  # an empty row
        [1, 1, 1, 2, 0, 0, 0, 0, 0, 0],
    ], dtype=torch.int32)
    x = torch.randn(4, 10, 2, 3, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    packed, indices, cu_seqlens, max_seqlen = unpad_input_for_concatenated_sequences(x, lengths)
    packed_ref, indices_ref, cu_ref, max_ref = _concatenated_reference(x_ref, lengths)
    assert torch.equal(indices, indices_ref)
    assert cu_seqlens.dtype == torch.int32 and cu_seqlens.tolist() == cu_ref
    assert max_seqlen == max_ref == 10 and isinstance(max_seqlen, int)
    assert torch.equal(packed, packed_ref.detach())
    grad = torch.randn_like(packed)
    packed.backward(grad)
    packed_ref.backward(grad)
    assert torch.equal(x.grad, x_ref.grad)


def test_unpad_concatenated_sequences_signature():
    assert list(inspect.signature(unpad_input_for_concatenated_sequences).parameters) == [
        "hidden_states", "attention_mask_in_length"]
