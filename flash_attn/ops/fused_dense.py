raise ImportError('flash_attn.ops.fused_dense (the fused_dense_lib CUDA extension) is not provided by this build of flash_attn; use torch.nn.functional.linear / torch.nn.Linear instead.')
