"""BERT encoders built from flash_attn.modules, with the API of upstream flash-attn 2.8.3's
flash_attn.models.bert: the layer factories driven by a BertConfig-like config
(create_mixer_cls, create_mlp_cls, create_block), BertModel and BertForPreTraining with their
heads, and the Hugging Face BERT state-dict remapping both ways.

The config is any object with the attributes of transformers.BertConfig (a BertConfig itself, or
e.g. a types.SimpleNamespace), plus the optional fields upstream reads with getattr
(use_flash_attn, fused_bias_fc, fused_mlp, mlp_checkpoint_lvl, fused_dropout_add_ln,
last_layer_subset, dense_seq_output, use_xentropy, pad_vocab_size_multiple, the rotary fields).
transformers is not needed.

Padding: with use_flash_attn the encoder drops the padded tokens (flash_attn.bert_padding) and
runs the variable-length kernels on the rest; otherwise the attention masks the padded keys.
With config.last_layer_subset the last layer computes only the tokens a pretraining loss needs
(the masked tokens and each sequence's first token), as a cross-attention of those queries to
all keys.

Importing this module loads neither triton nor the CUDA extension, except where
flash_attn.modules.block finds triton installed; the Triton layer norm and cross entropy are
imported by configs that ask for them, the checkpoint loader by from_pretrained.
"""

import logging
from collections import namedtuple
from collections.abc import Sequence
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from flash_attn.bert_padding import index_first_axis, index_first_axis_residual, pad_input, unpad_input
from flash_attn.models._gpt2_config import missing_fields, padded_vocab_size
from flash_attn.models._remap import pad_rows, rename_keys
from flash_attn.modules.block import Block
from flash_attn.modules.embedding import BertEmbeddings
from flash_attn.modules.mha import MHA
from flash_attn.modules.mlp import FusedMLP, Mlp
from flash_attn.ops.fused_dense import FusedDense

__all__ = [
    "create_mixer_cls",
    "create_mlp_cls",
    "create_block",
    "BertEncoder",
    "BertPooler",
    "BertPredictionHeadTransform",
    "BertLMPredictionHead",
    "BertPreTrainingHeads",
    "BertPreTrainedModel",
    "BertModel",
    "BertForPreTraining",
    "remap_state_dict",
    "inv_remap_state_dict",
]

logger = logging.getLogger(__name__)

# Attributes read without a default, as BertConfig always has them.
_REQUIRED_CONFIG_FIELDS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
    "hidden_act", "hidden_dropout_prob", "attention_probs_dropout_prob", "max_position_embeddings",
    "type_vocab_size", "initializer_range", "layer_norm_eps", "pad_token_id",
)

_TANH_GELUS = ("gelu_new", "gelu_fast", "gelu_pytorch_tanh")
_ACTIVATIONS = ("gelu", *_TANH_GELUS)
_POSITION_EMBEDDING_TYPES = ("absolute", "rotary")

# The fields of transformers' output classes that these models fill.
BaseModelOutputWithPoolingAndCrossAttentions = namedtuple(
    "BaseModelOutputWithPoolingAndCrossAttentions", ["last_hidden_state", "pooler_output"]
)
BertForPreTrainingOutput = namedtuple(
    "BertForPreTrainingOutput", ["loss", "prediction_logits", "seq_relationship_logits"]
)


def _check_config(config):
    missing = missing_fields(config, _REQUIRED_CONFIG_FIELDS)
    if missing:
        raise TypeError(
            f"config must have the attributes of transformers.BertConfig; {type(config).__name__} "
            f"lacks {missing}"
        )
    if config.hidden_act not in _ACTIVATIONS:
        raise ValueError(f"config.hidden_act must be one of {_ACTIVATIONS}, got {config.hidden_act!r}")
    position_embedding_type = getattr(config, "position_embedding_type", "absolute")
    if position_embedding_type not in _POSITION_EMBEDDING_TYPES:
        raise ValueError(
            f"config.position_embedding_type must be one of {_POSITION_EMBEDDING_TYPES}, got "
            f"{position_embedding_type!r}"
        )


