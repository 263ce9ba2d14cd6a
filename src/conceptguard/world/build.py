"""Re-create the embedded world's models from a seed: ``conceptguard world build``.

Stages, each written to its own sub-folder of the build folder and skipped when already done, so
an interrupted build resumes (the UNet stage also checkpoints inside itself):

1. tokenizer  — CLIP BPE vocabulary over the caption grammar;
2. vae        — AutoencoderKL, L1 + small KL, on pretraining images;
3. clip       — text encoder + vision tower, contrastive (the world's CLIP-score model);
4. detector   — multi-head CNN on rendered images of every split, half of them passed through the
                VAE so it also reads generated-looking images;
   detector_tune — the detector continued at a lower learning rate with objects oversampled, a share
                of clean (un-augmented) renders and extra weight on the shape head (small circles and
                hexagons were confused); its result is the shipped detector;
5. unet       — noise prediction on VAE latents with 10% caption dropout (for classifier-free
                guidance), EMA weights kept;
6. assemble   — a standard StableDiffusionPipeline folder + manifest of sha256 hashes.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from conceptguard.world import concepts
from conceptguard.world.dataset import generate, images_to_tensor
from conceptguard.world.models import (
    MAX_TOKENS,
    SCHEDULER_CONFIG,
    UNET_CONFIG,
    VAE_CONFIG,
    Detector,
    clip_config,
)


@dataclass
class BuildConfig:
    seed: int = 0
    device: str = "cpu"
    vae_steps: int = 1500
    vae_batch: int = 32
    clip_steps: int = 1200
    clip_batch: int = 64
    detector_steps: int = 1500
    detector_batch: int = 64
    # Continuation of the detector (stage detector_tune; an empty list skips it), in phases run one
    # after the other: each batch is (1 - object_share) split "all" plus object_share objects; the VAE
    # still sees half the batch; clean_share of the batch stays a clean render; the shape head's loss
    # is weighted by shape_weight. Learning rate: 50 warm-up steps, then cosine to a tenth.
    detector_tune: list = field(default_factory=lambda: [
        {"steps": 500, "lr": 5e-4, "shape_weight": 2.0, "object_share": 0.5, "clean_share": 0.25},
        {"steps": 700, "lr": 3e-4, "shape_weight": 3.0, "object_share": 0.625, "clean_share": 0.5}])
    unet_samples: int = 40000
    unet_steps: int = 27000
    unet_batch: int = 32
    unet_lr: float = 3e-4
    # From this step on: a higher learning rate and Min-SNR-γ loss weighting (Hang et al., 2023),
    # which puts the weight on the noisy timesteps where an object's shape is decided. The first
    # 9000 steps of the shipped UNet were trained without it; the schedule depends on the step
    # alone, so continuing a build still equals a fresh one.
    unet_phase2_start: int = 9000
    unet_phase2_lr: float = 6e-4
    unet_min_snr_gamma: float = 5.0
    # The text encoder is trained with the UNet from the first step of this piecewise-constant
    # learning-rate schedule on, as [from_step, lr] pairs (see train_unet).
    unet_text_lr: list = field(default_factory=lambda: [[14000, 2e-4], [17000, 1e-3]])
    ema_decay: float = 0.999
    caption_dropout: float = 0.1
    checkpoint_every: int = 1000


def _log(message: str) -> None:
    print(f"[world build {time.strftime('%H:%M:%S')}] {message}", flush=True)


def _done(stage_dir: Path) -> bool:
    return (stage_dir / "DONE").is_file()


def _finish(tmp_dir: Path, stage_dir: Path) -> None:
    (tmp_dir / "DONE").write_text("ok\n")
    if stage_dir.exists():
        shutil.rmtree(stage_dir)
    os.replace(tmp_dir, stage_dir)


def _stage_tmp(stage_dir: Path) -> Path:
    tmp = stage_dir.with_name(stage_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def _cosine_lr(step: int, total: int, base: float, warmup: int = 200, floor: float = 0.1) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def _piecewise(schedule: list, step: int) -> float | None:
    """The value of a [[from_step, value], ...] schedule at ``step``; None before its first step."""
    current = None
    for start, value in sorted(schedule):
        if step >= start:
            current = value
    return current


def _set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


class _SampleStream:
    """An endless, seeded stream of rendered batches from one split."""

    def __init__(self, seed: int, split: str, batch: int, **fixed: str):
        self.seed, self.split, self.batch, self.cursor, self.fixed = seed, split, batch, 0, fixed

    def next(self):
        samples = generate(self.batch, seed=self.seed, split=self.split, start=self.cursor, **self.fixed)
        self.cursor += self.batch
        return samples


def build_tokenizer(out: Path):
    from transformers import CLIPTokenizer

    from conceptguard.world.tokenizer import build_clip_tokenizer

    stage = out / "tokenizer"
    if not _done(stage):
        tmp = _stage_tmp(stage)
        build_clip_tokenizer(concepts.vocabulary(), tmp, model_max_length=MAX_TOKENS)
        _finish(tmp, stage)
    return CLIPTokenizer.from_pretrained(stage)


def train_vae(out: Path, cfg: BuildConfig):
    from diffusers import AutoencoderKL

    stage = out / "vae"
    if _done(stage):
        return AutoencoderKL.from_pretrained(stage).to(cfg.device)
    torch.manual_seed(cfg.seed)
    vae = AutoencoderKL(**VAE_CONFIG).to(cfg.device)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    stream = _SampleStream(cfg.seed + 11, "all", cfg.vae_batch)
    bar = tqdm(range(cfg.vae_steps), desc="vae", mininterval=5)
    for step in bar:
        _set_lr(optimizer, _cosine_lr(step, cfg.vae_steps, 1e-3))
        images = images_to_tensor([s.image for s in stream.next()]).to(cfg.device)
        posterior = vae.encode(images).latent_dist
        recon = vae.decode(posterior.sample()).sample
        loss = F.l1_loss(recon, images) + 0.5 * F.mse_loss(recon, images) + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    # Latents are scaled to unit variance, as SD's scaling_factor does.
    with torch.no_grad():
        images = images_to_tensor([s.image for s in generate(512, seed=cfg.seed + 12, split="pretrain")])
        std = vae.encode(images.to(cfg.device)).latent_dist.mean.std().item()
    vae.register_to_config(scaling_factor=1.0 / std)
    tmp = _stage_tmp(stage)
    vae.save_pretrained(tmp, safe_serialization=True)
    _finish(tmp, stage)
    _log(f"vae done: final loss {loss.item():.4f}, scaling_factor {1 / std:.4f}")
    return vae


def _tokenize(tokenizer, captions, device):
    return tokenizer(captions, padding="max_length", max_length=MAX_TOKENS, truncation=True,
                     return_tensors="pt").input_ids.to(device)


def train_clip(out: Path, cfg: BuildConfig, tokenizer):
    from transformers import CLIPModel

    stage = out / "clip"
    if _done(stage):
        return CLIPModel.from_pretrained(stage).to(cfg.device)
    torch.manual_seed(cfg.seed + 1)
    model = CLIPModel(clip_config(len(tokenizer))).to(cfg.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.01)
    stream = _SampleStream(cfg.seed + 21, "pretrain", cfg.clip_batch)
    bar = tqdm(range(cfg.clip_steps), desc="clip", mininterval=5)
    for step in bar:
        _set_lr(optimizer, _cosine_lr(step, cfg.clip_steps, 5e-4))
        samples = stream.next()
        loss = model(input_ids=_tokenize(tokenizer, [s.caption for s in samples], cfg.device),
                     pixel_values=images_to_tensor([s.image for s in samples]).to(cfg.device),
                     return_loss=True).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    tmp = _stage_tmp(stage)
    model.save_pretrained(tmp, safe_serialization=True)
    _finish(tmp, stage)
    _log(f"clip done: final loss {loss.item():.3f}")
    return model


def _augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Blur, noise and colour drift: the artefacts a small generator leaves."""
    n = images.shape[0]
    blur = F.avg_pool2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    mix = torch.rand(n, 1, 1, 1, generator=generator) * 0.7
    images = images * (1 - mix) + blur * mix
    images = images + torch.randn(images.shape, generator=generator) * torch.rand(n, 1, 1, 1, generator=generator) * 0.08
    images = images * (1 + (torch.rand(n, 3, 1, 1, generator=generator) - 0.5) * 0.1)
    return images.clamp(-1, 1)


