"""Vision Transformer (ViT) built from flash_attn.modules, with the API of upstream flash-attn
2.8.3's flash_attn.models.vit (itself timm's VisionTransformer rebuilt on flash_attn's blocks):
the layer factories (create_mixer_cls, create_mlp_cls, create_block), VisionTransformer, timm's
ViT initialization (init_weights_vit_timm) and vit_base_patch16_224. VisionTransformer loads
timm ViT state dicts.

The blocks are pre-norm Blocks that open with the dropout + add + norm closing the previous
layer (so the three fuse into one kernel with fused_dropout_add_ln); the model applies the last
layer's closing dropout + add and the final norm itself. With class-token pooling the last layer
computes the class token only, as a cross-attention of it to all tokens.

timm and torchvision are not needed: timm's named_apply is replaced by a depth-first walk here,
torchvision's StochasticDepth by flash_attn.modules.block's, trunc_normal_ comes from torch.
Importing this module loads neither triton nor the CUDA extension, except where
flash_attn.modules.block finds triton installed; the Triton layer norm is imported by a model
with fused_dropout_add_ln.
"""

from functools import partial

import torch
import torch.nn as nn
from einops import rearrange
from torch.nn.init import trunc_normal_

from flash_attn.layers.patch_embed import PatchEmbed
from flash_attn.models._remap import rename_keys
from flash_attn.modules.block import Block, StochasticDepth
from flash_attn.modules.mha import MHA
from flash_attn.modules.mlp import FusedMLP, Mlp

__all__ = [
    "create_mixer_cls",
    "create_mlp_cls",
    "create_block",
    "VisionTransformer",
    "init_weights_vit_timm",
    "vit_base_patch16_224",
]

_GLOBAL_POOLS = ("token", "avg", "")


def create_mixer_cls(num_heads, qkv_bias, attn_drop, use_flash_attn, fused_bias_fc, cross_attn=False):
    """The attention class as a partial of MHA taking the model width (bidirectional)."""
    return partial(
        MHA,
        num_heads=num_heads,
        cross_attn=cross_attn,
        qkv_proj_bias=qkv_bias,
        dropout=attn_drop,
        fused_bias_fc=fused_bias_fc,
        use_flash_attn=use_flash_attn,
    )


def create_mlp_cls(embed_dim, mlp_ratio, act_layer, fused_mlp):
    """The MLP class as a partial taking the model width: int(embed_dim * mlp_ratio) hidden
    features, Mlp with act_layer() as activation, or FusedMLP (tanh GELU, act_layer unused)."""
    inner_dim = int(embed_dim * mlp_ratio)
    if fused_mlp:
        return partial(FusedMLP, hidden_features=inner_dim)
    return partial(Mlp, hidden_features=inner_dim, activation=act_layer())


def create_block(
    embed_dim,
    num_heads,
    mlp_ratio,
    qkv_bias,
    drop_rate,
    attn_drop_rate,
    drop_path1,
    drop_path2,
    norm_layer,
    act_layer,
    use_flash_attn,
    fused_bias_fc,
    fused_mlp,
    fused_dropout_add_ln,
    layer_idx=None,
    n_layer=None,
    last_layer_subset=False,
):
    """Layer layer_idx of n_layer: a pre-norm Block with a float32 residual stream (for
    DeepSpeed's low-precision training); a cross-attention block when it is the last one and
    last_layer_subset. drop_path1 drops the previous layer's MLP output (this block adds it)."""
    cross_attn = last_layer_subset and layer_idx == n_layer - 1
    return Block(
        embed_dim,
        create_mixer_cls(num_heads, qkv_bias, attn_drop_rate, use_flash_attn, fused_bias_fc, cross_attn=cross_attn),
        create_mlp_cls(embed_dim, mlp_ratio, act_layer, fused_mlp),
        norm_cls=norm_layer,
        prenorm=True,
        resid_dropout1=drop_rate,
        resid_dropout2=drop_rate,
        drop_path1=drop_path1,
        drop_path2=drop_path2,
        fused_dropout_add_ln=fused_dropout_add_ln,
        residual_in_fp32=True,
    )


def _check_unsupported(**options):
    """ValueError naming the first of options (name: (value, default)) not at its default."""
    for name, (value, default) in options.items():
        if value != default:
            raise ValueError(f"VisionTransformer: {name}={value!r} is not supported (only {default!r})")


