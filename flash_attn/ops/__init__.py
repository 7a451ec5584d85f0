"""Fused operations outside attention; the Triton kernels live in flash_attn.ops.triton."""
