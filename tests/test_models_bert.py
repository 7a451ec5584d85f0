"""flash_attn.models.bert on CPU, float32, PyTorch attention: tiny random Hugging Face BERT models
loaded through remap_state_dict give the same hidden states, pooled output and logits (with
padded rows); the unpadded FlashAttention path and last_layer_subset compute the same tokens;
remap_state_dict and inv_remap_state_dict are inverses.

The unpadded path runs the variable-length kernels; on CPU they are replaced by a per-sequence
PyTorch attention, which checks the unpadding and subset indexing around them.
"""

import math
import types

import pytest
import torch

import flash_attn.modules.mha as mha_module
from flash_attn.models.bert import BertForPreTraining, BertModel, inv_remap_state_dict, remap_state_dict

VOCAB = 50


def bert_config(**overrides):
    transformers = pytest.importorskip("transformers")
    fields = dict(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return transformers.BertConfig(**{**fields, **overrides})


def plain_config(**overrides):
    """A BertConfig's fields on a plain object (no transformers needed)."""
    fields = dict(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        hidden_act="gelu", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, max_position_embeddings=16,
        type_vocab_size=2, initializer_range=0.02, layer_norm_eps=1e-12, pad_token_id=0,
    )
    return types.SimpleNamespace(**{**fields, **overrides})


def batch_inputs():
    input_ids = torch.randint(1, VOCAB, (3, 10))
    token_type_ids = torch.randint(0, 2, (3, 10))
    attention_mask = torch.ones(3, 10, dtype=torch.long)
    attention_mask[1, 6:] = 0
    attention_mask[2, 3:] = 0
    return input_ids, token_type_ids, attention_mask


def masked_lm_labels(attention_mask):
    labels = torch.randint(1, VOCAB, attention_mask.shape)
    chosen = (torch.rand(attention_mask.shape) < 0.4) & attention_mask.bool()
    chosen[:, 0] = False
    chosen[0, 1] = True  # at least one masked token
    return torch.where(chosen, labels, torch.zeros_like(labels))


def test_hf_bert_model_outputs():
    transformers = pytest.importorskip("transformers")
    config = bert_config()
    hf_model = transformers.BertModel(config).eval()
    model = BertModel(config).eval()
    model.load_state_dict(remap_state_dict(hf_model.state_dict(), config))
    input_ids, token_type_ids, attention_mask = batch_inputs()
    with torch.no_grad():
        expected = hf_model(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        out = model(input_ids, token_type_ids=token_type_ids, attention_mask=attention_mask)
    kept = attention_mask.bool()
    torch.testing.assert_close(out.last_hidden_state[kept], expected.last_hidden_state[kept], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.pooler_output, expected.pooler_output, rtol=1e-5, atol=1e-5)


def test_hf_bert_for_pretraining_logits_with_padded_vocab():
    transformers = pytest.importorskip("transformers")
    config = bert_config()
    hf_model = transformers.BertForPreTraining(config).eval()
    config.pad_vocab_size_multiple = 8
    model = BertForPreTraining(config).eval()
    model.load_state_dict(remap_state_dict(hf_model.state_dict(), config))
    input_ids, token_type_ids, attention_mask = batch_inputs()
    with torch.no_grad():
        expected = hf_model(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        out = model(input_ids, token_type_ids=token_type_ids, attention_mask=attention_mask)
    kept = attention_mask.bool()
    assert out.prediction_logits.shape == (3, 10, 56)
    torch.testing.assert_close(
        out.prediction_logits[..., :VOCAB][kept], expected.prediction_logits[kept], rtol=1e-5, atol=1e-5
    )
    assert (out.prediction_logits[..., VOCAB:] < -50).all(), "padded vocabulary entries must not be predicted"
    torch.testing.assert_close(out.seq_relationship_logits, expected.seq_relationship_logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("last_layer_subset", [False, True])
def test_remap_round_trip(last_layer_subset):
    transformers = pytest.importorskip("transformers")
    config = bert_config()
    hf_state_dict = transformers.BertForPreTraining(config).state_dict()
    config.pad_vocab_size_multiple = 8
    config.last_layer_subset = last_layer_subset
    config.dense_seq_output = True
    remapped = remap_state_dict(hf_state_dict, config)
    BertForPreTraining(config).load_state_dict(remapped)
    restored = inv_remap_state_dict(remapped, config)
    # Hugging Face stores the decoder bias twice (tied); the checkpoints and the inverse keep
    # only cls.predictions.bias.
    assert set(restored) == set(hf_state_dict) - {"cls.predictions.decoder.bias"}
    for key, value in restored.items():
        torch.testing.assert_close(value, hf_state_dict[key], rtol=0, atol=0, msg=key)


def test_remap_reads_old_gamma_beta_names():
    transformers = pytest.importorskip("transformers")
    config = bert_config()
    state_dict = transformers.BertModel(config).state_dict()
    old_names = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
                 for k, v in state_dict.items()}
    BertModel(config, add_pooling_layer=True).load_state_dict(remap_state_dict(old_names, config))


def test_last_layer_subset_computes_the_masked_tokens():
    config = plain_config()
    full = BertForPreTraining(config).eval()
    subset = BertForPreTraining(plain_config(last_layer_subset=True, dense_seq_output=True)).eval()
    # The last layer's Wqkv splits into Wq and Wkv under last_layer_subset.
    subset.load_state_dict(remap_state_dict(inv_remap_state_dict(full.state_dict(), config), subset.config))
    input_ids, token_type_ids, attention_mask = batch_inputs()
    labels = masked_lm_labels(attention_mask)
    next_sentence_label = torch.tensor([0, 1, -1])
    with torch.no_grad():
        expected = full(input_ids, None, token_type_ids, attention_mask, labels, next_sentence_label)
        out = subset(input_ids, None, token_type_ids, attention_mask, labels, next_sentence_label)
    masked = labels > 0
    torch.testing.assert_close(out.prediction_logits, expected.prediction_logits[masked], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.seq_relationship_logits, expected.seq_relationship_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss, expected.loss, rtol=1e-5, atol=1e-5)


def _varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale):
    """Bidirectional attention of each sequence's queries to its keys, sequence by sequence."""
    out = torch.empty_like(q)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    for i in range(len(cu_seqlens_q) - 1):
        qs, qe, ks, ke = cu_seqlens_q[i], cu_seqlens_q[i + 1], cu_seqlens_k[i], cu_seqlens_k[i + 1]
        scores = torch.einsum("qhd,khd->hqk", q[qs:qe], k[ks:ke]) * scale
        out[qs:qe] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v[ks:ke])
    return out


@pytest.fixture
def cpu_varlen_kernels(monkeypatch):
    """The variable-length FlashAttention functions MHA calls, as _varlen_attention (float32, CPU)."""

    def qkvpacked(qkv, cu_seqlens, max_seqlen, dropout_p, softmax_scale=None, **options):
        return _varlen_attention(*qkv.unbind(1), cu_seqlens, cu_seqlens, softmax_scale)

    def kvpacked(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale=None,
                 **options):
        return _varlen_attention(q, *kv.unbind(1), cu_seqlens_q, cu_seqlens_k, softmax_scale)

    monkeypatch.setattr(mha_module, "flash_attn_varlen_qkvpacked_func", qkvpacked)
    monkeypatch.setattr(mha_module, "flash_attn_varlen_kvpacked_func", kvpacked)
    monkeypatch.setattr(mha_module, "_check_flash_dtype", lambda name, tensor: None)


@pytest.mark.parametrize("last_layer_subset", [False, True])
def test_unpadded_flash_path_matches_padded(cpu_varlen_kernels, last_layer_subset):
    options = dict(last_layer_subset=last_layer_subset, dense_seq_output=last_layer_subset)
    padded = BertForPreTraining(plain_config(**options)).eval()
    unpadded = BertForPreTraining(plain_config(use_flash_attn=True, **options)).eval()
    unpadded.load_state_dict(padded.state_dict())
    input_ids, token_type_ids, attention_mask = batch_inputs()
    labels = masked_lm_labels(attention_mask)
    next_sentence_label = torch.tensor([0, 1, 1])
    with torch.no_grad():
        expected = padded(input_ids, None, token_type_ids, attention_mask, labels, next_sentence_label)
        out = unpadded(input_ids, None, token_type_ids, attention_mask, labels, next_sentence_label)
    kept = attention_mask.bool()
    if last_layer_subset:
        torch.testing.assert_close(out.prediction_logits, expected.prediction_logits, rtol=1e-5, atol=1e-5)
    else:
        torch.testing.assert_close(out.prediction_logits[kept], expected.prediction_logits[kept], rtol=1e-5, atol=1e-5)
        assert (out.prediction_logits[~kept] == padded.cls.predictions(torch.zeros(32))).all()
    torch.testing.assert_close(out.seq_relationship_logits, expected.seq_relationship_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss, expected.loss, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dense_seq_output", [False, True])
def test_forward_backward(dense_seq_output):
    model = BertForPreTraining(plain_config(dense_seq_output=dense_seq_output, hidden_dropout_prob=0.1))
    input_ids, token_type_ids, attention_mask = batch_inputs()
    labels = masked_lm_labels(attention_mask)
    out = model(input_ids, None, token_type_ids, attention_mask, labels, torch.tensor([0, 1, 1]))
    out.loss.backward()
    word_embeddings = model.bert.embeddings.word_embeddings.weight
    assert model.cls.predictions.decoder.weight is word_embeddings
    assert word_embeddings.grad is not None and torch.isfinite(word_embeddings.grad).all()
    assert all(p.grad is not None for p in model.parameters())


def test_config_errors_name_the_field():
    with pytest.raises(TypeError, match="layer_norm_eps"):
        BertModel(types.SimpleNamespace(**{k: v for k, v in vars(plain_config()).items() if k != "layer_norm_eps"}))
    with pytest.raises(ValueError, match="hidden_act"):
        BertModel(plain_config(hidden_act="relu"))
    with pytest.raises(ValueError, match="position_embedding_type"):
        BertModel(plain_config(position_embedding_type="relative_key"))
    with pytest.raises(ValueError, match="dense_seq_output"):
        BertForPreTraining(plain_config(last_layer_subset=True))
    with pytest.raises(ValueError, match="fused_mlp"):
        BertModel(plain_config(fused_mlp=True))


def test_fused_dense_and_mlp_match_the_plain_layers():
    plain = BertForPreTraining(plain_config(hidden_act="gelu_new")).eval()
    fused = BertForPreTraining(
        plain_config(hidden_act="gelu_new", fused_bias_fc=True, fused_mlp=True, mlp_checkpoint_lvl=[0, 1])
    ).eval()
    fused.load_state_dict(plain.state_dict())
    input_ids, token_type_ids, attention_mask = batch_inputs()
    with torch.no_grad():
        expected = plain(input_ids, None, token_type_ids, attention_mask)
        out = fused(input_ids, None, token_type_ids, attention_mask)
    torch.testing.assert_close(out.prediction_logits, expected.prediction_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.seq_relationship_logits, expected.seq_relationship_logits, rtol=1e-5, atol=1e-5)
