"""GRPO math: rewards -> advantages -> the clipped per-token objective (SPEC B3).

Pure tensor functions, no Lightning and no I/O, so each piece is testable alone and
comparable with TRL's `GRPOTrainer` on identical tensors. Shapes: N = B·G completions in
prompt-major order (the G completions of a prompt are adjacent), K reward sources,
T completion tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ScaleRewards = Literal["group", "batch", "none"]
Aggregation = Literal["sum_then_normalize", "normalize_then_sum"]
STD_EPS = 1e-4  # the 1e-4 in Â = (r − mean) / (std + 1e-4)


# ---------------------------------------------------------------------------- rewards -> advantages
def nanstd(x: Tensor, dim: Optional[int] = None, keepdim: bool = False) -> Tensor:
    """Sample standard deviation (Bessel-corrected) ignoring NaNs; NaN with fewer than 2 values."""
    dims = dim if dim is not None else tuple(range(x.dim()))
    mean = torch.nanmean(x, dim=dims, keepdim=True)
    count = (~torch.isnan(x)).sum(dim=dims, keepdim=True)
    var = torch.nansum((x - mean) ** 2, dim=dims, keepdim=True) / (count - 1).clamp(min=1)
    var = torch.where(count > 1, var, torch.full_like(var, float("nan")))
    std = var.sqrt()
    return std if keepdim else std.squeeze(dims) if dim is not None else std.reshape(())


def weighted_reward(rewards_per_func: Tensor, weights: Tensor) -> Tensor:
    """r_i = Σ_k w_k r_ik over the sources that scored sample i (NaN = "does not apply").

    A sample no source scored gets NaN (not 0), so it stays out of the group baseline.
    """
    total = (rewards_per_func * weights[None, :]).nansum(dim=1)
    unscorable = torch.isnan(rewards_per_func).all(dim=1)
    return total.masked_fill(unscorable, float("nan"))


def group_advantages(
    rewards: Tensor, num_generations: int, scale_rewards: ScaleRewards = "group"
) -> tuple[Tensor, Tensor]:
    """Â_i = (r_i − mean_g(r)) / (std(r) + 1e-4), the mean always over the prompt's group g.

    `scale_rewards` picks the std: `group` (within the group, GRPO), `batch` (over all N
    samples) or `none` (no division, Dr. GRPO). NaN rewards are ignored in the statistics
    and get advantage 0. Returns `(advantages [N], std [N])`; std is what the zero-std
    metric is read from (the group std for `none`).
    """
    if rewards.numel() % num_generations:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {num_generations}")
    if scale_rewards not in ("group", "batch", "none"):
        raise ValueError(f"scale_rewards={scale_rewards!r}: choose group, batch or none")
    grouped = rewards.view(-1, num_generations)
    mean = torch.nanmean(grouped, dim=1).repeat_interleave(num_generations)
    if scale_rewards == "batch":
        std = nanstd(rewards).expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
    elif num_generations > 1:
        std = nanstd(grouped, dim=1).repeat_interleave(num_generations)
    else:
        std = torch.zeros_like(rewards)
    advantages = rewards - mean
    if scale_rewards != "none":
        advantages = advantages / (std + STD_EPS)
    return torch.nan_to_num(advantages, nan=0.0), std


@dataclass
class Advantages:
    advantages: Tensor  # [N]
    rewards: Tensor  # [N] weighted sum per sample (NaN when no source applied)
    std_is_zero: Tensor  # [N] bool, for `frac_reward_zero_std`


def compute_advantages(
    rewards_per_func: Tensor,
    weights: Tensor,
    num_generations: int,
    scale_rewards: ScaleRewards = "group",
    aggregation: Aggregation = "sum_then_normalize",
) -> Advantages:
    """Combine K reward sources and turn them into advantages.

    * `sum_then_normalize`: r = Σ_k w_k r_k, then `group_advantages(r, scale_rewards)`.
    * `normalize_then_sum`: each source is first standardised in its group,
      r̃_k = (r_k − mean_g r_k) / (std_g r_k + 1e-4), then r = Σ_k w_k r̃_k and
      Â = (r − mean r) / (std r + 1e-4) over the batch (as TRL does; `scale_rewards` is unused).
    """
    n, k = rewards_per_func.shape
    if weights.numel() != k:
        raise ValueError(f"{weights.numel()} reward_weights for {k} reward sources")
    weights = weights.to(rewards_per_func)
    unscorable = torch.isnan(rewards_per_func).all(dim=1)
    if aggregation == "sum_then_normalize":
        rewards = weighted_reward(rewards_per_func, weights)
        advantages, std = group_advantages(rewards, num_generations, scale_rewards)
    elif aggregation == "normalize_then_sum":
        grouped = rewards_per_func.view(-1, num_generations, k)
        mean_k = torch.nanmean(grouped, dim=1, keepdim=True)
        std_k = nanstd(grouped, dim=1, keepdim=True) if num_generations > 1 else torch.zeros_like(mean_k)
        normalised = ((grouped - mean_k) / (std_k + STD_EPS)).view(n, k)
        rewards = (normalised * weights[None, :]).nansum(dim=1).masked_fill(unscorable, float("nan"))
        std = nanstd(rewards).expand_as(rewards) if n > 1 else torch.zeros_like(rewards)
        advantages = torch.nan_to_num((rewards - torch.nanmean(rewards)) / (std + STD_EPS), nan=0.0)
        rewards = weighted_reward(rewards_per_func, weights)  # report the raw weighted reward
    else:
        raise ValueError(f"aggregation={aggregation!r}: choose sum_then_normalize or normalize_then_sum")
    std_is_zero = torch.isclose(std, torch.zeros_like(std))
    return Advantages(advantages, rewards, std_is_zero)


# ---------------------------------------------------------------------------- per-token quantities
def token_logps_and_entropy(logits: Tensor, ids: Tensor, temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """log π(y_t | y_<t) of the given tokens and the entropy H_t of the (tempered) next-token
    distribution. `logits[:, t]` predicts `ids[:, t]`. Both `[N, T]`."""
    logps_all = F.log_softmax(logits.float() / temperature, dim=-1)
    logps = logps_all.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    entropy = -(logps_all.exp() * logps_all).sum(-1)
    return logps, entropy


def k3_kl(logps: Tensor, ref_logps: Tensor) -> Tensor:
    """Per-token k3 estimator of KL(π_θ ‖ π_ref): exp(ref − logp) − (ref − logp) − 1 ≥ 0."""
    delta = ref_logps - logps
    return torch.exp(delta) - delta - 1


def clipped_surrogate(
    logps: Tensor, old_logps: Tensor, advantages: Tensor, epsilon_low: float, epsilon_high: float
) -> tuple[Tensor, Tensor]:
    """−min(ρ_t Â, clip(ρ_t, 1 − ε_low, 1 + ε_high) Â) with ρ_t = π_θ(y_t) / π_old(y_t).

    Returns `(per_token_loss [N, T], ratio [N, T])`; `advantages` is `[N]` or `[N, T]`.
    """
    if advantages.dim() == 1:
        advantages = advantages[:, None]
    ratio = torch.exp(logps - old_logps)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    return -torch.min(ratio * advantages, clipped * advantages), ratio


def _per_sequence_mean(total: Tensor, mask: Tensor, max_completion_length, num_items_in_batch) -> Tensor:
    return (total.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()


def _batch_tokens(total: Tensor, mask: Tensor, max_completion_length, num_items_in_batch) -> Tensor:
    return total.sum() / mask.sum().clamp(min=1.0)


def _constant(total: Tensor, mask: Tensor, max_completion_length, num_items_in_batch) -> Tensor:
    if max_completion_length is None:
        raise ValueError("loss_type='dr_grpo' needs max_completion_length")
    return total.sum() / (total.size(0) * max_completion_length)


def _generation_batch_tokens(total: Tensor, mask: Tensor, max_completion_length, num_items_in_batch) -> Tensor:
    if num_items_in_batch is None:
        raise ValueError("loss_type='dapo' needs num_items_in_batch (active tokens of the generation batch)")
    return total.sum() / torch.as_tensor(num_items_in_batch, dtype=total.dtype).clamp(min=1.0)


# loss_type -> how Σ m ℓ is normalised (see reduce_loss)
REDUCTIONS: dict[str, Callable[..., Tensor]] = {
    # -- registry: one line per loss type --
    "grpo": _per_sequence_mean,
    "bnpo": _batch_tokens,
    "dr_grpo": _constant,
    "dapo": _generation_batch_tokens,
}
LOSS_TYPES: tuple[str, ...] = tuple(REDUCTIONS)
LossType = Literal[LOSS_TYPES]  # the registry's names (so `--help` lists them)


def reduce_loss(
    per_token_loss: Tensor,
    mask: Tensor,
    loss_type: LossType,
    max_completion_length: Optional[int] = None,
    num_items_in_batch: Optional[float | Tensor] = None,
) -> Tensor:
    """Normalise Σ over tokens the way each variant does (m = completion mask):

    * `grpo`:    mean_i [ Σ_t m_it ℓ_it / Σ_t m_it ]   (mean of per-sequence token means)
    * `bnpo`:    Σ m ℓ / Σ m                             (tokens of this batch)
    * `dr_grpo`: Σ m ℓ / (N · max_completion_length)     (a constant, no length bias)
    * `dapo`:    Σ m ℓ / num_items_in_batch               (tokens of the whole generation batch)
    """
    if loss_type not in REDUCTIONS:
        raise ValueError(f"loss_type={loss_type!r}: choose one of {tuple(REDUCTIONS)}")
    mask = mask.to(per_token_loss.dtype)
    return REDUCTIONS[loss_type](per_token_loss * mask, mask, max_completion_length, num_items_in_batch)


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


# ---------------------------------------------------------------------------- the loss
@dataclass
class GRPOStats:
    """Detached diagnostics, named as TRL logs them (token means over the completion mask)."""

    kl: Optional[Tensor]
    clip_low: Tensor
    clip_high: Tensor
    clip_region: Tensor


def grpo_loss(
    logps: Tensor,
    old_logps: Optional[Tensor],
    advantages: Tensor,
    mask: Tensor,
    ref_logps: Optional[Tensor] = None,
    beta: float = 0.0,
    epsilon: float = 0.2,
    epsilon_high: Optional[float] = None,
    loss_type: LossType = "dapo",
    max_completion_length: Optional[int] = None,
    num_items_in_batch: Optional[float | Tensor] = None,
    use_bias_correction_kl: bool = True,
) -> tuple[Tensor, GRPOStats]:
    """GRPO objective (DeepSeekMath eq. 3 with token-level normalisation variants):

        ℓ_it = −min(ρ_it Â_i, clip(ρ_it, 1 − ε, 1 + ε_high) Â_i) + β · c_it · KL_k3(π_θ ‖ π_ref)_it
        L = reduce_{loss_type}(ℓ, mask)

    `old_logps = None` means the samples come from the current policy (ρ = 1, gradient
    Â ∇log π). `ref_logps` is needed only when β ≠ 0. `ε_high` defaults to `ε` (DAPO's
    "clip-higher" sets it larger). `c = ρ` when `use_bias_correction_kl` (TRL ≥ 1.x default,
    DeepSeek-V3.2: the KL gradient becomes the unbiased reverse-KL gradient), else `c = 1`
    (DeepSeekMath's original term).
    """
    epsilon_high = epsilon if epsilon_high is None else epsilon_high
    old_logps = logps.detach() if old_logps is None else old_logps
    per_token_loss, ratio = clipped_surrogate(logps, old_logps, advantages, epsilon, epsilon_high)
    kl = None
    if beta != 0.0:
        if ref_logps is None:
            raise ValueError("beta != 0 needs ref_logps (the reference policy's token log-probs)")
        kl = k3_kl(logps, ref_logps)
        if use_bias_correction_kl:
            kl = kl * ratio
        per_token_loss = per_token_loss + beta * kl
    loss = reduce_loss(per_token_loss, mask, loss_type, max_completion_length, num_items_in_batch)

    with torch.no_grad():
        adv = advantages[:, None] if advantages.dim() == 1 else advantages
        low = ((ratio < 1 - epsilon) & (adv < 0)).float()
        high = ((ratio > 1 + epsilon_high) & (adv > 0)).float()
        stats = GRPOStats(
            kl=None if kl is None else masked_mean(kl.detach(), mask),
            clip_low=masked_mean(low, mask),
            clip_high=masked_mean(high, mask),
            clip_region=masked_mean(torch.maximum(low, high), mask),
        )
    return loss, stats


class GRPOLoss(nn.Module):
    """`grpo_loss` with its hyperparameters fixed, torchtune style."""

    def __init__(
        self,
        beta: float = 0.0,
        epsilon: float = 0.2,
        epsilon_high: Optional[float] = None,
        loss_type: LossType = "dapo",
        max_completion_length: Optional[int] = None,
        use_bias_correction_kl: bool = True,
    ):
        super().__init__()
        if loss_type not in REDUCTIONS:
            raise ValueError(f"loss_type={loss_type!r}: choose one of {tuple(REDUCTIONS)}")
        self.beta, self.epsilon, self.epsilon_high = beta, epsilon, epsilon_high
        self.loss_type, self.max_completion_length = loss_type, max_completion_length
        self.use_bias_correction_kl = use_bias_correction_kl

    def forward(self, logps, old_logps, advantages, mask, ref_logps=None, num_items_in_batch=None):
        return grpo_loss(
            logps, old_logps, advantages, mask, ref_logps, self.beta, self.epsilon, self.epsilon_high,
            self.loss_type, self.max_completion_length, num_items_in_batch, self.use_bias_correction_kl,
        )