def _label_targets(samples, device) -> dict[str, torch.Tensor]:
    return {head: torch.tensor([labels.index(s.labels[head]) for s in samples], device=device)
            for head, labels in concepts.HEADS.items()}


def train_detector(out: Path, cfg: BuildConfig, vae):
    from safetensors.torch import load_file

    stage = out / "detector"
    detector = Detector().to(cfg.device)
    if _done(stage):
        detector.load_state_dict(load_file(stage / "model.safetensors"))
        return detector
    torch.manual_seed(cfg.seed + 2)
    generator = torch.Generator().manual_seed(cfg.seed + 3)
    optimizer = torch.optim.AdamW(detector.parameters(), lr=2e-3, weight_decay=1e-4)
    stream = _SampleStream(cfg.seed + 31, "all", cfg.detector_batch)
    bar = tqdm(range(cfg.detector_steps), desc="detector", mininterval=5)
    for step in bar:
        _set_lr(optimizer, _cosine_lr(step, cfg.detector_steps, 2e-3))
        samples = stream.next()
        images = images_to_tensor([s.image for s in samples])
        half = images.shape[0] // 2
        with torch.no_grad():  # generated images pass through the VAE decoder: teach the detector its look
            images[:half] = vae.decode(vae.encode(images[:half].to(cfg.device)).latent_dist.sample()).sample.clamp(-1, 1).cpu()
        images = _augment(images, generator).to(cfg.device)
        logits = detector(images)
        targets = _label_targets(samples, cfg.device)
        loss = sum(F.cross_entropy(logits[h], targets[h]) for h in concepts.HEADS)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    _save_detector(stage, detector)
    _log(f"detector done: final loss {loss.item():.3f}")
    return detector


