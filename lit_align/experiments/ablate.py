"""`lit-align ablate`: train every arm from the same start under one budget, evaluate each, compare.

    lit-align ablate -c configs/ablate/paper_a.yaml

An arm is a `lit-align fit` YAML plus overrides (an arm without one is the start model,
evaluated untrained). Every trained arm × seed runs

    lit-align fit -c <arm config> <arm overrides> --seed_everything=<seed> --data.seed=<seed>
        --model.init_args.policy.name_or_path=<base_model> --data.path=<data> [--data.val_path=<val_data>]
        --trainer.max_steps=<max_steps> --trainer.max_epochs=-1 --model.init_args.export_dir=<run>/policy ...

in this process (the shared settings last, so no arm can change them), counting its cost with a
`CostMeter`, then `lit-align evaluate` on the exported policy with the same evaluation settings
for every arm. Each run lives in `<out_dir>/arms/<arm>/seed<seed>/`; `trained.json` and
`DONE.json` mark its two stages, so a re-run skips what finished and redoes only a run that
stopped part-way. Then `ablation.json`, `ablation.md` and `ablation.png` are written
(lit_align.experiments.summary; the verdict rule is in docs/experiments.md). `prepare` steps
(data, reward models) run once before the arms (lit_align.experiments.prepare).
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from string import Template
from typing import Callable, Optional

from lit_align.experiments.costs import load_average
from lit_align.experiments.prepare import PrepareStep
from lit_align.experiments.summary import summarize_runs, write_summary

log = logging.getLogger(__name__)

# the settings the ablation gives every arm: an arm's overrides may not touch them
SHARED_KEYS = (
    "--seed_everything", "--data.seed", "--model.init_args.policy.name_or_path", "--data.path", "--data.val_path",
    "--trainer.max_steps", "--trainer.max_epochs", "--trainer.default_root_dir", "--model.init_args.export_dir",
)
RESERVED_EVAL_KEYS = ("models", "names", "out_dir")


@dataclass
class AblationInputs:
    """What every arm starts from and trains on; `${name}` in an arm's overrides is replaced by the value."""

    base_model: str = "smollm2-135m-instruct"
    """The start model of every arm (HF directory, hub id or alias); the "base" arm evaluates it as it is."""
    data: str = ""
    """Training data of every trained arm (`data.path`): the preference pairs; the online arm reads their prompts."""
    val_data: Optional[str] = None
    """Validation data of every trained arm (`data.val_path`); null: each fit YAML's own split of `data`."""
    probe: Optional[str] = None
    """A probe file trained on the base model's hidden states, for the arms whose overrides name `${probe}`."""
    extra: dict[str, str] = field(default_factory=dict)
    """More named values for `${name}` in overrides (e.g. a shadow reward-model manifest)."""


@dataclass
class ArmConfig:
    """One arm of the ablation."""

    name: str
    """Its row in the table (letters, digits, `-`, `_`)."""
    config: Optional[str] = None
    """A `lit-align fit` YAML; null: the start model, evaluated without training."""
    overrides: list[str] = field(default_factory=list)
    """Extra `lit-align fit` arguments, e.g. `--model.init_args.loss_type=conservative` or `-c more.yaml`;
    `${probe}`, `${data}`, `${seed}`, `${run_dir}` ... are replaced."""
    num_seeds: Optional[int] = None
    """Run only the first `num_seeds` of the ablation's seeds (a costly arm); null: all of them."""


def _placeholders(inputs: AblationInputs) -> dict[str, str]:
    values = {"base_model": inputs.base_model, "data": inputs.data, "val_data": inputs.val_data, "probe": inputs.probe}
    return {**{k: str(v) for k, v in values.items() if v is not None}, **{k: str(v) for k, v in inputs.extra.items()}}


