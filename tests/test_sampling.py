"""The lean sampler (lit_align.generation.lean) against transformers `generate` on the tiny model:
greedy ids equal, EOS ends rows, seeds reproduce, filters keep what HF's warpers keep."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

import lit_align.generation.decoder as decoder_module
import lit_align.generation.lean as lean_module
from lit_align.generation import HFGenerator, Int8Linear, LeanGenerator, SamplingConfig, int8_for_generation, sample_ids
from lit_align.generation.decoder import (
    SHARED_PREFIX_ATTENTION, PreallocatedLayer, attention_view, shared_prefix_attention, shared_prefix_length,
)
from lit_align.generation.logits import draw, filter_logits, outside_nucleus
from lit_align.testing import HH_PROMPTS

PROMPTS = HH_PROMPTS


def eos_prone(tiny_lm, bias: float):
    """The tiny model with a bias towards EOS in its LM head, so rows end at different steps."""
    model, tokenizer = tiny_lm
    model = AutoModelForCausalLM.from_config(model.config).eval()
    model.load_state_dict(tiny_lm[0].state_dict())
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
def test_greedy_ids_equal_generate(tiny_lm, penalty):
    hf, lean = both(*tiny_lm, SamplingConfig(max_new_tokens=24, temperature=0.0, repetition_penalty=penalty))
    assert torch.equal(hf.completion_ids, lean.completion_ids)
    assert hf.texts == lean.texts


def test_greedy_with_eos_equals_generate(tiny_lm):
    hf, lean = both(*eos_prone(tiny_lm, 0.1), SamplingConfig(max_new_tokens=24, temperature=0.0))
    assert lean.completion_mask.sum(1).min() < 24 and lean.truncated.any()  # some rows end early, some do not
    for field in ("completion_ids", "completion_mask", "truncated", "prompt_ids", "prompt_mask"):
        assert torch.equal(getattr(hf, field), getattr(lean, field)), field


def test_sampling_is_seeded_and_ends_rows_at_eos(tiny_lm):
    model, tokenizer = eos_prone(tiny_lm, 1.0)  # most rows end before 40 tokens, a few do not
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
    ended = LeanGenerator(*eos_prone(tiny_lm, 2.5)).generate_ids(ids, mask, sampling, 4, generator_seed=7)
    assert not ended.truncated.any()  # every row ended: decoding stopped at the last row's EOS
    assert ended.completion_ids.shape[1] == int(ended.completion_mask.sum(1).max()) < 40


def rows_per_forward(model, fn):
    """`fn()`'s result, the batch size of each model forward it ran, and the cache layer types seen."""
    calls, layers = [], set()

    def hook(module, args, kwargs):
        calls.append(kwargs["input_ids"].shape[0])
        layers.update(type(x).__name__ for x in kwargs["cache"].layers)

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        return fn(), calls, layers
    finally:
        handle.remove()


@pytest.mark.parametrize("temperature, eos_bias", [(0.0, 0.1), (1.0, 2.0)])
def test_ended_rows_leave_the_forwards_and_no_sample_changes(tiny_lm, monkeypatch, temperature, eos_bias):
    """Rows that ended are dropped from the decode forwards (they shrink), and every row's tokens
    are those of the loop that computes all rows to the end: one uniform per row and step either way."""
    model, tokenizer = eos_prone(tiny_lm, eos_bias)
    ids, mask = LeanGenerator(model, tokenizer).encode_prompts(PROMPTS)
    sampling = SamplingConfig(max_new_tokens=40, temperature=temperature, top_p=0.95)

    def run():
        return sample_ids(model, ids, mask, sampling, 4, tokenizer.eos_token_id, tokenizer.pad_token_id,
                          torch.Generator().manual_seed(3))

    dropped, calls, layers = rows_per_forward(model, run)
    assert calls[1] == 12 and min(calls[1:]) <= 6 and calls[1:] == sorted(calls[1:], reverse=True)
    assert layers == {"DynamicLayer", "PreallocatedLayer"}  # the prefill's cache, then the decode loop's
    monkeypatch.setattr(lean_module, "COMPACT_AT", 2.0)  # never drop a row
    kept, calls, _ = rows_per_forward(model, run)
    assert set(calls[1:]) == {12}
    assert torch.equal(dropped, kept)
    is_eos = dropped == tokenizer.eos_token_id
    assert len(set(is_eos.int().argmax(1)[is_eos.any(1)].tolist())) >= 2  # rows end at different steps


