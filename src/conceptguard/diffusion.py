"""Diffusion primitives every method shares, written once for SD 1.x, SD 2.x and SDXL.

- ``encode_prompts``: text conditioning, including SDXL's pooled embeddings and time ids;
- ``encode_images``: VAE latents, scaled as the pipeline expects;
- ``unet_predict``: one UNet call with whatever conditioning the family needs;
- ``training_target``: what the UNet should predict, by the scheduler's ``prediction_type``
  (epsilon for SD1, v-prediction for SD2-v), so every loss respects it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch


@dataclass
class Conditioning:
    """Prompt conditioning for a batch: token embeddings plus SDXL's added conditions."""

    embeds: torch.Tensor  # (B, L, D)
    pooled: torch.Tensor | None = None  # SDXL only: (B, P)
    time_ids: torch.Tensor | None = None  # SDXL only: (B, 6)

    def __len__(self) -> int:
        return self.embeds.shape[0]

    def index(self, idx) -> "Conditioning":
        return Conditioning(self.embeds[idx], None if self.pooled is None else self.pooled[idx],
                            None if self.time_ids is None else self.time_ids[idx])

    def to(self, device=None, dtype=None) -> "Conditioning":
        def move(t):
            return None if t is None else t.to(device=device, dtype=dtype if t.is_floating_point() else None)

        return Conditioning(move(self.embeds), move(self.pooled), move(self.time_ids))

    @staticmethod
    def cat(parts: list["Conditioning"]) -> "Conditioning":
        def join(ts):
            return None if ts[0] is None else torch.cat(ts)

        return Conditioning(torch.cat([p.embeds for p in parts]), join([p.pooled for p in parts]),
                            join([p.time_ids for p in parts]))

    def added_cond_kwargs(self) -> dict | None:
        if self.pooled is None:
            return None
        return {"text_embeds": self.pooled, "time_ids": self.time_ids}


def is_sdxl(pipe) -> bool:
    return getattr(pipe, "text_encoder_2", None) is not None


def image_size(pipe) -> int:
    return pipe.unet.config.sample_size * pipe.vae_scale_factor


def encode_prompts(pipe, prompts: list[str], device=None, grad: bool = False) -> Conditioning:
    """Token embeddings for ``prompts`` exactly as the pipeline computes them at inference."""
    device = device or pipe.unet.device
    with torch.set_grad_enabled(grad):
        if is_sdxl(pipe):
            embeds, _, pooled, _ = pipe.encode_prompt(list(prompts), device=device, num_images_per_prompt=1,
                                                      do_classifier_free_guidance=False)
            size = image_size(pipe)
            time_ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=embeds.dtype, device=device)
            return Conditioning(embeds, pooled, time_ids.repeat(len(prompts), 1))
        embeds, _ = pipe.encode_prompt(list(prompts), device, 1, False)
        return Conditioning(embeds)


@torch.no_grad()
def encode_images(pipe, images: torch.Tensor, batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of the VAE posterior for images in [-1, 1], both already multiplied by the
    scaling factor; a latent sample is ``mean + std * noise``."""
    vae = pipe.vae
    scale = vae.config.scaling_factor
    means, stds = [], []
    for chunk in images.split(batch_size):
        posterior = vae.encode(chunk.to(vae.device, vae.dtype)).latent_dist
        means.append(posterior.mean * scale)
        stds.append(posterior.std * scale)
    return torch.cat(means), torch.cat(stds)


def unet_predict(unet, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
    return unet(noisy, timesteps, encoder_hidden_states=cond.embeds,
                added_cond_kwargs=cond.added_cond_kwargs()).sample


def training_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    if prediction_type == "sample":
        return latents
    raise ValueError(f"unsupported prediction_type {prediction_type!r}")


def training_scheduler(pipe):
    """A DDPM scheduler with the pipeline's noise schedule and prediction type, for training."""
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(pipe.scheduler.config)


def prepare_trainable(pipe, parameter_names: Sequence[str], device) -> dict[str, torch.nn.Parameter]:
    """Move ``pipe`` to ``device``, freeze every weight, then unfreeze the named UNet tensors.

    Returns them by name: what a recipe hands the training loop as its trainable parameters.
    """
    pipe.to(device)
    for module in (pipe.vae, pipe.text_encoder, getattr(pipe, "text_encoder_2", None)):
        if module is not None:
            module.requires_grad_(False)
    pipe.unet.requires_grad_(False)
    named = dict(pipe.unet.named_parameters())
    chosen = {name: named[name] for name in parameter_names}
    for param in chosen.values():
        param.requires_grad_(True)
    return chosen


def _checkpoint_with_current_weights(block: torch.nn.Module, *args):
    """diffusers' per-block activation checkpointing, correct under ``torch.func.functional_call``.

    The stock function recomputes ``block`` during backward with whatever weights the block holds
    *then*; under ``functional_call`` (ESD's frozen model, FreezeAsGuard's live weights) those are no
    longer the weights of the forward pass, and the gradients come out silently wrong. The weights
    in use now are captured and handed to the recomputation explicitly.
    """
    import torch.utils.checkpoint
    from torch.func import functional_call

    weights = {**dict(block.named_parameters()), **dict(block.named_buffers())}

    def recompute(*inputs):
        return functional_call(block, weights, inputs)

    return torch.utils.checkpoint.checkpoint(recompute, *args, use_reentrant=False)


def set_gradient_checkpointing(unet, enable: bool) -> None:
    """Turn activation checkpointing of ``unet``'s blocks on or off (only gradient-enabled calls use it).

    Activations of each block are recomputed during backward instead of kept: less memory for
    about one more forward pass of time.
    """
    if enable:
        unet.enable_gradient_checkpointing(_checkpoint_with_current_weights)
    else:
        unet.disable_gradient_checkpointing()


@contextmanager
def eval_mode(module: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Run ``module`` in eval mode (e.g. to sample latents mid-training), then restore its mode."""
    training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(training)
