"""Autoregressive decoding for the models of flash_attn.models, with the API of upstream
flash-attn 2.8.3's flash_attn.utils.generation: InferenceParams (the kv-cache state MHA reads
and writes), greedy / top-k / top-p sampling, decode and speculative decoding over a model called
as model(input_ids, position_ids=..., inference_params=..., num_last_tokens=...).logits,
GenerationMixin, and the CUDA-graph cache that replays a captured decoding step.
"""

import gc
import time
from collections import namedtuple
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "InferenceParams",
    "GreedySearchDecoderOnlyOutput",
    "SampleDecoderOnlyOutput",
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
]

# What decode returns: sequences (batch, max_length) with the prompt, and scores, one
# (batch, vocab_size) logits tensor per generated token.
GreedySearchDecoderOnlyOutput = namedtuple("GreedySearchDecoderOnlyOutput", ["sequences", "scores"])
SampleDecoderOnlyOutput = namedtuple("SampleDecoderOnlyOutput", ["sequences", "scores"])


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


def modify_logits_for_top_k_filtering(logits, top_k):
    """Sets every logit below the top_k-th largest of its row to -inf, in place."""
    kth_largest = torch.topk(logits, top_k)[0][..., -1:]
    logits.masked_fill_(logits < kth_largest, float("-inf"))


def modify_logits_for_top_p_filtering(logits, top_p):
    """Keeps the smallest set of largest logits of each row whose probabilities add up to more
    than top_p, setting the others to -inf, in place. No-op for top_p <= 0 or >= 1."""
    if top_p <= 0.0 or top_p >= 1.0:
        return
    sorted_logits, sorted_indices = torch.sort(logits, descending=False)
    cumulative_probs = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    # Ascending order: the tokens whose cumulative mass (their own included) stays within 1 - top_p
    # are the tail outside the nucleus; the largest logit is always kept.
    sorted_to_remove = cumulative_probs <= (1 - top_p)
    to_remove = sorted_to_remove.scatter(-1, sorted_indices, sorted_to_remove)
    logits.masked_fill_(to_remove, float("-inf"))


def _check_top_p(top_p):
    if top_p > 1.0:
        raise ValueError(f"top_p must be in (0, 1] (or <= 0 for no top-p filtering), got {top_p}")


def sample(logits, top_k=1, top_p=0.0, temperature=1.0):
    """Next tokens (batch,) from logits (batch, vocab_size).

    top_k=1 is greedy (argmax); top_k=0 samples from the whole vocabulary; top_k > 1 from the
    top_k largest logits. top_p in (0, 1) then restricts the candidates to the nucleus (applied
    after top-k). temperature divides the logits first. logits is not modified.
    """
    if top_k == 1:
        return logits.argmax(dim=-1)
    _check_top_p(top_p)
    if top_k > 0:
        top_k = min(top_k, logits.size(-1))
        logits_top, indices = torch.topk(logits, top_k, dim=-1)
        if temperature != 1.0:
            logits_top /= temperature
        modify_logits_for_top_p_filtering(logits_top, top_p)
        choice = torch.multinomial(torch.softmax(logits_top, dim=-1), num_samples=1)
        return indices.gather(-1, choice).squeeze(dim=-1)
    logits_top = logits / temperature if temperature != 1.0 else logits.clone()
    modify_logits_for_top_p_filtering(logits_top, top_p)
    return torch.multinomial(torch.softmax(logits_top, dim=-1), num_samples=1).squeeze(dim=-1)


def _output_cls(top_k):
    return GreedySearchDecoderOnlyOutput if top_k == 1 else SampleDecoderOnlyOutput


class _Timer:
    """Wall time of prompt processing + decoding, printed when enable_timing: the GPUs are
    synchronized (and the tensor-parallel ranks meet at a barrier) at both ends."""

    def __init__(self, enabled, tensor_parallel):
        self.enabled, self.tensor_parallel = enabled, tensor_parallel

    def _sync(self):
        if self.tensor_parallel > 1:
            torch.distributed.barrier()
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def start(self):
        if self.enabled:
            self._sync()
            self.t0 = time.perf_counter()

    def stop(self):
        if self.enabled:
            self._sync()
            print(f"Prompt processing + decoding time: {(time.perf_counter() - self.t0) * 1000:.0f}ms")
        return self.enabled


