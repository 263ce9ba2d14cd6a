"""Models: loading and identifying pipelines, tiny test pipelines, and UNet parameter selection.

The names below are imported on first use, so ``import conceptguard.models.params`` (torch only)
does not pay for importing diffusers.
"""

from __future__ import annotations

from conceptguard._lazy import lazy_exports

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

__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS, globals())
