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