def _graph_cache(model, batch_size, seqlen_og, max_length, tensor_parallel, decoding_seqlens=(1,)):
    """model's CUDA-graph decoding cache, captured (or reused) for these sizes, with its
    InferenceParams reset for a new generation."""
    model._decoding_cache = update_graph_cache(
        model,
        getattr(model, "_decoding_cache", None),
        batch_size,
        seqlen_og,
        max_length,
        decoding_seqlens=decoding_seqlens,
        tensor_parallel=tensor_parallel,
    )
    inference_params = model._decoding_cache.inference_params
    inference_params.reset(max_length, batch_size)
    return inference_params


@torch.inference_mode()
def decode(
    input_ids,
    model,
    max_length,
    top_k=1,
    top_p=0.0,
    temperature=1.0,
    eos_token_id=None,
    teacher_outputs=None,
    vocab_size=None,
    tensor_parallel=1,
    cg=False,
    enable_timing=False,
):
    """Greedy decoding, or sampling with top-k / top-p (see sample), with the model's kv cache.

    Every sequence of the batch has the prompt's length. The prompt is processed in one forward,
    then one token per forward until the sequences are max_length long or, with eos_token_id,
    every sequence has just produced it.

    Arguments:
        input_ids: (batch, seq_len) prompt.
        max_length: length of the returned sequences, prompt included.
        teacher_outputs (optional): (batch, >= seq_len) tokens; position i of the output is taken
            from teacher_outputs[:, i] instead of being sampled, where it exists (for testing).
        vocab_size: keeps only the first vocab_size logits (drops a padded vocabulary's extra rows).
        tensor_parallel: number of ranks the model is split over (for the barriers and the cache).
        cg: replays the decoding step as a CUDA graph (the model must be on a CUDA device).
        enable_timing: prints the time taken.
    Returns: GreedySearchDecoderOnlyOutput (top_k == 1) or SampleDecoderOnlyOutput, with
        sequences: (batch, max_length) and scores: tuple of (batch, vocab_size) logits, one per
        generated token.
    """
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be (batch, seq_len), got shape {tuple(input_ids.shape)}")
    batch_size, seqlen_og = input_ids.shape
    teacher_output_len = teacher_outputs.shape[1] if teacher_outputs is not None else 0
    if cg:
        inference_params = _graph_cache(model, batch_size, seqlen_og, max_length, tensor_parallel)
    else:
        inference_params = InferenceParams(max_seqlen=max_length, max_batch_size=batch_size)

    def get_logits(input_ids):
        decoding = inference_params.seqlen_offset > 0
        if not decoding:
            logits = model(input_ids, position_ids=None, inference_params=inference_params,
                           num_last_tokens=1).logits.squeeze(dim=1)
        else:
            position_ids = torch.full((batch_size, 1), inference_params.seqlen_offset,
                                      dtype=torch.long, device=input_ids.device)
            if cg:
                logits = model._decoding_cache.run(input_ids, position_ids, inference_params.seqlen_offset)
            else:
                logits = model(input_ids, position_ids=position_ids, inference_params=inference_params,
                               num_last_tokens=1).logits
            logits = logits.squeeze(dim=1)
        return logits[..., :vocab_size] if vocab_size is not None else logits

    def next_token(logits):
        position = inference_params.seqlen_offset
        if teacher_output_len > position:
            token = teacher_outputs[:, position]
        else:
            token = sample(logits, top_k=top_k, top_p=top_p, temperature=temperature)
        return token.unsqueeze(1)

    def finished(last_tokens):
        if inference_params.seqlen_offset == 0:
            return False
        if eos_token_id is not None and (last_tokens == eos_token_id).all():
            return True
        return inference_params.seqlen_offset >= max_length - 1

    timer = _Timer(enable_timing, tensor_parallel)
    timer.start()
    scores, sequences = [], [input_ids]
    while not finished(sequences[-1]):
        scores.append(get_logits(sequences[-1]))
        inference_params.seqlen_offset += sequences[-1].shape[1]
        sequences.append(next_token(scores[-1]))
    timer.stop()
    return _output_cls(top_k)(sequences=torch.cat(sequences, dim=1), scores=tuple(scores))


