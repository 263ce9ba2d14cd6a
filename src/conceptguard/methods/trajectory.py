"""What ESD and SDD share: on-trajectory latents from a partial DDIM run, and their training defaults.

Neither method uses training images. Each step draws its latent ``x_t`` from the model itself:
DDIM (eta 0) with classifier-free guidance on the concept's prompt, started from pure noise and
stopped after ``k ~ U{0 .. steps-1}`` of ``steps`` steps. ``k = 0`` stops before any step, so
``x_t`` is the initial noise ``x_T`` (the SDD public code runs the whole trajectory for k = 0).

The training timestep is drawn inside the part of the 1000-step training schedule that the stopped
DDIM step covers: the schedule is cut into ``steps`` equal intervals from the noisiest end, and
``t`` is uniform in interval ``k`` (ESD's reference code does the same). With SD's schedule
(``steps_offset=1``, 50 steps) the latent after ``k`` steps sits at DDIM timestep ``981 - 20k``,
inside interval ``k = [980 - 20k, 999 - 20k]``.

All randomness (``k``, ``x_T``, ``t``) comes from the caller's CPU generator, so a training run
is reproducible and resumes bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from conceptguard.diffusion import Conditioning, encode_prompts, is_sdxl

# (latents, timesteps, conditioning) -> the UNet's raw output (epsilon, v or sample, per the scheduler)
Predictor = Callable[[torch.Tensor, torch.Tensor, Conditioning], torch.Tensor]


@dataclass
class TrajectorySample:
    """An on-trajectory latent and the training timestep drawn for it."""

    latents: torch.Tensor  # x_t, (1, C, H, W)
    timestep: torch.Tensor  # training timestep, long, (1,)
    steps_done: int  # k: DDIM steps taken from x_T
    interval: tuple[int, int]  # inclusive range of the 1000-step schedule that t was drawn from


class PartialDDIM:
    """DDIM with classifier-free guidance that stops after a random number of steps."""

    def __init__(self, scheduler_config: Mapping[str, Any], num_steps: int = 50, guidance_scale: float = 3.0):
        from diffusers import DDIMScheduler

        if num_steps < 1:
            raise ValueError(f"ddim_steps must be at least 1, got {num_steps}")
        # The pipeline's own scheduler may be PNDM or Euler; DDIM with its noise schedule and
        # prediction type is the sampler both papers use.
        self.scheduler = DDIMScheduler.from_config(dict(scheduler_config))
        self.scheduler.set_timesteps(num_steps)
        self.num_steps = num_steps
        self.guidance_scale = guidance_scale
        self.train_timesteps = int(self.scheduler.config.num_train_timesteps)

    def interval(self, k: int) -> tuple[int, int]:
        """Inclusive range of training timesteps covered by DDIM step ``k`` (0 = the noisiest)."""
        n, total = self.num_steps, self.train_timesteps
        return total - round((k + 1) * total / n), total - 1 - round(k * total / n)

    @torch.no_grad()
    def sample(self, predict: Predictor, cond: Conditioning, uncond: Conditioning, generator: torch.Generator,
               shape: tuple[int, ...], *, device, dtype=torch.float32, k: int | None = None) -> TrajectorySample:
        """Run ``k`` guided DDIM steps from fresh noise (``k`` drawn from ``generator`` when None)."""
        if k is None:
            k = int(torch.randint(0, self.num_steps, (1,), generator=generator))
        if not 0 <= k < self.num_steps:
            raise ValueError(f"k must lie in [0, {self.num_steps}), got {k}")
        latents = torch.randn(shape, generator=generator).to(device=device, dtype=dtype)
        latents = latents * self.scheduler.init_noise_sigma
        low, high = self.interval(k)
        timestep = torch.randint(low, high + 1, (1,), generator=generator).to(device)

        # One batched UNet call per step for both CFG branches.
        both = Conditioning.cat([uncond, cond]).to(device=device)
        for t in self.scheduler.timesteps[:k]:
            out = predict(torch.cat([latents, latents]), t.reshape(1).repeat(2).to(device), both)
            out_uncond, out_cond = out.float().chunk(2)
            guided = out_uncond + self.guidance_scale * (out_cond - out_uncond)
            # DDIM's step converts epsilon / v / sample outputs itself, per the prediction type.
            latents = self.scheduler.step(guided, t, latents.float(), eta=0.0).prev_sample.to(dtype)
        return TrajectorySample(latents, timestep, k, (low, high))


def latent_shape(unet, batch_size: int = 1) -> tuple[int, int, int, int]:
    """The latent shape of the model's default resolution."""
    size = unet.config.sample_size
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    return batch_size, unet.config.in_channels, height, width


def empty_conditioning(pipe, device=None) -> Conditioning:
    """The unconditional ∅ exactly as the pipeline's classifier-free guidance uses it.

    That is the empty prompt's embeddings, except for SDXL pipelines configured with
    ``force_zeros_for_empty_prompt`` (the SDXL default), whose unconditional branch is all zeros.
    """
    cond = encode_prompts(pipe, [""], device=device)
    if is_sdxl(pipe) and getattr(pipe.config, "force_zeros_for_empty_prompt", False):
        return Conditioning(torch.zeros_like(cond.embeds), torch.zeros_like(cond.pooled), cond.time_ids)
    return cond


def functional_predictor(unet, values: Mapping[str, torch.Tensor]) -> Predictor:
    """A predictor running ``unet`` with some of its parameters replaced by ``values``.

    This is how the frozen ESD model and the EMA teacher of SDD run without a second UNet: only the
    trained tensors are stored twice; every other weight is shared with the live model.
    """
    from torch.func import functional_call

    def predict(latents: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        kwargs = {"encoder_hidden_states": cond.embeds, "added_cond_kwargs": cond.added_cond_kwargs()}
        return functional_call(unet, dict(values), (latents, timesteps), kwargs).sample

    return predict


def module_predictor(unet) -> Predictor:
    def predict(latents: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        return unet(latents, timesteps, encoder_hidden_states=cond.embeds,
                    added_cond_kwargs=cond.added_cond_kwargs()).sample

    return predict


def train_config_with_defaults(defaults: Mapping[str, Any], values: Mapping[str, Any] | None = None):
    """A :class:`TrainConfig` from a method's recipe defaults, overridden by ``values``.

    A default warm-up longer than the run is shortened to the run (SDD's 500 warm-up steps in a
    5-step smoke test); a warm-up the caller sets is taken as given and validated.
    """
    from conceptguard.config import build_config
    from conceptguard.training.loop import TrainConfig

    merged = dict(defaults)
    given = {k.replace("-", "_"): v for k, v in (values or {}).items() if v is not None}
    merged.update(given)
    if "warmup_steps" not in given and "warmup_steps" in merged:
        merged["warmup_steps"] = min(int(merged["warmup_steps"]), int(merged.get("steps", TrainConfig.steps)))
    return build_config(TrainConfig, cli_values=merged)
