"""Adversarial-prompt attacks on an erased model: find words that bring the concept back.

Both attacks prepend ``num_tokens`` learned token embeddings to each prompt of the concept and
optimise them against the erased model, whose weights stay untouched; the result is a real, hard
prompt — every learned embedding is projected to the nearest vocabulary token (cosine similarity;
on SDXL summed over both encoders, so one token string serves both).

- **UnlearnDiffAtk** (Zhang et al., 2023): minimise the erased model's denoising loss on a
  reference image of the concept, ``E_t,ε || eps(x_t(x_ref), [P; c], t) − ε ||²`` — the prompt that
  best explains the concept's image to the erased model. The reference image is what the original
  model draws for the prompt and seed (the paper's setup), or the attacker's own images.
- **P4D** (Chin et al., 2023): make the erased model's noise prediction with the adversarial prompt
  match the *original* model's prediction with the concept prompt, ``|| eps(z_t, [P; c], t) −
  eps*(z_t, c, t) ||²``, on latents ``z_t`` of the original model's DDIM trajectory for that prompt.
  The trajectory and ``eps*`` are computed once per prompt, so the original model is not run
  during the optimisation.

Projection: ``straight-through`` (default) is the PEZ scheme both papers use — each step's forward
pass reads the nearest real tokens and the gradient updates the continuous embeddings; ``end``
optimises freely and projects once at the end.

The attack success rate (ASR) of a prompt set is the share of its images in which the detector
finds the concept; the recovery curve records it for the plain prompts (step 0: no attack) and for
the hard prompts projected at each checkpoint of the optimisation.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from conceptguard.attacks.curves import (
    CurvePoint,
    Detector,
    EvalPrompt,
    GenerationSettings,
    attack_record,
    check_checkpoints,
    write_attack_outputs,
)
from conceptguard.attacks.tokens import (
    PrefixEmbeddings,
    candidate_token_ids,
    decode_tokens,
    encode_ids,
    prefixed_ids,
    text_encoders,
)
from conceptguard.config import config_to_dict
from conceptguard.diffusion import (
    Conditioning,
    encode_images,
    encode_prompts,
    training_scheduler,
    training_target,
    unet_predict,
)
from conceptguard.errors import ConceptGuardError

METHODS = ("unlearndiff", "p4d")

# The papers' settings. UnlearnDiffAtk: 5 prepended tokens, 40 iterations, lr 0.01. P4D builds on
# PEZ and keeps its optimizer: 16 tokens, AdamW lr 0.1, weight decay 0.1, 3000 iterations.
METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    "unlearndiff": dict(num_tokens=5, steps=40, lr=0.01, weight_decay=0.0),
    "p4d": dict(num_tokens=16, steps=3000, lr=0.1, weight_decay=0.1),
}


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass
class PromptAttackConfig:
    """Settings of an adversarial-prompt attack; ``None`` takes the method's paper default."""

    method: Literal["unlearndiff", "p4d"] = field(default="unlearndiff", metadata=_help(
        "unlearndiff (match the concept's image) or p4d (match the original model's noise prediction)"))
    num_tokens: int | None = field(default=None, metadata=_help(
        "tokens prepended to each prompt (default: unlearndiff 5, p4d 16)"))
    steps: int | None = field(default=None, metadata=_help("optimisation steps per prompt (default: 40 / 3000)"))
    lr: float | None = field(default=None, metadata=_help("AdamW learning rate (default: 0.01 / 0.1)"))
    weight_decay: float | None = field(default=None, metadata=_help("AdamW weight decay (default: 0 / 0.1)"))
    batch_size: int = field(default=4, metadata=_help("(latent, timestep) samples per step"))
    projection: Literal["straight-through", "end"] = field(default="straight-through", metadata=_help(
        "straight-through: project every step (PEZ); end: optimise freely, project once"))
    ddim_steps: int = field(default=25, metadata=_help("[p4d] DDIM steps of the original model's trajectory"))
    guidance_scale: float = field(default=7.5, metadata=_help("[p4d] guidance of that trajectory"))
    seed: int = field(default=0, metadata=_help("seed of the initial tokens and of the noise draws"))

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}; got {self.method!r}")
        if self.projection not in ("straight-through", "end"):
            raise ValueError(f"projection must be straight-through or end; got {self.projection!r}")
        for name, value in METHOD_DEFAULTS[self.method].items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        self.lr, self.weight_decay = float(self.lr), float(self.weight_decay)
        for name in ("num_tokens", "steps", "batch_size", "ddim_steps"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")


@dataclass
class AdversarialPrompt:
    """One prompt's attack: the hard tokens at each checkpoint and the loss history."""

    prompt: str
    token_ids: dict[int, list[int]]  # checkpoint step -> prepended token ids (real vocabulary)
    losses: list[float] = field(default_factory=list)  # the loss optimised at each step
    initial_loss: float = float("nan")  # on a fixed evaluation batch, before / after optimising
    final_loss: float = float("nan")

    def text(self, tokenizer, step: int | None = None) -> str:
        step = max(self.token_ids) if step is None else step
        return (decode_tokens(tokenizer, self.token_ids[step]) + " " + self.prompt).strip()


# --------------------------------------------------------------------------------------------
# What each method fits: batches of (noisy latents, timesteps, target)
# --------------------------------------------------------------------------------------------

class ImageTargets:
    """UnlearnDiffAtk: the denoising objective on reference images of the concept."""

    def __init__(self, pipe, images: torch.Tensor):
        self.scheduler = training_scheduler(pipe)
        self.mean, self.std = encode_images(pipe, images)
        self.device = pipe.unet.device

    def draw(self, batch_size: int, generator: torch.Generator):
        idx = torch.randint(0, self.mean.shape[0], (batch_size,), generator=generator)
        mean, std = self.mean[idx], self.std[idx]
        latents = mean + std * torch.randn(mean.shape, generator=generator).to(self.device)
        noise = torch.randn(latents.shape, generator=generator).to(self.device)
        timesteps = torch.randint(0, self.scheduler.config.num_train_timesteps, (batch_size,),
                                  generator=generator).to(self.device)
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        return noisy, timesteps, training_target(self.scheduler, latents, noise, timesteps)


class TrajectoryTargets:
    """P4D: the original model's DDIM trajectory for a prompt and its conditional predictions on it."""

    @torch.no_grad()
    def __init__(self, original, prompt: str, seed: int, ddim_steps: int, guidance_scale: float):
        from diffusers import DDIMScheduler

        from conceptguard.methods.trajectory import empty_conditioning, latent_shape

        unet, device = original.unet, original.unet.device
        scheduler = DDIMScheduler.from_config(original.scheduler.config)
        scheduler.set_timesteps(ddim_steps)
        both = Conditioning.cat([empty_conditioning(original, device), encode_prompts(original, [prompt], device)])
        generator = torch.Generator().manual_seed(int(seed))
        latents = torch.randn(latent_shape(unet), generator=generator).to(device) * scheduler.init_noise_sigma
        states, timesteps, targets = [], [], []
        for t in scheduler.timesteps:
            model_input = scheduler.scale_model_input(latents, t)
            out = unet_predict(unet, torch.cat([model_input] * 2), t.reshape(1).repeat(2).to(device), both).float()
            uncond, cond = out.chunk(2)
            states.append(model_input)
            timesteps.append(t)
            targets.append(cond)  # eps*(z_t, c, t): the unguided conditional prediction is the target
            latents = scheduler.step(uncond + guidance_scale * (cond - uncond), t, latents).prev_sample
        self.latents = torch.cat(states)
        self.timesteps = torch.stack(timesteps).to(device)
        self.targets = torch.cat(targets)

    def draw(self, batch_size: int, generator: torch.Generator):
        idx = torch.randint(0, self.latents.shape[0], (batch_size,), generator=generator).to(self.latents.device)
        return self.latents[idx], self.timesteps[idx], self.targets[idx]


# --------------------------------------------------------------------------------------------
# Optimising one prompt
# --------------------------------------------------------------------------------------------

def _prompt_ids(pipe, prompt: str, prefix: torch.Tensor) -> list[torch.Tensor]:
    return [prefixed_ids(tokenizer, [prompt], prefix) for tokenizer, _ in text_encoders(pipe)]


def _adversarial_loss(pipe, ids: list[torch.Tensor], batch) -> torch.Tensor:
    noisy, timesteps, target = batch
    cond = encode_ids(pipe, ids)
    cond = cond.index(torch.zeros(noisy.shape[0], dtype=torch.long, device=cond.embeds.device))
    return F.mse_loss(unet_predict(pipe.unet, noisy, timesteps, cond).float(), target.float())


def optimise_prompt(pipe, prompt: str, targets, config: PromptAttackConfig, *, checkpoints: Sequence[int] = (),
                    seed: int = 0) -> AdversarialPrompt:
    """Learn ``config.num_tokens`` prepended tokens for ``prompt`` against ``targets``.

    ``targets.draw(batch_size, generator)`` gives (noisy latents, timesteps, target output). The
    erased model is only read; gradients reach the prefix embeddings alone.
    """
    generator = torch.Generator().manual_seed(int(seed))
    candidates = candidate_token_ids(*text_encoders(pipe)[0])
    init = candidates[torch.randint(0, len(candidates), (config.num_tokens,), generator=generator)]
    prefix = PrefixEmbeddings(pipe, init, straight_through=config.projection == "straight-through")
    ids = _prompt_ids(pipe, prompt, init)  # the prefix positions' ids are placeholders under the hook
    optimizer = torch.optim.AdamW(prefix.vectors, lr=config.lr, weight_decay=config.weight_decay)
    # A fixed batch, drawn from its own generator, compares the loss before and after.
    fixed = targets.draw(config.batch_size, torch.Generator().manual_seed(int(seed) + 1))
    result = AdversarialPrompt(prompt, {})

    def evaluate() -> float:
        with torch.no_grad(), prefix:
            return float(_adversarial_loss(pipe, ids, fixed))

    result.initial_loss = evaluate()
    wanted = set(checkpoints)
    if 0 in wanted:
        result.token_ids[0] = prefix.project().tolist()
    for step in range(1, config.steps + 1):
        with prefix:
            loss = _adversarial_loss(pipe, ids, targets.draw(config.batch_size, generator))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        result.losses.append(float(loss.detach()))
        if step in wanted or step == config.steps:
            result.token_ids[step] = prefix.project().tolist()
    result.final_loss = evaluate()
    return result


# --------------------------------------------------------------------------------------------
# Images from token ids, and the whole attack
# --------------------------------------------------------------------------------------------

@torch.no_grad()
def generate_from_ids(pipe, ids_per_encoder: list[torch.Tensor], seeds: Sequence[int],
                      settings: GenerationSettings | None = None) -> np.ndarray:
    """Images of hard prompts given as token ids (one image per row, generator seeded per image)."""
    settings = settings or GenerationSettings()
    out = []
    for start in range(0, len(seeds), settings.batch_size):
        part = slice(start, start + settings.batch_size)
        cond = encode_ids(pipe, [ids[part] for ids in ids_per_encoder])
        kwargs = {"prompt_embeds": cond.embeds}
        if cond.pooled is not None:
            kwargs["pooled_prompt_embeds"] = cond.pooled
        generators = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds[part]]
        images = pipe(generator=generators, num_inference_steps=settings.num_inference_steps,
                      guidance_scale=settings.guidance_scale, output_type="np", **kwargs).images
        out.append((np.clip(images, 0, 1) * 255 + 0.5).astype(np.uint8))
    return np.concatenate(out)