def test_preallocated_cache_equals_the_concatenated_one(tiny_lm, monkeypatch):
    model, tokenizer = tiny_lm
    ids, mask = LeanGenerator(model, tokenizer).encode_prompts(PROMPTS)
    sampling = SamplingConfig(max_new_tokens=30, temperature=1.0, top_k=20)
    run = lambda: sample_ids(model, ids, mask, sampling, 2, tokenizer.eos_token_id, tokenizer.pad_token_id,
                             torch.Generator().manual_seed(0))
    preallocated, calls, layers = rows_per_forward(model, run)
    assert "PreallocatedLayer" in layers and len(calls) == 30
    monkeypatch.setattr(decoder_module, "PreallocatedLayer", lambda layer, extra, skip: layer)  # keep DynamicLayer
    concatenated, _, layers = rows_per_forward(model, run)
    assert layers == {"DynamicLayer"}
    assert torch.equal(preallocated, concatenated)


def test_preallocated_layer_writes_in_place():
    keys, values = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 5, 4)
    layer = decoder_module.DynamicLayer()
    layer.update(keys, values)
    assert torch.equal(PreallocatedLayer(layer, extra=3, skip=2).keys, keys[:, :, 2:])
    fast = PreallocatedLayer(layer, extra=3)
    buffer = fast.key_buffer.data_ptr()
    new_k, new_v = torch.randn(2, 3, 1, 4), torch.randn(2, 3, 1, 4)
    k, v = fast.update(new_k, new_v)
    assert torch.equal(k, torch.cat([keys, new_k], 2)) and torch.equal(v, torch.cat([values, new_v], 2))
    assert k.data_ptr() == buffer and fast.get_seq_length() == 6
    fast.batch_select_indices(torch.tensor([1]))
    assert torch.equal(fast.keys, torch.cat([keys, new_k], 2)[1:]) and fast.get_seq_length() == 6
    fast.update(new_k[:1], new_v[:1])
    fast.update(new_k[:1], new_v[:1])
    with pytest.raises(RuntimeError, match="holds 8 positions; 9 asked"):
        fast.update(new_k[:1], new_v[:1])


