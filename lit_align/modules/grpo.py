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

import csv
import logging
from collections import defaultdict
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable, Literal, Optional, Union

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor

from lit_align.checks import ConfigError, check_range
from lit_align.generation import Generator, HFGenerator, SamplingConfig
from lit_align.losses.grpo import (
    REDUCTIONS,
    Aggregation,
    LossType,
    ScaleRewards,
    compute_advantages,
    grpo_loss,
    nanstd,
    token_logps_and_entropy,
)
from lit_align.models import PolicyConfig
from lit_align.modules.base import default_optimizer
from lit_align.modules.policy import PolicyModule
from lit_align.modules.shared_prompt import completion_logits
from lit_align.rewards import resolve_reward_source, score_completions, unique_names
from lit_align.sampling import LeanGenerator
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


def check_grpo_numbers(args: dict) -> None:
    """Refuse GRPO settings out of their range (`args`: GRPOModule's arguments by name)."""
    checks = [
        ("num_generations", 2, None, False, "GRPO compares at least 2 completions per prompt"),
        ("max_completion_length", 1, None, False, ""),
        ("temperature", 0, None, True, "0 is greedy: the group's completions would be identical"),
        ("top_p", 0, 1, True, "a probability mass"),
        ("top_k", 0, None, False, "0 turns it off"),
        ("repetition_penalty", 0, None, True, "1 turns it off"),
        ("beta", 0, None, False, "a negative KL coefficient rewards drifting from the reference"),
        ("epsilon", 0, None, False, "a clipping range"),
        ("epsilon_high", args["epsilon"], None, False, "the upper clipping range is at least epsilon"),
        ("num_iterations", 1, None, False, ""),
        ("steps_per_generation", 1, None, False, ""),
        ("micro_batch_size", 1, None, False, ""),
        ("max_grad_norm", 0, None, True, "null turns clipping off"),
        ("log_completions_every_n_steps", 0, None, False, "0: never"),
        ("num_completions_to_log", 0, None, False, "a count"),
    ]
    for name, low, high, low_open, why in checks:
        check_range(f"model.{name}", args[name], low, high, low_open=low_open, why=why)
    for weight in args["reward_weights"] or []:
        check_range("model.reward_weights[]", weight, why="a finite weight")


