"""The paper's Table 2 in the embedded world: FreezeAsGuard vs Random-ρ vs Full FT, over ratios.

An attacker fine-tunes the published model on held-out characters (the analogue of public
figures' portraits); an innocent user fine-tunes it on a held-out design family (logos or
garments). Each method decides which tensors they may train:

- Full FT: every tensor;
- Random-ρ: a seeded random ρ of the tensors frozen;
- FreezeAsGuard-ρ: the publisher's learned mask (:func:`~conceptguard.guard.mask.learn_mask`).

Illegal quality is the share of images of the characters' prompts in which the world's detector
recognizes the prompted character (lower is better); innocent quality is the detector's design-head
agreement with the prompted design (higher is better), also given as a share of Full FT's. The
publisher learns masks on one sample of each domain and the users fine-tune on another (as in the
paper's Appendix F).

Every cell is cached in ``OUT/results.json`` as it finishes, and mask learning and fine-tuning
keep resumable run folders under ``OUT/runs``: an interrupted table picks up where it stopped.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from conceptguard.errors import ConceptGuardError


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass
class TableConfig:
    """The experiment; mask-learning defaults are calibrated for the embedded world (see docs/guard.md)."""

    illegal_characters: list[str] = field(default_factory=lambda: ["yulbar", "drennik", "ospera"], metadata=_help(
        "held-out characters the attacker teaches (the illegal domain)"))
    innocent_domain: str = field(default="garment", metadata=_help(
        "held-out design family of the innocent user (garment: Full FT learns it better than logos)"))
    ratios: list[float] = field(default_factory=lambda: [0.05, 0.1, 0.2, 0.3, 0.4], metadata=_help(
        "freeze ratios rho (share of UNet tensors)"))
    methods: list[str] = field(default_factory=lambda: ["random", "freezeasguard"], metadata=_help(
        "masked methods compared with Full FT: random, freezeasguard"))
    seed: int = field(default=0, metadata=_help("seed of data, masks, fine-tuning and evaluation"))
    publisher_images: int = field(default=24, metadata=_help(
        "mask-learning images per character and per design of the innocent domain"))
    user_images: int = field(default=24, metadata=_help(
        "fine-tuning images per character and per design of the innocent domain"))
    finetune_steps: int = field(default=300, metadata=_help("attacker's and innocent user's fine-tuning steps"))
    finetune_lr: float = field(default=5e-4, metadata=_help(
        "their Adam learning rate (world calibration: Full FT teaches the characters, see docs/guard.md)"))
    finetune_batch: int = field(default=4, metadata=_help("their batch size"))
    eval_images: int = field(default=32, metadata=_help(
        "evaluation images per character and per design (32: one image moves a share of Full FT by about 3 points)"))
    eval_steps: int = field(default=25, metadata=_help("sampling steps of the evaluation images"))
    guidance_scale: float = field(default=7.5, metadata=_help("classifier-free guidance of the evaluation images"))
    mask_steps: int = field(default=100, metadata=_help("mask updates per learned mask"))
    mask_optimizer: str = field(default="sgd", metadata=_help(
        "optimizer of the mask logits; plain steps as the paper's (adam ranks tensors by the noise of their gradients)"))
    mask_lr: float = field(default=1000.0, metadata=_help(
        "its step size (world-scaled: the world's per-tensor mask gradients are about 1e-4)"))
    inner_steps: int = field(default=4, metadata=_help("simulated-user steps between mask updates"))
    mask_batch: int = field(default=4, metadata=_help("images per domain in each mask-learning loss"))
    user_lr: float = field(default=5e-4, metadata=_help("simulated user's Adam learning rate (as the attacker's)"))
    init_steps: int = field(default=150, metadata=_help("steps that fully fine-tune W_ft before the first mask update"))
    sparsity_weight: float = field(default=1.0, metadata=_help("c in c * (rho - mean(m))^2"))
    innocent_weight: float = field(default=4.0, metadata=_help(
        "weight of L_innocent in the mask objective (world calibration; the paper weighs both domains equally)"))
    mask_update_batch: int = field(default=16, metadata=_help(
        "images per domain in each mask update's losses (0: mask_batch)"))
    shared_noise: bool = field(default=True, metadata=_help(
        "each mask update's illegal and innocent losses share noise and timesteps"))

    def __post_init__(self) -> None:
        from conceptguard.world.concepts import HELD_OUT_CHARACTERS, INNOCENT_DOMAINS

        unknown = [c for c in self.illegal_characters if c not in HELD_OUT_CHARACTERS]
        if unknown or not self.illegal_characters:
            raise ValueError(f"illegal_characters must be held-out characters ({', '.join(HELD_OUT_CHARACTERS)}); "
                             f"got {self.illegal_characters}")
        if self.innocent_domain not in INNOCENT_DOMAINS:
            raise ValueError(f"innocent_domain must be one of {', '.join(INNOCENT_DOMAINS)}")
        if any(not 0 < r < 1 for r in self.ratios) or not self.ratios:
            raise ValueError(f"ratios must lie strictly between 0 and 1, got {self.ratios}")
        bad = [m for m in self.methods if m not in ("random", "freezeasguard")]
        if bad:
            raise ValueError(f"unknown method(s) {bad}; choose from random, freezeasguard")

    def guard_config(self, ratio: float):
        from conceptguard.guard.mask import GuardConfig

        return GuardConfig(ratio=ratio, inner_steps=self.inner_steps, user_lr=self.user_lr, batch_size=self.mask_batch,
                           init_steps=self.init_steps, sparsity_weight=self.sparsity_weight,
                           innocent_weight=self.innocent_weight, mask_batch_size=self.mask_update_batch,
                           shared_noise=self.shared_noise)

    def mask_train_config(self):
        from conceptguard.guard.mask import guard_train_config

        return guard_train_config(steps=self.mask_steps, optimizer=self.mask_optimizer, lr=self.mask_lr,
                                  seed=self.seed, checkpoint_every=max(1, self.mask_steps // 4), progress=False)

    def finetune_train_config(self):
        from conceptguard.training.loop import TrainConfig

        return TrainConfig(steps=self.finetune_steps, lr=self.finetune_lr, optimizer="adam", seed=self.seed,
                           checkpoint_every=self.finetune_steps, keep_checkpoints=1, log_every=50, progress=False)


# --------------------------------------------------------------------------------------------
# Data and measurements
# --------------------------------------------------------------------------------------------


def illegal_data(config: TableConfig, role: str) -> list[tuple[np.ndarray, str]]:
    """The characters' images: the publisher's (``role="publisher"``) or the attacker's sample."""
    from conceptguard.world.dataset import generate

    seed, n = (config.seed + 100, config.publisher_images) if role == "publisher" else (config.seed + 200,
                                                                                       config.user_images)
    return [(s.image, s.caption) for name in config.illegal_characters
            for s in generate(n, seed=seed, split="held_out_characters", character=name)]