def _save_detector(stage: Path, detector, tune_steps: int = 0) -> None:
    from safetensors.torch import save_file

    tmp = _stage_tmp(stage)
    save_file(detector.state_dict(), tmp / "model.safetensors")
    config = {"heads": concepts.HEADS, "width": 32}
    if tune_steps:
        config["tune_steps"] = tune_steps
    (tmp / "config.json").write_text(json.dumps(config, indent=1))
    _finish(tmp, stage)


def _load_detector_stage(stage: Path, device: str):
    from safetensors.torch import load_file

    detector = Detector().to(device)
    detector.load_state_dict(load_file(stage / "model.safetensors"))
    return detector


def detector_stage(out: Path, cfg: BuildConfig) -> Path:
    """The stage folder that holds the final (shipped) detector."""
    return out / ("detector_tune" if _tune_steps(cfg) > 0 else "detector")


def build_detector(out: Path, cfg: BuildConfig, vae):
    """The detector stages: train, then tune; a finished tune stage needs no base detector."""
    if _tune_steps(cfg) > 0 and _done(out / "detector_tune"):
        return _load_detector_stage(out / "detector_tune", cfg.device)
    detector = train_detector(out, cfg, vae)
    if _tune_steps(cfg) > 0:
        detector = tune_detector(out, cfg, vae, detector)
    return detector


def _tune_steps(cfg: BuildConfig) -> int:
    return sum(int(phase["steps"]) for phase in cfg.detector_tune)


def tune_detector(out: Path, cfg: BuildConfig, vae, detector):
    """Continue the detector, phase by phase (see ``BuildConfig.detector_tune``)."""
    stage = out / "detector_tune"
    if _done(stage):
        return _load_detector_stage(stage, cfg.device)
    for index, phase in enumerate(cfg.detector_tune):
        loss = tune_detector_phase(cfg, vae, detector, index, phase)
    detector.eval()
    _save_detector(stage, detector, tune_steps=_tune_steps(cfg))
    _log(f"detector_tune done: final loss {loss:.3f}")
    return detector


