"""`lit-align ablate`: arms trained under one budget, evaluated, tabulated, compared; resumable."""

from __future__ import annotations

import json
import os
import random
import statistics
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from lit_align.cli import main
from lit_align.data.datamodule import AlignDataModule
from lit_align.experiments.ablate import AblationInputs, ArmConfig, ablate, arm_overrides, shared_overrides
from lit_align.experiments.costs import CostMeter
from lit_align.experiments.summary import ArmMetric, seed_cell, verdict
from lit_align.models import PolicyConfig
from lit_align.modules.dpo import DPOModule
from lit_align.probes import HybridProbe
from lit_align.testing import make_tiny_model, teach_canned_responses

REPO = Path(__file__).resolve().parents[1]
REFUSE, COMPLY = "I cannot help with that.", "Sure, here is how."


def metric(values, low, high, pooled="responses", direction=1):
    return ArmMetric(list(range(len(values))), values, [v - 0.05 for v in values], [v + 0.05 for v in values], 10,
                     statistics.fmean(values), low, high, pooled=pooled, direction=direction)


def test_verdict_needs_disjoint_pooled_intervals_and_seed_ranges():
    dpo = metric([0.50, 0.55, 0.60], 0.45, 0.65)
    assert verdict(metric([0.80, 0.85, 0.90], 0.75, 0.95), dpo) == "better"
    assert verdict(metric([0.20, 0.25, 0.30], 0.15, 0.35), dpo) == "worse"
    assert verdict(metric([0.70, 0.75, 0.80], 0.64, 0.86), dpo) == "no clear difference"  # intervals overlap
    # pooled intervals apart, but one seed of the arm is below one seed of DPO: not clear
    assert verdict(metric([0.58, 0.85, 0.90], 0.70, 0.95), dpo) == "no clear difference"
    # one seed each: the rule is non-overlapping intervals
    assert verdict(metric([0.9], 0.8, 0.95), metric([0.7], 0.6, 0.79)) == "better"
    assert verdict(metric([0.9], 0.8, 0.95), metric([0.7], 0.6, 0.80)) == "no clear difference"
    # lower is better (drift): a lower arm is better
    low, high = metric([0.1, 0.2], 0.05, 0.25, direction=-1), metric([0.6, 0.7], 0.5, 0.8, direction=-1)
    assert verdict(low, high) == "better" and verdict(high, low) == "worse"
    assert verdict(metric([0.5], float("nan"), float("nan")), dpo) == "n/a"


def test_by_category_tabulates_each_category_and_the_worst_one(tmp_path):
    """Paper B reads refusal per category and the worst category: per seed from report.json, pooled
    over the seeds' responses (the worst category of the pooled responses)."""
    from lit_align.eval.metrics import summarize, to_jsonable
    from lit_align.experiments.summary import arm_metrics

    refused = {0: {"A": [1, 1, 0, 1], "B": [0, 0, 1, 0]}, 1: {"A": [1, 0, 0, 1], "B": [1, 1, 1, 0]}}
    runs = []
    for seed, by_cat in refused.items():
        records = [
            {"set": "h", "harmful": True, "category": c, "length_tokens": 5, "judges": {"phrases": {"refused": bool(v)}}}
            for c, values in by_cat.items() for v in values
        ]
        run = tmp_path / f"seed{seed}"
        run.mkdir()
        (run / "report.json").write_text(json.dumps(to_jsonable({"metrics": {"m": {"h": summarize(records, num_resamples=200)}}})))
        write_jsonl(run / "responses.jsonl", records)
        runs.append({"seed": seed, "eval_dir": run.name})
    stats = arm_metrics(tmp_path, runs, "phrases", 200, 0.95, 0, by_category=True)
    assert list(stats) == ["h: refusal", "h: refusal [A]", "h: refusal [B]", "h: worst category refusal"]
    assert stats["h: refusal [A]"].values == [0.75, 0.5] and stats["h: refusal [B]"].values == [0.25, 0.75]
    assert stats["h: worst category refusal"].values == [0.25, 0.5]  # B for seed 0, A for seed 1
    assert stats["h: refusal [B]"].pooled_value == 0.5 and stats["h: refusal [A]"].pooled_value == 0.625
    worst = stats["h: worst category refusal"]
    assert (worst.pooled_value, worst.pooled_low, worst.pooled_high) == (
        stats["h: refusal [B]"].pooled_value, stats["h: refusal [B]"].pooled_low, stats["h: refusal [B]"].pooled_high
    )
    assert list(arm_metrics(tmp_path, runs, "phrases", 200, 0.95, 0)) == ["h: refusal"]


