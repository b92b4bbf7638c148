"""`lit-align evaluate`: generate responses to safety prompt sets, judge them, write a report.

    lit-align evaluate --config configs/evaluate.yaml
    lit-align evaluate --models '[smollm2-135m-instruct, runs/dpo/checkpoints/last.ckpt]' \
        --prompt_sets '[{preset: xstest, path: ../shared/data/xstest_prompts.csv}]'

For every model and prompt set: responses are generated (batched, seeded, greedy by default)
and cached under `out_dir/generations/` (a re-run with the same settings re-judges without
regenerating), every judge scores them, and `out_dir` receives report.json, report.md,
responses.jsonl and PNG plots comparing the models side by side.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from lit_align.eval.judges import DEFAULT_JUDGE_PROMPT, Judge, LLMJudge, ProbeJudge, RefusalPhraseJudge, RewardJudge
from lit_align.eval.drift import Drift, DriftConfig
from lit_align.eval.generations import Generations
from lit_align.eval.metrics import summarize, to_jsonable
from lit_align.eval.prefill import PrefillAttack, PrefillConfig
from lit_align.eval.prompts import PromptSetConfig, load_prompt_set
from lit_align.eval.report import write_report
from lit_align.generation import LeanGenerator, SamplingConfig
from lit_align.models import LoraArgs, PolicyConfig, load_causal_lm, load_tokenizer

log = logging.getLogger(__name__)


@dataclass
class JudgesConfig:
    """Which judges score the responses."""

    phrases: Optional[str] = "jailbreakbench"
    """Refusal-phrase list: "jailbreakbench" or "advbench" (see lit_align.eval.judges); null: off."""
    phrase_match: str = "anywhere"
    """Match refusal phrases "anywhere" in the response or only at its "start"."""
    probe: Optional[str] = None
    """A lit_align probe file; scores each response on a backbone's hidden states."""
    probe_backbone: Optional[str] = None
    """Model whose hidden states the probe reads; null: each evaluated model its own (paper A)."""
    reward: Optional[str] = None
    """A reward source `package.module:function` with TRL's reward-function shape."""
    shadow: Optional[str] = None
    """A shadow reward-model manifest (SRMIR): scored by a ShadowRewardEnsemble."""
    shadow_strategy: str = "linear"
    """Either "linear" (weighted sum of the shadow models) or "categorized" (the prompt's own category's model)."""
    llm_judge: Optional[str] = None
    """A Hugging Face chat model (directory, hub id or alias) asked whether each response refuses."""
    llm_judge_prompt: str = DEFAULT_JUDGE_PROMPT
    """The judge's question, with {prompt} and {response}."""
    batch_size: int = 8
    """Batch size of the model-based judges."""


# ---------------------------------------------------------------------------- loading models
def load_for_eval(spec: str, dtype: str = "float32", device: str = "cpu"):
    """(model, tokenizer) in eval mode from an HF directory / hub id / alias or a `.ckpt`."""
    if spec.endswith(".ckpt"):
        model, tokenizer = load_checkpoint_policy(spec, dtype)
    else:
        cfg = PolicyConfig(name_or_path=spec, dtype=dtype)
        model, tokenizer = load_causal_lm(cfg, with_lora=False), load_tokenizer(cfg)
    return model.to(device).eval(), tokenizer