def _gelu_approximation(config):
    return "tanh" if config.hidden_act in _TANH_GELUS else "none"


def _linear_cls(config):
    return FusedDense if getattr(config, "fused_bias_fc", False) else nn.Linear


def _triton_layer_norm_fn():
    from flash_attn.ops.triton.layer_norm import layer_norm_fn

    return layer_norm_fn


def _layer_norm(x, norm, fused):
    """norm(x), through the Triton layer norm kernel when fused (config.fused_dropout_add_ln)."""
    if not fused:
        return norm(x)
    return _triton_layer_norm_fn()(x, norm.weight, norm.bias, eps=norm.eps)


def _is_subset_layer(config, layer_idx):
    """Whether layer layer_idx computes only a subset of the tokens (config.last_layer_subset:
    the last layer, as a cross-attention)."""
    return getattr(config, "last_layer_subset", False) and layer_idx == config.num_hidden_layers - 1


def create_mixer_cls(config, cross_attn=False, return_residual=False):
    """The attention class as a partial of MHA taking the model width: bidirectional, with the
    config's heads, dropout, flash-attention choice and (position_embedding_type "rotary") rotary
    embedding."""
    rotary_kwargs = {}
    if getattr(config, "position_embedding_type", "absolute") == "rotary":
        rotary_kwargs = dict(
            rotary_emb_dim=getattr(config, "rotary_emb_dim", config.hidden_size // config.num_attention_heads),
            rotary_emb_base=getattr(config, "rotary_emb_base", 10000.0),
            rotary_emb_scale_base=getattr(config, "rotary_emb_scale_base", None),
            rotary_emb_interleaved=getattr(config, "rotary_emb_interleaved", False),
        )
    return partial(
        MHA,
        num_heads=config.num_attention_heads,
        cross_attn=cross_attn,
        dropout=config.attention_probs_dropout_prob,
        causal=False,
        fused_bias_fc=getattr(config, "fused_bias_fc", False),
        use_flash_attn=getattr(config, "use_flash_attn", False),
        return_residual=return_residual,
        **rotary_kwargs,
    )


def create_mlp_cls(config, layer_idx=None, return_residual=False):
    """The MLP class as a partial taking the model width: Mlp with config.hidden_act's GELU, or
    with config.fused_mlp FusedMLP (tanh GELU only) at config.mlp_checkpoint_lvl (one level, or
    a sequence of one per layer)."""
    if not getattr(config, "fused_mlp", False):
        return partial(
            Mlp,
            hidden_features=config.intermediate_size,
            activation=partial(F.gelu, approximate=_gelu_approximation(config)),
            return_residual=return_residual,
        )
    if config.hidden_act not in _TANH_GELUS:
        raise ValueError(f"config.fused_mlp needs hidden_act in {_TANH_GELUS}, got {config.hidden_act!r}")
    checkpoint_lvl = getattr(config, "mlp_checkpoint_lvl", 0)
    if isinstance(checkpoint_lvl, Sequence):
        if layer_idx is None:
            raise ValueError("a per-layer config.mlp_checkpoint_lvl needs a layer_idx")
        checkpoint_lvl = checkpoint_lvl[layer_idx]
    return partial(
        FusedMLP,
        hidden_features=config.intermediate_size,
        checkpoint_lvl=checkpoint_lvl,
        return_residual=return_residual,
    )


def create_block(config, layer_idx=None):
    """Encoder layer layer_idx: a post-norm Block of the classes create_mixer_cls and
    create_mlp_cls return. The last layer under config.last_layer_subset is a cross-attention
    block whose mixer and MLP add their own inputs back (no return_residual): its queries are
    the subset, its keys all tokens."""
    cross_attn = _is_subset_layer(config, layer_idx)
    return_residual = not cross_attn
    return Block(
        config.hidden_size,
        create_mixer_cls(config, cross_attn, return_residual=return_residual),
        create_mlp_cls(config, layer_idx, return_residual=return_residual),
        norm_cls=partial(nn.LayerNorm, eps=config.layer_norm_eps),
        prenorm=False,
        resid_dropout1=config.hidden_dropout_prob,
        resid_dropout2=config.hidden_dropout_prob,
        fused_dropout_add_ln=getattr(config, "fused_dropout_add_ln", False),
        return_residual=return_residual,
    )


def _init_weights(module, initializer_range=0.02):
    """BERT's initialization (as Hugging Face's BertPreTrainedModel._init_weights): normal
    weights, zero biases, a zero padding embedding."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=initializer_range)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=initializer_range)
        if module.padding_idx is not None:
            nn.init.zeros_(module.weight[module.padding_idx])


def _cumulative_seqlens(mask):
    """The (batch + 1,) int32 cumulative counts of mask's True entries per row."""
    return F.pad(torch.cumsum(mask.sum(dim=-1, dtype=torch.int32), dim=0, dtype=torch.int32), (1, 0))


class BertEncoder(nn.Module):
    """config.num_hidden_layers blocks of create_block."""

    def __init__(self, config):
        super().__init__()
        self.use_flash_attn = getattr(config, "use_flash_attn", False)
        self.layers = nn.ModuleList([create_block(config, layer_idx=i) for i in range(config.num_hidden_layers)])

    def forward(self, hidden_states, key_padding_mask=None, subset_mask=None):
        """
        hidden_states: (batch, seqlen, hidden_size).
        key_padding_mask: bool (batch, seqlen), True for the tokens to keep.
        subset_mask: bool (batch, seqlen): compute the last layer for these tokens only.
        Returns (batch, seqlen, hidden_size), or without a subset_mask, or with one the
        (num_selected, hidden_size) rows of the selected tokens, in row-major order (those of
        the subset that key_padding_mask keeps, on the unpadded path).
        """
        if key_padding_mask is None or not self.use_flash_attn:
            mixer_kwargs = {"key_padding_mask": key_padding_mask} if key_padding_mask is not None else None
            for layer in self.layers:
                hidden_states = layer(hidden_states, mixer_kwargs=mixer_kwargs)
            return hidden_states if subset_mask is None else hidden_states[subset_mask]

        batch, seqlen = hidden_states.shape[:2]
        hidden_states, indices, cu_seqlens, max_seqlen, _ = unpad_input(hidden_states, key_padding_mask)
        mixer_kwargs = {"cu_seqlens": cu_seqlens, "max_seqlen": max_seqlen}
        if subset_mask is None:
            for layer in self.layers:
                hidden_states = layer(hidden_states, mixer_kwargs=mixer_kwargs)
            return pad_input(hidden_states, indices, batch, seqlen)

        for layer in self.layers[:-1]:
            hidden_states = layer(hidden_states, mixer_kwargs=mixer_kwargs)
        subset_idx = torch.nonzero(subset_mask[key_padding_mask], as_tuple=False).flatten()
        hidden_states_subset, hidden_states = index_first_axis_residual(hidden_states, subset_idx)
        # The subset's queries attend to all kept tokens of their sequence; max_seqlen bounds
        # both (a loose bound for the queries is fine).
        last_layer_kwargs = {
            "x_kv": hidden_states,
            "cu_seqlens": _cumulative_seqlens(subset_mask & key_padding_mask),
            "max_seqlen": max_seqlen,
            "cu_seqlens_k": cu_seqlens,
            "max_seqlen_k": max_seqlen,
        }
        return self.layers[-1](hidden_states_subset, mixer_kwargs=last_layer_kwargs)


class BertPooler(nn.Module):
    """tanh(dense(first token's hidden state))."""

    def __init__(self, config):
        super().__init__()
        self.dense = _linear_cls(config)(config.hidden_size, config.hidden_size)
        self.activation = nn.Tanh()

    def forward(self, hidden_states, pool=True):
        """hidden_states: (batch, seqlen, hidden_size), or with pool=False the (batch,
        hidden_size) first tokens themselves."""
        first_token_tensor = hidden_states[:, 0] if pool else hidden_states
        return self.activation(self.dense(first_token_tensor))


class BertPredictionHeadTransform(nn.Module):
    """layer_norm(gelu(dense(x)))."""

    def __init__(self, config):
        super().__init__()
        self.fused_dropout_add_ln = getattr(config, "fused_dropout_add_ln", False)
        self.dense = _linear_cls(config)(config.hidden_size, config.hidden_size)
        self.transform_act_fn = nn.GELU(approximate=_gelu_approximation(config))
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, hidden_states):
        hidden_states = self.transform_act_fn(self.dense(hidden_states))
        return _layer_norm(hidden_states, self.layer_norm, self.fused_dropout_add_ln)


