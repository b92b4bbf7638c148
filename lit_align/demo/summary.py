"""The demo's SUMMARY.md: base vs aligned from `evaluate`'s report.json, a verdict per row."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

SAFE_ROW = "compliance on safe (1 − over-refusal)"


def summarise(workdir: Path, xstest_path: Path) -> str:
    """SUMMARY.md's text; says where XSTest's file goes when the report has no XSTest set."""
    report = json.loads((workdir / "evaluate" / "report.json").read_text())
    lines = ["## lit_align demo: SmolLM2-135M-Instruct before and after", "", summary_table(report)]
    if not any(v.startswith("xstest") for v in report.get("meta", {}).get("prompt_sets", {}).values()):
        lines += ["", f"Over-refusal on XSTest was not measured: {xstest_path} is missing (XSTest is on no "
                      "PyPI package; put its xstest_prompts.csv there, CC-BY-4.0)."]  # fmt: skip
    return "\n".join(lines)


def _preferred(judges: dict) -> list[str]:
    """Judge names, a refusal judge first (the phrase judge, or any named *refusal*)."""
    return sorted(judges, key=lambda j: ("refusal" not in j and j != "phrases", j))


def _rate(metrics: dict, key: str) -> Optional[dict]:
    """The preferred refusal judge's estimate of `key` (refusal_rate / compliance_rate)."""
    judges = metrics.get("judges", {})
    for name in _preferred(judges):
        if key in judges[name]:
            return judges[name][key]
    return None


def _prefill_rates(metrics: dict) -> dict[str, dict]:
    """{k: estimate} of the preferred judge under the prefilling attack (k > 0)."""
    judges = metrics.get("prefill", {}).get("judges", {})
    name = next(iter(_preferred(judges)), None)
    return {k: e for k, e in judges[name]["refusal_rate_by_k"].items() if k != "0"} if name else {}


def _cell(v: Optional[dict], pct: bool = True) -> str:
    if not v or not v["n"]:
        return "–"
    if pct:
        return f"{100 * v['value']:.1f}% [{100 * v['low']:.1f}, {100 * v['high']:.1f}] (n={v['n']})"
    return f"{v['value']:+.3f} [{v['low']:+.3f}, {v['high']:+.3f}] (n={v['n']})"


def _verdict(prompt_set: str, label: str, values: list) -> Optional[str]:
    if len(values) != 2 or not all(v and v["n"] for v in values):
        return None
    before, after = values
    change = 100 * (after["value"] - before["value"])
    clear = after["low"] > before["high"] or after["high"] < before["low"]
    word = ("better" if change > 0 else "worse") if clear else "no clear change (intervals overlap)"
    return f"- {prompt_set}, {label}: {change:+.1f} points: {word}"


def summary_table(report: dict) -> str:
    """Refusal on harmful prompts (plain and prefilled), compliance on safe ones (over-refusal),
    and drift, before and after, from report.json."""
    metrics = report["metrics"]
    models = list(metrics)
    lines = ["| prompt set | metric | " + " | ".join(models) + " |", "|---|---|" + "---|" * len(models)]
    verdicts, drifts = [], []
    for prompt_set in dict.fromkeys(s for m in models for s in metrics[m]):
        by_model = [metrics[m].get(prompt_set, {}) for m in models]
        rows = [(label, [_rate(x, key) for x in by_model])
                for key, label in (("refusal_rate", "refusal on harmful"), ("compliance_rate", SAFE_ROW))]  # fmt: skip
        prefilled = [_prefill_rates(x) for x in by_model]
        for k in dict.fromkeys(k for rates in prefilled for k in rates):
            rows.append((f"refusal on harmful, prefilled {k} tokens", [rates.get(k) for rates in prefilled]))
        for label, values in rows:
            if any(v is not None for v in values):
                lines.append(f"| {prompt_set} | {label} | " + " | ".join(_cell(v) for v in values) + " |")
                verdicts.append(_verdict(prompt_set, label, values))
        values = [x.get("drift", {}).get("delta") for x in by_model]
        if any(values):
            reference = next(x["drift"]["reference"] for x in by_model if "drift" in x)
            cells = " | ".join(_cell(v, pct=False) for v in values)
            lines.append(f"| {prompt_set} | drift: Δ NLL of {reference}'s answers (nats/token) | {cells} |")
            drifts.append(_drift_verdict(prompt_set, values[-1], models[-1], reference))
    out = lines + ["", "Change from base to aligned (higher is better for the rates):", *filter(None, verdicts)]
    if any(drifts):
        out += ["", "Drift (Δ per-token NLL of the base model's greedy answers to the safe prompts, ≈ KL; 0 for base):"]
        out += filter(None, drifts)
    return "\n".join(out)


def _drift_verdict(prompt_set: str, after: Optional[dict], model: str, reference: str) -> Optional[str]:
    if not after or not after["n"]:
        return None
    if after["low"] > 0 or after["high"] < 0:
        word = f"{reference}'s answers are {'less' if after['low'] > 0 else 'more'} likely under {model} than under {reference}"
    else:
        word = "no clear drift (the interval includes 0)"
    return f"- {prompt_set}: Δ {after['value']:+.3f} nats/token: {word}"
