"""GPT-style decoder-only language models built from flash_attn.modules, with the API of upstream
flash-attn 2.8.3's flash_attn.models.gpt: the layer factories driven by a GPT2Config-like config
(create_mixer_cls, create_mlp_cls, create_block), GPTModel and GPTLMHeadModel (tensor parallel
over a process_group, generation through flash_attn.utils.generation), the Hugging Face /
Megatron GPT-2 state-dict remapping and the tensor-parallel sharding of state dicts.

The config is any object with the attributes of transformers.GPT2Config (a GPT2Config itself,
or e.g. a types.SimpleNamespace), read under either of GPT2Config's names (n_embd or hidden_size,
n_head or num_attention_heads, n_layer or num_hidden_layers, n_positions or
max_position_embeddings), plus the optional fields upstream reads with getattr (rotary_emb_fraction,
n_head_kv, rms_norm, parallel_block, use_flash_attn, fused_mlp, ...). transformers is not needed.

Importing this module loads neither triton nor the CUDA extension: the Triton RMSNorm and layer
norm are imported by a config with rms_norm or fused_dropout_add_ln, the rotary layer by an MHA
with rotary, the checkpoint loaders by from_pretrained.
"""

import logging
import math
import re
from collections import namedtuple
from collections.abc import Sequence
from functools import partial
from typing import Dict, List

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from flash_attn.models._gpt2_config import attention_head_dim, config_value, missing_fields, num_heads_kv, padded_vocab_size
from flash_attn.models._remap import pad_rows, rename_keys
from flash_attn.modules.block import Block, ParallelBlock
from flash_attn.modules.embedding import GPT2Embeddings, ParallelGPT2Embeddings
from flash_attn.modules.mha import MHA, ParallelMHA
from flash_attn.modules.mlp import FusedMLP, GatedMlp, Mlp, ParallelFusedMLP, ParallelGatedMlp, ParallelMLP
from flash_attn.ops.activations import sqrelu_fwd
from flash_attn.ops.fused_dense import ColumnParallelLinear
from flash_attn.utils.distributed import all_gather, all_gather_raw, get_dim_for_local_rank, sync_shared_params
from flash_attn.utils.generation import GenerationMixin
from flash_attn.utils.pretrained import state_dict_from_pretrained

__all__ = [
    "create_mixer_cls",
    "create_mlp_cls",
    "create_block",
    "GPTPreTrainedModel",
    "GPTModel",
    "GPTLMHeadModel",
    "shard_state_dict_tp",
    "combine_state_dicts_tp",
    "remap_state_dict_hf_gpt2",
    "remap_state_dict_megatron",
]

logger = logging.getLogger(__name__)

# Attributes read without a default, as GPT2Config always has them.
_REQUIRED_CONFIG_FIELDS = (
    "vocab_size", "hidden_size", "num_attention_heads", "num_hidden_layers", "max_position_embeddings",
    "n_inner", "activation_function", "resid_pdrop", "embd_pdrop", "attn_pdrop", "layer_norm_epsilon",
    "initializer_range", "scale_attn_weights", "scale_attn_by_inverse_layer_idx",
)

_TANH_GELUS = ("gelu_new", "gelu_fast", "gelu_approx", "gelu_pytorch_tanh")
_GATED_ACTIVATIONS = ("glu", "swiglu", "geglu")
_ACTIVATIONS = ("gelu", *_TANH_GELUS, "relu", "sqrelu", *_GATED_ACTIVATIONS)
_FUSED_MLP_ACTIVATIONS = (*_TANH_GELUS, "relu", "sqrelu")

_CausalLMOutput = namedtuple("CausalLMOutput", ["logits"])


def _check_config(config):
    missing = missing_fields(config, _REQUIRED_CONFIG_FIELDS)
    if missing:
        raise TypeError(
            f"config must have the attributes of transformers.GPT2Config; {type(config).__name__} "
            f"lacks {missing}"
        )
    activation = config.activation_function
    if activation not in _ACTIVATIONS:
        raise ValueError(f"config.activation_function must be one of {_ACTIVATIONS}, got {activation!r}")



def _parallel_kwargs(config, process_group):
    if process_group is None:
        return {}
    return {"process_group": process_group, "sequence_parallel": getattr(config, "sequence_parallel", True)}


def _triton_norm(name):
    from flash_attn.ops.triton import layer_norm

    return getattr(layer_norm, name)


