"""Token + position embeddings with the API of flash-attn 2.8.3's flash_attn.modules.embedding.

GPT2Embeddings and BertEmbeddings are single-device modules. VocabParallelEmbedding,
ColumnParallelEmbedding and ParallelGPT2Embeddings split their tables over a torch.distributed
process group (tensor parallelism) and sum over it with the collectives of
flash_attn.utils.distributed.
"""

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from flash_attn.utils.distributed import all_reduce, reduce_scatter


def _seqlen(input_ids):
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must have shape (batch, seqlen), got {tuple(input_ids.shape)}")
    return input_ids.shape[1]


def _default_positions(input_ids, seqlen):
    # One row of positions 0..seqlen-1; its embeddings broadcast over the batch.
    return torch.arange(seqlen, dtype=torch.long, device=input_ids.device)


def _group_size(process_group):
    return 1 if process_group is None else dist.get_world_size(process_group)


class GPT2Embeddings(nn.Module):
    """Word embeddings plus learned absolute position embeddings.

    max_position_embeddings <= 0: no position embeddings.
    word_embed_proj_dim: embed tokens into this width, then project up to embed_dim with a
        bias-free linear layer, project_in (as OPT-350m does); None embeds straight to embed_dim.
    """

    def __init__(
        self,
        embed_dim,
        vocab_size,
        max_position_embeddings,
        padding_idx=None,
        word_embed_proj_dim=None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        word_dim = embed_dim if word_embed_proj_dim is None else word_embed_proj_dim
        self.word_embeddings = nn.Embedding(vocab_size, word_dim, padding_idx=padding_idx, **factory)
        self.project_in = (
            None if word_embed_proj_dim is None else nn.Linear(word_embed_proj_dim, embed_dim, bias=False, **factory)
        )
        self.max_position_embeddings = max_position_embeddings
        if max_position_embeddings > 0:
            self.position_embeddings = nn.Embedding(max_position_embeddings, embed_dim, **factory)

    def forward(self, input_ids, position_ids=None):
        """
        input_ids: (batch, seqlen) token ids.
        position_ids: (batch, seqlen) or (seqlen,); default 0..seqlen-1 for every sequence.
        Returns (batch, seqlen, embed_dim).
        """
        seqlen = _seqlen(input_ids)
        embeddings = self.word_embeddings(input_ids)
        if self.project_in is not None:
            embeddings = self.project_in(embeddings)
        if self.max_position_embeddings > 0:
            if position_ids is None:
                position_ids = _default_positions(input_ids, seqlen)
            embeddings = embeddings + self.position_embeddings(position_ids)
        return embeddings


class BertEmbeddings(nn.Module):
    """Word embeddings plus learned position and token type (segment) embeddings.

    max_position_embeddings <= 0: no position embeddings.
    type_vocab_size <= 0: no token type embeddings.
    """

    def __init__(
        self,
        embed_dim,
        vocab_size,
        max_position_embeddings,
        type_vocab_size,
        padding_idx=None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.word_embeddings = nn.Embedding(vocab_size, embed_dim, padding_idx=padding_idx, **factory)
        self.max_position_embeddings = max_position_embeddings
        self.type_vocab_size = type_vocab_size
        if max_position_embeddings > 0:
            self.position_embeddings = nn.Embedding(max_position_embeddings, embed_dim, **factory)
        if type_vocab_size > 0:
            self.token_type_embeddings = nn.Embedding(type_vocab_size, embed_dim, **factory)

    def forward(self, input_ids, position_ids=None, token_type_ids=None):
        """
        input_ids: (batch, seqlen) token ids.
        position_ids: (batch, seqlen) or (seqlen,); default 0..seqlen-1 for every sequence.
        token_type_ids: (batch, seqlen) or (seqlen,); default type 0 everywhere.
        Returns (batch, seqlen, embed_dim).
        """
        seqlen = _seqlen(input_ids)
        embeddings = self.word_embeddings(input_ids)
        if self.max_position_embeddings > 0:
            if position_ids is None:
                position_ids = _default_positions(input_ids, seqlen)
            embeddings = embeddings + self.position_embeddings(position_ids)
        if self.type_vocab_size > 0:
            if token_type_ids is None:
                token_type_ids = torch.zeros(seqlen, dtype=torch.long, device=input_ids.device)
            embeddings = embeddings + self.token_type_embeddings(token_type_ids)
        return embeddings


class VocabParallelEmbedding(nn.Embedding):
    """nn.Embedding whose rows (the vocabulary) are split evenly over process_group: rank r holds
    ids [r * n, (r + 1) * n), n = num_embeddings / world size, and returns zeros for ids outside
    its range, so that summing over the group gives the full lookup.

    process_group=None: an ordinary nn.Embedding of num_embeddings rows. The remaining arguments
    are nn.Embedding's; padding_idx needs a group of one rank.
    """

    def __init__(self, num_embeddings, *args, process_group=None, padding_idx=None, **kwargs):
        world_size = _group_size(process_group)
        if num_embeddings % world_size != 0:
            raise ValueError(
                f"num_embeddings ({num_embeddings}) must be divisible by world_size ({world_size})"
            )
        if world_size > 1 and padding_idx is not None:
            raise RuntimeError("VocabParallelEmbedding does not support padding_idx with more than one rank")
        super().__init__(num_embeddings // world_size, *args, padding_idx=padding_idx, **kwargs)
        self.process_group = process_group

    def forward(self, input):
        if self.process_group is None:
            return super().forward(input)
        local_ids = input - dist.get_rank(self.process_group) * self.num_embeddings
        elsewhere = (local_ids < 0) | (local_ids >= self.num_embeddings)
        embeddings = super().forward(local_ids.masked_fill(elsewhere, 0))
        return embeddings.masked_fill(elsewhere.unsqueeze(-1), 0.0)


class ColumnParallelEmbedding(nn.Embedding):
    """nn.Embedding whose columns (embedding_dim) are split evenly over process_group: each rank
    holds embedding_dim / world size of them. process_group=None: an ordinary nn.Embedding."""

    def __init__(self, num_embeddings, embedding_dim, *args, process_group=None, **kwargs):
        world_size = _group_size(process_group)
        if embedding_dim % world_size != 0:
            raise ValueError(f"embedding_dim ({embedding_dim}) must be divisible by world_size ({world_size})")
        super().__init__(num_embeddings, embedding_dim // world_size, *args, **kwargs)
        self.process_group = process_group


class ParallelGPT2Embeddings(nn.Module):
    """GPT2Embeddings with the word embeddings split by vocabulary (VocabParallelEmbedding) and
    the position embeddings by columns (ColumnParallelEmbedding) over process_group.

    forward sums the ranks' partial embeddings: with sequence_parallel, a reduce-scatter leaves
    each rank 1 / world size of the first dimension (the batch, or batch * seqlen with
    combine_batch_seqlen_dim); otherwise an all-reduce gives every rank the whole result.
    max_position_embeddings <= 0: no position embeddings.
    """

    def __init__(
        self,
        embed_dim,
        vocab_size,
        max_position_embeddings,
        process_group,
        padding_idx=None,
        sequence_parallel=True,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if process_group is None:
            raise ValueError(
                "ParallelGPT2Embeddings needs a process_group; use GPT2Embeddings on a single device"
            )
        factory = {"device": device, "dtype": dtype}
        self.process_group = process_group
        self.sequence_parallel = sequence_parallel
        self.word_embeddings = VocabParallelEmbedding(
            vocab_size, embed_dim, padding_idx=padding_idx, process_group=process_group, **factory
        )
        self.max_position_embeddings = max_position_embeddings
        if max_position_embeddings > 0:
            self.position_embeddings = ColumnParallelEmbedding(
                max_position_embeddings, embed_dim, process_group=process_group, **factory
            )

    def forward(self, input_ids, position_ids=None, combine_batch_seqlen_dim=False):
        """
        input_ids: (batch, seqlen) token ids.
        position_ids: (batch, seqlen) or (seqlen,); default 0..seqlen-1 for every sequence.
        combine_batch_seqlen_dim: return (batch * seqlen, embed_dim) instead of
            (batch, seqlen, embed_dim) (before the reduce-scatter, which splits the first dim).
        """
        seqlen = _seqlen(input_ids)
        world_size = dist.get_world_size(self.process_group)
        embeddings = self.word_embeddings(input_ids)
        if self.max_position_embeddings > 0:
            if position_ids is None:
                position_ids = _default_positions(input_ids, seqlen)
            position_embeddings = self.position_embeddings(position_ids)
            if world_size > 1:
                # This rank's columns of the position embeddings, zeros elsewhere: the sum over
                # ranks assembles the full rows.
                shard = self.position_embeddings.embedding_dim
                rank = dist.get_rank(self.process_group)
                position_embeddings = F.pad(position_embeddings, (rank * shard, (world_size - rank - 1) * shard))
            embeddings = embeddings + position_embeddings
        if combine_batch_seqlen_dim:
            embeddings = embeddings.flatten(0, 1)
        if world_size == 1:
            return embeddings
        reduce = reduce_scatter if self.sequence_parallel else all_reduce
        return reduce(embeddings, self.process_group)