def test_greedy_with_eager_attention_equals_generate(tiny_model_dir):
    """Eager attention gets the 2-D key mask (transformers builds the 4-D one) over the preallocated cache."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="eager").eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    hf, lean = both(model, tokenizer, SamplingConfig(max_new_tokens=24, temperature=0.0))
    assert torch.equal(hf.completion_ids, lean.completion_ids)


def test_int8_linear_is_its_formula_and_close_to_float():
    g = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(64, 48)
    x = torch.randn(5, 7, 64, generator=g) * torch.linspace(0.1, 10, 5)[:, None, None]  # rows of very different scales
    y = Int8Linear(linear)(x)
    w = linear.weight.double()
    w_scale = w.abs().amax(1) / 127
    rows = x.reshape(-1, 64).double()
    x_scale = rows.abs().amax(1, keepdim=True) / 127
    expected = ((rows / x_scale).round() @ (w / w_scale[:, None]).round().T) * x_scale * w_scale + linear.bias.double()
    torch.testing.assert_close(y.reshape(-1, 48).double(), expected, rtol=1e-5, atol=1e-5)
    exact = linear(x).detach()
    assert ((y - exact).abs().amax(-1) < 0.02 * exact.abs().amax(-1)).all()  # within 2 % of each row's largest output
    assert torch.equal(Int8Linear(linear)(x[2:3]), y[2:3])  # a row's output does not depend on the others


def test_int8_model_generates_close_to_float(tiny_lm):
    model, tokenizer = tiny_lm
    quantized = AutoModelForCausalLM.from_config(model.config).eval()
    quantized.load_state_dict(model.state_dict())
    int8_for_generation(quantized)
    linears = [m for m in quantized.modules() if isinstance(m, Int8Linear)]
    assert len(linears) == 7 * model.config.num_hidden_layers + 1 and quantized.lm_head in linears
    assert not any(type(m) is torch.nn.Linear for m in quantized.modules())
    ids, mask = LeanGenerator(model, tokenizer).encode_prompts(PROMPTS)
    with torch.no_grad():
        exact, approx = model(input_ids=ids, attention_mask=mask).logits, quantized(input_ids=ids, attention_mask=mask).logits
    assert (approx - exact).abs().max() < 0.05 * exact.abs().max()
    out = LeanGenerator(quantized, tokenizer).generate_ids(ids, mask, SamplingConfig(max_new_tokens=8, temperature=0.0))
    assert out.completion_ids.shape == (3, 8)


SYSTEM = "You answer questions about baking bread, briefly and kindly, in plain words, and you never make up facts."


def shared_system_prompts(generator):
    return generator.encode_prompts([[{"role": "system", "content": SYSTEM}, {"role": "user", "content": p}] for p in PROMPTS])


def test_shared_prefix_is_prefilled_once_and_greedy_equals_generate(tiny_lm):
    """Prompts behind one long system message: the prefix is prefilled once, each row's rest after
    it (left-padded), the decode steps read the prefix's keys once through shared-prefix attention
    (on a view of the model: the model's own config still says sdpa), and greedy decoding still
    gives transformers' ids."""
    model, tokenizer = tiny_lm
    lean, hf = LeanGenerator(model, tokenizer), HFGenerator(model, tokenizer)
    ids, mask = shared_system_prompts(lean)
    prefix = shared_prefix_length(ids, mask)
    assert prefix >= 16 and prefix < int(mask.sum(-1).min())  # every row keeps a token of its own
    sampling = SamplingConfig(max_new_tokens=24, temperature=0.0)
    calls = []

    def hook(module, args, kwargs):
        impl = (module.config._attn_implementation, model.config._attn_implementation)
        calls.append((kwargs["input_ids"].shape, impl, kwargs["cache"].get_seq_length()))

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        lean_out = lean.generate_ids(ids, mask, sampling)
    finally:
        handle.remove()
    rest = int(mask.sum(-1).max()) - prefix
    assert calls[0][0] == (1, prefix) and calls[1][0] == (3, rest)
    assert calls[2] == ((3, 1), (SHARED_PREFIX_ATTENTION, "sdpa"), rest)  # the rows' own keys only
    assert torch.equal(lean_out.completion_ids, hf.generate_ids(ids, mask, sampling).completion_ids)
    for sampling in (sampling, SamplingConfig(max_new_tokens=24, temperature=1.0, top_p=0.9)):
        run = lambda min_prefix: sample_ids(model, ids, mask, sampling, 2, tokenizer.eos_token_id, tokenizer.pad_token_id,
                                            torch.Generator().manual_seed(0), min_shared_prefix=min_prefix)
        assert torch.equal(run(16), run(10**9))  # the prefix in every row's cache, read by sdpa


def test_shared_prefix_with_lora_greedy_equals_generate(tiny_lm):
    """The attention view of a peft-wrapped model runs its LoRA layers (random ones: they matter)."""
    from peft import LoraConfig, get_peft_model

    model, tokenizer = tiny_lm
    base = AutoModelForCausalLM.from_config(model.config).eval()
    base.load_state_dict(model.state_dict())
    torch.manual_seed(0)
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)).eval()
    hf, lean = HFGenerator(peft_model, tokenizer), LeanGenerator(peft_model, tokenizer)
    ids, mask = shared_system_prompts(lean)
    sampling = SamplingConfig(max_new_tokens=16, temperature=0.0)
    out = lean.generate_ids(ids, mask, sampling).completion_ids
    assert torch.equal(out, hf.generate_ids(ids, mask, sampling).completion_ids)
    assert not torch.equal(out, LeanGenerator(model, tokenizer).generate_ids(ids, mask, sampling).completion_ids)


def test_attention_view_leaves_models_reading_other_configs_alone(tiny_lm):
    model, _ = tiny_lm
    other = AutoModelForCausalLM.from_config(model.config)
    view = attention_view(other, SHARED_PREFIX_ATTENTION)
    assert view.model.layers[0].self_attn.config._attn_implementation == SHARED_PREFIX_ATTENTION
    assert view.lm_head.weight is other.lm_head.weight and other.config._attn_implementation == "sdpa"
    other.model.layers[1].self_attn.config = copy.copy(other.config)  # a module with a config of its own
    assert attention_view(other, SHARED_PREFIX_ATTENTION) is None


def test_shared_prefix_attention_equals_sdpa_over_all_keys():
    g = torch.Generator().manual_seed(0)
    rows, groups, per_group, dim, prefix, own = 5, 3, 2, 8, 7, 4
    query = torch.randn(rows, groups * per_group, 1, dim, generator=g)
    prefix_keys, prefix_values = torch.randn(2, groups, prefix, dim, generator=g)
    keys, values = torch.randn(2, rows, groups, own, dim, generator=g)
    mask = torch.ones(rows, 1, 1, own, dtype=torch.bool)
    mask[0, ..., :2] = mask[3, ..., :1] = False  # left padding
    out, _ = shared_prefix_attention(SimpleNamespace(layer_idx=1), query, keys, values, mask, scaling=0.3,
                                     shared_prefix=[None, (prefix_keys, prefix_values)])
    every = lambda p, o: torch.cat([p.expand(rows, -1, -1, -1), o], 2).repeat_interleave(per_group, 1)
    expected = torch.nn.functional.scaled_dot_product_attention(
        query, every(prefix_keys, keys), every(prefix_values, values), scale=0.3,
        attn_mask=torch.cat([torch.ones(rows, 1, 1, prefix, dtype=torch.bool), mask], -1),
    )
    torch.testing.assert_close(out, expected.transpose(1, 2))