def tune_detector_phase(cfg: BuildConfig, vae, detector, index: int, phase: dict, on_step=None) -> float:
    """One tuning phase: objects oversampled, clean renders kept, shape loss weighted; returns the last loss.

    Each batch is ``1 - object_share`` of split "all" and ``object_share`` of objects (their own
    stream), shuffled; the first half passes through the VAE, then all are augmented except the
    last ``clean_share`` of the batch (never VAE-passed), which stays the clean render. Phase ``i``
    draws from its own seeds (``seed + 6 + 10 i`` ...), so phases never repeat a sample.
    """
    steps, batch, base_lr = int(phase["steps"]), cfg.detector_batch, float(phase["lr"])
    n_obj = int(batch * phase["object_share"])
    n_clean = int(batch * phase["clean_share"])
    half = batch // 2
    if n_clean > batch - half:
        raise ValueError("a detector_tune clean_share must leave the VAE-passed half alone (at most 0.5)")
    base = cfg.seed + 10 * index
    torch.manual_seed(base + 6)
    generator = torch.Generator().manual_seed(base + 7)
    optimizer = torch.optim.AdamW(detector.parameters(), lr=base_lr, weight_decay=1e-4)
    mixed = _SampleStream(base + 71, "all", batch - n_obj)
    objects = _SampleStream(base + 72, "all", n_obj, subject="object")
    bar = tqdm(range(steps), desc=f"detector_tune {index + 1}/{len(cfg.detector_tune)}", mininterval=5)
    detector.train()
    for step in bar:
        _set_lr(optimizer, _cosine_lr(step, steps, base_lr, warmup=50))
        samples = mixed.next() + objects.next()
        images = images_to_tensor([s.image for s in samples])
        order = torch.randperm(batch, generator=generator)
        images, samples = images[order], [samples[i] for i in order.tolist()]
        with torch.no_grad():
            images[:half] = vae.decode(vae.encode(images[:half].to(cfg.device)).latent_dist.sample()).sample.clamp(-1, 1).cpu()
        augmented = _augment(images, generator)
        if n_clean:
            augmented[batch - n_clean:] = images[batch - n_clean:]
        logits = detector(augmented.to(cfg.device))
        targets = _label_targets(samples, cfg.device)
        loss = sum((phase["shape_weight"] if h == "shape" else 1.0) * F.cross_entropy(logits[h], targets[h])
                   for h in concepts.HEADS)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if on_step is not None:
            on_step(step, loss.item())
    return loss.item()


@torch.no_grad()
def _encode_pretraining_set(cfg: BuildConfig, vae, text_encoder, tokenizer, cache: Path):
    if cache.is_file():
        return torch.load(cache, weights_only=True)
    means, stds, captions = [], [], []
    chunk = 500
    for start in tqdm(range(0, cfg.unet_samples, chunk), desc="encode pretraining set", mininterval=5):
        samples = generate(min(chunk, cfg.unet_samples - start), seed=cfg.seed + 41, split="pretrain", start=start)
        posterior = vae.encode(images_to_tensor([s.image for s in samples]).to(cfg.device)).latent_dist
        means.append(posterior.mean.cpu())
        stds.append(posterior.std.cpu())
        captions += [s.caption for s in samples]
    ids = _tokenize(tokenizer, captions, "cpu")
    data = {"mean": torch.cat(means), "std": torch.cat(stds), "input_ids": ids,
            "empty_ids": _tokenize(tokenizer, [""], "cpu")}
    torch.save(data, cache)
    return data


