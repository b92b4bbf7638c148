"""`lit-align judge-accuracy`: score refusal judges against human labels, without generating.

    lit-align judge-accuracy --config configs/judge_accuracy.yaml

Every judge reads the labelled completions of each file (XSTest's GPT-4 and Llama-2 responses
with human labels, `lit_align.eval.labelled`) and is scored against the humans: accuracy,
refusal precision, recall, F1 and Cohen's kappa, each with a paired percentile-bootstrap
interval over rows, the confusion matrix and how it calls each of the three human labels.

* Fixed judges (refusal phrases, the LLM judge at its own threshold) are scored on every file.
* Learned judges (probes on a backbone's hidden states; score judges such as shadow reward
  models, the LLM judge's P(refusal) or a reward function, with a threshold fitted on the
  training file) are trained on one file and tested on every OTHER file: never within one.
* The humans' own agreement (annotation_1 vs annotation_2) is the ceiling.

`out_dir` receives report.json, report.md, the trained probes (`probes/`) and a verdict cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import torch

from lit_align.eval.classification import binary_report, fit_threshold, label_breakdown, resample_index
from lit_align.eval.judges import (
    DEFAULT_JUDGE_PROMPT, PHRASE_LISTS, LLMJudge, ProbeRefusalJudge, RefusalPhraseJudge, RewardJudge, Verdicts,
)  # fmt: skip
from lit_align.eval.labelled import LabelledFile, is_refusal, load_labelled_counted
from lit_align.eval.metrics import to_jsonable
from lit_align.eval.phrase_tuning import tune_phrases

log = logging.getLogger(__name__)


@dataclass
class ProbeJudgeConfig:
    """A learned refusal probe (ProbeRefusalJudge) on a frozen backbone's hidden states."""

    backbone: str = "smollm2-135m-instruct"
    """Model whose hidden states the probe reads: an HF directory / hub id, `smollm2-135m-instruct` or `all-minilm-l6-v2`."""
    kind: Literal["logistic", "hybrid", "mean_diff"] = "logistic"
    """Probe (lit_align.probes): one-layer logistic or mean-difference, or the hybrid over layers."""
    layers: Optional[list[int]] = None
    """Candidate layers (1..L, negative from the end); None: all. One-layer probes pick theirs by
    cross-validation on the training file only; `hybrid` reads all of them."""
    pooling: Literal["last", "mean"] = "last"
    """Hidden state at the last token (EOS after the response) or mean over the text."""
    threshold: float = 0.5
    """refused = P(refusal) ≥ threshold."""
    name: Optional[str] = None
    """Label in the report; default: probe/<backbone>/<kind>/<pooling>."""

    @property
    def label(self) -> str:
        return self.name or f"probe/{Path(self.backbone).name}/{self.kind}/{self.pooling}"


@dataclass
class AccuracyJudgesConfig:
    """The judges to score."""

    phrases: list[Literal["jailbreakbench", "advbench"]] = field(default_factory=lambda: ["jailbreakbench", "advbench"])
    """Refusal-phrase lists, each scored with every `phrase_match`."""
    phrase_match: list[Literal["anywhere", "start"]] = field(default_factory=lambda: ["anywhere", "start"])
    """Where a phrase must occur."""
    tuned_phrases: list[Literal["jailbreakbench", "advbench", "jailbreakbench+advbench"]] = field(default_factory=list)
    """Starting lists to tune on each training file (`lit_align.eval.phrase_tuning.tune_phrases`:
    greedy additions of the training refusals' n-grams and removals, matched anywhere, case-insensitively)
    and test on every other file."""
    tune_min_gain: int = 3
    """A tuning edit must fix at least this many more training rows than it breaks."""
    tune_min_support: int = 3
    """A candidate n-gram must occur in at least this many training refusals."""
    probes: list[ProbeJudgeConfig] = field(default_factory=list)
    """Learned refusal probes, trained on one file and tested on the others."""
    llm_judge: Optional[str] = None
    """A chat model asked whether each response refuses (at its threshold 0.5, and with a threshold fitted on the training file)."""
    llm_judge_prompt: str = DEFAULT_JUDGE_PROMPT
    """The LLM judge's question, with {prompt} and {response}."""
    shadow: Optional[str] = None
    """An SRMIR shadow manifest: its reward, thresholded at a cut fitted on the training file."""
    shadow_strategy: Literal["linear", "categorized"] = "linear"
    """How the shadow models combine (categorized: XSTest types go to the prompt classifier)."""
    reward: Optional[str] = None
    """A reward source `package.module:function`, thresholded like the shadow reward."""
    batch_size: int = 8
    """Batch size of the model-based judges and of feature extraction."""


