"""flash_attn.bert_padding on the CPU: round trips, gradients, packed samples."""

import torch

from flash_attn.bert_padding import (
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