def train_unet(out: Path, cfg: BuildConfig, vae, text_encoder, tokenizer):
    """Train the UNet (and, once ``unet_text_lr`` starts, the text encoder with it); returns both, EMA weights."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    stage = out / "unet"
    if _done(stage):
        if (stage / "text_encoder").is_dir():
            text_encoder = CLIPTextModel.from_pretrained(stage / "text_encoder").to(cfg.device)
        return UNet2DConditionModel.from_pretrained(stage).to(cfg.device), text_encoder
    work = out / "unet.work"
    work.mkdir(parents=True, exist_ok=True)
    data = _encode_pretraining_set(cfg, vae, text_encoder, tokenizer, work / "latents.pt")
    torch.manual_seed(cfg.seed + 4)
    unet = UNet2DConditionModel(**UNET_CONFIG).to(cfg.device)
    ema = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    text_ema = {k: v.detach().clone() for k, v in text_encoder.state_dict().items()}
    optimizer = torch.optim.AdamW(unet.parameters(), lr=cfg.unet_lr, weight_decay=1e-2)
    text_optimizer = torch.optim.AdamW(text_encoder.parameters(), lr=0.0, weight_decay=0.0)
    scheduler = DDPMScheduler.from_config(SCHEDULER_CONFIG)
    generator = torch.Generator().manual_seed(cfg.seed + 5)
    start = 0
    checkpoint = work / "checkpoint.pt"
    if checkpoint.is_file():
        state = torch.load(checkpoint, weights_only=True)
        unet.load_state_dict(state["unet"])
        ema = state["ema"]
        optimizer.load_state_dict(state["optimizer"])
        if "text_encoder" in state:
            text_encoder.load_state_dict(state["text_encoder"])
            text_ema = state["text_ema"]
            text_optimizer.load_state_dict(state["text_optimizer"])
        generator.set_state(state["generator"])
        start = state["step"]
        _log(f"unet: resumed at step {start}")
    n = data["mean"].shape[0]
    scale = vae.config.scaling_factor
    bar = tqdm(range(start, cfg.unet_steps), desc="unet", mininterval=10, initial=start, total=cfg.unet_steps)
    for step in bar:
        # Warm-up then constant: a run of N steps is a prefix of any longer run, so training can be
        # extended (or stopped at a checkpoint) and still equal a fresh build with unet_steps=N.
        phase2 = step >= cfg.unet_phase2_start
        _set_lr(optimizer, cfg.unet_phase2_lr if phase2 else cfg.unet_lr * min(1.0, (step + 1) / 300))
        # Contrastive training leaves the text tower nearly blind to shape words (shapes are hard
        # for the tiny image tower), so the UNet gets no shape signal; tuning the text encoder on
        # the denoising loss gives it one.
        text_lr = _piecewise(cfg.unet_text_lr, step)
        tune_text = text_lr is not None
        text_encoder.train(tune_text).requires_grad_(tune_text)
        if tune_text:
            _set_lr(text_optimizer, text_lr)
        index = torch.randint(0, n, (cfg.unet_batch,), generator=generator)
        latents = data["mean"][index] + data["std"][index] * torch.randn(data["mean"][index].shape, generator=generator)
        latents = (latents * scale).to(cfg.device)
        ids = data["input_ids"][index].clone()
        drop = torch.rand(cfg.unet_batch, generator=generator) < cfg.caption_dropout
        ids[drop] = data["empty_ids"]
        with torch.set_grad_enabled(tune_text):
            context = text_encoder(ids.to(cfg.device))[0]
        noise = torch.randn(latents.shape, generator=generator).to(cfg.device)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (cfg.unet_batch,), generator=generator).to(cfg.device)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        per_sample = F.mse_loss(unet(noisy, timesteps, context).sample, noise, reduction="none").mean((1, 2, 3))
        if phase2 and cfg.unet_min_snr_gamma > 0:
            alpha_bar = scheduler.alphas_cumprod.to(cfg.device)[timesteps]
            snr = alpha_bar / (1 - alpha_bar)
            per_sample = per_sample * torch.clamp(snr, max=cfg.unet_min_snr_gamma) / snr
        loss = per_sample.mean()
        optimizer.zero_grad(set_to_none=True)
        text_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        if tune_text:
            torch.nn.utils.clip_grad_norm_(text_encoder.parameters(), 1.0)
            text_optimizer.step()
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for name, value in unet.state_dict().items():
                ema[name].lerp_(value, 1 - decay)
            if tune_text:
                for name, value in text_encoder.state_dict().items():
                    if value.dtype.is_floating_point:
                        text_ema[name].lerp_(value, 1 - decay)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.unet_steps:
            state = {"unet": unet.state_dict(), "ema": ema, "optimizer": optimizer.state_dict(),
                     "text_encoder": text_encoder.state_dict(), "text_ema": text_ema,
                     "text_optimizer": text_optimizer.state_dict(),
                     "generator": generator.get_state(), "step": step + 1}
            torch.save(state, work / "checkpoint.tmp")
            os.replace(work / "checkpoint.tmp", checkpoint)
            _log(f"unet step {step + 1}: loss {loss.item():.4f}")
    unet.load_state_dict(ema)
    text_encoder.load_state_dict(text_ema)
    text_encoder.eval().requires_grad_(False)
    tmp = _stage_tmp(stage)
    unet.save_pretrained(tmp, safe_serialization=True)
    text_encoder.save_pretrained(tmp / "text_encoder", safe_serialization=True)
    _finish(tmp, stage)
    return unet, text_encoder


def text_encoder_from_clip(clip_model):
    """The CLIP text tower as the standalone CLIPTextModel a diffusers pipeline holds."""
    from transformers import CLIPTextModel

    text_encoder = CLIPTextModel(clip_model.config.text_config)
    # transformers 5 keeps the tower's layers at the top level of CLIPTextModel.
    inner = getattr(text_encoder, "text_model", text_encoder)
    inner.load_state_dict(clip_model.text_model.state_dict())
    return text_encoder


def assemble(out: Path, target: Path, cfg: BuildConfig, tokenizer, vae, text_encoder, unet, detector) -> Path:
    """Write the shipped layout: pipeline/, clip/, detector/ and manifest.json, atomically."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=vae.cpu(), text_encoder=text_encoder, tokenizer=tokenizer, unet=unet.cpu(),
                                   scheduler=DDIMScheduler(**SCHEDULER_CONFIG), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    tmp = target.with_name(target.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    pipe.save_pretrained(tmp / "pipeline", safe_serialization=True)
    shutil.copytree(out / "clip", tmp / "clip", ignore=shutil.ignore_patterns("DONE"))
    shutil.copytree(detector_stage(out, cfg), tmp / "detector", ignore=shutil.ignore_patterns("DONE"))
    files = {}
    for path in sorted(p for p in tmp.rglob("*") if p.is_file()):
        files[str(path.relative_to(tmp))] = hashlib.sha256(path.read_bytes()).hexdigest()
    manifest = {"format": "conceptguard-world", "version": 1, "recipe": asdict(cfg), "files": files}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))
    if target.exists():
        old = target.with_name(target.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old)
    else:
        os.replace(tmp, target)
    return target