def create_mixer_cls(config, layer_idx=None, process_group=None, device=None, dtype=None):
    """The attention class of layer layer_idx as a partial of MHA (or ParallelMHA over
    process_group) taking the model width: causal, with the config's heads, biases, dropout,
    softmax scale (GPT-2's and muP's scalings), rotary, ALiBi, window and flash-attention choice."""
    factory_kwargs = {"device": device, "dtype": dtype}
    head_dim = attention_head_dim(config)
    attn_scale_power = 1.0 if getattr(config, "mup_scale_qk_dot_by_d", False) else 0.5
    softmax_scale = head_dim ** (-attn_scale_power) if config.scale_attn_weights else 1.0
    softmax_scale *= getattr(config, "mup_attn_multiplier", 1.0)
    if config.scale_attn_by_inverse_layer_idx:
        if layer_idx is None:
            raise ValueError("config.scale_attn_by_inverse_layer_idx needs a layer_idx")
        softmax_scale /= float(layer_idx + 1)
    dwconv = getattr(config, "attn_dwconv", False)
    fused_bias_fc = getattr(config, "fused_bias_fc", False)
    if process_group is not None:
        if dwconv:
            raise ValueError("config.attn_dwconv is not supported with a process_group (ParallelMHA)")
        if not fused_bias_fc:
            raise ValueError("tensor-parallel attention (a process_group) needs config.fused_bias_fc=True")
        mha_cls, mode_kwargs = ParallelMHA, _parallel_kwargs(config, process_group)
    else:
        mha_cls, mode_kwargs = MHA, {"fused_bias_fc": fused_bias_fc, "dwconv": dwconv}
    return partial(
        mha_cls,
        num_heads=config_value(config, "num_attention_heads"),
        num_heads_kv=getattr(config, "n_head_kv", None),
        qkv_proj_bias=getattr(config, "qkv_proj_bias", True),
        out_proj_bias=getattr(config, "out_proj_bias", True),
        dropout=config.attn_pdrop,
        softmax_scale=softmax_scale,
        causal=True,
        layer_idx=layer_idx,
        rotary_emb_dim=int(getattr(config, "rotary_emb_fraction", 0.0) * head_dim),
        rotary_emb_base=getattr(config, "rotary_emb_base", 10000.0),
        rotary_emb_scale_base=getattr(config, "rotary_emb_scale_base", None),
        rotary_emb_interleaved=getattr(config, "rotary_emb_interleaved", False),
        use_alibi=getattr(config, "use_alibi", False),
        window_size=getattr(config, "window_size", (-1, -1)),
        use_flash_attn=getattr(config, "use_flash_attn", False),
        **mode_kwargs,
        **factory_kwargs,
    )


def _mlp_activation(name):
    if name == "glu":
        return F.sigmoid
    if name == "swiglu":
        return F.silu
    if name == "geglu":
        return F.gelu
    if name == "relu":
        return partial(F.relu, inplace=True)
    if name == "sqrelu":
        return sqrelu_fwd
    return partial(F.gelu, approximate="tanh" if name in _TANH_GELUS else "none")


def create_mlp_cls(config, layer_idx=None, process_group=None, device=None, dtype=None):
    """The MLP class of layer layer_idx as a partial taking the model width: GatedMlp for glu /
    swiglu / geglu, Mlp otherwise, FusedMLP with config.fused_mlp (the parallel variants over
    process_group), with config.n_inner hidden features."""
    factory_kwargs = {"device": device, "dtype": dtype}
    activation_name = config.activation_function
    common = dict(
        hidden_features=config.n_inner,
        bias1=getattr(config, "mlp_fc1_bias", True),
        bias2=getattr(config, "mlp_fc2_bias", True),
        **_parallel_kwargs(config, process_group),
        **factory_kwargs,
    )
    fused_mlp = getattr(config, "fused_mlp", False)
    if getattr(config, "fused_dense_sqrelu_dense", False):
        raise ImportError(
            "config.fused_dense_sqrelu_dense needs flash_attn.ops.triton.mlp.FusedDenseSqreluDense, "
            "which is not provided by this build of flash_attn; use config.fused_mlp=True with "
            "activation_function='sqrelu' (FusedMLP) instead"
        )
    if fused_mlp:
        if activation_name not in _FUSED_MLP_ACTIVATIONS:
            raise ValueError(
                f"config.fused_mlp needs activation_function in {_FUSED_MLP_ACTIVATIONS}, got {activation_name!r}"
            )
        checkpoint_lvl = getattr(config, "mlp_checkpoint_lvl", 0)
        # A sequence gives each layer its own level.
        if isinstance(checkpoint_lvl, Sequence):
            if layer_idx is None:
                raise ValueError("a per-layer config.mlp_checkpoint_lvl needs a layer_idx")
            checkpoint_lvl = checkpoint_lvl[layer_idx]
        activation = "gelu_approx" if activation_name in _TANH_GELUS else activation_name
        mlp_cls = FusedMLP if process_group is None else ParallelFusedMLP
        return partial(mlp_cls, activation=activation, checkpoint_lvl=checkpoint_lvl, **common)
    if activation_name not in _ACTIVATIONS:
        raise ValueError(f"config.activation_function must be one of {_ACTIVATIONS}, got {activation_name!r}")
    activation = _mlp_activation(activation_name)
    if activation_name in _GATED_ACTIVATIONS:
        mlp_cls = GatedMlp if process_group is None else ParallelGatedMlp
        return partial(mlp_cls, activation=activation, multiple_of=getattr(config, "mlp_multiple_of", 128), **common)
    mlp_cls = Mlp if process_group is None else ParallelMLP
    return partial(mlp_cls, activation=activation, **common)


def _norm_cls(config):
    return _triton_norm("RMSNorm") if getattr(config, "rms_norm", False) else nn.LayerNorm


