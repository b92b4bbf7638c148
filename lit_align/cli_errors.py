"""Configuration mistakes on the command line as one line: `lit-align: error: <option>: <reason>`.

Both command lines use this: LightningCLI (`lit-align fit`, lit_align/lightning_cli.py) and the
plain subcommands (`lit-align build-cod`, ..., parsed by `jsonargparse.auto_cli`). A parser error
is reduced to the option and the innermost reason (jsonargparse nests a value's error inside a
union's inside the subcommand's); a `ConfigError` prints its message. `JSONARGPARSE_DEBUG=1`
keeps jsonargparse's own report and the traceback.
"""

from __future__ import annotations

import os
import re
import sys
from typing import NoReturn, Optional

from lit_align.checks import ConfigError

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


def exit_with_one_line(message: str, ex: Optional[BaseException] = None) -> NoReturn:
    """Print `lit-align: error: <one line>` on stderr and exit with status 2 (a usage error)."""
    sys.stderr.write(f"lit-align: error: {one_line(message, ex)}\n")
    raise SystemExit(2)


def debug() -> bool:
    """JSONARGPARSE_DEBUG is set: show tracebacks instead of one line."""
    return os.environ.get("JSONARGPARSE_DEBUG", "").lower() not in ("", "0", "false", "no")


class OneLineErrors:
    """Mixin for a jsonargparse ArgumentParser: errors as one line (no usage dump, no union listing)."""

    def error(self, message: str, ex: Optional[Exception] = None):
        if not self.exit_on_error or debug():  # a nested parser: its caller reports the error
            return super().error(message, ex)
        exit_with_one_line(message, ex)