def arm_overrides(arm: ArmConfig, values: dict[str, str]) -> list[str]:
    """The arm's overrides with `${name}` replaced; an unknown name or a shared setting is an error."""
    out = []
    for item in arm.overrides:
        try:
            out.append(Template(item).substitute(values))
        except KeyError as err:
            raise ValueError(
                f"ablate: arm {arm.name!r} override {item!r} names ${{{err.args[0]}}}, which is not set; "
                f"set it in inputs (known: {sorted(values)})"
            ) from None
        except ValueError as err:
            raise ValueError(f"ablate: arm {arm.name!r} override {item!r}: {err} (write $$ for a literal $)") from None
        key = out[-1].split("=", 1)[0]
        if key in SHARED_KEYS:
            raise ValueError(
                f"ablate: arm {arm.name!r} overrides {key}, which the ablation sets for every arm (fairness): "
                "remove it from the arm, or change the ablation's inputs / seeds / max_steps"
            )
    return out


def shared_overrides(inputs: AblationInputs, seed: int, max_steps: int, run_dir: Path) -> list[str]:
    out = [
        f"--seed_everything={seed}", f"--data.seed={seed}", f"--model.init_args.policy.name_or_path={inputs.base_model}",
        f"--data.path={inputs.data}", f"--trainer.max_steps={max_steps}", "--trainer.max_epochs=-1",
        f"--trainer.default_root_dir={run_dir / 'train'}", f"--model.init_args.export_dir={run_dir / 'policy'}",
        '--trainer.callbacks+={"class_path": "lit_align.experiments.costs.CostMeter"}',
    ]
    return out + ([f"--data.val_path={inputs.val_data}"] if inputs.val_data else [])


# ---------------------------------------------------------------------------- checks at set-up
def substitute(obj, values: dict[str, str], where: str):
    """`obj` with `${name}` replaced in every string (lists and dicts walked)."""
    if isinstance(obj, str):
        try:
            return Template(obj).substitute(values)
        except KeyError as err:
            raise ValueError(f"ablate: {where} names ${{{err.args[0]}}}, which is not set (known: {sorted(values)})") from None
    if isinstance(obj, dict):
        return {k: substitute(v, values, f"{where}.{k}") for k, v in obj.items()}
    if isinstance(obj, list):
        return [substitute(v, values, where) for v in obj]
    return obj


def evaluation_kwargs(evaluation: dict, values: dict[str, str], base_model: str) -> dict:
    """`evaluation` (with `${name}` replaced) parsed against `lit_align.eval.evaluate.evaluate`'s
    signature, so every option it has, now or later, is accepted, and a typo stops the ablation
    before anything trains. The prefill attack's answers and drift's reference default to the
    start model, so every arm is attacked with the same prefixes and measured from the same answers."""
    from jsonargparse import ArgumentParser

    from lit_align.eval.evaluate import evaluate

    reserved = [k for k in RESERVED_EVAL_KEYS if k in evaluation]
    if reserved:
        raise ValueError(f"ablate: evaluation.{reserved[0]} is set by the ablation for each arm; remove it")
    parser = ArgumentParser(exit_on_error=False)
    parser.add_function_arguments(evaluate, as_positional=False)
    try:
        config = parser.parse_object({**substitute(evaluation, values, "evaluation"), "models": ["<arm>"]})
    except Exception as err:  # jsonargparse's message names the option
        raise ValueError(f"ablate: evaluation: {err}") from None
    kwargs = {k: v for k, v in vars(parser.instantiate(config)).items() if k not in RESERVED_EVAL_KEYS}
    if not kwargs.get("prompt_sets"):
        raise ValueError("ablate: evaluation.prompt_sets is empty; name the held-out prompt sets to evaluate on")
    prefill, drift = kwargs.get("prefill"), kwargs.get("drift")
    if prefill is not None and not (prefill.answers_from or prefill.answers_file):
        prefill.answers_from = base_model
    if drift is not None and drift.reference is None:
        drift.reference = base_model
    return kwargs


def check_names(names: list[str], label: str, plural: str) -> None:
    """Names that become directory names: unique, letters, digits, '-' and '_' only."""
    import re

    if len(set(names)) != len(names):
        raise ValueError(f"ablate: {plural} {names} repeat")
    for name in names:
        if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
            raise ValueError(f"ablate: {label} {name!r}: use letters, digits, '-' and '_' only")