def innocent_data(config: TableConfig, role: str) -> list[tuple[np.ndarray, str]]:
    """The design family's images, as many per design as the attacker has per character."""
    from conceptguard.world.concepts import INNOCENT_DOMAINS
    from conceptguard.world.dataset import generate

    seed, n = (config.seed + 101, config.publisher_images) if role == "publisher" else (config.seed + 201,
                                                                                       config.user_images)
    n *= len(INNOCENT_DOMAINS[config.innocent_domain])
    return [(s.image, s.caption) for s in generate(n, seed=seed, split="innocent", domain=config.innocent_domain)]


def design_prompts(domain: str, n_per_design: int, seed: int) -> tuple[list[str], list[dict]]:
    """Plain prompts for every design of an innocent domain, with their labels."""
    from conceptguard.world.concepts import INNOCENT_DOMAINS
    from conceptguard.world.dataset import make_caption, sample_labels

    prompts, labels = [], []
    for k, design in enumerate(INNOCENT_DOMAINS[domain]):
        for i in range(n_per_design):
            rng = np.random.default_rng([seed, 9, k, i])
            label = sample_labels(rng, "innocent", design=design, halo="absent")
            prompts.append(make_caption(label, rng, paraphrase_prob=0.0, halo_mode="omit"))
            labels.append(label)
    return prompts, labels


def _measure(pipe, detector, prompts, labels, head: str, config: TableConfig) -> dict[str, float]:
    """The detector's agreement with the prompted ``head`` label, and its mean probability of it."""
    from conceptguard.sampling import generate_images
    from conceptguard.world.quality import agreement, detect, prompted_probability

    images = generate_images(pipe, prompts, seed=config.seed + 300, num_inference_steps=config.eval_steps,
                             guidance_scale=config.guidance_scale, progress=False)
    return {"score": agreement(detect(detector, images)[head], labels, head),
            "probability": prompted_probability(detector, images, labels, head)}


def measure_illegal(pipe, detector, config: TableConfig) -> dict[str, float]:
    from conceptguard.world.quality import character_prompts

    prompts, labels = character_prompts(config.illegal_characters, config.eval_images, config.seed + 300)
    return _measure(pipe, detector, prompts, labels, "character", config)


