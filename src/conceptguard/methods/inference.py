"""Inference-time baselines: negative prompt, Safe Latent Diffusion (SLD) and semantic guidance (SEGA).

None of them touches the weights; each changes how one denoising step combines noise predictions
for the prompt, the unconditional branch and the concept(s) to avoid. They share one sampling loop
(:func:`generate_guided`), written after diffusers' ``StableDiffusionPipeline`` /
``StableDiffusionXLPipeline`` so that it runs on every family we load (SD 1.x, SD 2.x with
v-prediction, SDXL) and with whatever scheduler the pipeline carries — diffusers itself ships SLD
and SEGA only as deprecated SD 1.x pipelines. With nothing to avoid the loop is plain
classifier-free guidance and reproduces ``sampling.generate_images`` image for image.

- ``negative-prompt``: the concepts, joined, replace the empty prompt of the unconditional branch.
- ``sld[:weak|medium|strong|max]`` (Schramowski et al., CVPR 2023): guidance away from a safety
  concept (the concepts joined), applied per latent element where the prompt's prediction is close
  to the concept's, with momentum; the four presets are the paper's (diffusers' ``SafetyConfig``).
- ``sega[:joined]`` (Brack et al., NeurIPS 2023): semantic guidance in the reverse direction of each
  concept (or of the concepts joined into one prompt), keeping only the largest-magnitude latent
  elements of each edit, with momentum; defaults are those of diffusers' semantic pipeline.

Each is an :class:`~conceptguard.evaluation.sources.ImageSource` registered by kind, and
:func:`generate_with_baseline` generates from a spec in one call.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from conceptguard.diffusion import Conditioning, encode_prompts, image_size, is_sdxl, unet_predict
from conceptguard.errors import ConceptGuardError
from conceptguard.evaluation.sources import make_source, register_source

# --------------------------------------------------------------------------------------------
# Guidance rules: how one step's noise predictions are combined
# --------------------------------------------------------------------------------------------


class Guidance(Protocol):
    """A rule combining one step's noise predictions; it runs only under classifier-free guidance.

    ``extra_prompts`` are the texts whose predictions the rule needs besides the prompt's and the
    unconditional one; ``combine`` gets them in that order and a state it returned at the
    previous step (``None`` at the first), so one rule object serves any number of generations.
    """

    @property
    def extra_prompts(self) -> tuple[str, ...]: ...

    def combine(self, step: int, uncond: torch.Tensor, text: torch.Tensor, extra: Sequence[torch.Tensor],
                guidance_scale: float, state: Any) -> tuple[torch.Tensor, Any]: ...


@dataclass(frozen=True)
class ClassifierFreeGuidance:
    """Plain CFG, written as diffusers' StableDiffusionPipeline writes it (bit for bit)."""

    extra_prompts: tuple[str, ...] = ()

    def combine(self, step, uncond, text, extra, guidance_scale, state):
        return uncond + guidance_scale * (text - uncond), state


@dataclass(frozen=True)
class SLDParams:
    """Safe Latent Diffusion hyper-parameters (the paper's symbols in brackets)."""

    warmup_steps: int  # [δ] steps of plain CFG before the safety term is applied
    guidance_scale: float  # [s_S] scale of the element-wise safety term; <= 1 disables SLD
    threshold: float  # [λ] elements where prompt − concept prediction >= λ are left alone
    momentum_scale: float  # [s_m]
    mom_beta: float  # [β_m]


# The paper's hyper-parameter configurations, as diffusers' SafetyConfig ships them.
SLD_PRESETS: dict[str, SLDParams] = {
    "weak": SLDParams(warmup_steps=15, guidance_scale=20.0, threshold=0.0, momentum_scale=0.0, mom_beta=0.0),
    "medium": SLDParams(warmup_steps=10, guidance_scale=1000.0, threshold=0.01, momentum_scale=0.3, mom_beta=0.4),
    "strong": SLDParams(warmup_steps=7, guidance_scale=2000.0, threshold=0.025, momentum_scale=0.5, mom_beta=0.7),
    "max": SLDParams(warmup_steps=0, guidance_scale=5000.0, threshold=1.0, momentum_scale=0.5, mom_beta=0.7),
}
# diffusers' safe pipeline defaults to the medium configuration.
DEFAULT_SLD_PRESET = "medium"