def check_arms(arms: list[ArmConfig], seeds: list[int], baseline: Optional[str]) -> None:
    if not arms:
        raise ValueError("ablate: `arms` is empty")
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"ablate: seeds={seeds} must be a non-empty list without repeats")
    names = [a.name for a in arms]
    check_names(names, "arm name", "arm names")
    for arm in arms:
        if arm.config is not None and not Path(arm.config).is_file():
            raise FileNotFoundError(f"ablate: arm {arm.name!r}: config {arm.config} does not exist")
        if arm.config is None and arm.overrides:
            raise ValueError(f"ablate: arm {arm.name!r} has overrides but no config; an arm without config is not trained")
        if arm.num_seeds is not None and not 1 <= arm.num_seeds <= len(seeds):
            raise ValueError(f"ablate: arm {arm.name!r} num_seeds={arm.num_seeds}: choose 1..{len(seeds)}")
    if baseline is not None and baseline not in names:
        raise ValueError(f"ablate: baseline={baseline!r} is not an arm (arms: {names})")


def check_held_out(inputs: AblationInputs, prompt_sets: list) -> None:
    """Refuse evaluation prompts that are also training or validation prompts."""
    from lit_align.data.formats import load_rows
    from lit_align.eval.prompts import load_prompt_set

    def text(prompt) -> str:
        content = prompt[-1]["content"] if isinstance(prompt, list) else prompt
        return " ".join(str(content).lower().split())

    seen = set()
    for path in (inputs.data, inputs.val_data):
        if path:
            seen |= {text(r["prompt"]) for r in load_rows(path, "generic", "prompts", on_bad_rows="skip")}
    for cfg in prompt_sets:
        overlap = [r["prompt"] for r in load_prompt_set(cfg) if text(r["prompt"]) in seen]
        if overlap:
            raise ValueError(
                f"ablate: {len(overlap)} prompts of evaluation set {cfg.label!r} are also in the training data "
                f"(e.g. {overlap[0][:80]!r}): evaluate on held-out prompts, or set held_out_check: false"
            )


