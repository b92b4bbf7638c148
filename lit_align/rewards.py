"""Reward sources for GRPO: anything shaped like TRL's reward functions.

A reward source is called as `source(prompts, completions, **columns) -> list[float | None]`:
`prompts` are chat-message lists, `completions` strings, `columns` the dataset's other
columns as lists (`category`, ...). `None` means "does not apply to this sample"; GRPO then
leaves the sample out of that source's statistics (see `lit_align.losses.grpo`).

Here:
* `resolve_reward_source` turns a config entry ("my_pkg.rewards:length_reward", or an
  already built object such as `ShadowRewardEnsemble`) into a callable and `reward_name`
  names it for the `rewards/{name}/mean` metric;
* `score_completions` runs a list of sources into a `[N, K]` tensor, NaN for None, with
  clear errors for sources that break the contract;
* `refusal_reward`: a plain keyword function, the example for `configs/grpo_function.yaml`;
* `SequenceClassifierReward`: a Hugging Face reward model (scalar head) as a source;
* `CategorizedReward`: route each sample to the source of its own category (SRMIR's
  categorized strategy for any per-category sources; `route_by_category` is the routing,
  shared with `ShadowRewardEnsemble`: own category, else the prompt classifier, else the
  fallback, else an error);
* `ProbeReward`: a paper-A probe reading the policy's own hidden states.

A source that needs the model being trained defines `bind(module)`; GRPOModule calls it
once the policy is loaded. Sources with weights define `to(device)`.
"""

from __future__ import annotations

import importlib
import logging
import math
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Collection, Optional, Sequence

import torch

RewardFunc = Callable[..., Sequence[Optional[float]]]
FALLBACK = "<fallback>"  # the route of samples scored by a CategorizedReward's fallback source

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- naming and loading
def resolve_reward_source(spec: str | RewardFunc) -> RewardFunc:
    """A callable from an import path ("pkg.module:func" or "pkg.module.func") or a callable."""
    if callable(spec):
        return spec
    if not isinstance(spec, str) or not spec:
        raise TypeError(f"reward source {spec!r}: give an import path 'module:function' or a callable object")
    module_name, sep, attr = spec.partition(":")
    if not sep:
        module_name, _, attr = spec.rpartition(".")
    if not module_name or not attr:
        raise ValueError(f"reward source {spec!r}: expected 'package.module:function'")
    try:
        target = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"reward source {spec!r} could not be imported: {err}") from err
    if not callable(target):
        raise TypeError(f"reward source {spec!r} is a {type(target).__name__}, not a function")
    return target


def reward_name(source: RewardFunc) -> str:
    """The metric name: a `name` attribute, else the function or class name."""
    name = getattr(source, "name", None)
    if isinstance(name, str) and name:
        return name
    return getattr(source, "__name__", None) or type(source).__name__


def unique_names(sources: Sequence[RewardFunc]) -> list[str]:
    names, seen = [], {}
    for source in sources:
        base = reward_name(source)
        seen[base] = seen.get(base, 0) + 1
        names.append(base if seen[base] == 1 else f"{base}_{seen[base]}")
    return names


# ---------------------------------------------------------------------------- scoring
def _as_float(value: Any, name: str, i: int) -> float:
    if value is None:
        return math.nan
    if torch.is_tensor(value):
        value = value.item()
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"reward source {name!r} returned {value!r} for sample {i}: expected a number or None") from None
    if math.isnan(out):
        raise ValueError(f"reward source {name!r} returned NaN for sample {i}; return None for 'does not apply'")
    return out