def sample_speculative(logits, logits_draft, tokens_draft, top_k=1, top_p=0.0, temperature=1.0):
    """Speculative sampling (Algorithm 1 of Leviathan, Kalman, Matias, "Fast Inference from
    Transformers via Speculative Decoding", https://arxiv.org/abs/2211.17192).

    Draft token i is accepted with probability min(1, p(token) / q(token)), p the model's and q
    the draft model's distribution after top-k / top-p / temperature; the first rejected one is
    replaced by a sample from max(p - q, 0), and if all are accepted one more token is sampled
    from the model's last distribution.

    Arguments:
        logits: (batch_size, seqlen + 1, vocab_size), the model's logits at the draft positions
            and after the last draft token.
        logits_draft: (batch_size, seqlen, vocab_size)
        tokens_draft: (batch_size, seqlen) int64 / int32
    Return:
        tokens: (batch_size, seqlen + 1), the accepted draft tokens then the resampled token;
            entries past num_generated_tokens are meaningless.
        num_generated_tokens: (batch_size,) in [1, seqlen + 1], the valid tokens of each row.
    """
    batch, seqlen_p_1, vocab_size = logits.shape
    seqlen = seqlen_p_1 - 1
    if logits_draft.shape != (batch, seqlen, vocab_size):
        raise ValueError(
            f"logits_draft must be {(batch, seqlen, vocab_size)}, got {tuple(logits_draft.shape)}"
        )
    if tokens_draft.shape != (batch, seqlen):
        raise ValueError(f"tokens_draft must be {(batch, seqlen)}, got {tuple(tokens_draft.shape)}")
    if tokens_draft.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"tokens_draft must be int64 or int32, got {tokens_draft.dtype}")
    _check_top_p(top_p)
    # Copies, so that the filtering below leaves the caller's logits alone.
    logits = logits / temperature if temperature != 1.0 else logits.clone()
    logits_draft = logits_draft / temperature if temperature != 1.0 else logits_draft.clone()
    if top_k > 0:
        top_k = min(top_k, vocab_size)
        modify_logits_for_top_k_filtering(logits, top_k)
        modify_logits_for_top_k_filtering(logits_draft, top_k)
    modify_logits_for_top_p_filtering(logits, top_p)
    modify_logits_for_top_p_filtering(logits_draft, top_p)
    probs = torch.softmax(logits, dim=-1)
    probs_draft = torch.softmax(logits_draft, dim=-1)
    at_tokens = lambda p: p.gather(-1, tokens_draft.long().unsqueeze(-1)).squeeze(-1)
    uniform = torch.rand(batch, seqlen, device=probs.device)
    accepted = uniform * at_tokens(probs_draft) <= at_tokens(probs[:, :-1])  # (batch, seqlen)
    first_rejected_idx = torch.where(
        accepted.all(dim=-1), seqlen, accepted.int().argmin(dim=-1)
    )  # (batch,)
    # torch.multinomial normalizes, so max(p - q, 0) need not be.
    resample_probs = torch.cat([torch.clamp(probs[:, :-1] - probs_draft, min=0.0), probs[:, -1:]], dim=1)
    rows = torch.arange(batch, device=logits.device)
    resample = torch.multinomial(resample_probs[rows, first_rejected_idx], num_samples=1).squeeze(-1)
    tokens = F.pad(tokens_draft, (0, 1))
    tokens[rows, first_rejected_idx] = resample.to(tokens.dtype)
    return tokens, first_rejected_idx + 1


