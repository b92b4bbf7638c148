"""What every lit_align LightningModule shares: optimiser wiring, sharding, lean checkpoints."""

from __future__ import annotations

import math
from typing import Callable, Iterable, Optional

import lightning as L
import torch
from torch.optim.lr_scheduler import LambdaLR


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


class AlignModule(L.LightningModule):
    """Base class: a module with an HF model loaded in `configure_model`.

    Subclasses set `self.tokenizer` in `__init__` (the DataModule tokenises with it) and call
    `self.shard_model(model)` in `configure_model` so FSDP2 (ModelParallelStrategy) can
    shard it. Checkpoints carry only what training changes: frozen parameters (a LoRA
    base, a reference copy) are dropped on save and taken from the loaded model on load.
    """

    optimizer: Callable = default_optimizer
    lr_scheduler: Optional[Callable] = None
    sharding_options: dict = {}

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
        """Trainable parameters for the optimiser; override to add groups with their own settings."""
        return [{"params": [p for p in self.parameters() if p.requires_grad]}]

    def configure_optimizers(self):
        optimizer = self.optimizer(self.parameter_groups())
        if self.lr_scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.lr_scheduler(optimizer), "interval": "step"}}

    # ------------------------------------------------------------------ lean checkpoints
    def _frozen_keys(self) -> set[str]:
        # from the state dict, not named_parameters(): a tied weight (lm_head = embeddings) has
        # one parameter but two state-dict keys
        state = self.state_dict(keep_vars=True)
        return {k for k, v in state.items() if isinstance(v, torch.nn.Parameter) and not v.requires_grad}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("state_dict")
        if state is None or getattr(self, "_device_mesh", None) is not None:
            return
        frozen = self._frozen_keys()
        checkpoint["state_dict"] = {k: v for k, v in state.items() if k not in frozen}
        checkpoint["lit_align_frozen_keys"] = sorted(frozen & set(state))

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        dropped = checkpoint.get("lit_align_frozen_keys")
        if not dropped:
            return
        own = self.state_dict()
        missing = [k for k in dropped if k not in own]
        if missing:
            raise ValueError(
                f"checkpoint was saved without {len(missing)} frozen weights this module does not have "
                f"(e.g. {missing[0]}): load it with the same model.policy configuration"
            )
        checkpoint["state_dict"].update({k: own[k] for k in dropped})
