"""`ShadowRewardEnsemble`: the seven shadow reward models as one reward source (SPEC B2).

* linear:      R(x, y) = Σ_j w_j R_j(x, y), weights uniform (w_j = 1/K) unless configured;
* categorized: R(x, y) = R_{c(x)}(x, y), each prompt scored only by its own category's model.
  A prompt with no category (or one without a model) gets c(x) from the prompt classifier
  trained with the models, else `fallback_category`, else it is an error (never no reward).

It has TRL's reward-function shape, so GRPO takes it as a reward source, and `ShadowReRanker`
uses it to score DPO preference pairs for re-ranking.
"""

from __future__ import annotations

import logging
from typing import Literal, Optional, Sequence

import torch
from torch import Tensor

from lit_align.probes.rerank import ConfidenceReRanker
from lit_align.rewards import check_classifier_categories, prompt_text, route_by_category
from lit_align.srmir.shadow import load_manifest

log = logging.getLogger(__name__)


class ShadowRewardEnsemble:
    """Per-category shadow reward models combined linearly or by category routing.

    Args:
        manifest: `manifest.json` written by `lit-align train-shadow` (or its directory).
        strategy: "linear" (Σ_j w_j R_j) or "categorized" (the prompt's own category's model).
        weights: category -> w_j for "linear"; missing categories get 0. None: uniform 1/K.
        fallback_category: "categorized": the model for prompts whose category is missing or has
            no model and that the classifier does not route (none, or it predicts a category
            without a model).
        classifier: A PromptCategoryClassifier file for such prompts; None: the manifest's.
        use_classifier: Route uncategorised prompts with the classifier (when one exists).
        batch_size: Texts per forward pass.
        max_length: Longest text in tokens.
        name: Metric name (`rewards/{name}/mean` in GRPO).
    """

    def __init__(
        self,
        manifest: str,
        strategy: Literal["linear", "categorized"] = "linear",
        weights: Optional[dict[str, float]] = None,
        fallback_category: Optional[str] = None,
        classifier: Optional[str] = None,
        use_classifier: bool = True,
        batch_size: int = 16,
        max_length: int = 512,
        name: str = "shadow",
    ):
        from lit_align.rewards import SequenceClassifierReward
        from lit_align.srmir.classifier import PromptCategoryClassifier

        if strategy not in ("linear", "categorized"):
            raise ValueError(f"ShadowRewardEnsemble strategy={strategy!r}: choose 'linear' or 'categorized'")
        self.manifest = load_manifest(manifest)
        self.strategy, self.name = strategy, name
        categories = self.manifest["categories"]
        self.models = {
            c: SequenceClassifierReward(entry["path"], name=c, batch_size=batch_size, max_length=max_length)
            for c, entry in categories.items()
        }
        if weights is None:
            weights = {c: 1.0 / len(self.models) for c in self.models}
        unknown = sorted(set(weights) - set(self.models))
        if unknown:
            raise ValueError(f"weights name categories {unknown} that have no model (models: {sorted(self.models)})")
        self.weights = {c: float(weights.get(c, 0.0)) for c in self.models}
        if fallback_category is not None and fallback_category not in self.models:
            raise ValueError(f"fallback_category={fallback_category!r} has no model (models: {sorted(self.models)})")
        self.fallback_category = fallback_category
        path = classifier or self.manifest.get("classifier")
        self.classifier = PromptCategoryClassifier.load(path) if (use_classifier and path) else None
        if self.classifier is not None and strategy == "categorized":
            check_classifier_categories(self.classifier, self.models, fallback_category, "ShadowRewardEnsemble")
        self.last_routes: dict[str, int] = {}

    def to(self, device) -> "ShadowRewardEnsemble":
        for model in self.models.values():
            model.to(device)
        return self

    # ------------------------------------------------------------------ routing
    def route(self, prompts: Sequence, categories: Optional[Sequence[Optional[str]]]) -> list[str]:
        """The model category for every prompt (categorized strategy): its own, else the
        classifier's, else `fallback_category`, else an error (`lit_align.rewards.route_by_category`)."""
        categories = list(categories) if categories is not None else [None] * len(prompts)
        try:
            routes, self.last_routes = route_by_category(prompts, categories, self.models, self.classifier,
                                                         self.fallback_category)
        except ValueError as err:
            raise ValueError(f"ShadowRewardEnsemble({self.manifest['manifest_path']}): {err} (train-shadow "
                             "train_classifier=true writes a classifier; or set fallback_category)") from None
        return routes

    # ------------------------------------------------------------------ scoring
    @torch.no_grad()
    def score(self, prompts: Sequence, completions: Sequence[str], categories: Optional[Sequence] = None) -> Tensor:
        """Rewards [N] (float32, CPU) for (prompt, completion) pairs."""
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        prompts, completions = list(prompts), list(completions)
        if self.strategy == "linear":
            total = torch.zeros(len(completions))
            for c, model in self.models.items():
                if self.weights[c] != 0.0:
                    total += self.weights[c] * torch.tensor(model(prompts, completions))
            return total
        routes = self.route(prompts, categories)
        out = torch.empty(len(completions))
        for c in sorted(set(routes)):
            rows = [i for i, r in enumerate(routes) if r == c]
            out[rows] = torch.tensor(self.models[c]([prompts[i] for i in rows], [completions[i] for i in rows]))
        return out

    def __call__(self, prompts, completions, category=None, **columns) -> list[float]:
        """TRL's reward-function shape; `category` is the dataset's category column."""
        return self.score(prompts, completions, category).tolist()

    def __repr__(self) -> str:
        return f"ShadowRewardEnsemble(strategy={self.strategy!r}, models={sorted(self.models)})"


class ShadowReRanker(ConfidenceReRanker):
    """Re-ranks DPO preference pairs by the shadow ensemble's rewards of chosen and rejected
    (actions and confidence as `ConfidenceReRanker`, with rewards in place of probe scores)."""

    def __init__(self, ensemble: ShadowRewardEnsemble, action: Literal["soft", "flip", "drop"] = "flip",
                 granularity: Literal["batch", "pair"] = "pair", alpha: float = 7.5,
                 drop_threshold: Optional[float] = None, policy: Optional[str] = None):
        super().__init__(action=action, granularity=granularity, alpha=alpha, drop_threshold=drop_threshold,
                         policy=policy)
        self.ensemble = ensemble

    def score(self, batch: dict) -> tuple[Tensor, Tensor]:
        categories = batch.get("category")
        chosen = self.ensemble.score(batch["prompt"], batch["chosen"], categories)
        rejected = self.ensemble.score(batch["prompt"], batch["rejected"], categories)
        device = batch["chosen_input_ids"].device if "chosen_input_ids" in batch else "cpu"
        return chosen.to(device), rejected.to(device)


__all__ = ["ShadowRewardEnsemble", "ShadowReRanker", "prompt_text"]