def score_completions(
    sources: Sequence[RewardFunc],
    prompts: list,
    completions: list[str],
    columns: Optional[dict[str, list]] = None,
    names: Optional[list[str]] = None,
) -> torch.Tensor:
    """Rewards `[N, K]` (float32, CPU) of every source for every sample, NaN where a source
    returned None."""
    columns = columns or {}
    names = names or unique_names(sources)
    out = torch.empty(len(completions), len(sources))
    for k, (source, name) in enumerate(zip(sources, names)):
        values = source(prompts=prompts, completions=completions, **columns)
        values = values.tolist() if torch.is_tensor(values) else list(values)
        if len(values) != len(completions):
            raise ValueError(
                f"reward source {name!r} returned {len(values)} rewards for {len(completions)} completions"
            )
        out[:, k] = torch.tensor([_as_float(v, name, i) for i, v in enumerate(values)])
    return out


# ---------------------------------------------------------------------------- a plain-function example
REFUSAL_MARKERS = (
    "i can't", "i cannot", "i can not", "i won't", "i will not", "i'm sorry", "i am sorry", "sorry, but",
    "i'm not able", "i am not able", "i'm unable", "i am unable", "i must decline", "i refuse", "as an ai",
)


def refusal_reward(prompts, completions, **columns) -> list[float]:
    """1.0 when the completion opens with a refusal (a marker in its first 200 characters), else 0.0.

    A verifiable safety reward for sets of harmful prompts. On benign prompts it rewards
    over-refusal, so combine it with a helpfulness reward there."""
    return [float(any(m in c[:200].lower().replace("’", "'") for m in REFUSAL_MARKERS)) for c in completions]


# ---------------------------------------------------------------------------- model-based sources
class SequenceClassifierReward:
    """A Hugging Face sequence-classification reward model: reward = logit 0 of the text
    "chat-templated prompt + completion + EOS", rendered with the reward model's tokenizer.

    Args:
        path: Directory or hub id of an `AutoModelForSequenceClassification` with one label.
        name: Metric name (default: the directory name).
        batch_size: Texts per forward pass.
        max_length: Longest text in tokens (the end is kept).
    """

    def __init__(self, path: str, name: Optional[str] = None, batch_size: int = 16, max_length: int = 1024):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.name = name or Path(path).name
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForSequenceClassification.from_pretrained(path).eval().requires_grad_(False)
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.batch_size, self.max_length = batch_size, max_length

    def to(self, device) -> "SequenceClassifierReward":
        self.model.to(device)
        return self

    @torch.no_grad()
    def __call__(self, prompts, completions, **columns) -> list[float]:
        from lit_align.probes.features import encode_texts

        ids = encode_texts(self.tokenizer, prompts, completions, max_length=self.max_length)
        device = next(self.model.parameters()).device
        scores: list[float] = []
        for start in range(0, len(ids), self.batch_size):
            rows = ids[start : start + self.batch_size]
            width = max(len(r) for r in rows)
            input_ids = torch.full((len(rows), width), self.tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros_like(input_ids)
            for i, r in enumerate(rows):
                input_ids[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), 1
            logits = self.model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits
            scores += logits[:, 0].float().cpu().tolist()
        return scores


def prompt_text(prompt) -> str:
    """The text a prompt classifier reads: a string, or the last user turn of a message list."""
    if isinstance(prompt, str):
        return prompt
    users = [m["content"] for m in prompt if m.get("role") == "user"]
    return users[-1] if users else (prompt[-1]["content"] if prompt else "")


def route_by_category(
    prompts: Sequence, categories: Sequence, known: Collection[str], classifier=None, fallback: Optional[str] = None,
) -> tuple[list[str], dict[str, int]]:
    """SRMIR's categorized routing: each sample goes to its own category when that is `known`;
    else to the category `classifier.predict` gives its prompt, when that is known; else to
    `fallback`. A sample none of these routes is a `ValueError` naming its category, never a
    silent "no reward". Returns the routes and their counts (`<classifier>` / `<fallback>`
    count the samples routed that way)."""
    if len(categories) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(categories)} categories")
    routes = [c if c in known else None for c in categories]
    unknown = [i for i, r in enumerate(routes) if r is None]
    classified = 0
    if unknown and classifier is not None:
        for i, c in zip(unknown, classifier.predict([prompt_text(prompts[i]) for i in unknown])):
            if c in known:
                routes[i] = c
                classified += 1
    left = [i for i, r in enumerate(routes) if r is None]
    if left and fallback is None:
        seen = sorted({repr(categories[i]) for i in left})
        how = "the classifier's predictions for them have no source either; " if classifier is not None else ""
        raise ValueError(
            f"{len(left)} samples have a category with no reward source ({', '.join(seen)}; sources: "
            f"{sorted(known)}); {how}set a fallback, or a prompt classifier, so that every sample is scored"
        )
    for i in left:
        routes[i] = fallback
    counts = dict(Counter(routes))
    if classified:
        counts["<classifier>"] = classified
    if left:
        counts[FALLBACK] = len(left)
    return routes, counts


