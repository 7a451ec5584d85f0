"""flash_attn.utils.generation on CPU with a tiny GPTLMHeadModel (PyTorch attention, float32);
CUDA-graph decoding on a GPU."""

import inspect

import pytest
import torch

from flash_attn.models.gpt import GPTLMHeadModel
from flash_attn.utils import generation
from flash_attn.utils.generation import (
    allocate_inference_cache,
    decode,
    decode_speculative,
    modify_logits_for_top_k_filtering,
    modify_logits_for_top_p_filtering,
    sample,
    sample_speculative,
    update_graph_cache,
)
from helpers import require_kernel
from tiny_gpt import tiny_gpt_config


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return GPTLMHeadModel(tiny_gpt_config(**{"initializer_range": 0.5, **overrides})).eval()


def greedy_by_full_forwards(model, input_ids, max_length):
    """Greedy continuation computed without a kv cache: a full forward per token."""
    sequences = input_ids
    with torch.no_grad():
        while sequences.shape[1] < max_length:
            next_token = model(sequences).logits[:, -1].argmax(-1, keepdim=True)
            sequences = torch.cat([sequences, next_token], dim=1)
    return sequences


def test_upstream_signatures():
    expected = {
        "decode": ["input_ids", "model", "max_length", "top_k", "top_p", "temperature", "eos_token_id",
                   "teacher_outputs", "vocab_size", "tensor_parallel", "cg", "enable_timing"],
        "decode_speculative": ["input_ids", "model", "model_draft", "max_length", "speculative_lookahead", "top_k",
                               "top_p", "temperature", "eos_token_id", "vocab_size", "tensor_parallel", "cg",
                               "enable_timing", "debug"],
        "sample": ["logits", "top_k", "top_p", "temperature"],
        "sample_speculative": ["logits", "logits_draft", "tokens_draft", "top_k", "top_p", "temperature"],
        "update_graph_cache": ["model", "cache", "batch_size", "seqlen_og", "max_seqlen", "decoding_seqlens",
                               "tensor_parallel", "dtype", "n_warmups"],
        "capture_graph": ["model", "inference_params", "batch_size", "max_seqlen", "decoding_seqlen", "mempool",
                          "n_warmups"],
        "allocate_inference_cache": ["max_batch_size", "max_seqlen", "nheads", "headdim", "layers", "device",
                                     "dtype"],
    }
    for name, params in expected.items():
        assert list(inspect.signature(getattr(generation, name)).parameters) == params, name


# ------------------------------------------------------------------------------------------
# Sampling
# ------------------------------------------------------------------------------------------


def test_top_k_filtering():
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0], [0.0, -1.0, 5.0, 6.0]])
    modify_logits_for_top_k_filtering(logits, 2)
    inf = float("-inf")
    assert logits.tolist() == [[inf, 4.0, 3.0, inf], [inf, inf, 5.0, 6.0]]


def test_top_p_filtering_keeps_the_nucleus():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    filtered = logits.clone()
    modify_logits_for_top_p_filtering(filtered, 0.7)
    # 0.5 + 0.3 covers 0.7: the two largest stay.
    assert torch.isfinite(filtered).tolist() == [[True, True, False, False]]
    unchanged = logits.clone()
    modify_logits_for_top_p_filtering(unchanged, 1.0)
    assert torch.equal(unchanged, logits)


def test_top_p_filtering_of_3d_logits_filters_each_row():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.05, 0.15, 0.3, 0.5]]).log().reshape(1, 2, 4)
    modify_logits_for_top_p_filtering(logits, 0.7)
    assert torch.isfinite(logits).tolist() == [[[True, True, False, False], [False, False, True, True]]]


def test_sample():
    logits = torch.randn(6, 30)
    assert torch.equal(sample(logits), logits.argmax(-1))
    original = logits.clone()
    top3 = logits.topk(3, dim=-1).indices
    for _ in range(5):
        token = sample(logits, top_k=3, temperature=0.7)
        assert (top3 == token[:, None]).any(-1).all()
        token = sample(logits, top_k=0, top_p=1e-6)  # the nucleus is the argmax alone
        assert torch.equal(token, logits.argmax(-1))
    assert torch.equal(logits, original)
    with pytest.raises(ValueError, match="top_p"):
        sample(logits, top_k=0, top_p=1.5)


def test_sample_speculative_accepts_drafts_the_model_agrees_with():
    logits = torch.randn(3, 4, 10)
    tokens_draft = logits[:, :3].argmax(-1)
    tokens, num_generated = sample_speculative(logits, logits[:, :3], tokens_draft)
    assert num_generated.tolist() == [4, 4, 4]
    assert torch.equal(tokens, logits.argmax(-1))


def test_sample_speculative_keeps_the_models_distribution():
    # One draft token from a different distribution: the first output token must still follow
    # the model's distribution.
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4])
    probs_draft = torch.tensor([0.4, 0.3, 0.2, 0.1])
    batch = 40000
    logits = probs.log().expand(batch, 2, 4)
    logits_draft = probs_draft.log().expand(batch, 1, 4)
    tokens_draft = torch.multinomial(probs_draft, batch, replacement=True)[:, None]
    tokens, num_generated = sample_speculative(logits, logits_draft, tokens_draft, top_k=0)
    frequencies = torch.bincount(tokens[:, 0], minlength=4).float() / batch
    torch.testing.assert_close(frequencies, probs, atol=0.01, rtol=0)
    assert ((num_generated >= 1) & (num_generated <= 2)).all()


