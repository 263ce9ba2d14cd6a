"""Recovery curves: how often the target concept shows up as an attack proceeds.

A curve point is the detection rate of the concept on a fixed prompt set — the same prompts and
seeds at every point, so the only thing that changes between points is the model (re-learning) or
the adversarial prompt (prompt attacks). Step 0 is the model before the attack, which makes the
first point the "without attack" rate and the last the "with attack" rate (the ASR).

An attack run folder holds::

    attack.json   the attack record read by ``conceptguard report`` (see ``attack_record``)
    curve.png     the recovery curve
    timing.json   wall-clock seconds (kept out of attack.json, which is reproducible)
    train/        re-learning attacks: the training loop's run folder (config, log, checkpoints)
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from conceptguard.errors import ConceptGuardError

ATTACK_FORMAT = "conceptguard-attack"
ATTACK_FILE = "attack.json"
CURVE_FILE = "curve.png"
TIMING_FILE = "timing.json"

# A detector maps uint8 images (N, H, W, 3) to one bool per image: "the concept is there".
Detector = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class EvalPrompt:
    """One image of the curve's prompt set: what to prompt (with the concept's own word) and its seed."""

    prompt: str
    seed: int


@dataclass(frozen=True)
class CurvePoint:
    step: int
    detection: float
    n: int

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "detection": round(self.detection, 6), "n": self.n}


# --------------------------------------------------------------------------------------------
# Detectors and prompt sets
# --------------------------------------------------------------------------------------------

def world_detector(concept: str, assets: str | Path | None = None) -> Detector:
    """The embedded world's detector, reading the head that names ``concept`` (a canonical name)."""
    from conceptguard.evaluation.prompts import check_concepts, concept_head
    from conceptguard.world import ASSETS_DIR, load_detector
    from conceptguard.world.dataset import images_to_tensor

    check_concepts([concept])
    head, label = concept_head(concept)
    detector = load_detector(Path(assets) if assets is not None else ASSETS_DIR)

    def detect(images: np.ndarray) -> np.ndarray:
        images = _resize(images, 64)
        with torch.no_grad():
            found = detector.predict(images_to_tensor(images))[head]
        return np.array([value == label for value in found], dtype=bool)

    return detect


def nudenet_detector(threshold: float | None = None) -> Detector:
    """NudeNet's convention of the field: any ``*_EXPOSED`` class above ``threshold`` (default 0.6)."""
    from PIL import Image

    from conceptguard.evaluation.metrics import NUDENET_THRESHOLD, load_nudenet, nudenet_flagged

    model, _ = load_nudenet()
    threshold = NUDENET_THRESHOLD if threshold is None else threshold

    def detect(images: np.ndarray) -> np.ndarray:
        flags = []
        with tempfile.TemporaryDirectory(prefix="conceptguard-nudenet-") as folder:
            for i, image in enumerate(images):
                path = Path(folder) / f"{i}.png"
                Image.fromarray(image).save(path)  # NudeNet reads files
                flags.append(nudenet_flagged(model.detect(str(path)), threshold))
        return np.array(flags, dtype=bool)

    return detect


def detector_for(concept: str, kind: str = "auto", assets: str | Path | None = None) -> Detector:
    """``kind``: ``world`` (the embedded detector), ``nudenet``, or ``auto`` (nudenet for "nudity")."""
    if kind == "auto":
        kind = "nudenet" if concept.lower() in ("nudity", "nude", "nsfw") else "world"
    if kind == "world":
        return world_detector(concept, assets)
    if kind == "nudenet":
        return nudenet_detector()
    raise ConceptGuardError(f"unknown detector {kind!r}; choose world, nudenet or auto")


def world_prompts(concept: str, n: int = 32, seed: int = 0) -> list[EvalPrompt]:
    """The evaluation harness's seeded target prompts for a world concept."""
    from conceptguard.evaluation.prompts import check_concepts, concept_prompts

    check_concepts([concept])
    return [EvalPrompt(r.prompt, r.seed) for r in concept_prompts(concept, "target", n, seed)]


def csv_prompts(path: str | Path) -> list[EvalPrompt]:
    """Prompts of a CSV in the field's format (``prompt``, ``evaluation_seed``; I2P, UnlearnDiff)."""
    from conceptguard.evaluation.prompts import load_prompt_csv

    return [EvalPrompt(r.prompt, r.seed) for r in load_prompt_csv(path)]


def _resize(images: np.ndarray, size: int) -> np.ndarray:
    if images.shape[1] == size and images.shape[2] == size:
        return images
    from PIL import Image

    return np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.BICUBIC)) for im in images])


# --------------------------------------------------------------------------------------------
# Measuring one point
# --------------------------------------------------------------------------------------------

@dataclass
class GenerationSettings:
    num_inference_steps: int = 25
    guidance_scale: float = 7.5
    batch_size: int = 32


