"""flash_attn.models.gpt and flash_attn.models.llama on CPU (PyTorch attention, float32), against
Hugging Face transformers where it is installed; the flash-attention path on a GPU.

Llama models use rotary and RMSNorm, which run Triton kernels: on CPU only under
TRITON_INTERPRET=1.
"""

import os
from types import SimpleNamespace

import pytest
import torch

from flash_attn.models.gpt import (
    GPTLMHeadModel,
    GPTModel,
    combine_state_dicts_tp,
    create_block,
    create_mixer_cls,
    create_mlp_cls,
    remap_state_dict_hf_gpt2,
    shard_state_dict_tp,
)
from flash_attn.modules.block import Block, ParallelBlock
from flash_attn.modules.mha import MHA
from flash_attn.modules.mlp import FusedMLP, GatedMlp, Mlp
from process_groups import run_on_ranks
from tiny_gpt import tiny_gpt_config as tiny_config

TRITON_DEVICE = "cuda" if torch.cuda.is_available() else ("cpu" if os.environ.get("TRITON_INTERPRET") == "1" else None)
requires_triton_device = pytest.mark.skipif(
    TRITON_DEVICE is None, reason="rotary / RMSNorm run Triton kernels: needs a CUDA GPU or TRITON_INTERPRET=1"
)


def test_forward_backward():
    model = GPTLMHeadModel(tiny_config())
    input_ids = torch.randint(0, 50, (2, 12))
    logits = model(input_ids).logits
    assert logits.shape == (2, 12, 50) and logits.dtype == torch.float32
    logits.logsumexp(-1).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.lm_head.weight is model.transformer.embeddings.word_embeddings.weight
    assert model(input_ids, num_last_tokens=3).logits.shape == (2, 3, 50)


def test_causal():
    model = GPTLMHeadModel(tiny_config()).eval()
    input_ids = torch.randint(0, 50, (1, 10))
    changed = input_ids.clone()
    changed[0, 6:] = (changed[0, 6:] + 1) % 50
    torch.testing.assert_close(model(input_ids).logits[:, :6], model(changed).logits[:, :6])


@pytest.mark.parametrize(
    "overrides",
    [
        dict(activation_function="swiglu", n_inner=128),
        dict(activation_function="relu"),
        dict(activation_function="sqrelu", fused_mlp=True),
        dict(activation_function="gelu_new", fused_mlp=True, mlp_checkpoint_lvl=[0, 2]),
        dict(prenorm=False),
        dict(parallel_block=True),
        dict(parallel_block=True, parallel_block_tied_norm=True),
        dict(n_head_kv=2),
        dict(tie_word_embeddings=False, lm_head_bias=True, pad_vocab_size_multiple=16),
        dict(scale_attn_by_inverse_layer_idx=True, qkv_proj_bias=False, out_proj_bias=False),
        dict(word_embed_proj_dim=32),
        dict(mup_width_scale=0.5, mup_output_multiplier=2.0, mup_embeddings_multiplier=3.0, norm_head=True),
    ],
)
def test_config_variants_run(overrides):
    config = tiny_config(**overrides)
    model = GPTLMHeadModel(config)
    logits = model(torch.randint(0, 50, (2, 7))).logits
    vocab = 64 if "pad_vocab_size_multiple" in overrides else 50
    assert logits.shape == (2, 7, vocab) and torch.isfinite(logits).all()
    logits.sum().backward()


