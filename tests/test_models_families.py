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
from flash_attn.modules.mlp import GatedMlp

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


# ------------------------------------------------------------------------------------------
# BTLM and Baichuan (remote code: synthetic checkpoints)
# ------------------------------------------------------------------------------------------


def _btlm_config(position_embedding_type="alibi"):
    from types import SimpleNamespace

    return SimpleNamespace(
        vocab_size=100, n_positions=32, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, n_inner=96,
        activation_function="swiglu", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=1e-5,
        initializer_range=0.02, bos_token_id=0, eos_token_id=0, position_embedding_type=position_embedding_type,
        mup_width_scale=0.5, mup_embeddings_scale=10.0, mup_output_alpha=2.0, mup_scale_qk_dot_by_d=True,
    )


def _btlm_state_dict(btlm_config):
    """Random tensors under BTLMLMHeadModel's keys, in its Conv1D (in, out) layout."""
    d, inner, vocab = btlm_config.hidden_size, btlm_config.n_inner, btlm_config.vocab_size
    state = {"transformer.wte.weight": torch.randn(vocab, d), "lm_head.weight": torch.randn(vocab, d),
             "transformer.ln_f.weight": torch.randn(d), "transformer.ln_f.bias": torch.randn(d)}
    if btlm_config.position_embedding_type == "alibi":
        state["transformer.relative_pe.slopes"] = torch.randn(btlm_config.num_attention_heads, 1, 1)
    else:
        state["transformer.wpe.weight"] = torch.randn(btlm_config.n_positions, d)
    for l in range(btlm_config.num_hidden_layers):
        shapes = {"ln_1.weight": (d,), "ln_1.bias": (d,), "ln_2.weight": (d,), "ln_2.bias": (d,),
                  "attn.c_attn.weight": (d, 3 * d), "attn.c_attn.bias": (3 * d,),
                  "attn.c_proj.weight": (d, d), "attn.c_proj.bias": (d,),
                  "mlp.c_fc.weight": (d, inner), "mlp.c_fc.bias": (inner,),
                  "mlp.c_fc2.weight": (d, inner), "mlp.c_fc2.bias": (inner,),
                  "mlp.c_proj.weight": (inner, d), "mlp.c_proj.bias": (d,)}
        state.update({f"transformer.h.{l}.{k}": torch.randn(shape) for k, shape in shapes.items()})
    return state


@pytest.mark.parametrize("position_embedding_type", ["alibi", "learned"])
def test_btlm_remap_fits_the_model(position_embedding_type):
    pytest.importorskip("transformers")
    from flash_attn.models.btlm import btlm_config_to_gpt2_config, remap_state_dict_hf_btlm

    btlm_config = _btlm_config(position_embedding_type)
    config = btlm_config_to_gpt2_config(btlm_config)
    alibi = position_embedding_type == "alibi"
    assert config.use_alibi == alibi and config.use_flash_attn == alibi and config.n_positions == (0 if alibi else 32)
    assert (config.mup_width_scale, config.mup_embeddings_multiplier, config.mup_output_multiplier) == (0.5, 10.0, 2.0)
    hf_state = _btlm_state_dict(btlm_config)
    ours = remap_state_dict_hf_btlm(dict(hf_state), config)
    model = GPTLMHeadModel(config)
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in model.state_dict().items()}
    assert isinstance(model.transformer.layers[0].mlp, GatedMlp) and model.transformer.layers[0].mlp.fc1.out_features == 192
    fc1 = ours["transformer.layers.1.mlp.fc1.weight"]
    torch.testing.assert_close(fc1[:96], hf_state["transformer.h.1.mlp.c_fc.weight"].T)  # value rows
    torch.testing.assert_close(fc1[96:], hf_state["transformer.h.1.mlp.c_fc2.weight"].T)  # gate rows
    torch.testing.assert_close(ours["transformer.layers.0.mixer.Wqkv.weight"], hf_state["transformer.h.0.attn.c_attn.weight"].T)
    assert ours["lm_head.weight"] is ours["transformer.embeddings.word_embeddings.weight"]
    model.load_state_dict(ours)


def _baichuan_config(hidden_size=64, vocab_size=100):
    from types import SimpleNamespace

    return SimpleNamespace(
        vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, rms_norm_eps=1e-6, initializer_range=0.02, bos_token_id=0, eos_token_id=0,
        pad_token_id=0,
    )


def test_baichuan_config_variants():
    pytest.importorskip("transformers")
    from flash_attn.models.baichuan import baichuan_config_to_gpt2_config

    seven_b = baichuan_config_to_gpt2_config(_baichuan_config(4096, 64000))
    assert seven_b.rotary_emb_fraction == 1.0 and not seven_b.use_alibi and not seven_b.norm_head
    thirteen_b_v2 = baichuan_config_to_gpt2_config(_baichuan_config(5120, 125696))
    assert thirteen_b_v2.rotary_emb_fraction == 0.0 and thirteen_b_v2.use_alibi and thirteen_b_v2.use_flash_attn
    assert thirteen_b_v2.norm_head and thirteen_b_v2.rms_norm and not thirteen_b_v2.tie_word_embeddings


def _llama_as_baichuan():
    """A tiny HF Llama and its state dict under Baichuan 7B's keys: Baichuan 7B is Llama with q,
    k and v packed into W_pack (same non-interleaved rotary)."""
    transformers = pytest.importorskip("transformers")
    llama_config = transformers.LlamaConfig(
        vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64, rms_norm_eps=1e-6, bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )
    hf_model = transformers.LlamaForCausalLM(llama_config).eval()
    state = {k: v for k, v in hf_model.state_dict().items() if "inv_freq" not in k}
    for l in range(2):
        prefix = f"model.layers.{l}.self_attn"
        state[f"{prefix}.W_pack.weight"] = torch.cat([state.pop(f"{prefix}.{p}_proj.weight") for p in "qkv"])
    return hf_model, state


def test_baichuan_remap_fits_the_model():
    pytest.importorskip("triton", reason="the Baichuan GPT uses the Triton RMSNorm")
    from flash_attn.models.baichuan import baichuan_config_to_gpt2_config, remap_state_dict_hf_baichuan

    _, state = _llama_as_baichuan()
    config = baichuan_config_to_gpt2_config(_baichuan_config())
    config.pad_vocab_size_multiple = 16
    ours = remap_state_dict_hf_baichuan(state, config)
    expected = {k: v.shape for k, v in GPTLMHeadModel(config).state_dict().items()}
    assert {k: v.shape for k, v in ours.items()} == expected


@requires_triton_device
def test_baichuan_7b_logits_match_the_equivalent_llama():
    from flash_attn.models.baichuan import baichuan_config_to_gpt2_config, remap_state_dict_hf_baichuan

    hf_model, state = _llama_as_baichuan()
    config = baichuan_config_to_gpt2_config(_baichuan_config())
    model = GPTLMHeadModel(config).eval()
    model.load_state_dict(remap_state_dict_hf_baichuan(state, config))
    assert_same_logits(model, hf_model, 100, TRITON_DEVICE)
