"""LightningCLI for `lit-align fit|validate|test|predict`.

`model` is any LightningModule (`model.class_path: lit_align.DPOModule`, ...), `data` is the
shared AlignDataModule. Optimisers and schedulers come from YAML as class paths, e.g.

    model:
      optimizer: {class_path: torch.optim.AdamW, init_args: {lr: 5.0e-7}}

`seed_everything` (default 0) is applied before the model is built, so LoRA and head
initialisation are reproducible.

A configuration mistake prints one line, `lit-align: error: <option>: <what is wrong>`, and
exits with status 2: a value the parser refuses (an unknown choice, a wrong type, an unknown
key), a class that refuses its arguments (a `ValueError` or `OSError` while building it), or a
`ConfigError` raised at set-up inside `trainer.fit` (lit_align/cli_errors.py).
`JSONARGPARSE_DEBUG=1` shows the traceback.
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lit_align.checks import ConfigError
from lit_align.cli_errors import OneLineErrors, debug, exit_with_one_line
from lit_align.data.datamodule import AlignDataModule
from lit_align.reliability import reliability_callbacks


class OneLineErrorParser(OneLineErrors, LightningArgumentParser):
    """LightningCLI's parser with one-line errors."""


class AlignCLI(LightningCLI):
    """LightningCLI whose configuration mistakes are one line (see the module docstring)."""

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except (ValueError, OSError) as ex:  # a class refused its arguments: a configuration mistake
            if debug():
                raise
            exit_with_one_line(str(ex), ex)


def run_lightning_cli(argv: list[str] | None = None) -> LightningCLI:
    """Run LightningCLI on `argv` (None: the process's own arguments)."""
    try:
        return AlignCLI(
            L.LightningModule,
            AlignDataModule,
            subclass_mode_model=True,
            seed_everything_default=0,
            args=argv,
            parser_class=OneLineErrorParser,
            save_config_kwargs={"overwrite": True},
            auto_configure_optimizers=False,
            # NaN/inf guard, atomic checkpoint writes, RNG states for exact resume (docs/reliability.md)
            trainer_defaults={"callbacks": reliability_callbacks()},
        )
    except ConfigError as ex:  # found at set-up, inside trainer.fit
        if debug():
            raise
        exit_with_one_line(str(ex), ex)