@pytest.mark.parametrize("name, value", [("softcap", 30.0), ("sliding_window", 4), ("s_aux", torch.zeros(6)),
                                         ("sinks", torch.zeros(6)), ("position_bias", torch.zeros(5, 6, 1, 4)),
                                         ("dropout", 0.1)])
def test_shared_prefix_attention_refuses_what_its_formula_leaves_out(name, value):
    """Attention arguments the shared-prefix formula does not apply are refused by name, not ignored;
    passed as None (Qwen2's full-attention layers pass sliding_window=None) they are no change."""
    g = torch.Generator().manual_seed(0)
    query, keys, values = torch.randn(5, 6, 1, 8, generator=g), *torch.randn(2, 5, 3, 4, 8, generator=g)
    prefix = [(torch.randn(3, 7, 8, generator=g), torch.randn(3, 7, 8, generator=g))]
    call = lambda **kw: shared_prefix_attention(SimpleNamespace(layer_idx=0), query, keys, values, None, shared_prefix=prefix, **kw)
    with pytest.raises(ValueError, match=rf"passes \['{name}'\]: load it with attn_implementation='eager'"):
        call(**{name: value})
    if name != "dropout":
        torch.testing.assert_close(call(**{name: None})[0], call()[0], rtol=0, atol=0)


def test_shared_prefix_needs_left_padded_rows_alike():
    ids = torch.tensor([[0, 5, 6, 7, 8], [5, 6, 7, 9, 9], [0, 0, 5, 6, 1]])
    mask = (ids != 0).long()
    assert shared_prefix_length(ids, mask) == 2  # "5 6", and the shortest row keeps its "1"
    assert shared_prefix_length(ids[:1], mask[:1]) == 0  # one row: nothing to share
    assert shared_prefix_length(ids.flip(1), mask.flip(1)) == 0  # right padding: not this layout


def test_nucleus_from_the_top_candidates_equals_the_full_sort():
    """One batch of peaked rows (nucleus inside the top 64), medium ones (inside the top 1024) and flat
    ones (the full sort): each row drops exactly what transformers' TopPLogitsWarper drops."""
    g = torch.Generator().manual_seed(1)
    scales = torch.tensor([12.0, 3.0, 0.5]).repeat_interleave(4)[torch.randperm(12, generator=g)]
    logits = torch.randn(12, 5000, generator=g) * scales[:, None]
    sorted_probs = logits.softmax(-1).sort(-1, descending=True).values
    nucleus = (sorted_probs.cumsum(-1) < 0.9).sum(-1) + 1
    paths = torch.bucketize(nucleus, torch.tensor([64, 1024]))  # 0: top 64, 1: top 1024, 2: full sort
    assert torch.equal(paths.bincount(minlength=3), torch.tensor([4, 4, 4]))
    assert torch.equal(outside_nucleus(logits, 0.9), TopPLogitsWarper(0.9)(None, logits).isinf())
    assert torch.equal((~outside_nucleus(logits, 0.9)).sum(-1), nucleus)


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
    tokens = draw(probs, torch.rand(len(probs), 1, generator=torch.Generator().manual_seed(0)))
    freq = torch.bincount(tokens, minlength=5).float() / len(tokens)
    assert freq[1] == 0 and freq[4] == 0
    torch.testing.assert_close(freq, probs[0], atol=0.015, rtol=0)


def bfloat16_runs(model, tokenizer, sampling, n):
    """(lean on the float32 model with dtype bfloat16, lean on the checkpoint loaded in bfloat16)."""
    lean = LeanGenerator(model, tokenizer)
    ids, mask = lean.encode_prompts(PROMPTS)
    loaded = AutoModelForCausalLM.from_config(model.config, dtype=torch.bfloat16).eval()
    loaded.load_state_dict(model.state_dict())  # what from_pretrained(dtype=bfloat16) holds: float32 buffers kept
    copied = lean.generate_ids(ids, mask, SamplingConfig(**{**vars(sampling), "dtype": "bfloat16"}), n, 7)
    return lean, copied, LeanGenerator(loaded, tokenizer).generate_ids(ids, mask, sampling, n, 7)