class BertLMPredictionHead(nn.Module):
    """Masked-LM logits: the transform, then decoder (padded vocab_size outputs, with bias),
    whose weight BertForPreTraining ties to the word embeddings."""

    def __init__(self, config):
        super().__init__()
        self.transform = BertPredictionHeadTransform(config)
        self.decoder = _linear_cls(config)(config.hidden_size, padded_vocab_size(config), bias=True)

    def forward(self, hidden_states):
        return self.decoder(self.transform(hidden_states))


class BertPreTrainingHeads(nn.Module):
    """The masked-LM head on the sequence output and the next-sentence head on the pooled one."""

    def __init__(self, config):
        super().__init__()
        self.predictions = BertLMPredictionHead(config)
        self.seq_relationship = nn.Linear(config.hidden_size, 2)

    def forward(self, sequence_output, pooled_output):
        return self.predictions(sequence_output), self.seq_relationship(pooled_output)


class BertPreTrainedModel(nn.Module):
    """Base of the BERT models: keeps the config and loads pretrained checkpoints."""

    def __init__(self, config, *inputs, **kwargs):
        super().__init__()
        _check_config(config)
        self.config = config

    @classmethod
    def from_pretrained(cls, model_name, config, *inputs, **kwargs):
        """cls(config, *inputs, **kwargs) with the weights of the Hugging Face BERT checkpoint
        model_name (a Hub id or local folder), remapped by remap_state_dict and loaded
        non-strictly (a BertModel takes the bert.* part of a pretraining checkpoint)."""
        from flash_attn.utils.pretrained import state_dict_from_pretrained

        model = cls(config, *inputs, **kwargs)
        load_return = model.load_state_dict(
            remap_state_dict(state_dict_from_pretrained(model_name), config), strict=False
        )
        logger.info(load_return)
        return model


