"""Reward sources: the contract checks, categorized routing with real small reward models,
the probe reward on the policy's hidden states, and the plain refusal function."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from lit_align.rewards import (
    CategorizedReward,
    ProbeReward,
    SequenceClassifierReward,
    refusal_reward,
    resolve_reward_source,
    score_completions,
    unique_names,
)

PROMPTS = [[{"role": "user", "content": "Insult my neighbour."}], [{"role": "user", "content": "Find her address."}],
           [{"role": "user", "content": "Say something rude."}], [{"role": "user", "content": "What is 2 + 2?"}]]
COMPLETIONS = ["I cannot help with that.", "Here is the address you asked for.", "You are a fool.", "4"]
CATEGORY = ["insult", "privacy_property", "insult", None]


def constant(prompts, completions, **columns):
    return [1.0] * len(completions)


@pytest.fixture(scope="module")
def reward_models(tiny_model_dir, tmp_path_factory):
    """Two tiny sequence-classification reward models with different random weights."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    paths = {}
    for seed, category in enumerate(["insult", "privacy_property"]):
        config = AutoConfig.from_pretrained(tiny_model_dir, num_labels=1)
        torch.manual_seed(seed + 1)
        model = AutoModelForSequenceClassification.from_config(config)
        path = tmp_path_factory.mktemp(f"rm_{category}")
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        paths[category] = path
    return paths