# ---------------------------------------------------------------------------- backbones
def load_feature_backbone(spec: str, dtype: str = "float32", device: str = "cpu"):
    """(model, tokenizer) in eval mode whose hidden states a probe reads: a causal LM through
    `load_for_eval`, an encoder (the `all-minilm-l6-v2` alias, any non-causal HF model) through
    `AutoModel` with the plain chat template of reward backbones."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    from lit_align.eval.evaluate import load_for_eval
    from lit_align.models import DTYPES, PolicyConfig, resolve_name
    from lit_align.modules.reward import prepare_tokenizer, resolve_backbone

    path = resolve_name(resolve_backbone(PolicyConfig(name_or_path=spec)).name_or_path)
    architectures = getattr(AutoConfig.from_pretrained(path), "architectures", None) or []
    if any(a.endswith("ForCausalLM") for a in architectures):
        return load_for_eval(spec, dtype, device)
    model = AutoModel.from_pretrained(path, dtype=DTYPES[dtype]).to(device).eval()
    return model, prepare_tokenizer(AutoTokenizer.from_pretrained(path))


# ---------------------------------------------------------------------------- scoring
def score(rows: list[dict], refused: list, index: torch.Tensor, level: float) -> dict:
    """Scores of one judge's verdicts on one file's rows (see `binary_report`)."""
    if any(v is None for v in refused):
        raise ValueError("a judge gave no verdict for some rows; every labelled row needs one")
    out = binary_report([r["refusal"] for r in rows], refused, index, level)
    out["by_label"] = label_breakdown([r["label"] for r in rows], refused)
    return out


def human_agreement(rows: list[dict], partial_refusal: str, index: torch.Tensor, level: float) -> Optional[dict]:
    """Annotator 2 scored against annotator 1 (binary, like a judge) and their 3-label agreement."""
    pairs = [r["annotations"] for r in rows if "annotations" in r]
    if len(pairs) != len(rows):
        return None
    first = [is_refusal(a, partial_refusal) for a, _ in pairs]
    second = [is_refusal(b, partial_refusal) for _, b in pairs]
    out = binary_report(first, second, index, level)
    out["three_label_agreement"] = sum(a == b for a, b in pairs) / len(pairs)
    return out


def _entry(judge: str, train: Optional[str], test: str, result: dict, **details) -> dict:
    return {"judge": judge, "train": train, "test": test, **result, "details": details}


def _cached(judge, rows: list[dict], cache: Path, key: str) -> Verdicts:
    """A model-based judge's verdicts on `rows`, stored under `cache` with `key` (re-runs reuse them)."""
    digest = hashlib.sha256(json.dumps([key, [(r["prompt"], r["completion"]) for r in rows]]).encode()).hexdigest()[:24]
    if cache.is_file():
        stored = json.loads(cache.read_text())
        if stored.get("key") == digest:
            log.info("reusing cached verdicts %s", cache)
            return Verdicts(**stored["verdicts"])
    verdicts = judge([r["prompt"] for r in rows], [r["completion"] for r in rows], category=[r["type"] for r in rows])
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({"key": digest, "verdicts": verdicts.__dict__}))
    return verdicts


def _thresholded(name: str, values: dict[str, list], data: dict, index: dict, level: float) -> list[dict]:
    """Score judges: a cut on the score fitted on each training file, tested on every other file."""
    out = []
    for train in data:
        t, sign = fit_threshold(values[train], [r["refusal"] for r in data[train]])
        for test in data:
            if test != train:
                refused = [sign * (v - t) > 0 for v in values[test]]
                out.append(_entry(f"{name} (fitted cut)", train, test, score(data[test], refused, index[test], level), threshold=t, sign=sign))
    return out