def create_block(config, layer_idx=None, process_group=None, device=None, dtype=None):
    """Transformer layer layer_idx: a pre-norm (or, with config.prenorm=False, post-norm) Block,
    or with config.parallel_block a ParallelBlock (attention and MLP side by side, GPT-J /
    GPT-NeoX style), of the classes create_mixer_cls and create_mlp_cls return; LayerNorm, or the
    Triton RMSNorm with config.rms_norm. Layer 0's first residual dropout is config.embd_pdrop
    (it drops the embeddings), the others' config.resid_pdrop."""
    factory_kwargs = {"device": device, "dtype": dtype}
    sequence_parallel = getattr(config, "sequence_parallel", True) and process_group is not None
    mixer_cls = create_mixer_cls(config, layer_idx, process_group=process_group, **factory_kwargs)
    mlp_cls = create_mlp_cls(config, layer_idx, process_group=process_group, **factory_kwargs)
    norm_cls = partial(_norm_cls(config), eps=config.layer_norm_epsilon, **factory_kwargs)
    common = dict(
        norm_cls=norm_cls,
        resid_dropout1=config.resid_pdrop if layer_idx is None or layer_idx > 0 else config.embd_pdrop,
        resid_dropout2=config.resid_pdrop,
        fused_dropout_add_ln=getattr(config, "fused_dropout_add_ln", False),
        residual_in_fp32=getattr(config, "residual_in_fp32", False),
        sequence_parallel=sequence_parallel,
        mark_shared_params=process_group is not None,
    )
    prenorm = getattr(config, "prenorm", True)
    if getattr(config, "parallel_block", False):
        if not prenorm:
            raise ValueError("config.parallel_block needs config.prenorm=True")
        tied_norm = getattr(config, "parallel_block_tied_norm", False)
        block = ParallelBlock(config_value(config, "hidden_size"), mixer_cls, mlp_cls, tied_norm=tied_norm, **common)
    else:
        block = Block(config_value(config, "hidden_size"), mixer_cls, mlp_cls, prenorm=prenorm, **common)
    block.layer_idx = layer_idx
    return block


# Checkpoint name prefixes from_pretrained knows, and the module and function remapping them.
_PRETRAINED_REMAPS = (
    (("gpt2",), "flash_attn.models.gpt", "remap_state_dict_hf_gpt2"),
    (("facebook/opt",), "flash_attn.models.opt", "remap_state_dict_hf_opt"),
    (("EleutherAI/gpt-j-", "togethercomputer/GPT-JT-"), "flash_attn.models.gptj", "remap_state_dict_hf_gptj"),
    (
        ("EleutherAI/gpt-neox-", "EleutherAI/pythia-", "togethercomputer/RedPajama-INCITE-"),
        "flash_attn.models.gpt_neox",
        "remap_state_dict_hf_gpt_neox",
    ),
    (("tiiuae/falcon-",), "flash_attn.models.falcon", "remap_state_dict_hf_falcon"),
    (("meta-llama/Llama-",), "flash_attn.models.llama", "remap_state_dict_hf_llama"),
    (("bigcode/", "WizardLM/"), "flash_attn.models.bigcode", "remap_state_dict_hf_bigcode"),
)


def _pretrained_remap(model_name):
    import importlib

    for prefixes, module_name, function_name in _PRETRAINED_REMAPS:
        if model_name.startswith(prefixes):
            return getattr(importlib.import_module(module_name), function_name)
    raise NotImplementedError(f"Model {model_name} not supported")


class GPTPreTrainedModel(nn.Module):
    """Base of the GPT models: keeps the config and loads pretrained checkpoints."""

    def __init__(self, config, *inputs, **kwargs):
        super().__init__()
        _check_config(config)
        self.config = config

    @classmethod
    def from_pretrained(
        cls,
        model_name,
        config,
        *args,
        strict=True,
        device=None,
        dtype=None,
        world_size=1,
        rank=0,
        **kwargs,
    ):
        """cls(config, ...) with the weights of the Hugging Face checkpoint model_name (a Hub id
        or local folder whose name starts like a known model family: gpt2, facebook/opt,
        EleutherAI/gpt-j- / gpt-neox- / pythia-, tiiuae/falcon-, meta-llama/Llama-, bigcode/ ...),
        remapped to this model's keys and, with world_size > 1, sharded for rank."""
        model = cls(config, *args, device=device, dtype=dtype, **kwargs)
        remap = _pretrained_remap(model_name)
        # Read on the CPU: the model is already on device, and the checkpoint need not be too.
        state_dict = state_dict_from_pretrained(model_name, device="cpu", dtype=dtype)
        state_dict = remap(state_dict, config)
        if world_size > 1:
            state_dict = shard_state_dict_tp(state_dict, config, world_size, rank)
        load_return = model.load_state_dict(state_dict, strict=strict)
        logger.info(load_return)
        return model


