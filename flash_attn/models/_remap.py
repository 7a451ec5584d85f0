"""Building blocks of the checkpoint remapping functions of the model files."""

import re
from collections import OrderedDict

import torch.nn.functional as F

from flash_attn.models._gpt2_config import padded_vocab_size

WORD_EMBEDDINGS_KEY = "transformer.embeddings.word_embeddings.weight"


def rename_keys(state_dict, *substitutions):
    """An OrderedDict of state_dict's items with each key passed through the (pattern,
    replacement) regex substitutions in turn."""

    def rename(key):
        for pattern, replacement in substitutions:
            key = re.sub(pattern, replacement, key)
        return key

    return OrderedDict((rename(k), v) for k, v in state_dict.items())


def pad_rows(weight, num_rows, value=0.0):
    """weight with rows of value (default zeros) appended along dim 0 up to num_rows (an
    embedding or output matrix, or an output bias, padded to a padded vocabulary)."""
    # F.pad lists the last dim first.
    return F.pad(weight, (0, 0) * (weight.ndim - 1) + (0, num_rows - weight.shape[0]), value=value)


def pad_to_padded_vocab(weight, config):
    """weight's rows padded to config.vocab_size rounded up to config.pad_vocab_size_multiple."""
    return pad_rows(weight, padded_vocab_size(config))


def pad_to_vocab_multiple(weight, config):
    """weight's own rows padded up to a multiple of config.pad_vocab_size_multiple (for
    checkpoints whose embedding and output matrices have different row counts)."""
    multiple = getattr(config, "pad_vocab_size_multiple", 1)
    return pad_rows(weight, -(-weight.shape[0] // multiple) * multiple)


def move_word_embeddings_and_head(
    state_dict,
    config,
    embedding_key,
    head_key="lm_head.weight",
    new_embedding_key=WORD_EMBEDDINGS_KEY,
    head_bias_key=None,
    pad=pad_to_padded_vocab,
    tied=None,
):
    """Moves the word embeddings from embedding_key to new_embedding_key and the output matrix
    from head_key to lm_head.weight (the embeddings themselves where tied, which None reads from
    config.tie_word_embeddings, default True as in GPTLMHeadModel), and an untied head's bias from head_bias_key to
    lm_head.bias, each padded by pad(tensor, config). Modifies state_dict in place and returns it."""
    embeddings = pad(state_dict.pop(embedding_key), config)
    state_dict[new_embedding_key] = embeddings
    if tied is None:
        tied = getattr(config, "tie_word_embeddings", True)
    if tied:
        state_dict.pop(head_key, None)
        state_dict["lm_head.weight"] = embeddings
    else:
        state_dict["lm_head.weight"] = pad(state_dict.pop(head_key), config)
        if head_bias_key is not None:
            state_dict["lm_head.bias"] = pad(state_dict.pop(head_bias_key), config)
    return state_dict
