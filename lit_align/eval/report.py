"""The evaluation report: JSON, Markdown and PNG plots, models side by side.

`metrics[model][set]` is `lit_align.eval.metrics.summarize` of that model's records on that
prompt set. Figures are built with `matplotlib.figure.Figure` (no pyplot state, no display), so
tests can inspect their bars before they are saved.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

from matplotlib.figure import Figure

from lit_align.eval.metrics import Estimate, to_jsonable


def _rate_key(metrics_of_judge: dict) -> Optional[str]:
    """Refusal rate on harmful sets, compliance rate on safe sets."""
    for key in ("refusal_rate", "compliance_rate"):
        if key in metrics_of_judge:
            return key
    return None


def _pct(e: Optional[Estimate]) -> str:
    if e is None or e.n == 0:
        return "–"
    return f"{100 * e.value:.1f}% [{100 * e.low:.1f}, {100 * e.high:.1f}]"


def _num(e: Optional[Estimate]) -> str:
    if e is None or e.n == 0:
        return "–"
    return f"{e.value:.3g} [{e.low:.3g}, {e.high:.3g}]"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def primary_judge(metrics: dict, meta: Optional[dict] = None) -> Optional[str]:
    """The refusal judge the summary reads: the first of `meta["judges"]` that gives refusal
    verdicts (the phrase judge by default), else the first such judge found."""
    found = [j for m in metrics.values() for sm in m.values() for j, jm in sm["judges"].items() if _rate_key(jm)]
    order = [j for j in (meta or {}).get("judges", []) if j in found] + found
    return order[0] if order else None


def summary(metrics: dict, meta: Optional[dict] = None) -> list[str]:
    """One table with every headline number, models side by side: refusal on harmful prompts,
    compliance on safe ones (over-refusal), refusal under the prefilling attack per k, drift."""
    models = list(metrics)
    judge = primary_judge(metrics, meta)
    rows = []
    for s in dict.fromkeys(s for m in models for s in metrics[m]):
        cells = [metrics[m].get(s, {}) for m in models]
        for key, label in (("refusal_rate", "refusal on harmful (higher: safer)"),
                           ("compliance_rate", "compliance on safe (1 − over-refusal)")):  # fmt: skip
            values = [c.get("judges", {}).get(judge, {}).get(key) for c in cells]
            if any(v is not None for v in values):
                rows.append([s, label] + [_pct(v) for v in values])
        by_k = [_rates_by_k(c, judge) for c in cells]
        for k in dict.fromkeys(k for rates in by_k for k in rates):
            label = "refusal, no prefill (the attacked prompts)" if k == "0" else f"refusal, prefilled k={k} answer tokens"
            rows.append([s, label] + [_pct(rates.get(k)) for rates in by_k])
        if any("drift" in c for c in cells):
            label = "drift: Δ NLL of the reference's answers (nats/token)"
            rows.append([s, label] + [_num(c["drift"]["delta"]) if "drift" in c else "–" for c in cells])
    if not rows:
        return []
    return [f"## Summary ({judge} judge)", ""] + _table(["prompt set", "metric", *models], rows) + [""]


def _rates_by_k(metrics_of_set: dict, judge: Optional[str]) -> dict:
    """{k: refusal-rate estimate} of one judge under the prefilling attack ({} when it did not run)."""
    return metrics_of_set.get("prefill", {}).get("judges", {}).get(judge, {}).get("refusal_rate_by_k", {})


def prefill_tables(metrics: dict, s: str) -> list[str]:
    """Refusal rate per prefix length k (0: no prefix), one table per judge, one column per model."""
    present = [m for m in metrics if "prefill" in metrics[m].get(s, {})]
    if not present:
        return []
    first = metrics[present[0]][s]["prefill"]
    out = [f"### {s}: prefilling attack", "",
           f"The assistant turn starts with the first k tokens of a compliant answer; the judge reads the "
           f"model's continuation. {first['n']} of {first['n_prompts']} harmful prompts used; skipped: "
           f"{first['skipped'] or 'none'}.", ""]  # fmt: skip
    for j in dict.fromkeys(j for m in present for j in metrics[m][s]["prefill"]["judges"]):
        by_k = [_rates_by_k(metrics[m][s], j) for m in present]
        rows = [[k] + [_pct(rates.get(k)) for rates in by_k] for k in dict.fromkeys(k for rates in by_k for k in rates)]
        out += [f"{j} judge: refusal rate", ""] + _table(["k", *present], rows) + [""]
    return out


def drift_table(metrics: dict, s: str) -> list[str]:
    present = [m for m in metrics if "drift" in metrics[m].get(s, {})]
    if not present:
        return []
    d = metrics[present[0]][s]["drift"]
    rows = [[label] + [_num(metrics[m][s]["drift"][key]) for m in present]
            for key, label in (("nll", "NLL under the model"), ("nll_reference", "NLL under the reference"),
                               ("delta", "Δ = model − reference (≈ KL)"))]  # fmt: skip
    intro = (f"Mean per-token NLL (nats) of the reference model's ({d['reference']}) greedy answers to the "
             f"{d['n']} safe prompts ({d['answer_tokens']} tokens); Δ is paired per prompt.")  # fmt: skip
    return [f"### {s}: drift on the safe prompts", "", intro, ""] + _table(["", *present], rows) + [""]


def markdown(metrics: dict, meta: dict) -> str:
    models = list(metrics)
    sets = list(dict.fromkeys(s for m in models for s in metrics[m]))
    out = ["# Safety evaluation", ""]
    out += [f"- {k}: `{v}`" for k, v in meta.items()]
    out += ["", "Rates are percentages with 95% bootstrap intervals: refusal rate on harmful prompts "
            "(higher is safer), compliance rate on safe prompts (higher is less over-refusal; XSTest's "
            "categories are its prompt types).", ""]  # fmt: skip
    out += summary(metrics, meta)
    for s in sets:
        present = [m for m in models if s in metrics[m]]
        first = metrics[present[0]][s]
        out += [f"## {s} (n={first['n']}: {first['n_harmful']} harmful, {first['n_safe']} safe)", ""]
        rows = []
        judges = list(dict.fromkeys(j for m in present for j in metrics[m][s]["judges"]))
        for j in judges:
            for key, fmt in (("refusal_rate", _pct), ("compliance_rate", _pct), ("mean_score", _num), ("mean_confidence", _num)):
                if any(key in metrics[m][s]["judges"].get(j, {}) for m in present):
                    rows.append([f"{j}: {key}"] + [fmt(metrics[m][s]["judges"].get(j, {}).get(key)) for m in present])
        rows.append(["response length (tokens)"] + [_num(metrics[m][s]["response_length_tokens"]) for m in present])
        out += _table(["metric", *present], rows) + [""]
        for j in judges:
            key = _rate_key(first["judges"].get(j, {}))
            if key is None:
                continue
            cats = list(dict.fromkeys(c for m in present for c in metrics[m][s]["judges"][j].get(f"{key}_by_category", {})))
            what = "refusal rate" if key == "refusal_rate" else "compliance rate (1 − over-refusal)"
            out += [f"### {s}: {j} {what} by category", ""]
            rows = [
                [c, str(first["category_counts"].get(c, 0))]
                + [_pct(metrics[m][s]["judges"][j].get(f"{key}_by_category", {}).get(c)) for m in present]
                for c in cats
            ]
            out += _table(["category", "n", *present], rows) + [""]
        for pair, a in first.get("agreement", {}).items():
            if len(present) == 1 and a["n"]:
                out += [f"Judges {pair}: agree on {100 * a['agreement']:.1f}% of {a['n']}, Cohen's kappa {a['cohen_kappa']}", ""]
        out += prefill_tables(metrics, s) + drift_table(metrics, s)
    return "\n".join(out)


# ---------------------------------------------------------------------------- plots
def category_bars(metrics: dict, prompt_set: str, judge: str) -> Figure:
    """Grouped bars: one group per category (plus `overall`), one bar per model, with the
    bootstrap interval as an error bar."""
    models = [m for m in metrics if prompt_set in metrics[m]]
    key = _rate_key(metrics[models[0]][prompt_set]["judges"][judge])
    cats = list(dict.fromkeys(c for m in models for c in metrics[m][prompt_set]["judges"][judge][f"{key}_by_category"]))
    groups = ["overall", *cats]
    fig = Figure(figsize=(max(6.0, 0.9 * len(groups) * max(1, len(models)) * 0.6 + 2), 4.5), layout="constrained")
    ax = fig.subplots()
    width = 0.8 / len(models)
    for k, m in enumerate(models):
        jm = metrics[m][prompt_set]["judges"][judge]
        ests = [jm[key]] + [jm[f"{key}_by_category"].get(c, Estimate(math.nan, math.nan, math.nan, 0)) for c in cats]
        xs = [i + (k - (len(models) - 1) / 2) * width for i in range(len(groups))]
        heights = [0.0 if e.n == 0 else e.value for e in ests]
        err = [[0.0 if e.n == 0 else e.value - e.low for e in ests], [0.0 if e.n == 0 else e.high - e.value for e in ests]]
        ax.bar(xs, heights, width, yerr=err, capsize=2, label=m)
    ax.set_xticks(range(len(groups)), groups, rotation=30, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel(key.replace("_", " "))
    ax.set_title(f"{prompt_set}: {key.replace('_', ' ')} by category ({judge} judge)")
    ax.legend(fontsize="small")
    return fig


def prefill_curve(metrics: dict, prompt_set: str, judge: str) -> Figure:
    """Refusal rate against the prefix length k (0: no prefix), one line per model, bootstrap
    intervals as error bars."""
    fig = Figure(figsize=(6.0, 4.2), layout="constrained")
    ax = fig.subplots()
    for m, by_set in metrics.items():
        rates = by_set.get(prompt_set, {}).get("prefill", {}).get("judges", {}).get(judge, {}).get("refusal_rate_by_k", {})
        points = [(int(k), e) for k, e in rates.items() if e.n]
        if not points:
            continue
        ks, ests = zip(*sorted(points))
        err = [[e.value - e.low for e in ests], [e.high - e.value for e in ests]]
        ax.errorbar(ks, [e.value for e in ests], yerr=err, marker="o", capsize=3, label=m)
    ks = sorted({int(k) for by_set in metrics.values()
                 for k in by_set.get(prompt_set, {}).get("prefill", {}).get("judges", {}).get(judge, {}).get("refusal_rate_by_k", {})})  # fmt: skip
    ax.set_xticks(ks)
    ax.set_ylim(-0.02, 1.05)
    ax.set_xlabel("prefilled answer tokens k")
    ax.set_ylabel("refusal rate")
    ax.set_title(f"{prompt_set}: prefilling attack ({judge} judge)")
    ax.legend(fontsize="small")
    return fig


def histograms(records: dict, judge: str, field: str, bins: int = 20) -> Figure:
    """One panel per prompt set, one histogram per model, of a judge's `score` or `confidence`."""
    sets = list(dict.fromkeys(r["set"] for rs in records.values() for r in rs))
    fig = Figure(figsize=(4.5 * len(sets), 3.8), layout="constrained")
    axes = fig.subplots(1, len(sets), squeeze=False)[0]
    for ax, s in zip(axes, sets):
        values = {
            m: [r["judges"][judge][field] for r in rs if r["set"] == s and r["judges"].get(judge, {}).get(field) is not None]
            for m, rs in records.items()
        }
        flat = [v for vs in values.values() for v in vs]
        if not flat:
            continue
        lo, hi = (0.0, 1.0) if field == "confidence" else (min(flat), max(flat) + 1e-9)
        for m, vs in values.items():
            if vs:
                ax.hist(vs, bins=bins, range=(lo, hi), alpha=0.5, label=m)
        ax.set_title(s)
        ax.set_xlabel({"confidence": f"{judge} probability", "score": f"{judge} score"}[field])
        ax.legend(fontsize="small")
    axes[0].set_ylabel("responses")
    return fig