@dataclass(frozen=True)
class SafeLatentDiffusion:
    """SLD: CFG minus a safety term pushing away from ``concept`` (paper eqs. 3–8)."""

    concept: str
    params: SLDParams = SLD_PRESETS[DEFAULT_SLD_PRESET]

    @property
    def enabled(self) -> bool:
        # As in diffusers' pipeline: no concept or s_S <= 1 means plain CFG (and no extra UNet pass).
        return bool(self.concept) and self.params.guidance_scale > 1.0

    @property
    def extra_prompts(self) -> tuple[str, ...]:
        return (self.concept,) if self.enabled else ()

    def combine(self, step, uncond, text, extra, guidance_scale, momentum):
        guidance = text - uncond
        if not self.enabled:
            return uncond + guidance_scale * guidance, momentum
        p = self.params
        (concept,) = extra
        if momentum is None:
            momentum = torch.zeros_like(guidance)
        # Per-element strength: large where the prompt's prediction is close to (or past) the
        # concept's, zero where it is already at least λ away from it.
        closeness = text - concept
        scale = torch.clamp(closeness.abs() * p.guidance_scale, max=1.0)
        scale = torch.where(closeness >= p.threshold, torch.zeros_like(scale), scale)
        safety = (concept - uncond) * scale + p.momentum_scale * momentum
        # The momentum builds up during warm-up too, as in the reference implementation.
        momentum = p.mom_beta * momentum + (1 - p.mom_beta) * safety
        if step >= p.warmup_steps:
            guidance = guidance - safety
        return uncond + guidance_scale * guidance, momentum


@dataclass(frozen=True)
class SEGAParams:
    """Semantic guidance hyper-parameters; defaults are diffusers' semantic pipeline's."""

    edit_guidance_scale: float = 5.0  # [s_e]
    warmup_steps: int = 10  # [δ] steps before the edit is applied (its momentum builds meanwhile)
    cooldown_steps: int | None = None  # step from which the edit stops (None: never)
    threshold: float = 0.9  # [λ] quantile: only elements above it, per image and channel, are edited
    momentum_scale: float = 0.1  # [s_m]
    mom_beta: float = 0.4  # [β_m]
    reverse: bool = True  # away from the concepts (erasure); False steers towards them


def _quantile(values: torch.Tensor, q: float) -> torch.Tensor:
    """``q``-quantile over the last axis. torch.quantile takes fp32/fp64 only; half-precision
    values go through fp32 and back, which cannot move the cutoff past either neighbouring value."""
    if values.dtype in (torch.float32, torch.float64):
        return torch.quantile(values, q, dim=-1)
    return torch.quantile(values.float(), q, dim=-1).to(values.dtype)


@dataclass(frozen=True)
class SemanticGuidance:
    """SEGA: CFG plus one thresholded edit term per concept, summed with weight 1 each."""

    concepts: tuple[str, ...]
    params: SEGAParams = SEGAParams()

    @property
    def extra_prompts(self) -> tuple[str, ...]:
        return self.concepts

    def combine(self, step, uncond, text, extra, guidance_scale, momentum):
        guidance = guidance_scale * (text - uncond)
        if not self.concepts:
            return uncond + guidance, momentum
        p = self.params
        if momentum is None:
            momentum = torch.zeros_like(guidance)
        edit = torch.zeros_like(guidance)
        if p.cooldown_steps is None or step < p.cooldown_steps:
            for concept in extra:
                term = (uncond - concept if p.reverse else concept - uncond) * p.edit_guidance_scale
                # Keep the edit only where it is among the largest (1 − λ) share of its image-channel.
                magnitude = term.abs()
                cutoff = _quantile(magnitude.flatten(start_dim=2), p.threshold)
                edit = edit + torch.where(magnitude >= cutoff[..., None, None], term, torch.zeros_like(term))
        edit = edit + p.momentum_scale * momentum
        momentum = p.mom_beta * momentum + (1 - p.mom_beta) * edit
        if step >= p.warmup_steps:
            guidance = guidance + edit
        return uncond + guidance, momentum


# --------------------------------------------------------------------------------------------
# The sampling loop
# --------------------------------------------------------------------------------------------


def _execution_device(pipe) -> torch.device:
    # With CPU offload hooks the modules sit on the CPU while the work runs on the accelerator.
    return getattr(pipe, "_execution_device", None) or pipe.device


def _unconditional(pipe, negative_prompt: str | None, text: Conditioning, device) -> Conditioning:
    """The CFG branch the prompt is contrasted with, as the pipeline builds it."""
    if negative_prompt is None and is_sdxl(pipe) and getattr(pipe.config, "force_zeros_for_empty_prompt", False):
        # SDXL's default unconditional branch is all zeros, not the encoded empty prompt.
        return Conditioning(torch.zeros_like(text.embeds), torch.zeros_like(text.pooled), text.time_ids)
    return encode_prompts(pipe, [negative_prompt or ""] * len(text), device)


