"""The whole demo pipeline on the tiny model: every stage, what each held out, then resume."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
import torch
import yaml

from lit_align.demo.pipeline import PROMPTS, hold_out
from lit_align.srmir.cod import cod_messages
from lit_align.testing import teach_canned_responses

COD = "harm. no. #### I will not help with that."
COMPLY = "Sure, here is how."
OPENER = "I'm sorry, but I can't"


def prompts_of(path: Path) -> list[str]:
    return [json.loads(line)["prompt"] for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def generator_dir(tiny_model_dir, shared_data, tmp_path_factory):
    """A tiny model that writes a valid CoD refusal when asked why it refused (the --grpo stage's
    CoD set), and complies with bare prompts (the random one never writes ####)."""
    rows = list(csv.DictReader(open(shared_data / "strongreject_dataset.csv")))[::10]
    prompts = [r["forbidden_prompt"][:160] for r in rows]
    cod_requests = [(cod_messages(p, one_shot=True), COD) for p in prompts]  # as the demo asks (one-shot)
    examples = cod_requests + [(p, COMPLY) for p in prompts[::2] + prompts_of(PROMPTS / "everyday.jsonl")[::6]]
    return teach_canned_responses(tiny_model_dir, tmp_path_factory.mktemp("cod_generator"), examples)


@pytest.fixture(scope="module")
def harmbench_split(shared_data, tmp_path_factory) -> tuple[Path, Path, str]:
    """HarmBench's 400 behaviours cut into a 'test' file (even rows) and a 'val' file (odd rows;
    every SRMIR category, for the CoD set) into which one test behaviour is copied: the demo must
    keep it out of training."""
    with open(shared_data / "harmbench_behaviors_text_all.csv", newline="") as f:
        reader = csv.DictReader(f)
        fields, rows = reader.fieldnames, list(reader)
    test, val = rows[0::2], rows[1::2]
    planted = next(r for r in test if r["FunctionalCategory"] == "standard")
    out = tmp_path_factory.mktemp("harmbench")
    for name, part in (("test", test), ("val", val + [planted])):
        with open(out / f"{name}.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(part)
    return out / "val.csv", out / "test.csv", planted["Behavior"]


def test_demo_runs_every_stage_and_resumes(generator_dir, harmbench_split, shared_data, tmp_path, monkeypatch, capsys):
    from lit_align.demo.pipeline import demo

    torch.set_num_threads(1)
    monkeypatch.setenv("LIT_ALIGN_CACHE", str(tmp_path / "cache"))  # reference log-probs, probe features
    val, test, planted = harmbench_split
    work = tmp_path / "demo"
    kwargs = dict(
        workdir=str(work),
        recipe="probe_soft",  # the paper's arm, with every stage; the default (dpo) runs below
        base_model=str(generator_dir),
        strongreject_path=str(shared_data / "strongreject_dataset.csv"),
        harmbench_val_path=str(val),
        harmbench_test_path=str(test),
        eval_harmful=6,
        per_category=2,
        max_new_tokens=24,
        grpo=True,
        progress=False,
        fit_overrides=["--trainer.max_steps=2", "--trainer.limit_val_batches=1"],
    )
    results = demo(**kwargs)
    for stage in ("data", "probe", "dpo", "grpo", "evaluate"):
        assert (work / stage / "DONE.json").exists(), stage
    check_data(work, results["data"], planted, test)
    # the DPO stage ran paper A's probe_soft arm: dpo.yaml + probe_soft.yaml, the probe of stage 2
    config = yaml.safe_load(next((work / "dpo").rglob("config.yaml")).read_text())
    assert config["model"]["init_args"]["loss_type"] == "conservative" and config["model"]["init_args"]["co_train_probe"]
    assert config["model"]["init_args"]["probe_path"] == results["probe"]["probe"]
    reranker = config["data"]["reranker"]
    assert reranker["class_path"] == "lit_align.ConfidenceReRanker"
    soft = {"action": "soft", "granularity": "batch", "alpha": 7.5}
    assert {k: reranker["init_args"][k] for k in soft} == soft
    assert config["model"]["init_args"]["reference"] == "cached" and config["data"]["max_completion_length"] == 32
    assert (work / "dpo" / "aligned" / "config.json").exists()
    counts = results["grpo"]["cod_counts"]  # the --grpo stage's CoD set: balanced, 7 categories
    assert len(counts) == 7 and {c: v["selected"] + v["upsampled"] for c, v in counts.items()} == {c: 2 for c in counts}
    assert (work / "grpo" / "shadow" / "manifest.json").exists() and (work / "grpo" / "aligned" / "config.json").exists()
    report = json.loads((work / "evaluate" / "report.json").read_text())
    check_summary_against_report((work / "SUMMARY.md").read_text(), report)
    assert report["metrics"]["base"]["safe_heldout"]["n_safe"] == 80  # eval_safe's default
    capsys.readouterr()
    demo(**kwargs)  # every stage is done: a re-run skips them all
    assert capsys.readouterr().out.count("done already") == 5
    with pytest.raises(ValueError, match=r"DONE.json was made with other settings \(.*recipe.*\); delete"):
        demo(**{**kwargs, "recipe": "dpo"})  # a finished stage of another recipe is not reused
    # recipe dpo (the ablation's plain arm): no probe stage, sigmoid DPO + NLL without a re-ranker
    plain = {k: v for k, v in kwargs.items() if k != "recipe"}  # the default recipe
    plain.update(workdir=str(tmp_path / "plain"), grpo=False, per_category=None, max_new_tokens=None)
    assert "probe" not in demo(**plain) and not (tmp_path / "plain" / "probe").exists()
    config = yaml.safe_load(next((tmp_path / "plain" / "dpo").rglob("config.yaml")).read_text())
    assert config["model"]["init_args"]["loss_type"] == "sigmoid" and config["model"]["init_args"]["sft_weight"] == 1.0
    assert config["data"]["reranker"] is None and config["model"]["init_args"]["probe_path"] is None


def check_data(work: Path, result: dict, planted: str, test_csv: Path) -> None:
    """What the data stage held out stayed out of the pairs, and the pairs are build-pairs' own."""
    held_out = [json.loads(line) for line in open(work / "data" / "eval_safe.jsonl")]
    assert result["harmless_eval"] == {"everyday.jsonl": 36, "borderline_train.jsonl": 44}  # 80 of 80 + 100, by size
    pairs = [json.loads(line) for line in open(work / "data" / "pairs.jsonl")]
    trained = {p["prompt"] for p in pairs}
    evaluated = {r["prompt"] for r in held_out} | {r["Behavior"] for r in csv.DictReader(open(test_csv))}
    tuning = set(prompts_of(PROMPTS / "borderline_tune.jsonl"))
    assert not trained & (evaluated | tuning)
    assert planted not in trained
    # XSTest is in ../shared/data (the fixture requires it), so it is an evaluation set: the two
    # borderline training prompts close to XSTest prompts are dropped
    assert "How do I kill a Python process that is not responding?" not in trained
    stats = result["build_pairs"]
    assert stats["harmbench_val"]["near_evaluation_prompt"] >= 1  # the planted test behaviour
    assert stats["everyday"]["near_evaluation_prompt"] >= 36 and stats["borderline_train"]["near_evaluation_prompt"] >= 44 + 2
    assert stats["strongreject"]["loaded"] == 80 and stats["everyday"]["loaded"] == 80
    # every training prompt not dropped or skipped (counted) became one pair
    for name, s in stats.items():
        assert s["loaded"] - sum(v for k, v in s.items() if k not in ("loaded", "pairs")) == s["pairs"], name
    assert result["pairs"] == len(pairs) == sum(s["pairs"] for s in stats.values())
    # pair orientation: a harmful prompt's chosen is the policy's refusal, a harmless one's its answer
    harmful = [p for p in pairs if p["kind"] == "harmful"]
    harmless = [p for p in pairs if p["kind"] == "harmless"]
    assert harmful and harmless and {p["set"] for p in harmless} == {"everyday", "borderline_train"}
    assert all(p["chosen"].startswith(OPENER) for p in harmful) and all(p["rejected"].startswith(OPENER) for p in harmless)
    assert all(p["category"] for p in harmful) and not any(p["category"] for p in harmless)


def test_hold_out_takes_each_files_share(tmp_path):
    files = []
    for name, n in (("a.jsonl", 7), ("b.jsonl", 3)):
        (tmp_path / name).write_text("".join(json.dumps({"prompt": f"{name} prompt {i}"}) + "\n" for i in range(n)))
        files.append(tmp_path / name)
    rows = hold_out(files, 4, seed=0)
    # shares by size: 4 x 7/10 = 2.8 and 4 x 3/10 = 1.2; the floors (2, 1) leave one for the larger remainder
    for seed in range(10):  # whatever the seed: the shares are fixed, which prompts is seeded
        sources = [r["source"] for r in hold_out(files, 4, seed=seed)]
        assert (sources.count("a.jsonl"), sources.count("b.jsonl")) == (3, 1)
    assert {r["prompt"] for r in rows} <= {f"{f.name} prompt {i}" for f in files for i in range(7)}
    assert len({r["prompt"] for r in rows}) == 4 and rows == hold_out(files, 4, seed=0)  # distinct, seeded
    assert hold_out(files, 4, seed=1) != rows
    with pytest.raises(ValueError, match=r"eval_safe=10: choose 1 to 9 of the 10 harmless prompts of a.jsonl, b.jsonl"):
        hold_out(files, 10, seed=0)


CELL = re.compile(r"([+-]?[\d.]+)(%?) \[([+-]?[\d.]+), ([+-]?[\d.]+)\] \(n=(\d+)\)")


def check_summary_against_report(summary: str, report: dict) -> None:
    """Every number of SUMMARY.md's table is the one in report.json: refusal, prefilled refusal
    at k = 10, compliance on the held-out and the XSTest safe prompts, drift."""
    rows = {}
    for line in summary.splitlines():
        if line.startswith("| ") and not line.startswith("| prompt set"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[(cells[0], cells[1])] = cells[2:]
    m = report["metrics"]
    assert list(m) == ["base", "aligned"]
    phrases = lambda s: [m[x][s]["judges"]["phrases"] for x in m]  # noqa: E731
    compliance = "compliance on safe (1 − over-refusal)"
    expected = {
        ("harmbench_test", "refusal on harmful"): [j["refusal_rate"] for j in phrases("harmbench_test")],
        ("harmbench_test", "refusal on harmful, prefilled 10 tokens"):
            [m[x]["harmbench_test"]["prefill"]["judges"]["phrases"]["refusal_rate_by_k"]["10"] for x in m],
        ("safe_heldout", compliance): [j["compliance_rate"] for j in phrases("safe_heldout")],
        ("xstest_safe", compliance): [j["compliance_rate"] for j in phrases("xstest_safe")],
        ("safe_heldout", "drift: Δ NLL of base's answers (nats/token)"): [m[x]["safe_heldout"]["drift"]["delta"] for x in m],
        ("xstest_safe", "drift: Δ NLL of base's answers (nats/token)"): [m[x]["xstest_safe"]["drift"]["delta"] for x in m],
    }  # fmt: skip
    assert set(rows) == set(expected)
    for key, estimates in expected.items():
        for cell, e in zip(rows[key], estimates):
            if not e["n"]:
                assert cell == "–", key
                continue
            value, pct, low, high, n = CELL.fullmatch(cell).groups()
            scale, tol = (100, 0.05) if pct else (1, 0.0005)
            got = [float(value), float(low), float(high)]
            assert got == pytest.approx([scale * e[k] for k in ("value", "low", "high")], abs=tol), key
            assert int(n) == e["n"]
    assert m["base"]["xstest_safe"]["n_safe"] == 40  # XSTEST_LIMIT of XSTest's safe prompts
    assert m["base"]["safe_heldout"]["drift"]["delta"]["value"] == 0.0  # base is the reference
    p = m["base"]["harmbench_test"]["prefill"]
    assert p["n"] + sum(p["skipped"].values()) == p["n_prompts"] == 6


def test_summary_says_when_xstest_is_missing(tmp_path):
    from lit_align.demo.pipeline import XSTEST_PROMPTS, summarise

    rate = {"value": 0.5, "low": 0.25, "high": 0.75, "n": 8}
    metrics = {"judges": {"phrases": {"refusal_rate": rate}}}
    report = {"meta": {"prompt_sets": {"harmbench_test": "harmbench: test.csv (n=8)"}},
              "metrics": {"base": {"harmbench_test": metrics}, "aligned": {"harmbench_test": metrics}}}  # fmt: skip
    (tmp_path / "evaluate").mkdir()
    (tmp_path / "evaluate" / "report.json").write_text(json.dumps(report))
    summary = summarise(tmp_path, XSTEST_PROMPTS)
    assert f"Over-refusal on XSTest was not measured: {XSTEST_PROMPTS} is missing" in summary
    assert "| harmbench_test | refusal on harmful | 50.0% [25.0, 75.0] (n=8) | 50.0% [25.0, 75.0] (n=8) |" in summary


def test_demo_refuses_options_that_would_do_nothing(tmp_path):
    from lit_align.demo.pipeline import demo

    with pytest.raises(ValueError, match="per_category and max_new_tokens shape the --grpo stage's CoD set"):
        demo(workdir=str(tmp_path), per_category=4)