class VisionTransformer(nn.Module):
    """Vision Transformer ("An Image is Worth 16x16 Words", https://arxiv.org/abs/2010.11929),
    with timm's constructor arguments and parameter names.

    global_pool: "token" (the class token's features; its last layer computes that token only),
        "avg" (the mean of the patch tokens' normalized features) or "" (every token).
    class_token: prepend a learned class token ("token" pooling needs it).
    no_embed_class: the position embeddings cover the patches only (added before the class token
        is prepended).
    drop_rate: dropout of the embeddings and of each residual branch; attn_drop_rate: attention
        dropout; drop_path_rate: stochastic depth, rising linearly over the layers.
    embed_layer: patch embedding class (PatchEmbed gets fused_bias_fc too).
    norm_layer: norm class (default LayerNorm, eps 1e-6); act_layer: MLP activation class
        (default nn.GELU).
    use_flash_attn, fused_bias_fc, fused_mlp, fused_dropout_add_ln: flash_attn's kernels.
    init_values (LayerScale), pre_norm, fc_norm and weight_init modes other than "" are not
    supported.
    """

    def __init__(
        self,
        img_size=224,
        patch_size=16,
        in_chans=3,
        num_classes=1000,
        global_pool="token",
        embed_dim=768,
        depth=12,
        num_heads=12,
        mlp_ratio=4.0,
        qkv_bias=True,
        init_values=None,
        class_token=True,
        no_embed_class=False,
        pre_norm=False,
        fc_norm=None,
        drop_rate=0.0,
        attn_drop_rate=0.0,
        drop_path_rate=0.0,
        weight_init="",
        embed_layer=PatchEmbed,
        norm_layer=None,
        act_layer=None,
        use_flash_attn=False,
        fused_bias_fc=False,
        fused_mlp=False,
        fused_dropout_add_ln=False,
    ):
        super().__init__()
        if global_pool not in _GLOBAL_POOLS:
            raise ValueError(f"global_pool must be one of {_GLOBAL_POOLS}, got {global_pool!r}")
        if global_pool == "token" and not class_token:
            raise ValueError("global_pool='token' needs class_token=True")
        _check_unsupported(
            init_values=(init_values, None), pre_norm=(pre_norm, False), fc_norm=(fc_norm, None),
            weight_init=(weight_init, ""),
        )
        norm_layer = norm_layer or partial(nn.LayerNorm, eps=1e-6)
        act_layer = act_layer or nn.GELU

        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_features = self.embed_dim = embed_dim
        self.num_prefix_tokens = 1 if class_token else 0
        self.no_embed_class = no_embed_class
        self.fused_dropout_add_ln = fused_dropout_add_ln

        patch_embed_kwargs = {"fused_bias_fc": fused_bias_fc} if embed_layer is PatchEmbed else {}
        self.patch_embed = embed_layer(
            img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim, bias=True,
            **patch_embed_kwargs,
        )
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        embed_len = num_patches if no_embed_class else num_patches + self.num_prefix_tokens
        self.pos_embed = nn.Parameter(torch.randn(1, embed_len, embed_dim) * 0.02)

        # Stochastic depth rises linearly over the layers. Each block opens with the previous
        # layer's dropout + drop path + add, so block i's drop_path1 is layer i - 1's rate, and
        # the embeddings (block 0's) have none.
        # (Python floats, computed on the CPU whatever the default device.)
        drop_path_rates = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()
        self.blocks = nn.ModuleList(
            [
                create_block(
                    embed_dim, num_heads, mlp_ratio, qkv_bias, drop_rate, attn_drop_rate,
                    drop_path1=drop_path_rates[i - 1] if i > 0 else 0.0,
                    drop_path2=drop_path_rates[i],
                    norm_layer=norm_layer, act_layer=act_layer, use_flash_attn=use_flash_attn,
                    fused_bias_fc=fused_bias_fc, fused_mlp=fused_mlp, fused_dropout_add_ln=fused_dropout_add_ln,
                    layer_idx=i, n_layer=depth, last_layer_subset=global_pool == "token",
                )
                for i in range(depth)
            ]
        )
        # The last layer's closing dropout + drop path + add, and the final norm.
        self.dropout = nn.Dropout(p=drop_rate)
        self.drop_path = StochasticDepth(p=drop_path_rates[-1], mode="row")
        self.norm = norm_layer(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.init_weights(weight_init)

    def init_weights(self, mode=""):
        """timm's ViT initialization: truncated-normal position embeddings and linear weights,
        zero biases, a near-zero class token."""
        _check_unsupported(mode=(mode, ""))
        trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        for name, module in _submodules_depth_first(self):
            init_weights_vit_timm(module, name)

    def _init_weights(self, m):
        # Kept for callers of timm's older API.
        init_weights_vit_timm(m)

    @torch.jit.ignore
    def no_weight_decay(self):
        return {"pos_embed", "cls_token"}

    def _pos_embed(self, x):
        """x with the class token prepended and the position embeddings added (before the class
        token is prepended with no_embed_class: DeiT-3 / big_vision; after, as the original)."""
        if self.no_embed_class:
            x = x + self.pos_embed
        if self.cls_token is not None:
            x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        if not self.no_embed_class:
            x = x + self.pos_embed
        return x

    def forward_features(self, x, all_tokens=True):
        """The final normalized features (batch, tokens, embed_dim) of images x (batch, in_chans,
        H, W); with all_tokens=False and class-token pooling, the class token's only
        (batch, 1, embed_dim)."""
        hidden_states = self._pos_embed(self.patch_embed(x))
        residual = None
        for block in self.blocks[:-1]:
            hidden_states, residual = block(hidden_states, residual)
        class_token_only = self.global_pool == "token" and not all_tokens
        hidden_states, residual = self.blocks[-1](
            hidden_states, residual, mixer_subset=slice(0, 1) if class_token_only else None
        )
        return self._final_add_norm(hidden_states, residual)

    def _final_add_norm(self, hidden_states, residual):
        """norm(drop_path(dropout(hidden_states)) + residual), through the Triton layer norm
        kernel with fused_dropout_add_ln."""
        if not self.fused_dropout_add_ln:
            residual = self.drop_path(self.dropout(hidden_states)) + residual
            return self.norm(residual.to(dtype=self.norm.weight.dtype))
        from flash_attn.ops.triton.layer_norm import layer_norm_fn

        rowscale = None
        if self.training and self.drop_path.p > 0:
            # Stochastic depth as the kernel's per-row scale, drawn per sample.
            ones = torch.ones(hidden_states.shape[:-1], device=hidden_states.device, dtype=hidden_states.dtype)
            rowscale = self.drop_path(ones)
        return layer_norm_fn(
            hidden_states,
            self.norm.weight,
            self.norm.bias,
            residual=residual,
            eps=self.norm.eps,
            dropout_p=self.dropout.p if self.training else 0.0,
            rowscale=rowscale,
            prenorm=False,
        )

    def forward_head(self, x, pre_logits: bool = False):
        """The pooled features (global_pool) through the head, or without it (pre_logits)."""
        if self.global_pool == "avg":
            x = x[:, self.num_prefix_tokens:].mean(dim=1)
        elif self.global_pool == "token":
            x = x[:, 0]
        return x if pre_logits else self.head(x)

    def forward(self, x):
        return self.forward_head(self.forward_features(x, all_tokens=False))

    def load_state_dict(self, state_dict, strict=True):
        """Also loads timm ViT state dicts: the patch embedding's Conv2d weight becomes the
        linear weight, attn.qkv / attn.proj become mixer.Wqkv / mixer.out_proj, and a
        cross-attention last layer's Wqkv is split into Wq and Wkv. The caller's dict is not
        modified."""
        state_dict = rename_keys(
            state_dict,
            (r"^blocks\.(\d+)\.attn\.qkv\.", r"blocks.\1.mixer.Wqkv."),
            (r"^blocks\.(\d+)\.attn\.proj\.", r"blocks.\1.mixer.out_proj."),
        )
        patch_weight = state_dict["patch_embed.proj.weight"]
        if patch_weight.dim() == 4:
            state_dict["patch_embed.proj.weight"] = rearrange(patch_weight, "o c h w -> o (c h w)")
        last = f"blocks.{len(self.blocks) - 1}.mixer"
        if self.blocks[-1].mixer.cross_attn and f"{last}.Wqkv.weight" in state_dict:
            for param in ("weight", "bias"):
                if f"{last}.Wqkv.{param}" in state_dict:
                    wqkv = state_dict.pop(f"{last}.Wqkv.{param}")
                    state_dict[f"{last}.Wq.{param}"] = wqkv[: self.embed_dim]
                    state_dict[f"{last}.Wkv.{param}"] = wqkv[self.embed_dim:]
        return super().load_state_dict(state_dict, strict=strict)


def _submodules_depth_first(module, prefix=""):
    """(name, submodule) for every submodule below module, children before their parents (the
    order of timm's named_apply, which upstream uses, so that a parent's init_weights has the
    last word)."""
    for child_name, child in module.named_children():
        name = f"{prefix}.{child_name}" if prefix else child_name
        yield from _submodules_depth_first(child, name)
        yield name, child


def init_weights_vit_timm(module: nn.Module, name: str = ""):
    """timm's original ViT initialization of one module: truncated-normal (std 0.02) linear
    weights and zero biases; a module with its own init_weights runs that."""
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif hasattr(module, "init_weights"):
        module.init_weights()


def vit_base_patch16_224(pretrained=False, **kwargs):
    """ViT-B/16 (https://arxiv.org/abs/2010.11929): 16x16 patches, width 768, 12 layers of 12
    heads; kwargs go to VisionTransformer. No pretrained weights are bundled (as upstream)."""
    if pretrained:
        raise ValueError(
            "vit_base_patch16_224: pretrained=True is not supported; load a timm checkpoint with "
            "VisionTransformer.load_state_dict"
        )
    return VisionTransformer(patch_size=16, embed_dim=768, depth=12, num_heads=12, **kwargs)