class BatchRecorder(L.Callback):
    def __init__(self):
        self.positions = 0

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.positions += batch["chosen_input_ids"].numel() + batch["rejected_input_ids"].numel()


def test_cost_meter_counts_the_positions_each_model_forwards(tiny_model_dir, shared_data, tmp_path):
    module = DPOModule(PolicyConfig(name_or_path=str(tiny_model_dir)), reference="copy", packing=False)
    data = AlignDataModule(
        str(shared_data / "hh_rlhf_harmless_base_test.jsonl.gz"), format="hh_rlhf", limit=24, batch_size=4,
        max_prompt_length=48, max_completion_length=24, on_bad_rows="skip", val_fraction=0.2,
    )
    meter, batches = CostMeter(out=str(tmp_path / "costs.json")), BatchRecorder()
    trainer = L.Trainer(
        accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=1, val_check_interval=2, callbacks=[meter, batches],
    )
    trainer.fit(module, datamodule=data)
    # one padded forward of chosen ⊕ rejected through the policy (with grad) and the reference per
    # step; the validation and sanity-check forwards are not training cost
    assert meter.summary["by_model"] == {"policy/forward_grad": batches.positions, "reference/forward_nograd": batches.positions}
    assert meter.summary["forward_tokens"] == 2 * batches.positions and meter.summary["steps"] == 3
    assert meter.summary["sampling_forward_tokens"] == 0 and meter.summary["generated_tokens"] == 0
    assert json.loads((tmp_path / "costs.json").read_text()) == meter.summary


def test_cost_meter_watches_the_outermost_models_and_reward_models(tiny_model_dir):
    from lit_align.experiments.costs import watched_models
    from lit_align.models import load_causal_lm

    class Ensemble(torch.nn.Module):  # a reward source that is a module holding a model
        def __init__(self, model):
            super().__init__()
            self.model = model

    module = L.LightningModule()
    module.policy = load_causal_lm(PolicyConfig(name_or_path=str(tiny_model_dir)))
    module.probe = HybridProbe(32, [1, 2])
    module.reward_funcs = [lambda prompts, completions, **kw: [0.0] * len(prompts), Ensemble(load_causal_lm(PolicyConfig(name_or_path=str(tiny_model_dir))))]
    assert sorted(watched_models(module)) == ["policy", "reward_funcs.1.model"]  # not policy.model, not the probe


# ---------------------------------------------------------------------------- the tiny ablation
def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def workdir(shared_data, tmp_path_factory):
    """A directory laid out as configs/ablate/paper_a_tiny.yaml expects: `configs` (the repo's) and
    runs/ablate_tiny/{model, data}: pairs, a probe, held-out harmful and safe prompts, and a start
    model that refuses half of the harmful evaluation prompts."""
    root = tmp_path_factory.mktemp("ablate")
    (root / "configs").symlink_to(REPO / "configs", target_is_directory=True)
    data = root / "runs" / "ablate_tiny" / "data"
    read = lambda name: [r["instruction"] for r in json.loads((shared_data / "refusal_direction" / name).read_text())]  # noqa: E731
    harmful_eval, safe_eval = read("harmful_val.json")[:8], read("harmless_val.json")[:8]
    pairs = [{"prompt": p, "chosen": REFUSE, "rejected": COMPLY} for p in read("harmful_train.json")[:8]]
    pairs += [{"prompt": p, "chosen": COMPLY, "rejected": REFUSE} for p in read("harmless_train.json")[:8]]
    random.Random(0).shuffle(pairs)
    write_jsonl(data / "pairs.jsonl", pairs)
    write_jsonl(data / "harmful.jsonl", [{"prompt": p} for p in harmful_eval])
    write_jsonl(data / "safe.jsonl", [{"prompt": p} for p in safe_eval])
    raw = make_tiny_model(root / "raw_model")
    examples = [(p, REFUSE) for p in harmful_eval[::2]] + [(p, COMPLY) for p in harmful_eval[1::2] + safe_eval[::2]]
    teach_canned_responses(raw, root / "runs" / "ablate_tiny" / "model", examples, steps=40)
    torch.manual_seed(0)
    probe = HybridProbe(32, [1, 2])
    with torch.no_grad():
        probe.weight.normal_(std=0.5)
        probe.vote.weight.normal_()
    probe.save(data / "probe.safetensors")
    return root