def _probe_entries(cfg: ProbeJudgeConfig, model, tok, data: dict, index: dict, level: float, out: Path, fit_kw: dict) -> list[dict]:
    entries = []
    for train, rows in data.items():
        judge = ProbeRefusalJudge.fit(
            model, tok, [r["prompt"] for r in rows], [r["completion"] for r in rows], [r["refusal"] for r in rows],
            kind=cfg.kind, layers=cfg.layers, pooling=cfg.pooling, threshold=cfg.threshold, name=cfg.label, **fit_kw,
        )  # fmt: skip
        path = judge.probe.save(out / "probes" / f"{_safe(cfg.label)}__{_safe(train)}.safetensors")
        for test, test_rows in data.items():
            if test == train:
                continue
            v = judge([r["prompt"] for r in test_rows], [r["completion"] for r in test_rows])
            cv = judge.layer_cv
            entries.append(_entry(cfg.label, train, test, score(test_rows, v.refused, index[test], level),
                                  layers=judge.probe.layers, probe=str(path),
                                  train_cv_accuracy=max(cv.values()) if cv else None, layer_cv=cv))  # fmt: skip
    return entries


# ---------------------------------------------------------------------------- the command
def check_arguments(files: list[LabelledFile], judges: AccuracyJudgesConfig, folds: int, num_resamples: int) -> None:
    """Refuse at set-up what would fail later or silently do nothing."""
    if not files:
        raise ValueError("judge-accuracy: `files` is empty; give labelled completion files")
    names = [f.label for f in files]
    if len(set(names)) != len(names):
        raise ValueError(f"judge-accuracy: file names {names} repeat; give each a `name`")
    if judges.probes or judges.shadow or judges.reward or judges.tuned_phrases:
        if len(files) < 2:
            raise ValueError("judge-accuracy: learned judges (probes, shadow, reward, tuned_phrases) train on one file and "
                             "test on another; give at least two files or drop them")  # fmt: skip
    unused = [(judges.shadow_strategy != "linear" and not judges.shadow, "judges.shadow_strategy needs judges.shadow"),
              (judges.llm_judge_prompt != DEFAULT_JUDGE_PROMPT and not judges.llm_judge, "judges.llm_judge_prompt needs judges.llm_judge"),
              (bool(judges.phrases) and not judges.phrase_match, "judges.phrases needs at least one judges.phrase_match"),
              ((judges.tune_min_gain, judges.tune_min_support) != (3, 3) and not judges.tuned_phrases,
               "judges.tune_min_gain / tune_min_support need judges.tuned_phrases"),
              (min(judges.tune_min_gain, judges.tune_min_support) < 1, "judges.tune_min_gain and tune_min_support must be ≥ 1")]  # fmt: skip
    for bad, message in unused:
        if bad:
            raise ValueError(f"judge-accuracy: {message}")
    if not ((judges.phrases and judges.phrase_match) or judges.tuned_phrases or judges.probes or judges.llm_judge
            or judges.shadow or judges.reward):
        raise ValueError("judge-accuracy: no judge to score; set judges.phrases (with judges.phrase_match), tuned_phrases, "
                         "probes, llm_judge, shadow or reward")  # fmt: skip
    for p in judges.probes:
        if not 0 < p.threshold < 1:
            raise ValueError(f"judge-accuracy: probe {p.label!r} threshold={p.threshold}: a probability in (0, 1)")
    if judges.probes and folds < 2:
        raise ValueError(f"judge-accuracy: folds={folds}; the layer choice needs at least 2 cross-validation folds")
    if num_resamples < 1:
        raise ValueError(f"judge-accuracy: num_resamples={num_resamples}; the intervals need at least 1 resample")


