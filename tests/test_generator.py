"""`Generator.generate_ids`, which both in-process samplers (HFGenerator, LeanGenerator) run around
their `completion_ids`: the model samples in eval mode (no dropout) and gets its training mode back,
also when sampling fails."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lit_align.generation import Generator, HFGenerator, LeanGenerator, SamplingConfig

PROMPTS = ["Human: hi\n\nAssistant:", "Human: Name three rivers in Europe.\n\nAssistant:"]
SAMPLING = SamplingConfig(max_new_tokens=6, temperature=1.0)


@pytest.fixture
def tiny(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir), AutoTokenizer.from_pretrained(tiny_model_dir)


def modes(model) -> set[bool]:
    return {m.training for m in model.modules()}


@pytest.mark.parametrize("cls", [HFGenerator, LeanGenerator])
@pytest.mark.parametrize("training", [True, False])
def test_samples_in_eval_mode_and_restores_the_mode(tiny, cls, training):
    model, tokenizer = tiny
    model.train(training)
    seen = []
    handle = model.register_forward_pre_hook(lambda module, args: seen.append(modes(module)))
    try:
        generator = cls(model, tokenizer)
        out = generator.generate_ids(*generator.encode_prompts(PROMPTS), SAMPLING, 2, generator_seed=0)
    finally:
        handle.remove()
    assert out.completion_ids.shape[0] == 4 and len(out.texts) == 4
    assert seen and all(s == {False} for s in seen)  # every forward ran with every module in eval mode
    assert modes(model) == {training}


class Failing(Generator):
    def completion_ids(self, model, prompt_ids, prompt_mask, sampling, n, generator_seed):
        assert modes(model) == {False}
        raise RuntimeError("sampling failed")


def test_the_mode_comes_back_when_sampling_fails(tiny):
    model, tokenizer = tiny
    model.train()
    generator = Failing(model, tokenizer)
    with pytest.raises(RuntimeError, match="sampling failed"):
        generator.generate_ids(*generator.encode_prompts(PROMPTS), SAMPLING)
    assert modes(model) == {True}


def test_a_generator_must_say_how_it_samples(tiny):
    generator = Generator(*tiny)
    with pytest.raises(NotImplementedError):
        generator.generate_ids(*generator.encode_prompts(PROMPTS), SAMPLING)
