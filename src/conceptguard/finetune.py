"""Text-to-image fine-tuning of the UNet on a folder of images with captions.

The standard diffusers objective — predict the noise (or velocity) added to the VAE latents of the
user's images, conditioned on their captions — as a :class:`~conceptguard.training.loop.Recipe`.
It is what a user personalizing a model runs, what the red-team's re-learning attack runs, and
the simulated user inside FreezeAsGuard and IMMA.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from conceptguard.diffusion import (
    Conditioning,
    encode_images,
    encode_prompts,
    training_scheduler,
    training_target,
    unet_predict,
)
from conceptguard.models.params import select_parameters
from conceptguard.training.loop import TrainConfig, TrainResult, train


@dataclass
class FinetuneConfig:
    """What to fine-tune; optimizer and schedule settings live in :class:`TrainConfig`."""

    preset: str = field(default="all", metadata={"help": "UNet parameters to train: x, x-strict, u, all, imma"})
    include: list[str] = field(default_factory=list, metadata={"help": "name patterns to train (regex or glob)"})
    exclude: list[str] = field(default_factory=list, metadata={"help": "name patterns to keep frozen"})
    batch_size: int = field(default=4, metadata={"help": "images per micro-batch"})


class TextToImageRecipe:
    """Noise-prediction loss on (image, caption) pairs; trains the selected UNet parameters."""

    def __init__(self, pipe, images: torch.Tensor, captions: Sequence[str], parameter_names: Sequence[str],
                 batch_size: int = 4):
        if len(images) != len(captions) or len(images) == 0:
            raise ValueError("need one caption per image and at least one image")
        self.pipe = pipe
        self.images = images
        self.captions = list(captions)
        self.parameter_names = list(parameter_names)
        self.batch_size = batch_size
        self.scheduler = training_scheduler(pipe)

    def setup(self, accelerator) -> None:
        pipe = self.pipe
        pipe.to(accelerator.device)
        for module in (pipe.vae, pipe.text_encoder, getattr(pipe, "text_encoder_2", None)):
            if module is not None:
                module.requires_grad_(False)
        unet = pipe.unet
        unet.requires_grad_(False)
        named = dict(unet.named_parameters())
        for name in self.parameter_names:
            named[name].requires_grad_(True)
        # Latents and text embeddings of the fixed data set are computed once, not every step.
        self.latent_mean, self.latent_std = encode_images(pipe, self.images)
        self.cond: Conditioning = encode_prompts(pipe, self.captions, device=accelerator.device)
        self.unet = accelerator.prepare(unet)
        self.device = accelerator.device

    def trainable_parameters(self) -> dict[str, torch.nn.Parameter]:
        named = dict(self.pipe.unet.named_parameters())
        return {name: named[name] for name in self.parameter_names}

    def loss(self, step: int, generator: torch.Generator) -> torch.Tensor:
        n = self.latent_mean.shape[0]
        idx = torch.randint(0, n, (self.batch_size,), generator=generator)
        mean, std = self.latent_mean[idx], self.latent_std[idx]
        latents = mean + std * torch.randn(mean.shape, generator=generator).to(self.device)
        noise = torch.randn(latents.shape, generator=generator).to(self.device)
        timesteps = torch.randint(0, self.scheduler.config.num_train_timesteps, (self.batch_size,),
                                  generator=generator).to(self.device)
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        prediction = unet_predict(self.unet, noisy, timesteps, self.cond.index(idx.to(self.device)))
        target = training_target(self.scheduler, latents, noise, timesteps)
        return F.mse_loss(prediction.float(), target.float())


def images_and_captions(data, size: int) -> tuple[torch.Tensor, list[str]]:
    """Accept a folder path or a list of (uint8 image, caption) pairs; images in [-1, 1]."""
    from conceptguard.world.dataset import images_to_tensor, load_folder

    pairs = load_folder(data, size=size) if isinstance(data, (str, Path)) else list(data)
    images = [np.asarray(image) for image, _ in pairs]
    return images_to_tensor(images), [caption for _, caption in pairs]


def finetune(pipe, data, run_dir: str | Path, *, config: FinetuneConfig | None = None,
             train_config: TrainConfig | None = None, frozen: Sequence[str] = (), resume: bool = False,
             resolved_config: dict | None = None) -> TrainResult:
    """Fine-tune ``pipe.unet`` in place on ``data`` (a folder, or (image, caption) pairs).

    ``frozen`` names UNet tensors that must not change whatever the selection says (a guard mask):
    they get no gradient and no optimizer state.
    """
    from conceptguard.diffusion import image_size

    config = config or FinetuneConfig()
    train_config = train_config or TrainConfig()
    selected = select_parameters(pipe.unet, config.preset, include=config.include, exclude=config.exclude)
    names = [name for name in selected if name not in set(frozen)]
    images, captions = images_and_captions(data, image_size(pipe))
    recipe = TextToImageRecipe(pipe, images, captions, names, batch_size=config.batch_size)
    resolved = {"method": "finetune", "finetune": vars(config).copy(), "frozen_tensors": len(frozen)}
    resolved.update(resolved_config or {})
    return train(recipe, train_config, run_dir, resume=resume, resolved_config=resolved)