def test_sample_speculative_bad_arguments():
    with pytest.raises(ValueError, match="logits_draft"):
        sample_speculative(torch.randn(1, 3, 5), torch.randn(1, 3, 5), torch.zeros(1, 2, dtype=torch.long))
    with pytest.raises(TypeError, match="tokens_draft"):
        sample_speculative(torch.randn(1, 3, 5), torch.randn(1, 2, 5), torch.zeros(1, 2))


# ------------------------------------------------------------------------------------------
# decode
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides", [dict(), dict(n_head_kv=2), dict(parallel_block=True)])
def test_greedy_decode_matches_full_forwards(overrides):
    model = tiny_model(**overrides)
    input_ids = torch.randint(0, 50, (3, 5))
    out = decode(input_ids, model, max_length=14)
    assert isinstance(out, generation.GreedySearchDecoderOnlyOutput)
    expected = greedy_by_full_forwards(model, input_ids, 14)
    assert torch.equal(out.sequences, expected)
    # Each score is the full forward's logits at the position that produced the token.
    with torch.no_grad():
        full_logits = model(expected).logits
    assert len(out.scores) == 9
    for i, scores in enumerate(out.scores):
        torch.testing.assert_close(scores, full_logits[:, 4 + i], rtol=1e-4, atol=1e-4)


def test_decode_teacher_outputs_eos_and_vocab_size():
    model = tiny_model()
    input_ids = torch.randint(0, 50, (2, 4))
    teacher = torch.randint(0, 50, (2, 8))
    out = decode(input_ids, model, max_length=10, teacher_outputs=teacher)
    assert torch.equal(out.sequences[:, 4:8], teacher[:, 4:8])
    greedy = decode(input_ids, model, max_length=10).sequences
    eos = greedy[0, 5].item()
    stopped = decode(input_ids[:1], model, max_length=10, eos_token_id=eos).sequences
    assert stopped.shape[1] == 6 and stopped[0, -1] == eos
    small_vocab = decode(input_ids, model, max_length=8, vocab_size=10)
    assert (small_vocab.sequences[:, 4:] < 10).all() and small_vocab.scores[0].shape == (2, 10)


def test_sampled_decode_output_type_and_range():
    model = tiny_model()
    out = decode(torch.randint(0, 50, (2, 3)), model, max_length=9, top_k=5, top_p=0.9, temperature=0.8)
    assert isinstance(out, generation.SampleDecoderOnlyOutput)
    assert out.sequences.shape == (2, 9) and ((out.sequences >= 0) & (out.sequences < 50)).all()


def test_generate():
    model = tiny_model()
    input_ids = torch.randint(0, 50, (2, 4))
    sequences = model.generate(input_ids, max_length=9)
    assert torch.equal(sequences, greedy_by_full_forwards(model, input_ids, 9))
    out = model.generate(input_ids, max_length=9, return_dict_in_generate=True)
    assert out.scores is None and torch.equal(out.sequences, sequences)
    out = model.generate(input_ids, max_length=9, return_dict_in_generate=True, output_scores=True)
    assert len(out.scores) == 5


@pytest.mark.parametrize("lookahead", [1, 3])
def test_speculative_greedy_decode_matches_greedy_decode(lookahead):
    model, draft = tiny_model(seed=0), tiny_model(seed=1)
    input_ids = torch.randint(0, 50, (1, 5))
    expected = greedy_by_full_forwards(model, input_ids, 15)
    out = decode_speculative(input_ids, model, draft, max_length=15, speculative_lookahead=lookahead)
    assert torch.equal(out.sequences, expected)
    with torch.no_grad():
        full_logits = model(expected).logits
    assert out.scores.shape == (1, 10, 50)
    torch.testing.assert_close(out.scores, full_logits[:, 4:14], rtol=1e-4, atol=1e-4)
    # A draft model identical to the model is always right.
    same = decode_speculative(input_ids, model, model, max_length=15, speculative_lookahead=lookahead)
    assert torch.equal(same.sequences, expected)


def test_speculative_decode_limits():
    model = tiny_model()
    with pytest.raises(ValueError, match="batch size 1"):
        decode_speculative(torch.zeros(2, 3, dtype=torch.long), model, model, 8)
    with pytest.raises(ValueError, match="eos_token_id"):
        decode_speculative(torch.zeros(1, 3, dtype=torch.long), model, model, 8, eos_token_id=0)


def test_allocate_inference_cache():
    cache = allocate_inference_cache(2, 16, 4, 8, [3, 5], "cpu", torch.float32)
    assert set(cache) == {3, 5} and cache[3].shape == (2, 16, 2, 4, 8)
    assert set(allocate_inference_cache(1, 4, 1, 8, 2, "cpu")) == {0, 1}
    with pytest.raises(ValueError, match="dtype"):
        allocate_inference_cache(1, 4, 1, 8, 2, "cpu", torch.int8)


def test_cuda_graphs_need_a_cuda_model():
    with pytest.raises(ValueError, match="CUDA"):
        update_graph_cache(tiny_model(), None, 1, 4, 8)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_decode_matches_eager_decode():
    pytest.importorskip("flash_attn_2_cuda")
    require_kernel(16, torch.float16)  # the tiny model's heads
    model = tiny_model(use_flash_attn=True).to("cuda", torch.float16)
    input_ids = torch.randint(0, 50, (2, 6), device="cuda")
    eager = decode(input_ids, model, max_length=20)
    graphed = decode(input_ids, model, max_length=20, cg=True)
    assert torch.equal(graphed.sequences, eager.sequences)
    # The cached graphs are reused by a second call of the same sizes.
    callables = dict(model._decoding_cache.callables)
    again = decode(input_ids, model, max_length=20, cg=True)
    assert torch.equal(again.sequences, eager.sequences) and model._decoding_cache.callables == callables
