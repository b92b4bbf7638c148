"""Bradley–Terry loss for scalar reward models (SRMIR shadow models, SPEC B2).

Pure math on reward tensors: no model, no Lightning, no I/O.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def bradley_terry_loss(
    chosen_rewards: Tensor,
    rejected_rewards: Tensor,
    margin: Union[float, Tensor, None] = None,
    center_rewards_coefficient: Optional[float] = None,
    keep: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Bradley–Terry pairwise loss with an optional margin and reward centering.

        L = mean_i[ −log σ(r_c,i − r_r,i − m_i) ] + η · mean_i[ (r_c,i + r_r,i)² ]

    `m` is a scalar or a per-pair tensor (0 when None); `η` is `center_rewards_coefficient`
    (no centering term when None), which keeps rewards near zero so that the models of an
    ensemble stay on one scale. `keep` (bool [B]) restricts both means to the kept pairs
    (a re-ranker's drops): Σ_i k_i ℓ_i / max(Σ_i k_i, 1), 0 when none is kept.

    Returns `(loss, chosen_rewards, rejected_rewards)`, the rewards detached.
    """
    if chosen_rewards.shape != rejected_rewards.shape:
        raise ValueError(
            f"chosen_rewards {tuple(chosen_rewards.shape)} and rejected_rewards "
            f"{tuple(rejected_rewards.shape)} must have the same shape"
        )
    diff = chosen_rewards - rejected_rewards
    if margin is not None:
        diff = diff - margin
    if keep is None:
        loss = -F.logsigmoid(diff).mean()
        if center_rewards_coefficient is not None:
            loss = loss + center_rewards_coefficient * torch.mean((chosen_rewards + rejected_rewards) ** 2)
        return loss, chosen_rewards.detach(), rejected_rewards.detach()
    weights = keep.to(diff.dtype)
    count = weights.sum().clamp(min=1)
    loss = (-F.logsigmoid(diff) * weights).sum() / count
    if center_rewards_coefficient is not None:
        loss = loss + center_rewards_coefficient * (((chosen_rewards + rejected_rewards) ** 2) * weights).sum() / count
    return loss, chosen_rewards.detach(), rejected_rewards.detach()


class BradleyTerryLoss(nn.Module):
    """`bradley_terry_loss` as a module holding its hyper-parameters."""

    def __init__(self, margin: float = 0.0, center_rewards_coefficient: Optional[float] = None):
        super().__init__()
        self.margin = margin
        self.center_rewards_coefficient = center_rewards_coefficient

    def forward(
        self, chosen_rewards: Tensor, rejected_rewards: Tensor, margin: Optional[Tensor] = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """`margin` (per pair) overrides the module's constant margin when given."""
        m = margin if margin is not None else (self.margin or None)
        return bradley_terry_loss(chosen_rewards, rejected_rewards, m, self.center_rewards_coefficient)


def pairwise_metrics(chosen_rewards: Tensor, rejected_rewards: Tensor) -> dict[str, Tensor]:
    """TRL RewardTrainer's logged metrics: accuracy, margin and reward min/mean/max."""
    all_rewards = torch.cat([chosen_rewards, rejected_rewards])
    return {
        "accuracy": (chosen_rewards > rejected_rewards).float().mean(),
        "margin": (chosen_rewards - rejected_rewards).mean(),
        "mean_reward": all_rewards.mean(),
        "min_reward": all_rewards.min(),
        "max_reward": all_rewards.max(),
    }