def judge_accuracy(
    files: list[LabelledFile],
    out_dir: str = "runs/judge_accuracy",
    judges: AccuracyJudgesConfig = AccuracyJudgesConfig(),  # noqa: B008 (read-only default)
    partial_refusal: Literal["refusal", "compliance"] = "refusal",
    on_bad_rows: Literal["error", "skip"] = "error",
    folds: int = 5,
    epochs: int = 50,
    seed: int = 0,
    num_resamples: int = 1000,
    confidence_level: float = 0.95,
    cache_dir: Optional[str] = None,
    dtype: str = "float32",
    device: str = "cpu",
    progress: bool = True,
) -> dict:
    """Score refusal judges against human labels on labelled completions (no generation).

    Args:
        files: Labelled completion files, e.g. {path: ../shared/data/xstest_completions/gpt4.csv, name: gpt4}.
            Learned judges train on one and are tested on each other one (never within one file).
        out_dir: Where report.json, report.md, trained probes and cached verdicts go.
        judges: Which judges to score.
        partial_refusal: Where a human `3_partial_refusal` goes in the binary target (XSTest: refusal).
        on_bad_rows: A row with an empty prompt or completion or an unknown label: stop naming
            file, row and field ("error"), or skip it and count it ("skip").
        folds: Cross-validation folds (within the training file) for a probe's layer choice.
        epochs: Probe training epochs (Adam, lr 1e-3, weight decay 0.01).
        seed: Seed of probe training, folds and bootstrap.
        num_resamples: Bootstrap resamples of the rows.
        confidence_level: Level of the intervals.
        cache_dir: Hidden-state feature cache; None: the lit_align cache.
        dtype: Dtype of the backbones and the LLM judge.
        device: "cpu", "cuda", ...
        progress: Show progress bars.
    """
    check_arguments(files, judges, folds, num_resamples)
    out = Path(out_dir)
    loaded = {f.label: load_labelled_counted(f, partial_refusal, on_bad_rows) for f in files}
    data = {n: rows for n, (rows, _) in loaded.items()}
    index = {n: resample_index(len(rows), num_resamples, seed) for n, rows in data.items()}
    lvl = confidence_level
    report: dict = {"meta": {"files": {f.label: f.path for f in files}, "n": {n: len(r) for n, r in data.items()},
                             "skipped_rows": {n: skipped for n, (_, skipped) in loaded.items()},
                             "partial_refusal": partial_refusal, "num_resamples": num_resamples,
                             "confidence_level": lvl, "seed": seed},
                    "human": {n: human_agreement(rows, partial_refusal, index[n], lvl) for n, rows in data.items()}}  # fmt: skip
    fit_kw = dict(folds=folds, epochs=epochs, seed=seed, batch_size=judges.batch_size, cache_dir=cache_dir, progress=progress)
    report["judges"] = run_judges(judges, data, index, lvl, out, fit_kw, dtype, device)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(to_jsonable(report), indent=1))
    (out / "report.md").write_text(markdown(report))
    print(f"lit-align judge-accuracy: report in {out / 'report.md'}")
    return to_jsonable(report)


def run_judges(judges: AccuracyJudgesConfig, data: dict, index: dict, lvl: float, out: Path, fit_kw: dict,
               dtype: str = "float32", device: str = "cpu") -> list[dict]:  # fmt: skip
    """Every configured judge scored on `data` (file -> rows): fixed judges on each file, learned
    ones trained on each file and tested on every other one."""
    entries = []
    for phrases in judges.phrases:
        for match in judges.phrase_match:
            judge = RefusalPhraseJudge(phrases, match=match)
            for n, rows in data.items():
                entries.append(_entry(f"phrases/{phrases}/{match}", None, n, score(rows, [judge.is_refusal(r["completion"]) for r in rows], index[n], lvl)))
    entries += _tuned_phrase_entries(judges, data, index, lvl)
    models: dict[str, tuple] = {}  # one load per backbone (the LLM judge and a probe may share it)

    def backbone(spec: str):
        if spec not in models:
            models[spec] = load_feature_backbone(spec, dtype, device)
        return models[spec]

    if judges.llm_judge:
        model, tok = backbone(judges.llm_judge)
        judge = LLMJudge(model, tok, judges.llm_judge_prompt, batch_size=judges.batch_size)
        key = f"llm:{judges.llm_judge}:{judges.llm_judge_prompt}"
        verdicts = {n: _cached(judge, rows, out / "cache" / f"llm__{_safe(n)}.json", key) for n, rows in data.items()}
        for n, rows in data.items():
            entries.append(_entry("llm", None, n, score(rows, verdicts[n].refused, index[n], lvl), threshold=judge.threshold))
        entries += _thresholded("llm", {n: v.confidence for n, v in verdicts.items()}, data, index, lvl)
    for name, source in (("shadow", judges.shadow), ("reward", judges.reward)):
        if source:
            judge = _score_judge(name, source, judges)
            key = f"{name}:{source}:{judges.shadow_strategy}"
            values = {n: _cached(judge, rows, out / "cache" / f"{name}__{_safe(n)}.json", key).score for n, rows in data.items()}
            entries += _thresholded(name, values, data, index, lvl)
    for cfg in judges.probes:
        model, tok = backbone(cfg.backbone)
        entries += _probe_entries(cfg, model, tok, data, index, lvl, out, fit_kw)
    return entries