# --- carrying the UNet's training state in the repository -------------------------------------
# The UNet stage is the long one. Its full state (raw weights, Adam moments, generator) is exported
# next to the shipped assets so a later build can continue it instead of starting over; with the
# constant learning rate, continuing to step M equals a fresh build with unet_steps=M.

def _export_trained(state_dir: Path, prefix: str, weights: dict, optimizer: dict) -> dict:
    """Raw weights and Adam moments of one model as safetensors keyed by name; returns its metadata."""
    from safetensors.torch import save_file

    params = [n for n, t in weights.items() if t.dtype.is_floating_point]
    by_index = optimizer["state"]
    save_file({n: t.contiguous() for n, t in weights.items()}, state_dir / f"{prefix}_raw.safetensors")
    for moment in ("exp_avg", "exp_avg_sq"):
        tensors = {n: by_index[i][moment].contiguous() for i, n in enumerate(params) if i in by_index}
        save_file(tensors, state_dir / f"{prefix}_{moment}.safetensors")
    groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer["param_groups"]]
    return {"adam_steps": [float(by_index[i]["step"]) if i in by_index else 0.0 for i in range(len(params))],
            "param_groups": groups, "param_order": params}


def _import_trained(state_dir: Path, prefix: str, meta: dict) -> tuple[dict, dict]:
    from safetensors.torch import load_file

    raw = load_file(state_dir / f"{prefix}_raw.safetensors")
    exp_avg = load_file(state_dir / f"{prefix}_exp_avg.safetensors")
    exp_avg_sq = load_file(state_dir / f"{prefix}_exp_avg_sq.safetensors")
    order = meta["param_order"]
    optimizer = {"state": {i: {"step": torch.tensor(meta["adam_steps"][i]), "exp_avg": exp_avg[n],
                               "exp_avg_sq": exp_avg_sq[n]} for i, n in enumerate(order) if n in exp_avg},
                 "param_groups": [dict(g, params=list(range(len(order)))) for g in meta["param_groups"]]}
    return raw, optimizer


