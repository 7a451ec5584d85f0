"""Loss functions with fused Triton kernels."""
