"""The ablation's table, plot and verdicts, from the runs' evaluation reports.

A metric is read from each run's report.json for one judge: `refusal_rate` on harmful prompt
sets and `compliance_rate` on safe ones (higher is better), the prefill attack's refusal rate at
each prefix length k > 0 (higher is better) and drift, the mean increase in NLL of the start
model's answers to safe prompts (lower is better). Per arm it is summarised over seeds:

    mean   = (1/S) Σ_s r_s                      (r_s: the value of seed s, from its report.json)
    range  = [min_s r_s, max_s r_s]             (the seed spread)
    pooled = bootstrap interval over the responses of every seed together (responses.jsonl,
             prefill_responses.jsonl); for metrics whose per-prompt values the evaluation does
             not keep (drift): the envelope [min_s low_s, max_s high_s] of the seeds' intervals

Verdict of arm A against arm B on a metric, for "higher is better" (conservative: both must hold):

    better  ⇔ pooled_A.low > pooled_B.high  and  min_s r_A,s > max_s r_B,s
    worse   ⇔ pooled_A.high < pooled_B.low  and  max_s r_A,s < min_s r_B,s
    otherwise "no clear difference"

(mirrored for "lower is better"). With one seed each, the seed condition follows from the first
(each value lies in its own interval), so the rule is: the two 95% intervals do not overlap.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from matplotlib.figure import Figure

from lit_align.eval.metrics import Estimate, estimate, judge_metrics, to_jsonable

RATES = {"refusal_rate": "refusal", "compliance_rate": "compliance"}


@dataclass
class ArmMetric:
    """One arm's summary of one metric over its seeds."""

    seeds: list[int]
    values: list[float]  # per seed, from its report.json
    lows: list[float]  # per seed interval
    highs: list[float]
    n: int  # prompts per seed
    pooled_value: float
    pooled_low: float
    pooled_high: float
    pooled: str = "responses"  # "responses": bootstrap over every seed's responses; "envelope": of the seeds' intervals
    direction: int = 1  # +1: higher is better; -1: lower is better
    unit: str = "%"  # "%" (rates, shown ×100) or "nats"

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def spread(self) -> tuple[float, float]:
        return min(self.values), max(self.values)

    @property
    def std(self) -> float:
        return statistics.stdev(self.values) if len(self.values) > 1 else 0.0


def verdict(a: ArmMetric, b: ArmMetric) -> str:
    """"better" / "worse" / "no clear difference" of `a` against `b` (rule in the module docstring)."""
    bounds = (a.pooled_low, a.pooled_high, b.pooled_low, b.pooled_high, *a.values, *b.values)
    if any(x is None or math.isnan(x) for x in bounds):
        return "n/a"
    above = a.pooled_low > b.pooled_high and min(a.values) > max(b.values)
    below = a.pooled_high < b.pooled_low and max(a.values) < min(b.values)
    if above or below:
        return "better" if above == (a.direction > 0) else "worse"
    return "no clear difference"


# ---------------------------------------------------------------------------- reading runs
def run_metrics(report: dict, judge: str, by_category: bool = False) -> dict[str, dict]:
    """{metric name: {estimate, direction, unit, pool}} of one run's report.json (one model); with
    `by_category`, also the refusal rate of every category of a harmful set and of its worst one."""
    (metrics,) = report["metrics"].values()
    out = {}
    for prompt_set, m in metrics.items():
        rates = m.get("judges", {}).get(judge, {})
        for key, label in RATES.items():
            if key in rates:
                pool = {"file": "responses.jsonl", "set": prompt_set, "rate": key}
                out[f"{prompt_set}: {label}"] = {"estimate": rates[key], "direction": 1, "unit": "%", "pool": pool}
        categories = rates.get("refusal_rate_by_category", {}) if by_category else {}
        for category, estimate in categories.items():
            pool = {"file": "responses.jsonl", "set": prompt_set, "rate": "refusal_rate", "category": category}
            out[f"{prompt_set}: refusal [{category}]"] = {"estimate": estimate, "direction": 1, "unit": "%", "pool": pool}
        if categories:
            worst = min(categories.values(), key=lambda e: e["value"])
            pool = {"file": "responses.jsonl", "set": prompt_set, "rate": "refusal_rate", "worst": True}
            out[f"{prompt_set}: worst category refusal"] = {"estimate": worst, "direction": 1, "unit": "%", "pool": pool}
        by_k = (m.get("prefill") or {}).get("judges", {}).get(judge, {}).get("refusal_rate_by_k", {})
        for k, estimate in by_k.items():
            if int(k) > 0:
                pool = {"file": "prefill_responses.jsonl", "set": prompt_set, "k": int(k)}
                out[f"{prompt_set}: prefill k={k} refusal"] = {"estimate": estimate, "direction": 1, "unit": "%", "pool": pool}
        if (m.get("drift") or {}).get("delta") is not None:
            out[f"{prompt_set}: drift ΔNLL"] = {"estimate": m["drift"]["delta"], "direction": -1, "unit": "nats"}
    return out