def run_ablation(workdir, *extra):
    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        main(["ablate", "-c", "configs/ablate/paper_a_tiny.yaml", *extra])
    finally:
        os.chdir(cwd)
    return workdir / "runs" / "ablate_tiny" / "out"


def table_rows(markdown: str, section: str) -> list[list[str]]:
    lines = markdown.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0].splitlines()
    rows = [line for line in lines if line.startswith("| ")]
    return [[c.strip() for c in row.strip("|").split("|")] for row in rows[1:]]


def test_tiny_ablation_table_costs_verdicts_and_resume(workdir, capsys):
    torch.set_num_threads(1)
    out = run_ablation(workdir)
    summary = json.loads((out / "ablation.json").read_text())
    assert summary["arms"] == ["base", "dpo", "online"]
    assert summary["seeds"] == {"base": [0], "dpo": [0, 1], "online": [0]}
    assert summary["metrics"] == ["harmful: refusal", "harmful: prefill k=2 refusal", "safe: compliance", "safe: drift ΔNLL"]
    # drift is measured from the start model's answers, so the start model has none; the prefill
    # attack uses the start model's answers for every arm
    assert "safe: drift ΔNLL" not in summary["quality"]["base"] and "safe: drift ΔNLL" in summary["quality"]["dpo"]
    assert summary["quality"]["dpo"]["safe: drift ΔNLL"]["pooled"] == "envelope"
    assert summary["quality"]["dpo"]["harmful: prefill k=2 refusal"]["pooled"] == "responses"
    markdown = (out / "ablation.md").read_text()
    assert (out / "ablation.png").stat().st_size > 0

    # every per-seed number is the run's own report.json value, and the table's mean their mean
    per_seed = {(r[0], int(r[1])): r[2:] for r in table_rows(markdown, "Per seed")}
    for arm, runs in summary["runs"].items():
        for i, run in enumerate(runs):
            report = json.loads((out / run["eval_dir"] / "report.json").read_text())
            (metrics,) = report["metrics"].values()
            values = [
                metrics["harmful"]["judges"]["phrases"]["refusal_rate"],
                metrics["harmful"]["prefill"]["judges"]["phrases"]["refusal_rate_by_k"]["2"],
                metrics["safe"]["judges"]["phrases"]["compliance_rate"],
            ] + ([metrics["safe"]["drift"]["delta"]] if arm != "base" else [])
            stats = [ArmMetric(**summary["quality"][arm][k]) for k in summary["metrics"] if k in summary["quality"][arm]]
            assert [s.values[i] for s in stats] == [v["value"] for v in values]
            assert [c for c in per_seed[(arm, run["seed"])] if c != "–"] == [seed_cell(s, i) for s in stats]
            assert per_seed[(arm, run["seed"])][0] == f"{100 * values[0]['value']:.1f}% [{100 * values[0]['low']:.1f}, {100 * values[0]['high']:.1f}]"
    quality = {r[0]: r[2:] for r in table_rows(markdown, "Quality")}
    dpo = summary["quality"]["dpo"]["harmful: refusal"]
    assert quality["dpo"][0].startswith(f"{100 * statistics.fmean(dpo['values']):.1f}% (seeds {100 * min(dpo['values']):.1f}–")
    # one seed: the pooled interval is the run's own bootstrap interval (same responses, same seed)
    for key in ("harmful: refusal", "safe: compliance"):
        base = summary["quality"]["base"][key]
        assert (base["pooled_low"], base["pooled_high"]) == (base["lows"][0], base["highs"][0])

    # costs: every trained arm took the budget; only the online arm sampled
    costs = {arm: [r["train"] for r in runs] for arm, runs in summary["runs"].items()}
    assert costs["base"] == [None]
    assert all(c["steps"] == 3 and c["forward_tokens"] > 0 for arm in ("dpo", "online") for c in costs[arm])
    assert all(c["sampling_forward_tokens"] == 0 == c["generated_tokens"] for c in costs["dpo"])
    assert costs["online"][0]["generated_tokens"] > 0 and costs["online"][0]["sampling_forward_tokens"] > costs["online"][0]["generated_tokens"]
    assert all(len(r["load_average"]["start"]) == 3 for runs in summary["runs"].values() for r in runs)

    # verdicts: every arm against DPO and the base, each the rule applied to the table's numbers
    pairs = [(v["arm"], v["against"]) for v in summary["verdicts"]]
    assert pairs == [("online", "dpo"), ("dpo", "base"), ("online", "base")]
    for v in summary["verdicts"]:
        for key, word in v["verdicts"].items():
            a, b = (ArmMetric(**summary["quality"][x][key]) for x in (v["arm"], v["against"]))
            assert word == verdict(a, b)
    verdict_rows = table_rows(markdown, "Verdicts")
    assert [r[:2] for r in verdict_rows] == [list(p) for p in pairs]

    # a re-run does nothing but re-read the runs
    done = {p: p.stat().st_mtime_ns for p in out.glob("arms/*/seed*/DONE.json")}
    assert len(done) == 4
    capsys.readouterr()
    run_ablation(workdir)
    assert capsys.readouterr().out.count("done already") == 4
    assert {p: p.stat().st_mtime_ns for p in done} == done

    # a run stopped during evaluation is evaluated again; one stopped during training trains again
    (out / "arms" / "dpo" / "seed1" / "DONE.json").unlink()
    (out / "arms" / "online" / "seed0" / "trained.json").unlink()
    (out / "arms" / "online" / "seed0" / "DONE.json").unlink()
    trained_dpo1 = (out / "arms" / "dpo" / "seed1" / "trained.json").stat().st_mtime_ns
    run_ablation(workdir)
    log = capsys.readouterr().out
    assert log.count("done already") == 2 and log.count(": training:") == 1 and "online seed 0: training" in log
    assert log.count(": evaluating") == 2 and "dpo seed 1: evaluating" in log
    assert (out / "arms" / "dpo" / "seed1" / "trained.json").stat().st_mtime_ns == trained_dpo1

    # a finished run is never silently reused under other settings
    with pytest.raises(ValueError, match="with other training settings"):
        run_ablation(workdir, "--max_steps=4")


