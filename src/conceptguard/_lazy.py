"""Lazy package exports: ``from conceptguard.models import load_pipeline`` imports torch/diffusers
only when the name is first used, so the CLI's ``--help`` stays fast."""

from __future__ import annotations

import importlib
from typing import Any


def lazy_exports(package: str, exports: dict[str, str], namespace: dict[str, Any]):
    """Return ``(__getattr__, __dir__, __all__)`` for a package exporting ``name -> module``."""

    def __getattr__(name: str) -> Any:
        module_name = exports.get(name)
        if module_name is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module_name), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(exports))

    return __getattr__, __dir__, sorted(exports)
