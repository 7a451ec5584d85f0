"""Baichuan checkpoints (Baichuan 1 and 2, 7B and 13B) for flash_attn.models.gpt, with the API of
upstream flash-attn 2.8.3's flash_attn.models.baichuan: a Hugging Face Baichuan state dict (its
remote-code BaichuanForCausalLM) remapped to GPTLMHeadModel's keys, and a Baichuan config turned
into the GPT2Config that builds the equivalent GPTLMHeadModel (Llama-like: RMSNorm, SwiGLU, no
biases; rotary for 7B, ALiBi for 13B; Baichuan 2's normalized output matrix).

transformers (GPT2Config) is imported by baichuan_config_to_gpt2_config only.
"""

import torch

from flash_attn.models._gpt2_config import config_value
from flash_attn.models._hf_config import transformers_module
from flash_attn.models._remap import WORD_EMBEDDINGS_KEY, move_word_embeddings_and_head, pad_to_vocab_multiple, rename_keys

__all__ = ["remap_state_dict_hf_baichuan", "baichuan_config_to_gpt2_config"]

# The Baichuan configs do not say which variant they describe; upstream tells them apart by size.
_ROTARY_MAX_HIDDEN_SIZE = 5000  # 7B (4096) uses rotary, 13B (5120) ALiBi
_NORM_HEAD_MIN_VOCAB_SIZE = 70000  # Baichuan 2 (125696 tokens) normalizes lm_head's rows, 1 (64000) not


def remap_state_dict_hf_baichuan(state_dict, config):
    """A BaichuanForCausalLM state dict as GPTLMHeadModel's: W_pack is already Wqkv, gate_proj
    and up_proj stacked into fc1 as [up; gate], the word embeddings and the output matrix each
    padded to a multiple of config.pad_vocab_size_multiple, the rotary frequencies dropped."""
    state_dict = rename_keys(
        state_dict,
        (r"^model\.", "transformer."),
        (r"^transformer\.embed_tokens\.", "transformer.embeddings.word_embeddings."),
        (r"^transformer\.norm\.", "transformer.ln_f."),
        (r"^transformer\.layers\.(\d+)\.input_layernorm\.", r"transformer.layers.\1.norm1."),
        (r"^transformer\.layers\.(\d+)\.post_attention_layernorm\.", r"transformer.layers.\1.norm2."),
        (r"^transformer\.layers\.(\d+)\.mlp\.down_proj\.", r"transformer.layers.\1.mlp.fc2."),
        (r"^transformer\.layers\.(\d+)\.self_attn\.W_pack\.", r"transformer.layers.\1.mixer.Wqkv."),
        (r"^transformer\.layers\.(\d+)\.self_attn\.o_proj\.", r"transformer.layers.\1.mixer.out_proj."),
    )
    # Baichuan's embedding and output matrices are sharded differently: each is padded on its own.
    state_dict = move_word_embeddings_and_head(state_dict, config, WORD_EMBEDDINGS_KEY, pad=pad_to_vocab_multiple)
    for l in range(config_value(config, "n_layer")):
        prefix = f"transformer.layers.{l}"
        gate = state_dict.pop(f"{prefix}.mlp.gate_proj.weight")
        up = state_dict.pop(f"{prefix}.mlp.up_proj.weight")
        # GatedMlp computes fc2(value * silu(gate)) with fc1's rows as [value; gate].
        state_dict[f"{prefix}.mlp.fc1.weight"] = torch.cat([up, gate], dim=0)
        state_dict.pop(f"{prefix}.self_attn.rotary_emb.inv_freq", None)
    return state_dict


def baichuan_config_to_gpt2_config(baichuan_config):
    """The transformers.GPT2Config that builds a GPTLMHeadModel equivalent to a Baichuan model:
    no position embeddings, RMSNorm, SwiGLU, no biases, untied output matrix (normalized for
    Baichuan 2), no dropout; rotary on every dim (not interleaved) for 7B, ALiBi (which needs the
    flash-attention path, so use_flash_attn is set) for 13B."""
    use_rotary = baichuan_config.hidden_size < _ROTARY_MAX_HIDDEN_SIZE
    return transformers_module("baichuan_config_to_gpt2_config").GPT2Config(
        vocab_size=baichuan_config.vocab_size,
        n_positions=0,
        n_embd=baichuan_config.hidden_size,
        n_layer=baichuan_config.num_hidden_layers,
        n_head=baichuan_config.num_attention_heads,
        n_inner=baichuan_config.intermediate_size,
        activation_function="swiglu",  # transformers calls it "silu"
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        layer_norm_epsilon=baichuan_config.rms_norm_eps,
        initializer_range=baichuan_config.initializer_range,
        bos_token_id=baichuan_config.bos_token_id,
        eos_token_id=baichuan_config.eos_token_id,
        pad_token_id=baichuan_config.pad_token_id,
        rms_norm=True,
        rotary_emb_fraction=1.0 if use_rotary else 0.0,
        rotary_emb_interleaved=False,
        use_alibi=not use_rotary,
        use_flash_attn=not use_rotary,
        tie_word_embeddings=False,
        norm_head=baichuan_config.vocab_size > _NORM_HEAD_MIN_VOCAB_SIZE,
        qkv_proj_bias=False,
        out_proj_bias=False,
        mlp_fc1_bias=False,
        mlp_fc2_bias=False,
    )
