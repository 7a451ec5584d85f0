"""OPT checkpoints for flash_attn.models.gpt, with the API of upstream flash-attn 2.8.3's
flash_attn.models.opt: a Hugging Face OPT state dict remapped to GPTLMHeadModel's keys, and an
OPTConfig turned into the GPT2Config that builds the equivalent GPTLMHeadModel (learned
positions offset by 2, pre- or post-norm, OPT-350m's projection in and out of a narrower
embedding width).

transformers (GPT2Config) is imported by opt_config_to_gpt2_config only.
"""

import torch

from flash_attn.models._gpt2_config import config_value
from flash_attn.models._hf_config import transformers_module
from flash_attn.models._remap import WORD_EMBEDDINGS_KEY, move_word_embeddings_and_head, rename_keys

__all__ = ["remap_state_dict_hf_opt", "opt_config_to_gpt2_config"]

# OPT's learned position table starts with two rows for its padding offset, which positions
# counted from 0 never use.
_POSITION_OFFSET = 2


def remap_state_dict_hf_opt(state_dict, config):
    """A Hugging Face OPTForCausalLM / OPTModel state dict (keys under model.decoder., or
    decoder. as in OPT-350m's checkpoint) as GPTLMHeadModel's: q / k / v projections packed into
    Wqkv, the position table without its 2 offset rows, the word embeddings padded to the
    padded vocabulary and tied to lm_head."""
    state_dict = rename_keys(
        state_dict,
        (r"^model\.decoder\.", "transformer."),
        (r"^decoder\.", "transformer."),
        (r"^transformer\.embed_tokens\.", "transformer.embeddings.word_embeddings."),
        (r"^transformer\.project_in\.", "transformer.embeddings.project_in."),
        (r"^transformer\.project_out\.", "project_out."),
        (r"^transformer\.embed_positions\.", "transformer.embeddings.position_embeddings."),
        # OPT-175B's checkpoint calls the final norm layer_norm.
        (r"^transformer\.(final_layer_norm|layer_norm)\.", "transformer.ln_f."),
        (r"^transformer\.layers\.(\d+)\.self_attn_layer_norm\.", r"transformer.layers.\1.norm1."),
        (r"^transformer\.layers\.(\d+)\.final_layer_norm\.", r"transformer.layers.\1.norm2."),
        (r"^transformer\.layers\.(\d+)\.fc(1|2)\.", r"transformer.layers.\1.mlp.fc\2."),
        (r"^transformer\.layers\.(\d+)\.self_attn\.out_proj\.", r"transformer.layers.\1.mixer.out_proj."),
    )
    positions_key = "transformer.embeddings.position_embeddings.weight"
    state_dict[positions_key] = state_dict[positions_key][_POSITION_OFFSET:]
    # OPT ties its output matrix to the word embeddings.
    state_dict = move_word_embeddings_and_head(state_dict, config, WORD_EMBEDDINGS_KEY, tied=True)
    for l in range(config_value(config, "n_layer")):
        prefix = f"transformer.layers.{l}"
        for param in ("weight", "bias"):
            parts = [f"{prefix}.self_attn.{p}_proj.{param}" for p in "qkv"]
            if parts[0] in state_dict:  # OPT without enable_bias has no biases
                state_dict[f"{prefix}.mixer.Wqkv.{param}"] = torch.cat([state_dict.pop(k) for k in parts], dim=0)
    return state_dict


def opt_config_to_gpt2_config(opt_config):
    """The transformers.GPT2Config that builds a GPTLMHeadModel equivalent to an OPT model."""
    if opt_config.layerdrop != 0.0:
        raise ValueError(f"opt_config.layerdrop must be 0.0 (no layer drop here), got {opt_config.layerdrop}")
    if not opt_config.layer_norm_elementwise_affine:
        raise ValueError("opt_config.layer_norm_elementwise_affine must be True (the norms here have weights)")
    word_embed_proj_dim = opt_config.word_embed_proj_dim
    enable_bias = getattr(opt_config, "enable_bias", True)
    return transformers_module("opt_config_to_gpt2_config").GPT2Config(
        vocab_size=opt_config.vocab_size,
        n_positions=opt_config.max_position_embeddings,
        n_embd=opt_config.hidden_size,
        n_layer=opt_config.num_hidden_layers,
        n_head=opt_config.num_attention_heads,
        n_inner=opt_config.ffn_dim,
        activation_function=opt_config.activation_function,
        resid_pdrop=opt_config.dropout,
        # Layer 0's first residual dropout drops the embeddings (as upstream: with OPT's dropout).
        embd_pdrop=opt_config.dropout,
        attn_pdrop=opt_config.attention_dropout,
        initializer_range=opt_config.init_std,
        bos_token_id=opt_config.bos_token_id,
        eos_token_id=opt_config.eos_token_id,
        prenorm=opt_config.do_layer_norm_before,
        word_embed_proj_dim=None if word_embed_proj_dim == opt_config.hidden_size else word_embed_proj_dim,
        qkv_proj_bias=enable_bias,
        out_proj_bias=enable_bias,
        mlp_fc1_bias=enable_bias,
        mlp_fc2_bias=enable_bias,
    )
