"""GPT-J checkpoints (GPT-J-6B, GPT-JT) for flash_attn.models.gpt, with the API of upstream
flash-attn 2.8.3's flash_attn.models.gptj: a Hugging Face GPT-J state dict remapped to
GPTLMHeadModel's keys, and a GPTJConfig turned into the GPT2Config that builds the equivalent
GPTLMHeadModel (interleaved partial rotary, parallel attention and MLP sharing one norm, an
output layer with a bias).

transformers (GPT2Config) is imported by gptj_config_to_gpt2_config only.
"""

import torch

from flash_attn.models._gpt2_config import config_value
from flash_attn.models._hf_config import transformers_module
from flash_attn.models._remap import WORD_EMBEDDINGS_KEY, move_word_embeddings_and_head, rename_keys

__all__ = ["remap_state_dict_hf_gptj", "gptj_config_to_gpt2_config"]


def remap_state_dict_hf_gptj(state_dict, config):
    """A Hugging Face GPTJForCausalLM state dict as GPTLMHeadModel's: q / k / v projections
    packed into Wqkv, the word embeddings and the output layer (weight and bias) padded to the
    padded vocabulary, the attention mask buffers dropped."""
    state_dict = rename_keys(
        state_dict,
        (r"^transformer\.h\.", "transformer.layers."),
        (r"^transformer\.wte\.", "transformer.embeddings.word_embeddings."),
        (r"^transformer\.layers\.(\d+)\.ln_1\.", r"transformer.layers.\1.norm1."),
        (r"^transformer\.layers\.(\d+)\.mlp\.fc_in\.", r"transformer.layers.\1.mlp.fc1."),
        (r"^transformer\.layers\.(\d+)\.mlp\.fc_out\.", r"transformer.layers.\1.mlp.fc2."),
        (r"^transformer\.layers\.(\d+)\.attn\.out_proj\.", r"transformer.layers.\1.mixer.out_proj."),
    )
    state_dict = move_word_embeddings_and_head(state_dict, config, WORD_EMBEDDINGS_KEY, head_bias_key="lm_head.bias")
    for l in range(config_value(config, "n_layer")):
        prefix = f"transformer.layers.{l}"
        parts = [state_dict.pop(f"{prefix}.attn.{p}_proj.weight") for p in "qkv"]
        state_dict[f"{prefix}.mixer.Wqkv.weight"] = torch.cat(parts, dim=0)
        # Buffers of older transformers versions, recomputed here.
        for buffer in ("attn.bias", "attn.masked_bias", "attn.embed_positions"):
            state_dict.pop(f"{prefix}.{buffer}", None)
    return state_dict


def gptj_config_to_gpt2_config(gptj_config):
    """The transformers.GPT2Config that builds a GPTLMHeadModel equivalent to a GPT-J model: no
    position embeddings, interleaved rotary on rotary_dim dims of each head, a parallel block
    with one norm, no attention biases, an untied output layer with a bias."""
    head_dim = gptj_config.n_embd // gptj_config.n_head
    return transformers_module("gptj_config_to_gpt2_config").GPT2Config(
        vocab_size=gptj_config.vocab_size,
        n_positions=0,
        n_embd=gptj_config.n_embd,
        n_layer=gptj_config.n_layer,
        n_head=gptj_config.n_head,
        n_inner=gptj_config.n_inner,
        activation_function=gptj_config.activation_function,
        resid_pdrop=gptj_config.resid_pdrop,
        embd_pdrop=gptj_config.embd_pdrop,
        attn_pdrop=gptj_config.attn_pdrop,
        layer_norm_epsilon=gptj_config.layer_norm_epsilon,
        initializer_range=gptj_config.initializer_range,
        bos_token_id=gptj_config.bos_token_id,
        eos_token_id=gptj_config.eos_token_id,
        prenorm=True,
        parallel_block=True,
        parallel_block_tied_norm=True,
        # rotary_dim None rotates every dim.
        rotary_emb_fraction=(gptj_config.rotary_dim or head_dim) / head_dim,
        rotary_emb_interleaved=True,
        tie_word_embeddings=False,
        qkv_proj_bias=False,
        out_proj_bias=False,
        lm_head_bias=True,
    )