def detection_rate(pipe, prompts: Sequence[str], seeds: Sequence[int], detector: Detector,
                   settings: GenerationSettings | None = None) -> tuple[float, np.ndarray]:
    """(share of images in which ``detector`` finds the concept, per-image flags)."""
    from conceptguard.sampling import generate_images

    settings = settings or GenerationSettings()
    images = generate_images(pipe, list(prompts), seeds=list(seeds), num_inference_steps=settings.num_inference_steps,
                             guidance_scale=settings.guidance_scale, batch_size=settings.batch_size, progress=False)
    flags = np.asarray(detector(images), dtype=bool)
    return float(flags.mean()) if len(flags) else float("nan"), flags


class CurveRecorder:
    """Measures the detection rate of a fixed prompt set each time it is called with a step.

    ``trigger`` is the word the attack teaches (a Textual Inversion placeholder, a DreamBooth
    identifier); it replaces the concept's name in the prompts, since the attacked model is
    prompted the way the attacker would prompt it.
    """

    def __init__(self, pipe, prompts: Sequence[EvalPrompt], detector: Detector, *, concept: str,
                 trigger: str | None = None, settings: GenerationSettings | None = None):
        from conceptguard.attacks.tokens import replace_word

        if not prompts:
            raise ConceptGuardError("the recovery curve needs at least one evaluation prompt")
        self.pipe, self.detector, self.settings = pipe, detector, settings or GenerationSettings()
        trigger = trigger or concept
        self.prompts = [replace_word(p.prompt, concept, trigger) if trigger != concept else p.prompt for p in prompts]
        self.seeds = [p.seed for p in prompts]
        self.points: list[CurvePoint] = []

    def __call__(self, step: int) -> CurvePoint:
        rate, _ = detection_rate(self.pipe, self.prompts, self.seeds, self.detector, self.settings)
        point = CurvePoint(int(step), rate, len(self.prompts))
        self.points.append(point)
        return point


def check_checkpoints(checkpoints: Sequence[int], steps: int) -> list[int]:
    """Sorted, unique curve steps within ``[0, steps]``."""
    out = sorted({int(c) for c in checkpoints})
    if not out:
        raise ConceptGuardError("give at least one curve checkpoint (e.g. --checkpoints 0 50 100 200)")
    if out[0] < 0 or out[-1] > steps:
        raise ConceptGuardError(f"curve checkpoints must lie between 0 and the attack's {steps} steps; got {out}")
    return out


# --------------------------------------------------------------------------------------------
# The attack record
# --------------------------------------------------------------------------------------------

def asr_summary(points: Sequence[CurvePoint]) -> dict[str, Any]:
    """Attack success rate without the attack (step 0, when measured) and with it (the last point)."""
    first, last = points[0], points[-1]
    return {"no_attack": round(first.detection, 6) if first.step == 0 else None,
            "attack": round(last.detection, 6), "step": last.step, "n": last.n}


def attack_record(*, kind: str, model: str, concept: str, config: dict[str, Any], points: Sequence[CurvePoint],
                  prompts: Sequence[str], seeds: Sequence[int], extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``attack.json`` object: report's attack schema plus provenance and the ASR."""
    record = {
        "format": ATTACK_FORMAT,
        "kind": kind,
        "model": model,
        "concept": concept,
        "metric": "detection",
        "config": config,
        "curve": [p.to_dict() for p in points],
        "asr": asr_summary(points),
        "prompts": [{"prompt": p, "seed": int(s)} for p, s in zip(prompts, seeds)],
    }
    record.update(extra or {})
    return record


def curve_png(record: dict[str, Any]) -> bytes:
    from conceptguard.report.plots import recovery_curves

    label = f"{record['kind']} / {record['concept']}"
    points = [(p["step"], p["detection"]) for p in record["curve"]]
    return recovery_curves(f"Recovery of {record['concept']!r} under {record['kind']}", {label: points})


def write_attack_outputs(out_dir: str | Path, record: dict[str, Any], timing: dict[str, float] | None = None) -> Path:
    """Write ``attack.json``, ``curve.png`` and ``timing.json`` into ``out_dir`` (each atomically)."""
    from conceptguard.outputs import atomic_write_bytes, atomic_write_json

    out_dir = Path(out_dir)
    atomic_write_bytes(out_dir / CURVE_FILE, curve_png(record))
    if timing is not None:
        atomic_write_json(out_dir / TIMING_FILE, {k: round(v, 3) for k, v in timing.items()})
    return atomic_write_json(out_dir / ATTACK_FILE, record)


__all__ = [
    "ATTACK_FILE",
    "ATTACK_FORMAT",
    "CURVE_FILE",
    "CurvePoint",
    "CurveRecorder",
    "Detector",
    "EvalPrompt",
    "GenerationSettings",
    "asr_summary",
    "attack_record",
    "check_checkpoints",
    "csv_prompts",
    "detection_rate",
    "detector_for",
    "nudenet_detector",
    "world_detector",
    "world_prompts",
    "write_attack_outputs",
]
