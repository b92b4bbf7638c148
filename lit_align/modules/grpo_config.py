"""GRPOModule's options, grouped by concern (litgpt style: each field's docstring is its `--help`).

    sampling  GRPOSamplingConfig  the rollout: G completions per prompt (SamplingConfig + G, back end, seed)
    loss      GRPOLossConfig      the objective: advantages, clipped ratio, KL to the reference
    updates   GRPOUpdateConfig    how one rollout becomes optimiser steps

In YAML: `model.init_args.sampling.num_generations: 8`, `model.init_args.loss.beta: 0.04`, ...
Each config refuses out-of-range values when it is built, naming the option as the user writes it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, get_args

import torch

from lit_align.checks import ConfigError, check_range
from lit_align.generation import SamplingConfig
from lit_align.losses.grpo import REDUCTIONS, Aggregation, LossType, ScaleRewards

Backend = Literal["lean", "hf"]


def check_choice(name: str, value, choices) -> None:
    """Refuse `value` unless it is one of `choices` (the parser does it for YAML; this for Python callers)."""
    if value not in choices:
        raise ConfigError(f"{name}={value!r}: choose one of {tuple(choices)}")


def check_ranges(prefix: str, config, checks: list[tuple]) -> None:
    """`check_range` on each (field, low, high, low_open, why) of `config`, named `prefix.field`."""
    for name, low, high, low_open, why in checks:
        check_range(f"{prefix}.{name}", getattr(config, name), low, high, low_open=low_open, why=why)


@dataclass
class GRPOSamplingConfig(SamplingConfig):
    """How each rollout is sampled: G completions per prompt from the current policy."""

    max_new_tokens: int = 256
    """Longest completion, in tokens (TRL's `max_completion_length`)."""
    temperature: float = 1.0
    """Sampling temperature (> 0); the training log-probs use it too, as TRL does."""
    num_generations: int = 8
    """Completions sampled per prompt (the group size G)."""
    backend: Backend = "lean"
    """`lean` (`lit_align.generation.lean`: a prompt prefilled once for its G completions, a tight decode
    loop) or `hf` (transformers `generate`: models without a `DynamicCache`). Another sampler (a
    generation server): set `self.generator` in a subclass (docs/grpo.md)."""
    seed: Optional[int] = 0
    """Sampling seed; step s samples with seed + s (null: unseeded)."""

    def __post_init__(self) -> None:
        check_ranges("model.sampling", self, [
            ("num_generations", 2, None, False, "GRPO compares at least 2 completions per prompt"),
            ("max_new_tokens", 1, None, False, ""),
            ("temperature", 0, None, True, "0 is greedy: the group's completions would be identical"),
            ("top_p", 0, 1, True, "a probability mass"),
            ("top_k", 0, None, False, "0 turns it off"),
            ("repetition_penalty", 0, None, True, "1 turns it off"),
        ])
        check_choice("model.sampling.backend", self.backend, get_args(Backend))
        getattr(super(), "__post_init__", lambda: None)()  # SamplingConfig's own checks, if it has any


@dataclass
class GRPOLossConfig:
    """The GRPO objective: group-relative advantages, the clipped ratio and β·KL to the reference."""

    loss_type: LossType = "dapo"
    """How token losses are normalised: `grpo` (mean of sequence means), `bnpo` (tokens in the step),
    `dr_grpo` (rows · max_new_tokens) or `dapo` (active tokens of the generation batch)."""
    beta: float = 0.0
    """KL coefficient β (0: no KL term and no reference model)."""
    epsilon: float = 0.2
    """Lower clipping range ε (and the upper one unless `epsilon_high` is set)."""
    epsilon_high: Optional[float] = None
    """Upper clipping range (DAPO "clip-higher", e.g. 0.28); at least `epsilon`."""
    use_bias_correction_kl: bool = True
    """Multiply the KL term by the ratio ρ (TRL's default): its expected gradient is then
    ∇KL(π_θ ‖ π_ref); without it (false: DeepSeekMath's and the SRMIR paper's k3 term, the SRMIR
    configs' setting) it is ∇KL(π_ref ‖ π_θ) (docs/grpo.md, "The KL term")."""
    scale_rewards: ScaleRewards = "group"
    """Std the advantages are divided by: the group's, the batch's, or `none` (Dr. GRPO)."""
    multi_objective_aggregation: Aggregation = "sum_then_normalize"
    """Several reward sources: weight and sum, then advantages (`sum_then_normalize`), or
    standardise each source within its group first (`normalize_then_sum`)."""
    mask_truncated_completions: bool = False
    """Leave completions without EOS out of the loss."""

    def __post_init__(self) -> None:
        check_choice("model.loss.loss_type", self.loss_type, tuple(REDUCTIONS))
        check_choice("model.loss.scale_rewards", self.scale_rewards, get_args(ScaleRewards))
        check_choice("model.loss.multi_objective_aggregation", self.multi_objective_aggregation, get_args(Aggregation))
        check_ranges("model.loss", self, [
            ("beta", 0, None, False, "a negative KL coefficient rewards drifting from the reference"),
            ("epsilon", 0, None, False, "a clipping range"),
            ("epsilon_high", self.epsilon, None, False, "the upper clipping range is at least epsilon"),
        ])


@dataclass
class GRPOUpdateConfig:
    """How one rollout (a generation batch) becomes optimiser steps."""

    num_iterations: int = 1
    """Optimisation passes over each generation batch (μ in the paper)."""
    steps_per_generation: int = 1
    """Optimiser steps per pass (the batch is split into this many slices)."""
    micro_batch_size: Optional[int] = None
    """Completions per forward/backward (gradient accumulation inside a step); null: a whole slice."""
    max_grad_norm: Optional[float] = 1.0
    """Clip the gradient norm before each step (null: no clipping; replaces `trainer.gradient_clip_val`,
    which manual optimisation does not allow)."""

    def __post_init__(self) -> None:
        check_ranges("model.updates", self, [
            ("num_iterations", 1, None, False, ""),
            ("steps_per_generation", 1, None, False, ""),
            ("micro_batch_size", 1, None, False, ""),
            ("max_grad_norm", 0, None, True, "null turns clipping off"),
        ])


# hyper-parameters: checkpoints load with weights_only
torch.serialization.add_safe_globals([GRPOSamplingConfig, GRPOLossConfig, GRPOUpdateConfig])

__all__ = ["GRPOLossConfig", "GRPOSamplingConfig", "GRPOUpdateConfig"]
