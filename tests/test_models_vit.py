"""flash_attn.models.vit on CPU, float32, PyTorch attention: shapes and gradients of a tiny
VisionTransformer, the pooling options (class token through the last layer's cross-attention,
average, none), one block against a hand-written pre-norm layer, timm-layout state dicts, and
the arguments it rejects."""

import inspect

import pytest
import torch
import torch.nn.functional as F

from flash_attn.models.vit import VisionTransformer, create_block, vit_base_patch16_224

TINY = dict(img_size=16, patch_size=4, in_chans=3, num_classes=5, embed_dim=32, depth=2, num_heads=4)


def images(batch=2):
    return torch.randn(batch, 3, 16, 16)


@pytest.mark.parametrize(
    "options,num_tokens",
    [(dict(), 17), (dict(global_pool="avg"), 17), (dict(global_pool="avg", class_token=False), 16)],
    ids=["token", "avg", "avg-no-class-token"],
)
def test_forward_backward_shapes(options, num_tokens):
    model = VisionTransformer(**TINY, drop_rate=0.1, drop_path_rate=0.1, **options)
    x = images()
    features = model.forward_features(x)
    assert features.shape == (2, num_tokens, 32)
    logits = model(x)
    assert logits.shape == (2, 5)
    logits.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_class_token_pooling_computes_the_class_token_only():
    model = VisionTransformer(**TINY).eval()
    x = images()
    with torch.no_grad():
        class_token = model.forward_features(x, all_tokens=False)
        all_tokens = model.forward_features(x, all_tokens=True)
        assert class_token.shape == (2, 1, 32)
        torch.testing.assert_close(class_token[:, 0], all_tokens[:, 0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model(x), model.head(all_tokens[:, 0]), rtol=1e-5, atol=1e-5)


def test_average_and_no_pooling():
    x = images()
    avg = VisionTransformer(**TINY, global_pool="avg").eval()
    with torch.no_grad():
        features = avg.forward_features(x)
        torch.testing.assert_close(avg(x), avg.head(features[:, 1:].mean(dim=1)))
        assert avg.forward_head(features, pre_logits=True).shape == (2, 32)
    unpooled = VisionTransformer(**TINY, global_pool="", class_token=False).eval()
    assert unpooled(x).shape == (2, 16, 5)


def test_no_embed_class_position_embeddings_cover_the_patches():
    model = VisionTransformer(**TINY, no_embed_class=True)
    assert model.pos_embed.shape == (1, 16, 32)
    assert model(images()).shape == (2, 5)


def test_block_matches_manual_prenorm_layer():
    torch.manual_seed(0)
    norm_layer = torch.nn.LayerNorm
    block = create_block(
        32, 4, 2.0, True, 0.0, 0.0, drop_path1=0.0, drop_path2=0.0, norm_layer=norm_layer,
        act_layer=torch.nn.GELU, use_flash_attn=False, fused_bias_fc=False, fused_mlp=False,
        fused_dropout_add_ln=False,
    ).eval()
    hidden_states, residual = torch.randn(2, 7, 32), torch.randn(2, 7, 32)
    with torch.no_grad():
        out, out_residual = block(hidden_states, residual)

        residual = hidden_states + residual
        x = block.norm1(residual)
        q, k, v = block.mixer.Wqkv(x).view(2, 7, 3, 4, 8).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(2, 7, 32)
        residual = block.mixer.out_proj(attn) + residual
        x = block.norm2(residual)
        expected = block.mlp.fc2(F.gelu(block.mlp.fc1(x)))
    assert block.mlp.fc1.out_features == 64
    assert out_residual.dtype == torch.float32
    torch.testing.assert_close(out_residual, residual, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def to_timm_layout(state_dict, model):
    """model's state dict with timm's names: Conv2d patch weight, attn.qkv / attn.proj."""
    timm = {}
    for key, value in state_dict.items():
        key = key.replace(".mixer.Wqkv.", ".attn.qkv.").replace(".mixer.out_proj.", ".attn.proj.")
        timm[key] = value
    last = f"blocks.{len(model.blocks) - 1}"
    for param in ("weight", "bias"):
        wq, wkv = timm.pop(f"{last}.mixer.Wq.{param}"), timm.pop(f"{last}.mixer.Wkv.{param}")
        timm[f"{last}.attn.qkv.{param}"] = torch.cat([wq, wkv])
    patch = model.patch_embed.patch_size
    timm["patch_embed.proj.weight"] = timm["patch_embed.proj.weight"].view(32, 3, *patch)
    return timm


def test_loads_timm_state_dict():
    source = VisionTransformer(**TINY).eval()
    timm_state_dict = to_timm_layout(source.state_dict(), source)
    conv_weight = timm_state_dict["patch_embed.proj.weight"]
    model = VisionTransformer(**TINY).eval()
    model.load_state_dict(timm_state_dict)
    assert timm_state_dict["patch_embed.proj.weight"] is conv_weight, "the caller's dict must not change"
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(model(x), source(x))


def test_signature_and_rejected_arguments():
    params = list(inspect.signature(VisionTransformer).parameters)
    assert params == [
        "img_size", "patch_size", "in_chans", "num_classes", "global_pool", "embed_dim", "depth", "num_heads",
        "mlp_ratio", "qkv_bias", "init_values", "class_token", "no_embed_class", "pre_norm", "fc_norm",
        "drop_rate", "attn_drop_rate", "drop_path_rate", "weight_init", "embed_layer", "norm_layer",
        "act_layer", "use_flash_attn", "fused_bias_fc", "fused_mlp", "fused_dropout_add_ln",
    ]
    for options, name in [
        (dict(global_pool="max"), "global_pool"),
        (dict(class_token=False), "class_token"),
        (dict(init_values=1e-5), "init_values"),
        (dict(pre_norm=True), "pre_norm"),
        (dict(fc_norm=True), "fc_norm"),
        (dict(weight_init="jax"), "weight_init"),
    ]:
        with pytest.raises(ValueError, match=name):
            VisionTransformer(**TINY, **options)
    with pytest.raises(ValueError, match="pretrained"):
        vit_base_patch16_224(pretrained=True)


def test_vit_base_patch16_224_dimensions():
    with torch.device("meta"):
        model = vit_base_patch16_224(num_classes=10)
    assert len(model.blocks) == 12 and model.embed_dim == 768
    assert model.blocks[0].mixer.num_heads == 12 and model.patch_embed.patch_size == (16, 16)
    assert model.pos_embed.shape == (1, 197, 768) and model.head.out_features == 10