class GRPOModule(PolicyModule):
    """GRPO with any reward sources (shadow reward models, probes, plain functions).

    Args:
        policy: The model to train (and its tokenizer); LoRA when `policy.lora` is set.
        reward_funcs: Reward sources: import paths of functions ("my_pkg.rewards:length_reward")
            or objects (e.g. {class_path: lit_align.srmir.ensemble.ShadowRewardEnsemble, ...}).
            Each is called as `fn(prompts, completions, **columns) -> list[float | None]`.
        reward_weights: One weight per source (default 1 each).
        multi_objective_aggregation: "sum_then_normalize" (weight, sum, then advantages) or
            "normalize_then_sum" (standardise each source within its group first).
        scale_rewards: Std used for advantages: "group", "batch" or "none" (Dr. GRPO).
        num_generations: Completions sampled per prompt (the group size G).
        max_completion_length: Longest completion in tokens.
        temperature: Sampling temperature (also applied to the training log-probs, as TRL does).
        top_p: Nucleus sampling mass.
        top_k: Keep only the k most likely tokens (0: off).
        repetition_penalty: >1 discourages repeats while sampling.
        mask_truncated_completions: Leave completions without EOS out of the loss.
        loss_type: "grpo", "bnpo", "dr_grpo" or "dapo" (how token losses are normalised).
        beta: KL coefficient β (0: no reference model is loaded).
        epsilon: Lower clipping range ε (and the upper one unless `epsilon_high` is set).
        epsilon_high: Upper clipping range (DAPO "clip-higher", e.g. 0.28).
        use_bias_correction_kl: Multiply the KL term by the ratio ρ (TRL's default). Its expected
            gradient is then ∇KL(π_θ ‖ π_ref); without it (false: DeepSeekMath's and the SRMIR
            paper's k3 term, the SRMIR configs' setting) it is ∇KL(π_ref ‖ π_θ), also on-policy
            (docs/grpo.md, "The KL term").
        num_iterations: Optimisation passes over each generation batch (μ in the paper).
        steps_per_generation: Optimiser steps per pass (the batch is split into this many slices).
        micro_batch_size: Completions per forward/backward (gradient accumulation inside a step);
            None: a whole slice at once.
        max_grad_norm: Clip the gradient norm before each step (None: no clipping).
        reference: "copy" (a frozen second model) or "lora_base" (adapters disabled); default:
            "lora_base" for a LoRA policy, else "copy". Unused when beta = 0.
        generation_backend: "lean" (`lit_align.sampling`: a prompt prefilled once for its G completions,
            a tight decode loop) or "hf" (transformers `generate`: models without a `DynamicCache`).
            Another sampler (a generation server): set `self.generator` in a subclass (docs/grpo.md).
        generation_seed: Sampling seed; step s samples with seed + s (None: unseeded).
        log_completions_every_n_steps: Append sample completions to `completions.csv` in the
            run directory (and TensorBoard text) every n generation batches (0: never).
        num_completions_to_log: Rows written each time.
        export_dir: Save the trained policy here as a Hugging Face directory when fit ends.
        merge_lora: Export a LoRA policy merged into its base (else as an adapter).
        optimizer: Optimiser for the policy, e.g. {class_path: torch.optim.AdamW, init_args: {lr: 1e-6}}.
        lr_scheduler: Optional scheduler, stepped every optimiser step.
    """

    def __init__(
        self,
        policy: PolicyConfig,
        reward_funcs: list[Union[str, Callable]],
        reward_weights: Optional[list[float]] = None,
        multi_objective_aggregation: Aggregation = "sum_then_normalize",
        scale_rewards: ScaleRewards = "group",
        num_generations: int = 8,
        max_completion_length: int = 256,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        repetition_penalty: float = 1.0,
        mask_truncated_completions: bool = False,
        loss_type: LossType = "dapo",
        beta: float = 0.0,
        epsilon: float = 0.2,
        epsilon_high: Optional[float] = None,
        use_bias_correction_kl: bool = True,
        num_iterations: int = 1,
        steps_per_generation: int = 1,
        micro_batch_size: Optional[int] = None,
        max_grad_norm: Optional[float] = 1.0,
        reference: Optional[Literal["copy", "lora_base"]] = None,
        generation_backend: Literal["lean", "hf"] = "lean",
        generation_seed: Optional[int] = 0,
        log_completions_every_n_steps: int = 10,
        num_completions_to_log: int = 8,
        export_dir: Optional[str] = None,
        merge_lora: bool = True,
        optimizer: OptimizerCallable = default_optimizer,
        lr_scheduler: Optional[LRSchedulerCallable] = None,
    ):
        super().__init__()
        if loss_type not in REDUCTIONS:
            raise ConfigError(f"model.loss_type={loss_type!r}: choose one of {tuple(REDUCTIONS)}")
        if scale_rewards not in ("group", "batch", "none"):
            raise ConfigError(f"model.scale_rewards={scale_rewards!r}: choose group, batch or none")
        if multi_objective_aggregation not in ("sum_then_normalize", "normalize_then_sum"):
            raise ConfigError(f"model.multi_objective_aggregation={multi_objective_aggregation!r}")
        check_grpo_numbers(locals())
        if not reward_funcs:
            raise ConfigError("model.reward_funcs is empty: give at least one reward source")
        if reference is None:
            reference = "lora_base" if policy.lora is not None else "copy"
        if reference not in REFERENCES:
            raise ConfigError(f"model.reference={reference!r}: choose one of {REFERENCES}")
        if generation_backend not in ("lean", "hf"):
            raise ConfigError(f"model.generation_backend={generation_backend!r}: choose 'lean' or 'hf'")
        # reward_funcs may be objects; max_completion_length would clash with the DataModule's
        # hparam of the same name (unused in prompts mode). Pass both again to load_from_checkpoint.
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler", "reward_funcs", "max_completion_length"])
        self.automatic_optimization = False
        self.init_policy(policy, reference, export_dir, merge_lora, optimizer, lr_scheduler)
        self.reward_funcs = [resolve_reward_source(s) for s in reward_funcs]
        self.reward_names = unique_names(self.reward_funcs)
        weights = [1.0] * len(self.reward_funcs) if reward_weights is None else list(reward_weights)
        if len(weights) != len(self.reward_funcs):
            raise ConfigError(f"model.reward_weights has {len(weights)} values for {len(self.reward_funcs)} reward_funcs")
        self.reward_weights = torch.tensor(weights, dtype=torch.float32)
        self.aggregation, self.scale_rewards = multi_objective_aggregation, scale_rewards
        self.num_generations = num_generations
        self.sampling = SamplingConfig(max_completion_length, temperature, top_p, top_k, repetition_penalty)
        self.mask_truncated_completions = mask_truncated_completions
        self.loss_type, self.beta, self.epsilon, self.epsilon_high = loss_type, beta, epsilon, epsilon_high
        self.use_bias_correction_kl = use_bias_correction_kl
        self.num_iterations, self.steps_per_generation = num_iterations, steps_per_generation
        self.micro_batch_size, self.max_grad_norm = micro_batch_size, max_grad_norm
        self.generation_backend = generation_backend
        self.generation_seed = generation_seed
        self.log_completions_every_n_steps, self.num_completions_to_log = log_completions_every_n_steps, num_completions_to_log
        self.generator: Optional[Generator] = None

    # ------------------------------------------------------------------ models
    def needs_reference_copy(self) -> bool:
        return self.beta != 0.0 and self.reference_mode == "copy"  # β = 0: no KL term, no reference

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
        size = self.micro_batch_size or len(part)
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
            self.generator = (LeanGenerator if self.generation_backend == "lean" else HFGenerator)(self.policy, self.tokenizer)
        self.generator.sync_weights(self.policy)
        # FSDP2: gather the weights once for decoding; peft's generate skips the root unit (no-op unsharded)
        with gathered_parameters(self.policy):
            return self.generator.generate_ids(
                batch["prompt_input_ids"], batch["prompt_attention_mask"], self.sampling, self.num_generations, seed
            )

    def score(self, batch: dict, completions: list[str]) -> Tensor:
        """Rewards `[B·G, K]` (NaN where a source does not apply)."""
        g = self.num_generations
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
        adv = compute_advantages(
            rewards_per_func, self.reward_weights, self.num_generations, self.scale_rewards, self.aggregation
        )
        completion_mask = completions.completion_mask
        if self.mask_truncated_completions:
            completion_mask = completion_mask * (~completions.truncated)[:, None].long()
        rollout = Rollout(
            completions.prompt_ids, completions.prompt_mask, completions.completion_ids, completion_mask,
            adv.advantages.to(self.device),
        )
        if self.num_iterations > 1 or self.steps_per_generation > 1:
            rollout.old_logps = self.frozen_logps(rollout, "old")
        if self.beta != 0.0:
            rollout.ref_logps = self.frozen_logps(rollout, "ref")
        metrics = self.reward_metrics(rewards_per_func, adv)
        lengths = completions.completion_mask.sum(1).float()
        for stat in ("mean", "min", "max"):
            metrics[f"completions/{stat}_length"] = getattr(lengths, stat)()
        metrics["completions/clipped_ratio"] = completions.truncated.float().mean()
        return rollout, metrics, [completions.texts, rewards_per_func, adv]

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
        if self.loss_type in ("grpo", "dr_grpo"):
            return len(micro) / len(part)
        if self.loss_type == "bnpo":
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
        return float(count) / self.steps_per_generation

    def optimisation_step(self, part: Rollout, num_items: float) -> dict:
        """One optimiser step on a slice of the rollout; returns its stats."""
        optimizer = self.optimizers()
        optimizer.zero_grad()
        stats = self.accumulate_gradients(part, num_items)
        if self.max_grad_norm is not None:
            self.clip_gradients(optimizer, gradient_clip_val=self.max_grad_norm, gradient_clip_algorithm="norm")
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
                beta=self.beta, epsilon=self.epsilon, epsilon_high=self.epsilon_high, loss_type=self.loss_type,
                max_completion_length=self.sampling.max_new_tokens, num_items_in_batch=num_items,
                use_bias_correction_kl=self.use_bias_correction_kl,
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

    def training_step(self, batch: dict, batch_idx: int) -> None:
        step = self.global_step
        seed = None if self.generation_seed is None else self.generation_seed + step + 1_000_003 * self.global_rank
        rollout, metrics, table = self.make_rollout(batch, seed)
        num_items = self.dapo_normaliser(rollout.completion_mask)
        history = defaultdict(list)
        for _ in range(self.num_iterations):
            for part in rollout.split(self.steps_per_generation):
                for k, v in self.optimisation_step(part, num_items).items():
                    history[k].append(v)
        metrics.update({k: sum(v) / len(v) for k, v in history.items()})
        size = len(batch["prompt"])
        self.log("reward", float(metrics.pop("reward")), prog_bar=True, batch_size=size)
        # each rank's loss is its share of the global one (dapo): the mean over ranks is the loss
        self.log("loss", float(metrics.pop("loss")), batch_size=size, sync_dist=True)
        self.log_dict({k: float(v) for k, v in metrics.items()}, batch_size=size)
        generation_index = step // (self.num_iterations * self.steps_per_generation)
        if self.log_completions_every_n_steps and generation_index % self.log_completions_every_n_steps == 0:
            self.log_completions(batch, step, *table)

    # ------------------------------------------------------------------ validation
    @torch.no_grad()
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        seed = None if self.generation_seed is None else self.generation_seed + batch_idx
        completions = self.sample(batch, seed)
        rewards_per_func = self.score(batch, completions.texts)
        adv = compute_advantages(
            rewards_per_func, self.reward_weights, self.num_generations, self.scale_rewards, self.aggregation
        )
        metrics = self.reward_metrics(rewards_per_func, adv)
        metrics["completions/mean_length"] = completions.completion_mask.sum(1).float().mean()
        size = len(batch["prompt"])
        self.log_dict({f"eval_{k}": float(v) for k, v in metrics.items()}, batch_size=size, sync_dist=True)

    # ------------------------------------------------------------------ completions table
    def log_completions(self, batch: dict, step: int, texts: list[str], rewards_per_func: Tensor, adv) -> None:
        """Append a few (prompt, completion, rewards, advantage) rows to completions.csv."""
        run_dir = Path(self.trainer.log_dir or self.trainer.default_root_dir)  # log_dir is a collective: all ranks
        if not self.trainer.is_global_zero:
            return
        g = self.num_generations
        rows = []
        for i in range(min(self.num_completions_to_log, len(texts))):
            prompt = batch["prompt"][i // g]
            prompt_text = prompt[-1]["content"] if isinstance(prompt, list) else str(prompt)
            row = {"step": step, "prompt": prompt_text, "completion": texts[i]}
            row.update({name: float(rewards_per_func[i, k]) for k, name in enumerate(self.reward_names)})
            row["advantage"] = float(adv.advantages[i])
            rows.append(row)
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / "completions.csv"
        new = not path.exists()
        with path.open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            if new:
                writer.writeheader()
            writer.writerows(rows)
        experiment = getattr(self.logger, "experiment", None)
        if hasattr(experiment, "add_text"):
            lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
            lines += ["| " + " | ".join(str(v).replace("|", "\\|").replace("\n", " ") for v in r.values()) + " |" for r in rows]
            experiment.add_text("completions", "\n".join(lines), step)



__all__ = ["GRPOModule", "Rollout"]