def _init_weights(module, n_layer, initializer_range=0.02, mup_width_scale=1.0, rescale_prenorm_residual=True):
    """GPT-2's initialization (as Hugging Face's GPT2PreTrainedModel._init_weights), with muP's
    width scaling: normal weights, zero biases, and the projections that write into the
    residual stream (out_proj, fc2) scaled down by sqrt(2 * n_layer) (the GPT-2 paper's scheme
    for the accumulation over depth)."""
    mup_init_scale = math.sqrt(mup_width_scale)
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=initializer_range * mup_init_scale)
        # The optimizer reads a per-parameter learning-rate multiplier from _optim (muP).
        optim_cfg = getattr(module.weight, "_optim", {})
        optim_cfg.update({"lr_multiplier": mup_width_scale})
        setattr(module.weight, "_optim", optim_cfg)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=initializer_range)
    if rescale_prenorm_residual:
        for name, p in module.named_parameters():
            if name in ("out_proj.weight", "fc2.weight"):
                nn.init.normal_(p, mean=0.0, std=initializer_range * mup_init_scale / math.sqrt(2 * n_layer))


class GPTModel(GPTPreTrainedModel):
    """Embeddings, config.num_hidden_layers blocks (create_block) and the final norm; forward
    returns the final hidden states (batch, seqlen, hidden_size), or under sequence parallelism
    this rank's (batch * seqlen / world_size, hidden_size).

    Each block runs dropout -> add -> norm -> attention / MLP and hands its residual stream to
    the next, so the last block's output still needs a dropout, add and norm: drop_f and ln_f
    (fused into one Triton kernel with config.fused_dropout_add_ln).
    """

    def __init__(self, config, process_group=None, device=None, dtype=None):
        super().__init__(config)
        factory_kwargs = {"device": device, "dtype": dtype}
        self.process_group = process_group
        self.sequence_parallel = getattr(config, "sequence_parallel", True)
        hidden_size = config_value(config, "hidden_size")
        n_layer = config_value(config, "num_hidden_layers")
        vocab_size = padded_vocab_size(config)
        max_positions = config_value(config, "max_position_embeddings")
        self.embeddings_multiplier = getattr(config, "mup_embeddings_multiplier", 1.0)
        self.residual_in_fp32 = getattr(config, "residual_in_fp32", False)
        self.prenorm = getattr(config, "prenorm", True)
        self.parallel_block = getattr(config, "parallel_block", False)
        if process_group is None:
            self.embeddings = GPT2Embeddings(
                hidden_size,
                vocab_size,
                max_positions,
                word_embed_proj_dim=getattr(config, "word_embed_proj_dim", None),
                **factory_kwargs,
            )
        else:
            self.embeddings = ParallelGPT2Embeddings(
                hidden_size,
                vocab_size,
                max_positions,
                process_group=process_group,
                sequence_parallel=self.sequence_parallel,
                **factory_kwargs,
            )
        self.layers = nn.ModuleList(
            [create_block(config, layer_idx=i, process_group=process_group, **factory_kwargs) for i in range(n_layer)]
        )
        if getattr(config, "rotary_emb_fraction", 0.0) > 0.0:
            # One RotaryEmbedding for all layers, so that they share its cos / sin cache.
            for layer in self.layers[1:]:
                layer.mixer.rotary_emb = self.layers[0].mixer.rotary_emb
        self.fused_dropout_add_ln = getattr(config, "fused_dropout_add_ln", False)
        if self.prenorm:
            self.drop_f = nn.Dropout(config.resid_pdrop)
            self.ln_f = _norm_cls(config)(hidden_size, eps=config.layer_norm_epsilon, **factory_kwargs)
            if process_group is not None:
                for p in self.ln_f.parameters():
                    # Synced across ranks at init; gradients all-reduced under sequence parallelism.
                    p._shared_params = True
                    if self.sequence_parallel:
                        p._sequence_parallel = True
        self.apply(
            partial(
                _init_weights,
                n_layer=n_layer,
                initializer_range=config.initializer_range,
                mup_width_scale=getattr(config, "mup_width_scale", 1.0),
            )
        )
        self.tie_weights()

    def tie_weights(self):
        if self.process_group is not None:
            sync_shared_params(self, self.process_group)

    def allocate_inference_cache(self, batch_size, max_seqlen, dtype=None, **kwargs):
        return {
            i: layer.allocate_inference_cache(batch_size, max_seqlen, dtype=dtype, **kwargs)
            for i, layer in enumerate(self.layers)
        }

    def _final_norm(self, hidden_states, hidden_states2, residual):
        """drop_f, the add into the residual stream (of both branches of a parallel block), and
        ln_f."""
        if not self.fused_dropout_add_ln:
            dropped = self.drop_f(hidden_states)
            if self.parallel_block:
                dropped = dropped + self.drop_f(hidden_states2)
                residual = dropped if residual is None else residual + dropped
            else:
                residual = dropped if residual is None else dropped + residual
            return self.ln_f(residual.to(dtype=self.ln_f.weight.dtype))
        if self.parallel_block:
            # The Triton kernel takes one branch; the second one's dropout and add run here.
            dropped2 = self.drop_f(hidden_states2)
            residual = dropped2 if residual is None else residual + dropped2
        layer_norm_fn = _triton_norm("layer_norm_fn")
        return layer_norm_fn(
            hidden_states,
            self.ln_f.weight,
            self.ln_f.bias,
            residual=residual,
            eps=self.ln_f.eps,
            dropout_p=self.drop_f.p if self.training else 0.0,
            prenorm=False,
            is_rms_norm=isinstance(self.ln_f, _triton_norm("RMSNorm")),
        )

    def forward(self, input_ids, position_ids=None, inference_params=None):
        # Under sequence parallelism the batch and sequence dims are merged, so that the tokens
        # split evenly over the ranks however small the batch; attention gets seqlen to unmerge.
        merged_tokens = self.process_group is not None and self.sequence_parallel
        embedding_kwargs = {"combine_batch_seqlen_dim": True} if merged_tokens else {}
        hidden_states = self.embeddings(input_ids, position_ids=position_ids, **embedding_kwargs)
        if self.embeddings_multiplier != 1.0:
            hidden_states = hidden_states * self.embeddings_multiplier
        hidden_states2, residual = None, None
        mixer_kwargs = {"seqlen": input_ids.shape[1]} if merged_tokens else {}
        if inference_params is not None:
            mixer_kwargs["inference_params"] = inference_params
        for layer in self.layers:
            if not self.prenorm:
                hidden_states = layer(hidden_states, mixer_kwargs=mixer_kwargs)
            elif self.parallel_block:
                hidden_states, hidden_states2, residual = layer(
                    hidden_states, hidden_states2, residual, mixer_kwargs=mixer_kwargs
                )
            else:
                hidden_states, residual = layer(hidden_states, residual, mixer_kwargs=mixer_kwargs)
        if self.prenorm:
            hidden_states = self._final_norm(hidden_states, hidden_states2, residual)
        return hidden_states


