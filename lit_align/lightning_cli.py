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
`ConfigError` raised at set-up inside `trainer.fit`. `JSONARGPARSE_DEBUG=1` shows the traceback.
"""

from __future__ import annotations

import os
import re
import sys
from typing import Optional

import lightning as L
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lit_align.checks import ConfigError
from lit_align.data.datamodule import AlignDataModule
from lit_align.reliability import reliability_callbacks

_KEY = re.compile(r'Parser key "([^"]+)"')
_LITERAL = re.compile(r"Expected a typing\.Literal\[(.*)\]\. Got value: (.*)", re.S)
_CLASS = re.compile(r"<class '([\w.]+)'>")
_EXPECTED = re.compile(r"Expected an? (.*)\. Got value: (.*)", re.S)


def _causes(ex: Optional[BaseException]) -> list[BaseException]:
    """`ex` and the exceptions it was raised from, outermost first."""
    chain: list[BaseException] = []
    while ex is not None and ex not in chain:
        chain.append(ex)
        ex = ex.__cause__ or ex.__context__
    return chain


def one_line(message: str, ex: Optional[BaseException] = None) -> str:
    """The option and the innermost reason of a parser or set-up error, on one line.

    jsonargparse nests a value's error inside a union's inside the subcommand's; the reason is
    the innermost exception, and the option is the chain of `Parser key "…"` names on the way.
    """
    chain = _causes(ex)
    config = next((e for e in chain if isinstance(e, ConfigError)), None)
    reason = str(config or (chain[-1] if chain else message))
    keys: list[str] = []
    for text in [message, *map(str, chain)]:
        found = _KEY.search(text)
        if found and (not keys or keys[-1] != found.group(1)):
            keys.append(found.group(1))
    literal = _LITERAL.fullmatch(reason.strip())
    if literal:
        choices = ", ".join(c.strip().strip("'\"") for c in literal.group(1).split(","))
        reason = f"{literal.group(2).strip()!r} is not one of: {choices}"
    elif _EXPECTED.fullmatch(reason.strip()):
        expected = _EXPECTED.fullmatch(reason.strip())
        reason = f"expected {expected.group(1)}, got {expected.group(2).strip()!r}"
    reason = " ".join(_CLASS.sub(r"\1", reason).split())
    if config is None and keys and not reason.startswith(keys[-1]):
        reason = f"{'.'.join(keys)}: {reason}"
    return reason


def _exit(message: str, ex: Optional[BaseException] = None):
    sys.stderr.write(f"lit-align: error: {one_line(message, ex)}\n")
    raise SystemExit(2)


def _debug() -> bool:
    return os.environ.get("JSONARGPARSE_DEBUG", "").lower() not in ("", "0", "false", "no")


class OneLineErrorParser(LightningArgumentParser):
    """Parser errors as one line (no usage dump, no union listing)."""

    def error(self, message: str, ex: Optional[Exception] = None):
        if not self.exit_on_error or _debug():  # a nested parser: its caller reports the error
            return super().error(message, ex)
        _exit(message, ex)


class AlignCLI(LightningCLI):
    """LightningCLI whose configuration mistakes are one line (see the module docstring)."""

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except (ValueError, OSError) as ex:  # a class refused its arguments: a configuration mistake
            if _debug():
                raise
            _exit(str(ex), ex)


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
        if _debug():
            raise
        _exit(str(ex), ex)
