"""Triton kernels: rotary embedding, layer/RMS norm, cross entropy. Importing a submodule imports triton."""