class BertModel(BertPreTrainedModel):
    """Embeddings, their layer norm and dropout, the encoder and (add_pooling_layer) the pooler;
    forward returns BaseModelOutputWithPoolingAndCrossAttentions(last_hidden_state,
    pooler_output). The word embeddings have config.vocab_size rounded up to
    config.pad_vocab_size_multiple rows."""

    def __init__(self, config, add_pooling_layer=True):
        super().__init__(config)
        self.pad_vocab_size_multiple = getattr(config, "pad_vocab_size_multiple", 1)
        self.fused_dropout_add_ln = getattr(config, "fused_dropout_add_ln", False)
        self.embeddings = BertEmbeddings(
            config.hidden_size,
            padded_vocab_size(config),
            config.max_position_embeddings,
            config.type_vocab_size,
            padding_idx=config.pad_token_id,
        )
        self.emb_drop = nn.Dropout(config.hidden_dropout_prob)
        self.emb_ln = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.encoder = BertEncoder(config)
        self.pooler = BertPooler(config) if add_pooling_layer else None
        self.apply(partial(_init_weights, initializer_range=config.initializer_range))

    def forward(self, input_ids, position_ids=None, token_type_ids=None, attention_mask=None, masked_tokens_mask=None):
        """
        input_ids, position_ids, token_type_ids: (batch, seqlen).
        attention_mask: (batch, seqlen), nonzero / True for the tokens to keep.
        masked_tokens_mask: bool (batch, seqlen) (BertForPreTraining with last_layer_subset): the
            last layer computes only these tokens and each sequence's first one;
            last_hidden_state is then the (num_masked, hidden_size) rows of the masked tokens
            (kept by attention_mask) in row-major order, and the pooler reads the first tokens.
        """
        if attention_mask is not None:
            attention_mask = attention_mask.bool()
        hidden_states = self.embeddings(input_ids, position_ids=position_ids, token_type_ids=token_type_ids)
        # BERT normalizes the embeddings before their dropout.
        hidden_states = self.emb_drop(_layer_norm(hidden_states, self.emb_ln, self.fused_dropout_add_ln))

        if masked_tokens_mask is None:
            sequence_output = self.encoder(hidden_states, key_padding_mask=attention_mask)
            pooled_output = self.pooler(sequence_output) if self.pooler is not None else None
            return BaseModelOutputWithPoolingAndCrossAttentions(sequence_output, pooled_output)

        # The pooler needs each sequence's first token.
        first_col_mask = torch.zeros_like(masked_tokens_mask, dtype=torch.bool)
        first_col_mask[:, 0] = True
        subset_mask = masked_tokens_mask | first_col_mask
        subset_output = self.encoder(hidden_states, key_padding_mask=attention_mask, subset_mask=subset_mask)
        # subset_output's rows are the subset's tokens (those attention_mask keeps); pick the
        # first and the masked ones among them.
        kept = attention_mask if attention_mask is not None else torch.ones_like(subset_mask)
        in_subset = subset_mask[kept]
        pool_input = subset_output[first_col_mask[kept][in_subset]]
        sequence_output = subset_output[masked_tokens_mask[kept][in_subset]]
        pooled_output = self.pooler(pool_input, pool=False) if self.pooler is not None else None
        return BaseModelOutputWithPoolingAndCrossAttentions(sequence_output, pooled_output)


