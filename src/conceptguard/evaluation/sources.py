"""Image sources: anything ``eval`` can generate images from — a model, or a model plus an
inference-time defense (negative prompt, SLD, SEGA) — behind one small protocol.

A source spec is ``KIND[:OPTION]`` with a model: ``model`` (plain sampling), ``negative-prompt``,
``sld:strong``, ``sega``. Kinds register themselves in one line::

    @register_source("sld")
    def make_sld(pipe, concepts, option): return SLDSource(pipe, concepts, preset=option or "medium")
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

import numpy as np

from conceptguard.errors import ConceptGuardError

# Modules that register further kinds when imported (inference-time baselines).
SOURCE_MODULES = ("conceptguard.methods.inference",)


@runtime_checkable
class ImageSource(Protocol):
    name: str

    def generate(self, prompts: Sequence[str], seeds: Sequence[int], *, num_inference_steps: int,
                 guidance_scale: float, batch_size: int = 64) -> np.ndarray:
        """uint8 (N, H, W, 3), image i from prompts[i] with a generator seeded seeds[i]."""


class PipelineSource:
    """Plain sampling from a diffusers pipeline."""

    def __init__(self, pipe, name: str = "model"):
        self.pipe, self.name = pipe, name

    def generate(self, prompts, seeds, *, num_inference_steps, guidance_scale, batch_size=64):
        from conceptguard.sampling import generate_images

        return generate_images(self.pipe, prompts, seeds=seeds, num_inference_steps=num_inference_steps,
                               guidance_scale=guidance_scale, batch_size=batch_size, progress=False)


_FACTORIES: dict[str, Callable[..., ImageSource]] = {"model": lambda pipe, concepts, option: PipelineSource(pipe)}
_loaded = False


def register_source(kind: str):
    def decorator(factory):
        _FACTORIES[kind] = factory
        return factory

    return decorator


def source_kinds() -> list[str]:
    global _loaded
    if not _loaded:
        for module in SOURCE_MODULES:
            try:
                importlib.import_module(module)
            except ModuleNotFoundError as exc:
                if exc.name != module:
                    raise
        _loaded = True
    return sorted(_FACTORIES)


def make_source(spec: str, pipe, concepts: Sequence[str] = ()) -> ImageSource:
    """Build the source named by ``spec`` (``KIND[:OPTION]``) around ``pipe``."""
    kind, _, option = spec.partition(":")
    if kind not in source_kinds():
        raise ConceptGuardError(f"unknown image source {spec!r}; available: {', '.join(source_kinds())}")
    source = _FACTORIES[kind](pipe, list(concepts), option or None)
    source.name = spec
    return source
