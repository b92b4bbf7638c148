"""What every lit_align LightningModule shares: optimiser wiring, sharding, lean checkpoints."""

from __future__ import annotations

import logging
import math
from typing import Callable, Iterable, Optional

import lightning as L
import torch
import torch.distributed as dist
from torch.optim.lr_scheduler import LambdaLR

from lit_align.checks import ConfigError, check_range

log = logging.getLogger(__name__)


class WarmupCosineLR(LambdaLR):
    """Linear warm-up for `warmup_steps`, then cosine decay to `min_ratio` × lr at `total_steps`."""

    def __init__(self, optimizer, warmup_steps: int = 0, total_steps: int = 1000, min_ratio: float = 0.0):
        def factor(step: int) -> float:
            if step < warmup_steps:
                return (step + 1) / max(1, warmup_steps)
            progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
            return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

        super().__init__(optimizer, factor)


def default_optimizer(params: Iterable) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-6)


def build_optimizer(optimizer: Callable, groups: list[dict]) -> torch.optim.Optimizer:
    """`optimizer(groups)`, refusing a learning rate that would not descend (torch accepts lr=0)."""
    try:
        built = optimizer(groups)
    except ValueError as err:  # torch's own checks: "Invalid learning rate: -1.0", ...
        raise ConfigError(f"model.optimizer: {err}") from err
    for group in built.param_groups:
        lr = float(group["lr"])
        check_range("model.optimizer lr", lr, 0, low_open=True, why="0 trains nothing; a negative rate ascends the loss")
    return built


class AlignModule(L.LightningModule):
    """Base class: a module with an HF model loaded in `configure_model`.

    Subclasses set `self.tokenizer` in `__init__` (the DataModule tokenises with it) and call
    `self.shard_model(model)` in `configure_model` so FSDP2 (ModelParallelStrategy) can
    shard it. Checkpoints carry only what training changes: frozen parameters (a LoRA
    base, a reference copy) are dropped on save and taken from the loaded model on load.

    A small module trained alongside the main one with settings of its own (DPO's co-trained
    probe) gets a side optimiser from `side_optimizers()`: it steps with every optimiser step
    of the main one, on the gradients of the same backward, and is neither scheduled nor
    clipped with it; its state is saved in and resumed from the checkpoint.
    """

    optimizer: Callable = default_optimizer
    lr_scheduler: Optional[Callable] = None
    sharding_options: dict = {}

    def on_train_end(self) -> None:
        """Export the trained model to `export_dir` (when set) at the end of fit: rank 0, unsharded
        runs only (under FSDP2 export the last checkpoint with `lit-align export`)."""
        export_dir = getattr(self, "export_dir", None)
        if export_dir is not None and self.trainer.is_global_zero and getattr(self, "_device_mesh", None) is None:
            log.info("exported %s to %s", type(self).__name__, self.export(export_dir))

    def export(self, out_dir):
        """Save the trained model as a Hugging Face directory (modules with `export_dir` define it)."""
        raise NotImplementedError(f"{type(self).__name__} has no export")

    def shard_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """Apply FSDP2 to `model` when the strategy provides a device mesh; no-op otherwise.

        A frozen model (a reference) is sharded or replicated as the strategy's `reference` says.
        """
        mesh = getattr(self, "_device_mesh", None)
        if mesh is None:
            return model
        from lit_align.sharding import apply_sharding, strategy_options

        # options from the strategy YAML (FSDP2Strategy), overridable per module class
        options = {**strategy_options(self.trainer.strategy), **self.sharding_options}
        return apply_sharding(model, mesh, **options)

    def parameter_groups(self) -> list[dict]:
        """Trainable parameters for the optimiser (those of side optimisers left out); override to
        add groups with their own settings."""
        sides = getattr(self, "_side_optimizers", None) or {}
        side = {id(p) for opt in sides.values() for group in opt.param_groups for p in group["params"]}
        return [{"params": [p for p in self.parameters() if p.requires_grad and id(p) not in side]}]

    def configure_optimizers(self):
        self._side_optimizers = self.side_optimizers()
        self._load_side_states(getattr(self, "_side_optimizer_states", None) or {})
        self._side_optimizer_states = {}
        optimizer = build_optimizer(self.optimizer, self.parameter_groups())
        if self.lr_scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.lr_scheduler(optimizer), "interval": "step"}}

    # ------------------------------------------------------------------ side optimisers
    def side_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """Optimisers of parameters kept out of `parameter_groups()`, by name; override to add."""
        return {}

    def on_before_optimizer_step(self, optimizer) -> None:
        # Lightning calls this once per main step, after gradient accumulation and before it
        # clips the main optimiser's gradients: side optimisers step on their own, unclipped ones
        sides = getattr(self, "_side_optimizers", None) or {}
        # NonFiniteGuard drops a bad step by clearing the main gradients: the side steps go with it
        stepped = any(p.grad is not None for group in optimizer.param_groups for p in group["params"])
        for side in sides.values():
            if stepped:
                self._average_grads([p for group in side.param_groups for p in group["params"]])
                side.step()
            side.zero_grad(set_to_none=True)

    def _load_side_states(self, states: dict) -> None:
        for name, state in states.items():
            if name not in self._side_optimizers:
                raise ConfigError(
                    f"the checkpoint holds the state of a side optimiser {name!r} that this {type(self).__name__} "
                    f"does not have (it has {sorted(self._side_optimizers)}): resume with the configuration "
                    "that wrote the checkpoint (e.g. model.co_train_probe)"
                )
            self._side_optimizers[name].load_state_dict(state)

    def _average_grads(self, params: list[torch.Tensor]) -> None:
        """Average gradients over ranks where no DDP wrapper does it: FSDP2 (a device mesh)
        shards only what `shard_model` wrapped, and a side-trained module stays replicated."""
        if getattr(self, "_device_mesh", None) is None or not dist.is_initialized() or dist.get_world_size() == 1:
            return
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)  # a sum (gloo has no average)
        flat /= dist.get_world_size()
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    # ------------------------------------------------------------------ lean checkpoints
    def _frozen_keys(self) -> set[str]:
        # from the state dict, not named_parameters(): a tied weight (lm_head = embeddings) has
        # one parameter but two state-dict keys
        state = self.state_dict(keep_vars=True)
        return {k for k, v in state.items() if isinstance(v, torch.nn.Parameter) and not v.requires_grad}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        sides = getattr(self, "_side_optimizers", None) or {}
        if sides:
            checkpoint["lit_align_side_optimizers"] = {name: opt.state_dict() for name, opt in sides.items()}
        state = checkpoint.get("state_dict")
        if state is None or getattr(self, "_device_mesh", None) is not None:
            return
        frozen = self._frozen_keys()
        checkpoint["state_dict"] = {k: v for k, v in state.items() if k not in frozen}
        checkpoint["lit_align_frozen_keys"] = sorted(frozen & set(state))

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        sides = checkpoint.get("lit_align_side_optimizers") or {}
        if getattr(self, "_side_optimizers", None) is not None:  # FSDP2 restores after the optimisers exist
            self._load_side_states(sides)
        else:  # loaded by configure_optimizers
            self._side_optimizer_states = dict(sides)
        dropped = checkpoint.get("lit_align_frozen_keys")
        if not dropped:
            return
        own = self.state_dict()
        missing = [k for k in dropped if k not in own]
        if missing:
            raise ConfigError(
                f"checkpoint was saved without {len(missing)} frozen weights this module does not have "
                f"(e.g. {missing[0]}): load it with the same model.policy configuration"
            )
        checkpoint["state_dict"].update({k: own[k] for k in dropped})
