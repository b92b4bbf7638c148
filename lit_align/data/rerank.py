"""The re-ranking hook: a pluggable object that may flip, weight or drop preference pairs.

`AlignDataModule` owns one `ReRanker`. A re-ranker that can score pairs on its own (e.g.
`ShadowReRanker`) is called on every training batch the DataModule moves to the device, and
its decision travels in the batch under `DECISION_KEY`; a LightningModule that scores pairs
itself (DPO with a probe on its own hidden states) calls the same object with those scores
and hands the decision straight to its loss. Either way the decision is one `PairDecision`:

* `confidence` γ_i in [½, 1]: the weight of the label "chosen is better" as the pair is now
  oriented (read by the conservative DPO loss);
* `flip`: chosen and rejected swap roles;
* `keep`: the pair takes part in the loss (the loss is the mean over kept pairs).

The base class decides nothing: batches pass through unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Collection, Optional

import torch
from torch import Tensor

from lit_align.checks import ConfigError

DECISION_KEY = "pair_decision"
EFFECTS = ("confidence", "flip", "keep")


@dataclass(frozen=True, eq=False)
class PairDecision:
    """A re-ranker's decision on B preference pairs, carried to the loss.

    Attributes:
        confidence: [B] γ_i ≥ ½, the weight of the label as the pair is now oriented.
        flip: [B] bool, chosen and rejected swap roles.
        keep: [B] bool, the pair takes part in the loss.
        stats: Metrics to log (`rerank/...`), floats.
    """

    confidence: Tensor
    flip: Tensor
    keep: Tensor
    stats: dict = field(default_factory=dict)

    def __post_init__(self):
        shapes = {tuple(t.shape) for t in (self.confidence, self.flip, self.keep)}
        if len(shapes) != 1 or len(next(iter(shapes))) != 1:
            raise ValueError(f"PairDecision: confidence, flip and keep must be [B] tensors of one size, got {shapes}")
        if self.flip.dtype != torch.bool or self.keep.dtype != torch.bool:
            raise ValueError(f"PairDecision: flip and keep must be bool tensors, got {self.flip.dtype}, {self.keep.dtype}")

    def orient(self, chosen: Tensor, rejected: Tensor) -> tuple[Tensor, Tensor]:
        """(chosen, rejected) per-pair values with the flipped pairs' entries exchanged."""
        return torch.where(self.flip, rejected, chosen), torch.where(self.flip, chosen, rejected)

    def mean(self, losses: Tensor) -> Tensor:
        """Mean over kept pairs: Σ_i k_i L_i / max(Σ_i k_i, 1) (0 when every pair is dropped)."""
        keep = self.keep.to(losses.dtype)
        return (losses * keep).sum() / keep.sum().clamp(min=1)


class ReRanker:
    """Identity re-ranker; subclass and override `score`, `decide` and `effects`."""

    def score(self, batch: dict) -> Optional[tuple[Tensor, Tensor]]:
        """Scores `(s_chosen, s_rejected)` for the batch's pairs, or None if this re-ranker
        cannot score on its own (it then waits for a module to pass scores)."""
        return None

    def decide(self, batch: dict, chosen_scores: Tensor, rejected_scores: Tensor) -> Optional[PairDecision]:
        """The decision for the batch's pairs from their scores (None: leave them as they are)."""
        return None

    def effects(self) -> frozenset[str]:
        """Which fields of its decision can change a loss (a subset of `EFFECTS`); empty: none."""
        return frozenset()

    @property
    def needs_scores(self) -> bool:
        """True when this re-ranker decides but cannot score pairs itself (`score` not overridden)."""
        return bool(self.effects()) and type(self).score is ReRanker.score

    def __call__(
        self, batch: dict, chosen_scores: Optional[Tensor] = None, rejected_scores: Optional[Tensor] = None
    ) -> Optional[PairDecision]:
        if chosen_scores is None:
            scores = self.score(batch)
            if scores is None:
                return None
            chosen_scores, rejected_scores = scores
        return self.decide(batch, chosen_scores, rejected_scores)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def check_reranking(
    reranker: ReRanker,
    consumer: str,
    honours: Collection[str],
    has_scores: bool,
    scores_hint: str = "remove data.reranker",
    ignored_hint: str = "remove data.reranker",
) -> None:
    """Refuse, at set-up, a re-ranking set-up in which something would silently do nothing.

    Args:
        reranker: The DataModule's re-ranker.
        consumer: The training module's name, for the message.
        honours: The decision fields its loss reads (a subset of `EFFECTS`).
        has_scores: Whether the module scores pairs itself and passes the scores (a probe).
        scores_hint: What to change when the re-ranker waits for scores the module does not compute.
        ignored_hint: What to change when the module's loss ignores the re-ranker's decision.
    """
    effects = reranker.effects()
    if has_scores and not effects:
        raise ConfigError(
            f"model.probe_path is set but data.reranker ({reranker!r}) decides nothing, so {consumer}'s probe "
            "scores would change no pair: add data.reranker: {class_path: lit_align.ConfidenceReRanker, "
            "init_args: {action: soft}} or remove model.probe_path"
        )
    if has_scores and not reranker.needs_scores:
        raise ConfigError(
            f"data.reranker ({reranker!r}) scores pairs itself, and {consumer}'s probe (model.probe_path) would "
            "replace those scores: remove model.probe_path or use lit_align.ConfidenceReRanker"
        )
    if reranker.needs_scores and not has_scores:
        raise ConfigError(
            f"data.reranker ({reranker!r}) decides from probe scores, which {consumer} does not compute, so no "
            "pair would be re-ranked: " + scores_hint
        )
    if effects and not effects & set(honours):
        raise ConfigError(
            f"data.reranker ({reranker!r}) only sets {sorted(effects)}, which {consumer}'s loss ignores: "
            + ignored_hint
        )


__all__ = ["DECISION_KEY", "EFFECTS", "PairDecision", "ReRanker", "check_reranking"]