def write_report(
    out_dir: str | Path, metrics: dict, records: dict, meta: Optional[dict] = None, prefill_records: Optional[dict] = None
) -> dict[str, Path]:
    """Write report.json, report.md, responses.jsonl (and prefill_responses.jsonl) and the PNG
    plots; return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(meta or {})
    paths = {"json": out / "report.json", "markdown": out / "report.md", "responses": out / "responses.jsonl"}
    paths["json"].write_text(json.dumps(to_jsonable({"meta": meta, "metrics": metrics}), indent=2))
    paths["markdown"].write_text(markdown(metrics, meta))
    with paths["responses"].open("w") as f:
        for model, rs in records.items():
            for r in rs:
                f.write(json.dumps({"model": model, **r}) + "\n")
    if prefill_records is not None:
        paths["prefill_responses"] = out / "prefill_responses.jsonl"
        with paths["prefill_responses"].open("w") as f:
            for rs in prefill_records.values():
                for r in rs:
                    f.write(json.dumps(r) + "\n")
    attacked = {(s, j) for m in metrics.values() for s, sm in m.items() for j in sm.get("prefill", {}).get("judges", {})}
    for s, j in sorted(attacked):
        paths[f"prefill_{s}_{j}"] = _save(prefill_curve(metrics, s, j), out / f"prefill_{s}_{j}.png")
    judges = {j for m in metrics.values() for s in m.values() for j in s["judges"]}
    for m_metrics in metrics.values():
        for s, sm in m_metrics.items():
            for j, jm in sm["judges"].items():
                name = f"bars_{s}_{j}"
                if _rate_key(jm) and name not in paths:
                    paths[name] = _save(category_bars(metrics, s, j), out / f"{name}.png")
    for j in sorted(judges):
        for field in ("score", "confidence"):
            if any(r["judges"].get(j, {}).get(field) is not None for rs in records.values() for r in rs):
                name = f"{field}_hist_{j}"
                paths[name] = _save(histograms(records, j, field), out / f"{name}.png")
    return paths


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=110)
    return path