class GPTLMHeadModel(GPTPreTrainedModel, GenerationMixin):
    """GPTModel (as .transformer) with a language-model head (.lm_head, tied to the word
    embeddings unless config.tie_word_embeddings is False); forward returns a namedtuple
    CausalLMOutput(logits) of (batch, seqlen, padded vocab_size) logits."""

    def __init__(self, config, process_group=None, device=None, dtype=None):
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__(config)
        self.process_group = process_group
        self.transformer = GPTModel(config, process_group=process_group, **factory_kwargs)
        self.tie_word_embeddings = getattr(config, "tie_word_embeddings", True)
        lm_head_bias = getattr(config, "lm_head_bias", False)
        vocab_size = padded_vocab_size(config)
        hidden_size = config_value(config, "n_embd")
        # OPT-350m projects the hidden states down to a smaller embedding width before the head.
        word_embed_proj_dim = getattr(config, "word_embed_proj_dim", None)
        embed_dim = hidden_size if word_embed_proj_dim is None else word_embed_proj_dim
        if word_embed_proj_dim is not None:
            self.project_out = nn.Linear(hidden_size, embed_dim, bias=False, **factory_kwargs)
        else:
            self.project_out = None
        mup_width_scale = getattr(config, "mup_width_scale", 1.0)
        self.output_scale = getattr(config, "mup_output_multiplier", 1.0) * mup_width_scale
        if process_group is None:
            self.lm_head = nn.Linear(embed_dim, vocab_size, bias=lm_head_bias, **factory_kwargs)
        else:
            self.lm_head = ColumnParallelLinear(
                embed_dim,
                vocab_size,
                process_group,
                bias=lm_head_bias,
                sequence_parallel=getattr(config, "sequence_parallel", True),
                **factory_kwargs,
            )
        self.norm_head = getattr(config, "norm_head", False)
        self.apply(
            partial(
                _init_weights,
                n_layer=config_value(config, "num_hidden_layers"),
                initializer_range=config.initializer_range,
                mup_width_scale=mup_width_scale,
            )
        )
        self.tie_weights()

    def tie_weights(self):
        if self.tie_word_embeddings:
            self.lm_head.weight = self.transformer.embeddings.word_embeddings.weight
        if self.process_group is not None:
            sync_shared_params(self, self.process_group)

    def allocate_inference_cache(self, batch_size, max_seqlen, dtype=None, **kwargs):
        return self.transformer.allocate_inference_cache(batch_size, max_seqlen, dtype=dtype, **kwargs)

    def forward(self, input_ids, position_ids=None, inference_params=None, num_last_tokens=0):
        """
        input_ids: (batch, seqlen) int tensor.
        position_ids: (batch, seqlen), default 0 .. seqlen - 1.
        inference_params: InferenceParams for decoding with the kv cache.
        num_last_tokens: if > 0, only the logits of the last num_last_tokens positions.
        """
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be (batch, seqlen), got shape {tuple(input_ids.shape)}")
        batch = input_ids.shape[0]
        hidden_states = self.transformer(input_ids, position_ids=position_ids, inference_params=inference_params)
        if inference_params is not None and hidden_states.ndim != 3:
            raise ValueError("decoding with inference_params does not support sequence_parallel")
        if num_last_tokens > 0:
            hidden_states = hidden_states[:, -num_last_tokens:]
        if self.project_out is not None:
            hidden_states = self.project_out(hidden_states)
        if self.output_scale != 1.0:
            hidden_states = hidden_states * self.output_scale
        tensor_parallel_head = isinstance(self.lm_head, ColumnParallelLinear)
        if not self.norm_head:
            lm_logits = self.lm_head(hidden_states)
        else:
            lm_head_weight = F.normalize(self.lm_head.weight)
            if tensor_parallel_head and self.lm_head.sequence_parallel:
                hidden_states = all_gather(hidden_states, self.lm_head.process_group)
            lm_logits = F.linear(hidden_states, lm_head_weight, bias=self.lm_head.bias)
        if tensor_parallel_head and inference_params is not None:
            # Sampling needs the whole vocabulary: gather the ranks' slices of it.
            lm_logits, _ = all_gather_raw(lm_logits, self.lm_head.process_group)
            lm_logits = rearrange(lm_logits, "(n b) ... d -> b ... (n d)", b=batch)
        return _CausalLMOutput(logits=lm_logits)

    def load_state_dict(self, state_dict, strict=True):
        """nn.Module.load_state_dict, also accepting the checkpoints of the earlier block order
        (attention / MLP -> dropout -> add -> norm, with a transformer.ln_0 before the first
        layer), whose norms are moved to their places in the current order."""
        if "transformer.ln_0.weight" in state_dict:
            state_dict = _move_post_norms_to_pre_norms(state_dict, len(self.transformer.layers))
        return super().load_state_dict(state_dict, strict=strict)