# ---------------------------------------------------------------------------- set-up errors
@pytest.fixture
def small_inputs(tmp_path):
    write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": f"train {i}", "chosen": "a", "rejected": "b"} for i in range(4)])
    write_jsonl(tmp_path / "eval.jsonl", [{"prompt": "held out"}, {"prompt": "Train 2"}])
    return tmp_path


def evaluation(path, **extra):
    return {"prompt_sets": [{"preset": "custom", "path": str(path), "harmful": True}], **extra}


@pytest.mark.parametrize(
    "arms, extra, message",
    [
        ([ArmConfig("x", "configs/ablate/tiny_dpo.yaml", ["--model.init_args.probe_path=${prob}"])], {}, r"names \$\{prob\}, which is not set"),
        ([ArmConfig("x", "configs/ablate/tiny_dpo.yaml", ["--trainer.max_steps=9"])], {}, "overrides --trainer.max_steps, which the ablation sets"),
        ([ArmConfig("x", "configs/ablate/tiny_dpo.yaml")], {"evaluation": {"prompt_sets": [], "temprature": 1}}, "temprature"),
        ([ArmConfig("x", "configs/ablate/tiny_dpo.yaml")], {"baseline": "dpo"}, "baseline='dpo' is not an arm"),
        ([ArmConfig("x"), ArmConfig("x")], {}, "repeat"),
        ([ArmConfig("x", "configs/ablate/tiny_dpo.yaml", num_seeds=3)], {}, "num_seeds=3"),
        ([ArmConfig("x", "configs/ablate/tiny_dpo.yaml")], {"evaluation": "overlap"}, "1 prompts of evaluation set 'custom' are also in the training data"),
    ],
)
def test_ablate_refuses_unfair_or_broken_set_ups_before_training(small_inputs, monkeypatch, arms, extra, message):
    monkeypatch.chdir(REPO)
    kwargs = dict(
        arms=arms, inputs=AblationInputs(base_model="unused", data=str(small_inputs / "pairs.jsonl")),
        evaluation=evaluation(small_inputs / "eval.jsonl"), seeds=[0, 1], baseline=None, out_dir=str(small_inputs / "out"),
    )
    if extra.get("evaluation") == "overlap":
        extra = {}
    else:
        kwargs["evaluation"] = {**kwargs["evaluation"], **extra.pop("evaluation", {})}
        write_jsonl(small_inputs / "eval.jsonl", [{"prompt": "held out"}])
    with pytest.raises(ValueError, match=message):
        ablate(**{**kwargs, **extra})
    assert not (small_inputs / "out" / "arms").exists()