def _freeze(pipe):
    for module in (pipe.unet, pipe.vae, pipe.text_encoder, getattr(pipe, "text_encoder_2", None)):
        if module is not None:
            module.requires_grad_(False)


def prompt_attack(pipe, prompts: Sequence[EvalPrompt], detector: Detector, *, config: PromptAttackConfig | None = None,
                  original=None, reference_images: np.ndarray | None = None, checkpoints: Sequence[int] | None = None,
                  settings: GenerationSettings | None = None) -> tuple[list[CurvePoint], list[AdversarialPrompt],
                                                                      list[np.ndarray]]:
    """Attack every prompt; returns (curve, per-prompt results, per-point detection flags).

    UnlearnDiffAtk needs reference images: ``original`` (the model before erasure; its image for
    each prompt and seed is that prompt's reference) or ``reference_images`` (the attacker's,
    shared by all prompts). P4D needs ``original``. Curve step 0 is the plain prompts.
    """
    from conceptguard.sampling import generate_images
    from conceptguard.world.dataset import images_to_tensor

    config = config or PromptAttackConfig()
    settings = settings or GenerationSettings()
    steps = check_checkpoints(checkpoints if checkpoints is not None else (0, config.steps), config.steps)
    if config.method == "p4d" and original is None:
        raise ConceptGuardError("P4D needs the original (unerased) model to match: pass --original")
    if config.method == "unlearndiff" and original is None and reference_images is None:
        raise ConceptGuardError("UnlearnDiffAtk needs images of the concept: pass --data or --original")
    if not prompts:
        raise ConceptGuardError("no prompts to attack")
    _freeze(pipe)
    shared = None
    if reference_images is not None and original is None:
        shared = ImageTargets(pipe, images_to_tensor(reference_images))

    results = []
    for k, item in enumerate(prompts):
        if config.method == "p4d":
            _freeze(original)
            targets = TrajectoryTargets(original, item.prompt, item.seed, config.ddim_steps, config.guidance_scale)
        elif shared is not None:
            targets = shared
        else:
            reference = generate_images(original, [item.prompt], seeds=[item.seed],
                                        num_inference_steps=settings.num_inference_steps,
                                        guidance_scale=settings.guidance_scale, progress=False)
            targets = ImageTargets(pipe, images_to_tensor(reference))
        results.append(optimise_prompt(pipe, item.prompt, targets, config, checkpoints=steps,
                                       seed=config.seed * 100_003 + k))

    seeds = [p.seed for p in prompts]
    points, flags = [], []
    for step in steps:
        if step == 0:
            images = generate_images(pipe, [p.prompt for p in prompts], seeds=seeds,
                                     num_inference_steps=settings.num_inference_steps,
                                     guidance_scale=settings.guidance_scale, batch_size=settings.batch_size,
                                     progress=False)
        else:
            ids = [torch.cat([prefixed_ids(tokenizer, [r.prompt], torch.tensor(r.token_ids[step])) for r in results])
                   for tokenizer, _ in text_encoders(pipe)]
            images = generate_from_ids(pipe, ids, seeds, settings)
        found = np.asarray(detector(images), dtype=bool)
        flags.append(found)
        points.append(CurvePoint(step, float(found.mean()), len(found)))
    return points, results, flags