def _move_post_norms_to_pre_norms(state_dict, n_layers):
    """In the old order, layer l's norm1 follows its attention and norm2 its MLP, and ln_0 comes
    first. In the current order a layer's norm1 precedes its attention: the old ln_0 becomes
    layer 0's norm1, the old norm2 of layer l - 1 layer l's norm1, the old norm1 of layer l its
    norm2, and the last layer's old norm2 becomes ln_f."""
    old = dict(state_dict)
    new = {k: v for k, v in old.items() if not re.match(r"^transformer\.(ln_0|layers\.\d+\.norm[12])\.", k)}
    norm = lambda prefix: {p: old[f"{prefix}.{p}"] for p in ("weight", "bias")}
    moves = {"transformer.ln_f": norm(f"transformer.layers.{n_layers - 1}.norm2")}
    moves["transformer.layers.0.norm1"] = norm("transformer.ln_0")
    for l in range(n_layers):
        moves[f"transformer.layers.{l}.norm2"] = norm(f"transformer.layers.{l}.norm1")
        if l > 0:
            moves[f"transformer.layers.{l}.norm1"] = norm(f"transformer.layers.{l - 1}.norm2")
    for prefix, params in moves.items():
        for p, value in params.items():
            new[f"{prefix}.{p}"] = value
    return new


# --------------------------------------------------------------------------------------------
# Tensor-parallel sharding of state dicts
# --------------------------------------------------------------------------------------------


def _check_tp_divisibility(config, world_size):
    vocab_size = padded_vocab_size(config)
    hidden_size = config_value(config, "hidden_size")
    inner_dim = config.n_inner if config.n_inner is not None else 4 * hidden_size
    for name, value in (("padded vocab_size", vocab_size), ("hidden_size", hidden_size), ("n_inner", inner_dim)):
        if value % world_size:
            raise ValueError(f"config's {name} ({value}) must be a multiple of the world size {world_size}")


def _rank_heads(config, world_size):
    """For each rank, (first query head, query heads, first kv head, kv heads), split as
    ParallelMHA splits them: in whole groups of one kv head and its query heads."""
    n_head = config_value(config, "n_head")
    n_head_kv = num_heads_kv(config)
    queries_per_kv = n_head // n_head_kv
    kv_counts = [get_dim_for_local_rank(n_head_kv, world_size, r) for r in range(world_size)]
    kv_starts = [sum(kv_counts[:r]) for r in range(world_size)]
    return [
        (start * queries_per_kv, count * queries_per_kv, start, count)
        for start, count in zip(kv_starts, kv_counts)
    ]


def _qkv_head_blocks(config, wqkv):
    """Wqkv's weight or bias (rows (n_head + 2 * n_head_kv) * head_dim) as (q, k, v), each
    (heads, head_dim, ...)."""
    n_head, n_head_kv, head_dim = config_value(config, "n_head"), num_heads_kv(config), attention_head_dim(config)
    heads = rearrange(wqkv, "(h d) ... -> h d ...", d=head_dim)
    return heads[:n_head], heads[n_head : n_head + n_head_kv], heads[n_head + n_head_kv :]


def _gated_halves(x):
    return rearrange(x, "(two o) ... -> two o ...", two=2)


def _per_layer_keys(config, suffix):
    return [f"transformer.layers.{i}.{suffix}" for i in range(config_value(config, "num_hidden_layers"))]


