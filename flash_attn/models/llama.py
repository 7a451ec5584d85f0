"""Llama checkpoints for flash_attn.models.gpt, with the API of upstream flash-attn 2.8.3's
flash_attn.models.llama: Meta and Hugging Face state dicts remapped to GPTLMHeadModel's keys and
back, configs read from a checkpoint folder, and a LlamaConfig turned into the GPT2Config that
builds the equivalent GPTLMHeadModel (RMSNorm, rotary on every dim, SwiGLU, no biases).

transformers (LlamaConfig, GPT2Config) and sentencepiece (a Meta checkpoint's tokenizer) are
imported by the functions that need them, so the remapping functions work without either.
"""

import json
import os
from pathlib import Path
from typing import Dict, List, Union

import torch
from einops import rearrange

from flash_attn.models._gpt2_config import config_value, num_heads_kv
from flash_attn.models._hf_config import rope_parameter, transformers_module
from flash_attn.models._remap import WORD_EMBEDDINGS_KEY, move_word_embeddings_and_head, pad_to_vocab_multiple, rename_keys

__all__ = [
    "remap_state_dict_meta_llama",
    "remap_state_dict_hf_llama",
    "inv_remap_state_dict_hf_llama",
    "config_from_meta_checkpoint",
    "config_from_hf_checkpoint",
    "config_from_checkpoint",
    "state_dicts_from_checkpoint",
    "llama_config_to_gpt2_config",
]


def _transformers():
    return transformers_module("this function of flash_attn.models.llama")


def _rotary_pairs_interleaved(w, config):
    """Rows of q_proj / k_proj from Hugging Face's rotary layout (each head's first half then
    second half of its dims) to the interleaved one of the Meta checkpoints and of GPTLMHeadModel
    (pairs of adjacent dims): the inverse of the permute in transformers'
    convert_llama_weights_to_hf.py."""
    half = config_value(config, "n_embd") // config_value(config, "n_head") // 2
    return rearrange(w, "(h two d) n -> (h d two) n", d=half, two=2)


def _rotary_pairs_halved(w, config):
    """The inverse of _rotary_pairs_interleaved."""
    half = config_value(config, "n_embd") // config_value(config, "n_head") // 2
    return rearrange(w, "(h d two) n -> (h two d) n", d=half, two=2)


def remap_state_dict_meta_llama(state_dict: Dict[str, torch.Tensor], config) -> Dict[str, torch.Tensor]:
    """A Meta-format Llama state dict (consolidated.*.pth) as GPTLMHeadModel's. Modifies
    state_dict in place."""
    state_dict = rename_keys(
        state_dict,
        (r"^(?!output\.)", "transformer."),
        (r"^transformer\.tok_embeddings\.", "transformer.embeddings.word_embeddings."),
    )
    # Llama's embedding and output matrices are sharded differently: each is padded on its own.
    state_dict = move_word_embeddings_and_head(
        state_dict, config, "transformer.embeddings.word_embeddings.weight", "output.weight", pad=pad_to_vocab_multiple
    )
    for l in range(config_value(config, "n_layer")):
        prefix = f"transformer.layers.{l}"
        w1 = state_dict.pop(f"{prefix}.feed_forward.w1.weight")
        w3 = state_dict.pop(f"{prefix}.feed_forward.w3.weight")
        # GatedMlp's fc1 is the value rows (w3) then the gate rows (w1).
        state_dict[f"{prefix}.mlp.fc1.weight"] = torch.cat([w3, w1], dim=0)
        wq, wk, wv = (state_dict.pop(f"{prefix}.attention.w{n}.weight") for n in "qkv")
        state_dict[f"{prefix}.mixer.Wqkv.weight"] = torch.cat([wq, wk, wv], dim=0)
        state_dict.pop(f"{prefix}.attention.inner_attention.rope.freqs", None)
    state_dict.pop("transformer.rope.freqs", None)
    return rename_keys(
        state_dict,
        (r"^transformer\.norm\.", "transformer.ln_f."),
        (r"^transformer\.layers\.(\d+)\.attention_norm\.", r"transformer.layers.\1.norm1."),
        (r"^transformer\.layers\.(\d+)\.ffn_norm\.", r"transformer.layers.\1.norm2."),
        (r"^transformer\.layers\.(\d+)\.feed_forward\.w2\.", r"transformer.layers.\1.mlp.fc2."),
        (r"^transformer\.layers\.(\d+)\.attention\.wo\.", r"transformer.layers.\1.mixer.out_proj."),
    )


