"""The lean sampler (lit_align.sampling) against transformers `generate` on the tiny model:
greedy ids equal, EOS ends rows, seeds reproduce, filters keep what HF's warpers keep."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

from lit_align.generation import HFGenerator, SamplingConfig
from lit_align.sampling import LeanGenerator, draw, filter_logits, outside_nucleus, sample_ids, shared_prefix_length

PROMPTS = [
    "Human: How do I keep my sourdough starter alive while I am away for two weeks?\n\nAssistant:",
    "Human: hi\n\nAssistant:",
    "Human: Write a short poem about rain on a tin roof.\n\nAssistant:",
]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    return model, tokenizer


def eos_prone(tiny, bias: float):
    """The tiny model with a bias towards EOS in its LM head, so rows end at different steps."""
    model, tokenizer = tiny
    model = AutoModelForCausalLM.from_config(model.config).eval()
    model.load_state_dict(tiny[0].state_dict())
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.zero_()
        head.bias[tokenizer.eos_token_id] = bias
    model.lm_head = head
    return model, tokenizer


def both(model, tokenizer, sampling, n=1, seed=0):
    hf, lean = HFGenerator(model, tokenizer), LeanGenerator(model, tokenizer)
    ids, mask = hf.encode_prompts(PROMPTS)
    assert not mask.all()  # left padding is exercised
    return hf.generate_ids(ids, mask, sampling, n, seed), lean.generate_ids(ids, mask, sampling, n, seed)


@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_greedy_ids_equal_generate(tiny, penalty):
    hf, lean = both(*tiny, SamplingConfig(max_new_tokens=24, temperature=0.0, repetition_penalty=penalty))
    assert torch.equal(hf.completion_ids, lean.completion_ids)
    assert hf.texts == lean.texts


def test_greedy_with_eos_equals_generate(tiny):
    hf, lean = both(*eos_prone(tiny, 0.1), SamplingConfig(max_new_tokens=24, temperature=0.0))
    assert lean.completion_mask.sum(1).min() < 24 and lean.truncated.any()  # some rows end early, some do not
    for field in ("completion_ids", "completion_mask", "truncated", "prompt_ids", "prompt_mask"):
        assert torch.equal(getattr(hf, field), getattr(lean, field)), field


def test_sampling_is_seeded_and_ends_rows_at_eos(tiny):
    model, tokenizer = eos_prone(tiny, 1.0)  # most rows end before 40 tokens, a few do not
    lean = LeanGenerator(model, tokenizer)
    ids, mask = lean.encode_prompts(PROMPTS)
    sampling = SamplingConfig(max_new_tokens=40, temperature=1.0, top_p=0.95, top_k=50)
    state = torch.get_rng_state()
    a = lean.generate_ids(ids, mask, sampling, 4, generator_seed=7)
    assert torch.equal(torch.get_rng_state(), state)  # a private generator: the global RNG is untouched
    b = lean.generate_ids(ids, mask, sampling, 4, generator_seed=7)
    c = lean.generate_ids(ids, mask, sampling, 4, generator_seed=8)
    assert torch.equal(a.completion_ids, b.completion_ids) and a.texts == b.texts
    assert not torch.equal(a.completion_ids[:, : c.completion_ids.shape[1]], c.completion_ids[:, : a.completion_ids.shape[1]])
    assert a.completion_ids.shape[0] == 12 and torch.equal(a.prompt_ids, ids.repeat_interleave(4, 0))
    assert len({tuple(r.tolist()) for r in a.completion_ids[:4]}) > 1  # one prompt, different completions
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    lengths = a.completion_mask.sum(1)
    assert (~a.truncated).sum() >= 6 and len(set(lengths.tolist())) > 3
    for row, length, truncated in zip(a.completion_ids, lengths, a.truncated):
        if truncated:
            assert length == row.shape[0] and eos not in row.tolist()
        else:  # the mask covers the completion up to and including its first EOS; pads follow
            assert row[length - 1] == eos and eos not in row[: length - 1].tolist()
            assert (row[length:] == pad).all()
    ended = LeanGenerator(*eos_prone(tiny, 2.5)).generate_ids(ids, mask, sampling, 4, generator_seed=7)
    assert not ended.truncated.any()  # every row ended: decoding stopped at the last row's EOS
    assert ended.completion_ids.shape[1] == int(ended.completion_mask.sum(1).max()) < 40


SYSTEM = "You answer questions about baking bread, briefly and kindly, in plain words, and you never make up facts."


def test_shared_prefix_is_prefilled_once_and_greedy_equals_generate(tiny):
    """Prompts behind one long system message: the prefix is prefilled once, each row's rest after
    it (left-padded), and greedy decoding still gives transformers' ids."""
    model, tokenizer = tiny
    lean, hf = LeanGenerator(model, tokenizer), HFGenerator(model, tokenizer)
    ids, mask = lean.encode_prompts([[{"role": "system", "content": SYSTEM}, {"role": "user", "content": p}] for p in PROMPTS])
    prefix = shared_prefix_length(ids, mask)
    assert prefix >= 16 and prefix < int(mask.sum(-1).min())  # every row keeps a token of its own
    sampling = SamplingConfig(max_new_tokens=24, temperature=0.0)
    calls = []
    hook = model.register_forward_pre_hook(lambda m, args, kwargs: calls.append(kwargs["input_ids"].shape), with_kwargs=True)
    try:
        lean_out = lean.generate_ids(ids, mask, sampling)
    finally:
        hook.remove()
    assert calls[0] == (1, prefix) and calls[1] == (3, int(mask.sum(-1).max()) - prefix)
    assert torch.equal(lean_out.completion_ids, hf.generate_ids(ids, mask, sampling).completion_ids)
    unshared = sample_ids(model, ids, mask, sampling, 1, tokenizer.eos_token_id, tokenizer.pad_token_id,
                          min_shared_prefix=10**9)
    assert torch.equal(lean_out.completion_ids, unshared)


