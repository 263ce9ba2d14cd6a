"""Models: loading and identifying pipelines, tiny test pipelines, and UNet parameter selection.

The names below are imported on first use, so ``import conceptguard.models.params`` (torch only)
does not pay for importing diffusers.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "load_pipeline": "conceptguard.models.io",
    "detect_family": "conceptguard.models.io",
    "prediction_type": "conceptguard.models.io",
    "content_hash": "conceptguard.models.io",
    "model_components": "conceptguard.models.io",
    "read_safetensors_header": "conceptguard.models.io",
    "FAMILIES": "conceptguard.models.io",
    "build_tiny_pipeline": "conceptguard.models.tiny",
    "select_parameters": "conceptguard.models.params",
    "freeze_all_but": "conceptguard.models.params",
    "PRESETS": "conceptguard.models.params",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module_name = _EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
