"""Neural-network layers built on flash_attn kernels (rotary embeddings)."""