class BertForPreTraining(BertPreTrainedModel):
    """BertModel with the masked-LM and next-sentence heads (the masked-LM decoder tied to the
    word embeddings); forward returns BertForPreTrainingOutput(loss, prediction_logits,
    seq_relationship_logits).

    config.dense_seq_output: with labels, the masked-LM head runs on the masked tokens only
    (prediction_logits is (num_masked, vocab)). config.last_layer_subset (needs
    dense_seq_output): the last encoder layer computes only those tokens and the first ones.
    config.use_xentropy: the losses are flash_attn.losses.cross_entropy.CrossEntropyLoss
    (Triton) instead of torch.nn.CrossEntropyLoss.
    """

    def __init__(self, config):
        super().__init__(config)
        self.dense_seq_output = getattr(config, "dense_seq_output", False)
        self.last_layer_subset = getattr(config, "last_layer_subset", False)
        if self.last_layer_subset and not self.dense_seq_output:
            raise ValueError("config.last_layer_subset needs config.dense_seq_output=True")
        if getattr(config, "use_xentropy", False):
            from flash_attn.losses.cross_entropy import CrossEntropyLoss

            loss_cls = partial(CrossEntropyLoss, inplace_backward=True)
        else:
            loss_cls = nn.CrossEntropyLoss
        self.bert = BertModel(config)
        self.cls = BertPreTrainingHeads(config)
        # Label 0 (BERT's [PAD]) marks the unmasked tokens; -1 a missing next-sentence label.
        self.mlm_loss = loss_cls(ignore_index=0)
        self.nsp_loss = loss_cls(ignore_index=-1)
        self.apply(partial(_init_weights, initializer_range=config.initializer_range))
        self.tie_weights()

    def tie_weights(self):
        self.cls.predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight

    def forward(self, input_ids, position_ids=None, token_type_ids=None, attention_mask=None, labels=None,
                next_sentence_label=None):
        """
        labels: (batch, seqlen) masked-LM targets, 0 for the tokens not masked out.
        next_sentence_label: (batch,) next-sentence targets.
        loss is the sum of the two losses when both labels are given, else None; the logits are
        (batch, seqlen, vocab) and (batch, 2), or with dense_seq_output and labels
        (num_masked, vocab).
        """
        dense = self.dense_seq_output and labels is not None
        masked_tokens_mask = labels > 0 if (self.last_layer_subset and labels is not None) else None
        outputs = self.bert(
            input_ids,
            position_ids=position_ids,
            token_type_ids=token_type_ids,
            attention_mask=attention_mask,
            masked_tokens_mask=masked_tokens_mask,
        )
        sequence_output, pooled_output = outputs.last_hidden_state, outputs.pooler_output
        if dense:
            masked_token_idx = torch.nonzero(labels.flatten() > 0, as_tuple=False).flatten()
            if not self.last_layer_subset:
                sequence_output = index_first_axis(rearrange(sequence_output, "b s d -> (b s) d"), masked_token_idx)
        prediction_scores, seq_relationship_score = self.cls(sequence_output, pooled_output)

        total_loss = None
        if labels is not None and next_sentence_label is not None:
            if dense:
                masked_lm_loss = self.mlm_loss(prediction_scores, labels.flatten()[masked_token_idx])
            else:
                masked_lm_loss = self.mlm_loss(
                    rearrange(prediction_scores, "... v -> (...) v"), rearrange(labels, "... -> (...)")
                )
            next_sentence_loss = self.nsp_loss(
                rearrange(seq_relationship_score, "... t -> (...) t"),
                rearrange(next_sentence_label, "... -> (...)"),
            )
            total_loss = masked_lm_loss.float() + next_sentence_loss.float()
        return BertForPreTrainingOutput(total_loss, prediction_scores, seq_relationship_score)