@torch.inference_mode()
def decode_speculative(
    input_ids,
    model,
    model_draft,
    max_length,
    speculative_lookahead=3,
    top_k=1,
    top_p=0.0,
    temperature=1.0,
    eos_token_id=None,
    vocab_size=None,
    tensor_parallel=1,
    cg=False,
    enable_timing=False,
    debug=False,
):
    """Speculative decoding: model_draft proposes up to speculative_lookahead tokens, model checks
    them in one forward and keeps a prefix (sample_speculative), so that the output has the
    distribution of decoding with model alone. Greedy, or sampling with top-k / top-p.

    Only batch size 1 and eos_token_id=None are supported (as upstream).

    Arguments:
        input_ids: (1, seq_len)
        max_length: length of the returned sequence, prompt included.
        debug: prints, after every step, the largest difference between the cached logits and
            those of a full forward of each model.
    Returns: GreedySearchDecoderOnlyOutput or SampleDecoderOnlyOutput, with
        sequences: (1, max_length) and scores: (1, max_length - seq_len, vocab_size), the model's
        logits for every generated token.
    """
    batch_size, seqlen_og = input_ids.shape
    if batch_size != 1:
        raise ValueError(f"decode_speculative supports only batch size 1, got {batch_size}")
    if eos_token_id is not None:
        raise ValueError("decode_speculative does not support eos_token_id")
    if cg:
        # The draft model feeds 1 or 2 tokens per step, the model 1 to lookahead + 1.
        params_draft = _graph_cache(model_draft, batch_size, seqlen_og, max_length, tensor_parallel,
                                    decoding_seqlens=(1, 2))
        params = _graph_cache(model, batch_size, seqlen_og, max_length, tensor_parallel,
                              decoding_seqlens=range(1, speculative_lookahead + 2))
    else:
        params_draft = InferenceParams(max_seqlen=max_length, max_batch_size=batch_size)
        params = InferenceParams(max_seqlen=max_length, max_batch_size=batch_size)

    def get_logits(input_ids, inference_params, model, num_last_tokens=1):
        """The logits of the last num_last_tokens of input_ids, fed at inference_params'
        offset."""
        offset = inference_params.seqlen_offset
        if offset == 0:
            logits = model(input_ids, position_ids=None, inference_params=inference_params,
                           num_last_tokens=num_last_tokens).logits
        else:
            position_ids = offset + torch.arange(input_ids.shape[1], dtype=torch.long,
                                                 device=input_ids.device).expand(batch_size, -1)
            if cg:
                # The graph returns the logits of every token fed.
                logits = model._decoding_cache.run(input_ids, position_ids, offset)[:, -num_last_tokens:]
            else:
                logits = model(input_ids, position_ids=position_ids, inference_params=inference_params,
                               num_last_tokens=num_last_tokens).logits
        return logits[..., :vocab_size] if vocab_size is not None else logits

    sample_fn = partial(sample, top_k=top_k, top_p=top_p, temperature=temperature)

    def sample_tokens(input_ids, model, inference_params, num_tokens):
        """Feeds input_ids, then samples num_tokens tokens one forward at a time. Returns the
        tokens (batch, num_tokens) and the logits each was sampled from (batch, num_tokens,
        vocab_size); the last token is not fed."""
        sequences, scores = [input_ids], []
        for _ in range(num_tokens):
            scores.append(get_logits(sequences[-1], inference_params, model)[:, -1])
            inference_params.seqlen_offset += sequences[-1].shape[1]
            sequences.append(sample_fn(scores[-1]).unsqueeze(1))
        return torch.cat(sequences[1:], dim=1), torch.stack(scores, dim=1)

    def check_against_full_forward(name, model, ids, logits):
        if debug:
            ref = model(ids, num_last_tokens=logits.shape[1]).logits
            print(f"{name}: max |cached - full forward| = {(logits - ref).abs().max().item():.3g}")

    timer = _Timer(enable_timing, tensor_parallel)
    timer.start()
    sequences, scores = [input_ids], []
    num_main_model_calls, num_draft_tokens, num_accepted = 0, 0, 0
    # The model's cache holds every token but the last of `sequences`. The draft model's cache
    # holds one fewer when the last step accepted a draft token: the draft model never fed its
    # own last draft token, so that token and the model's new one are fed next time.
    while True:
        generated = torch.cat(sequences, dim=1)
        if scores and generated.shape[1] >= max_length:
            break
        if generated.shape[1] >= max_length - 1:
            # Room for one token only: sample it from the model.
            new_ids = generated if params.seqlen_offset == 0 else generated[:, -1:]
            tokens, scores_new = sample_tokens(new_ids, model, params, num_tokens=1)
            sequences.append(tokens)
            scores.append(scores_new)
            break
        n_spec_tokens = min(speculative_lookahead, max_length - generated.shape[1] - 1)
        if params_draft.seqlen_offset == 0:
            draft_input = generated
        else:
            draft_input = generated[:, params_draft.seqlen_offset - generated.shape[1]:]
        tokens_draft, scores_draft = sample_tokens(draft_input, model_draft, params_draft, n_spec_tokens)
        num_draft_tokens += n_spec_tokens
        check_against_full_forward(
            "draft", model_draft, torch.cat([generated, tokens_draft[:, :-1]], dim=1), scores_draft
        )
        main_input = generated if params.seqlen_offset == 0 else generated[:, -1:]
        logits = get_logits(torch.cat([main_input, tokens_draft], dim=1), params, model,
                            num_last_tokens=n_spec_tokens + 1)
        num_main_model_calls += 1
        check_against_full_forward("model", model, torch.cat([generated, tokens_draft], dim=1), logits)
        tokens, num_generated_tokens = sample_speculative(
            logits, scores_draft, tokens_draft, top_k=top_k, top_p=top_p, temperature=temperature
        )
        num_generated = num_generated_tokens[0].item()
        num_accepted += num_generated - 1
        sequences.append(tokens[:1, :num_generated])
        scores.append(logits[:1, :num_generated])
        # The model fed the new tokens but the last one; the draft model fed the accepted draft
        # tokens but its last one (when any was accepted).
        params.seqlen_offset = generated.shape[1] + num_generated - 1
        params_draft.seqlen_offset = params.seqlen_offset - 1 if num_generated > 1 else params.seqlen_offset
    if timer.stop():
        print(f"Number of calls to main model: {num_main_model_calls}")
        if num_draft_tokens:
            print(f"Acceptance rate: {num_accepted / num_draft_tokens * 100:.2f}%")
    sequences = torch.cat(sequences, dim=1)
    scores = torch.cat(scores, dim=1)
    return _output_cls(top_k)(sequences=sequences, scores=scores)


