"""BTLM checkpoints (Cerebras BTLM-3B-8K) for flash_attn.models.gpt, with the API of upstream
flash-attn 2.8.3's flash_attn.models.btlm: a Hugging Face BTLM state dict (its remote-code
BTLMLMHeadModel) remapped to GPTLMHeadModel's keys, and a BTLM config turned into the GPT2Config
that builds the equivalent GPTLMHeadModel (ALiBi, SwiGLU, the muP multipliers).

transformers (GPT2Config) is imported by btlm_config_to_gpt2_config only.
"""

import torch

from flash_attn.models._gpt2_config import config_value
from flash_attn.models._hf_config import transformers_module
from flash_attn.models._remap import move_word_embeddings_and_head, rename_keys

__all__ = ["remap_state_dict_hf_btlm", "btlm_config_to_gpt2_config"]


def remap_state_dict_hf_btlm(state_dict, config):
    """A BTLMLMHeadModel state dict as GPTLMHeadModel's: the Conv1D weights transposed to
    nn.Linear's layout, the SwiGLU's c_fc (value) and c_fc2 (gate) stacked into fc1, the word
    embeddings padded to the padded vocabulary and tied to lm_head, the ALiBi slopes dropped
    (recomputed from the head count)."""
    state_dict = rename_keys(
        state_dict,
        (r"^transformer\.wpe\.", "transformer.embeddings.position_embeddings."),
        (r"^transformer\.h\.(\d+)\.ln_(1|2)\.", r"transformer.layers.\1.norm\2."),
        (r"^transformer\.h\.(\d+)\.mlp\.c_proj\.", r"transformer.layers.\1.mlp.fc2."),
        (r"^transformer\.h\.(\d+)\.attn\.c_attn\.", r"transformer.layers.\1.mixer.Wqkv."),
        (r"^transformer\.h\.(\d+)\.attn\.c_proj\.", r"transformer.layers.\1.mixer.out_proj."),
    )
    state_dict = move_word_embeddings_and_head(state_dict, config, "transformer.wte.weight", tied=True)
    state_dict.pop("transformer.relative_pe.slopes", None)
    for l in range(config_value(config, "n_layer")):
        old, new = f"transformer.h.{l}.mlp", f"transformer.layers.{l}"
        # GatedMlp's fc1 is [value; gate]: BTLM computes c_fc(x) * silu(c_fc2(x)).
        for param in ("weight", "bias"):
            value, gate = state_dict.pop(f"{old}.c_fc.{param}"), state_dict.pop(f"{old}.c_fc2.{param}")
            state_dict[f"{new}.mlp.fc1.{param}"] = torch.cat([value.T, gate.T] if param == "weight" else [value, gate])
        # Conv1D stores (in_features, out_features).
        for key in (f"{new}.mlp.fc2.weight", f"{new}.mixer.Wqkv.weight", f"{new}.mixer.out_proj.weight"):
            state_dict[key] = state_dict[key].T
    return state_dict


def btlm_config_to_gpt2_config(btlm_config):
    """The transformers.GPT2Config that builds a GPTLMHeadModel equivalent to a BTLM model:
    ALiBi instead of position embeddings where position_embedding_type is "alibi" (which needs
    the flash-attention path, so use_flash_attn is set), SwiGLU MLP, muP width, embedding and
    output multipliers and attention scaled by 1 / head_dim where mup_scale_qk_dot_by_d."""
    alibi = btlm_config.position_embedding_type == "alibi"
    return transformers_module("btlm_config_to_gpt2_config").GPT2Config(
        vocab_size=btlm_config.vocab_size,
        n_positions=0 if alibi else config_value(btlm_config, "n_positions"),
        n_embd=config_value(btlm_config, "hidden_size"),
        n_layer=config_value(btlm_config, "num_hidden_layers"),
        n_head=config_value(btlm_config, "num_attention_heads"),
        n_inner=btlm_config.n_inner,
        activation_function=btlm_config.activation_function,
        resid_pdrop=btlm_config.resid_pdrop,
        embd_pdrop=btlm_config.embd_pdrop,
        attn_pdrop=btlm_config.attn_pdrop,
        layer_norm_epsilon=btlm_config.layer_norm_epsilon,
        initializer_range=btlm_config.initializer_range,
        bos_token_id=btlm_config.bos_token_id,
        eos_token_id=btlm_config.eos_token_id,
        use_alibi=alibi,
        use_flash_attn=alibi,
        mup_width_scale=btlm_config.mup_width_scale,
        mup_embeddings_multiplier=btlm_config.mup_embeddings_scale,
        mup_output_multiplier=btlm_config.mup_output_alpha,
        mup_scale_qk_dot_by_d=btlm_config.mup_scale_qk_dot_by_d,
        mlp_multiple_of=1,
    )
