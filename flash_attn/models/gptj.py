raise ImportError(
    "flash_attn.models.gptj (GPT-J model definitions and checkpoint remapping) is not provided by this "
    "build of flash_attn; use the model classes of Hugging Face transformers with "
    'attn_implementation="flash_attention_2", which call flash_attn.flash_attn_func / '
    "flash_attn_varlen_func, instead."
)
