"""Image-to-patch embedding for ViT, with the API of timm's PatchEmbed (as upstream flash-attn
2.8.3's flash_attn.layers.patch_embed).

The patches are cut with a reshape and projected by a linear layer instead of timm's strided
Conv2d: the same map (the conv's kernel, flattened in (channel, row, column) order, is the
linear weight) as one matmul, which is faster on GPUs.
"""

import torch.nn as nn
from einops import rearrange
from torch.nn.modules.utils import _pair

from flash_attn.ops.fused_dense import FusedDense

__all__ = ["PatchEmbed"]


class PatchEmbed(nn.Module):
    """2D image to patch embedding: (batch, in_chans, H, W) -> (batch, num_patches, embed_dim),
    or (batch, H / patch, W / patch, embed_dim) with flatten=False.

    img_size, patch_size: int or (height, width); the image size must be a multiple of the patch
        size in each dimension, and forward accepts only images of img_size.
    norm_layer: a class called as norm_layer(embed_dim) for a norm after the projection, or None.
    fused_bias_fc: project with flash_attn.ops.fused_dense.FusedDense (only with bias, as upstream).
    """

    def __init__(
        self,
        img_size=224,
        patch_size=16,
        in_chans=3,
        embed_dim=768,
        norm_layer=None,
        flatten=True,
        bias=True,
        fused_bias_fc=False,
    ):
        super().__init__()
        img_size = _pair(img_size)
        patch_size = _pair(patch_size)
        for name, size in (("img_size", img_size), ("patch_size", patch_size)):
            if any(not isinstance(s, int) or s <= 0 for s in size):
                raise ValueError(f"{name} must be positive ints, got {size}")
        if img_size[0] % patch_size[0] or img_size[1] % patch_size[1]:
            raise ValueError(
                f"img_size {img_size} must be a multiple of patch_size {patch_size} in each dimension"
            )
        self.img_size = img_size
        self.patch_size = patch_size
        self.grid_size = (img_size[0] // patch_size[0], img_size[1] // patch_size[1])
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.flatten = flatten
        linear_cls = FusedDense if fused_bias_fc and bias else nn.Linear
        self.proj = linear_cls(in_chans * patch_size[0] * patch_size[1], embed_dim, bias=bias)
        self.norm = norm_layer(embed_dim) if norm_layer else nn.Identity()

    def forward(self, x):
        if x.ndim != 4:
            raise ValueError(f"x must be (batch, channels, height, width), got shape {tuple(x.shape)}")
        height, width = x.shape[-2:]
        if (height, width) != self.img_size:
            raise ValueError(
                f"x's image size ({height}, {width}) doesn't match the model's img_size {self.img_size}"
            )
        patches = rearrange(
            x, "b c (h p1) (w p2) -> b h w (c p1 p2)", p1=self.patch_size[0], p2=self.patch_size[1]
        )
        x = self.proj(patches)
        if self.flatten:
            x = rearrange(x, "b h w c -> b (h w) c")
        return self.norm(x)
