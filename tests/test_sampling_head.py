"""The decode loop's LM head in column blocks (lit_align.generation.linear.ChunkedHead): the same logits as
the head, so greedy ids still equal transformers `generate` and a seed still gives the same samples."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import lit_align.generation.decoder as decoder_module
import lit_align.generation.linear as linear_module
from lit_align.generation import HFGenerator, LeanGenerator, SamplingConfig, sample_ids
from lit_align.generation.linear import ChunkedHead, chunkable_head
from lit_align.testing import HH_PROMPTS

PROMPTS = HH_PROMPTS


def with_head_bias(model, eos: int, bias: float):
    """A copy of `model` whose LM head has a bias (towards EOS: rows end at different steps)."""
    out = AutoModelForCausalLM.from_config(model.config).eval()
    out.load_state_dict(model.state_dict())
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.zero_()
        head.bias[eos] = bias
    out.lm_head = head
    return out


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 2, 5, 32])
def test_chunked_head_gives_the_heads_logits(monkeypatch, bias, rows):
    """Bit for bit, with a last block narrower than the others, at the size used and a small one."""
    torch.manual_seed(0)
    head = torch.nn.Linear(96, 2500, bias=bias)
    x = torch.randn(rows, 1, 96)
    for chunk in (linear_module.HEAD_CHUNK, 300):
        monkeypatch.setattr(linear_module, "HEAD_CHUNK", chunk)
        with torch.no_grad():
            out = ChunkedHead(head)(x)
        assert out.shape == (rows, 1, 2500) and torch.equal(out, head(x))


def test_only_plain_float32_heads_wider_than_a_block_are_chunked(tiny_lm, monkeypatch):
    model, _ = tiny_lm
    assert model.config.vocab_size <= linear_module.HEAD_CHUNK and chunkable_head(model) is None
    monkeypatch.setattr(linear_module, "HEAD_CHUNK", 100)
    assert chunkable_head(model) is model.lm_head
    assert chunkable_head(AutoModelForCausalLM.from_config(model.config).to(torch.bfloat16)) is None
    hooked = AutoModelForCausalLM.from_config(model.config)
    hooked.lm_head.register_forward_hook(lambda module, args, out: out)
    assert chunkable_head(hooked) is None


def decoded_rows(model, run):
    """run()'s output and the rows of each ChunkedHead call (the decode steps')."""
    calls = []
    original = ChunkedHead.forward

    def counted(self, x):
        calls.append(x.shape[0])
        return original(self, x)

    ChunkedHead.forward = counted
    try:
        return run(), calls
    finally:
        ChunkedHead.forward = original


@pytest.mark.parametrize("bias", [False, True])
def test_greedy_with_the_chunked_head_equals_generate(tiny_lm, monkeypatch, bias):
    model, tokenizer = tiny_lm
    if bias:
        model = with_head_bias(model, tokenizer.eos_token_id, 0.1)
    monkeypatch.setattr(linear_module, "HEAD_CHUNK", 100)  # several blocks over the tiny vocabulary
    assert model.config.vocab_size > 300
    hf, lean = HFGenerator(model, tokenizer), LeanGenerator(model, tokenizer)
    ids, mask = hf.encode_prompts(PROMPTS)
    sampling = SamplingConfig(max_new_tokens=24, temperature=0.0)
    out, calls = decoded_rows(model, lambda: lean.generate_ids(ids, mask, sampling))
    assert len(calls) == 23 and calls[0] == 3  # every decode step went through the blocks
    expected = hf.generate_ids(ids, mask, sampling)
    for field in ("completion_ids", "completion_mask", "truncated"):
        assert torch.equal(getattr(out, field), getattr(expected, field)), field
    if bias:
        assert out.completion_mask.sum(1).min() < 24  # some rows ended early


def test_seeded_samples_are_those_of_the_plain_head(tiny_lm, monkeypatch):
    model, tokenizer = tiny_lm
    model = with_head_bias(model, tokenizer.eos_token_id, 1.0)
    ids, mask = LeanGenerator(model, tokenizer).encode_prompts(PROMPTS)
    sampling = SamplingConfig(max_new_tokens=40, temperature=1.0, top_p=0.9)
    monkeypatch.setattr(linear_module, "HEAD_CHUNK", 100)

    def run():
        return sample_ids(model, ids, mask, sampling, 4, tokenizer.eos_token_id, tokenizer.pad_token_id,
                          torch.Generator().manual_seed(5))

    chunked, calls = decoded_rows(model, run)
    assert calls and calls[0] == 12 and min(calls) < 12  # ended rows left the blocks' matmuls too
    monkeypatch.setattr(decoder_module, "chunkable_head", lambda model: None)
    plain, no_calls = decoded_rows(model, run)
    assert not no_calls and torch.equal(chunked, plain)


def test_greedy_with_eager_attention_and_the_chunked_head_equals_generate(tiny_model_dir, monkeypatch):
    """Without sdpa (no shared-prefix attention) the head still runs in blocks, on a view of the model."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="eager").eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    monkeypatch.setattr(linear_module, "HEAD_CHUNK", 100)
    hf, lean = HFGenerator(model, tokenizer), LeanGenerator(model, tokenizer)
    ids, mask = hf.encode_prompts(PROMPTS)
    sampling = SamplingConfig(max_new_tokens=16, temperature=0.0)
    out, calls = decoded_rows(model, lambda: lean.generate_ids(ids, mask, sampling))
    assert len(calls) == 15 and model.config._attn_implementation == "eager"
    assert isinstance(model.lm_head, torch.nn.Linear)  # the model itself keeps its head
    assert torch.equal(out.completion_ids, hf.generate_ids(ids, mask, sampling).completion_ids)
