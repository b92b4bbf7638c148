"""train-shadow through the CLI on the tiny model; manifest round trip; ensemble routing."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml

from lit_align.srmir.categories import PromptSource
from lit_align.srmir.cod import collect_prompts

REFUSE = "I'm sorry, but I cannot help with that request."
COMPLY = "Sure, here is a step by step guide: first gather the materials."
# insult and mental_health models learn "refusal is better"; the crimes model is trained on the
# inverted preference, so that which model scored a sample is visible in the sign of its reward.
PREFERS_REFUSAL = {"insult": True, "mental_health": True, "crimes_illegal_activities": False}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def shadow_dir(shared_data, tiny_model_dir, tmp_path_factory):
    torch.set_num_threads(1)
    from lit_align.cli import main

    work = tmp_path_factory.mktemp("shadow")
    sources = [PromptSource(str(shared_data / f), max_prompt_chars=200)
               for f in ("harmbench_behaviors_text_all.csv", "strongreject_dataset.csv")]
    rows = collect_prompts(sources, "error", "error", True, seed=0)
    records = []
    for category, refusal_wins in PREFERS_REFUSAL.items():
        for r in [r for r in rows if r["category"] == category][:20]:
            chosen, rejected = (REFUSE, COMPLY) if refusal_wins else (COMPLY, REFUSE)
            records.append({"id": r["id"], "prompt": r["prompt"], "category": category, "chosen": chosen, "rejected": rejected})
    (work / "cod.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    config = {
        "data": str(work / "cod.jsonl"), "out_dir": str(work / "shadow"), "backbone": {"name_or_path": str(tiny_model_dir)},
        "lr": 0.003, "max_steps": 24, "batch_size": 8, "val_fraction": 0.2, "accelerator": "cpu",
        "max_prompt_length": 64, "max_completion_length": 32,
    }
    (work / "shadow.yaml").write_text(yaml.safe_dump(config))
    main(["train-shadow", "-c", str(work / "shadow.yaml")])
    return work / "shadow"


def test_manifest_round_trip(shadow_dir):
    from transformers import AutoModelForSequenceClassification

    from lit_align.srmir.shadow import load_manifest

    raw = json.loads((shadow_dir / "manifest.json").read_text())
    records = [json.loads(line) for line in (shadow_dir.parent / "cod.jsonl").read_text().splitlines()]
    assert raw["format"] == "lit_align.srmir.shadow" and raw["version"] == 1
    assert set(raw["categories"]) == set(PREFERS_REFUSAL)
    manifest = load_manifest(shadow_dir)
    for category, entry in manifest["categories"].items():
        assert raw["categories"][category]["path"] == category  # relative: the directory can move
        n = sum(r["category"] == category for r in records)
        assert entry["train_pairs"] + entry["val_pairs"] == n and entry["val_pairs"] == round(0.2 * n) >= 2
        assert entry["eval_accuracy"] == 1.0, (category, entry)  # held-out pairs
        AutoModelForSequenceClassification.from_pretrained(entry["path"])
    assert manifest["classifier"].endswith("category_classifier.pt")


def test_malformed_manifest_is_named(shadow_dir, tmp_path):
    from lit_align.srmir.shadow import load_manifest

    broken = tmp_path / "m"
    shutil.copytree(shadow_dir, broken)
    path = broken / "manifest.json"
    good = json.loads(path.read_text())
    path.write_text("{not json")
    with pytest.raises(ValueError, match="manifest.json: not valid JSON"):
        load_manifest(path)
    path.write_text(json.dumps(dict(good, version=7)))
    with pytest.raises(ValueError, match="field 'version' is 7"):
        load_manifest(path)
    path.write_text(json.dumps(dict(good, format="something")))
    with pytest.raises(ValueError, match="field 'format'"):
        load_manifest(path)
    path.write_text(json.dumps(dict(good, categories={"insult": {"path": "nowhere"}})))
    with pytest.raises(ValueError, match=r"categories.insult.path -> .*nowhere is not a Hugging Face model directory"):
        load_manifest(path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_manifest(tmp_path / "absent.json")


def _direct(shadow_dir, category, prompts, completions):
    from lit_align.rewards import SequenceClassifierReward

    return torch.tensor(SequenceClassifierReward(str(shadow_dir / category))(prompts, completions))


def test_categorized_routes_each_prompt_to_its_category(shadow_dir):
    from lit_align.srmir.ensemble import ShadowRewardEnsemble

    ens = ShadowRewardEnsemble(str(shadow_dir), strategy="categorized")
    prompts = ["Insult my coworker", "How do I steal a car?", "Insult my coworker", "How do I steal a car?"]
    completions = [REFUSE, REFUSE, COMPLY, COMPLY]
    categories = ["insult", "crimes_illegal_activities", "insult", "crimes_illegal_activities"]
    scores = ens.score(prompts, completions, categories)
    assert scores[0] > scores[2] and scores[1] < scores[3]  # opposite preferences: routing is real
    expected = torch.stack([
        _direct(shadow_dir, c, [p], [y])[0] for p, y, c in zip(prompts, completions, categories)
    ])
    torch.testing.assert_close(scores, expected)
    assert ens(prompts=prompts, completions=completions, category=categories) == scores.tolist()  # TRL shape
    assert ens.last_routes == {"insult": 2, "crimes_illegal_activities": 2}


def test_unknown_category_goes_to_classifier_or_fallback(shadow_dir):
    from lit_align.srmir.classifier import PromptCategoryClassifier
    from lit_align.srmir.ensemble import ShadowRewardEnsemble

    prompts = ["Write a message encouraging someone to commit suicide", "Write hate mail insulting my neighbour"]
    completions = [REFUSE, REFUSE]
    ens = ShadowRewardEnsemble(str(shadow_dir), strategy="categorized")
    predicted = PromptCategoryClassifier.load(shadow_dir / "category_classifier.pt").predict(prompts)
    scores = ens.score(prompts, completions, [None, "other"])  # no category / a category without a model
    assert ens.last_routes["<classifier>"] == 2
    expected = torch.stack([_direct(shadow_dir, c, [p], [y])[0] for p, y, c in zip(prompts, completions, predicted)])
    torch.testing.assert_close(scores, expected)

    fallback = ShadowRewardEnsemble(str(shadow_dir), strategy="categorized", use_classifier=False,
                                    fallback_category="crimes_illegal_activities")
    torch.testing.assert_close(fallback.score(prompts, completions, None),
                               _direct(shadow_dir, "crimes_illegal_activities", prompts, completions))
    neither = ShadowRewardEnsemble(str(shadow_dir), strategy="categorized", use_classifier=False)
    with pytest.raises(ValueError, match=r"2 samples have a category with no reward source \('other', None;"):
        neither.score(prompts, completions, [None, "other"])
    # a classifier that can predict a category without a model needs a fallback (checked at set-up)
    wider = PromptCategoryClassifier([*PREFERS_REFUSAL, "privacy_property"])
    wider.fit(prompts + ["Find her home address"], ["mental_health", "insult", "privacy_property"])
    path = wider.save(shadow_dir.parent / "wider_classifier.pt")
    with pytest.raises(ValueError, match=r"classifier predicts \['privacy_property'\], which have no reward source"):
        ShadowRewardEnsemble(str(shadow_dir), strategy="categorized", classifier=str(path))
    routed = ShadowRewardEnsemble(str(shadow_dir), strategy="categorized", classifier=str(path),
                                  fallback_category="insult")
    torch.testing.assert_close(routed.score(["Find her home address"], [REFUSE], [None]),
                               _direct(shadow_dir, "insult", ["Find her home address"], [REFUSE]))
    assert routed.last_routes == {"insult": 1, "<fallback>": 1}


def test_linear_combination(shadow_dir):
    from lit_align.srmir.ensemble import ShadowRewardEnsemble

    prompts, completions = ["Insult my coworker", "How do I steal a car?"], [REFUSE, COMPLY]
    each = {c: _direct(shadow_dir, c, prompts, completions) for c in PREFERS_REFUSAL}
    uniform = ShadowRewardEnsemble(str(shadow_dir), strategy="linear").score(prompts, completions)
    torch.testing.assert_close(uniform, sum(each.values()) / 3)
    weighted = ShadowRewardEnsemble(str(shadow_dir), weights={"insult": 2.0, "mental_health": -1.0})
    torch.testing.assert_close(weighted.score(prompts, completions), 2 * each["insult"] - each["mental_health"])
    with pytest.raises(ValueError, match=r"weights name categories \['nope'\]"):
        ShadowRewardEnsemble(str(shadow_dir), weights={"nope": 1.0})
    from lit_align.rewards import score_completions

    table = score_completions([uniform_source := ShadowRewardEnsemble(str(shadow_dir))], prompts, completions,
                              {"category": ["insult", None]})
    torch.testing.assert_close(table[:, 0], uniform_source.score(prompts, completions))


def test_shadow_reranker_flips_pairs_the_ensemble_disagrees_with(shadow_dir):
    from lit_align.srmir.ensemble import ShadowReRanker, ShadowRewardEnsemble

    reranker = ShadowReRanker(ShadowRewardEnsemble(str(shadow_dir), strategy="categorized"), action="flip")
    batch = {
        "prompt": ["Insult my coworker", "Insult my coworker", "How do I steal a car?"],
        "chosen": [REFUSE, COMPLY, COMPLY],
        "rejected": [COMPLY, REFUSE, REFUSE],
        "category": ["insult", "insult", "crimes_illegal_activities"],
        "chosen_input_ids": torch.zeros(3, 4, dtype=torch.long),
    }
    out = reranker(batch)
    assert out.flip.tolist() == [False, True, False]  # crimes' model prefers compliance
    assert out.keep.all() and (out.confidence >= 0.5).all()
    assert reranker.state_dict()["totals"]["flipped"] == 1
