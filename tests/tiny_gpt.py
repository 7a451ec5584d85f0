"""The GPT2Config-like config of the tiny GPT that the model and generation tests build."""

from types import SimpleNamespace


def tiny_gpt_config(**overrides):
    """A 2-layer, width-64 GPT (4 heads of 16) without dropout; overrides replace or add fields."""
    fields = dict(
        vocab_size=50, n_embd=64, n_head=4, n_layer=2, n_positions=32, n_inner=None,
        activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        layer_norm_epsilon=1e-5, initializer_range=0.02, scale_attn_weights=True,
        scale_attn_by_inverse_layer_idx=False,
    )
    fields.update(overrides)
    return SimpleNamespace(**fields)
