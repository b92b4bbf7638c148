"""`ConfidenceReRanker`: re-rank preference pairs by probe confidence (paper A, SPEC A2).

DPOModule scores chosen and rejected with the probe on its own forward's hidden states and
calls the re-ranker with those scores; the decision goes into the batch for the loss:

* `soft` (paper default): γ clamped at ≥ 0.5; no pair flipped or dropped.
* `flip`: pairs with γ_i < 0.5 swap chosen/rejected; their confidence becomes 1 − γ_i.
* `drop`: pairs with γ_i < `drop_threshold` get `pair_keep = False`.

Under every policy the written `pair_confidence` is ≥ 0.5: it is the weight of the label as
the pair is now oriented. With `granularity="batch"` one γ (the paper's batch confidence)
applies to every pair, so `flip`/`drop` act on whole batches.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from lit_align.data.rerank import ReRanker
from lit_align.probes.confidence import batch_confidence, pair_confidence


class ConfidenceReRanker(ReRanker):
    """Weights, flips or drops pairs by the probe's confidence in their labels."""

    def __init__(
        self,
        policy: Literal["soft", "flip", "drop"] = "soft",
        granularity: Literal["batch", "pair"] = "batch",
        alpha: float = 7.5,
        drop_threshold: float = 0.5,
    ):
        """
        Args:
            policy: soft (weight by γ ≥ 0.5), flip (swap pairs with γ < 0.5), drop (mask pairs with γ < drop_threshold).
            granularity: batch (the paper's one γ per batch) or pair (γ_i per pair).
            alpha: sharpness α of the confidence sigmoid (paper: 7.5).
            drop_threshold: pairs with γ below this are dropped under the drop policy.
        """
        if policy not in ("soft", "flip", "drop"):
            raise ValueError(f"ConfidenceReRanker policy={policy!r}: choose soft, flip or drop")
        if granularity not in ("batch", "pair"):
            raise ValueError(f"ConfidenceReRanker granularity={granularity!r}: choose batch or pair")
        self.policy = policy
        self.granularity = granularity
        self.alpha = float(alpha)
        self.drop_threshold = float(drop_threshold)
        self.totals = {"pairs": 0, "flipped": 0, "dropped": 0, "probe_correct": 0, "batches": 0}

    def confidence(self, chosen_scores: Tensor, rejected_scores: Tensor) -> Tensor:
        """Unclamped γ per pair [B] (the batch value repeated under batch granularity)."""
        if self.granularity == "pair":
            return pair_confidence(chosen_scores, rejected_scores, self.alpha)
        gamma = batch_confidence(chosen_scores, rejected_scores, self.alpha, floor=None)
        return gamma.expand(chosen_scores.shape[0]).clone()

    @torch.no_grad()
    def decide(self, batch: dict, chosen_scores: Tensor, rejected_scores: Tensor) -> dict:
        s_c, s_r = chosen_scores.detach().float().view(-1), rejected_scores.detach().float().view(-1)
        gamma = self.confidence(s_c, s_r)
        flip = torch.zeros_like(gamma, dtype=torch.bool)
        keep = torch.ones_like(gamma, dtype=torch.bool)
        if self.policy == "flip":
            flip = gamma < 0.5
            gamma = torch.where(flip, 1.0 - gamma, gamma)
        elif self.policy == "drop":
            keep = gamma >= self.drop_threshold
        batch["pair_confidence"] = gamma.clamp(min=0.5)
        batch["pair_flip"] = flip
        batch["pair_keep"] = keep
        batch["rerank_stats"] = self._update_stats(s_c, s_r, batch["pair_confidence"], flip, keep)
        return batch

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
            f"ConfidenceReRanker(policy={self.policy!r}, granularity={self.granularity!r}, "
            f"alpha={self.alpha}, drop_threshold={self.drop_threshold})"
        )


__all__ = ["ConfidenceReRanker"]
