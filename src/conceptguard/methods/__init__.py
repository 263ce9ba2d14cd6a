"""The method registry: every defense registers itself here in one line (peft-style).

A method module defines a ``Config`` dataclass and a function ``apply(pipe, config, *, run_dir,
resume) -> MethodResult`` that edits ``pipe`` in place, then registers it::

    @register_method("esd", kind="erase", config=ESDConfig)
    def apply(pipe, config, *, run_dir, resume=False) -> MethodResult: ...

Users call one function — :func:`apply_method` (or the ``erase``/``immunize`` shorthands) — and the
CLI builds the config from flags and files through the same registry.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from conceptguard.errors import ConceptGuardError

# Modules imported on first use of the registry; each registers its methods at import.
METHOD_MODULES = (
    "conceptguard.methods.esd",
    "conceptguard.methods.sdd",
    "conceptguard.methods.uce",
    "conceptguard.methods.imma",
    "conceptguard.methods.mima",
)


@dataclass
class MethodResult:
    """What a method changed: component-prefixed tensor names (``unet.…``) and a human summary."""

    changed: list[str]
    summary: str
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class MethodSpec:
    name: str
    kind: str  # erase | immunize | guard
    config: type
    apply: Callable[..., MethodResult]
    description: str


_REGISTRY: dict[str, MethodSpec] = {}
_loaded = False


def register_method(name: str, *, kind: str, config: type, description: str = ""):
    def decorator(fn):
        if name in _REGISTRY and _REGISTRY[name].apply is not fn:
            raise RuntimeError(f"method {name!r} registered twice")
        _REGISTRY[name] = MethodSpec(name, kind, config, fn, description or (fn.__doc__ or "").strip().split("\n")[0])
        return fn

    return decorator


def _load_all() -> None:
    global _loaded
    if _loaded:
        return
    for module in METHOD_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:  # a missing dependency of an existing module is a real error
                raise
    _loaded = True


def methods(kind: str | None = None) -> dict[str, MethodSpec]:
    _load_all()
    return {n: s for n, s in _REGISTRY.items() if kind is None or s.kind == kind}


def get_method(name: str, kind: str | None = None) -> MethodSpec:
    available = methods(kind)
    if name not in available:
        raise ConceptGuardError(f"unknown {kind or ''} method {name!r}; available: {', '.join(sorted(available)) or 'none'}".replace("  ", " "))
    return available[name]


def apply_method(pipe, name: str, config=None, *, run_dir: str | Path, resume: bool = False, train_config=None,
                 **overrides) -> MethodResult:
    """Run method ``name`` on ``pipe`` (edited in place). ``overrides`` set config fields;
    ``train_config`` (a TrainConfig) replaces a trained method's paper defaults."""
    spec = get_method(name)
    if config is None:
        config = spec.config(**overrides)
    elif overrides:
        from dataclasses import replace

        config = replace(config, **overrides)
    kwargs = {"train_config": train_config} if train_config is not None else {}
    return spec.apply(pipe, config, run_dir=Path(run_dir), resume=resume, **kwargs)