def load_checkpoint_policy(path: str, dtype: Optional[str] = None):
    """The policy of a lit_align Lightning checkpoint: the model named by its saved
    `policy` hyper-parameter, with the checkpoint's weights (LoRA merged).

    The file is read with `weights_only=True` (no code runs); only lit_align's config
    dataclasses are allowed as objects in it."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist (sharded directories: run `lit-align export` first)")
    try:
        # lit_align.models allow-lists its config dataclasses for weights_only loading (a
        # `safe_globals` context here would un-register them on exit for the whole process)
        ckpt = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(f"{path}: not loadable with weights_only=True ({str(err).splitlines()[0]})") from err
    hparams = ckpt.get("hyper_parameters") or {}
    policy = hparams.get("policy")
    if isinstance(policy, dict):
        policy = PolicyConfig(**{k: v for k, v in policy.items() if k in {f.name for f in dataclasses.fields(PolicyConfig)}})
        if isinstance(policy.lora, dict):
            policy.lora = LoraArgs(**policy.lora)
    if not isinstance(policy, PolicyConfig):
        raise ValueError(f"{path}: hyper-parameters have no `policy` (PolicyConfig); found {sorted(hparams)}")
    policy = dataclasses.replace(policy, gradient_checkpointing=False, dtype=dtype or policy.dtype)
    model = load_causal_lm(policy, with_lora=True)
    state = {k[len("policy.") :]: v for k, v in ckpt["state_dict"].items() if k.startswith("policy.")}
    if not state:
        raise ValueError(f"{path}: no `policy.*` weights in the checkpoint's state_dict")
    result = model.load_state_dict(state, strict=False)
    frozen = {k[len("policy.") :] for k in ckpt.get("lit_align_frozen_keys", []) if k.startswith("policy.")}
    missing = [k for k in result.missing_keys if k not in frozen]  # frozen weights are the base model's
    if missing or result.unexpected_keys:
        raise ValueError(
            f"{path}: checkpoint weights do not fit {policy.name_or_path!r} "
            f"(missing {missing[:3]}, unexpected {result.unexpected_keys[:3]})"
        )
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    return model, load_tokenizer(policy)


def model_label(spec: str) -> str:
    p = Path(spec)
    if spec.endswith(".ckpt"):
        return f"{p.parent.parent.name or p.parent.name}/{p.stem}"
    return p.name or spec


def _device(device: str) -> str:
    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


# ---------------------------------------------------------------------------- judging
def judge_records(judges: list[Judge], records: list[dict]) -> None:
    """Add every judge's verdicts to `records` (in place)."""
    prompts = [r["prompt"] for r in records]
    responses = [r["response"] for r in records]
    columns = {k: [r[k] for r in records] for k in ("category", "harmful", "set")}
    for judge in judges:
        verdicts = judge(prompts, responses, **columns)
        for i, record in enumerate(records):
            record["judges"][judge.name] = {
                f.name: getattr(verdicts, f.name)[i]
                for f in dataclasses.fields(verdicts)
                if getattr(verdicts, f.name) is not None
            }


def build_static_judges(cfg: JudgesConfig, dtype: str, device: str) -> list[Judge]:
    """Judges that do not depend on the evaluated model."""
    judges: list[Judge] = []
    if cfg.phrases:
        judges.append(RefusalPhraseJudge(cfg.phrases, match=cfg.phrase_match))
    if cfg.reward:
        judges.append(RewardJudge(cfg.reward))
    if cfg.shadow:
        from lit_align.srmir.ensemble import ShadowRewardEnsemble

        ensemble = ShadowRewardEnsemble(cfg.shadow, strategy=cfg.shadow_strategy, batch_size=cfg.batch_size)
        judges.append(RewardJudge(ensemble.to(device), name="shadow"))
    if cfg.llm_judge:
        model, tok = load_for_eval(cfg.llm_judge, dtype, device)
        judges.append(LLMJudge(model, tok, cfg.llm_judge_prompt, batch_size=cfg.batch_size))
    if cfg.probe and cfg.probe_backbone:
        model, tok = load_for_eval(cfg.probe_backbone, dtype, device)
        judges.append(ProbeJudge(cfg.probe, model, tok, batch_size=cfg.batch_size))
    return judges


