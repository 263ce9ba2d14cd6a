"""The quality bar of the embedded world: does the tiny model draw what it is asked for?

Prompts are built from label dicts, images generated with the pipeline's own sampler (DDIM) at
guidance 7.5, and the detector's reading is compared with the prompted concept.
"""

from __future__ import annotations

import numpy as np
import torch

from conceptguard.sampling import generate_images
from conceptguard.world.concepts import HELD_OUT_CHARACTERS, SEEN_CHARACTERS, SHAPES
from conceptguard.world.dataset import images_to_tensor, make_caption, sample_labels

# Minimum rates from the world's specification; held-out characters are a maximum.
QUALITY_BAR = {"shape": 0.90, "colour": 0.90, "style": 0.80, "seen_character": 0.80, "held_out_character": 0.10}


def object_prompts(n_per_shape: int, seed: int) -> tuple[list[str], list[dict]]:
    prompts, labels = [], []
    for k, shape in enumerate(SHAPES):
        for i in range(n_per_shape):
            rng = np.random.default_rng([seed, 7, k, i])
            label = sample_labels(rng, "pretrain", shape=shape, halo="absent")
            prompts.append(make_caption(label, rng, paraphrase_prob=0.0, halo_mode="omit"))
            labels.append(label)
    return prompts, labels


def character_prompts(names, n_per_character: int, seed: int) -> tuple[list[str], list[dict]]:
    prompts, labels = [], []
    for k, name in enumerate(names):
        for i in range(n_per_character):
            rng = np.random.default_rng([seed, 8, k, i])
            label = sample_labels(rng, "all", character=name, halo="absent")
            prompts.append(make_caption(label, rng, paraphrase_prob=0.0, halo_mode="omit"))
            labels.append(label)
    return prompts, labels


def detect(detector, images: np.ndarray) -> dict[str, list[str]]:
    with torch.no_grad():
        return detector.predict(images_to_tensor(images))


def agreement(predicted: list[str], labels: list[dict], head: str) -> float:
    return float(np.mean([p == lab[head] for p, lab in zip(predicted, labels)])) if labels else float("nan")


def prompted_probability(detector, images: np.ndarray, labels: list[dict], head: str, batch_size: int = 256) -> float:
    """Mean probability the detector's ``head`` gives the prompted label: agreement without the argmax.

    A continuous reading of the same question as :func:`agreement`, so two models whose images are
    near the decision boundary differ by a fraction of an image, not by whole images.
    """
    if not labels:
        return float("nan")
    names = detector.heads_spec[head]
    target = torch.tensor([names.index(lab[head]) for lab in labels])
    probs = []
    with torch.no_grad():
        for chunk in images_to_tensor(images).split(batch_size):
            probs.append(detector(chunk)[head].float().softmax(-1))
    return float(torch.cat(probs).gather(1, target[:, None]).mean())


def measure_quality(pipe, detector, n_per_concept: int = 8, seed: int = 0, num_inference_steps: int = 50,
                    guidance_scale: float = 7.5) -> dict[str, float]:
    """Detector agreement with the prompt, per concept kind (see QUALITY_BAR)."""
    obj_prompts, obj_labels = object_prompts(n_per_concept, seed)
    seen_prompts, seen_labels = character_prompts(SEEN_CHARACTERS, n_per_concept, seed)
    held_prompts, held_labels = character_prompts(HELD_OUT_CHARACTERS, n_per_concept, seed)
    prompts = obj_prompts + seen_prompts + held_prompts
    images = generate_images(pipe, prompts, seed=seed, num_inference_steps=num_inference_steps,
                             guidance_scale=guidance_scale)
    found = detect(detector, images)
    n_obj, n_seen = len(obj_prompts), len(seen_prompts)
    obj = {h: found[h][:n_obj] for h in found}
    return {
        "shape": agreement(obj["shape"], obj_labels, "shape"),
        "colour": agreement(obj["colour"], obj_labels, "colour"),
        "style": agreement(obj["style"], obj_labels, "style"),
        "seen_character": agreement(found["character"][n_obj:n_obj + n_seen], seen_labels, "character"),
        "held_out_character": agreement(found["character"][n_obj + n_seen:], held_labels, "character"),
    }


def meets_bar(scores: dict[str, float]) -> dict[str, bool]:
    return {k: (scores[k] <= bar if k == "held_out_character" else scores[k] >= bar) for k, bar in QUALITY_BAR.items()}