def test_layer_factories():
    config = tiny_config(activation_function="swiglu", n_head_kv=2, scale_attn_by_inverse_layer_idx=True)
    mixer = create_mixer_cls(config, layer_idx=1)(64)
    assert isinstance(mixer, MHA) and mixer.num_heads_kv == 2 and mixer.causal
    # GPT-2 scales the scores by 1 / sqrt(head_dim) and by 1 / (layer_idx + 1).
    assert mixer.inner_attn.softmax_scale == pytest.approx(16**-0.5 / 2)
    assert isinstance(create_mlp_cls(config)(64), GatedMlp)
    assert isinstance(create_mlp_cls(tiny_config())(64), Mlp)
    assert isinstance(create_mlp_cls(tiny_config(fused_mlp=True))(64), FusedMLP)
    block = create_block(config, layer_idx=0)
    assert isinstance(block, Block) and block.layer_idx == 0
    assert isinstance(create_block(tiny_config(parallel_block=True), layer_idx=0), ParallelBlock)


def test_bad_configs():
    with pytest.raises(TypeError, match="lacks \\['n_inner'\\]"):
        config = tiny_config()
        del config.n_inner
        GPTModel(config)
    with pytest.raises(ValueError, match="activation_function"):
        GPTModel(tiny_config(activation_function="tanh"))
    with pytest.raises(ValueError, match="fused_mlp"):
        GPTModel(tiny_config(activation_function="swiglu", fused_mlp=True))
    with pytest.raises(ValueError, match="layer_idx"):
        create_mixer_cls(tiny_config(scale_attn_by_inverse_layer_idx=True))
    with pytest.raises(ImportError, match="FusedDenseSqreluDense"):
        create_mlp_cls(tiny_config(activation_function="sqrelu", fused_dense_sqrelu_dense=True))
    with pytest.raises(ValueError, match="input_ids"):
        GPTLMHeadModel(tiny_config())(torch.zeros(3, dtype=torch.long))


def test_load_state_dict_of_the_old_norm_order():
    model = GPTLMHeadModel(tiny_config()).eval()
    for p in model.parameters():  # norms that differ from their initialization
        torch.nn.init.normal_(p)
    current = model.state_dict()
    # The old order: ln_0, then each layer's norm after its attention (norm1) and after its MLP
    # (norm2); the last layer's norm2 is the current layout's ln_f.
    old = {k: v for k, v in current.items() if ".norm" not in k and "ln_f" not in k}
    n = 2
    for p in ("weight", "bias"):
        old[f"transformer.ln_0.{p}"] = current[f"transformer.layers.0.norm1.{p}"]
        for l in range(n):
            old[f"transformer.layers.{l}.norm1.{p}"] = current[f"transformer.layers.{l}.norm2.{p}"]
            nxt = f"transformer.layers.{l + 1}.norm1.{p}" if l + 1 < n else f"transformer.ln_f.{p}"
            old[f"transformer.layers.{l}.norm2.{p}"] = current[nxt]
    fresh = GPTLMHeadModel(tiny_config()).eval()
    fresh.load_state_dict(old)
    input_ids = torch.randint(0, 50, (2, 5))
    torch.testing.assert_close(fresh(input_ids).logits, model(input_ids).logits)


# ------------------------------------------------------------------------------------------
# Tensor-parallel state dicts
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides,world_size",
    [
        (dict(), 2),
        (dict(vocab_size=64), 4),
        (dict(n_head_kv=2), 2),
        (dict(activation_function="swiglu", n_inner=128), 2),
        (dict(pad_vocab_size_multiple=8, tie_word_embeddings=False), 4),
    ],
)
def test_shard_then_combine_round_trips(overrides, world_size):
    config = tiny_config(**overrides)
    full = GPTLMHeadModel(config).state_dict()
    shards = [shard_state_dict_tp(dict(full), config, world_size, rank) for rank in range(world_size)]
    assert shards[0]["transformer.layers.0.mlp.fc1.weight"].shape[0] == full[
        "transformer.layers.0.mlp.fc1.weight"].shape[0] // world_size
    assert "transformer.layers.0.mixer.out_proj.bias" not in shards[1]
    combined = combine_state_dicts_tp(shards, config)
    assert set(combined) == set(full)
    for key, value in full.items():
        assert torch.equal(combined[key], value), key


