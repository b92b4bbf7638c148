"""Smoke test of the whole demo pipeline on the tiny model: every stage, then resume."""

from __future__ import annotations

import json
import random
import re

import pytest
import torch

from lit_align.demo.pipeline import demo, harmless_prompts, preference_pairs
from lit_align.srmir.cod import cod_messages
from lit_align.testing import teach_canned_responses

COD = "harm. no. #### I will not help with that."
COMPLY = "Sure, here is how."


@pytest.fixture(scope="module")
def generator_dir(tiny_model_dir, shared_data, tmp_path_factory):
    """A tiny model that writes a valid CoD refusal when asked why it refused, and complies with
    bare prompts (the random one never writes ####)."""
    import csv

    rows = list(csv.DictReader(open(shared_data / "strongreject_dataset.csv")))[::10]
    prompts = [r["forbidden_prompt"][:160] for r in rows]
    cod_requests = [(cod_messages(p, one_shot=True), COD) for p in prompts]  # as the demo asks (one-shot)
    examples = cod_requests + [(p, COMPLY) for p in prompts[::2] + harmless_prompts()[::6]]
    return teach_canned_responses(tiny_model_dir, tmp_path_factory.mktemp("cod_generator"), examples)


def test_demo_runs_every_stage_and_resumes(generator_dir, shared_data, tmp_path, capsys):
    torch.set_num_threads(1)
    kwargs = dict(
        workdir=str(tmp_path / "demo"),
        base_model=str(generator_dir),
        harmful_sources=[str(shared_data / "strongreject_dataset.csv"), str(shared_data / "harmbench_behaviors_text_all.csv")],
        eval_harmful_path=str(shared_data / "harmbench_behaviors_text_all.csv"),
        per_category=2,
        eval_harmful=6,
        max_new_tokens=24,
        grpo=True,
        progress=False,
        fit_overrides=["--trainer.max_steps=2", "--trainer.max_epochs=1", "--trainer.limit_val_batches=1"],
    )
    results = demo(**kwargs)
    for stage in ("data", "probe", "dpo", "grpo", "evaluate"):
        assert (tmp_path / "demo" / stage / "DONE.json").exists(), stage
    pairs = [json.loads(line) for line in open(tmp_path / "demo" / "data" / "pairs.jsonl")]
    harmful = [p for p in pairs if p["category"]]
    counts = results["data"]["cod_counts"]
    assert {c: v["selected"] + v["upsampled"] for c, v in counts.items()} == {c: 2 for c in counts}  # balanced
    assert len(counts) == 7
    # every CoD written (the rest dropped, counted, for a missing ####) became a pair
    assert len(harmful) == sum(v["written"] for v in counts.values()) >= 7
    # chosen: the CoD's answer after ####; rejected: the policy's own response to the bare prompt
    cod = {r["prompt"]: r for r in map(json.loads, open(tmp_path / "demo" / "data" / "cod.jsonl"))}
    for pair in harmful:
        record = cod[pair["prompt"]]
        assert pair["chosen"] == record["chosen"].split("####")[1].strip()
        assert pair["rejected"] == record["rejected"]
    assert results["data"]["harmless_train"] == 60 == len(pairs) - len(harmful)
    assert (tmp_path / "demo" / "probe" / "probe.safetensors").exists()
    assert (tmp_path / "demo" / "dpo" / "aligned" / "config.json").exists()
    assert (tmp_path / "demo" / "grpo" / "shadow" / "manifest.json").exists()
    assert (tmp_path / "demo" / "grpo" / "aligned" / "config.json").exists()
    summary = (tmp_path / "demo" / "SUMMARY.md").read_text()
    check_summary_against_report(summary, json.loads((tmp_path / "demo" / "evaluate" / "report.json").read_text()))
    capsys.readouterr()
    demo(**kwargs)  # every stage is done: a re-run skips them all
    out = capsys.readouterr().out
    assert out.count("done already") == 5


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


def test_preference_pairs_refuse_harmful_and_answer_harmless():
    cod = [
        {"prompt": "build a bomb", "chosen": "Draft.\n#### I'm sorry, but I can't help with bombs.\n#### junk", "rejected": "Sure: step 1", "category": "physical_harm"},
        {"prompt": "steal a car", "chosen": "Theft.\n#### I'm sorry, but I can't help with theft.", "rejected": "Sure: hotwire", "category": "crimes_illegal_activities"},
    ]
    harmless = ["bake bread", "plant a tree"]
    answers = ["Mix flour and water.", "Dig a hole."]
    own = ["I'm sorry, but I can't help with baking.", None]  # the policy wrote no valid CoD for the second
    pairs = {p["prompt"]: p for p in preference_pairs(cod, harmless, answers, own, random.Random(0))}
    assert len(pairs) == 4
    # harmful: the CoD's answer (cut at a second ####) over the policy's own answer
    assert pairs["build a bomb"]["chosen"] == "I'm sorry, but I can't help with bombs."
    assert pairs["build a bomb"]["rejected"] == "Sure: step 1" and pairs["build a bomb"]["category"] == "physical_harm"
    # harmless: the policy's answer over its own refusal of that prompt, else a harmful prompt's refusal
    assert pairs["bake bread"] == {"prompt": "bake bread", "chosen": "Mix flour and water.", "rejected": own[0], "category": None}
    assert pairs["plant a tree"]["rejected"] in {"I'm sorry, but I can't help with bombs.", "I'm sorry, but I can't help with theft."}


def test_summary_says_when_xstest_is_missing(tmp_path):
    from lit_align.demo.pipeline import XSTEST_PROMPTS, summarise

    rate = {"value": 0.5, "low": 0.25, "high": 0.75, "n": 8}
    metrics = {"judges": {"phrases": {"refusal_rate": rate}}}
    report = {"meta": {"prompt_sets": {"harmbench_test": "harmbench: test.csv (n=8)"}},
              "metrics": {"base": {"harmbench_test": metrics}, "aligned": {"harmbench_test": metrics}}}  # fmt: skip
    (tmp_path / "evaluate").mkdir()
    (tmp_path / "evaluate" / "report.json").write_text(json.dumps(report))
    summary = summarise(tmp_path)
    assert f"Over-refusal on XSTest was not measured: {XSTEST_PROMPTS} is missing" in summary
    assert "| harmbench_test | refusal on harmful | 50.0% [25.0, 75.0] (n=8) | 50.0% [25.0, 75.0] (n=8) |" in summary
