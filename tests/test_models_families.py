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
