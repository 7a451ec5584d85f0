"""Conversion between padded (batch, seqlen, ...) tensors and packed (total_tokens, ...) tensors
for the varlen attention functions; same API as upstream flash_attn.bert_padding."""

import torch
import torch.nn.functional as F
from einops import rearrange, repeat


class IndexFirstAxis(torch.autograd.Function):
    """input[indices] along the first axis, with a scatter-based backward."""

    @staticmethod
    def forward(ctx, input, indices):
        assert input.ndim >= 2
        ctx.save_for_backward(indices)
        ctx.first_axis_dim = input.shape[0]
        other_shape = input.shape[1:]
        # gather on a 2-D view with integer indices (cheaper than boolean-mask indexing)
        flat = rearrange(input, "b ... -> b (...)")
        index = repeat(indices, "z -> z d", d=flat.shape[1])
        return torch.gather(flat, 0, index).reshape(-1, *other_shape)

    @staticmethod
    def backward(ctx, grad_output):
        (indices,) = ctx.saved_tensors
        other_shape = grad_output.shape[1:]
        grad_flat = rearrange(grad_output, "b ... -> b (...)")
        grad_input = grad_flat.new_zeros((ctx.first_axis_dim, grad_flat.shape[1]))
        grad_input.scatter_(0, repeat(indices, "z -> z d", d=grad_flat.shape[1]), grad_flat)
        return grad_input.reshape(ctx.first_axis_dim, *other_shape), None


index_first_axis = IndexFirstAxis.apply


class IndexPutFirstAxis(torch.autograd.Function):
    """A zero tensor of first_axis_dim rows with values written at rows `indices`."""

    @staticmethod
    def forward(ctx, values, indices, first_axis_dim):
        assert indices.ndim == 1
        assert values.ndim >= 2
        ctx.save_for_backward(indices)
        output = values.new_zeros((first_axis_dim, *values.shape[1:]))
        output[indices] = values
        return output

    @staticmethod
    def backward(ctx, grad_output):
        (indices,) = ctx.saved_tensors
        return grad_output[indices], None, None


index_put_first_axis = IndexPutFirstAxis.apply


class IndexFirstAxisResidual(torch.autograd.Function):
    """(input[indices], input detached): the selected rows plus the whole input as a residual
    whose gradient flows back too -- the gradient of the selected rows is added into the
    residual's at their positions."""

    @staticmethod
    def forward(ctx, input, indices):
        assert input.ndim >= 2
        ctx.save_for_backward(indices)
        ctx.first_axis_dim = input.shape[0]
        # Plain advanced indexing keeps the input's memory format (a reshape to 2-D would not).
        return input[indices], input.detach()

    @staticmethod
    def backward(ctx, grad_output, grad_residual):
        (indices,) = ctx.saved_tensors
        assert grad_residual.shape[1:] == grad_output.shape[1:]
        index = indices.view(-1, *([1] * (grad_output.ndim - 1))).expand_as(grad_output)
        grad_input = grad_residual.scatter_add(0, index, grad_output)
        return grad_input, None


index_first_axis_residual = IndexFirstAxisResidual.apply


def unpad_input(hidden_states, attention_mask, unused_mask=None):
    """
    Arguments:
        hidden_states: (batch, seqlen, ...)
        attention_mask: (batch, seqlen), bool / int, 1 means valid and 0 means not valid.
        unused_mask: (batch, seqlen), bool / int, 1 means the element is allocated but unused.
    Return:
        hidden_states: (total_nnz, ...), the tokens selected by attention_mask + unused_mask.
        indices: (total_nnz,), their indices in the flattened (batch * seqlen) input.
        cu_seqlens: (batch + 1,) int32, cumulative sequence lengths (of attention_mask + unused_mask).
        max_seqlen_in_batch: int.
        seqused: (batch,) int32, the number of tokens selected by attention_mask alone.
    """
    all_masks = attention_mask if unused_mask is None else attention_mask + unused_mask
    seqlens_in_batch = all_masks.sum(dim=-1, dtype=torch.int32)
    seqused = attention_mask.sum(dim=-1, dtype=torch.int32)
    indices = torch.nonzero(all_masks.flatten(), as_tuple=False).flatten()
    max_seqlen_in_batch = int(seqlens_in_batch.max().item())
    cu_seqlens = F.pad(torch.cumsum(seqlens_in_batch, dim=0, dtype=torch.int32), (1, 0))
    return (
        index_first_axis(rearrange(hidden_states, "b s ... -> (b s) ..."), indices),
        indices,
        cu_seqlens,
        max_seqlen_in_batch,
        seqused,
    )


def pad_input(hidden_states, indices, batch, seqlen):
    """
    Arguments:
        hidden_states: (total_nnz, ...), the selected tokens.
        indices: (total_nnz,), their indices in the flattened (batch * seqlen) padded tensor.
        batch: int, batch size of the padded tensor.
        seqlen: int, sequence length of the padded tensor.
    Return:
        hidden_states: (batch, seqlen, ...), zeros where no token was selected.
    """
    output = index_put_first_axis(hidden_states, indices, batch * seqlen)
    return rearrange(output, "(b s) ... -> b s ...", b=batch)


def unpad_input_for_concatenated_sequences(hidden_states, attention_mask_in_length):
    """Unpads rows that each hold several short samples packed one after another (supervised
    fine-tuning with packed samples), so that attention stays within each sample.

    Arguments:
        hidden_states: (batch, seqlen, ...)
        attention_mask_in_length: (batch, seqlen) int; row b lists the lengths of the samples
            packed into row b, in order, followed by zeros, e.g. [2, 3, 0, 0, 0] for a row holding
            a sample of 2 tokens then one of 3 (its last token is padding).
    Return:
        hidden_states: (total_nnz, ...), the tokens of every sample.
        indices: (total_nnz,), their indices in the flattened (batch * seqlen) input.
        cu_seqlens: (num_samples + 1,) int32, cumulative sample lengths over the whole batch.
        max_seqlen_in_batch: int, the longest sample.
    """
    lengths = attention_mask_in_length
    batch, seqlen = lengths.shape
    used = lengths.sum(dim=-1)
    positions = torch.arange(seqlen, device=lengths.device, dtype=used.dtype).expand(batch, seqlen)
    token_mask = positions < used.unsqueeze(1)
    flat_lengths = lengths.flatten()
    sample_lengths = flat_lengths[flat_lengths != 0]
    indices = torch.nonzero(token_mask.flatten(), as_tuple=False).flatten()
    max_seqlen_in_batch = int(sample_lengths.max().item()) if sample_lengths.numel() else 0
    cu_seqlens = F.pad(torch.cumsum(sample_lengths, dim=0, dtype=torch.int32), (1, 0))
    return (
        index_first_axis(rearrange(hidden_states, "b s ... -> (b s) ..."), indices),
        indices,
        cu_seqlens,
        max_seqlen_in_batch,
    )
