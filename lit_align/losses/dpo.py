"""Direct Preference Optimisation losses, as pure functions of sequence log-probabilities.

Every loss takes the policy and reference log-probabilities of the chosen and rejected
completions (summed over completion tokens) and returns
`(per_pair_loss, chosen_rewards, rejected_rewards)`, with the implicit rewards
`r = β (log π(y|x) − log π_ref(y|x))`. Reduction (and pair weights or masks from the
re-ranker) is the caller's: the module takes a masked mean.

Notation: z = (log π(y_c) − log π_ref(y_c)) − (log π(y_r) − log π_ref(y_r)).

Adding a loss is one function of `PairTerms` and one line in `DPO_LOSSES` (which also says what
the loss reads, so that DPOModule refuses settings it would ignore): `loss_type` takes its name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor


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


# ---------------------------------------------------------------------------- the registry
@dataclass(frozen=True)
class PairTerms:
    """What a DPO loss may read, per pair: the log-ratios log π(y) − log π_ref(y), β, and the options."""

    chosen_logratio: Tensor
    rejected_logratio: Tensor
    beta: float
    label_smoothing: float = 0.0
    confidence: Optional[Tensor | float] = None
    chosen_lengths: Optional[Tensor] = None
    rejected_lengths: Optional[Tensor] = None

    @property
    def z(self) -> Tensor:
        return self.chosen_logratio - self.rejected_logratio


def _ipo(t: PairTerms) -> Tensor:
    if t.chosen_lengths is None or t.rejected_lengths is None:
        raise ValueError("loss_type='ipo' needs chosen_lengths and rejected_lengths")
    return ipo_loss(t.chosen_logratio, t.rejected_logratio, t.chosen_lengths, t.rejected_lengths, t.beta)


def _robust(t: PairTerms) -> Tensor:
    if not 0.0 <= t.label_smoothing < 0.5:
        raise ValueError(f"loss_type='robust' needs 0 <= label_smoothing < 0.5, got {t.label_smoothing}")
    return robust_loss(t.z, t.beta, t.label_smoothing)


def _conservative(t: PairTerms) -> Tensor:
    return conservative_loss(t.z, t.beta, 1.0 - t.label_smoothing if t.confidence is None else t.confidence)


@dataclass(frozen=True)
class DPOLoss:
    """A registered loss: per-pair loss from `PairTerms`, and which options it reads."""

    fn: Callable[[PairTerms], Tensor]
    reads_label_smoothing: bool = False
    reads_confidence: bool = False


DPO_LOSSES: dict[str, DPOLoss] = {
    # -- registry: one line per loss --
    "sigmoid": DPOLoss(lambda t: sigmoid_loss(t.z, t.beta)),
    "ipo": DPOLoss(_ipo),
    "hinge": DPOLoss(lambda t: hinge_loss(t.z, t.beta)),
    "robust": DPOLoss(_robust, reads_label_smoothing=True),
    "conservative": DPOLoss(_conservative, reads_label_smoothing=True, reads_confidence=True),
}
LOSS_TYPES: tuple[str, ...] = tuple(DPO_LOSSES)
LossType = Literal[LOSS_TYPES]  # the registry's names (so `--help` lists them)


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
    """Per-pair DPO loss of `loss_type` (a name in `DPO_LOSSES`) and the implicit rewards (detached).

    Args:
        confidence: γ for "conservative" (scalar or [B]); defaults to 1 − label_smoothing.
        chosen_lengths, rejected_lengths: completion token counts, needed by "ipo".
    """
    if loss_type not in DPO_LOSSES:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; choose one of {tuple(DPO_LOSSES)}")
    terms = PairTerms(
        policy_chosen_logps - ref_chosen_logps, policy_rejected_logps - ref_rejected_logps, beta,
        label_smoothing, confidence, chosen_lengths, rejected_lengths,
    )
    losses = DPO_LOSSES[loss_type].fn(terms)
    return losses, beta * terms.chosen_logratio.detach(), beta * terms.rejected_logratio.detach()


def sft_loss(chosen_logps: Tensor, chosen_lengths: Tensor, weights: Optional[Tensor] = None) -> Tensor:
    """The NLL of the chosen completions, per token over the batch (RPO, Pang et al. 2024;
    TRL's `loss_type=[..., "sft"]`): L_sft = −Σ_i w_i log π(y_c,i) / Σ_i w_i |y_c,i|.
    DPO alone mostly pushes rejected answers down; this term also pulls the chosen ones up,
    so that they become what the policy actually says."""
    weights = torch.ones_like(chosen_logps) if weights is None else weights.to(chosen_logps.dtype)
    return -(chosen_logps * weights).sum() / (chosen_lengths.to(chosen_logps.dtype) * weights).sum().clamp(min=1)
