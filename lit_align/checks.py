"""Configuration mistakes: one exception type the command line prints as one line, and range checks.

A module or DataModule raises `ConfigError` (a `ValueError`) for a setting the user has to change;
`lit-align` prints `lit-align <command>: error: <message>` without a traceback, whether the
mistake is found while parsing, while building the classes, or at set-up inside `trainer.fit`.
"""

from __future__ import annotations

import math
from typing import Optional


class ConfigError(ValueError):
    """A setting that cannot work, with what to change."""


def check_range(
    name: str,
    value: Optional[float],
    low: Optional[float] = None,
    high: Optional[float] = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
    why: str = "",
) -> None:
    """Raise `ConfigError` unless low ≤ value ≤ high (< with `low_open` / `high_open`); None passes.

    `name` is the option as the user writes it (`model.beta`), `why` says what the bound protects.
    """
    if value is None:
        return
    bad = isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
    if not bad and low is not None:
        bad = value <= low if low_open else value < low
    if not bad and high is not None:
        bad = value >= high if high_open else value > high
    if bad:
        lower = "" if low is None else f"{low} {'<' if low_open else '≤'} "
        upper = "" if high is None else f" {'<' if high_open else '≤'} {high}"
        raise ConfigError(f"{name}={value!r} is out of range: it must be {lower}{name.rsplit('.', 1)[-1]}{upper}"
                          + (f" ({why})" if why else ""))


__all__ = ["ConfigError", "check_range"]