def read_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _nan(x) -> float:
    return math.nan if x is None else float(x)


def pooled_estimate(records: list[dict], pool: dict, judge: str, **kw) -> Estimate:
    """The metric over the records of every seed together, computed as evaluate computes it for one."""
    records = [r for r in records if r["set"] == pool["set"] and r.get("k", pool.get("k")) == pool.get("k")]
    if "rate" in pool:
        metrics = judge_metrics(records, judge, **kw)
        if "category" in pool:
            return metrics["refusal_rate_by_category"][pool["category"]]
        if pool.get("worst"):  # the category that is worst over every seed's responses together
            return min(metrics["refusal_rate_by_category"].values(), key=lambda e: e.value)
        return metrics[pool["rate"]]
    return estimate([r["judges"].get(judge, {}).get("refused") for r in records], **kw)


def arm_metrics(
    root: Path, runs: list[dict], judge: str, num_resamples: int, level: float, seed: int, by_category: bool = False
) -> dict[str, ArmMetric]:
    """Per metric, the arm's seeds summarised; `runs` are its finished runs (seed, eval_dir under `root`)."""
    reports = {r["seed"]: json.loads((root / r["eval_dir"] / "report.json").read_text()) for r in runs}
    per_seed = {s: run_metrics(report, judge, by_category) for s, report in reports.items()}
    dirs = {r["seed"]: root / r["eval_dir"] for r in runs}
    seeds = sorted(per_seed)
    out = {}
    for key in dict.fromkeys(k for s in seeds for k in per_seed[s]):
        if any(key not in per_seed[s] for s in seeds):
            continue  # not measured for every seed
        first = per_seed[seeds[0]][key]
        estimates = [per_seed[s][key]["estimate"] for s in seeds]
        values, lows, highs = ([_nan(e[f]) for e in estimates] for f in ("value", "low", "high"))
        pool = first.get("pool")
        if pool is not None and all((dirs[s] / pool["file"]).is_file() for s in seeds):
            records = [rec for s in seeds for rec in read_records(dirs[s] / pool["file"])]
            pooled = pooled_estimate(records, pool, judge, num_resamples=num_resamples, level=level, seed=seed)
            pooled_kind, pooled_values = "responses", (pooled.value, pooled.low, pooled.high)
        else:
            pooled_kind, pooled_values = "envelope", (statistics.fmean(values), min(lows), max(highs))
        out[key] = ArmMetric(
            seeds, values, lows, highs, estimates[0]["n"], *pooled_values, pooled=pooled_kind,
            direction=first["direction"], unit=first["unit"],
        )
    return out


# ---------------------------------------------------------------------------- tables
def fmt(x: float, unit: str) -> str:
    if x is None or math.isnan(x):
        return "–"
    return f"{100 * x:.1f}" if unit == "%" else f"{x:.3f}"


def _unit(unit: str) -> str:
    return "%" if unit == "%" else " nats"


def quality_cell(m: ArmMetric) -> str:
    low, high = m.spread
    spread = f" (seeds {fmt(low, m.unit)}–{fmt(high, m.unit)})" if len(m.values) > 1 else ""
    mark = "" if m.pooled == "responses" else "*"
    return f"{fmt(m.mean, m.unit)}{_unit(m.unit)}{spread} [{fmt(m.pooled_low, m.unit)}, {fmt(m.pooled_high, m.unit)}]{mark}"


