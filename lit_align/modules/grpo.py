"""GRPOModule: Group Relative Policy Optimisation on AlignDataModule prompt batches (SPEC B3).

One training step (one batch of B prompts):

    rollout   = generate G completions per prompt       # policy, prompt's KV cache shared, seeded
    rewards   = [source(prompts, completions, **columns) for source in reward_funcs]  # [B·G, K]
    Â         = compute_advantages(rewards, weights)    # group-relative
    old, ref  = log π_old, log π_ref on the completions  # only when needed
    repeat num_iterations times:
        for each of steps_per_generation slices:        # one optimiser step each
            L = grpo_loss(log π_θ, old, Â, ref)         # clipped ratio + β·KL(k3)
            backward (micro-batched), clip, step

Optimisation is manual because one generation batch feeds several optimiser steps; the
rollout lives only inside `training_step`, so a checkpoint is always at a rollout boundary
and resuming needs no buffer state. `trainer.max_steps` counts optimiser steps.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, fields, replace
from typing import Callable, Literal, Optional, Union

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor

from lit_align.checks import ConfigError, check_range
from lit_align.generation import Generator, HFGenerator, LeanGenerator
from lit_align.losses.grpo import compute_advantages, grpo_loss, nanstd, token_logps_and_entropy
from lit_align.models import PolicyConfig
from lit_align.modules.base import default_optimizer
from lit_align.modules.grpo_config import GRPOLossConfig, GRPOSamplingConfig, GRPOUpdateConfig
from lit_align.modules.policy import PolicyModule
from lit_align.modules.shared_prompt import completion_logits
from lit_align.rewards import resolve_reward_source, score_completions, unique_names
from lit_align.sharding import gathered_parameters

log = logging.getLogger(__name__)

REFERENCES = ("copy", "lora_base")
TENSOR_KEYS = ("prompt_input_ids", "prompt_attention_mask", "index")


@dataclass
class Rollout:
    """One generation batch: N = B·G completions, prompt-major."""

    prompt_ids: Tensor  # [N, P] left-padded
    prompt_mask: Tensor  # [N, P]
    completion_ids: Tensor  # [N, C]
    completion_mask: Tensor  # [N, C] loss mask (up to and including EOS)
    advantages: Tensor  # [N]
    old_logps: Optional[Tensor] = None  # [N, C] log π_old, when the policy moves before reuse
    ref_logps: Optional[Tensor] = None  # [N, C] log π_ref, when β ≠ 0

    def __len__(self) -> int:
        return self.prompt_ids.shape[0]

    def rows(self, start: int, end: int) -> "Rollout":
        return Rollout(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name)[start:end] for f in fields(self)})

    def split(self, parts: int) -> list["Rollout"]:
        size = -(-len(self) // parts)
        return [self.rows(i, i + size) for i in range(0, len(self), size)]


def reward_weight_tensor(weights: Optional[list[float]], count: int) -> Tensor:
    """One weight per reward source (default 1 each), checked."""
    weights = [1.0] * count if weights is None else list(weights)
    for weight in weights:
        check_range("model.reward_weights[]", weight, why="a finite weight")
    if len(weights) != count:
        raise ConfigError(f"model.reward_weights has {len(weights)} values for {count} reward_funcs")
    return torch.tensor(weights, dtype=torch.float32)


@dataclass
class SampledCompletions:
    """What one generation batch sampled and how it was rewarded: `training_step`'s output
    "completions", which callbacks read (`lit_align.callbacks.CompletionsLogger`)."""

    step: int  # global step when the rollout was sampled
    generation_index: int  # generation batches before this one
    prompts: list  # the batch's B prompts (text or messages); completion i answers prompts[i // G]
    texts: list[str]  # B·G completions, prompt-major
    rewards_per_func: Tensor  # [B·G, K] (NaN where a source does not apply)
    reward_names: list[str]  # K
    advantages: Tensor  # [B·G]

    @property
    def num_generations(self) -> int:
        return len(self.texts) // len(self.prompts)


class GRPOModule(PolicyModule):
    """GRPO with any reward sources (shadow reward models, probes, plain functions).

    Args:
        policy: The model to train (and its tokenizer); LoRA when `policy.lora` is set.
        reward_funcs: Reward sources: import paths of functions ("my_pkg.rewards:length_reward")
            or objects (e.g. {class_path: lit_align.srmir.ensemble.ShadowRewardEnsemble, ...}).
            Each is called as `fn(prompts, completions, **columns) -> list[float | None]`.
        reward_weights: One weight per source (default 1 each).
        sampling: The rollout: G = `num_generations` completions per prompt, their length,
            temperature, top-p/k, back end and seed.
        loss: The objective: `loss_type`, β, the clipping range, the KL form, reward scaling.
        updates: Passes and optimiser steps per rollout, micro-batch size, gradient clipping.
        reference: "copy" (a frozen second model) or "lora_base" (adapters disabled); default:
            "lora_base" for a LoRA policy, else "copy". Unused when `loss.beta` = 0.
        export_dir: Save the trained policy here as a Hugging Face directory when fit ends.
        merge_lora: Export a LoRA policy merged into its base (else as an adapter).
        optimizer: Optimiser for the policy, e.g. {class_path: torch.optim.AdamW, init_args: {lr: 1e-6}}.
        lr_scheduler: Optional scheduler, stepped every optimiser step.

    Sampled completions are written to `completions.csv` by the `lit_align.CompletionsLogger`
    callback (the shipped GRPO configs add it).
    """

    def __init__(
        self,
        policy: PolicyConfig,
        reward_funcs: list[Union[str, Callable]],
        reward_weights: Optional[list[float]] = None,
        sampling: GRPOSamplingConfig = GRPOSamplingConfig(),  # noqa: B008 (copied, never mutated)
        loss: GRPOLossConfig = GRPOLossConfig(),  # noqa: B008
        updates: GRPOUpdateConfig = GRPOUpdateConfig(),  # noqa: B008
        reference: Optional[Literal["copy", "lora_base"]] = None,
        export_dir: Optional[str] = None,
        merge_lora: bool = True,
        optimizer: OptimizerCallable = default_optimizer,
        lr_scheduler: Optional[LRSchedulerCallable] = None,
    ):
        super().__init__()
        if not reward_funcs:
            raise ConfigError("model.reward_funcs is empty: give at least one reward source")
        reference = reference or ("lora_base" if policy.lora is not None else "copy")
        if reference not in REFERENCES:
            raise ConfigError(f"model.reference={reference!r}: choose one of {REFERENCES}")
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler", "reward_funcs"])  # reward_funcs may be objects
        self.automatic_optimization = False
        self.init_policy(policy, reference, export_dir, merge_lora, optimizer, lr_scheduler)
        self.sampling, self.loss, self.updates = replace(sampling), replace(loss), replace(updates)  # own copies
        self.reward_funcs = [resolve_reward_source(s) for s in reward_funcs]
        self.reward_names = unique_names(self.reward_funcs)
        self.reward_weights = reward_weight_tensor(reward_weights, len(self.reward_funcs))
        self.generator: Optional[Generator] = None

    # ------------------------------------------------------------------ models
    def needs_reference_copy(self) -> bool:
        return self.loss.beta != 0.0 and self.reference_mode == "copy"  # β = 0: no KL term, no reference

    def configure_extras(self) -> None:
        for source in self.reward_funcs:
            if hasattr(source, "bind"):
                source.bind(self)

    def on_fit_start(self) -> None:
        for source in self.reward_funcs:  # reward models follow the policy's device
            if hasattr(source, "to"):
                source.to(self.device)

    on_validation_start = on_fit_start

    # ------------------------------------------------------------------ log-probs
    def token_logps(self, model, part: Rollout) -> tuple[Tensor, Tensor]:
        """log π(y_t | x, y_<t) and the entropy at every completion position, `[n, C]` each
        (rows sharing a prompt compute it once: `lit_align.modules.shared_prompt`)."""
        logits = completion_logits(model, part.prompt_ids, part.prompt_mask, part.completion_ids, part.completion_mask)
        return token_logps_and_entropy(logits, part.completion_ids, self.sampling.temperature)

    def micro_batches(self, part: Rollout) -> list[Rollout]:
        size = self.updates.micro_batch_size or len(part)
        return [part.rows(i, i + size) for i in range(0, len(part), size)]

    @torch.no_grad()
    def frozen_logps(self, rollout: Rollout, which: str) -> Tensor:
        """log π_old (the sampling policy) or log π_ref on the rollout's completions."""
        chunks = []
        for micro in self.micro_batches(rollout):
            if which == "old":
                chunks.append(self.token_logps(self.policy, micro)[0])
            else:
                with self.reference_model() as reference:
                    chunks.append(self.token_logps(reference, micro)[0])
        return torch.cat(chunks)

    # ------------------------------------------------------------------ rollout
    def sample(self, batch: dict, seed: Optional[int]):
        """G completions per prompt from the current policy."""
        if self.generator is None:
            self.generator = (LeanGenerator if self.sampling.backend == "lean" else HFGenerator)(self.policy, self.tokenizer)
        self.generator.sync_weights(self.policy)
        # FSDP2: gather the weights once for decoding; peft's generate skips the root unit (no-op unsharded)
        with gathered_parameters(self.policy):
            return self.generator.generate_ids(
                batch["prompt_input_ids"], batch["prompt_attention_mask"], self.sampling, self.sampling.num_generations, seed
            )

    def score(self, batch: dict, completions: list[str]) -> Tensor:
        """Rewards `[B·G, K]` (NaN where a source does not apply)."""
        g = self.sampling.num_generations
        prompts = [p for p in batch["prompt"] for _ in range(g)]
        columns = {
            key: [v for v in values for _ in range(g)]
            for key, values in batch.items()
            if key not in TENSOR_KEYS and key != "prompt" and isinstance(values, list)
        }
        return score_completions(self.reward_funcs, prompts, completions, columns, self.reward_names)

    def make_rollout(self, batch: dict, seed: Optional[int]) -> tuple[Rollout, dict, list]:
        """Generate, score and compute advantages (and old/ref log-probs when needed)."""
        completions = self.sample(batch, seed)
        rewards_per_func = self.score(batch, completions.texts)
        adv = self.advantages(rewards_per_func)
        completion_mask = completions.completion_mask
        if self.loss.mask_truncated_completions:
            completion_mask = completion_mask * (~completions.truncated)[:, None].long()
        rollout = Rollout(
            completions.prompt_ids, completions.prompt_mask, completions.completion_ids, completion_mask,
            adv.advantages.to(self.device),
        )
        if self.updates.num_iterations > 1 or self.updates.steps_per_generation > 1:
            rollout.old_logps = self.frozen_logps(rollout, "old")
        if self.loss.beta != 0.0:
            rollout.ref_logps = self.frozen_logps(rollout, "ref")
        metrics = self.reward_metrics(rewards_per_func, adv)
        lengths = completions.completion_mask.sum(1).float()
        for stat in ("mean", "min", "max"):
            metrics[f"completions/{stat}_length"] = getattr(lengths, stat)()
        metrics["completions/clipped_ratio"] = completions.truncated.float().mean()
        return rollout, metrics, [completions.texts, rewards_per_func, adv]

    def advantages(self, rewards_per_func: Tensor):
        """Group-relative advantages of the weighted rewards (`compute_advantages`)."""
        return compute_advantages(rewards_per_func, self.reward_weights, self.sampling.num_generations,
                                  self.loss.scale_rewards, self.loss.multi_objective_aggregation)

    def reward_metrics(self, rewards_per_func: Tensor, adv) -> dict:
        metrics = {}
        for k, name in enumerate(self.reward_names):
            metrics[f"rewards/{name}/mean"] = torch.nanmean(rewards_per_func[:, k])
            metrics[f"rewards/{name}/std"] = nanstd(rewards_per_func[:, k])
        metrics["reward"] = torch.nanmean(adv.rewards)
        metrics["reward_std"] = nanstd(adv.rewards)
        metrics["frac_reward_zero_std"] = adv.std_is_zero.float().mean()
        return metrics

    # ------------------------------------------------------------------ optimisation
    def micro_weight(self, micro: Rollout, part: Rollout) -> float:
        """Share of the slice's loss a micro-batch carries, so the accumulated gradient equals
        the loss over the whole slice for every loss type."""
        if self.loss.loss_type in ("grpo", "dr_grpo"):
            return len(micro) / len(part)
        if self.loss.loss_type == "bnpo":
            return float(micro.completion_mask.sum()) / max(float(part.completion_mask.sum()), 1.0)
        return 1.0  # dapo: already divided by the generation batch's token count

    def dapo_normaliser(self, completion_mask: Tensor) -> float:
        """`dapo`'s divisor for one optimiser step: the active tokens of the generation batch
        on all processes ÷ (processes · steps_per_generation), as TRL's GRPOTrainer. The
        processes' gradients are averaged (DDP, FSDP), so every token then weighs
        1 / (its step's share of all tokens), whatever its process holds."""
        count = completion_mask.sum().float()
        world = self.trainer.world_size if self._trainer is not None else 1
        if world > 1:
            count = self.all_gather(count).sum() / world
        return float(count) / self.updates.steps_per_generation

    def optimisation_step(self, part: Rollout, num_items: float) -> dict:
        """One optimiser step on a slice of the rollout; returns its stats."""
        optimizer = self.optimizers()
        optimizer.zero_grad()
        stats = self.accumulate_gradients(part, num_items)
        if self.updates.max_grad_norm is not None:
            self.clip_gradients(optimizer, gradient_clip_val=self.updates.max_grad_norm, gradient_clip_algorithm="norm")
        optimizer.step()
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()
        return stats

    def accumulate_gradients(self, part: Rollout, num_items: float) -> dict:
        """Backward the GRPO loss of a slice, micro-batch by micro-batch; token-weighted stats."""
        backward = self.manual_backward if self._trainer is not None else Tensor.backward
        sums, tokens = defaultdict(float), 0.0
        for micro in self.micro_batches(part):
            logps, entropy = self.token_logps(self.policy, micro)
            loss, stats = grpo_loss(
                logps, micro.old_logps, micro.advantages, micro.completion_mask, micro.ref_logps,
                beta=self.loss.beta, epsilon=self.loss.epsilon, epsilon_high=self.loss.epsilon_high,
                loss_type=self.loss.loss_type,
                max_completion_length=self.sampling.max_new_tokens, num_items_in_batch=num_items,
                use_bias_correction_kl=self.loss.use_bias_correction_kl,
            )
            weight = self.micro_weight(micro, part)
            backward(loss * weight)
            n = float(micro.completion_mask.sum())
            tokens += n
            sums["loss"] += float(loss.detach()) * weight
            sums["entropy"] += float((entropy.detach() * micro.completion_mask).sum())
            sums["clip_ratio/low_mean"] += float(stats.clip_low) * n
            sums["clip_ratio/high_mean"] += float(stats.clip_high) * n
            sums["clip_ratio/region_mean"] += float(stats.clip_region) * n
            if stats.kl is not None:
                sums["kl"] += float(stats.kl) * n
        return {k: v if k == "loss" else v / max(tokens, 1.0) for k, v in sums.items()}

    def training_step(self, batch: dict, batch_idx: int) -> dict:
        step = self.global_step
        seed = None if self.sampling.seed is None else self.sampling.seed + step + 1_000_003 * self.global_rank
        rollout, metrics, table = self.make_rollout(batch, seed)
        num_items = self.dapo_normaliser(rollout.completion_mask)
        history = defaultdict(list)
        for _ in range(self.updates.num_iterations):
            for part in rollout.split(self.updates.steps_per_generation):
                for k, v in self.optimisation_step(part, num_items).items():
                    history[k].append(v)
        metrics.update({k: sum(v) / len(v) for k, v in history.items()})
        size = len(batch["prompt"])
        self.log("reward", float(metrics.pop("reward")), prog_bar=True, batch_size=size)
        # each rank's loss is its share of the global one (dapo): the mean over ranks is the loss
        self.log("loss", float(metrics.pop("loss")), batch_size=size, sync_dist=True)
        self.log_dict({k: float(v) for k, v in metrics.items()}, batch_size=size)
        texts, rewards_per_func, adv = table
        generation_index = step // (self.updates.num_iterations * self.updates.steps_per_generation)
        sampled = SampledCompletions(step, generation_index, list(batch["prompt"]), texts, rewards_per_func,
                                     self.reward_names, adv.advantages)
        return {"completions": sampled}  # for callbacks' on_train_batch_end (CompletionsLogger)

    # ------------------------------------------------------------------ validation
    @torch.no_grad()
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        seed = None if self.sampling.seed is None else self.sampling.seed + batch_idx
        completions = self.sample(batch, seed)
        rewards_per_func = self.score(batch, completions.texts)
        adv = self.advantages(rewards_per_func)
        metrics = self.reward_metrics(rewards_per_func, adv)
        metrics["completions/mean_length"] = completions.completion_mask.sum(1).float().mean()
        size = len(batch["prompt"])
        self.log_dict({f"eval_{k}": float(v) for k, v in metrics.items()}, batch_size=size, sync_dist=True)


__all__ = ["GRPOLossConfig", "GRPOModule", "GRPOSamplingConfig", "GRPOUpdateConfig", "Rollout", "SampledCompletions"]