def test_shard_rejects_indivisible_sizes():
    with pytest.raises(ValueError, match="vocab_size"):
        shard_state_dict_tp({}, tiny_config(vocab_size=51), 2, 0)


def _tensor_parallel_matches_serial(rank, group, config_fields, state_dict, input_ids, expected):
    config = SimpleNamespace(**config_fields)
    model = GPTLMHeadModel(config, process_group=group).eval()
    model.load_state_dict(shard_state_dict_tp(dict(state_dict), config, group.size(), rank))
    logits = model(input_ids).logits
    # Each rank's lm_head yields its slice of the vocabulary for every token (under sequence
    # parallelism it gathers the ranks' tokens first, with the batch and sequence dims merged).
    vocab = expected.shape[-1] // group.size()
    reference = expected[..., rank * vocab : (rank + 1) * vocab]
    if config.sequence_parallel:
        reference = reference.reshape(-1, vocab)
    torch.testing.assert_close(logits, reference, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("sequence_parallel,n_head_kv", [(False, None), (True, 2)])
def test_tensor_parallel_model_matches_serial(tmp_path, sequence_parallel, n_head_kv):
    fields = vars(tiny_config(fused_bias_fc=True, sequence_parallel=sequence_parallel, n_head_kv=n_head_kv,
                              vocab_size=64))
    serial = GPTLMHeadModel(SimpleNamespace(**fields)).eval()
    input_ids = torch.randint(0, 64, (2, 6))
    with torch.no_grad():
        expected = serial(input_ids).logits
    run_on_ranks(_tensor_parallel_matches_serial, 2, tmp_path, fields, serial.state_dict(), input_ids, expected)


# ------------------------------------------------------------------------------------------
# Hugging Face checkpoints
# ------------------------------------------------------------------------------------------


def _hf_gpt2(**overrides):
    transformers = pytest.importorskip("transformers")
    fields = dict(vocab_size=100, n_positions=32, n_embd=64, n_layer=2, n_head=4, resid_pdrop=0.0,
                  embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    fields.update(overrides)
    config = transformers.GPT2Config(**fields)
    return config, transformers.GPT2LMHeadModel(config).eval()


@pytest.mark.parametrize("activation", ["gelu_new", "relu"])
def test_hf_gpt2_logits(activation):
    config, hf_model = _hf_gpt2(activation_function=activation)
    model = GPTLMHeadModel(config).eval()
    model.load_state_dict(remap_state_dict_hf_gpt2(hf_model.state_dict(), config))
    input_ids = torch.randint(0, 100, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids).logits, hf_model(input_ids).logits, rtol=1e-5, atol=1e-5)


def test_hf_gpt2_padded_vocabulary():
    config, hf_model = _hf_gpt2()
    config.pad_vocab_size_multiple = 64
    model = GPTLMHeadModel(config).eval()
    model.load_state_dict(remap_state_dict_hf_gpt2(hf_model.state_dict(), config))
    input_ids = torch.randint(0, 100, (1, 8))
    with torch.no_grad():
        logits = model(input_ids).logits
        assert logits.shape[-1] == 128
        torch.testing.assert_close(logits[..., :100], hf_model(input_ids).logits, rtol=1e-5, atol=1e-5)


def test_from_pretrained_local_gpt2_folder(tmp_path, monkeypatch):
    config, hf_model = _hf_gpt2()
    hf_model.save_pretrained(tmp_path / "gpt2-tiny")
    monkeypatch.chdir(tmp_path)  # from_pretrained picks the remapping by the name's prefix
    model = GPTLMHeadModel.from_pretrained("gpt2-tiny", config).eval()
    input_ids = torch.randint(0, 100, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids).logits, hf_model(input_ids).logits, rtol=1e-5, atol=1e-5)


