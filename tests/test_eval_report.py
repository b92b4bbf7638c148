"""Report files and plots: JSON, Markdown, PNGs with the expected bars, two models side by side."""

from __future__ import annotations

import json

import matplotlib.image
import pytest
from matplotlib.patches import Rectangle

from lit_align.eval.metrics import summarize
from lit_align.eval.report import category_bars, histograms, write_report


def make_records(model_refuses: float, offset: float) -> list[dict]:
    """Harmful prompts in three categories and safe prompts in two, judged by a refusal judge
    and a reward judge; `model_refuses` sets how many of each group are refusals."""
    records = []
    for category, n in (("insult", 4), ("physical_harm", 6), ("privacy_property", 2)):
        for i in range(n):
            refused = i < round(model_refuses * n)
            records.append(
                dict(set="harmful", category=category, harmful=True, length_tokens=10 + i, prompt=f"p{i}", response="r",
                     judges={"phrases": {"refused": refused}, "reward": {"score": offset + i / n, "confidence": 0.5 + 0.4 * refused}})
            )  # fmt: skip
    for category, n in (("homonyms", 3), ("definitions", 5)):
        for i in range(n):
            records.append(
                dict(set="safe", category=category, harmful=False, length_tokens=20, prompt=f"q{i}", response="r",
                     judges={"phrases": {"refused": i == 0}, "reward": {"score": offset - i, "confidence": 0.3}})
            )  # fmt: skip
    return records


@pytest.fixture
def two_models():
    records = {"base": make_records(0.25, 0.0), "aligned": make_records(0.75, 1.0)}
    metrics = {
        m: {s: summarize([r for r in rs if r["set"] == s], num_resamples=100) for s in ("harmful", "safe")}
        for m, rs in records.items()
    }
    return metrics, records


def bars(fig) -> list[Rectangle]:
    (ax,) = fig.axes
    return [p for p in ax.patches if isinstance(p, Rectangle)]


def test_category_bars_one_bar_per_model_and_group(two_models):
    metrics, _ = two_models
    fig = category_bars(metrics, "harmful", "phrases")
    rects = bars(fig)
    assert len(rects) == 2 * (1 + 3)  # two models x (overall + three categories)
    heights = [r.get_height() for r in rects]
    # first model's bars come first: overall, insult, physical_harm, privacy_property
    assert heights[:4] == pytest.approx([3 / 12, 1 / 4, 2 / 6, 0 / 2])
    assert heights[4:] == pytest.approx([9 / 12, 3 / 4, 4 / 6, 2 / 2])
    labels = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert labels == ["overall", "insult", "physical_harm", "privacy_property"]
    safe = bars(category_bars(metrics, "safe", "phrases"))
    assert len(safe) == 2 * (1 + 2)
    assert safe[0].get_height() == pytest.approx(6 / 8)  # compliance: one refusal per category


def test_histograms_one_panel_per_set(two_models):
    _, records = two_models
    fig = histograms(records, "reward", "score", bins=10)
    assert len(fig.axes) == 2
    for ax in fig.axes:
        rects = [p for p in ax.patches if isinstance(p, Rectangle)]
        assert len(rects) == 2 * 10  # two models, ten bins each
        assert sum(r.get_height() for r in rects) == len([1 for rs in records.values() for r in rs if r["set"] == ax.get_title()])


def test_write_report_files(tmp_path, two_models):
    metrics, records = two_models
    paths = write_report(tmp_path, metrics, records, meta={"note": "test"})
    report = json.loads(paths["json"].read_text())
    assert set(report["metrics"]) == {"base", "aligned"}
    assert report["metrics"]["aligned"]["harmful"]["judges"]["phrases"]["refusal_rate"]["value"] == pytest.approx(0.75)
    md = paths["markdown"].read_text()
    assert "| metric | base | aligned |" in md
    assert "| physical_harm | 6 | 33.3% [" in md
    assert "phrases: compliance_rate | 75.0% [" in md
    lines = paths["responses"].read_text().splitlines()
    assert len(lines) == 2 * 20 and json.loads(lines[0])["model"] == "base"
    expected_pngs = {"bars_harmful_phrases", "bars_safe_phrases", "score_hist_reward", "confidence_hist_reward"}
    assert expected_pngs <= set(paths)
    for name in expected_pngs:
        assert paths[name].stat().st_size > 5000
        image = matplotlib.image.imread(paths[name])
        assert image.shape[0] > 200 and image.shape[1] > 400
        assert image[..., :3].std() > 0.05  # not a blank canvas


def test_prefill_curve_and_summary_rows(two_models, tmp_path):
    from lit_align.eval.metrics import Estimate
    from lit_align.eval.report import markdown, prefill_curve

    metrics, records = two_models
    ks = [0, 5, 10]
    rates = {"base": [0.8, 0.5, 0.1], "aligned": [0.9, 0.8, 0.7]}
    for m, values in rates.items():
        metrics[m]["harmful"]["prefill"] = {
            "ks": ks, "n_prompts": 12, "n": 10, "skipped": {"answer is a refusal": 2},
            "judges": {"phrases": {"refusal_rate_by_k": {str(k): Estimate(v, v - 0.1, v + 0.05, 10) for k, v in zip(ks, values)}}},
        }  # fmt: skip
        delta = 0.0 if m == "base" else 0.25
        metrics[m]["safe"]["drift"] = {
            "reference": "base", "n": 8, "answer_tokens": 80, "nll": Estimate(1.0 + delta, 0.9, 1.5, 8),
            "nll_reference": Estimate(1.0, 0.9, 1.1, 8), "delta": Estimate(delta, delta - 0.05, delta + 0.1, 8),
        }  # fmt: skip
    (ax,) = prefill_curve(metrics, "harmful", "phrases").axes
    assert [c.get_label() for c in ax.containers] == ["base", "aligned"]  # one line per model
    for container, m in zip(ax.containers, rates):
        xy = container.lines[0].get_xydata()
        assert xy[:, 0].tolist() == ks and xy[:, 1].tolist() == pytest.approx(rates[m])

    md = markdown(metrics, {"judges": ["phrases", "reward"]})
    summary = md[md.index("## Summary (phrases judge)") : md.index("## harmful")]
    assert "| harmful | refusal on harmful (higher: safer) | 25.0% [" in summary
    assert "| safe | compliance on safe (1 − over-refusal) | 75.0% [" in summary
    assert "| harmful | refusal, no prefill (the attacked prompts) | 80.0% [70.0, 85.0] | 90.0% [80.0, 95.0] |" in summary
    assert "| harmful | refusal, prefilled k=10 answer tokens | 10.0% [0.0, 15.0] | 70.0% [60.0, 75.0] |" in summary
    assert "| safe | drift: Δ NLL of the reference's answers (nats/token) | 0 [-0.05, 0.1] | 0.25 [0.2, 0.35] |" in summary
    assert "10 of 12 harmful prompts used; skipped: {'answer is a refusal': 2}" in md
    assert "| Δ = model − reference (≈ KL) | 0 [-0.05, 0.1] | 0.25 [0.2, 0.35] |" in md
    paths = write_report(tmp_path, metrics, records, {"judges": ["phrases"]}, prefill_records={"base": []})
    assert paths["prefill_harmful_phrases"].stat().st_size > 5000 and paths["prefill_responses"].exists()
