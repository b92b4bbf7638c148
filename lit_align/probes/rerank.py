"""`ConfidenceReRanker`: re-rank preference pairs by probe confidence (paper A, SPEC A2).

DPOModule scores chosen and rejected with the probe on its own forward's hidden states and
calls the re-ranker with those scores; the returned `PairDecision` goes to the loss:

* `soft` (paper default): γ clamped at ≥ 0.5; no pair flipped or dropped.
* `flip`: pairs with γ_i < 0.5 swap chosen/rejected; their confidence becomes 1 − γ_i.
* `drop`: pairs with γ_i < `drop_threshold` get `keep = False`.

Under every action the decision's `confidence` is ≥ 0.5: it is the weight of the label as
the pair is now oriented. With `granularity="batch"` one γ (the paper's batch confidence)
applies to every pair, so `flip`/`drop` act on whole batches.
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
from torch import Tensor

from lit_align.checks import ConfigError, check_range
from lit_align.data.rerank import PairDecision, ReRanker
from lit_align.probes.confidence import batch_confidence, pair_confidence


class ConfidenceReRanker(ReRanker):
    """Weights, flips or drops pairs by the probe's confidence in their labels."""

    def __init__(
        self,
        action: Literal["soft", "flip", "drop"] = "soft",
        granularity: Literal["batch", "pair"] = "batch",
        alpha: float = 7.5,
        drop_threshold: Optional[float] = None,
        policy: Optional[str] = None,
    ):
        """
        Args:
            action: soft (weight by γ ≥ 0.5), flip (swap pairs with γ < 0.5), drop (mask pairs with γ < drop_threshold).
            granularity: batch (the paper's one γ per batch) or pair (γ_i per pair).
            alpha: sharpness α of the confidence sigmoid (paper: 7.5).
            drop_threshold: pairs with γ below this are dropped; only with action=drop (default 0.5).
            policy: the former name of `action`; setting it is an error (in lit_align "policy" is the trained model).
        """
        if policy is not None:
            raise ConfigError(
                f"{type(self).__name__}(policy={policy!r}): the argument is now called `action` "
                f"(the policy is the trained model); write action: {policy}"
            )
        if action not in ("soft", "flip", "drop"):
            raise ConfigError(f"{type(self).__name__} action={action!r}: choose soft, flip or drop")
        if granularity not in ("batch", "pair"):
            raise ConfigError(f"{type(self).__name__} granularity={granularity!r}: choose batch or pair")
        check_range(f"{type(self).__name__}.alpha", alpha, 0, low_open=True,
                    why="α ≤ 0 inverts or flattens the probe's confidence")
        check_range(f"{type(self).__name__}.drop_threshold", drop_threshold, 0, 1, low_open=True,
                    why="a confidence γ below it drops the pair; γ lies in [0, 1]")
        if drop_threshold is not None and action != "drop":
            raise ConfigError(
                f"{type(self).__name__}(action={action!r}, drop_threshold={drop_threshold}): only action=drop "
                "uses drop_threshold; remove it or set action: drop"
            )
        self.action = action
        self.granularity = granularity
        self.alpha = float(alpha)
        self.drop_threshold = 0.5 if drop_threshold is None else float(drop_threshold)
        self.totals = {"pairs": 0, "flipped": 0, "dropped": 0, "probe_correct": 0, "batches": 0}

    def effects(self) -> frozenset[str]:
        return frozenset({"soft": ("confidence",), "flip": ("flip", "confidence"), "drop": ("keep", "confidence")}[self.action])

    def confidence(self, chosen_scores: Tensor, rejected_scores: Tensor) -> Tensor:
        """Unclamped γ per pair [B] (the batch value repeated under batch granularity)."""
        if self.granularity == "pair":
            return pair_confidence(chosen_scores, rejected_scores, self.alpha)
        gamma = batch_confidence(chosen_scores, rejected_scores, self.alpha, floor=None)
        return gamma.expand(chosen_scores.shape[0]).clone()

    @torch.no_grad()
    def decide(self, batch: dict, chosen_scores: Tensor, rejected_scores: Tensor) -> PairDecision:
        s_c, s_r = chosen_scores.detach().float().view(-1), rejected_scores.detach().float().view(-1)
        gamma = self.confidence(s_c, s_r)
        flip = torch.zeros_like(gamma, dtype=torch.bool)
        keep = torch.ones_like(gamma, dtype=torch.bool)
        if self.action == "flip":
            flip = gamma < 0.5
            gamma = torch.where(flip, 1.0 - gamma, gamma)
        elif self.action == "drop":
            keep = gamma >= self.drop_threshold
        gamma = gamma.clamp(min=0.5)
        return PairDecision(gamma, flip, keep, self._update_stats(s_c, s_r, gamma, flip, keep))

    def _update_stats(self, s_c: Tensor, s_r: Tensor, gamma: Tensor, flip: Tensor, keep: Tensor) -> dict:
        n = gamma.numel()
        correct = int((s_c > s_r).sum())
        t = self.totals
        t["pairs"] += n
        t["flipped"] += int(flip.sum())
        t["dropped"] += int((~keep).sum())
        t["probe_correct"] += correct
        t["batches"] += 1
        return {
            "rerank/confidence_mean": float(gamma.mean()),
            "rerank/flipped_frac": float(flip.float().mean()),
            "rerank/dropped_frac": float((~keep).float().mean()),
            "rerank/probe_accuracy": correct / max(n, 1),
            "rerank/flipped_total": float(t["flipped"]),
            "rerank/dropped_total": float(t["dropped"]),
        }

    def state_dict(self) -> dict:
        return {"totals": dict(self.totals)}

    def load_state_dict(self, state: dict) -> None:
        self.totals.update(state.get("totals", {}))

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(action={self.action!r}, granularity={self.granularity!r}, alpha={self.alpha}"
            + (f", drop_threshold={self.drop_threshold})" if self.action == "drop" else ")")
        )


__all__ = ["ConfidenceReRanker"]