def measure_innocent(pipe, detector, config: TableConfig) -> dict[str, float]:
    prompts, labels = design_prompts(config.innocent_domain, config.eval_images, config.seed + 300)
    return _measure(pipe, detector, prompts, labels, "design", config)


def illegal_detection(pipe, detector, config: TableConfig) -> float:
    """Share of the characters' images in which the detector recognizes the prompted character."""
    return measure_illegal(pipe, detector, config)["score"]


def innocent_agreement(pipe, detector, config: TableConfig) -> float:
    """The detector's design-head agreement with the prompted design of the innocent domain."""
    return measure_innocent(pipe, detector, config)["score"]


# --------------------------------------------------------------------------------------------
# The experiment
# --------------------------------------------------------------------------------------------


def _started(run_dir: Path) -> bool:
    """Whether an interrupted run left a checkpoint to resume from."""
    from conceptguard.training.checkpoint import latest_checkpoint

    return latest_checkpoint(run_dir) is not None


def _ratio_key(ratio: float) -> str:
    return f"{100 * ratio:g}"


class _Cells:
    """``results.json``: the config and one record per finished cell, rewritten after each."""

    def __init__(self, path: Path, config: dict[str, Any], fresh: bool):
        self.path = path
        self.data = {"config": config, "cells": {}}
        if path.is_file() and not fresh:
            saved = json.loads(path.read_text())
            if saved.get("config") != config:
                raise ConceptGuardError(
                    f"{path} holds a table made with another config; pass --overwrite to start it again")
            self.data = saved

    def get(self, key: str) -> dict[str, Any] | None:
        return self.data["cells"].get(key)

    def put(self, key: str, record: dict[str, Any]) -> None:
        from conceptguard.outputs import atomic_write_json

        self.data["cells"][key] = record
        atomic_write_json(self.path, self.data)