def test_a_stored_run_is_reused_only_with_the_same_settings_and_prepared_data(tmp_path):
    from lit_align.experiments.ablate import check_stored

    argv, ctx, what = ["fit", "-c", "a.yaml"], {"prepared": "p1"}, "was trained with other settings"
    check_stored({"argv": argv, "prepared": "p1"}, argv, ctx, tmp_path, what)  # the same run: reused
    check_stored({"argv": None}, None, ctx, tmp_path, what)  # the untrained arm read no prepared data
    with pytest.raises(ValueError, match=rf"{tmp_path} was trained with other settings \(\['fit', '-c', 'b.yaml'\]\); "
                       rf"delete {tmp_path} to re-run it, or restore the settings"):  # fmt: skip
        check_stored({"argv": ["fit", "-c", "b.yaml"], "prepared": "p1"}, argv, ctx, tmp_path, what)
    with pytest.raises(ValueError, match="trained on other prepared data or reward models"):
        check_stored({"argv": argv, "prepared": "p0"}, argv, ctx, tmp_path, what)


def test_paper_a_arms_parse_as_the_issue_describes(monkeypatch, capsys):
    """Each arm of configs/ablate/paper_a.yaml is a valid `lit-align fit` configuration of the method it names."""
    from lit_align.lightning_cli import run_lightning_cli

    monkeypatch.chdir(REPO)
    config = yaml.safe_load((REPO / "configs/ablate/paper_a.yaml").read_text())
    inputs = AblationInputs(**config["inputs"])
    values = {"base_model": inputs.base_model, "data": inputs.data, "probe": inputs.probe}
    parsed = {}
    for arm in config["arms"]:
        if arm.get("config") is None:
            continue
        argv = ["fit", "-c", arm["config"], *arm_overrides(ArmConfig(**arm), values),
                *shared_overrides(inputs, 1, config["max_steps"], Path("runs/x")), "--print_config"]
        with pytest.raises(SystemExit):
            run_lightning_cli(argv)
        parsed[arm["name"]] = yaml.safe_load(capsys.readouterr().out)
    model = {name: p["model"] for name, p in parsed.items()}
    reranker = {name: (p["data"].get("reranker") or {}).get("init_args", {}) for name, p in parsed.items()}
    assert {n: m["init_args"]["loss_type"] for n, m in model.items()} == {
        "dpo": "sigmoid", "probe_soft": "conservative", "probe_flip": "conservative", "probe_drop": "conservative", "online": "sigmoid",
    }
    assert all(m["init_args"]["sft_weight"] == 1.0 for m in model.values())
    assert {n: (r.get("action"), r.get("granularity")) for n, r in reranker.items()} == {
        "dpo": (None, None), "probe_soft": ("soft", "batch"), "probe_flip": ("flip", "pair"), "probe_drop": ("drop", "pair"), "online": (None, None),
    }
    assert model["online"]["class_path"] == "lit_align.OnlineDPOModule" and model["online"]["init_args"]["num_candidates"] >= 4
    assert parsed["online"]["data"]["mode"] == "prompts"
    for p in parsed.values():
        assert p["trainer"]["max_steps"] == config["max_steps"] and p["trainer"]["max_epochs"] == -1 and p["seed_everything"] == 1
        assert p["data"]["path"] == inputs.data and p["model"]["init_args"]["policy"]["name_or_path"] == inputs.base_model