# ---------------------------------------------------------------------------- one run
def fingerprint(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def train_run(argv: list[str], run_dir: Path) -> dict:
    """`lit-align fit` in this process; the CostMeter's summary."""
    from lit_align.experiments.costs import CostMeter
    from lit_align.lightning_cli import run_lightning_cli

    start = time.perf_counter()
    cli = run_lightning_cli(argv)
    meter = next(c for c in cli.trainer.callbacks if isinstance(c, CostMeter))
    costs = {**meter.summary, "fit_seconds": round(time.perf_counter() - start, 2)}
    del cli
    gc.collect()
    if not (run_dir / "policy" / "config.json").is_file():
        raise RuntimeError(f"ablate: {' '.join(argv)} exported no policy to {run_dir / 'policy'}: the module must take export_dir")
    return costs


def prepared(ctx: dict) -> dict:
    """The preparation a run was trained after (nothing when the ablation has no `prepare`)."""
    return {"prepared": ctx["prepared"]} if ctx.get("prepared") else {}


def check_stored(record: dict, argv: Optional[list[str]], ctx: dict, run_dir: Path, what: str) -> None:
    """Refuse a stored record (`trained.json`, `DONE.json`) of a run trained on other prepared data
    or reward models, or with other settings than `argv` (`what` says which record it is)."""
    if record.get("argv") is not None and record.get("prepared") != ctx.get("prepared"):
        raise ValueError(
            f"ablate: {run_dir} was trained on other prepared data or reward models (the prepare steps' outputs "
            f"changed since); delete {run_dir} to re-run it"
        )
    if record.get("argv") != argv:
        raise ValueError(
            f"ablate: {run_dir} {what} ({record.get('argv')}); delete {run_dir} to re-run it, or restore the settings"
        )


def run_arm(arm: ArmConfig, seed: int, ctx: dict) -> dict:
    """Train (unless done) and evaluate (unless done with the same settings) one arm × seed."""
    from lit_align.eval.evaluate import evaluate

    run_dir: Path = ctx["out"] / "arms" / arm.name / f"seed{seed}"
    trained, done = run_dir / "trained.json", run_dir / "DONE.json"
    argv = None
    if arm.config is not None:
        values = {**ctx["values"], "seed": str(seed), "run_dir": str(run_dir)}
        argv = ["fit", "-c", arm.config, *arm_overrides(arm, values), *shared_overrides(ctx["inputs"], seed, ctx["max_steps"], run_dir)]
    if done.is_file():
        record = json.loads(done.read_text())
        check_stored(record, argv, ctx, run_dir, "finished with other training settings")
        if record.get("evaluation") == ctx["eval_fingerprint"]:
            print(f"[ablate] {arm.name} seed {seed}: done already ({done}), skipping")
            return record
    load_start = load_average()
    record = {"arm": arm.name, "seed": seed, "argv": argv, "train": None}
    if argv is not None and trained.is_file():
        stored = json.loads(trained.read_text())
        check_stored(stored, argv, ctx, run_dir, "was trained with other settings")
        record["train"] = stored["costs"]
    elif argv is not None:
        if run_dir.exists():  # a run that stopped part-way: start it over
            shutil.rmtree(run_dir)
        print(f"[ablate] {arm.name} seed {seed}: training: lit-align {' '.join(argv)}")
        record["train"] = train_run(argv, run_dir)
        trained.write_text(json.dumps({"argv": argv, "costs": record["train"], **prepared(ctx)}, indent=2))
    model = str(run_dir / "policy") if argv is not None else ctx["inputs"].base_model
    kwargs = dict(ctx["evaluation"])
    if kwargs.get("drift") is not None and kwargs["drift"].reference == model:
        kwargs["drift"] = None  # the start model's drift from itself is 0 by definition
    eval_dir = run_dir / "eval"
    eval_dir.mkdir(parents=True, exist_ok=True)
    if not (eval_dir / "generations").exists():  # one generation cache: reference answers are generated once
        (ctx["out"] / "generations").mkdir(exist_ok=True)
        (eval_dir / "generations").symlink_to((ctx["out"] / "generations").resolve(), target_is_directory=True)
    print(f"[ablate] {arm.name} seed {seed}: evaluating {model}")
    start = time.perf_counter()
    evaluate(models=[model], names=[f"{arm.name}_seed{seed}"], out_dir=str(eval_dir), **kwargs)
    record.update({
        "eval_seconds": round(time.perf_counter() - start, 2), "eval_dir": str(eval_dir.relative_to(ctx["out"])), "model": model,
        "load_average": {"start": load_start, "end": load_average()}, "evaluation": ctx["eval_fingerprint"],
        **prepared(ctx),
    })
    gc.collect()
    done.write_text(json.dumps(record, indent=2))
    return record


# ---------------------------------------------------------------------------- the command
def ablate(
    arms: list[ArmConfig],
    inputs: AblationInputs,
    evaluation: dict,
    seeds: Optional[list[int]] = None,
    max_steps: int = 100,
    out_dir: str = "runs/ablate",
    baseline: Optional[str] = "dpo",
    judge: str = "phrases",
    by_category: bool = False,
    held_out_check: bool = True,
    prepare: Optional[list[PrepareStep]] = None,
) -> dict:
    """Train every arm from the same start on the same data, seeds and step budget; evaluate and compare them.

    Args:
        arms: The arms: a name, a `lit-align fit` YAML (none: the start model, untrained), overrides, seeds.
        inputs: The start model, the training / validation data and the probe every arm shares.
        evaluation: `lit-align evaluate` settings for every arm (prompt_sets, judges, sampling, batch_size,
            seed, ... any option of `evaluate` except models, names and out_dir).
        seeds: Training seeds (`seed_everything` and `data.seed`) of every arm; default [0].
        max_steps: The optimiser-step budget of every trained arm (`trainer.max_steps`; epochs unlimited).
        out_dir: Where the runs, ablation.json, ablation.md and ablation.png go; a re-run resumes.
        baseline: The arm every other arm is compared with (plain DPO); each is also compared with the untrained arm.
        judge: The judge whose refusal / compliance rates make the table (evaluate's judge names, e.g. phrases).
        by_category: Also tabulate the refusal rate of every category of a harmful set, and of its worst category.
        held_out_check: Stop when an evaluation prompt is also a training or validation prompt.
        prepare: Commands run once, in order, before the arms (e.g. build-cod, train-shadow: the data
            and reward models the arms read); each skipped when done (lit_align.experiments.prepare).
    """
    from lit_align.experiments.prepare import prepared_fingerprint, run_steps

    seeds = [0] if seeds is None else list(seeds)
    prepare = list(prepare or [])
    values, eval_kwargs = check_setup(arms, inputs, evaluation, seeds, baseline, prepare)
    out = Path(out_dir)
    if held_out_check and not prepare:
        check_held_out(inputs, eval_kwargs["prompt_sets"])
    out.mkdir(parents=True, exist_ok=True)
    prepared_records = run_steps(prepare, values, out)  # the data the held-out check reads may come from here
    if held_out_check and prepare:
        check_held_out(inputs, eval_kwargs["prompt_sets"])
    ctx = {
        "out": out, "inputs": inputs, "max_steps": max_steps, "values": values,
        "evaluation": eval_kwargs, "eval_fingerprint": fingerprint(evaluation),
        "prepared": prepared_fingerprint(prepared_records),
    }
    paths = run_rounds(arms, seeds, ctx, lambda runs: summarize(
        out, runs, judge, baseline, arms, max_steps, eval_kwargs, by_category, prepared_records
    ))  # fmt: skip
    print(f"lit-align ablate: table in {paths['markdown']}")
    return json.loads(paths["json"].read_text())


def check_setup(
    arms: list[ArmConfig], inputs: AblationInputs, evaluation: dict, seeds: list[int], baseline: Optional[str], prepare: list
) -> tuple[dict[str, str], dict]:
    """Refuse every setting that cannot run before anything does; (placeholder values, evaluate's keyword arguments)."""
    from lit_align.experiments.prepare import check_steps

    check_arms(arms, seeds, baseline)
    check_steps(prepare)
    values = _placeholders(inputs)
    eval_kwargs = evaluation_kwargs(evaluation, values, inputs.base_model)
    if any(a.config is not None for a in arms) and not inputs.data:
        raise ValueError("ablate: inputs.data is empty; name the training data every trained arm reads")
    for arm in arms:  # every placeholder resolves before anything runs
        if arm.config is not None:
            arm_overrides(arm, {**values, "seed": "0", "run_dir": "."})
    return values, eval_kwargs


def run_rounds(arms: list[ArmConfig], seeds: list[int], ctx: dict, write: Callable[[dict], dict]) -> dict:
    """Every arm × seed, seed-major (after each round every arm has a comparable row), `write`-ing
    the table after each round; the paths of the last one."""
    runs: dict[str, list[dict]] = {a.name: [] for a in arms}
    paths = {}
    for i, seed in enumerate(seeds):
        for arm in arms:
            if i < (arm.num_seeds or len(seeds)):
                runs[arm.name].append(run_arm(arm, seed, ctx))
        paths = write(runs)
    return paths


def summarize(
    out: Path, runs: dict, judge: str, baseline: Optional[str], arms: list[ArmConfig], max_steps: int, eval_kwargs: dict,
    by_category: bool = False, prepared_records: Optional[list[dict]] = None,
) -> dict:
    base = next((a.name for a in arms if a.config is None), None)
    summary = summarize_runs(
        out, {arm: rs for arm, rs in runs.items() if rs}, judge, baseline, base, max_steps,
        eval_kwargs.get("num_resamples", 1000), eval_kwargs.get("confidence_level", 0.95), eval_kwargs.get("seed", 0),
        by_category,
    )
    if not summary["metrics"]:
        raise ValueError(f"ablate: judge {judge!r} gave no refusal or compliance rate; set `judge` to one of evaluate's judges")
    if prepared_records:
        summary["prepare"] = [
            {**r, "report_markdown": Path(r["report"]).read_text() if r.get("report") and Path(r["report"]).is_file() else None}
            for r in prepared_records
        ]
    return write_summary(out, summary)


__all__ = ["AblationInputs", "ArmConfig", "PrepareStep", "ablate"]