# ---------------------------------------------------------------------------- the command
def evaluate(
    models: list[str],
    prompt_sets: list[PromptSetConfig],
    out_dir: str = "runs/evaluate",
    names: Optional[list[str]] = None,
    judges: JudgesConfig = JudgesConfig(),  # noqa: B008 (read-only default)
    sampling: SamplingConfig = SamplingConfig(max_new_tokens=64, temperature=0.0),  # noqa: B008
    prefill: Optional[PrefillConfig] = None,
    drift: Optional[DriftConfig] = None,
    batch_size: int = 16,
    seed: int = 0,
    dtype: str = "float32",
    device: str = "auto",
    num_resamples: int = 1000,
    confidence_level: float = 0.95,
    progress: bool = True,
) -> dict:
    """Evaluate the safety of one or more models on refusal / over-refusal prompt sets.

    Args:
        models: Hugging Face directories, hub ids, the `smollm2-135m-instruct` alias, or lit_align
            `.ckpt` checkpoints (the policy named by the checkpoint's hyper-parameters). Several
            models give one side-by-side report.
        prompt_sets: Prompt sets, e.g. {preset: harmbench, path: ../shared/data/harmbench_behaviors_text_all.csv}.
        out_dir: Run directory for report.json, report.md, responses.jsonl, plots and cached generations.
        names: Labels of the models in the report (default: from their paths).
        judges: Which judges score the responses.
        sampling: Generation settings (default: greedy, 64 new tokens).
        prefill: The prefilling attack (Qi et al. 2024) on the harmful prompts; off when null, `{}`
            turns it on with its defaults. Fields (`--prefill.help`): ks (prefix lengths, default
            [5, 10, 20, 40]), sets, answers_from (default: the first model's greedy answers),
            answers_file, keep_answers (compliant | all), on_bad_rows (error | skip).
        drift: Drift on the safe prompts: per-token NLL of the reference model's greedy answers
            under each model, and its difference from the reference's own; off when null, `{}`
            turns it on. Fields (`--drift.help`): reference (default: the first model), sets.
        batch_size: Prompts per generation batch.
        seed: Seed of generation (batch i uses seed + i) and of the bootstrap.
        dtype: Model dtype (float32, bfloat16, float16).
        device: "auto" (CUDA if available), "cpu", "cuda", ...
        num_resamples: Bootstrap resamples for the confidence intervals.
        confidence_level: Level of the intervals.
        progress: Show progress bars.
    """
    names = check_arguments(models, prompt_sets, names)
    device = _device(device)
    out = Path(out_dir)
    rows_by_set = {p.label: load_prompt_set(p) for p in prompt_sets}
    drifter = Drift(drift, rows_by_set, models) if drift is not None else None
    static = build_static_judges(judges, dtype, device)
    attack = PrefillAttack(prefill, prompt_sets, rows_by_set, models, static) if prefill is not None else None
    gens = Generations(out, sampling, batch_size, seed, progress, dtype)
    records = _run_models(models, names, gens, rows_by_set, static, judges, attack, drifter, dtype, device)
    metrics = run_metrics(records, rows_by_set, attack, drifter, num_resamples=num_resamples, level=confidence_level, seed=seed)
    meta = run_meta(dict(zip(names, models)), prompt_sets, rows_by_set, static, judges, attack, drifter,
                    sampling=dataclasses.asdict(sampling), batch_size=batch_size, seed=seed)  # fmt: skip
    paths = write_report(out, metrics, records, meta, prefill_records=attack.records if attack else None)
    log.info("report written to %s", paths["markdown"])
    print(f"lit-align evaluate: report in {paths['markdown']}")
    return to_jsonable(metrics)


def check_arguments(models: list[str], prompt_sets: list[PromptSetConfig], names: Optional[list[str]]) -> list[str]:
    """The models' report names (given or from their paths), after refusing empty or repeated inputs."""
    if not models:
        raise ValueError("evaluate: `models` is empty; name at least one model")
    if not prompt_sets:
        raise ValueError("evaluate: `prompt_sets` is empty; give at least one, e.g. {preset: xstest, path: ...}")
    names = list(names) if names else [model_label(m) for m in models]
    if len(names) != len(models) or len(set(names)) != len(names):
        raise ValueError(f"evaluate: names {names} must be unique, one per model {models}")
    labels = [p.label for p in prompt_sets]
    if len(set(labels)) != len(labels):
        raise ValueError(f"evaluate: prompt set names {labels} repeat; give each a `name`")
    return names


def run_metrics(records: dict[str, list[dict]], rows_by_set: dict, attack, drifter, **kw) -> dict:
    """{model: {set: metrics}}: the judged records' summaries, with the prefill and drift parts added."""
    metrics = {
        name: {s: summarize([r for r in recs if r["set"] == s], **kw) for s in rows_by_set}
        for name, recs in records.items()
    }
    for part, source in (("prefill", attack), ("drift", drifter)):
        for m, by_set in (source.metrics(**kw) if source is not None else {}).items():
            for s, value in by_set.items():
                metrics[m][s][part] = value
    return metrics