class GenerationMixin:
    """generate() for a model class whose forward has decode's calling convention."""

    def allocate_inference_cache(self, batch_size, max_seqlen, dtype=None, **kwargs):
        raise NotImplementedError

    def generate(
        self,
        input_ids,
        max_length,
        top_k=1,
        top_p=0.0,
        temperature=1.0,
        return_dict_in_generate=False,
        output_scores=False,
        **kwargs,
    ):
        """decode(input_ids, self, max_length, ...): the sequences (batch, max_length), or with
        return_dict_in_generate decode's output tuple, whose scores are None unless
        output_scores."""
        output = decode(
            input_ids, self, max_length, top_k=top_k, top_p=top_p, temperature=temperature, **kwargs
        )
        if not output_scores:
            output = output._replace(scores=None)
        return output if return_dict_in_generate else output.sequences


def allocate_inference_cache(
    max_batch_size,
    max_seqlen,
    nheads,
    headdim,
    layers: Union[int, Sequence],
    device,
    dtype=torch.float16,
):
    """An uninitialized (max_batch_size, max_seqlen, 2, nheads, headdim) kv cache for each layer
    (layers: a count, or the layer indices), as InferenceParams.key_value_memory_dict."""
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"dtype must be float16, bfloat16 or float32, got {dtype}")
    kv_cache_shape = (max_batch_size, max_seqlen, 2, nheads, headdim)
    if isinstance(layers, int):
        layers = range(layers)
    return {i: torch.empty(kv_cache_shape, device=device, dtype=dtype) for i in layers}


@dataclass
class DecodingCGCache:
    """A model's captured decoding steps: callables maps (batch_size, decoding_seqlen) to a
    replay function; run(input_ids, position_ids, seqlen_offset) dispatches on input_ids' shape.
    device, dtype and mempool are plain attributes, as upstream (not constructor arguments)."""

    max_batch_size: int = 0
    max_seqlen: int = 0
    device = None
    dtype = None
    callables: dict = field(default_factory=dict)
    mempool = None
    inference_params: Optional[InferenceParams] = None
    run: Optional[Callable] = None


