"""The embedded world: a procedural image world, a tiny SD pipeline trained on it, and its detector.

Shipped inside the package (``assets/``) so that every command runs offline on a CPU:
``assets/pipeline`` (a standard StableDiffusionPipeline folder), ``assets/clip`` (the world's CLIP,
whose vision tower is the CLIP-score model), ``assets/detector`` and ``assets/manifest.json``.
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from pathlib import Path

from conceptguard.errors import ConceptGuardError

ASSETS_DIR = Path(__file__).parent / "assets"
PIPELINE_DIR = ASSETS_DIR / "pipeline"


def _require_assets(assets: Path = ASSETS_DIR) -> Path:
    if not (assets / "manifest.json").is_file():
        raise ConceptGuardError(
            f"the embedded world's weights are missing from {assets}; rebuild them with `conceptguard world build --install`")
    return assets


def verify_assets(assets: Path = ASSETS_DIR) -> dict:
    """Check every shipped file against the manifest's sha256; returns the manifest."""
    manifest = json.loads((_require_assets(assets) / "manifest.json").read_text())
    for relative, expected in manifest["files"].items():
        path = assets / relative
        if not path.is_file():
            raise ConceptGuardError(f"embedded world file missing: {relative}")
        actual = hashlib.sha256(path.read_bytes()).hexdigest()
        if actual != expected:
            raise ConceptGuardError(f"embedded world file {relative} does not match its manifest hash")
    return manifest


def load_embedded_pipeline(device: str = "cpu", torch_dtype=None, assets: Path = ASSETS_DIR):
    """The tiny StableDiffusionPipeline, loaded like any local diffusers folder."""
    import torch
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import logging as diffusers_logging

    _require_assets(assets)
    diffusers_logging.disable_progress_bar()
    pipe = StableDiffusionPipeline.from_pretrained(
        assets / "pipeline", local_files_only=True, use_safetensors=True, safety_checker=None,
        requires_safety_checker=False, dtype=torch_dtype or torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


@lru_cache(maxsize=2)
def load_detector(assets: Path = ASSETS_DIR):
    from safetensors.torch import load_file

    from conceptguard.world.models import Detector

    folder = _require_assets(assets) / "detector"
    config = json.loads((folder / "config.json").read_text())
    detector = Detector(width=config["width"], heads={k: tuple(v) for k, v in config["heads"].items()})
    detector.load_state_dict(load_file(folder / "model.safetensors"))
    return detector.eval().requires_grad_(False)


@lru_cache(maxsize=2)
def load_clip(assets: Path = ASSETS_DIR):
    """(CLIPModel, CLIPTokenizer) of the world: the CLIP-score model."""
    from transformers import CLIPModel, CLIPTokenizer

    folder = _require_assets(assets)
    model = CLIPModel.from_pretrained(folder / "clip", local_files_only=True, use_safetensors=True)
    tokenizer = CLIPTokenizer.from_pretrained(folder / "pipeline" / "tokenizer")
    return model.eval().requires_grad_(False), tokenizer