def seed_cell(m: ArmMetric, i: int) -> str:
    return f"{fmt(m.values[i], m.unit)}{_unit(m.unit)} [{fmt(m.lows[i], m.unit)}, {fmt(m.highs[i], m.unit)}]"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def _mean(values: list) -> float:
    return statistics.fmean(values) if values else math.nan


def cost_row(arm: str, runs: list[dict], reward: bool = False) -> list[str]:
    """One arm's cost row; `reward` adds the reward models' forwards (texts scored, positions)."""
    trained = [r for r in runs if r.get("train")]
    mean = lambda key: _mean([r["train"].get(key, 0) for r in trained])  # noqa: E731
    loads = [f"{r['load_average']['start'][0]}→{r['load_average']['end'][0]}" for r in runs]
    if not trained:
        return [arm, "–", "–", f"{_mean([r['eval_seconds'] for r in runs]):.0f}", "–", "–", "–", *(["–"] if reward else []), ", ".join(loads)]
    rewards = [f"{mean('reward_forward_texts'):,.0f} / {mean('reward_forward_tokens'):,.0f}"] if reward else []
    return [
        arm, str(trained[0]["train"]["steps"]), f"{mean('train_seconds'):.0f}", f"{_mean([r['eval_seconds'] for r in runs]):.0f}",
        f"{mean('forward_tokens'):,.0f}", f"{mean('sampling_forward_tokens'):,.0f}", f"{mean('generated_tokens'):,.0f}",
        *rewards, ", ".join(loads),
    ]


def uses_reward_models(summary: dict) -> bool:
    return any((r.get("train") or {}).get("reward_forward_texts") for rs in summary["runs"].values() for r in rs)


def preparation(summary: dict) -> list[str]:
    """The prepare steps' cost, then each step's report (e.g. the reward models' held-out accuracy)."""
    steps = summary.get("prepare") or []
    if not steps:
        return []
    out = ["", "## Preparation", "", "Run once before the arms (data, reward models); seconds of the whole command, "
           "1-minute load average at its start and end.", ""]
    out += _table(["step", "command", "seconds", "load avg"], [
        [r["name"], "lit-align " + " ".join(r["argv"]), f"{r['seconds']:.0f}",
         f"{r['load_average']['start'][0]}→{r['load_average']['end'][0]}"] for r in steps
    ])
    for r in steps:
        if r.get("report_markdown"):
            body = r["report_markdown"].strip().splitlines()  # its headings two levels down, under this section
            out += ["", f"### {r['name']}: {r['report']}", "", *(("##" + line if line.startswith("#") else line) for line in body)]
    return out


def markdown(summary: dict) -> str:
    arms, keys = summary["arms"], summary["metrics"]
    stats = {a: {k: ArmMetric(**v) for k, v in summary["quality"][a].items()} for a in arms}
    out = [
        f"# Ablation ({summary['judge']} judge, {summary['level']:.0%} intervals, step budget {summary['max_steps']})", "",
        "## Quality", "",
        "Mean over seeds (seed range) [pooled interval: bootstrap over every seed's responses; * the envelope of the "
        "seeds' intervals]. Refusal on harmful prompts, compliance on safe ones and refusal under the prefill attack: "
        "higher is better; drift (ΔNLL of the start model's answers to safe prompts): lower is better.", "",
    ]
    out += _table(["arm", "seeds", *keys], [
        [a, ",".join(map(str, summary["seeds"][a])), *(quality_cell(stats[a][k]) if k in stats[a] else "–" for k in keys)]
        for a in arms
    ])
    out += ["", "## Per seed", "", "Each run's report.json: value [its bootstrap interval].", ""]
    rows = []
    for a in arms:
        for i, s in enumerate(summary["seeds"][a]):
            rows.append([a, str(s), *(seed_cell(stats[a][k], i) if k in stats[a] else "–" for k in keys)])
    out += _table(["arm", "seed", *keys], rows)
    out += ["", "## Cost", "", "Mean over seeds. Seconds of training (validation excluded) and of evaluation; tokens: "
            "positions the models forwarded in full forwards (policy with backward, reference, scoring) and while "
            "sampling, and the tokens sampled; 1-minute load average at the start and end of each run.", ""]
    reward = uses_reward_models(summary)
    header = ["arm", "steps", "train s", "eval s", "forward tokens", "sampling positions", "generated tokens",
              *(["reward-model forwards (texts / positions)"] if reward else []), "load avg"]
    out += _table(header, [cost_row(a, summary["runs"][a], reward) for a in arms])
    out += ["", "## Verdicts", "", "better / worse / no clear difference: better (worse) when the pooled intervals do not "
            "overlap and every seed of the arm is better (worse) than every seed of the other (docs/experiments.md).", ""]
    out += _table(["arm", "against", *keys], [
        [v["arm"], v["against"], *(v["verdicts"].get(k, "–") for k in keys)] for v in summary["verdicts"]
    ])
    out += preparation(summary)
    return "\n".join(out) + "\n"