def shard_state_dict_tp(state_dict, config, world_size, rank):
    """The state dict of a GPT model (GPTLMHeadModel's keys) cut down to what rank holds in a
    tensor-parallel GPTLMHeadModel over world_size ranks: vocabulary slices of the word
    embeddings and lm_head, column slices of the position embeddings, this rank's heads of Wqkv
    and out_proj, its hidden-feature slice of the MLP; out_proj's and fc2's biases stay on rank 0
    only. Modifies state_dict in place and returns it."""
    _check_tp_divisibility(config, world_size)
    q_start, q_count, kv_start, kv_count = _rank_heads(config, world_size)[rank]
    head_dim = attention_head_dim(config)

    def replace(key, shard_fn):
        if key in state_dict:
            state_dict[key] = shard_fn(state_dict[key])

    def even_rows(x):
        rows = x.shape[0] // world_size
        return x[rank * rows : (rank + 1) * rows]

    def last_dim(x):
        sizes = [get_dim_for_local_rank(x.shape[-1], world_size, r) for r in range(world_size)]
        start = sum(sizes[:rank])
        return x[..., start : start + sizes[rank]]

    def gated_rows(x):
        rows = x.shape[0] // world_size // 2
        return rearrange(_gated_halves(x)[:, rank * rows : (rank + 1) * rows], "two o ... -> (two o) ...")

    def qkv_heads(x):
        q, k, v = _qkv_head_blocks(config, x)
        local = [q[q_start : q_start + q_count], k[kv_start : kv_start + kv_count], v[kv_start : kv_start + kv_count]]
        return rearrange(torch.cat(local), "h d ... -> (h d) ...")

    def out_proj_columns(x):
        return x[..., q_start * head_dim : (q_start + q_count) * head_dim]

    replace("transformer.embeddings.word_embeddings.weight", even_rows)
    replace("lm_head.weight", even_rows)
    replace("transformer.embeddings.position_embeddings.weight", last_dim)
    gated = config.activation_function in _GATED_ACTIVATIONS
    for key in _per_layer_keys(config, "mixer.Wqkv.weight") + _per_layer_keys(config, "mixer.Wqkv.bias"):
        replace(key, qkv_heads)
    for key in _per_layer_keys(config, "mixer.out_proj.weight"):
        replace(key, out_proj_columns)
    for key in _per_layer_keys(config, "mlp.fc1.weight") + _per_layer_keys(config, "mlp.fc1.bias"):
        replace(key, gated_rows if gated else even_rows)
    for key in _per_layer_keys(config, "mlp.fc2.weight"):
        replace(key, last_dim)
    if rank != 0:
        for key in _per_layer_keys(config, "mixer.out_proj.bias") + _per_layer_keys(config, "mlp.fc2.bias"):
            state_dict.pop(key, None)
    return state_dict


def combine_state_dicts_tp(state_dicts: List[Dict[str, torch.Tensor]], config):
    """The inverse of shard_state_dict_tp: the state dict of the whole GPT model from the
    per-rank state dicts, given in rank order. The state dicts are not modified."""
    world_size = len(state_dicts)
    _check_tp_divisibility(config, world_size)
    vocab_shard = padded_vocab_size(config) // world_size
    state_dict = dict(state_dicts[0])

    def replace(key, combine_fn):
        if key in state_dict:
            state_dict[key] = combine_fn([s[key] for s in state_dicts])

    def word_embeddings(xs):
        # Vocabulary-sharded checkpoints split dim 0; some other sources split dim 1.
        return torch.cat(xs, dim=0 if xs[0].shape[0] == vocab_shard else 1)

    def gated_rows(xs):
        return rearrange(torch.cat([_gated_halves(x) for x in xs], dim=1), "two o ... -> (two o) ...")

    def qkv_heads(xs):
        head_dim = attention_head_dim(config)
        q, k, v = [], [], []
        for x, (_, q_count, _, kv_count) in zip(xs, _rank_heads(config, world_size)):
            heads = rearrange(x, "(h d) ... -> h d ...", d=head_dim)
            q.append(heads[:q_count])
            k.append(heads[q_count : q_count + kv_count])
            v.append(heads[q_count + kv_count :])
        return rearrange(torch.cat(q + k + v), "h d ... -> (h d) ...")

    replace("transformer.embeddings.word_embeddings.weight", word_embeddings)
    replace("lm_head.weight", word_embeddings)
    replace("transformer.embeddings.position_embeddings.weight", partial(torch.cat, dim=-1))
    gated = config.activation_function in _GATED_ACTIVATIONS
    for key in _per_layer_keys(config, "mixer.Wqkv.weight") + _per_layer_keys(config, "mixer.Wqkv.bias"):
        replace(key, qkv_heads)
    for key in _per_layer_keys(config, "mixer.out_proj.weight") + _per_layer_keys(config, "mlp.fc2.weight"):
        replace(key, partial(torch.cat, dim=-1))
    for key in _per_layer_keys(config, "mlp.fc1.weight") + _per_layer_keys(config, "mlp.fc1.bias"):
        replace(key, gated_rows if gated else partial(torch.cat, dim=0))
    return state_dict


# --------------------------------------------------------------------------------------------
# Checkpoint remapping
# --------------------------------------------------------------------------------------------