def run_meta(models: dict, prompt_sets, rows_by_set, static, judges: JudgesConfig, attack, drifter, **settings) -> dict:
    """The report's description of the run: models, prompt sets, `settings`, judges, prefill and drift sources."""
    meta = {
        "models": models,
        "prompt_sets": {p.label: f"{p.preset}: {p.path} (n={len(rows_by_set[p.label])})" for p in prompt_sets},
        **settings,
        "judges": [j.name for j in static] + (["probe"] if judges.probe and not judges.probe_backbone else []),
    }
    if attack is not None:
        prefill = attack.cfg
        meta["prefill"] = {**dataclasses.asdict(prefill), "answers": prefill.answers_file or f"greedy answers of {attack.source}"}
        if attack.skipped_file:
            meta["prefill"]["answers_file_rows_skipped"] = dict(attack.skipped_file)
    if drifter is not None:
        meta["drift"] = {"reference": drifter.reference, "sets": drifter.sets}
    return meta


def _run_models(models, names, gens: Generations, rows_by_set, static, judges, attack, drifter, dtype, device) -> dict:
    """{name: judged records} of every evaluated model, in `names` order; each model is loaded once."""
    records = {}
    for spec, name in _schedule(models, names, [attack and attack.source, drifter and drifter.reference]):
        recs = _run_model(spec, name, gens, rows_by_set, static, judges, attack, drifter, dtype, device)
        if name is not None:
            records[name] = recs
        gc.collect()
    return {n: records[n] for n in names}


def _schedule(models: list[str], names: list[str], references: list) -> list[tuple[str, Optional[str]]]:
    """(spec, report name) in the order models are loaded: reference models first (answer source,
    drift reference; name None when they are not evaluated themselves), then the others."""
    entries = list(zip(models, names))
    front: list[tuple[str, Optional[str]]] = []
    for ref in filter(None, references):
        if any(spec == ref for spec, _ in front):
            continue
        hit = next((e for e in entries if e[0] == ref), None)
        if hit is None:
            front.append((ref, None))
        else:
            entries.remove(hit)
            front.append(hit)
    return front + entries


def _run_model(spec, name, gens: Generations, rows_by_set, static, judges: JudgesConfig, attack, drifter, dtype, device):
    """Everything one loaded model does: its responses to every set (when it is evaluated, `name`
    not None), the greedy answers it gives as the prefill source or drift reference, its
    prefilled continuations and its NLL of the reference's answers. Returns its records."""
    model, tokenizer = load_for_eval(spec, dtype, device)
    generator = LeanGenerator(model, tokenizer)
    model_judges = list(static)
    if judges.probe and not judges.probe_backbone:
        model_judges.append(ProbeJudge(judges.probe, model, tokenizer, batch_size=judges.batch_size))
    label = name or f"reference_{model_label(spec)}"
    records = None
    if name is not None:
        if drifter is not None and drifter.vocab is not None:
            drifter.check_tokenizer(name, tokenizer)  # before generating anything
        records = _responses(gens, generator, spec, name, rows_by_set, model_judges)
    if attack is not None and spec == attack.source and attack.source_vocab is None:
        attack.take_answers(tokenizer, {s: gens.greedy(generator, spec, label, s, rows_by_set[s]) for s in attack.sets}, label)
    if drifter is not None and spec == drifter.reference and drifter.vocab is None:
        answers = {s: gens.greedy(generator, spec, label, s, rows_by_set[s]) for s in drifter.sets}
        drifter.take_reference(model, generator, label, answers, gens.batch_size)
    if name is not None and attack is not None:
        def generate(set_name, rows, suffix, extra, encode):
            return gens(generator, spec, name, set_name, rows, suffix, extra, encode)[0]

        attack.attack(name, tokenizer, records, generate, lambda recs: judge_records(model_judges, recs))
    if name is not None and drifter is not None:
        drifter.measure(name, model, generator, records, gens.batch_size)
    return records


def _responses(gens: Generations, generator, spec: str, name: str, rows_by_set: dict, judges: list) -> list[dict]:
    """Generate (cached) and judge one model's responses to every prompt set."""
    records = []
    for set_name, rows in rows_by_set.items():
        gen, _ = gens(generator, spec, name, set_name, rows)
        recs = [
            {**row, "response": text, "length_tokens": n, "truncated": cut, "judges": {}}
            for row, text, n, cut in zip(rows, gen["responses"], gen["length_tokens"], gen["truncated"])
        ]
        judge_records(judges, recs)
        records += recs
    return records
