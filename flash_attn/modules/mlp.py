raise ImportError('flash_attn.modules.mlp (Mlp, GatedMlp, FusedMLP) is not provided by this build of flash_attn; use torch.nn.Linear layers with torch.nn.functional.gelu / silu instead.')