def check_classifier_categories(classifier, known: Collection[str], fallback, owner: str) -> None:
    """At set-up: a classifier that can predict a category with no source needs a fallback."""
    orphans = sorted(set(classifier.categories) - set(known))
    if orphans and fallback is None:
        raise ValueError(
            f"{owner}: the prompt classifier predicts {orphans}, which have no reward source "
            f"(sources: {sorted(known)}); set a fallback or use a classifier trained on these categories"
        )


class CategorizedReward:
    """Score each sample only with the source of its own category (SRMIR "categorized").

    A sample whose category has no source (missing, `other`, a typo) is routed as the method
    says: to the category the prompt classifier predicts, else to `fallback`; with neither, the
    call stops with an error naming the category (`route_by_category`). Each source is called
    once, on its own samples only. `last_routes` counts the routing of the last call.

    Args:
        sources: category -> reward source (import path or object).
        fallback: Source for samples the classifier does not route (e.g. a linear ensemble).
        classifier: A prompt -> category classifier file (`lit_align.srmir.classifier`, e.g. the
            `category_classifier.pt` that `lit-align train-shadow` writes) for samples whose
            category has no source.
        category_column: The column holding each sample's category (a batch without it is
            routed by the classifier / fallback, logged).
        name: Metric name.
    """

    def __init__(
        self,
        sources: dict[str, str | RewardFunc],
        fallback: Optional[str | RewardFunc] = None,
        classifier: Optional[str] = None,
        category_column: str = "category",
        name: str = "categorized",
    ):
        if not sources:
            raise ValueError("CategorizedReward needs at least one category source")
        self.sources = {category: resolve_reward_source(s) for category, s in sources.items()}
        self.fallback = resolve_reward_source(fallback) if fallback is not None else None
        self.classifier = None
        if classifier is not None:
            from lit_align.srmir.classifier import PromptCategoryClassifier

            self.classifier = PromptCategoryClassifier.load(classifier)
            check_classifier_categories(self.classifier, self.sources, fallback, "CategorizedReward")
        self.category_column, self.name = category_column, name
        self.last_routes: dict[str, int] = {}

    def _all(self) -> list:
        return [*self.sources.values(), *([self.fallback] if self.fallback is not None else [])]

    def to(self, device) -> "CategorizedReward":
        for source in self._all():
            if hasattr(source, "to"):
                source.to(device)
        return self

    def bind(self, module) -> None:
        for source in self._all():
            if hasattr(source, "bind"):
                source.bind(module)

    def __call__(self, prompts, completions, **columns) -> list[Optional[float]]:
        categories = columns.get(self.category_column)
        if categories is None:
            if self.classifier is None and self.fallback is None:
                raise ValueError(
                    f"CategorizedReward routes on column {self.category_column!r}, which the batch does not have "
                    f"(columns: {sorted(columns)}), and has no classifier or fallback for uncategorised prompts"
                )
            log.warning("CategorizedReward: no column %r in the batch; routing all %d samples by classifier/fallback",
                        self.category_column, len(completions))
            categories = [None] * len(completions)
        routes, self.last_routes = route_by_category(prompts, categories, self.sources, self.classifier,
                                                     FALLBACK if self.fallback is not None else None)
        out: list[Optional[float]] = [None] * len(completions)
        for key in dict.fromkeys(routes):
            rows = [i for i, r in enumerate(routes) if r == key]
            source = self.fallback if key == FALLBACK else self.sources[key]
            sub_columns = {c: [v[i] for i in rows] for c, v in columns.items()}
            values = source(prompts=[prompts[i] for i in rows], completions=[completions[i] for i in rows], **sub_columns)
            for i, value in zip(rows, values):
                out[i] = value
        return out