def _model_inference_cache(model, batch_size, max_seqlen, dtype, device, tensor_parallel):
    if hasattr(model, "allocate_inference_cache"):
        return model.allocate_inference_cache(batch_size, max_seqlen, dtype)
    config = model.config
    headdim = getattr(config, "head_dim", config.hidden_size // config.num_attention_heads)
    return allocate_inference_cache(
        batch_size,
        max_seqlen,
        config.num_attention_heads // tensor_parallel,
        headdim,
        config.num_hidden_layers,
        device,
        dtype,
    )


@torch.inference_mode()
def update_graph_cache(
    model,
    cache,
    batch_size,
    seqlen_og,
    max_seqlen,
    decoding_seqlens=(1,),
    tensor_parallel=1,
    dtype=None,
    n_warmups=2,
):
    """cache (a DecodingCGCache, or None for a new one) with a CUDA graph of model's decoding
    step for each of decoding_seqlens at batch_size. The kv cache and graphs are rebuilt when the
    model's device or dtype changed or the batch size or max_seqlen grew; otherwise captured
    graphs are reused."""
    if cache is None:
        cache = DecodingCGCache()
    param_example = next(iter(model.parameters()))
    device = param_example.device
    if device.type != "cuda":
        raise ValueError(f"CUDA-graph decoding (cg=True) needs a model on a CUDA device, got {device}")
    if dtype is None:
        dtype = param_example.dtype
    if (
        (device, dtype) != (cache.device, cache.dtype)
        or batch_size > cache.max_batch_size
        or max_seqlen > cache.max_seqlen
    ):
        cache.callables = {}
        cache.mempool = None
        cache.inference_params = None
        gc.collect()  # frees the old graphs' memory pool before the new capture
        cache.device, cache.dtype = device, dtype
        cache.max_batch_size, cache.max_seqlen = batch_size, max_seqlen
        kv_cache = _model_inference_cache(model, batch_size, max_seqlen, dtype, device, tensor_parallel)
        cache.inference_params = InferenceParams(
            max_seqlen=max_seqlen,
            max_batch_size=batch_size,
            seqlen_offset=seqlen_og,
            key_value_memory_dict=kv_cache,
            lengths_per_sample=torch.full((batch_size,), seqlen_og, dtype=torch.int32, device=device),
        )
        cache.mempool = torch.cuda.graphs.graph_pool_handle()
    for decoding_seqlen in decoding_seqlens:
        if (batch_size, decoding_seqlen) not in cache.callables:
            cache.callables[batch_size, decoding_seqlen] = capture_graph(
                model,
                cache.inference_params,
                batch_size,
                max_seqlen,
                decoding_seqlen=decoding_seqlen,
                mempool=cache.mempool,
                n_warmups=n_warmups,
            )

    def dispatch(input_ids, position_ids, seqlen):
        batch_size, decoding_seqlen = input_ids.shape[:2]
        return cache.callables[batch_size, decoding_seqlen](input_ids, position_ids, seqlen)

    cache.run = dispatch
    cache.inference_params.seqlen_offset = 0
    return cache


def capture_graph(
    model, inference_params, batch_size, max_seqlen, decoding_seqlen=1, mempool=None, n_warmups=2
):
    """Captures one decoding step of decoding_seqlen tokens as a CUDA graph. Returns
    run(input_ids, position_ids, seqlen) that copies the inputs into the graph's buffers, sets
    every sample's cache length to seqlen, replays the graph and returns a copy of the logits
    (batch_size, decoding_seqlen, vocab_size).

    The step reads the cache lengths from inference_params.lengths_per_sample (the graph cannot
    see seqlen_offset change); the capture runs at the largest offset so that every kernel is
    sized for a full cache.
    """
    device = next(iter(model.parameters())).device
    if device.type != "cuda":
        raise ValueError(f"capture_graph needs a model on a CUDA device, got {device}")
    if inference_params.lengths_per_sample is None:
        raise ValueError("capture_graph needs inference_params.lengths_per_sample (a (batch,) int32 tensor)")
    input_ids = torch.full((batch_size, decoding_seqlen), 0, dtype=torch.long, device=device)
    position_ids = torch.full((batch_size, decoding_seqlen), 0, dtype=torch.long, device=device)
    seqlen_offset_og = inference_params.seqlen_offset
    inference_params.seqlen_offset = max_seqlen - decoding_seqlen
    inference_params.lengths_per_sample[:] = inference_params.seqlen_offset

    def step():
        return model(
            input_ids,
            position_ids=position_ids,
            inference_params=inference_params,
            num_last_tokens=decoding_seqlen,
        ).logits

    # Warm up on a side stream, as CUDA graph capture requires.
    side_stream = torch.cuda.Stream()
    side_stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side_stream):
        for _ in range(n_warmups):
            step()
        side_stream.synchronize()
        # Keeps graph launches and uncaptured NCCL calls of the ranks from overlapping.
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
    torch.cuda.current_stream().wait_stream(side_stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=mempool):
        logits = step()

    def run(new_input_ids, new_position_ids, seqlen):
        inference_params.lengths_per_sample[:] = seqlen
        input_ids.copy_(new_input_ids)
        position_ids.copy_(new_position_ids)
        graph.replay()
        return logits.clone()

    inference_params.seqlen_offset = seqlen_offset_og
    return run