# Hugging Face BERT names and this module's, for the keys that only change name. The optional
# "bert." group carries a BertForPreTraining's prefix and is absent from a BertModel's keys.
_HF_TO_FLASH_KEYS = (
    (r"LayerNorm\.gamma$", "LayerNorm.weight"),
    (r"LayerNorm\.beta$", "LayerNorm.bias"),
    (r"^(bert\.)?encoder\.layer\.", r"\1encoder.layers."),
    (r"^(bert\.)?embeddings\.LayerNorm\.", r"\1emb_ln."),
    (r"^(bert\.)?encoder\.layers\.(\d+)\.attention\.output\.LayerNorm\.", r"\1encoder.layers.\2.norm1."),
    (r"^(bert\.)?encoder\.layers\.(\d+)\.output\.LayerNorm\.", r"\1encoder.layers.\2.norm2."),
    (r"^cls\.predictions\.transform\.LayerNorm\.", "cls.predictions.transform.layer_norm."),
    (r"^(bert\.)?encoder\.layers\.(\d+)\.intermediate\.dense\.", r"\1encoder.layers.\2.mlp.fc1."),
    (r"^(bert\.)?encoder\.layers\.(\d+)\.output\.dense\.", r"\1encoder.layers.\2.mlp.fc2."),
    (r"^(bert\.)?encoder\.layers\.(\d+)\.attention\.output\.dense\.", r"\1encoder.layers.\2.mixer.out_proj."),
    (r"^cls\.predictions\.bias$", "cls.predictions.decoder.bias"),
)

_FLASH_TO_HF_KEYS = (
    (r"^(bert\.)?emb_ln\.", r"\1embeddings.LayerNorm."),
    (r"^(bert\.)?encoder\.layers\.(\d+)\.norm1\.", r"\1encoder.layers.\2.attention.output.LayerNorm."),
    (r"^(bert\.)?encoder\.layers\.(\d+)\.norm2\.", r"\1encoder.layers.\2.output.LayerNorm."),
    (r"^cls\.predictions\.transform\.layer_norm\.", "cls.predictions.transform.LayerNorm."),
    (r"^(bert\.)?encoder\.layers\.(\d+)\.mlp\.fc1\.", r"\1encoder.layers.\2.intermediate.dense."),
    (r"^(bert\.)?encoder\.layers\.(\d+)\.mlp\.fc2\.", r"\1encoder.layers.\2.output.dense."),
    (r"^(bert\.)?encoder\.layers\.(\d+)\.mixer\.out_proj\.", r"\1encoder.layers.\2.attention.output.dense."),
    (r"^(bert\.)?encoder\.layers\.", r"\1encoder.layer."),
    (r"^cls\.predictions\.decoder\.bias$", "cls.predictions.bias"),
)