def _step_kwargs(scheduler, generators: list[torch.Generator]) -> dict[str, Any]:
    # Schedulers differ in what step() accepts; stochastic ones draw their noise from the
    # per-image generators, exactly as in the pipeline.
    accepted = set(inspect.signature(scheduler.step).parameters)
    kwargs: dict[str, Any] = {}
    if "eta" in accepted:
        kwargs["eta"] = 0.0
    if "generator" in accepted:
        kwargs["generator"] = generators
    return kwargs


def _decode(pipe, latents: torch.Tensor) -> np.ndarray:
    """VAE decode to uint8 (N, H, W, 3), with the pipeline's latent un-scaling and post-processing."""
    vae = pipe.vae
    config = vae.config
    if getattr(config, "latents_mean", None) is not None and getattr(config, "latents_std", None) is not None:
        shape = (1, -1, 1, 1)
        mean = torch.tensor(config.latents_mean).view(shape).to(latents.device, latents.dtype)
        std = torch.tensor(config.latents_std).view(shape).to(latents.device, latents.dtype)
        latents = latents * std / config.scaling_factor + mean
    else:
        latents = latents / config.scaling_factor
    # SDXL's fp16 VAE overflows; its pipeline decodes in fp32 and so do we.
    upcast = vae.dtype == torch.float16 and getattr(config, "force_upcast", False)
    if upcast:
        vae.to(torch.float32)
    try:
        image = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
    finally:
        if upcast:
            vae.to(torch.float16)
    images = pipe.image_processor.postprocess(image, output_type="np")
    return (np.clip(images, 0, 1) * 255 + 0.5).astype(np.uint8)


def _sample_batch(pipe, prompts: list[str], seeds: list[int], guidance: Guidance, negative_prompt: str | None,
                  num_inference_steps: int, guidance_scale: float) -> np.ndarray:
    device = _execution_device(pipe)
    unet, scheduler = pipe.unet, pipe.scheduler
    # Under guidance_scale <= 1 the pipelines skip CFG, and with it every guidance rule.
    cfg = guidance_scale > 1.0

    text = encode_prompts(pipe, prompts, device)
    cond = Conditioning.cat([_unconditional(pipe, negative_prompt, text, device), text]) if cfg else text
    extra_prompts = list(guidance.extra_prompts) if cfg else []
    n, k = len(prompts), len(extra_prompts)
    if k:
        # Concept-major rows (all images for concept 0, then concept 1, ...) so that chunk(k)
        # splits the UNet output back per concept.
        extra_cond = encode_prompts(pipe, extra_prompts, device).index([c for c in range(k) for _ in range(n)])

    scheduler.set_timesteps(num_inference_steps, device=device)
    # Image i's initial noise comes from its own generator, shaped (1, C, h, w): the image then
    # depends on its seed only, not on the batch it is generated in.
    generators = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]
    latent_size = image_size(pipe) // pipe.vae_scale_factor
    from diffusers.utils.torch_utils import randn_tensor

    latents = randn_tensor((n, unet.config.in_channels, latent_size, latent_size), generator=generators,
                           device=device, dtype=text.embeds.dtype)
    latents = latents * scheduler.init_noise_sigma
    step_kwargs = _step_kwargs(scheduler, generators)

    state = None
    for i, t in enumerate(scheduler.timesteps):
        # The prompt and unconditional branches run in one batch as in the pipeline, so that
        # plain sampling is reproduced exactly; the concept branches run in a second call.
        model_input = scheduler.scale_model_input(torch.cat([latents] * 2) if cfg else latents, t)
        noise_pred = unet_predict(unet, model_input, t, cond)
        if cfg:
            uncond_pred, text_pred = noise_pred.chunk(2)
            extra = []
            if k:
                extra_input = scheduler.scale_model_input(latents.repeat(k, 1, 1, 1), t)
                extra = list(unet_predict(unet, extra_input, t, extra_cond).chunk(k))
            noise_pred, state = guidance.combine(i, uncond_pred, text_pred, extra, guidance_scale, state)
        latents = scheduler.step(noise_pred, t, latents, **step_kwargs, return_dict=False)[0]
    return _decode(pipe, latents)