def export_unet_state(out: Path, state_dir: Path) -> Path:
    """Write the UNet stage's checkpoint (UNet and text encoder) as safetensors + state.json."""
    state = torch.load(out / "unet.work" / "checkpoint.pt", weights_only=True)
    # Written beside the old state and swapped in, so files of an older export never linger.
    tmp = state_dir.with_name(state_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    if (state_dir / "README.md").is_file():
        shutil.copy2(state_dir / "README.md", tmp / "README.md")
    meta = {"step": int(state["step"]), "generator": state["generator"].tolist(),
            "unet": _export_trained(tmp, "unet", state["unet"], state["optimizer"])}
    if "text_encoder" in state:
        meta["text_encoder"] = _export_trained(tmp, "text_encoder", state["text_encoder"], state["text_optimizer"])
    (tmp / "state.json").write_text(json.dumps(meta))
    if state_dir.exists():
        old = state_dir.with_name(state_dir.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        state_dir.rename(old)
        tmp.rename(state_dir)
        shutil.rmtree(old)
    else:
        tmp.rename(state_dir)
    return state_dir


def seed_build_from_shipped(out: Path, assets: Path, state_dir: Path) -> int:
    """Fill a build folder from the shipped assets and exported UNet state; returns the UNet step.

    Every finished stage (tokenizer, VAE, CLIP, detector — as detector_tune when the shipped one is tuned)
    comes from the assets; the UNet stage's
    checkpoint is rebuilt from ``state_dir`` (its EMA weights are the shipped UNet and text encoder).
    """
    from safetensors.torch import load_file

    out.mkdir(parents=True, exist_ok=True)
    # The shipped detector is the last detector stage's output: the tuned one when its config says so.
    detector_config = assets / "detector" / "config.json"
    tuned = detector_config.is_file() and json.loads(detector_config.read_text()).get("tune_steps", 0) > 0
    for stage, source in (("tokenizer", assets / "pipeline" / "tokenizer"), ("vae", assets / "pipeline" / "vae"),
                          ("clip", assets / "clip"), ("detector_tune" if tuned else "detector", assets / "detector")):
        if not _done(out / stage):
            tmp = _stage_tmp(out / stage)
            shutil.copytree(source, tmp, dirs_exist_ok=True)
            _finish(tmp, out / stage)
    meta = json.loads((state_dir / "state.json").read_text())
    raw, optimizer = _import_trained(state_dir, "unet", meta["unet"])
    state = {"unet": raw, "optimizer": optimizer, "step": meta["step"],
             "ema": load_file(assets / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors"),
             "generator": torch.tensor(meta["generator"], dtype=torch.uint8)}
    if "text_encoder" in meta:
        state["text_encoder"], state["text_optimizer"] = _import_trained(state_dir, "text_encoder", meta["text_encoder"])
        state["text_ema"] = load_file(assets / "pipeline" / "text_encoder" / "model.safetensors")
    work = out / "unet.work"
    work.mkdir(parents=True, exist_ok=True)
    torch.save(state, work / "checkpoint.pt")
    if (out / "unet").exists():
        shutil.rmtree(out / "unet")
    return meta["step"]


def build_world(out_dir: str | Path, target: str | Path | None = None, cfg: BuildConfig | None = None) -> Path:
    """Run every stage (resuming finished ones) and assemble the shipped artefacts into ``target``."""
    cfg = cfg or BuildConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "build_config.json").write_text(json.dumps(asdict(cfg), indent=1))
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    tokenizer = build_tokenizer(out)
    vae = train_vae(out, cfg).eval()
    clip_model = train_clip(out, cfg, tokenizer).eval()
    detector = build_detector(out, cfg, vae).eval()
    text_encoder = text_encoder_from_clip(clip_model).to(cfg.device)
    unet, text_encoder = train_unet(out, cfg, vae, text_encoder.eval(), tokenizer)
    return assemble(out, Path(target) if target else out / "world", cfg, tokenizer, vae, text_encoder.cpu(), unet,
                    detector)
