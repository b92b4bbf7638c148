"""Direct Preference Optimisation losses, as pure functions of sequence log-probabilities.

Every loss takes the policy and reference log-probabilities of the chosen and rejected
completions (summed over completion tokens) and returns
`(per_pair_loss, chosen_rewards, rejected_rewards)`, with the implicit rewards
`r = β (log π(y|x) − log π_ref(y|x))`. Reduction (and pair weights or masks from the
re-ranker) is the caller's: the module takes a masked mean.

Notation: z = (log π(y_c) − log π_ref(y_c)) − (log π(y_r) − log π_ref(y_r)).
"""

from __future__ import annotations

from typing import Literal, Optional, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

LossType = Literal["sigmoid", "ipo", "hinge", "robust", "conservative"]
LOSS_TYPES: tuple[str, ...] = get_args(LossType)


def _logratios(policy_chosen, policy_rejected, ref_chosen, ref_rejected):
    return policy_chosen - ref_chosen, policy_rejected - ref_rejected


def sigmoid_loss(z: Tensor, beta: float) -> Tensor:
    """DPO (Rafailov et al. 2023): L = −log σ(β z)."""
    return -F.logsigmoid(beta * z)


def hinge_loss(z: Tensor, beta: float) -> Tensor:
    """SLiC hinge: L = max(0, 1 − β z)."""
    return torch.relu(1 - beta * z)


def ipo_loss(chosen_logratio: Tensor, rejected_logratio: Tensor, chosen_lengths: Tensor, rejected_lengths: Tensor, beta: float) -> Tensor:
    """IPO (Azar et al. 2023, eq. 17) on per-token averaged log-ratios: L = (z̄ − 1/(2β))²,
    z̄ = chosen_logratio / |y_c| − rejected_logratio / |y_r| (TRL's length normalisation)."""
    z_avg = chosen_logratio / chosen_lengths.clamp(min=1) - rejected_logratio / rejected_lengths.clamp(min=1)
    return (z_avg - 1 / (2 * beta)) ** 2


def robust_loss(z: Tensor, beta: float, label_smoothing: float) -> Tensor:
    """Robust DPO (Chowdhury et al. 2024), unbiased under label-flip rate ε:
    L = ((1 − ε)(−log σ(β z)) − ε(−log σ(−β z))) / (1 − 2ε)."""
    eps = label_smoothing
    return ((1 - eps) * -F.logsigmoid(beta * z) - eps * -F.logsigmoid(-beta * z)) / (1 - 2 * eps)


def conservative_loss(z: Tensor, beta: float, confidence: Tensor | float) -> Tensor:
    """Conservative DPO with label confidence γ (cDPO; SPEC A2 uses the probe's γ):
    L = −γ log σ(β z) − (1 − γ) log σ(−β z). γ may be a scalar or one value per pair."""
    return -confidence * F.logsigmoid(beta * z) - (1 - confidence) * F.logsigmoid(-beta * z)


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    confidence: Optional[Tensor | float] = None,
    chosen_lengths: Optional[Tensor] = None,
    rejected_lengths: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-pair DPO loss of `loss_type` and the implicit rewards (detached).

    Args:
        confidence: γ for "conservative" (scalar or [B]); defaults to 1 − label_smoothing.
        chosen_lengths, rejected_lengths: completion token counts, needed by "ipo".
    """
    chosen_logratio, rejected_logratio = _logratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    z = chosen_logratio - rejected_logratio
    if loss_type == "sigmoid":
        losses = sigmoid_loss(z, beta)
    elif loss_type == "hinge":
        losses = hinge_loss(z, beta)
    elif loss_type == "ipo":
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError("loss_type='ipo' needs chosen_lengths and rejected_lengths")
        losses = ipo_loss(chosen_logratio, rejected_logratio, chosen_lengths, rejected_lengths, beta)
    elif loss_type == "robust":
        if not 0.0 <= label_smoothing < 0.5:
            raise ValueError(f"loss_type='robust' needs 0 <= label_smoothing < 0.5, got {label_smoothing}")
        losses = robust_loss(z, beta, label_smoothing)
    elif loss_type == "conservative":
        gamma = 1.0 - label_smoothing if confidence is None else confidence
        losses = conservative_loss(z, beta, gamma)
    else:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; choose one of {LOSS_TYPES}")
    return losses, beta * chosen_logratio.detach(), beta * rejected_logratio.detach()


def sft_loss(chosen_logps: Tensor, chosen_lengths: Tensor, weights: Optional[Tensor] = None) -> Tensor:
    """The NLL of the chosen completions, per token over the batch (RPO, Pang et al. 2024;
    TRL's `loss_type=[..., "sft"]`): L_sft = −Σ_i w_i log π(y_c,i) / Σ_i w_i |y_c,i|.
    DPO alone mostly pushes rejected answers down; this term also pulls the chosen ones up,
    so that they become what the policy actually says."""
    weights = torch.ones_like(chosen_logps) if weights is None else weights.to(chosen_logps.dtype)
    return -(chosen_logps * weights).sum() / (chosen_lengths.to(chosen_logps.dtype) * weights).sum().clamp(min=1)