def test_from_pretrained_picks_the_family_by_name():
    from flash_attn.models.gpt import _pretrained_remap
    from flash_attn.models.opt import remap_state_dict_hf_opt

    with pytest.raises(NotImplementedError, match="not supported"):
        GPTLMHeadModel.from_pretrained("someone/some-model", tiny_config())
    assert _pretrained_remap("facebook/opt-125m") is remap_state_dict_hf_opt


def _hf_llama(num_key_value_heads):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=num_key_value_heads, max_position_embeddings=64, rope_theta=1000.0,
        bos_token_id=0, eos_token_id=0,
    )
    return config, transformers.LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("num_key_value_heads", [4, 2])
def test_hf_llama_state_dict_round_trips(num_key_value_heads):
    from flash_attn.models.llama import (
        inv_remap_state_dict_hf_llama,
        llama_config_to_gpt2_config,
        remap_state_dict_hf_llama,
    )

    llama_config, hf_model = _hf_llama(num_key_value_heads)
    config = llama_config_to_gpt2_config(llama_config)
    assert config.rotary_emb_base == 1000.0 and config.n_head_kv == num_key_value_heads
    hf_state = {k: v for k, v in hf_model.state_dict().items() if "inv_freq" not in k}
    ours = remap_state_dict_hf_llama(dict(hf_state), config)
    pytest.importorskip("triton", reason="the Llama GPT uses the Triton RMSNorm")
    model_keys = {k: v.shape for k, v in GPTLMHeadModel(config).state_dict().items()}
    assert {k: v.shape for k, v in ours.items()} == model_keys
    back = inv_remap_state_dict_hf_llama(dict(ours), config)
    assert set(back) == set(hf_state)
    assert all(torch.equal(back[k], hf_state[k]) for k in hf_state)


@requires_triton_device
@pytest.mark.parametrize("num_key_value_heads", [4, 2])
def test_hf_llama_logits(num_key_value_heads):
    from flash_attn.models.llama import llama_config_to_gpt2_config, remap_state_dict_hf_llama

    llama_config, hf_model = _hf_llama(num_key_value_heads)
    config = llama_config_to_gpt2_config(llama_config)
    model = GPTLMHeadModel(config).eval()
    model.load_state_dict(remap_state_dict_hf_llama(hf_model.state_dict(), config))
    input_ids = torch.randint(0, 100, (2, 12))
    with torch.no_grad():
        expected = hf_model(input_ids).logits
        hf_model.to(TRITON_DEVICE), model.to(TRITON_DEVICE)
        logits = model(input_ids.to(TRITON_DEVICE)).logits.cpu()
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)


def test_llama_config_functions_need_transformers_only_when_called():
    import flash_attn.models.llama as llama

    assert callable(llama.remap_state_dict_meta_llama) and callable(llama.config_from_checkpoint)


# ------------------------------------------------------------------------------------------
# GPU: the flash-attention path against PyTorch attention
# ------------------------------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("overrides", [dict(), dict(n_head_kv=2), dict(rotary_emb_fraction=0.5, n_positions=0)])
def test_flash_attention_matches_torch_path(overrides):
    pytest.importorskip("flash_attn_2_cuda")
    torch_model = GPTLMHeadModel(tiny_config(**overrides), device="cuda", dtype=torch.float16).eval()
    flash_model = GPTLMHeadModel(tiny_config(use_flash_attn=True, **overrides), device="cuda", dtype=torch.float16)
    flash_model.load_state_dict(torch_model.state_dict())
    flash_model.eval()
    input_ids = torch.randint(0, 50, (2, 24), device="cuda")
    with torch.no_grad():
        ref = GPTLMHeadModel(tiny_config(**overrides), device="cuda", dtype=torch.float32).eval()
        ref.load_state_dict(torch_model.state_dict())
        expected = ref(input_ids).logits
        torch_err = (torch_model(input_ids).logits.float() - expected).abs().max().item()
        flash_err = (flash_model(input_ids).logits.float() - expected).abs().max().item()
    assert flash_err <= 2 * torch_err + 1e-3
