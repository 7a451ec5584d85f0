"""Reading Hugging Face configs for the model files' config converters.

transformers is imported when a converter runs, not when a model file is imported, so the
remapping functions work without it.
"""


def transformers_module(caller):
    """The transformers package, or an ImportError naming caller (the function that needs it)."""
    try:
        import transformers
    except ImportError as e:
        raise ImportError(
            f"{caller} needs the 'transformers' package (for its configs); install it with "
            "`pip install transformers`"
        ) from e
    return transformers


def rope_parameter(hf_config, key, legacy_names=(), default=None):
    """A rotary setting of hf_config: transformers 5's rope_parameters[key] (what its models
    read), else the attribute under one of legacy_names (transformers 4's rope_theta,
    rotary_pct, ...), else default."""
    rope_parameters = getattr(hf_config, "rope_parameters", None) or {}
    if key in rope_parameters:
        return rope_parameters[key]
    for name in legacy_names:
        if hasattr(hf_config, name):
            return getattr(hf_config, name)
    return default