def plot(summary: dict) -> Figure:
    """Grouped bars: one group per rate, one bar per arm (mean over seeds), the pooled interval as
    error bar, each seed as a dot."""
    arms = summary["arms"]
    keys = [k for k in summary["metrics"] if all(summary["quality"][a].get(k, {}).get("unit", "%") == "%" for a in arms)]
    fig = Figure(figsize=(max(6.0, 1.6 * len(keys) * max(1, len(arms)) / 3), 4.2))
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(arms))
    for j, arm in enumerate(arms):
        xs, means, low, high = [], [], [], []
        for i, key in enumerate(keys):
            m = summary["quality"][arm].get(key)
            if m is None:
                continue
            x = i - 0.4 + width * (j + 0.5)
            stat = ArmMetric(**m)
            xs.append(x)
            means.append(100 * stat.mean)
            low.append(100 * max(0.0, stat.mean - stat.pooled_low))
            high.append(100 * max(0.0, stat.pooled_high - stat.mean))
            ax.plot([x] * len(stat.values), [100 * v for v in stat.values], "k.", markersize=3)
        ax.bar(xs, means, width, yerr=[low, high], capsize=2, label=arm)
    ax.set_xticks(range(len(keys)), [k.replace(": ", "\n") for k in keys], fontsize=7)
    ax.set_ylabel("% (higher is better)")
    ax.set_ylim(0, 105)
    ax.legend(fontsize=7, ncols=min(len(arms), 4))
    fig.tight_layout()
    return fig


def summarize_runs(
    root: Path, runs: dict[str, list[dict]], judge: str, baseline: Optional[str], base: Optional[str], max_steps: int,
    num_resamples: int = 1000, level: float = 0.95, seed: int = 0, by_category: bool = False,
) -> dict:
    """Everything ablation.json holds: per arm its metrics over seeds, its runs (costs, evaluation
    directories relative to `root`) and the verdicts."""
    quality = {arm: arm_metrics(Path(root), rs, judge, num_resamples, level, seed, by_category) for arm, rs in runs.items()}
    keys = list(dict.fromkeys(k for q in quality.values() for k in q))
    verdicts = []
    for against in dict.fromkeys(x for x in (baseline, base) if x):
        for arm in runs:
            if arm in (against, base) or against not in runs:
                continue
            verdicts.append({"arm": arm, "against": against, "verdicts": {
                k: verdict(quality[arm][k], quality[against][k]) for k in keys if k in quality[arm] and k in quality[against]
            }})
    return {
        "judge": judge, "level": level, "max_steps": max_steps, "arms": list(runs), "metrics": keys,
        "seeds": {arm: [r["seed"] for r in rs] for arm, rs in runs.items()},
        "quality": {arm: {k: asdict(m) for k, m in q.items()} for arm, q in quality.items()},
        "runs": runs, "verdicts": verdicts,
    }


def write_summary(out_dir: Path, summary: dict) -> dict[str, Path]:
    paths = {"json": out_dir / "ablation.json", "markdown": out_dir / "ablation.md", "plot": out_dir / "ablation.png"}
    paths["json"].write_text(json.dumps(to_jsonable(summary), indent=2, default=str))
    paths["markdown"].write_text(markdown(summary))
    plot(summary).savefig(paths["plot"], dpi=110)
    return paths


__all__ = ["ArmMetric", "arm_metrics", "markdown", "plot", "summarize_runs", "verdict", "write_summary"]
