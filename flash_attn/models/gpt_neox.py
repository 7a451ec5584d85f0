"""GPT-NeoX checkpoints (GPT-NeoX-20B, Pythia, RedPajama-INCITE) for flash_attn.models.gpt, with
the API of upstream flash-attn 2.8.3's flash_attn.models.gpt_neox: a Hugging Face GPT-NeoX state
dict remapped to GPTLMHeadModel's keys, and a GPTNeoXConfig turned into the GPT2Config that
builds the equivalent GPTLMHeadModel (partial rotary, parallel attention and MLP with two norms).

transformers (GPT2Config) is imported by gpt_neox_config_to_gpt2_config only.
"""

from einops import rearrange

from flash_attn.models._gpt2_config import attention_head_dim, config_value
from flash_attn.models._hf_config import rope_parameter, transformers_module
from flash_attn.models._remap import WORD_EMBEDDINGS_KEY, move_word_embeddings_and_head, rename_keys

__all__ = ["remap_state_dict_hf_gpt_neox", "gpt_neox_config_to_gpt2_config"]


def remap_state_dict_hf_gpt_neox(state_dict, config):
    """A Hugging Face GPTNeoXForCausalLM state dict as GPTLMHeadModel's: query_key_value's rows
    from GPT-NeoX's per-head (q, k, v) order to Wqkv's (all q, all k, all v), the word embeddings
    (and the untied output matrix, embed_out or lm_head) padded to the padded vocabulary, the attention mask
    buffers and rotary frequencies dropped."""
    state_dict = rename_keys(
        state_dict,
        (r"^gpt_neox\.", "transformer."),
        (r"^transformer\.embed_in\.", "transformer.embeddings.word_embeddings."),
        (r"^transformer\.final_layer_norm\.", "transformer.ln_f."),
        (r"^transformer\.layers\.(\d+)\.input_layernorm\.", r"transformer.layers.\1.norm1."),
        (r"^transformer\.layers\.(\d+)\.post_attention_layernorm\.", r"transformer.layers.\1.norm2."),
        (r"^transformer\.layers\.(\d+)\.mlp\.dense_h_to_4h\.", r"transformer.layers.\1.mlp.fc1."),
        (r"^transformer\.layers\.(\d+)\.mlp\.dense_4h_to_h\.", r"transformer.layers.\1.mlp.fc2."),
        (r"^transformer\.layers\.(\d+)\.attention\.dense\.", r"transformer.layers.\1.mixer.out_proj."),
        (r"^transformer\.layers\.(\d+)\.attention\.query_key_value\.", r"transformer.layers.\1.mixer.Wqkv."),
    )
    # transformers 5 renamed the output matrix embed_out to lm_head.
    head_key = "embed_out.weight" if "embed_out.weight" in state_dict else "lm_head.weight"
    state_dict = move_word_embeddings_and_head(
        state_dict, config, WORD_EMBEDDINGS_KEY, head_key, tied=getattr(config, "tie_word_embeddings", False)
    )
    head_dim = attention_head_dim(config)
    for l in range(config_value(config, "n_layer")):
        prefix = f"transformer.layers.{l}"
        # Buffers of older transformers versions, recomputed here.
        for buffer in ("attention.bias", "attention.masked_bias", "attention.rotary_emb.inv_freq"):
            state_dict.pop(f"{prefix}.{buffer}", None)
        for param in ("weight", "bias"):
            key = f"{prefix}.mixer.Wqkv.{param}"
            if key in state_dict:
                state_dict[key] = rearrange(
                    state_dict[key], "(h three d) ... -> (three h d) ...", three=3, d=head_dim
                )
    state_dict.pop("gpt_neox.rotary_emb.inv_freq", None)
    state_dict.pop("transformer.rotary_emb.inv_freq", None)
    return state_dict


def gpt_neox_config_to_gpt2_config(gpt_neox_config):
    """The transformers.GPT2Config that builds a GPTLMHeadModel equivalent to a GPT-NeoX model:
    no position embeddings, rotary on rotary_pct of each head's dims (not interleaved), a
    parallel block (with use_parallel_residual) of two untied norms, no dropout."""
    return transformers_module("gpt_neox_config_to_gpt2_config").GPT2Config(
        vocab_size=gpt_neox_config.vocab_size,
        n_positions=0,
        n_embd=gpt_neox_config.hidden_size,
        n_layer=gpt_neox_config.num_hidden_layers,
        n_head=gpt_neox_config.num_attention_heads,
        n_inner=gpt_neox_config.intermediate_size,
        activation_function=gpt_neox_config.hidden_act,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        layer_norm_epsilon=gpt_neox_config.layer_norm_eps,
        initializer_range=gpt_neox_config.initializer_range,
        bos_token_id=gpt_neox_config.bos_token_id,
        eos_token_id=gpt_neox_config.eos_token_id,
        prenorm=True,
        parallel_block=gpt_neox_config.use_parallel_residual,
        parallel_block_tied_norm=False,
        rotary_emb_fraction=rope_parameter(gpt_neox_config, "partial_rotary_factor", ("rotary_pct",), 1.0),
        rotary_emb_base=rope_parameter(gpt_neox_config, "rope_theta", ("rotary_emb_base",), 10000.0),
        qkv_proj_bias=getattr(gpt_neox_config, "attention_bias", True),
        out_proj_bias=getattr(gpt_neox_config, "attention_bias", True),
        tie_word_embeddings=gpt_neox_config.tie_word_embeddings,
    )
