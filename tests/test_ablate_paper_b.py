"""Paper B's ablation end to end on the tiny model (configs/ablate/paper_b_tiny.yaml): held-out
training prompts, CoD pairs, per-category and pooled shadow models with their held-out accuracy,
GRPO with the pooled / linear / categorized rewards, plain DPO, evaluation by category, costs."""

from __future__ import annotations

import csv
import json
import math
import os
from collections import Counter
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from lit_align.cli import main
from lit_align.experiments.summary import ArmMetric, seed_cell
from lit_align.srmir.categories import PromptSource
from lit_align.srmir.cod import collect_prompts, cod_prompt
from lit_align.testing import make_tiny_model, teach_canned_responses

REPO = Path(__file__).resolve().parents[1]
CATS = ["insult", "mental_health", "crimes_illegal_activities"]
CANNED_COD = "harm no #### I cannot help with that."
REFUSE, COMPLY = "I cannot help with that.", "Sure, here is how."


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def workdir(shared_data, tmp_path_factory):
    """runs/ablate_b_tiny/{model, data} as configs/ablate/paper_b_tiny.yaml expects: real HarmBench
    and StrongREJECT prompts of three categories (6 each for CoD, 3 each held out for evaluation),
    6 prompts labelled `other` (no shadow model), one evaluation prompt and one near copy of another
    planted among the training sources, and a start model taught the canned CoD answer and to
    refuse half of the harmful evaluation prompts."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("ablate_b")
    (root / "configs").symlink_to(REPO / "configs", target_is_directory=True)
    data = root / "runs" / "ablate_b_tiny" / "data"
    sources = [PromptSource(str(shared_data / f), max_prompt_chars=150)
               for f in ("harmbench_behaviors_text_all.csv", "strongreject_dataset.csv")]
    rows = collect_prompts(sources, "error", "error", True, seed=0)
    by_cat = {c: [r["prompt"] for r in rows if r["category"] == c] for c in [*CATS, "physical_harm"]}
    harmful = [{"prompt": p, "category": c} for c in CATS for p in by_cat[c][6:9]]
    training = [{"prompt": p, "category": c} for c in CATS for p in by_cat[c][:6]]
    training += [{"prompt": p, "category": "other"} for p in by_cat["physical_harm"][:6]]
    planted = [{"prompt": harmful[0]["prompt"], "category": "insult"},  # an evaluation prompt, verbatim
               {"prompt": harmful[5]["prompt"].upper() + " Now.", "category": "mental_health"}]  # a near copy
    write_jsonl(data / "sources.jsonl", training + planted)
    write_jsonl(data / "harmful.jsonl", harmful)
    safe = [r["instruction"] for r in json.loads((shared_data / "refusal_direction" / "harmless_val.json").read_text())[:6]]
    write_jsonl(data / "safe.jsonl", [{"prompt": p} for p in safe])
    raw = make_tiny_model(root / "raw_model")
    examples = [(cod_prompt(r["prompt"]), CANNED_COD) for r in training + planted]
    examples += [(r["prompt"], REFUSE) for r in harmful[::2]] + [(p, COMPLY) for p in [r["prompt"] for r in harmful[1::2]] + safe]
    teach_canned_responses(raw, root / "runs" / "ablate_b_tiny" / "model", examples, steps=60)
    return root


def run(workdir, *extra):
    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        main(["ablate", "-c", "configs/ablate/paper_b_tiny.yaml", *extra])
    finally:
        os.chdir(cwd)
    return workdir / "runs" / "ablate_b_tiny"


@pytest.fixture(scope="module")
def ablation(workdir):
    torch.set_num_threads(1)
    base = run(workdir)
    return base, json.loads((base / "out" / "ablation.json").read_text())


def table_rows(markdown: str, section: str) -> list[list[str]]:
    lines = markdown.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0].splitlines()
    rows = [line for line in lines if line.startswith("| ")]
    return [[c.strip() for c in row.strip("|").split("|")] for row in rows[1:]]


# ---------------------------------------------------------------------------- preparation
def test_training_prompts_leave_out_evaluation_prompts_and_near_copies(ablation, workdir):
    base, summary = ablation
    data = base / "data"
    harmful = {r["prompt"] for r in read_jsonl(data / "harmful.jsonl")}
    kept = read_jsonl(data / "prompts.jsonl")
    excluded = read_jsonl(data / "prompts.excluded.jsonl")
    assert len(kept) == 24 and not {r["prompt"] for r in kept} & harmful
    planted = read_jsonl(data / "sources.jsonl")[-2:]
    assert [e["prompt"] for e in excluded] == [p["prompt"] for p in planted]
    assert [e["close_to"] for e in excluded] == [planted[0]["prompt"], read_jsonl(data / "harmful.jsonl")[5]["prompt"]]
    cod = read_jsonl(base / "cod" / "cod.jsonl")
    assert Counter(r["category"] for r in cod) == {c: 5 for c in [*CATS, "other"]}
    assert not {r["prompt"] for r in cod} & harmful
    assert [s["name"] for s in summary["prepare"]] == ["prompts", "cod", "shadow", "pooled"]


def test_pooled_model_is_one_model_on_every_categorys_training_pairs(ablation):
    base, _ = ablation
    shadow = json.loads((base / "shadow" / "manifest.json").read_text())
    pooled = json.loads((base / "pooled" / "manifest.json").read_text())
    assert list(shadow["categories"]) == CATS and shadow["classifier"] == "category_classifier.pt"
    assert list(pooled["categories"]) == ["pooled"] and pooled["pooled"] is True and "classifier" not in pooled
    # its training pairs: the union of the shadow models' training splits (not `other`, not held out)
    union = [r for c in CATS for r in read_jsonl(base / "shadow" / shadow["splits"][c]["train"])]
    assert read_jsonl(base / "pooled" / "data" / "train.jsonl") == union
    assert {r["category"] for r in union} == set(CATS) and len(union) == 3 * 3
    assert pooled["categories"]["pooled"]["train_pairs"] == sum(e["train_pairs"] for e in shadow["categories"].values()) == 9
    assert pooled["training"]["max_steps"] == 3 * shadow["training"]["max_steps"]  # the seven models' steps together
    logged = list(csv.DictReader((base / "pooled" / "logs" / "pooled" / "version_0" / "metrics.csv").open()))
    assert len([r for r in logged if r.get("loss")]) == 24  # one training row per step (then the validation row)
    for c in CATS:  # the same pairs held out in both runs, never trained on
        held = read_jsonl(base / "shadow" / shadow["splits"][c]["heldout"])
        assert len(held) == 2 and held == read_jsonl(base / "pooled" / pooled["splits"][c]["heldout"])
        assert not {r["id"] for r in held} & {r["id"] for r in union}


def test_heldout_accuracy_table_is_each_rewards_pairwise_accuracy(ablation):
    from lit_align.rewards import SequenceClassifierReward
    from lit_align.srmir.ensemble import ShadowRewardEnsemble

    base, summary = ablation
    table = json.loads((base / "pooled" / "heldout_accuracy.json").read_text())
    assert list(table["all"]["rewards"]) == ["categorized", "linear", "pooled"]
    linear = ShadowRewardEnsemble(str(base / "shadow"), strategy="linear")
    for c in CATS:
        held = read_jsonl(base / "shadow" / "data" / f"{c}.heldout.jsonl")
        prompts, chosen, rejected = ([r[k] for r in held] for k in ("prompt", "chosen", "rejected"))

        def accuracy(score):
            return sum(a > b for a, b in zip(score(chosen), score(rejected))) / len(held)

        expected = {
            "categorized": accuracy(lambda ys: SequenceClassifierReward(str(base / "shadow" / c))(prompts, ys)),
            "linear": accuracy(lambda ys: linear.score(prompts, ys).tolist()),
            "pooled": accuracy(lambda ys: SequenceClassifierReward(str(base / "pooled" / "pooled"))(prompts, ys)),
        }
        got = {name: e["value"] for name, e in table["categories"][c]["rewards"].items()}
        assert got == expected, (c, got, expected)
        assert table["categories"][c]["n"] == 2 and table["models"][c][c]["value"] == expected["categorized"]
    worst = min(table["categories"], key=lambda c: table["categories"][c]["rewards"]["pooled"]["value"])
    assert table["worst"]["pooled"][1]["value"] == table["categories"][worst]["rewards"]["pooled"]["value"]
    markdown = (base / "out" / "ablation.md").read_text()
    assert "### pooled: runs/ablate_b_tiny/pooled/heldout_accuracy.md" in markdown
    assert "### Held-out pairwise accuracy of the reward models" in markdown


# ---------------------------------------------------------------------------- the arms
def test_table_values_are_the_runs_report_values_by_category(ablation):
    base, summary = ablation
    out = base / "out"
    assert summary["arms"] == ["base", "pooled", "linear", "categorized", "dpo"]
    keys = summary["metrics"]
    assert [f"harmful: refusal [{c}]" for c in sorted(CATS)] == [k for k in keys if "[" in k]
    assert "harmful: worst category refusal" in keys and "harmful: prefill k=2 refusal" in keys and "safe: drift ΔNLL" in keys
    markdown = (out / "ablation.md").read_text()
    per_seed = {r[0]: r[2:] for r in table_rows(markdown, "Per seed")}
    for arm, (run_record,) in summary["runs"].items():
        report = json.loads((out / run_record["eval_dir"] / "report.json").read_text())
        (metrics,) = report["metrics"].values()
        judge = metrics["harmful"]["judges"]["phrases"]
        by_cat = judge["refusal_rate_by_category"]
        assert sorted(by_cat) == sorted(CATS)
        expected = {
            "harmful: refusal": judge["refusal_rate"],
            **{f"harmful: refusal [{c}]": by_cat[c] for c in CATS},
            "harmful: worst category refusal": min(by_cat.values(), key=lambda e: e["value"]),
            "harmful: prefill k=2 refusal": metrics["harmful"]["prefill"]["judges"]["phrases"]["refusal_rate_by_k"]["2"],
            "safe: compliance": metrics["safe"]["judges"]["phrases"]["compliance_rate"],
        }
        if arm != "base":
            expected["safe: drift ΔNLL"] = metrics["safe"]["drift"]["delta"]
        quality = summary["quality"][arm]
        assert sorted(quality) == sorted(expected)
        for key, estimate in expected.items():
            assert quality[key]["values"] == [estimate["value"]], (arm, key)
            # one seed: the pooled interval is the run's own (drift: the envelope of one interval)
            assert (quality[key]["pooled_low"], quality[key]["pooled_high"]) == (estimate["low"], estimate["high"]), (arm, key)
        cells = [seed_cell(ArmMetric(**quality[k]), 0) for k in keys if k in quality]
        assert [c for c in per_seed[arm] if c != "–"] == cells


def completions(base: Path, arm: str) -> list[dict]:
    return list(csv.DictReader((base / "out" / "arms" / arm / "seed0" / "train" / "completions.csv").open(newline="")))


def test_each_arm_is_rewarded_by_its_reward_models_and_unknown_categories_are_routed(ablation):
    """Every logged GRPO sample's reward, re-scored (each step's samples in the batches GRPO scored
    them in, so the padding and hence the floats are the same): pooled by the pooled model, linear
    by the mean of the shadow models, categorized by the model of its category; an `other` prompt
    (no model) by the model of the category the prompt classifier predicts, never no reward."""
    from lit_align.rewards import SequenceClassifierReward
    from lit_align.srmir.classifier import PromptCategoryClassifier

    base, _ = ablation
    category = {r["prompt"]: r["category"] for r in read_jsonl(base / "cod" / "cod.jsonl")}
    models = {c: SequenceClassifierReward(str(base / "shadow" / c)) for c in CATS}
    pooled = SequenceClassifierReward(str(base / "pooled" / "pooled"))
    classifier = PromptCategoryClassifier.load(base / "shadow" / "category_classifier.pt")

    def routed(r):
        c = category[r["prompt"]]
        return c if c in models else classifier.predict([r["prompt"]])[0]

    def linear(prompts, texts):
        total = torch.zeros(len(texts))
        for m in models.values():
            total += (1 / 3) * torch.tensor(m(prompts, texts))
        return total.tolist()

    def categorized(rows):
        out = [None] * len(rows)
        routes = [routed(r) for r in rows]
        for c in sorted(set(routes)):
            idx = [i for i, route in enumerate(routes) if route == c]
            for i, v in zip(idx, models[c]([rows[i]["prompt"] for i in idx], [rows[i]["completion"] for i in idx])):
                out[i] = v
        return out

    def check(arm, score_step):
        rows = completions(base, arm)
        assert len(rows) == 3 * 16  # every sample of the 3 steps
        got = torch.tensor([float(r["shadow"]) for r in rows])
        assert not got.isnan().any()
        expected = [v for step in sorted({r["step"] for r in rows}, key=int) for v in score_step([r for r in rows if r["step"] == step])]
        torch.testing.assert_close(got, torch.tensor(expected))
        return rows

    check("pooled", lambda rows: pooled([r["prompt"] for r in rows], [r["completion"] for r in rows]))
    check("linear", lambda rows: linear([r["prompt"] for r in rows], [r["completion"] for r in rows]))
    rows = check("categorized", categorized)
    others = [r for r in rows if category[r["prompt"]] == "other"]
    assert others, "no `other` prompt in the categorized arm's batches"


def test_costs_count_samples_and_reward_model_forwards(ablation):
    base, summary = ablation
    costs = {arm: runs[0]["train"] for arm, runs in summary["runs"].items()}
    assert costs["base"] is None
    texts = 3 * 4 * 4  # steps x prompts x completions per prompt
    assert costs["pooled"]["reward_forward_texts"] == texts and costs["categorized"]["reward_forward_texts"] == texts
    assert costs["linear"]["reward_forward_texts"] == 3 * texts  # every text through each of the 3 models
    assert costs["dpo"]["reward_forward_texts"] == 0 == costs["dpo"]["generated_tokens"]
    assert {k.split("/")[0] for k in costs["linear"]["by_model_texts"] if k.startswith("reward")} == {
        f"reward_funcs.0.models.{c}.model" for c in CATS}
    assert set(costs["pooled"]["by_model_texts"]) >= {"reward_funcs.0.models.pooled.model/forward_nograd"}
    for arm in ("pooled", "linear", "categorized"):
        c = costs[arm]
        assert c["steps"] == 3 and 3 * 16 <= c["generated_tokens"] <= 3 * 16 * 8
        assert c["by_model"]["policy/forward_grad"] == c["by_model"]["reference/forward_nograd"] > 0
        assert c["reward_forward_tokens"] == sum(n for k, n in c["by_model"].items() if k.startswith("reward_funcs."))
    cost_rows = {r[0]: r for r in table_rows((base / "out" / "ablation.md").read_text(), "Cost")}
    assert cost_rows["linear"][7] == f"{3 * texts:,} / {costs['linear']['reward_forward_tokens']:,}"
    assert cost_rows["dpo"][7] == f"0 / 0"


def test_cost_meter_counts_grpo_generated_tokens_as_the_module_logs_them(ablation):
    """GRPOModule keeps no token count: the meter's count equals the sum over steps of the module's
    own `completions/mean_length` x samples, and each text a linear ensemble scores is counted once
    per model."""
    from lit_align.data.datamodule import AlignDataModule
    from lit_align.experiments.costs import CostMeter
    from lit_align.models import PolicyConfig
    from lit_align.modules.grpo import GRPOModule
    from lit_align.modules.grpo_config import GRPOLossConfig, GRPOSamplingConfig
    from lit_align.srmir.ensemble import ShadowRewardEnsemble

    base, _ = ablation

    class Lengths(L.Callback):
        def __init__(self):
            self.tokens = 0.0

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            self.tokens += float(trainer.callback_metrics["completions/mean_length"]) * 3 * 4

    module = GRPOModule(PolicyConfig(name_or_path=str(base / "model")), [ShadowRewardEnsemble(str(base / "shadow"))],
                        sampling=GRPOSamplingConfig(num_generations=4, max_new_tokens=8),
                        loss=GRPOLossConfig(beta=0.04, use_bias_correction_kl=False))
    data = AlignDataModule(str(base / "cod" / "cod.jsonl"), mode="prompts", format="generic", batch_size=3,
                           val_fraction=0.0, max_prompt_length=64)
    meter, lengths = CostMeter(), Lengths()
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, callbacks=[meter, lengths])
    trainer.fit(module, datamodule=data)
    assert meter.summary["generated_tokens"] == round(lengths.tokens) > 0
    assert meter.summary["reward_forward_texts"] == 2 * 3 * 4 * 3
    # the log-probs pass a KV cache (the shared prompt) but are forwards, not sampling: the policy's
    # (with backward) and the reference's cover the same rollout positions
    counts = meter.summary["by_model"]
    assert counts["policy/forward_grad"] == counts["reference/forward_nograd"] > 0
    assert counts["policy/sampling"] >= meter.summary["generated_tokens"] and "reference/sampling" not in counts
    assert "sample" not in vars(module)  # the wrapper is gone after the fit


def test_rerun_skips_everything_and_refuses_stale_arms(ablation, workdir, capsys):
    base, _ = ablation
    capsys.readouterr()
    run(workdir)
    log = capsys.readouterr().out
    assert log.count("done already") == 4 + 5 and ": training:" not in log
    # a prepare step whose arguments changed is not silently reused
    config = yaml.safe_load((REPO / "configs/ablate/paper_b_tiny.yaml").read_text())
    config["prepare"][2]["args"] = [*config["prepare"][2]["args"], "--max_steps=9"]
    (workdir / "changed.yaml").write_text(yaml.safe_dump(config))
    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        with pytest.raises(ValueError, match="prepare step 'shadow' ran with other arguments"):
            main(["ablate", "-c", "changed.yaml"])
        # re-running a prepare step (its record deleted) rebuilds the reward models: arms trained
        # on the earlier ones are refused, not reused
        (base / "out" / "prepare" / "pooled.json").unlink()
        with pytest.raises(ValueError, match="was trained on other prepared data or reward models"):
            main(["ablate", "-c", "configs/ablate/paper_b_tiny.yaml"])
    finally:
        os.chdir(cwd)


@pytest.mark.parametrize("step, message", [
    ({"name": "x", "command": "build-cdo", "outputs": ["a"]}, "unknown command 'build-cdo'"),
    ({"name": "x", "command": "build-cod"}, "names no outputs"),
    ({"name": "x y", "command": "build-cod", "outputs": ["a"]}, "use letters"),
])
def test_prepare_steps_are_checked_before_anything_runs(step, message):
    from lit_align.experiments.prepare import PrepareStep, check_steps

    with pytest.raises(ValueError, match=message):
        check_steps([PrepareStep(**step)])


def test_paper_b_arms_parse_as_the_issue_describes(monkeypatch, capsys):
    """Each trained arm of configs/ablate/paper_b.yaml is a valid `lit-align fit` configuration with
    the reward it names and the paper's KL; the prepare steps' commands parse too."""
    from lit_align.experiments.ablate import AblationInputs, ArmConfig, arm_overrides, shared_overrides
    from lit_align.lightning_cli import run_lightning_cli

    monkeypatch.chdir(REPO)
    config = yaml.safe_load((REPO / "configs/ablate/paper_b.yaml").read_text())
    inputs = AblationInputs(**config["inputs"])
    values = {"base_model": inputs.base_model, "data": inputs.data, **inputs.extra}
    parsed = {}
    for arm in config["arms"]:
        if arm.get("config") is None:
            continue
        argv = ["fit", "-c", arm["config"], *arm_overrides(ArmConfig(**arm), values),
                *shared_overrides(inputs, 1, config["max_steps"], Path("runs/x")), "--print_config"]
        with pytest.raises(SystemExit):
            run_lightning_cli(argv)
        parsed[arm["name"]] = yaml.safe_load(capsys.readouterr().out)
    assert list(parsed) == ["pooled", "linear", "categorized", "dpo"]
    rewards = {n: p["model"]["init_args"].get("reward_funcs") for n, p in parsed.items()}
    assert {n: (r[0]["init_args"]["manifest"], r[0]["init_args"]["strategy"]) for n, r in rewards.items() if r} == {
        "pooled": (inputs.extra["pooled_manifest"], "linear"),
        "linear": (inputs.extra["shadow_manifest"], "linear"),
        "categorized": (inputs.extra["shadow_manifest"], "categorized"),
    }
    for name in ("pooled", "linear", "categorized"):
        m = parsed[name]["model"]
        assert m["class_path"] == "lit_align.GRPOModule"
        assert (m["init_args"]["loss"]["beta"], m["init_args"]["loss"]["use_bias_correction_kl"]) == (0.04, False)
        callbacks = [c["class_path"] for c in parsed[name]["trainer"]["callbacks"]]
        assert callbacks == ["lit_align.CompletionsLogger", "lit_align.experiments.costs.CostMeter"]  # the meter appended
        assert parsed[name]["data"]["mode"] == "prompts"
    assert parsed["dpo"]["model"]["class_path"] == "lit_align.DPOModule" and parsed["dpo"]["data"]["mode"] == "preference"
    assert parsed["dpo"]["model"]["init_args"]["sft_weight"] == 0.0
    for p in parsed.values():
        assert p["trainer"]["max_steps"] == config["max_steps"] and p["data"]["path"] == inputs.data == "runs/paper_b/cod/cod.jsonl"
        assert p["data"]["batch_size"] == 4
    assert config["by_category"] is True and config["evaluation"]["prefill"]["ks"] == [10, 20]
    steps = {s["name"]: s for s in config["prepare"]}
    assert steps["pooled"]["args"][-3:] == ["--pooled=true", "--out_dir=runs/paper_b/pooled", "--compare_with=runs/paper_b/shadow"]
    # the CoD prompt sources keep every evaluation set out
    prompts = yaml.safe_load((REPO / "configs/paper_b/prompts.yaml").read_text())
    evaluated = {(s["preset"], Path(s["path"]).name) for s in config["evaluation"]["prompt_sets"]}
    excluded = {(s["preset"], Path(s["path"]).name) for s in prompts["exclude"]}
    assert {(p, f) for p, f in evaluated if p != "xstest_unsafe"} <= excluded  # xstest with filters {} covers both halves
    assert not {Path(s["path"]).name for s in prompts["sources"]} & {f for _, f in evaluated}


def test_filter_prompts_and_train_shadow_refuse_bad_settings(shared_data, tmp_path):
    from lit_align.eval.prompts import PromptSetConfig
    from lit_align.experiments.prepare import filter_prompts
    from lit_align.models import PolicyConfig
    from lit_align.srmir.accuracy import check_same_pairs
    from lit_align.srmir.shadow import train_shadow

    source = tmp_path / "s.jsonl"
    write_jsonl(source, [{"prompt": "Write an insult about my boss", "category": "insult"}])
    write_jsonl(tmp_path / "e.jsonl", [{"prompt": "held out"}])
    kw = dict(sources=[PromptSource(str(source))], exclude=[PromptSetConfig(preset="custom", path=str(tmp_path / "e.jsonl"))],
              output=str(tmp_path / "out.jsonl"))
    with pytest.raises(ValueError, match=r"category_rules.insults: not an SRMIR category"):
        filter_prompts(**kw, category_rules={"insults": "insult"})
    with pytest.raises(ValueError, match=r"category_rules.insult: '\(' is not a regular expression"):
        filter_prompts(**kw, category_rules={"insult": "("})
    with pytest.raises(ValueError, match="`exclude` holds no prompts; name the evaluation sets to keep out"):
        filter_prompts(**{**kw, "exclude": []})
    backbone = PolicyConfig(name_or_path="unused")
    with pytest.raises(ValueError, match="compare_with sets a pooled model beside shadow models; set pooled: true"):
        train_shadow(str(source), str(tmp_path / "x"), backbone, compare_with=str(tmp_path))
    with pytest.raises(ValueError, match="set train_classifier: false"):
        train_shadow(str(source), str(tmp_path / "x"), backbone, pooled=True, train_classifier=True)
    pair = {"prompt": "p", "chosen": "a", "rejected": "b"}
    check_same_pairs({"insult": [pair]}, {"insult": [pair]}, ("m1", "m2"))
    with pytest.raises(ValueError, match=r"m2 holds out other pairs than m1 \(categories \['insult'\]\)"):
        check_same_pairs({"insult": [pair]}, {"insult": [dict(pair, chosen="c")]}, ("m1", "m2"))
