"""Each judge on real responses: SmolLM2-135M-Instruct outputs with hand labels
(tests/eval_fixtures/README.md says how they were made)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from lit_align.eval.judges import ADVBENCH_PHRASES, LLMJudge, ProbeJudge, RefusalPhraseJudge, RewardJudge

FIXTURE = Path(__file__).parent / "eval_fixtures" / "smollm2_responses.jsonl"


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return [json.loads(line) for line in FIXTURE.read_text().splitlines()]


def clear(rows):
    return [r for r in rows if r["label"] != "unclear"]


def test_fixture_has_real_refusals_and_compliances(rows):
    labels = [r["label"] for r in rows]
    assert labels.count("refusal") >= 5 and labels.count("compliance") >= 40
    assert {r["source"] for r in rows} >= {"harmbench", "strongreject", "advbench", "xstest"}


# ---------------------------------------------------------------------------- refusal phrases
def test_phrase_judge_against_hand_labels(rows):
    judged = clear(rows)
    refused = RefusalPhraseJudge()([r["prompt"] for r in judged], [r["response"] for r in judged]).refused
    truth = [r["label"] == "refusal" for r in judged]
    hits = sum(p and t for p, t in zip(refused, truth))
    false_alarms = [r["response"][:60] for r, p, t in zip(judged, refused, truth) if p and not t]
    misses = [r["response"][:60] for r, p, t in zip(judged, refused, truth) if t and not p]
    # measured on this fixture: every clear SmolLM2 refusal uses a listed phrase, no clear
    # compliance does; the misses are refusals worded without one
    assert false_alarms == []
    assert hits / sum(truth) >= 0.8, misses


def test_phrase_judge_known_failure_apology_in_passing(rows):
    """'I'm sorry for your loss, but ...' is counted as a refusal: the judge reads wording."""
    judge = RefusalPhraseJudge()
    loss = [r for r in rows if "sorry for your loss" in r["response"]]
    assert loss and all(judge.is_refusal(r["response"]) for r in loss)


def test_phrase_judge_lists_cases_and_modes():
    judge = RefusalPhraseJudge()
    assert judge.is_refusal("Sure. Well... I’m sorry, I can’t help with that.")  # typographic apostrophes
    assert judge.is_refusal("i CANNOT do that")  # JailbreakBench matching ignores case
    assert not judge.is_refusal("Here is how to bake bread: mix flour and water.")
    assert judge.is_refusal("   ")  # nothing said: nothing complied with
    assert not RefusalPhraseJudge(empty_is_refusal=False).is_refusal("")
    start = RefusalPhraseJudge(match="start")
    assert start.is_refusal("I cannot help with that.") and not start.is_refusal("Step 1: ... I cannot stress this enough")
    advbench = RefusalPhraseJudge("advbench")
    assert len(ADVBENCH_PHRASES) == 29
    assert advbench.is_refusal("Step 1: this is illegal, but here is how")  # its broad words over-count
    assert not advbench.is_refusal("i cannot")  # case-sensitive, as in the GCG evaluation
    custom = RefusalPhraseJudge(["no way"], name="custom")
    assert custom.is_refusal("No way.") and custom.name == "custom"
    with pytest.raises(ValueError, match="refusal phrase list 'gcg'"):
        RefusalPhraseJudge("gcg")


def test_advbench_list_flags_at_least_as_many_real_responses(rows):
    responses = [r["response"] for r in rows]
    jbb = RefusalPhraseJudge()(None, responses).refused
    adv = RefusalPhraseJudge("advbench")(None, responses).refused
    assert sum(adv) >= sum(jbb)


# ---------------------------------------------------------------------------- reward source
def test_reward_judge_with_an_import_path_on_real_responses(rows):
    judged = clear(rows)
    judge = RewardJudge("lit_align.rewards:refusal_reward")
    scores = judge([r["prompt"] for r in judged], [r["response"] for r in judged]).score
    truth = [r["label"] == "refusal" for r in judged]
    refusal_mean = sum(s for s, t in zip(scores, truth) if t) / sum(truth)
    compliance_mean = sum(s for s, t in zip(scores, truth) if not t) / (len(truth) - sum(truth))
    assert refusal_mean > 0.8 and compliance_mean < 0.05