@torch.no_grad()
def generate_guided(pipe, prompts: Sequence[str], seeds: Sequence[int], *, guidance: Guidance | None = None,
                    negative_prompt: str | None = None, num_inference_steps: int = 25, guidance_scale: float = 7.5,
                    batch_size: int = 64) -> np.ndarray:
    """One image per prompt, uint8 (N, H, W, 3), sampled with ``guidance`` (plain CFG by default).

    Image i is drawn from a generator seeded ``seeds[i]``, as in ``sampling.generate_images``.
    ``negative_prompt`` (one string for every prompt) replaces the unconditional branch; ``None``
    keeps the pipeline's default (the empty prompt; zeros on SDXL). ``batch_size`` is the number
    of prompts per loop; a rule with k concepts adds a UNet call of k × batch_size rows per step.
    """
    prompts, seeds = list(prompts), list(seeds)
    if len(seeds) != len(prompts):
        raise ConceptGuardError(f"need one seed per prompt, got {len(seeds)} seeds for {len(prompts)} prompts")
    if batch_size < 1:
        raise ConceptGuardError(f"batch_size must be >= 1, got {batch_size}")
    if getattr(pipe.unet.config, "time_cond_proj_dim", None) is not None:
        raise ConceptGuardError("guidance-embedded UNets (LCM) do not use classifier-free guidance; "
                                "inference-time baselines need a pipeline that does")
    guidance = guidance or ClassifierFreeGuidance()
    images = [_sample_batch(pipe, prompts[s:s + batch_size], seeds[s:s + batch_size], guidance, negative_prompt,
                            num_inference_steps, guidance_scale)
              for s in range(0, len(prompts), batch_size)]
    if not images:
        size = image_size(pipe)
        return np.zeros((0, size, size, 3), np.uint8)
    return np.concatenate(images)


# --------------------------------------------------------------------------------------------
# Image sources
# --------------------------------------------------------------------------------------------


def join_concepts(concepts: Sequence[str]) -> str:
    """Several concepts as one prompt, comma-separated like SLD's default safety concept."""
    return ", ".join(c.strip() for c in concepts if c.strip())


class GuidedSource:
    """An ImageSource sampling ``pipe`` with a guidance rule and/or a negative prompt."""

    def __init__(self, pipe, *, guidance: Guidance | None = None, negative_prompt: str | None = None,
                 name: str = "guided"):
        self.pipe, self.guidance, self.negative_prompt, self.name = pipe, guidance, negative_prompt, name

    def generate(self, prompts, seeds, *, num_inference_steps, guidance_scale, batch_size=64) -> np.ndarray:
        return generate_guided(self.pipe, prompts, seeds, guidance=self.guidance, negative_prompt=self.negative_prompt,
                               num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                               batch_size=batch_size)


def _no_option(kind: str, option: str | None) -> None:
    if option:
        raise ConceptGuardError(f"image source {kind!r} takes no option, got {kind}:{option}")


@register_source("negative-prompt")
def negative_prompt_source(pipe, concepts: Sequence[str], option: str | None) -> GuidedSource:
    _no_option("negative-prompt", option)
    return GuidedSource(pipe, negative_prompt=join_concepts(concepts) or None, name="negative-prompt")


@register_source("sld")
def sld_source(pipe, concepts: Sequence[str], option: str | None) -> GuidedSource:
    preset = option or DEFAULT_SLD_PRESET
    if preset not in SLD_PRESETS:
        raise ConceptGuardError(f"unknown SLD preset {preset!r}; choose from {', '.join(SLD_PRESETS)}")
    guidance = SafeLatentDiffusion(join_concepts(concepts), SLD_PRESETS[preset])
    return GuidedSource(pipe, guidance=guidance, name=f"sld:{preset}")


@register_source("sega")
def sega_source(pipe, concepts: Sequence[str], option: str | None) -> GuidedSource:
    if option not in (None, "joined"):
        raise ConceptGuardError(f"unknown SEGA option {option!r}; use sega (one edit per concept) or sega:joined")
    concepts = [c.strip() for c in concepts if c.strip()]
    edits = (join_concepts(concepts),) if option == "joined" and concepts else tuple(concepts)
    return GuidedSource(pipe, guidance=SemanticGuidance(edits), name="sega" + (f":{option}" if option else ""))


def generate_with_baseline(pipe, spec: str, concepts: Sequence[str], prompts: Sequence[str], seeds: Sequence[int], *,
                           num_inference_steps: int = 25, guidance_scale: float = 7.5,
                           batch_size: int = 64) -> np.ndarray:
    """Generate with an image-source spec (``negative-prompt``, ``sld:strong``, ``sega``, ``model``)
    that avoids ``concepts``; uint8 (N, H, W, 3), image i seeded ``seeds[i]``."""
    source = make_source(spec, pipe, concepts)
    return source.generate(list(prompts), list(seeds), num_inference_steps=num_inference_steps,
                           guidance_scale=guidance_scale, batch_size=batch_size)