def test_sequence_classifier_reward_scores_the_rendered_text(reward_models):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = reward_models["insult"]
    source = SequenceClassifierReward(str(path))
    scores = source(PROMPTS, COMPLETIONS)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    for prompt, completion, score in zip(PROMPTS, COMPLETIONS, scores):
        text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
        ids = tokenizer(text + completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        with torch.no_grad():
            expected = model(input_ids=torch.tensor([ids])).logits[0, 0].item()
        assert abs(score - expected) < 1e-5
    assert len(set(round(s, 6) for s in scores)) == len(scores)  # the model tells the texts apart


def test_categorized_routing_uses_each_prompts_own_model(reward_models):
    insult = SequenceClassifierReward(str(reward_models["insult"]))
    privacy = SequenceClassifierReward(str(reward_models["privacy_property"]))
    routed = CategorizedReward({"insult": insult, "privacy_property": privacy})
    scores = routed(PROMPTS, COMPLETIONS, category=CATEGORY)
    by_insult, by_privacy = insult(PROMPTS, COMPLETIONS), privacy(PROMPTS, COMPLETIONS)
    assert scores[0] == pytest.approx(by_insult[0], abs=1e-5) and scores[2] == pytest.approx(by_insult[2], abs=1e-5)
    assert scores[1] == pytest.approx(by_privacy[1], abs=1e-5)
    assert scores[0] != pytest.approx(by_privacy[0], abs=1e-3)  # the models really differ
    assert scores[3] is None  # no category, no fallback: no reward
    assert routed.last_routes == {"insult": 2, "privacy_property": 1, "<fallback>": 1}

    with_fallback = CategorizedReward({"insult": insult}, fallback=constant)
    assert with_fallback(PROMPTS, COMPLETIONS, category=CATEGORY)[1:4:2] == [1.0, 1.0]

    rewards = score_completions([routed], PROMPTS, COMPLETIONS, {"category": CATEGORY})
    assert math.isnan(rewards[3, 0].item()) and not torch.isnan(rewards[:3]).any()

    with pytest.raises(ValueError, match="routes on column 'category'"):
        routed(PROMPTS, COMPLETIONS)


def test_categorized_reward_builds_from_config(reward_models):
    """The YAML shape of configs/grpo_categorized.yaml instantiates nested reward models."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(CategorizedReward, "reward")
    cfg = parser.parse_object({"reward": {"sources": {
        c: {"class_path": "lit_align.rewards.SequenceClassifierReward", "init_args": {"path": str(p)}}
        for c, p in reward_models.items()}}})
    reward = parser.instantiate(cfg).reward
    assert isinstance(reward, CategorizedReward)
    assert all(isinstance(s, SequenceClassifierReward) for s in reward.sources.values())


def test_probe_reward_reads_the_policys_hidden_states(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lit_align.probes import HybridProbe

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    probe = HybridProbe(model.config.hidden_size, layers=[1, 2])
    probe.set_feature_stats(torch.randn(16, 2, model.config.hidden_size) * 3)
    with torch.no_grad():
        for param in probe.parameters():
            param.normal_()  # a fresh probe starts at zero; give it something to say
    path = probe.save(tmp_path / "probe.safetensors")

    reward = ProbeReward(str(path))
    reward.bind(SimpleNamespace(policy=model, tokenizer=tokenizer))
    scores = reward(PROMPTS, COMPLETIONS)
    for prompt, completion, score in zip(PROMPTS, COMPLETIONS, scores):
        text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
        ids = tokenizer(text + completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        with torch.no_grad():
            hidden = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
            expected = probe(torch.stack([hidden[1][:, -1], hidden[2][:, -1]], dim=1))[0].item()
        assert abs(score - expected) < 1e-4
    assert len(set(round(s, 4) for s in scores)) == len(scores)

    # frozen=True on a LoRA policy reads the base (adapters disabled), not the adapted policy
    from lit_align.models import LoraArgs, add_lora

    lora_policy = add_lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir), LoraArgs(r=4, alpha=8))
    with torch.no_grad():
        for name, param in lora_policy.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)  # make the adapter change the hidden states
    policy_like = SimpleNamespace(policy=lora_policy, tokenizer=tokenizer, reference=None)
    frozen = ProbeReward(str(path), frozen=True)
    frozen.bind(policy_like)
    adapted = ProbeReward(str(path))
    adapted.bind(policy_like)
    assert frozen(PROMPTS, COMPLETIONS) == pytest.approx(scores, abs=1e-4)
    assert adapted(PROMPTS, COMPLETIONS) != pytest.approx(scores, abs=1e-3)

    wrong = HybridProbe(model.config.hidden_size * 2, layers=[1])
    wrong_path = wrong.save(tmp_path / "wrong.safetensors")
    with pytest.raises(ValueError, match="hidden size"):
        ProbeReward(str(wrong_path)).bind(SimpleNamespace(policy=model, tokenizer=tokenizer))


def test_refusal_reward():
    assert refusal_reward(PROMPTS, COMPLETIONS) == [1.0, 0.0, 0.0, 0.0]
    assert refusal_reward([None], ["I’m sorry, I can’t do that."]) == [1.0]


def test_score_completions_contract_errors():
    with pytest.raises(ValueError, match="'short' returned 1 rewards for 2 completions"):
        score_completions([lambda prompts, completions, **k: [1.0]], ["a", "b"], ["x", "y"], names=["short"])
    with pytest.raises(ValueError, match="returned NaN for sample 0"):
        score_completions([lambda prompts, completions, **k: [float("nan")]], ["a"], ["x"], names=["nan"])
    with pytest.raises(TypeError, match="returned 'high' for sample 0"):
        score_completions([lambda prompts, completions, **k: ["high"]], ["a"], ["x"], names=["words"])
    out = score_completions([constant, lambda prompts, completions, **k: [None, 2]], ["a", "b"], ["x", "y"])
    assert out[0, 0] == 1 and math.isnan(out[0, 1].item()) and out[1, 1] == 2


def test_resolving_and_naming_sources():
    assert resolve_reward_source("lit_align.rewards:refusal_reward") is refusal_reward
    assert resolve_reward_source("lit_align.rewards.refusal_reward") is refusal_reward
    with pytest.raises(ValueError, match="could not be imported"):
        resolve_reward_source("lit_align.rewards:nope")
    with pytest.raises(TypeError, match="not a function"):
        resolve_reward_source("lit_align.rewards:REFUSAL_MARKERS")
    assert unique_names([constant, constant, refusal_reward]) == ["constant", "constant_2", "refusal_reward"]
