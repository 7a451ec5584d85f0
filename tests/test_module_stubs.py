"""The modules of flash-attn 2.8 that this build provides import, with upstream's public names and
signatures; `import flash_attn` stays light (no triton, no GPU needed)."""

import importlib
import inspect
import subprocess
import sys

import pytest

TRITON_MODULES = [
    "flash_attn.layers.rotary",
    "flash_attn.ops.triton.rotary",
    "flash_attn.ops.triton.layer_norm",
    "flash_attn.ops.triton.cross_entropy",
    "flash_attn.losses.cross_entropy",
]


@pytest.mark.parametrize("name", TRITON_MODULES)
def test_provided_modules_import(name):
    pytest.importorskip("triton", reason="these modules run Triton kernels; triton is not installed")
    importlib.import_module(name)


# Importing them loads neither triton nor the CUDA extension (the layer norm wrappers import the
# Triton kernel when called).
LIGHT_MODULES = [
    "flash_attn.utils.distributed",
    "flash_attn.ops.activations",
    "flash_attn.ops.fused_dense",
    "flash_attn.ops.layer_norm",
    "flash_attn.ops.rms_norm",
    "flash_attn.modules.mlp",
    "flash_attn.modules.mha",
    "flash_attn.utils.torch",
    "flash_attn.utils.testing",
    "flash_attn.utils.pretrained",
    "flash_attn.layers.patch_embed",
    "flash_attn.utils.generation",
    "flash_attn.models",
    "flash_attn.models.llama",
    "flash_attn.models.opt",
    "flash_attn.models.gpt_neox",
    "flash_attn.models.gptj",
    "flash_attn.models.falcon",
    "flash_attn.models.bigcode",
    "flash_attn.models.btlm",
    "flash_attn.models.baichuan",
]


def test_light_modules_import_without_triton():
    code = (
        f"import sys, {', '.join(LIGHT_MODULES)}; "
        "assert 'triton' not in sys.modules, 'pulled in triton'; "
        "assert 'flash_attn_2_cuda' not in sys.modules, 'pulled in the CUDA extension'"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# Their blocks import triton where it is installed (as upstream's), but not the CUDA extension.
MODEL_MODULES = ["flash_attn.models.gpt", "flash_attn.models.bert", "flash_attn.models.vit"]


def test_model_modules_import_without_the_cuda_extension():
    code = (
        f"import sys, {', '.join(MODEL_MODULES)}; "
        "assert 'flash_attn_2_cuda' not in sys.modules, 'pulled in the CUDA extension'"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_package_import_is_light():
    code = (
        "import sys, flash_attn, flash_attn.layers, flash_attn.ops, flash_attn.ops.triton, flash_attn.losses; "
        "assert 'triton' not in sys.modules, 'importing flash_attn pulled in triton'"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_upstream_names_are_exported():
    pytest.importorskip("triton", reason="these modules run Triton kernels; triton is not installed")
    expected = {
        "flash_attn.layers.rotary": [
            "apply_rotary_emb", "apply_rotary_emb_func", "apply_rotary_emb_qkv_", "apply_rotary_emb_kv_",
            "apply_rotary_emb_torch", "rotate_half", "ApplyRotaryEmb", "ApplyRotaryEmbQKV_", "ApplyRotaryEmbKV_",
            "RotaryEmbedding",
        ],
        "flash_attn.ops.triton.rotary": ["apply_rotary"],
        "flash_attn.ops.triton.layer_norm": [
            "layer_norm_fn", "rms_norm_fn", "layer_norm_ref", "rms_norm_ref", "LayerNormFn", "RMSNorm",
            "LayerNorm", "layer_norm_linear_fn",
        ],
        "flash_attn.ops.triton.cross_entropy": ["cross_entropy_loss", "CrossEntropyLoss"],
        "flash_attn.losses.cross_entropy": ["CrossEntropyLoss"],
    }
    for module_name, names in expected.items():
        module = importlib.import_module(module_name)
        missing = [n for n in names if not hasattr(module, n)]
        assert not missing, f"{module_name} lacks {missing}"


# Parameter names and order of flash-attn 2.8.3, so positional and keyword calls carry over.
UPSTREAM_SIGNATURES = {
    ("flash_attn.layers.rotary", "apply_rotary_emb"): [
        "x", "cos", "sin", "interleaved", "inplace", "seqlen_offsets", "cu_seqlens", "max_seqlen"],
    ("flash_attn.layers.rotary", "apply_rotary_emb_qkv_"): [
        "qkv", "cos", "sin", "cos_k", "sin_k", "interleaved", "seqlen_offsets", "num_heads_q"],
    ("flash_attn.layers.rotary", "apply_rotary_emb_kv_"): ["kv", "cos", "sin", "interleaved", "seqlen_offsets"],
    ("flash_attn.layers.rotary", "RotaryEmbedding"): ["dim", "base", "interleaved", "scale_base", "device"],
    ("flash_attn.ops.triton.rotary", "apply_rotary"): [
        "x", "cos", "sin", "seqlen_offsets", "cu_seqlens", "max_seqlen", "interleaved", "inplace", "conjugate"],
    ("flash_attn.ops.triton.layer_norm", "layer_norm_fn"): [
        "x", "weight", "bias", "residual", "x1", "weight1", "bias1", "eps", "dropout_p", "rowscale", "prenorm",
        "residual_in_fp32", "zero_centered_weight", "is_rms_norm", "return_dropout_mask", "out_dtype", "out",
        "residual_out"],
    ("flash_attn.ops.triton.layer_norm", "rms_norm_fn"): [
        "x", "weight", "bias", "residual", "x1", "weight1", "bias1", "eps", "dropout_p", "rowscale", "prenorm",
        "residual_in_fp32", "zero_centered_weight", "return_dropout_mask", "out_dtype", "out", "residual_out"],
    ("flash_attn.ops.triton.layer_norm", "RMSNorm"): [
        "hidden_size", "eps", "dropout_p", "zero_centered_weight", "device", "dtype"],
    ("flash_attn.ops.triton.cross_entropy", "cross_entropy_loss"): [
        "logits", "labels", "precomputed_lse", "label_smoothing", "logit_scale", "lse_square_scale",
        "ignore_index", "inplace_backward", "process_group"],
    ("flash_attn.losses.cross_entropy", "CrossEntropyLoss"): [
        "ignore_index", "reduction", "label_smoothing", "logit_scale", "lse_square_scale", "inplace_backward",
        "process_group", "return_z_loss"],
}


@pytest.mark.parametrize("module_name,name", list(UPSTREAM_SIGNATURES))
def test_upstream_signatures(module_name, name):
    pytest.importorskip("triton", reason="these modules run Triton kernels; triton is not installed")
    obj = getattr(importlib.import_module(module_name), name)
    params = list(inspect.signature(obj).parameters)
    assert params == UPSTREAM_SIGNATURES[module_name, name]