def _tuned_phrase_entries(judges: AccuracyJudgesConfig, data: dict, index: dict, lvl: float) -> list[dict]:
    """Phrase lists tuned on each training file's labels, scored on every other file."""
    entries = []
    for start in judges.tuned_phrases:
        base = [p for name in start.split("+") for p in PHRASE_LISTS[name]]
        for train, rows in data.items():
            tuned = tune_phrases([r["completion"] for r in rows], [r["refusal"] for r in rows], base,
                                 min_support=judges.tune_min_support, min_gain=judges.tune_min_gain)  # fmt: skip
            judge = RefusalPhraseJudge(tuned.phrases, match="anywhere", case_sensitive=False)
            for test, test_rows in data.items():
                if test != train:
                    refused = [judge.is_refusal(r["completion"]) for r in test_rows]
                    entries.append(_entry(f"phrases/tuned-{start}/anywhere", train, test, score(test_rows, refused, index[test], lvl),
                                          phrases=tuned.phrases, steps=tuned.steps, start_errors=tuned.start_errors))  # fmt: skip
    return entries


def _score_judge(name: str, source: str, cfg: AccuracyJudgesConfig):
    if name == "shadow":
        from lit_align.srmir.ensemble import ShadowRewardEnsemble

        return RewardJudge(ShadowRewardEnsemble(source, strategy=cfg.shadow_strategy, batch_size=cfg.batch_size), name="shadow")
    return RewardJudge(source, name="reward")


def _safe(name: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


# ---------------------------------------------------------------------------- report
def _ci(e) -> str:
    return "–" if e is None or e.get("value") is None else f"{e['value']:.3f} [{e['low']:.3f}, {e['high']:.3f}]"


def markdown(report: dict) -> str:
    """report.md: the human ceiling, one row per judge × (train →) test file, confusion matrices."""
    report = to_jsonable(report)
    meta = report["meta"]
    out = ["# Judge accuracy against human labels", ""]
    skipped = {n: s for n, s in meta.get("skipped_rows", {}).items() if s}
    out += [f"- files: " + ", ".join(f"`{n}` ({meta['n'][n]} rows)" for n in meta["files"])
            + (f"; bad rows skipped: {skipped}" if skipped else ""),
            f"- binary target: refusal = full refusal + partial refusal" if meta["partial_refusal"] == "refusal"
            else "- binary target: refusal = full refusal only (partial refusals count as compliance)",
            f"- {100 * meta['confidence_level']:.0f}% percentile bootstrap over rows, {meta['num_resamples']} resamples, seed {meta['seed']}",
            ""]  # fmt: skip
    out += ["## Human agreement (the ceiling)", "", "| file | annotator 2 vs 1: accuracy | kappa | 3-label agreement |", "|---|---|---|---|"]
    for n, h in report["human"].items():
        out.append(f"| {n} | {_ci(h['accuracy'])} | {_ci(h['kappa'])} | {h['three_label_agreement']:.3f} |" if h else f"| {n} | – | – | – |")
    out += ["", "## Judges", "", "| judge | train → test | accuracy | precision | recall | F1 | kappa |", "|---|---|---|---|---|---|---|"]
    for e in report["judges"]:
        where = f"{e['train']} → {e['test']}" if e["train"] else f"(none) → {e['test']}"
        out.append(f"| {e['judge']} | {where} | " + " | ".join(_ci(e[k]) for k in ("accuracy", "precision", "recall", "f1", "kappa")) + " |")
    out += ["", "## Confusion matrices (rows: human, columns: judge) and the three human labels", "",
            "| judge | train → test | human compliance: judge C / R | human refusal: judge C / R | "
            "1_full_compliance → R | 2_full_refusal → R | 3_partial_refusal → R |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for e in report["judges"]:
        c, b = e["confusion"], e["by_label"]
        cells = [f"{b[k]['judge_refusal']}/{sum(b[k].values())}" if k in b else "–"
                 for k in ("1_full_compliance", "2_full_refusal", "3_partial_refusal")]  # fmt: skip
        out.append(f"| {e['judge']} | {e['train'] or '(none)'} → {e['test']} | "
                   f"{c['human_compliance']['judge_compliance']} / {c['human_compliance']['judge_refusal']} | "
                   f"{c['human_refusal']['judge_compliance']} / {c['human_refusal']['judge_refusal']} | " + " | ".join(cells) + " |")  # fmt: skip
    return "\n".join(out) + "\n"