def remap_state_dict_hf_llama(state_dict: Dict[str, torch.Tensor], config) -> Dict[str, torch.Tensor]:
    """A Hugging Face LlamaForCausalLM state dict as GPTLMHeadModel's (config: the GPT2Config of
    llama_config_to_gpt2_config). Modifies state_dict in place."""
    state_dict = move_word_embeddings_and_head(
        state_dict, config, "model.embed_tokens.weight", pad=pad_to_vocab_multiple
    )
    for l in range(config_value(config, "n_layer")):
        prefix = f"model.layers.{l}"
        gate = state_dict.pop(f"{prefix}.mlp.gate_proj.weight")
        up = state_dict.pop(f"{prefix}.mlp.up_proj.weight")
        # GatedMlp computes fc2(value * silu(gate)) with fc1's rows as [value; gate].
        state_dict[f"transformer.layers.{l}.mlp.fc1.weight"] = torch.cat([up, gate], dim=0)
        wq = _rotary_pairs_interleaved(state_dict.pop(f"{prefix}.self_attn.q_proj.weight"), config)
        wk = _rotary_pairs_interleaved(state_dict.pop(f"{prefix}.self_attn.k_proj.weight"), config)
        wv = state_dict.pop(f"{prefix}.self_attn.v_proj.weight")
        state_dict[f"transformer.layers.{l}.mixer.Wqkv.weight"] = torch.cat([wq, wk, wv], dim=0)
        state_dict.pop(f"{prefix}.self_attn.rotary_emb.inv_freq", None)
    return rename_keys(
        state_dict,
        (r"^model\.layers\.(\d+)\.mlp\.down_proj\.", r"transformer.layers.\1.mlp.fc2."),
        (r"^model\.norm\.", "transformer.ln_f."),
        (r"^model\.layers\.(\d+)\.input_layernorm\.", r"transformer.layers.\1.norm1."),
        (r"^model\.layers\.(\d+)\.post_attention_layernorm\.", r"transformer.layers.\1.norm2."),
        (r"^model\.layers\.(\d+)\.self_attn\.o_proj\.", r"transformer.layers.\1.mixer.out_proj."),
    )


def inv_remap_state_dict_hf_llama(state_dict: Dict[str, torch.Tensor], config) -> Dict[str, torch.Tensor]:
    """GPTLMHeadModel's state dict back in Hugging Face LlamaForCausalLM's keys and layout: the
    inverse of remap_state_dict_hf_llama, up to the padding of the vocabulary (rows added by
    pad_vocab_size_multiple stay). Modifies state_dict in place."""
    state_dict = move_word_embeddings_and_head(
        state_dict, config, WORD_EMBEDDINGS_KEY, new_embedding_key="model.embed_tokens.weight", pad=pad_to_vocab_multiple
    )
    n_head = config_value(config, "n_head")
    head_dim = config_value(config, "hidden_size") // n_head
    q_rows, kv_rows = n_head * head_dim, num_heads_kv(config) * head_dim
    for l in range(config_value(config, "n_layer")):
        prefix = f"transformer.layers.{l}"
        up, gate = torch.chunk(state_dict.pop(f"{prefix}.mlp.fc1.weight"), chunks=2, dim=0)
        state_dict[f"model.layers.{l}.mlp.gate_proj.weight"] = gate
        state_dict[f"model.layers.{l}.mlp.up_proj.weight"] = up
        wqkv = state_dict.pop(f"{prefix}.mixer.Wqkv.weight")
        wq, wk, wv = wqkv[:q_rows], wqkv[q_rows : q_rows + kv_rows], wqkv[q_rows + kv_rows : q_rows + 2 * kv_rows]
        state_dict[f"model.layers.{l}.self_attn.q_proj.weight"] = _rotary_pairs_halved(wq, config)
        state_dict[f"model.layers.{l}.self_attn.k_proj.weight"] = _rotary_pairs_halved(wk, config)
        state_dict[f"model.layers.{l}.self_attn.v_proj.weight"] = wv
    return rename_keys(
        state_dict,
        (r"^transformer\.layers\.(\d+)\.mlp\.fc2\.", r"model.layers.\1.mlp.down_proj."),
        (r"^transformer\.ln_f\.", "model.norm."),
        (r"^transformer\.layers\.(\d+)\.norm1\.", r"model.layers.\1.input_layernorm."),
        (r"^transformer\.layers\.(\d+)\.norm2\.", r"model.layers.\1.post_attention_layernorm."),
        (r"^transformer\.layers\.(\d+)\.mixer\.out_proj\.", r"model.layers.\1.self_attn.o_proj."),
    )