_VOCAB_KEYS = ("embeddings.word_embeddings.weight", "cls.predictions.decoder.weight", "cls.predictions.decoder.bias")


def _model_prefix(state_dict):
    """ "bert." for a pretraining model's state dict, "" for a BertModel's."""
    return "bert." if any(key.startswith("bert.") for key in state_dict) else ""


def _vocab_key(name, prefix):
    return name if name.startswith("cls.") else prefix + name


def remap_state_dict(state_dict, config):
    """A Hugging Face BertForPreTraining (or BertModel) state dict as this module's models':
    query / key / value concatenated into Wqkv (or, in the last layer under
    config.last_layer_subset, Wq and Wkv), the norms and MLP renamed, old gamma / beta norm names
    read as weight / bias, and the word embeddings and masked-LM decoder padded to the padded
    vocabulary (padded decoder biases -100, so the padding is never predicted)."""
    state_dict = rename_keys(state_dict, *_HF_TO_FLASH_KEYS)
    prefix = _model_prefix(state_dict)
    for layer in range(config.num_hidden_layers):
        attention = f"{prefix}encoder.layers.{layer}.attention.self"
        mixer = f"{prefix}encoder.layers.{layer}.mixer"
        for param in ("weight", "bias"):
            q, k, v = (state_dict.pop(f"{attention}.{name}.{param}") for name in ("query", "key", "value"))
            if _is_subset_layer(config, layer):
                state_dict[f"{mixer}.Wq.{param}"] = q
                state_dict[f"{mixer}.Wkv.{param}"] = torch.cat([k, v], dim=0)
            else:
                state_dict[f"{mixer}.Wqkv.{param}"] = torch.cat([q, k, v], dim=0)
    vocab_size = padded_vocab_size(config)
    for name in _VOCAB_KEYS:
        key = _vocab_key(name, prefix)
        if key in state_dict:
            fill = -100.0 if name == "cls.predictions.decoder.bias" else 0.0
            state_dict[key] = pad_rows(state_dict[key], vocab_size, value=fill)
    return state_dict


def inv_remap_state_dict(state_dict, config):
    """The inverse of remap_state_dict: this module's state dict as Hugging Face BERT's, the
    vocabulary cut back to config.orig_vocab_size (default config.vocab_size)."""
    state_dict = dict(state_dict)
    prefix = _model_prefix(state_dict)
    orig_vocab_size = getattr(config, "orig_vocab_size", config.vocab_size)
    for name in _VOCAB_KEYS:
        key = _vocab_key(name, prefix)
        if key in state_dict:
            state_dict[key] = state_dict[key][:orig_vocab_size]
    for layer in range(config.num_hidden_layers):
        attention = f"{prefix}encoder.layers.{layer}.attention.self"
        mixer = f"{prefix}encoder.layers.{layer}.mixer"
        for param in ("weight", "bias"):
            if _is_subset_layer(config, layer):
                q = state_dict.pop(f"{mixer}.Wq.{param}")
                k, v = state_dict.pop(f"{mixer}.Wkv.{param}").chunk(2, dim=0)
            else:
                q, k, v = state_dict.pop(f"{mixer}.Wqkv.{param}").chunk(3, dim=0)
            for name, tensor in zip(("query", "key", "value"), (q, k, v)):
                state_dict[f"{attention}.{name}.{param}"] = tensor
    return rename_keys(state_dict, *_FLASH_TO_HF_KEYS)
