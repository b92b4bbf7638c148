"""The re-ranking hook: a pluggable object that may flip, weight or drop preference pairs.

`AlignDataModule` owns one `ReRanker` and calls it on every training batch it moves to the
device; a LightningModule that scores pairs itself (DPO with a probe on its own hidden
states) calls the same object with those scores. The decision is written into the batch as
three per-pair tensors which the loss reads:

* `pair_confidence` γ_i in [0, 1]: the weight of the "chosen is better" label (cDPO);
* `pair_flip`: chosen and rejected swap roles;
* `pair_keep`: the pair takes part in the loss.

The base class decides nothing: batches pass through unchanged.
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor


class ReRanker:
    """Identity re-ranker; subclass and override `score` and/or `decide`."""

    def score(self, batch: dict) -> Optional[tuple[Tensor, Tensor]]:
        """Scores `(s_chosen, s_rejected)` for the batch's pairs, or None if this re-ranker
        cannot score on its own (it then waits for a module to pass scores)."""
        return None

    def decide(self, batch: dict, chosen_scores: Tensor, rejected_scores: Tensor) -> dict:
        """Return the batch with `pair_confidence`, `pair_flip`, `pair_keep` set."""
        return batch

    def __call__(
        self, batch: dict, chosen_scores: Optional[Tensor] = None, rejected_scores: Optional[Tensor] = None
    ) -> dict:
        if chosen_scores is None:
            scores = self.score(batch)
            if scores is None:
                return batch
            chosen_scores, rejected_scores = scores
        return self.decide(batch, chosen_scores, rejected_scores)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
