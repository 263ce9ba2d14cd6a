"""Text-to-image fine-tuning of the UNet on a folder of images with captions.

The standard diffusers objective — predict the noise (or velocity) added to the VAE latents of the
user's images, conditioned on their captions — as a :class:`~conceptguard.training.loop.Recipe`.
It is what a user personalizing a model runs, what the red-team's re-learning attack runs, and
the simulated user inside FreezeAsGuard and IMMA.

Fine-tuning can run under a FreezeAsGuard mask (``guard=``), a list of tensors to keep frozen
(``frozen=``) or the Random-ρ baseline (``FinetuneConfig.freeze_random``). Frozen tensors get
``requires_grad=False`` and are never handed to the optimizer, so they have no gradient and no
optimizer state — which is also where guarded fine-tuning saves memory and time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from conceptguard.diffusion import (
    Conditioning,
    encode_images,
    encode_prompts,
    prepare_trainable,
    set_gradient_checkpointing,
    training_scheduler,
    training_target,
    unet_predict,
)
from conceptguard.errors import ConceptGuardError
from conceptguard.models.params import select_parameters
from conceptguard.training.loop import TrainConfig, TrainResult, train


@dataclass
class FinetuneConfig:
    """What to fine-tune; optimizer and schedule settings live in :class:`TrainConfig`."""

    preset: str | None = field(default=None, metadata={
        "help": "UNet parameters to train: x, x-strict, u, all, imma; unset = every tensor a guard mask leaves "
                "trainable (all without one)"})
    include: list[str] = field(default_factory=list, metadata={"help": "name patterns to train (regex or glob)"})
    exclude: list[str] = field(default_factory=list, metadata={"help": "name patterns to keep frozen"})
    batch_size: int = field(default=4, metadata={"help": "images per micro-batch"})
    freeze_random: float | None = field(default=None, metadata={
        "help": "Random-rho baseline: freeze this share of the UNet's tensors (exact count), chosen by freeze_seed"})
    freeze_seed: int = field(default=0, metadata={"help": "seed of the Random-rho choice of frozen tensors"})


class CaptionedLatents:
    """A fixed set of (image, caption) pairs, encoded once, that draws noisy training batches.

    Latents and text embeddings are computed at construction, not every step; a batch is drawn
    entirely from the caller's CPU generator so that runs are reproducible across devices.
    """

    def __init__(self, pipe, images: torch.Tensor, captions: Sequence[str], device):
        if len(images) != len(captions) or len(images) == 0:
            raise ValueError("need one caption per image and at least one image")
        self.device = device
        self.scheduler = training_scheduler(pipe)
        self.latent_mean, self.latent_std = encode_images(pipe, images)
        self.cond: Conditioning = encode_prompts(pipe, list(captions), device=device)

    def __len__(self) -> int:
        return self.latent_mean.shape[0]

    def draw(self, batch_size: int, generator: torch.Generator):
        """``(noisy latents, timesteps, conditioning, target)`` for one random batch."""
        idx = torch.randint(0, len(self), (batch_size,), generator=generator)
        mean, std = self.latent_mean[idx], self.latent_std[idx]
        latents = mean + std * torch.randn(mean.shape, generator=generator).to(self.device)
        noise = torch.randn(latents.shape, generator=generator).to(self.device)
        timesteps = torch.randint(0, self.scheduler.config.num_train_timesteps, (batch_size,),
                                  generator=generator).to(self.device)
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        target = training_target(self.scheduler, latents, noise, timesteps)
        return noisy, timesteps, self.cond.index(idx.to(self.device)), target

    def loss(self, predict, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        """The diffusion loss of ``predict(noisy, timesteps, cond)`` on one random batch."""
        noisy, timesteps, cond, target = self.draw(batch_size, generator)
        return F.mse_loss(predict(noisy, timesteps, cond).float(), target.float())


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

    def setup(self, accelerator) -> None:
        pipe = self.pipe
        self.trainable = prepare_trainable(pipe, self.parameter_names, accelerator.device)
        self.data = CaptionedLatents(pipe, self.images, self.captions, accelerator.device)
        self.unet = accelerator.prepare(pipe.unet)
        self.device = accelerator.device

    def trainable_parameters(self) -> dict[str, torch.nn.Parameter]:
        return self.trainable

    def set_gradient_checkpointing(self, enable: bool) -> None:
        set_gradient_checkpointing(self.pipe.unet, enable)

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond) -> torch.Tensor:
        # The drawn batches are channels-last (the VAE's latents are). When conv_in is frozen, as a
        # FreezeAsGuard mask or --preset x may leave it, torch's CPU backward segfaults on such an
        # input (torch 2.13); a contiguous copy avoids that. It is made only then, so that every
        # other run keeps its exact numerics.
        if not any(p.requires_grad for p in self.pipe.unet.conv_in.parameters()):
            noisy = noisy.contiguous()
        return unet_predict(self.unet, noisy, timesteps, cond)

    def loss(self, step: int, generator: torch.Generator) -> torch.Tensor:
        return self.data.loss(self.predict, self.batch_size, generator)


def images_and_captions(data, size: int) -> tuple[torch.Tensor, list[str]]:
    """Accept a folder path, a list of folders, or a list of (uint8 image, caption) pairs; images in [-1, 1]."""
    from conceptguard.world.dataset import images_to_tensor, load_folder

    if isinstance(data, (str, Path)):
        pairs = load_folder(data, size=size)
    else:
        items = list(data)
        if items and all(isinstance(item, (str, Path)) for item in items):
            pairs = [pair for folder in items for pair in load_folder(folder, size=size)]
        else:
            pairs = items
    if not pairs:
        raise ConceptGuardError("no training images were given")
    images = [np.asarray(image) for image, _ in pairs]
    return images_to_tensor(images), [caption for _, caption in pairs]


@dataclass
class TrainableSelection:
    """Which UNet tensors a fine-tuning run trains, and which it must leave untouched, and why."""

    trainable: list[str]
    frozen: list[str]
    guard: dict[str, Any] | None  # the guard mask's identity, for the run's config


def trainable_selection(pipe, config: FinetuneConfig, *, frozen: Sequence[str] = (), guard=None,
                        model_hash: str | None = None) -> TrainableSelection:
    """Resolve the tensors to train under a guard mask, explicit ``frozen`` names and Random-ρ.

    A guard mask is checked against ``pipe`` (content hash and tensor names) before anything else.
    A selection that *explicitly* asks for frozen tensors — a ``preset`` or ``include`` pattern that
    matches one — is refused rather than silently narrowed: the user asked for something the
    publisher does not allow, and should know. Without a preset or include, every tensor that is
    not frozen (nor excluded) is trained.
    """
    from conceptguard.guard.maskfile import load_mask, random_frozen

    all_names = [name for name, _ in pipe.unet.named_parameters()]
    reasons: dict[str, str] = {}
    unknown = sorted(set(frozen) - set(all_names))
    if unknown:
        raise ConceptGuardError(f"frozen tensor {unknown[0]!r} is not a parameter of the UNet")
    for name in frozen:
        reasons.setdefault(name, "frozen=")
    guard_info = None
    if guard is not None:
        mask = load_mask(guard)
        mask.check_model(pipe, model_hash)
        for name in mask.frozen:
            reasons.setdefault(name, "the guard mask")
        guard_info = {"path": str(mask.path) if mask.path else None, "sha256": mask.sha256,
                      "frozen_tensors": len(mask.frozen), "method": mask.manifest.get("method")}
    if config.freeze_random is not None:
        for name in random_frozen(all_names, config.freeze_random, config.freeze_seed):
            reasons.setdefault(name, f"--freeze-random {config.freeze_random}")

    explicit = config.preset is not None or bool(config.include)
    selected = select_parameters(pipe.unet, config.preset, include=config.include, exclude=config.exclude)
    if explicit:
        clashes = sorted(name for name in selected if name in reasons)
        if clashes:
            flags = " and ".join(f for f, given in (("--preset", config.preset is not None),
                                                     ("--include", bool(config.include))) if given)
            raise ConceptGuardError(
                f"{flags} select {len(clashes)} tensor(s) that {reasons[clashes[0]]} freezes (e.g. {clashes[0]}); "
                "leave them out to train every tensor the mask allows, or --exclude the frozen ones")
    trainable = [name for name in selected if name not in reasons]
    if not trainable:
        raise ConceptGuardError("every selected UNet tensor is frozen; nothing is left to fine-tune")
    return TrainableSelection(trainable, sorted(reasons), guard_info)


def finetune(pipe, data, run_dir: str | Path, *, config: FinetuneConfig | None = None,
             train_config: TrainConfig | None = None, frozen: Sequence[str] = (), guard=None,
             model_hash: str | None = None, resume: bool = False,
             resolved_config: dict | None = None) -> TrainResult:
    """Fine-tune ``pipe.unet`` in place on ``data`` (a folder, folders, or (image, caption) pairs).

    ``guard`` is a FreezeAsGuard mask (a file path or :class:`~conceptguard.guard.maskfile.GuardMask`)
    made for exactly this model; ``frozen`` names further UNet tensors to keep, and
    ``config.freeze_random`` adds the Random-ρ baseline. Frozen tensors get no gradient and no
    optimizer state, and stay bit-identical. ``model_hash`` is ``pipe``'s content hash when the
    caller already knows it (hashing a large model takes seconds).
    """
    from conceptguard.config import config_to_dict
    from conceptguard.diffusion import image_size

    config = config or FinetuneConfig()
    train_config = train_config or TrainConfig()
    selection = trainable_selection(pipe, config, frozen=frozen, guard=guard, model_hash=model_hash)
    images, captions = images_and_captions(data, image_size(pipe))
    recipe = TextToImageRecipe(pipe, images, captions, selection.trainable, batch_size=config.batch_size)
    resolved = {"method": "finetune", "finetune": config_to_dict(config), "frozen_tensors": len(selection.frozen),
                "guard": selection.guard}
    resolved.update(resolved_config or {})
    return train(recipe, train_config, run_dir, resume=resume, resolved_config=resolved)
