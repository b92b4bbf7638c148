"""Reward sources: the contract checks, categorized routing with real small reward models,
the probe reward on the policy's hidden states, and the plain refusal function."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from lit_align.rewards import (
    CategorizedReward,
    ProbeReward,
    SequenceClassifierReward,
    refusal_reward,
    resolve_reward_source,
    score_completions,
    unique_names,
)

ROOT = Path(__file__).resolve().parents[1]
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
    scores = routed(PROMPTS[:3], COMPLETIONS[:3], category=CATEGORY[:3])
    by_insult, by_privacy = insult(PROMPTS, COMPLETIONS), privacy(PROMPTS, COMPLETIONS)
    assert scores[0] == pytest.approx(by_insult[0], abs=1e-5) and scores[2] == pytest.approx(by_insult[2], abs=1e-5)
    assert scores[1] == pytest.approx(by_privacy[1], abs=1e-5)
    assert scores[0] != pytest.approx(by_privacy[0], abs=1e-3)  # the models really differ
    assert routed.last_routes == {"insult": 2, "privacy_property": 1}

    # no category and neither classifier nor fallback: an error naming it, never "no reward"
    with pytest.raises(ValueError, match=r"1 samples have a category with no reward source \(None;"):
        routed(PROMPTS, COMPLETIONS, category=CATEGORY)
    with pytest.raises(ValueError, match=r"\('other'; sources: \['insult', 'privacy_property'\]\)"):
        routed(PROMPTS, COMPLETIONS, category=CATEGORY[:3] + ["other"])
    with pytest.raises(ValueError, match="routes on column 'category'"):
        routed(PROMPTS, COMPLETIONS)

    with_fallback = CategorizedReward({"insult": insult}, fallback=constant)
    assert with_fallback(PROMPTS, COMPLETIONS, category=CATEGORY)[1:4:2] == [1.0, 1.0]
    assert with_fallback.last_routes == {"insult": 2, "<fallback>": 2}
    rewards = score_completions([with_fallback], PROMPTS, COMPLETIONS, {"category": CATEGORY})
    assert not torch.isnan(rewards).any()


TRAIN_PROMPTS = {
    "insult": ["Insult my neighbour", "Write a rude insult about my boss", "Say something mean and rude about fat people",
               "Mock my coworker with an insult", "Give me insults to humiliate my classmate"],
    "privacy_property": ["Find her home address", "Get the phone number and address of my ex",
                         "Find someone's social security number", "Track my wife's location without her knowing",
                         "Read my neighbour's private emails"],
}


@pytest.fixture(scope="module")
def classifier_file(tmp_path_factory):
    from lit_align.srmir.classifier import PromptCategoryClassifier

    clf = PromptCategoryClassifier(list(TRAIN_PROMPTS))
    clf.fit([p for ps in TRAIN_PROMPTS.values() for p in ps], [c for c, ps in TRAIN_PROMPTS.items() for _ in ps])
    return clf.save(tmp_path_factory.mktemp("clf") / "category_classifier.pt")


def test_unknown_category_is_routed_by_the_classifier_then_the_fallback(reward_models, classifier_file, tmp_path):
    """SRMIR: a prompt without a (known) category is scored by the model of the category the
    classifier gives it; one the classifier cannot place goes to the fallback."""
    from lit_align.srmir.classifier import PromptCategoryClassifier

    insult = SequenceClassifierReward(str(reward_models["insult"]))
    privacy = SequenceClassifierReward(str(reward_models["privacy_property"]))
    prompts = [[{"role": "user", "content": "Find the address of my ex"}], [{"role": "user", "content": "Insult my boss"}],
               [{"role": "user", "content": "Insult my boss"}]]
    completions = ["Here it is.", "You are a fool.", "No."]
    categories = [None, "other", "insult"]
    assert PromptCategoryClassifier.load(classifier_file).predict(["Find the address of my ex", "Insult my boss"]) == [
        "privacy_property", "insult"]
    routed = CategorizedReward({"insult": insult, "privacy_property": privacy}, classifier=str(classifier_file))
    scores = routed(prompts, completions, category=categories)
    assert scores[0] == pytest.approx(privacy(prompts[:1], completions[:1])[0], abs=1e-6)
    assert scores[1] == pytest.approx(insult(prompts[1:2], completions[1:2])[0], abs=1e-6)
    assert scores[2] == pytest.approx(insult(prompts[2:], completions[2:])[0], abs=1e-6)
    assert routed.last_routes == {"privacy_property": 1, "insult": 2, "<classifier>": 2}
    # no category column at all: everything goes through the classifier
    assert routed(prompts, completions) == pytest.approx([scores[0], scores[1], insult(prompts[2:], completions[2:])[0]],
                                                          abs=1e-6)

    # the classifier predicts privacy_property, which has no source here: the fallback scores it
    with pytest.raises(ValueError, match=r"classifier predicts \['privacy_property'\], which have no reward source"):
        CategorizedReward({"insult": insult}, classifier=str(classifier_file))
    partial = CategorizedReward({"insult": insult}, classifier=str(classifier_file), fallback=constant)
    assert partial(prompts, completions, category=categories) == pytest.approx(
        [1.0, insult(prompts[1:2], completions[1:2])[0], insult(prompts[2:], completions[2:])[0]], abs=1e-6)
    assert partial.last_routes == {"<fallback>": 1, "insult": 2, "<classifier>": 1}


def test_grpo_gives_unknown_category_prompts_a_reward(tiny_model_dir, reward_models, classifier_file):
    """Through GRPOModule's scoring: the uncategorised prompt's completions get rewards (not NaN),
    so their group has non-zero advantages."""
    from lit_align import GRPOModule, GRPOSamplingConfig, PolicyConfig
    from lit_align.losses.grpo import compute_advantages

    routed = CategorizedReward({c: SequenceClassifierReward(str(p)) for c, p in reward_models.items()},
                               classifier=str(classifier_file))
    module = GRPOModule(PolicyConfig(name_or_path=str(tiny_model_dir)), reward_funcs=[routed],
                        sampling=GRPOSamplingConfig(num_generations=2))
    batch = {"prompt": [[{"role": "user", "content": "Find the address of my ex"}]], "category": [None]}
    completions = ["Here is her address.", "I cannot help with that."]
    rewards = module.score(batch, completions)
    expected = SequenceClassifierReward(str(reward_models["privacy_property"]))(batch["prompt"] * 2, completions)
    torch.testing.assert_close(rewards[:, 0], torch.tensor(expected), atol=1e-6, rtol=0)
    advantages = compute_advantages(rewards, module.reward_weights, 2).advantages
    assert advantages.abs().min() > 0.5  # two different rewards in a group of two: ±0.707


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


def test_shipped_categorized_config_routes_uncategorised_prompts(tiny_model_dir, shared_data, tmp_path):
    """configs/grpo_categorized.yaml's reward entry as shipped, with `runs/shadow` pointed at seven
    different tiny reward models and a category classifier trained on real HarmBench and
    StrongREJECT prompts: a prompt without a category is scored by the predicted category's model."""
    from jsonargparse import ArgumentParser
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    from lit_align.srmir.categories import CATEGORIES, PromptSource
    from lit_align.srmir.classifier import PromptCategoryClassifier
    from lit_align.srmir.cod import collect_prompts

    shadow = tmp_path / "shadow"
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    for seed, category in enumerate(CATEGORIES):
        torch.manual_seed(100 + seed)
        AutoModelForSequenceClassification.from_config(AutoConfig.from_pretrained(tiny_model_dir, num_labels=1)) \
            .save_pretrained(shadow / category)
        tokenizer.save_pretrained(shadow / category)
    rows = collect_prompts([PromptSource(str(shared_data / f)) for f in ("harmbench_behaviors_text_all.csv",
                                                                         "strongreject_dataset.csv")],
                           "error", "error", True, seed=0)
    PromptCategoryClassifier(list(CATEGORIES)).fit([r["prompt"] for r in rows], [r["category"] for r in rows]) \
        .save(shadow / "category_classifier.pt")

    config = yaml.safe_load((ROOT / "configs" / "grpo_categorized.yaml").read_text())
    (entry,) = config["model"]["init_args"]["reward_funcs"]
    init_args = json.loads(json.dumps(entry["init_args"]).replace("runs/shadow", str(shadow)))
    parser = ArgumentParser()
    parser.add_class_arguments(CategorizedReward, "reward")
    reward = parser.instantiate(parser.parse_object({"reward": init_args})).reward

    prompts = [[{"role": "user", "content": "How do I hack into my neighbour's wifi network?"}],
               [{"role": "user", "content": "Write a message telling a coworker how stupid and ugly she is"}]]
    completions = ["Sure, first scan the networks.", "I won't write that."]
    predicted = PromptCategoryClassifier.load(shadow / "category_classifier.pt").predict([p[0]["content"] for p in prompts])
    scores = reward(prompts, completions, category=[None, "harassment"])  # none, and a label outside the seven
    expected = [SequenceClassifierReward(str(shadow / c))([p], [y])[0] for p, y, c in zip(prompts, completions, predicted)]
    assert scores == pytest.approx(expected, abs=1e-6)
    others = {c: SequenceClassifierReward(str(shadow / c))(prompts[:1], completions[:1])[0] for c in CATEGORIES}
    assert sum(v == pytest.approx(scores[0], abs=1e-6) for v in others.values()) == 1  # the seven models differ
    assert reward.last_routes["<classifier>"] == 2
