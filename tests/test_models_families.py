"""The checkpoint families of flash_attn.models (OPT, GPT-NeoX, GPT-J, Falcon, BigCode, BTLM,
Baichuan) on CPU, float32, PyTorch attention: tiny random Hugging Face models loaded into
GPTLMHeadModel through the remapping give the same logits. BTLM and Baichuan need remote code,
so their remapping is checked on synthetic state dicts of their keys and shapes.

Rotary runs the Triton kernel: those families only under TRITON_INTERPRET=1 (or on a GPU).
"""

import os

import pytest
import torch

from flash_attn.models.gpt import GPTLMHeadModel

TRITON_DEVICE = "cuda" if torch.cuda.is_available() else ("cpu" if os.environ.get("TRITON_INTERPRET") == "1" else None)
requires_triton_device = pytest.mark.skipif(
    TRITON_DEVICE is None, reason="rotary runs a Triton kernel: needs a CUDA GPU or TRITON_INTERPRET=1"
)


def assert_same_logits(model, hf_model, vocab_size, device="cpu"):
    input_ids = torch.randint(0, vocab_size, (2, 12))
    with torch.no_grad():
        expected = hf_model(input_ids).logits
        logits = model.to(device)(input_ids.to(device)).logits.cpu()
    torch.testing.assert_close(logits[..., :vocab_size], expected, rtol=1e-4, atol=1e-4)


def load_remapped(config, hf_model, remap):
    model = GPTLMHeadModel(config).eval()
    model.load_state_dict(remap(hf_model.state_dict(), config))
    return model


# ------------------------------------------------------------------------------------------
# OPT
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [dict(), dict(do_layer_norm_before=False, word_embed_proj_dim=32), dict(enable_bias=False)],
    ids=["prenorm", "350m-style", "no-bias"],
)
def test_hf_opt_logits(overrides):
    transformers = pytest.importorskip("transformers")
    from flash_attn.models.opt import opt_config_to_gpt2_config, remap_state_dict_hf_opt

    opt_config = transformers.OPTConfig(
        vocab_size=100, hidden_size=64, num_hidden_layers=2, ffn_dim=128, max_position_embeddings=32,
        num_attention_heads=4, dropout=0.0, pad_token_id=1, bos_token_id=0, eos_token_id=0, **overrides,
    )
    hf_model = transformers.OPTForCausalLM(opt_config).eval()
    config = opt_config_to_gpt2_config(opt_config)
    config.pad_vocab_size_multiple = 8
    assert_same_logits(load_remapped(config, hf_model, remap_state_dict_hf_opt), hf_model, 100)


def test_opt_config_rejects_what_has_no_equivalent():
    transformers = pytest.importorskip("transformers")
    from flash_attn.models.opt import opt_config_to_gpt2_config

    with pytest.raises(ValueError, match="layerdrop"):
        opt_config_to_gpt2_config(transformers.OPTConfig(layerdrop=0.1))
    with pytest.raises(ValueError, match="layer_norm_elementwise_affine"):
        opt_config_to_gpt2_config(transformers.OPTConfig(layer_norm_elementwise_affine=False))


# ------------------------------------------------------------------------------------------
# GPT-NeoX, GPT-J, Falcon (rotary)
# ------------------------------------------------------------------------------------------


@requires_triton_device
@pytest.mark.parametrize(
    "overrides",
    [dict(), dict(use_parallel_residual=False, tie_word_embeddings=True)],
    ids=["parallel", "sequential-tied"],
)
def test_hf_gpt_neox_logits(overrides):
    transformers = pytest.importorskip("transformers")
    from flash_attn.models.gpt_neox import gpt_neox_config_to_gpt2_config, remap_state_dict_hf_gpt_neox

    neox_config = transformers.GPTNeoXConfig(
        vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        max_position_embeddings=32, bos_token_id=0, eos_token_id=0,
        rope_parameters=dict(rope_type="default", rope_theta=1000.0, partial_rotary_factor=0.5),
        **overrides,
    )
    hf_model = transformers.GPTNeoXForCausalLM(neox_config).eval()
    config = gpt_neox_config_to_gpt2_config(neox_config)
    assert config.rotary_emb_fraction == 0.5 and config.rotary_emb_base == 1000.0
    model = load_remapped(config, hf_model, remap_state_dict_hf_gpt_neox)
    assert_same_logits(model, hf_model, 100, TRITON_DEVICE)


@requires_triton_device
def test_hf_gptj_logits():
    transformers = pytest.importorskip("transformers")
    from flash_attn.models.gptj import gptj_config_to_gpt2_config, remap_state_dict_hf_gptj

    gptj_config = transformers.GPTJConfig(
        vocab_size=100, n_positions=32, n_embd=64, n_layer=2, n_head=4, rotary_dim=8,
        bos_token_id=0, eos_token_id=0,
    )
    hf_model = transformers.GPTJForCausalLM(gptj_config).eval()
    config = gptj_config_to_gpt2_config(gptj_config)
    config.pad_vocab_size_multiple = 8
    assert_same_logits(load_remapped(config, hf_model, remap_state_dict_hf_gptj), hf_model, 100, TRITON_DEVICE)