def test_reward_judge_contract(rows):
    def harmful_only(prompts, completions, harmful, **columns):
        return [float(len(c)) if h else None for c, h in zip(completions, harmful)]

    judge = RewardJudge(harmful_only, name="length")
    out = judge([r["prompt"] for r in rows], [r["response"] for r in rows], harmful=[r["harmful"] for r in rows])
    assert [s is None for s in out.score] == [not r["harmful"] for r in rows]
    assert out.refused is None and judge.name == "length"
    with pytest.raises(ValueError, match="returned 1 rewards for 2 responses"):
        RewardJudge(lambda prompts, completions, **kw: [1.0])(["a", "b"], ["x", "y"])
    with pytest.raises(ValueError, match="returned nan for response 0"):
        RewardJudge(lambda prompts, completions, **kw: [math.nan])(["a"], ["x"])
    with pytest.raises(ValueError, match="not an import path"):
        RewardJudge("no_colon_here")


# ---------------------------------------------------------------------------- probe
def test_probe_judge_scores_real_responses(rows, tiny_model_dir, tmp_path):
    from lit_align.models import PolicyConfig, load_causal_lm, load_tokenizer
    from lit_align.probes import build_probe, extract_features
    from lit_align.probes.features import encode_texts
    from lit_align.probes.train import fit_probe

    cfg = PolicyConfig(name_or_path=str(tiny_model_dir))
    model, tokenizer = load_causal_lm(cfg).eval(), load_tokenizer(cfg)
    judged = [r for r in clear(rows) if r["harmful"]]
    prompts, responses = [r["prompt"] for r in judged], [r["response"] for r in judged]
    safe = torch.tensor([float(r["label"] == "refusal") for r in judged])  # a refusal is the safe answer here
    features = extract_features(model, encode_texts(tokenizer, prompts, responses), [1, 2], pad_token_id=tokenizer.pad_token_id, progress=False)
    probe = build_probe("hybrid", model.config.hidden_size, [1, 2])
    fit_probe(probe, features, labels=safe, epochs=30)
    path = probe.save(tmp_path / "probe.safetensors")

    judge = ProbeJudge(str(path), model, tokenizer, batch_size=5)
    out = judge(prompts, responses)
    with torch.no_grad():
        direct = probe.eval()(features)
    torch.testing.assert_close(torch.tensor(out.score), direct, rtol=1e-4, atol=1e-4)
    assert out.confidence == pytest.approx(torch.sigmoid(direct).tolist(), abs=1e-4)
    assert out.refused is None

    wrong = build_probe("hybrid", model.config.hidden_size * 2, [1, 2]).save(tmp_path / "wrong.safetensors")
    with pytest.raises(ValueError, match="hidden size"):
        ProbeJudge(str(wrong), model, tokenizer)


# ---------------------------------------------------------------------------- LLM judge
def test_llm_judge_is_a_probability_independent_of_batching(rows, tiny_model_dir):
    from lit_align.models import PolicyConfig, load_causal_lm, load_tokenizer

    cfg = PolicyConfig(name_or_path=str(tiny_model_dir))
    model, tokenizer = load_causal_lm(cfg).eval(), load_tokenizer(cfg)
    sample = rows[::8]  # prompts and responses of different lengths: padding matters
    prompts, responses = [r["prompt"] for r in sample], [r["response"][:200] for r in sample]
    one = LLMJudge(model, tokenizer, batch_size=1)(prompts, responses)
    many = LLMJudge(model, tokenizer, batch_size=len(sample))(prompts, responses)
    assert many.confidence == pytest.approx(one.confidence, abs=1e-5)
    assert all(0.0 < p < 1.0 for p in one.confidence)
    assert one.refused == [p >= 0.5 for p in one.confidence]
    with pytest.raises(ValueError, match=r"must contain \{response\}"):
        LLMJudge(model, tokenizer, judge_prompt="Is this a refusal? {prompt}")
