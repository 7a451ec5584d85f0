"""Decoding state for the kv-cache path of flash_attn.modules.mha.MHA.

Of upstream flash-attn 2.8.3's flash_attn.utils.generation this build provides InferenceParams,
the object MHA reads and writes while decoding. The decoding loops, samplers, GenerationMixin and
the CUDA-graph caches serve the model classes of flash_attn.models, which this build does not
provide; looking them up raises ImportError naming the replacement.
"""

from dataclasses import dataclass, field
from typing import Optional

from torch import Tensor

__all__ = ["InferenceParams"]


@dataclass
class InferenceParams:
    """Where a decoding step stands, shared by every attention layer of a model.

    max_seqlen, max_batch_size: the size of the kv caches that layers allocate on first use.
    seqlen_offset: how many tokens each sequence already has in the cache; the caller advances it
        by the number of tokens fed after each forward (0 means the prompt is being processed).
    batch_size_offset: first batch row of the cache that the current batch writes into.
    key_value_memory_dict: layer_idx -> (max_batch_size, max_seqlen, 2, nheads_kv, head_dim)
        cache, filled by MHA on the prompt step or beforehand from MHA.allocate_inference_cache.
    lengths_per_sample: optional (batch,) int32 tensor of per-sequence cache lengths; where it
        is set, the rotary position and the flash_attn_with_kvcache cache lengths come from it
        instead of seqlen_offset.
    """

    max_seqlen: int
    max_batch_size: int
    seqlen_offset: int = 0
    batch_size_offset: int = 0
    key_value_memory_dict: dict = field(default_factory=dict)
    lengths_per_sample: Optional[Tensor] = None

    def reset(self, max_seqlen, max_batch_size):
        """Starts a new generation with the same caches: the sizes are replaced, the offset and
        the per-sample lengths go back to zero, the cached tensors stay allocated."""
        self.max_seqlen = max_seqlen
        self.max_batch_size = max_batch_size
        self.seqlen_offset = 0
        if self.lengths_per_sample is not None:
            self.lengths_per_sample.zero_()


# Public names of upstream's module that drive flash_attn.models and are not provided here.
_NOT_PROVIDED = frozenset(
    {
        "modify_logits_for_top_k_filtering",
        "modify_logits_for_top_p_filtering",
        "sample",
        "decode",
        "sample_speculative",
        "decode_speculative",
        "GenerationMixin",
        "allocate_inference_cache",
        "DecodingCGCache",
        "update_graph_cache",
        "capture_graph",
        "GreedySearchDecoderOnlyOutput",
        "SampleDecoderOnlyOutput",
    }
)


def __getattr__(name):
    # ImportError rather than AttributeError, so that `from flash_attn.utils.generation import
    # decode` shows this message instead of Python's generic "cannot import name".
    if name in _NOT_PROVIDED:
        raise ImportError(
            f"flash_attn.utils.generation.{name} is not provided by this build of flash_attn "
            "(it drives the model classes of flash_attn.models, which this build lacks); use the "
            "generate() of Hugging Face transformers models instead, or a decoding loop of your "
            "own over MHA with InferenceParams, or flash_attn.flash_attn_with_kvcache."
        )
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
