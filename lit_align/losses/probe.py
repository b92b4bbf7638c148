"""Losses that train a reward probe on hidden-state features (paper A, SPEC A1).

Pure math: tensors in, tensors out; no model, no Lightning.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def pairwise_margin_loss(
    chosen_scores: Tensor, rejected_scores: Tensor, margin: float = 1.0
) -> tuple[Tensor, Tensor, Tensor]:
    """Pairwise ranking loss with a margin (SPEC A1, paper default m = 1):

        L = mean_i  −log σ(r_c,i − r_r,i − m)

    Returns `(loss, chosen_scores, rejected_scores)` like torchtune's preference losses.
    """
    if chosen_scores.shape != rejected_scores.shape:
        raise ValueError(
            f"chosen_scores {tuple(chosen_scores.shape)} and rejected_scores "
            f"{tuple(rejected_scores.shape)} must have the same shape"
        )
    loss = -F.logsigmoid(chosen_scores - rejected_scores - margin).mean()
    return loss, chosen_scores, rejected_scores


def bce_loss(scores: Tensor, labels: Tensor) -> Tensor:
    """Per-text binary cross-entropy on σ(r) with safe = 1, unsafe = 0 (SPEC A1):

        L = mean_i  −[y_i log σ(r_i) + (1 − y_i) log(1 − σ(r_i))]
    """
    if scores.shape != labels.shape:
        raise ValueError(f"scores {tuple(scores.shape)} and labels {tuple(labels.shape)} must have the same shape")
    return F.binary_cross_entropy_with_logits(scores, labels.to(scores.dtype))


def pairwise_accuracy(chosen_scores: Tensor, rejected_scores: Tensor) -> Tensor:
    """Fraction of pairs the probe orders correctly: mean(s_c > s_r)."""
    return (chosen_scores > rejected_scores).float().mean()


__all__ = ["bce_loss", "pairwise_accuracy", "pairwise_margin_loss"]