def remap_state_dict_hf_gpt2(state_dict, config):
    """A Hugging Face GPT2Model / GPT2LMHeadModel state dict (with or without its transformer.
    prefix) as GPTLMHeadModel's: the Conv1D weights transposed to nn.Linear's layout, the word
    embeddings padded to the padded vocabulary and tied to lm_head, the attention masks dropped."""
    state_dict = rename_keys(state_dict, (r"^transformer\.", ""))
    state_dict.pop("lm_head.weight", None)  # tied to wte
    vocab_size = padded_vocab_size(config)
    word_embeddings = pad_rows(state_dict.pop("wte.weight"), vocab_size)
    state_dict["transformer.embeddings.word_embeddings.weight"] = word_embeddings
    state_dict["lm_head.weight"] = word_embeddings
    for d in range(config_value(config, "num_hidden_layers")):
        state_dict.pop(f"h.{d}.attn.bias", None)  # GPT-2's causal mask buffer
        state_dict.pop(f"h.{d}.attn.masked_bias", None)
        # GPT-2's Conv1D stores (in_features, out_features).
        for conv in ("mlp.c_fc", "mlp.c_proj", "attn.c_attn", "attn.c_proj"):
            key = f"h.{d}.{conv}.weight"
            state_dict[key] = state_dict[key].t()
    return rename_keys(
        state_dict,
        (r"^wpe\.", "transformer.embeddings.position_embeddings."),
        (r"^ln_f\.(weight|bias)", r"transformer.ln_f.\1"),
        (r"^h\.(\d+)\.ln_(1|2)\.(weight|bias)", r"transformer.layers.\1.norm\2.\3"),
        (r"^h\.(\d+)\.mlp\.c_fc\.", r"transformer.layers.\1.mlp.fc1."),
        (r"^h\.(\d+)\.mlp\.c_proj\.", r"transformer.layers.\1.mlp.fc2."),
        (r"^h\.(\d+)\.attn\.c_attn\.", r"transformer.layers.\1.mixer.Wqkv."),
        (r"^h\.(\d+)\.attn\.c_proj\.", r"transformer.layers.\1.mixer.out_proj."),
    )


def remap_state_dict_megatron(state_dict, config):
    """A Megatron-LM GPT state dict as GPTLMHeadModel's: the word embeddings padded to a
    multiple of config.pad_vocab_size_multiple and tied to lm_head, and Wqkv's rows reordered
    from Megatron's (heads, 3, head_dim) to (3, heads, head_dim)."""
    state_dict = rename_keys(
        state_dict,
        (r"^language_model\.encoder\.", "transformer."),
        (r"^language_model\.", "transformer."),
        (r"^wpe\.", "transformer.embeddings.position_embeddings."),
    )
    word_embeddings = state_dict.pop("transformer.embedding.word_embeddings.weight")
    multiple = getattr(config, "pad_vocab_size_multiple", 1)
    vocab_size = math.ceil(word_embeddings.shape[0] / multiple) * multiple
    state_dict["transformer.embeddings.word_embeddings.weight"] = pad_rows(word_embeddings, vocab_size)
    state_dict["lm_head.weight"] = state_dict["transformer.embeddings.word_embeddings.weight"]
    state_dict = rename_keys(
        state_dict,
        (r"^transformer\.final_layernorm\.(weight|bias)", r"transformer.ln_f.\1"),
        (r"^transformer\.layers\.(\d+)\.input_layernorm\.(weight|bias)", r"transformer.layers.\1.norm1.\2"),
        (r"^transformer\.layers\.(\d+)\.post_attention_layernorm\.(weight|bias)", r"transformer.layers.\1.norm2.\2"),
        (r"^transformer\.layers\.(\d+)\.mlp\.dense_h_to_4h\.(weight|bias)", r"transformer.layers.\1.mlp.fc1.\2"),
        (r"^transformer\.layers\.(\d+)\.mlp\.dense_4h_to_h\.(weight|bias)", r"transformer.layers.\1.mlp.fc2.\2"),
        (
            r"^transformer\.layers\.(\d+)\.self_attention\.rotary_emb\.inv_freq",
            r"transformer.layers.\1.mixer.rotary_emb.inv_freq",
        ),
        (
            r"^transformer\.layers\.(\d+)\.self_attention\.query_key_value\.(weight|bias)",
            r"transformer.layers.\1.mixer.Wqkv.\2",
        ),
        (r"^transformer\.layers\.(\d+)\.self_attention\.dense\.(weight|bias)", r"transformer.layers.\1.mixer.out_proj.\2"),
    )
    head_dim = config_value(config, "hidden_size") // config_value(config, "num_attention_heads")
    for d in range(config_value(config, "num_hidden_layers")):
        for param in ("weight", "bias"):
            key = f"transformer.layers.{d}.mixer.Wqkv.{param}"
            state_dict[key] = rearrange(
                state_dict.pop(key),
                "(nheads three headdim) ... -> (three nheads headdim) ...",
                three=3,
                headdim=head_dim,
            )
    return state_dict
