"""GPT-BigCode checkpoints (SantaCoder, StarCoder, WizardCoder) for flash_attn.models.gpt, with
the API of upstream flash-attn 2.8.3's flash_attn.models.bigcode: a Hugging Face GPTBigCode state
dict remapped to GPTLMHeadModel's keys and back, and a GPTBigCodeConfig turned into the
GPT2Config that builds the equivalent GPTLMHeadModel.

As upstream, the GPT model is built with as many kv heads as query heads: the remapping repeats
a multi-query checkpoint's single key and value head for every query head, and the inverse keeps
the first copy.

transformers (GPT2Config) is imported by bigcode_config_to_gpt2_config only.
"""

import torch

from flash_attn.models._gpt2_config import attention_head_dim, config_value
from flash_attn.models._hf_config import transformers_module
from flash_attn.models._remap import WORD_EMBEDDINGS_KEY, move_word_embeddings_and_head, rename_keys

__all__ = ["remap_state_dict_hf_bigcode", "inv_remap_state_dict_hf_bigcode", "bigcode_config_to_gpt2_config"]

# Renames of HF GPTBigCode's keys to GPTLMHeadModel's, and back.
_RENAMES = (
    (r"^transformer\.wpe\.", "transformer.embeddings.position_embeddings."),
    (r"^transformer\.h\.(\d+)\.ln_(1|2)\.", r"transformer.layers.\1.norm\2."),
    (r"^transformer\.h\.(\d+)\.mlp\.c_fc\.", r"transformer.layers.\1.mlp.fc1."),
    (r"^transformer\.h\.(\d+)\.mlp\.c_proj\.", r"transformer.layers.\1.mlp.fc2."),
    (r"^transformer\.h\.(\d+)\.attn\.c_proj\.", r"transformer.layers.\1.mixer.out_proj."),
)
_INVERSE_RENAMES = (
    (r"^transformer\.embeddings\.position_embeddings\.", "transformer.wpe."),
    (r"^transformer\.layers\.(\d+)\.norm(1|2)\.", r"transformer.h.\1.ln_\2."),
    (r"^transformer\.layers\.(\d+)\.mlp\.fc1\.", r"transformer.h.\1.mlp.c_fc."),
    (r"^transformer\.layers\.(\d+)\.mlp\.fc2\.", r"transformer.h.\1.mlp.c_proj."),
    (r"^transformer\.layers\.(\d+)\.mixer\.out_proj\.", r"transformer.h.\1.attn.c_proj."),
)


def _multi_query_only(config):
    if not getattr(config, "multi_query", True):
        raise ValueError("config.multi_query must be True: only multi-query GPTBigCode checkpoints are supported")


def remap_state_dict_hf_bigcode(state_dict, config):
    """A Hugging Face GPTBigCodeForCausalLM state dict (multi-query attention) as
    GPTLMHeadModel's: c_attn's (q, one k head, one v head) rows as Wqkv with the k and v head
    repeated for every query head, the word embeddings padded to the padded vocabulary and tied
    to lm_head."""
    _multi_query_only(config)
    state_dict = rename_keys(state_dict, *_RENAMES)
    state_dict = move_word_embeddings_and_head(state_dict, config, "transformer.wte.weight", tied=True)
    n_head, head_dim = config_value(config, "n_head"), attention_head_dim(config)
    for l in range(config_value(config, "n_layer")):
        for param in ("weight", "bias"):
            c_attn = state_dict.pop(f"transformer.h.{l}.attn.c_attn.{param}")
            q, k, v = torch.split(c_attn, [n_head * head_dim, head_dim, head_dim], dim=0)
            repeats = (n_head,) + (1,) * (c_attn.ndim - 1)
            state_dict[f"transformer.layers.{l}.mixer.Wqkv.{param}"] = torch.cat(
                [q, k.repeat(repeats), v.repeat(repeats)], dim=0
            )
    return state_dict


def inv_remap_state_dict_hf_bigcode(state_dict, config):
    """GPTLMHeadModel's state dict back in Hugging Face GPTBigCodeForCausalLM's keys and layout:
    the inverse of remap_state_dict_hf_bigcode (the first copy of the key and value head; the
    word embeddings cut back to config.vocab_size rows)."""
    _multi_query_only(config)
    state_dict = rename_keys(state_dict, *_INVERSE_RENAMES)
    word_embeddings = state_dict.pop(WORD_EMBEDDINGS_KEY)[: config.vocab_size]
    state_dict["transformer.wte.weight"] = word_embeddings
    state_dict["lm_head.weight"] = word_embeddings
    n_head, head_dim = config_value(config, "n_head"), attention_head_dim(config)
    for l in range(config_value(config, "n_layer")):
        for param in ("weight", "bias"):
            wqkv = state_dict.pop(f"transformer.layers.{l}.mixer.Wqkv.{param}")
            q, k, v = torch.split(wqkv, n_head * head_dim, dim=0)
            state_dict[f"transformer.h.{l}.attn.c_attn.{param}"] = torch.cat([q, k[:head_dim], v[:head_dim]], dim=0)
    return state_dict


def bigcode_config_to_gpt2_config(bigcode_config):
    """The transformers.GPT2Config that builds a GPTLMHeadModel equivalent to a GPTBigCode model
    (its fields carried over as they are; GPTBigCode is GPT-2 with multi-query attention)."""
    fields = (
        "activation_function", "attn_pdrop", "bos_token_id", "embd_pdrop", "eos_token_id",
        "initializer_range", "layer_norm_epsilon", "max_batch_size", "max_sequence_length", "model_type",
        "multi_query", "n_embd", "n_head", "n_inner", "n_layer", "n_positions", "resid_pdrop",
        "scale_attn_weights", "summary_activation", "summary_first_dropout", "summary_proj_to_labels",
        "summary_type", "summary_use_proj", "use_cache", "vocab_size",
    )
    # Fields later transformers versions dropped (max_batch_size, summary_*, ...) stay unset.
    present = {name: getattr(bigcode_config, name) for name in fields if hasattr(bigcode_config, name)}
    return transformers_module("bigcode_config_to_gpt2_config").GPT2Config(**present)