def test_shared_prefix_needs_left_padded_rows_alike():
    ids = torch.tensor([[0, 5, 6, 7, 8], [5, 6, 7, 9, 9], [0, 0, 5, 6, 1]])
    mask = (ids != 0).long()
    assert shared_prefix_length(ids, mask) == 2  # "5 6", and the shortest row keeps its "1"
    assert shared_prefix_length(ids[:1], mask[:1]) == 0  # one row: nothing to share
    assert shared_prefix_length(ids.flip(1), mask.flip(1)) == 0  # right padding: not this layout


def test_nucleus_from_the_top_candidates_equals_the_full_sort():
    """Peaked rows (the nucleus inside the top 64) take the fast path, flat rows the full sort:
    both drop exactly what transformers' TopPLogitsWarper drops."""
    g = torch.Generator().manual_seed(1)
    for scale in (12.0, 0.5):  # peaked, flat
        logits = torch.randn(8, 5000, generator=g) * scale
        top = logits.topk(64, dim=-1).values
        inside_top = bool(((top - logits.logsumexp(-1, keepdim=True)).exp().sum(-1) > 0.9).all())
        assert inside_top == (scale > 1)
        assert torch.equal(outside_nucleus(logits, 0.9), TopPLogitsWarper(0.9)(None, logits).isinf())


def test_filters_keep_what_hf_warpers_keep():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(16, 300, generator=g) * 3
    for top_k, top_p in [(0, 0.9), (20, 1.0), (20, 0.5), (0, 0.3)]:
        ours = filter_logits(logits, SamplingConfig(temperature=0.7, top_k=top_k, top_p=top_p))
        theirs = logits / 0.7
        if top_k:
            theirs = TopKLogitsWarper(top_k)(None, theirs)
        if top_p < 1:
            theirs = TopPLogitsWarper(top_p)(None, theirs)
        assert torch.equal(ours.isinf(), theirs.isinf()), (top_k, top_p)
        torch.testing.assert_close(ours[~ours.isinf()], theirs[~theirs.isinf()])


def test_draw_follows_the_probabilities():
    probs = torch.tensor([[0.5, 0.0, 0.3, 0.2, 0.0]]).repeat(20_000, 1)
    tokens = draw(probs, torch.Generator().manual_seed(0))
    freq = torch.bincount(tokens, minlength=5).float() / len(tokens)
    assert freq[1] == 0 and freq[4] == 0
    torch.testing.assert_close(freq, probs[0], atol=0.015, rtol=0)
