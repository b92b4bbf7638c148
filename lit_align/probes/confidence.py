"""Label confidence from probe scores (paper A, SPEC A2). Pure math.

Scores are probe logits: σ(s) is the probe's belief that a response is safe. A confidence
γ in [0, 1] is the weight the conservative DPO loss gives to the dataset's label
("chosen is better"); 1 − γ goes to the opposite label.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def batch_confidence(
    chosen_scores: Tensor, rejected_scores: Tensor, alpha: float = 7.5, floor: Optional[float] = 0.5
) -> Tensor:
    """The paper's batch confidence (a scalar):

        c̄ = mean_i σ(s_c,i) − 0.5,   r̄ = mean_i σ(s_r,i) − 0.5,
        γ = max(σ(α (c̄ − r̄)), 0.5)

    `floor=None` returns the unclamped σ(α (c̄ − r̄)) (used to flip or drop a whole batch).
    """
    c_bar = torch.sigmoid(chosen_scores.float()).mean() - 0.5
    r_bar = torch.sigmoid(rejected_scores.float()).mean() - 0.5
    gamma = torch.sigmoid(alpha * (c_bar - r_bar))
    return gamma if floor is None else gamma.clamp(min=floor)


def pair_confidence(chosen_scores: Tensor, rejected_scores: Tensor, alpha: float = 7.5) -> Tensor:
    """Per-pair confidence [B] (SPEC A2, a choice of this project, unclamped):

        γ_i = σ(α (σ(s_c,i) − σ(s_r,i)))
    """
    return torch.sigmoid(alpha * (torch.sigmoid(chosen_scores.float()) - torch.sigmoid(rejected_scores.float())))


__all__ = ["batch_confidence", "pair_confidence"]
