"""Reading the fields of a GPT2Config-like config, shared by the model files.

A config is any object with the attributes of transformers.GPT2Config. GPT2Config answers to two
names for four of its fields (hidden_size and n_embd, ...); a plain object (e.g. a
types.SimpleNamespace) may have either, so these helpers look for both.
"""

import math

# GPT2Config's attribute_map: each long name and the short attribute it stands for, both ways.
_ALIASES = {
    "hidden_size": "n_embd",
    "num_attention_heads": "n_head",
    "num_hidden_layers": "n_layer",
    "max_position_embeddings": "n_positions",
}
_ALIASES.update({short: long for long, short in list(_ALIASES.items())})

_MISSING = object()


def config_value(config, name, default=_MISSING):
    """config.name, or the same field under GPT2Config's other name for it; default where
    neither exists (AttributeError without a default)."""
    for attr in (name, _ALIASES.get(name)):
        if attr is not None and hasattr(config, attr):
            return getattr(config, attr)
    if default is not _MISSING:
        return default
    also = f" (nor {_ALIASES[name]!r})" if name in _ALIASES else ""
    raise AttributeError(f"the config has no attribute {name!r}{also}")


def missing_fields(config, names):
    """The names of names that config has under neither of their names."""
    absent = object()
    return [name for name in names if config_value(config, name, absent) is absent]


def padded_vocab_size(config):
    """config.vocab_size rounded up to a multiple of config.pad_vocab_size_multiple (default 1)."""
    multiple = getattr(config, "pad_vocab_size_multiple", 1)
    return math.ceil(config.vocab_size / multiple) * multiple


def num_heads_kv(config):
    """config.n_head_kv, or the number of query heads where it is absent or None."""
    n_head_kv = getattr(config, "n_head_kv", None)
    return config_value(config, "n_head") if n_head_kv is None else n_head_kv


def attention_head_dim(config):
    """config.head_dim, or hidden_size / num_attention_heads."""
    return getattr(config, "head_dim", config_value(config, "hidden_size") // config_value(config, "n_head"))
