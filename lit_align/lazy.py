"""Public names that load on first use (PEP 562), so that importing a package stays cheap."""

from __future__ import annotations

import importlib
import sys
from typing import Callable


def lazy_exports(package: str, exports: dict[str, str]) -> tuple[Callable, Callable]:
    """`__getattr__` and `__dir__` for `package`, whose names `exports` ({name: module}) are imported
    from their module when first read: `__getattr__, __dir__ = lazy_exports(__name__, EXPORTS)`."""

    def __getattr__(name: str):
        if name in exports:
            return getattr(importlib.import_module(exports[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__():
        return sorted(list(vars(sys.modules[package])) + list(exports))

    return __getattr__, __dir__