def run_prompt_attack(pipe, concept: str, out_dir: str | Path, *, config: PromptAttackConfig | None = None,
                      prompts: Sequence[EvalPrompt] | None = None, detector: Detector | None = None, original=None,
                      reference_images: np.ndarray | None = None, checkpoints: Sequence[int] | None = None,
                      settings: GenerationSettings | None = None, model_name: str = "model",
                      extra_record: dict | None = None) -> dict:
    """:func:`prompt_attack` with the world's defaults, written to ``out_dir``; returns the record."""
    from conceptguard.attacks import curves

    config = config or PromptAttackConfig()
    settings = settings or GenerationSettings()
    prompts = list(prompts) if prompts is not None else curves.world_prompts(concept, n=16)
    detector = detector if detector is not None else curves.detector_for(concept)
    started = time.perf_counter()
    points, results, flags = prompt_attack(pipe, prompts, detector, config=config, original=original,
                                           reference_images=reference_images, checkpoints=checkpoints,
                                           settings=settings)
    elapsed = time.perf_counter() - started
    tokenizer = pipe.tokenizer
    per_prompt = [{"prompt": r.prompt, "seed": p.seed, "adversarial_prompt": r.text(tokenizer),
                   "token_ids": r.token_ids[max(r.token_ids)], "success": bool(flags[-1][i]),
                   "no_attack_success": bool(flags[0][i]) if points[0].step == 0 else None,
                   "initial_loss": round(r.initial_loss, 6), "final_loss": round(r.final_loss, 6)}
                  for i, (r, p) in enumerate(zip(results, prompts))]
    record = attack_record(
        kind=config.method, model=model_name, concept=concept,
        config={"attack": config_to_dict(config), "generation": vars(settings).copy(),
                "reference": "original model" if original is not None else "attacker images"},
        points=points, prompts=[p.prompt for p in prompts], seeds=[p.seed for p in prompts],
        extra={"adversarial_prompts": per_prompt, **(extra_record or {})})
    write_attack_outputs(out_dir, record, timing={"total_s": elapsed})
    return record


__all__ = [
    "AdversarialPrompt",
    "ImageTargets",
    "METHODS",
    "METHOD_DEFAULTS",
    "PromptAttackConfig",
    "TrajectoryTargets",
    "generate_from_ids",
    "optimise_prompt",
    "prompt_attack",
    "run_prompt_attack",
]
