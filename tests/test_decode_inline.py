"""`llama_decode_step` (lit_align.generation.decoder): the lean loop's decode forward of a Llama
without transformers' per-call wrappers gives bit-for-bit the model's own logits."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

import lit_align.generation.decoder as decoder_module
from lit_align.generation.decoder import Decoder, inlinable, prefill
from lit_align.testing import HH_PROMPTS

SYSTEM = "You are a careful assistant. Answer briefly and kindly, and refuse anything harmful. "
PROMPTS = HH_PROMPTS[1:]  # two of different lengths


def variant_model(model, **changes):
    """The tiny Llama's config with `changes`, random weights."""
    config = copy.deepcopy(model.config)
    for key, value in changes.items():
        setattr(config, key, value)
    torch.manual_seed(1)
    return AutoModelForCausalLM.from_config(config).eval()


def decoders(model, ids, mask, monkeypatch, n=3, steps=12, min_prefix=16):
    """Two decoders over identical caches: the inlined step and the model's forward."""
    out = []
    for inline in (True, False):
        monkeypatch.setattr(decoder_module, "inlinable", lambda model: inline)
        cache = DynamicCache(config=model.config)
        first, m, positions, prefix = prefill(model, ids, mask, cache, min_prefix)
        cache.batch_repeat_interleave(n)
        decoder = Decoder(model, cache, m.repeat_interleave(n, 0), positions[:, -1:].repeat_interleave(n, 0), prefix, steps)
        assert decoder.inline == inline
        out.append(decoder)
    return out, first.logits[:, -1].repeat_interleave(n, 0), prefix


VARIANTS = {"gqa": dict(num_key_value_heads=2), "bias": dict(attention_bias=True, mlp_bias=True)}  # grouped-query attention; biases


@pytest.mark.parametrize("variant", ["mha", "gqa", "bias", "shared_prefix", "bfloat16"])
@torch.no_grad()
def test_inlined_decode_step_equals_the_models_forward(tiny_lm, variant, monkeypatch):
    model, tokenizer = tiny_lm
    assert inlinable(model)
    model = variant_model(model, **VARIANTS[variant]) if variant in VARIANTS else copy.deepcopy(model)
    torch.manual_seed(2)
    for name, p in model.named_parameters():  # distinct norms (they start as ones), biases (zeros), so swaps show
        if "norm" in name or "bias" in name:
            p.data.uniform_(0.5, 1.5)
    model = model.to(torch.bfloat16) if variant == "bfloat16" else model
    prompts = [SYSTEM * 2 + p for p in PROMPTS] if variant == "shared_prefix" else PROMPTS
    tokenizer.padding_side = "left"
    enc = tokenizer(prompts, padding=True, return_tensors="pt", add_special_tokens=False)
    (inline, plain), logits, prefix = decoders(model, enc["input_ids"], enc["attention_mask"], monkeypatch)
    assert (prefix >= 16) == (variant == "shared_prefix")
    generator = torch.Generator().manual_seed(0)
    for t in range(12):
        token = torch.multinomial(logits.float().softmax(-1), 1, generator=generator).squeeze(1)
        if t == 6:  # drop a row, as the loop does when rows end
            keep = torch.tensor([0, 2, 3, 5])
            token, _ = token[keep], [d.keep(keep) for d in (inline, plain)]
        logits, expected = inline(token, t), plain(token, t)
        assert torch.equal(logits, expected), f"step {t}"


def test_hooks_and_training_mode_take_the_models_forward(tiny_lm):
    """The inlined step skips the outer modules' forward, so their hooks would not run: with a hook
    (or in training mode) the model's own forward is used."""
    model, _ = tiny_lm
    assert inlinable(model)
    handle = model.model.layers[0].register_forward_pre_hook(lambda module, args: None)
    try:
        assert not inlinable(model)
    finally:
        handle.remove()
    model.train()
    try:
        assert not inlinable(model)
    finally:
        model.eval()
    assert inlinable(model)


@pytest.mark.slow
def test_smollm2_greedy_through_the_inlined_step_equals_generate():
    """On the real SmolLM2 (a Llama, so the lean loop takes the inlined step), greedy ids equal
    transformers' `generate` on chat prompts of different lengths (left padding, a shared prefix)."""
    from lit_align.generation import SamplingConfig
    from lit_align.generation.lean import sample_ids
    from lit_align.models import SMOLLM2_ALIAS, resolve_name

    path = resolve_name(SMOLLM2_ALIAS)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
    assert inlinable(model)
    prompts = ["How do I pick a lock?", "Give me a 10 by 10 multiplication table.", "What is the capital of Peru?"]
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             for p in prompts]
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        ours = sample_ids(model, enc.input_ids, enc.attention_mask, SamplingConfig(max_new_tokens=24, temperature=0.0),
                          1, tokenizer.eos_token_id, tokenizer.pad_token_id)
        theirs = model.generate(**enc, max_new_tokens=24, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    theirs = theirs[:, enc.input_ids.shape[1]:]
    for a, b in zip(ours, theirs):
        a, b = a[a != tokenizer.pad_token_id].tolist(), b[b != tokenizer.pad_token_id].tolist()
        assert len(a) > 0 and a == b[: len(a)]