@pytest.mark.parametrize("temperature, n", [(0.0, 1), (1.0, 2)])
def test_bfloat16_sampling_is_the_bfloat16_checkpoints_and_seeded(tiny_lm, temperature, n):
    """`dtype: bfloat16` samples what the checkpoint loaded in bfloat16 samples (same seed, same ids;
    HF generate on the copy too), the same again at the next call, and leaves the model float32."""
    model, tokenizer = tiny_lm
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sampling = SamplingConfig(max_new_tokens=24, temperature=temperature, top_p=0.9)
    lean, copied, loaded = bfloat16_runs(model, tokenizer, sampling, n)
    assert torch.equal(copied.completion_ids, loaded.completion_ids)
    bf16 = SamplingConfig(**{**vars(sampling), "dtype": "bfloat16"})
    again = lean.generate_ids(copied.prompt_ids[::n], copied.prompt_mask[::n], bf16, n, 7)
    assert torch.equal(again.completion_ids, copied.completion_ids)
    hf = HFGenerator(model, tokenizer).generate_ids(copied.prompt_ids[::n], copied.prompt_mask[::n], bf16, n, 7)
    if temperature == 0:
        assert torch.equal(hf.completion_ids, copied.completion_ids)  # greedy: generate's ids on the copy
    assert {p.dtype for p in lean._copy[1].parameters()} == {torch.bfloat16}
    assert all(torch.equal(v, before[k]) and v.dtype == before[k].dtype for k, v in model.state_dict().items())


def test_bfloat16_greedy_differs_from_float32_only_at_near_ties(tiny_lm):
    """Where a greedy row of the bfloat16 copy leaves float32's, both took their own model's top
    token after the same prefix, and float32's two candidates were closer than bfloat16 resolves."""
    model, tokenizer = tiny_lm
    lean = LeanGenerator(model, tokenizer)
    ids, mask = lean.encode_prompts(PROMPTS)
    greedy = SamplingConfig(max_new_tokens=24, temperature=0.0)
    exact = lean.generate_ids(ids, mask, greedy).completion_ids
    rounded = lean.generate_ids(ids, mask, SamplingConfig(max_new_tokens=24, temperature=0.0, dtype="bfloat16")).completion_ids
    differ = (exact != rounded).any(1)
    assert differ.any() and not differ.all()
    for row in differ.nonzero().squeeze(1).tolist():
        t = int((exact[row] != rounded[row]).int().argmax())
        context = torch.cat([ids[row : row + 1], exact[row : row + 1, :t]], 1)
        context_mask = torch.cat([mask[row : row + 1], torch.ones(1, t, dtype=mask.dtype)], 1)
        with torch.no_grad():
            f32, b16 = (m(input_ids=context, attention_mask=context_mask).logits[0, -1].float() for m in (model, lean._copy[1]))
        x, y = int(exact[row, t]), int(rounded[row, t])
        assert int(f32.argmax()) == x and int(b16.argmax()) == y
        assert 0 <= f32[x] - f32[y] < 2**-7 * f32.abs().max()


def test_bfloat16_copy_follows_the_models_weights_and_hooks(tiny_lm):
    """The copy is made once; every call writes the model's current weights into it, and hooks on the
    model (a cost meter's) see the copy's forwards until removed."""
    model, tokenizer = tiny_lm
    model = copy.deepcopy(model)
    lean = LeanGenerator(model, tokenizer)
    ids, mask = lean.encode_prompts(PROMPTS)
    greedy = SamplingConfig(max_new_tokens=12, temperature=0.0, dtype="bfloat16")
    first = lean.generate_ids(ids, mask, greedy).completion_ids
    made = lean._copy[1]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.05)
    calls = []
    handle = model.register_forward_pre_hook(lambda module, args, kwargs: calls.append(kwargs["input_ids"].shape), with_kwargs=True)
    trained = lean.generate_ids(ids, mask, greedy).completion_ids
    assert lean._copy[1] is made and len(calls) == 12  # the prefill and 11 decode steps, on the copy
    handle.remove()
    assert not torch.equal(trained, first)
    assert torch.equal(trained, LeanGenerator(model, tokenizer).generate_ids(ids, mask, greedy).completion_ids)  # a fresh copy
    lean.generate_ids(ids, mask, greedy)
    assert len(calls) == 12


def test_bfloat16_copy_is_refused_under_torch_distributed(tiny_lm, tmp_path):
    model, tokenizer = tiny_lm
    lean = LeanGenerator(model, tokenizer)
    ids, mask = lean.encode_prompts(PROMPTS)
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        with pytest.raises(ValueError, match="not done under torch.distributed.*set sampling.dtype to 'model'"):
            lean.generate_ids(ids, mask, SamplingConfig(max_new_tokens=4, dtype="bfloat16"))
    finally:
        torch.distributed.destroy_process_group()