class ProbeReward:
    """A paper-A probe as a reward: score = probe(hidden states of prompt + completion + EOS).

    The hidden states come from the policy being trained (bound by GRPOModule), or from its
    frozen reference with `frozen=True`, read with the layers and pooling the probe was
    trained on; rendering follows `lit_align.probes.features.encode_texts`, as in probe training.

    Args:
        probe_path: A probe file saved by `lit_align.probes` (`Probe.save`).
        frozen: Read the reference model (the frozen copy, or the LoRA base with adapters
            disabled) instead of the policy, so the policy cannot move the features it is scored on.
        sigmoid: Return σ(score) in (0, 1) (the probe's P(safe)) instead of the raw score.
        batch_size: Texts per forward pass.
        max_length: Longest text in tokens (the end is kept, where the probe reads).
        name: Metric name.
    """

    def __init__(
        self,
        probe_path: str,
        frozen: bool = False,
        sigmoid: bool = False,
        batch_size: int = 16,
        max_length: int = 1024,
        name: str = "probe",
    ):
        self.probe_path, self.frozen, self.sigmoid = probe_path, frozen, sigmoid
        self.batch_size, self.max_length, self.name = batch_size, max_length, name
        self.model = self.tokenizer = self.probe = None

    def bind(self, module) -> None:
        """Read hidden states from `module.policy` (or its reference), tokenised with `module.tokenizer`."""
        from contextlib import nullcontext

        from lit_align.probes import load_probe
        from lit_align.probes.features import num_hidden_layers

        self.model, self.tokenizer, self.context = module.policy, module.tokenizer, nullcontext
        if self.frozen and getattr(module, "reference", None) is not None:
            self.model = module.reference
        elif self.frozen and hasattr(module.policy, "disable_adapter"):
            self.context = module.policy.disable_adapter
        elif self.frozen:
            raise ValueError("ProbeReward(frozen=True) needs a reference model: set model.beta > 0 or use LoRA")
        self.probe = load_probe(
            self.probe_path,
            expected_hidden_size=self.model.config.hidden_size,
            expected_num_layers=num_hidden_layers(self.model),
        ).eval()
        self.probe.requires_grad_(False)

    def to(self, device) -> "ProbeReward":
        if self.probe is not None:
            self.probe.to(device)
        return self

    @torch.no_grad()
    def __call__(self, prompts, completions, **columns) -> list[float]:
        from lit_align.probes.features import encode_texts, extract_features

        if self.probe is None:
            raise RuntimeError("ProbeReward is not bound to a model: GRPOModule binds it when the policy is loaded")
        ids = encode_texts(self.tokenizer, prompts, completions, max_length=self.max_length)
        with self.context():
            features = extract_features(
                self.model, ids, self.probe.layers, self.probe.pooling, self.batch_size,
                pad_token_id=self.tokenizer.pad_token_id, progress=False,
            )
        scores = self.probe(features.to(self.probe.feature_mean.device))
        return (torch.sigmoid(scores) if self.sigmoid else scores).float().cpu().tolist()


__all__ = [
    "CategorizedReward",
    "ProbeReward",
    "RewardFunc",
    "SequenceClassifierReward",
    "prompt_text",
    "refusal_reward",
    "reward_name",
    "resolve_reward_source",
    "route_by_category",
    "score_completions",
]