def run_table(pipe, detector, out_dir: str | Path, config: TableConfig | None = None, *, fresh: bool = False,
              model_hash: str | None = None, log=print) -> dict[str, Any]:
    """Run (or finish) the experiment; writes ``OUT/results.json`` and ``OUT/table.md``; returns the results.

    ``pipe`` must be the world model ``detector`` knows; its weights are restored when this returns.
    ``fresh`` discards an earlier run's cells, masks and checkpoints in ``out_dir``.
    """
    from conceptguard.config import config_to_dict
    from conceptguard.finetune import FinetuneConfig, finetune
    from conceptguard.guard.mask import learn_mask
    from conceptguard.guard.maskfile import GuardMask, random_mask
    from conceptguard.models.io import content_hash

    config = config or TableConfig()
    out_dir = Path(out_dir)
    if fresh:  # an earlier run's masks and checkpoints would otherwise be picked up again
        for stale in ("runs", "masks"):
            shutil.rmtree(out_dir / stale, ignore_errors=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    model_hash = model_hash or content_hash(pipe)
    cells = _Cells(out_dir / "results.json", {**config_to_dict(config), "base_model_hash": model_hash}, fresh)
    base_state = {name: p.detach().clone() for name, p in pipe.unet.named_parameters()}

    def reset() -> None:
        with torch.no_grad():
            for name, p in pipe.unet.named_parameters():
                p.copy_(base_state[name])

    data = {"illegal": illegal_data(config, "user"), "innocent": innocent_data(config, "user")}
    measure = {"illegal": measure_illegal, "innocent": measure_innocent}

    def cell(key: str, mask: GuardMask | None, domain: str) -> float:
        """Fine-tune the base model on one domain under ``mask`` and measure it (cached)."""
        done = cells.get(f"{key}/{domain}")
        if done is not None:
            return done["score"]
        reset()
        started = time.time()
        if mask is None and key == "pretrained":
            steps = 0
        else:
            run_dir = out_dir / "runs" / f"{key}-{domain}"
            finetune(pipe, data[domain], run_dir, config=FinetuneConfig(batch_size=config.finetune_batch),
                     train_config=config.finetune_train_config(), guard=mask, model_hash=model_hash,
                     resume=_started(run_dir))
            steps = config.finetune_steps
        found = measure[domain](pipe, detector, config)
        cells.put(f"{key}/{domain}", {**found, "steps": steps, "seconds": round(time.time() - started, 1)})
        log(f"[guard table] {key} {domain}: {found['score']:.3f}, probability {found['probability']:.3f} "
            f"({time.time() - started:.0f}s)")
        return found["score"]

    try:
        for domain in ("illegal", "innocent"):
            cell("pretrained", None, domain)
            cell("full", None, domain)
        for ratio in config.ratios:
            for method in config.methods:
                key = f"{method}-{_ratio_key(ratio)}"
                mask_path = out_dir / "masks" / f"{key}.safetensors"
                if mask_path.is_file():
                    mask = GuardMask.load(mask_path)
                else:
                    reset()
                    started = time.time()
                    if method == "random":
                        mask = random_mask(pipe, ratio, seed=config.seed, model_hash=model_hash)
                    else:
                        run_dir = out_dir / "runs" / f"mask-{key}"
                        mask = learn_mask(pipe, illegal_data(config, "publisher"), innocent_data(config, "publisher"),
                                          run_dir, config=config.guard_config(ratio),
                                          train_config=config.mask_train_config(), resume=_started(run_dir),
                                          model_hash=model_hash).mask
                    mask.save(mask_path)
                    log(f"[guard table] {key}: {mask.describe()} ({time.time() - started:.0f}s)")
                cells.put(f"{key}/mask", {**{k: mask.manifest[k] for k in (
                    "frozen_tensors", "total_tensors", "ratio_tensors", "ratio_parameters")}, "score": None})
                for domain in ("illegal", "innocent"):
                    cell(key, mask, domain)
    finally:
        reset()
    results = cells.data
    (out_dir / "table.md").write_text(table_markdown(results, config))
    return results


def table_rows(results: dict[str, Any], config: TableConfig) -> list[dict[str, Any]]:
    """One row per method and ratio: illegal detection, innocent agreement and its share of Full FT."""
    cells = results["cells"]

    def score(key: str, domain: str, field: str = "score") -> float | None:
        record = cells.get(f"{key}/{domain}")
        return None if record is None else record.get(field)  # tables cached before probabilities lack them

    def share(value: float | None, full: float | None) -> float | None:
        return value / full if value is not None and full else None

    full_innocent = score("full", "innocent")
    full_probability = score("full", "innocent", "probability")
    rows = [{"method": "Pretrained (no fine-tuning)", "key": "pretrained", "ratio": None},
            {"method": "Full FT", "key": "full", "ratio": 0.0}]
    names = {"random": "Random", "freezeasguard": "FreezeAsGuard"}
    for ratio in config.ratios:
        for method in config.methods:
            key = f"{method}-{_ratio_key(ratio)}"
            rows.append({"method": f"{names[method]}-{_ratio_key(ratio)}%", "key": key, "ratio": ratio})
    for row in rows:
        mask = cells.get(f"{row['key']}/mask") or {}
        row["ratio_tensors"] = mask.get("ratio_tensors", 0.0 if row["key"] == "full" else None)
        row["ratio_parameters"] = mask.get("ratio_parameters", 0.0 if row["key"] == "full" else None)
        row["illegal"] = score(row["key"], "illegal")
        row["innocent"] = score(row["key"], "innocent")
        row["innocent_kept"] = share(row["innocent"], full_innocent)
        row["illegal_probability"] = score(row["key"], "illegal", "probability")
        row["innocent_probability"] = score(row["key"], "innocent", "probability")
        row["innocent_probability_kept"] = share(row["innocent_probability"], full_probability)
    return rows


def table_markdown(results: dict[str, Any], config: TableConfig) -> str:
    def pct(value: float | None) -> str:
        return "–" if value is None else f"{100 * value:.1f}"

    lines = [
        f"Illegal: {', '.join(config.illegal_characters)} (detector recognizes the prompted character, % of "
        f"{config.eval_images * len(config.illegal_characters)} images, lower is better). Innocent: "
        f"{config.innocent_domain} designs (detector's design-head agreement, % of {config.eval_images * 3} images, "
        f"higher is better; kept = share of Full FT's). Probabilities: the detector's mean probability of the "
        f"prompted label over the same images (the same question without the argmax). Fine-tuning: "
        f"{config.finetune_steps} Adam steps, lr "
        f"{config.finetune_lr:g}, batch {config.finetune_batch}; seed {config.seed}.",
        "",
        "| Method | frozen tensors % | frozen params % | Illegal detection ↓ | Innocent agreement ↑ "
        "| Innocent kept ↑ | Illegal probability ↓ | Innocent probability kept ↑ |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in table_rows(results, config):
        lines.append(f"| {row['method']} | {pct(row['ratio_tensors'])} | {pct(row['ratio_parameters'])} | "
                     f"{pct(row['illegal'])} | {pct(row['innocent'])} | {pct(row['innocent_kept'])} | "
                     f"{pct(row['illegal_probability'])} | {pct(row['innocent_probability_kept'])} |")
    return "\n".join(lines) + "\n"
