"""LightningCLI for `lit-align fit|validate|test|predict`.

`model` is any LightningModule (`model.class_path: lit_align.DPOModule`, ...), `data` is the
shared AlignDataModule. Optimisers and schedulers come from YAML as class paths, e.g.

    model:
      optimizer: {class_path: torch.optim.AdamW, init_args: {lr: 5.0e-7}}

`seed_everything` (default 0) is applied before the model is built, so LoRA and head
initialisation are reproducible.
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.cli import LightningCLI

from lit_align.data.datamodule import AlignDataModule
from lit_align.reliability import reliability_callbacks


def run_lightning_cli(argv: list[str] | None = None) -> LightningCLI:
    """Run LightningCLI on `argv` (None: the process's own arguments)."""
    return LightningCLI(
        L.LightningModule,
        AlignDataModule,
        subclass_mode_model=True,
        seed_everything_default=0,
        args=argv,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
        # NaN/inf guard, atomic checkpoint writes, RNG states for exact resume (docs/reliability.md)
        trainer_defaults={"callbacks": reliability_callbacks()},
    )
