"""Falcon checkpoints for flash_attn.models.gpt, with the API of upstream flash-attn 2.8.3's
flash_attn.models.falcon: a Hugging Face Falcon state dict remapped to GPTLMHeadModel's keys, and
a FalconConfig turned into the GPT2Config that builds the equivalent GPTLMHeadModel (rotary,
multi-query or grouped-query attention, parallel attention and MLP).

transformers (GPT2Config) is imported by falcon_config_to_gpt2_config only.
"""

import torch
from einops import rearrange

from flash_attn.models._gpt2_config import attention_head_dim, config_value, num_heads_kv
from flash_attn.models._hf_config import rope_parameter, transformers_module
from flash_attn.models._remap import WORD_EMBEDDINGS_KEY, move_word_embeddings_and_head, rename_keys

__all__ = ["remap_state_dict_hf_falcon", "falcon_config_to_gpt2_config"]


def remap_state_dict_hf_falcon(state_dict, config):
    """A Hugging Face FalconForCausalLM state dict as GPTLMHeadModel's: query_key_value's rows
    from Falcon's groups (a kv group's query heads, its key head, its value head) to Wqkv's (all
    q, all k, all v), the word embeddings (and an untied output layer) padded to the padded
    vocabulary. Falcon-40B's two norms per layer (ln_attn, ln_mlp) become norm1 and norm2."""
    state_dict = rename_keys(
        state_dict,
        (r"^transformer\.h\.", "transformer.layers."),
        (r"^transformer\.word_embeddings\.", "transformer.embeddings.word_embeddings."),
        (r"^transformer\.layers\.(\d+)\.(input_layernorm|ln_attn)\.", r"transformer.layers.\1.norm1."),
        (r"^transformer\.layers\.(\d+)\.(post_attention_layernorm|ln_mlp)\.", r"transformer.layers.\1.norm2."),
        (r"^transformer\.layers\.(\d+)\.mlp\.dense_h_to_4h\.", r"transformer.layers.\1.mlp.fc1."),
        (r"^transformer\.layers\.(\d+)\.mlp\.dense_4h_to_h\.", r"transformer.layers.\1.mlp.fc2."),
        (r"^transformer\.layers\.(\d+)\.self_attention\.query_key_value\.", r"transformer.layers.\1.mixer.Wqkv."),
        (r"^transformer\.layers\.(\d+)\.self_attention\.dense\.", r"transformer.layers.\1.mixer.out_proj."),
    )
    state_dict = move_word_embeddings_and_head(state_dict, config, WORD_EMBEDDINGS_KEY, head_bias_key="lm_head.bias")
    queries_per_group = config_value(config, "n_head") // num_heads_kv(config)
    head_dim = attention_head_dim(config)
    for l in range(config_value(config, "n_layer")):
        for param in ("weight", "bias"):
            key = f"transformer.layers.{l}.mixer.Wqkv.{param}"
            if key not in state_dict:  # Falcon without bias
                continue
            groups = rearrange(state_dict[key], "(g r d) ... -> g r d ...", r=queries_per_group + 2, d=head_dim)
            q, k, v = groups[:, :-2], groups[:, -2:-1], groups[:, -1:]
            state_dict[key] = torch.cat(
                [rearrange(x, "g r d ... -> (g r d) ...") for x in (q, k, v)], dim=0
            )
    return state_dict


def _falcon_kv_heads(falcon_config):
    """Falcon-40B's original config names it n_head_kv; transformers' num_kv_heads counts only
    with the new decoder architecture, and otherwise multi_query means one kv head."""
    if hasattr(falcon_config, "n_head_kv"):
        return falcon_config.n_head_kv
    if getattr(falcon_config, "new_decoder_architecture", False):
        return falcon_config.num_kv_heads
    return 1 if getattr(falcon_config, "multi_query", False) else config_value(falcon_config, "n_head")


def _falcon_norms_per_layer(falcon_config, n_head_kv):
    """2 where a parallel layer has ln_attn and ln_mlp (the new decoder architecture; Falcon-40B,
    whose original config does not say so and is recognized by its several kv heads), else 1."""
    if getattr(falcon_config, "new_decoder_architecture", False):
        return getattr(falcon_config, "num_ln_in_parallel_attn", None) or 2
    return 1 if n_head_kv == 1 else 2


def falcon_config_to_gpt2_config(falcon_config):
    """The transformers.GPT2Config that builds a GPTLMHeadModel equivalent to a Falcon model:
    no position embeddings, rotary on every dim (not interleaved), multi-query or grouped-query
    attention, a parallel block (with parallel_attn) with one or two norms, tied output matrix."""
    if getattr(falcon_config, "alibi", False):
        raise ValueError("falcon_config.alibi is not supported (Falcon with ALiBi); only rotary Falcon models are")
    n_head_kv = _falcon_kv_heads(falcon_config)
    parallel_block = falcon_config.parallel_attn or getattr(falcon_config, "new_decoder_architecture", False)
    hidden_size = falcon_config.hidden_size
    bias = falcon_config.bias
    return transformers_module("falcon_config_to_gpt2_config").GPT2Config(
        vocab_size=falcon_config.vocab_size,
        n_positions=0,
        n_embd=hidden_size,
        n_layer=config_value(falcon_config, "n_layer"),
        n_head=config_value(falcon_config, "n_head"),
        n_inner=getattr(falcon_config, "ffn_hidden_size", None) or 4 * hidden_size,
        activation_function=getattr(falcon_config, "activation", "gelu"),
        resid_pdrop=falcon_config.hidden_dropout,
        embd_pdrop=0.0,  # Falcon drops no embeddings
        attn_pdrop=falcon_config.attention_dropout,
        layer_norm_epsilon=falcon_config.layer_norm_epsilon,
        initializer_range=falcon_config.initializer_range,
        bos_token_id=falcon_config.bos_token_id,
        eos_token_id=falcon_config.eos_token_id,
        parallel_block=parallel_block,
        n_head_kv=n_head_kv,
        parallel_block_tied_norm=_falcon_norms_per_layer(falcon_config, n_head_kv) == 1,
        rotary_emb_fraction=1.0,
        rotary_emb_interleaved=False,
        rotary_emb_base=rope_parameter(falcon_config, "rope_theta", ("rope_theta",), 10000.0),
        tie_word_embeddings=True,
        qkv_proj_bias=bias,
        out_proj_bias=bias,
        mlp_fc1_bias=bias,
        mlp_fc2_bias=bias,
        lm_head_bias=False,
    )