def _meta_intermediate_size(hidden_size, multiple_of, ffn_dim_multiplier):
    """The MLP width of Meta's Llama code: 2/3 of 4 * hidden_size, times ffn_dim_multiplier,
    rounded up to multiple_of."""
    size = int(2 * (4 * hidden_size) / 3)
    if ffn_dim_multiplier is not None:
        size = int(ffn_dim_multiplier * size)
    return multiple_of * ((size + multiple_of - 1) // multiple_of)


def config_from_meta_checkpoint(checkpoint_path: Union[str, os.PathLike], model_name: str):
    """The LlamaConfig of a Meta checkpoint folder checkpoint_path / model_name (its params.json;
    the vocabulary size from its tokenizer.model where present, else 32000)."""
    with open(Path(checkpoint_path) / model_name / "params.json") as f:
        params = json.load(f)
    config = _transformers().LlamaConfig(
        hidden_size=params["dim"],
        intermediate_size=None,
        num_attention_heads=params["n_heads"],
        num_hidden_layers=params["n_layers"],
        rms_norm_eps=params["norm_eps"],
        num_key_value_heads=params.get("n_kv_heads", None),
    )
    config.intermediate_size = _meta_intermediate_size(
        config.hidden_size, params.get("multiple_of", 1), params.get("ffn_dim_multiplier", None)
    )
    if "rope_theta" in params:
        config.rotary_emb_base = params["rope_theta"]
    # params.json does not give the vocabulary size (CodeLlama has 32000 or 32016).
    config.vocab_size = 32000
    tokenizer = Path(checkpoint_path) / model_name / "tokenizer.model"
    if tokenizer.is_file():
        try:
            from sentencepiece import SentencePieceProcessor
        except ImportError as e:
            raise ImportError(
                f"reading the vocabulary size from {tokenizer} needs the 'sentencepiece' package; "
                "install it with `pip install sentencepiece`"
            ) from e
        config.vocab_size = SentencePieceProcessor(str(tokenizer)).vocab_size()
    return config


def config_from_hf_checkpoint(checkpoint_path: Union[str, os.PathLike], model_name: str):
    """The LlamaConfig of the Hugging Face checkpoint folder checkpoint_path / f"{model_name}-hf"."""
    return _transformers().LlamaConfig.from_pretrained(Path(checkpoint_path) / f"{model_name}-hf" / "config.json")


def config_from_checkpoint(
    checkpoint_path: Union[str, os.PathLike], model_name: str, checkpoint_format="meta"
):
    """config_from_meta_checkpoint for checkpoint_format "meta", else config_from_hf_checkpoint."""
    if checkpoint_format == "meta":
        return config_from_meta_checkpoint(checkpoint_path, model_name)
    return config_from_hf_checkpoint(checkpoint_path, model_name)


def state_dicts_from_checkpoint(checkpoint_path: Union[str, os.PathLike], model_name: str) -> List[dict]:
    """The state dicts of a Meta checkpoint's shards (consolidated.00.pth, ...), in shard order,
    on the CPU."""
    # Sorted: the shards' order is their tensor-parallel rank order.
    paths = sorted((Path(checkpoint_path) / model_name).glob("consolidated.*.pth"))
    return [torch.load(path, map_location="cpu") for path in paths]


def _rope_theta(llama_config):
    """The rotary base: rotary_emb_base (set by config_from_meta_checkpoint), else
    transformers' rope_theta (in rope_parameters since transformers 5, else an attribute), else
    10000."""
    if hasattr(llama_config, "rotary_emb_base"):
        return llama_config.rotary_emb_base
    return rope_parameter(llama_config, "rope_theta", ("rope_theta",), 10000.0)


def llama_config_to_gpt2_config(llama_config):
    """The transformers.GPT2Config that builds a GPTLMHeadModel equivalent to a Llama model:
    no position embeddings, rotary on every head dim (interleaved, as the Meta checkpoints),
    RMSNorm, SwiGLU MLP of intermediate_size, no biases, untied output matrix, no dropout."""
    return _transformers().GPT2Config(
        vocab_size=llama_config.vocab_size,
        n_positions=0,
        n_embd=llama_config.hidden_size,
        n_layer=llama_config.num_hidden_layers,
        n_head=llama_config.num_attention_heads,
        n_inner=llama_config.intermediate_size,
        activation_function="swiglu",  # transformers calls it "silu"
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        layer_norm_epsilon=llama_config.rms_norm_eps,
        initializer_range=llama_config.initializer_range,
        bos_token_id=llama_config.bos_token_id,
        eos_token_id=llama_config.eos_token_id,
        pad_token_id=llama_config.pad_token_id,
        rms_norm=True,
        rotary_emb_fraction=1.0,
        rotary_emb_interleaved=True,
        tie_word_embeddings=False,
        qkv_proj_bias=False,
        out_proj_bias=False,
        mlp_fc1_bias=False,
        mlp_fc2_bias=False,
        rotary_emb_base=_rope_theta(llama_config),
        n_head_kv=llama_config.num_key_value_heads,
    )