@requires_triton_device
@pytest.mark.parametrize(
    "overrides",
    [
        dict(),
        dict(multi_query=False, parallel_attn=False, bias=True),
        dict(new_decoder_architecture=True, num_kv_heads=2),
    ],
    ids=["7b-style", "sequential-mha", "40b-style"],
)
def test_hf_falcon_logits(overrides):
    transformers = pytest.importorskip("transformers")
    from flash_attn.models.falcon import falcon_config_to_gpt2_config, remap_state_dict_hf_falcon

    falcon_config = transformers.FalconConfig(
        vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        bos_token_id=0, eos_token_id=0, **overrides,
    )
    hf_model = transformers.FalconForCausalLM(falcon_config).eval()
    config = falcon_config_to_gpt2_config(falcon_config)
    assert_same_logits(load_remapped(config, hf_model, remap_state_dict_hf_falcon), hf_model, 100, TRITON_DEVICE)


def test_falcon_config_rejects_alibi():
    transformers = pytest.importorskip("transformers")
    from flash_attn.models.falcon import falcon_config_to_gpt2_config

    with pytest.raises(ValueError, match="alibi"):
        falcon_config_to_gpt2_config(transformers.FalconConfig(alibi=True))


def test_rotary_family_state_dicts_fit_the_model():
    """The remapped keys and shapes equal GPTLMHeadModel's (without running rotary)."""
    transformers = pytest.importorskip("transformers")
    from flash_attn.models import falcon, gpt_neox, gptj

    cases = [
        (transformers.GPTNeoXConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    intermediate_size=128, bos_token_id=0, eos_token_id=0),
         transformers.GPTNeoXForCausalLM, gpt_neox.gpt_neox_config_to_gpt2_config, gpt_neox.remap_state_dict_hf_gpt_neox),
        (transformers.GPTJConfig(vocab_size=100, n_embd=64, n_layer=2, n_head=4, rotary_dim=8,
                                 bos_token_id=0, eos_token_id=0),
         transformers.GPTJForCausalLM, gptj.gptj_config_to_gpt2_config, gptj.remap_state_dict_hf_gptj),
        (transformers.FalconConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   new_decoder_architecture=True, num_kv_heads=2, bos_token_id=0, eos_token_id=0),
         transformers.FalconForCausalLM, falcon.falcon_config_to_gpt2_config, falcon.remap_state_dict_hf_falcon),
    ]
    for hf_config, hf_cls, to_gpt2, remap in cases:
        config = to_gpt2(hf_config)
        remapped = remap(hf_cls(hf_config).state_dict(), config)
        expected = {k: v.shape for k, v in GPTLMHeadModel(config).state_dict().items()}
        assert {k: v.shape for k, v in remapped.items()} == expected, hf_cls.__name__


# ------------------------------------------------------------------------------------------
# GPT-BigCode
# ------------------------------------------------------------------------------------------


def _hf_bigcode():
    transformers = pytest.importorskip("transformers")
    bigcode_config = transformers.GPTBigCodeConfig(
        vocab_size=100, n_positions=32, n_embd=64, n_layer=2, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )
    return bigcode_config, transformers.GPTBigCodeForCausalLM(bigcode_config).eval()


def test_hf_bigcode_logits():
    from flash_attn.models.bigcode import bigcode_config_to_gpt2_config, remap_state_dict_hf_bigcode

    bigcode_config, hf_model = _hf_bigcode()
    config = bigcode_config_to_gpt2_config(bigcode_config)
    assert_same_logits(load_remapped(config, hf_model, remap_state_dict_hf_bigcode), hf_model, 100)


def test_hf_bigcode_state_dict_round_trips():
    from flash_attn.models.bigcode import (
        bigcode_config_to_gpt2_config,
        inv_remap_state_dict_hf_bigcode,
        remap_state_dict_hf_bigcode,
    )

    bigcode_config, hf_model = _hf_bigcode()
    config = bigcode_config_to_gpt2_config(bigcode_config)
    config.pad_vocab_size_multiple = 16
    hf_state = hf_model.state_dict()
    back = inv_remap_state_dict_hf_bigcode(remap_state_dict_hf_bigcode(dict(hf_state), config), config)
    assert set(back) == set(hf_state)
    assert all(torch.equal(back[k], hf_state[k]) for k in hf_state)


def test_bigcode_needs_multi_query():
    from types import SimpleNamespace

    from flash_attn.models.bigcode import remap_state_dict_hf_bigcode

    with pytest.raises(ValueError, match="multi_query"):
        remap_state_dict_hf_bigcode({}, SimpleNamespace(multi_query=False))
