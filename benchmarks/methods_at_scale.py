"""Seconds per iteration and peak GPU memory of every method at SD 1.5 and SDXL scale (issue #9).

    python benchmarks/methods_at_scale.py --device cuda --scale sd15            # bf16 autocast on CUDA
    python benchmarks/methods_at_scale.py --device cuda --scale sdxl --gradient-checkpointing
    OMP_NUM_THREADS=1 python benchmarks/methods_at_scale.py --device cpu --scale tiny    # smoke test, seconds
    OMP_NUM_THREADS=1 python benchmarks/methods_at_scale.py --device cpu --scale world   # embedded world

``sd15`` and ``sdxl`` build the real architectures (UNet, text encoder(s), VAE) from the configs
below with random weights — nothing is downloaded, and the cost of a step does not depend on the
weights. ``world`` is the shipped embedded world, ``tiny`` / ``tiny-sdxl`` the test suite's
random pipelines.

Each method runs its own recipe for ``--warmup`` + ``--steps`` optimizer steps the way
:func:`conceptguard.training.train` does (autocast, backward, gradient norm, optimizer step, the
recipe's hook) but without checkpoints, which at SDXL scale would write tens of GB. Reported:

- ``s/it``: median wall time of the measured steps (CUDA synchronised);
- ``peak GiB``: ``torch.cuda.max_memory_allocated`` over the steps, weights included (CUDA only);
- ESD/SDD: the x_t sampling split out, and a projection for the papers' 1000 iterations —
  per-step sampling at the mean ``k`` of (steps - 1) / 2 DDIM steps, pooled sampling at the pool
  fills that 1000 iterations need.

The figures measured so far, and the goals, are in docs/performance.md.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field

import torch

# --- the architectures, from their published configs ---------------------------------------------------

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8)

SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
    cross_attention_dim=2048, addition_embed_type="text_time", addition_time_embed_dim=256,
    # Six Fourier-embedded size/crop numbers (6 x 256) and the second encoder's pooled projection (1280).
    projection_class_embeddings_input_dim=2816)

# CLIP ViT-L/14's text tower (SD 1.5, and SDXL's first encoder) and OpenCLIP ViT-bigG's (SDXL's second).
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              hidden_act="quick_gelu", projection_dim=768)
CLIP_BIGG = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                 hidden_act="gelu", projection_dim=1280)

VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
           block_out_channels=(128, 256, 512, 512),
           down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)

# Per scale: batch of fine-tuning and mask steps (the issue's reference figures) and trajectory pool size.
SETTINGS = {
    "tiny": dict(batch=4, pool=16), "tiny-sdxl": dict(batch=1, pool=16), "world": dict(batch=4, pool=16),
    "sd15": dict(batch=4, pool=16), "sdxl": dict(batch=1, pool=8),
}


def _text_encoder(cls, tokenizer, spec):
    from transformers import CLIPTextConfig

    return cls(CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, layer_norm_eps=1e-5,
                              bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id, **spec))


def build_random_pipeline(scale: str, device: str):
    """SD 1.5 or SDXL with random fp32 weights, built directly on ``device``."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from conceptguard.models.tiny import TINY_WORDS
    from conceptguard.world.tokenizer import build_clip_tokenizer

    with tempfile.TemporaryDirectory() as folder:
        # A small BPE vocabulary is enough: the text encoders read 77 positions whatever the ids are.
        tokenizer = build_clip_tokenizer(list(TINY_WORDS), folder, model_max_length=77)
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                              steps_offset=1)
    with torch.device(device):  # initialise on the GPU: seconds instead of minutes for 2.6 B parameters
        if scale == "sd15":
            return StableDiffusionPipeline(
                vae=AutoencoderKL(**VAE, sample_size=512), text_encoder=_text_encoder(CLIPTextModel, tokenizer, CLIP_L),
                tokenizer=tokenizer, unet=UNet2DConditionModel(**SD15_UNET), scheduler=scheduler,
                safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        return StableDiffusionXLPipeline(
            vae=AutoencoderKL(**VAE, sample_size=1024, scaling_factor=0.13025),
            text_encoder=_text_encoder(CLIPTextModel, tokenizer, CLIP_L),
            text_encoder_2=_text_encoder(CLIPTextModelWithProjection, tokenizer, CLIP_BIGG),
            tokenizer=tokenizer, tokenizer_2=tokenizer, unet=UNet2DConditionModel(**SDXL_UNET), scheduler=scheduler,
            add_watermarker=False)


def load_scale(scale: str, device: str):
    if scale in ("sd15", "sdxl"):
        pipe = build_random_pipeline(scale, device)
    elif scale == "world":
        from conceptguard.world import load_embedded_pipeline

        pipe = load_embedded_pipeline(device=device)
    else:
        from conceptguard.models.tiny import build_tiny_pipeline

        pipe = build_tiny_pipeline("sdxl" if scale == "tiny-sdxl" else "sd1").to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# --- measuring -------------------------------------------------------------------------------------------


@dataclass
class Row:
    method: str
    setting: str
    s_per_it: float = math.nan
    peak_gib: float = math.nan
    notes: list[str] = field(default_factory=list)


class Bench:
    def __init__(self, args):
        self.args = args
        self.cuda = args.device.startswith("cuda")
        # CPU seconds of this process: on a machine shared with other jobs, what a step costs, not
        # how long it waited (single-threaded runs only, or the threads' times add up).
        self.clock = time.process_time if args.clock == "cpu" else time.perf_counter

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def timed(self, fn, record: list):
        """``fn`` that appends (seconds, result) of every call to ``record``."""
        def wrapper(*args, **kwargs):
            self.sync()
            start = self.clock()
            out = fn(*args, **kwargs)
            self.sync()
            record.append((self.clock() - start, out))
            return out
        return wrapper

    def free(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()

    def run_steps(self, recipe, optimizer: str, *, after_warmup=None) -> tuple[list[float], float]:
        """Step times of the measured steps and the peak memory (GiB) over all steps."""
        from accelerate import Accelerator

        args = self.args
        accelerator = Accelerator(mixed_precision=args.mixed_precision, cpu=not self.cuda)
        if args.gradient_checkpointing:
            recipe.set_gradient_checkpointing(True)
        try:
            recipe.setup(accelerator)
            params = list(recipe.trainable_parameters().values())
            lr = 10.0 if optimizer == "sgd" else 1e-5
            optimizers = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}
            opt = optimizers[optimizer](params, lr=lr)
            hook = getattr(recipe, "on_optimizer_step", None)
            generator = torch.Generator().manual_seed(0)
            self.free()
            if self.cuda:
                torch.cuda.reset_peak_memory_stats()
            times = []
            for step in range(1, args.warmup + args.steps + 1):
                if step == args.warmup + 1 and after_warmup is not None:
                    after_warmup()
                self.sync()
                start = self.clock()
                with accelerator.autocast():  # as the training loop: bf16 forward, fp32 master weights
                    loss = recipe.loss(step, generator)
                accelerator.backward(loss)
                torch.nn.utils.clip_grad_norm_(params, math.inf)  # the loop measures the norm every step
                opt.step()
                opt.zero_grad(set_to_none=True)
                if hook is not None:
                    hook(step)
                loss.item()
                self.sync()
                times.append(self.clock() - start)
            peak = torch.cuda.max_memory_allocated() / 2**30 if self.cuda else math.nan
            return times[args.warmup:], peak
        finally:
            if args.gradient_checkpointing:
                recipe.set_gradient_checkpointing(False)
            accelerator.free_memory()


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _images(pipe, n: int) -> tuple[torch.Tensor, list[str]]:
    from conceptguard.diffusion import image_size

    size = image_size(pipe)
    images = torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    return images, ["a photo of a cat in the city"] * n


def bench_finetune(bench: Bench, pipe, batch: int, frozen_ratio: float = 0.0) -> Row:
    from conceptguard.finetune import TextToImageRecipe
    from conceptguard.guard.maskfile import random_frozen

    names = [name for name, _ in pipe.unet.named_parameters()]
    frozen = set(random_frozen(names, frozen_ratio, seed=0)) if frozen_ratio else set()
    recipe = TextToImageRecipe(pipe, *_images(pipe, 2 * batch), [n for n in names if n not in frozen], batch_size=batch)
    times, peak = bench.run_steps(recipe, "adamw")
    label = "full FT" if not frozen_ratio else f"guarded FT ({100 * frozen_ratio:g}% tensors frozen)"
    return Row(label, f"batch {batch}", statistics.median(times), peak)


def bench_trajectory_method(bench: Bench, pipe, method: str, pooled: bool, pool: int) -> Row:
    """ESD-x (faithful: x_t by the model being trained; pooled: frozen sampler) or SDD, one concept."""
    from conceptguard.methods.esd import ESDConfig, ESDRecipe
    from conceptguard.methods.sdd import SDDConfig, SDDRecipe
    from conceptguard.models.params import select_for

    common = dict(concepts=["a cat"], ddim_steps=bench.args.ddim_steps, compile_sampler=bench.args.compile)
    if method == "esd":
        extra = dict(sampler="frozen", trajectory_pool=pool) if pooled else {}
        config = ESDConfig(variant="x", **common, **extra)
        recipe, optimizer = ESDRecipe(pipe, config, list(select_for(pipe.unet, config))), "adam"
        label = f"ESD-x {'pooled' if pooled else 'faithful'}"
        setting = f"frozen sampler, pool {pool}" if pooled else "x_t by the trained model, batch 1"
    else:
        config = SDDConfig(**common, trajectory_pool=pool if pooled else 0)
        recipe, optimizer = SDDRecipe(pipe, config, list(select_for(pipe.unet, config))), "adamw"
        label = f"SDD {'pooled' if pooled else 'faithful'}"
        setting = f"EMA teacher, pool {pool}, refresh {config.pool_refresh}" if pooled else "z_t by the EMA teacher"
    if bench.args.compile:
        setting += ", compiled sampler"
    draws: list = []
    recipe.draw = bench.timed(recipe.draw, draws)

    def refill():
        # Sample the pools afresh on the first measured step, so the fill is timed warm.
        for p in recipe.pools:
            p.states = None
        draws.clear()

    times, peak = bench.run_steps(recipe, optimizer, after_warmup=refill if pooled else draws.clear)
    steps = config.ddim_steps
    row = Row(label, setting, statistics.median(times), peak)
    if not pooled:
        draw_seconds = sum(s for s, _ in draws)
        ks = sum(sample.steps_done for s, (_, sample) in draws)
        per_ddim_step = draw_seconds / max(ks, 1)
        train = statistics.median(t - s for t, (s, _) in zip(times, draws))
        mean_k = (steps - 1) / 2
        drawn_k = [sample.steps_done for _, (_, sample) in draws]
        row.notes.append(f"measured {statistics.median(times):.3f} s/it at k = {drawn_k}")
        row.notes.append(f"sampling {per_ddim_step:.4f} s per guided DDIM step, training {train:.3f} s/it")
        projected = 1000 * (train + mean_k * per_ddim_step)
        row.s_per_it = train + mean_k * per_ddim_step
        row.notes.append(f"at mean k {mean_k:g}: {row.s_per_it:.3f} s/it, 1000 its {projected / 60:.1f} min")
    else:
        fill = draws[0][0]
        train = statistics.median(times[1:]) if len(times) > 1 else times[0] - fill
        first = recipe.pools[0]
        per_fill = min(first.capacity, first.refresh or first.capacity)  # one concept: one draw per step
        fills = math.ceil(1000 / per_fill)
        projected = 1000 * train + fills * fill
        row.s_per_it = train
        row.notes.append(f"pool fill {fill:.2f} s ({first.size} trajectories x {steps} steps, "
                         f"one per {per_fill} its), training {train:.3f} s/it")
        row.notes.append(f"1000 its {projected / 60:.2f} min ({fills} fills)")
    return row


def bench_uce(bench: Bench, pipe, concepts: int = 50) -> Row:
    from conceptguard.methods.uce import UCEConfig, edit_weights

    names = [f"concept {chr(97 + i // 26)}{chr(97 + i % 26)}" for i in range(concepts)]
    config = UCEConfig(concepts=names)
    edit_weights(pipe, config)  # warm-up: lazy CUDA / solver initialisation
    bench.free()
    if bench.cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(max(1, bench.args.steps // 2)):
        record: list = []
        bench.timed(edit_weights, record)(pipe, config)
        times.append(record[0][0])
    peak = torch.cuda.max_memory_allocated() / 2**30 if bench.cuda else math.nan
    return Row("UCE", f"{concepts} concepts, closed form", statistics.median(times), peak)


def bench_mask(bench: Bench, pipe, batch: int) -> Row:
    from conceptguard.guard import GuardConfig, MaskLearningRecipe

    data = _images(pipe, 2 * batch)
    # init="code" skips the paper init's 100 unmasked user steps on step 1; each step is then one
    # simulated-user step and one mask update, timed apart.
    recipe = MaskLearningRecipe(pipe, data, data, GuardConfig(batch_size=batch, inner_steps=1, init="code"))
    user: list = []
    recipe.user_step = bench.timed(recipe.user_step, user)
    try:
        times, peak = bench.run_steps(recipe, "sgd", after_warmup=user.clear)
    finally:
        if recipe.masked is not None:
            recipe.finish()  # W_pre back into the UNet, requires_grad restored
    mask_update = statistics.median(t - s for t, (s, _) in zip(times, user))
    row = Row("mask step", f"FreezeAsGuard, batch {batch} per domain", mask_update, peak)
    user_step = statistics.median(s for s, _ in user)
    row.notes.append(f"mask update {mask_update:.3f} s + simulated-user step {user_step:.3f} s "
                     f"= {statistics.median(times):.3f} s per iteration at inner_steps 1")
    return row


METHODS = ("ft", "esd-faithful", "esd-pooled", "sdd-faithful", "sdd-pooled", "uce", "mask", "guarded-ft")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", choices=tuple(SETTINGS), default="tiny")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--steps", type=int, default=10, help="measured steps per method")
    parser.add_argument("--warmup", type=int, default=3, help="steps run first and not measured")
    parser.add_argument("--batch", type=int, default=None,
                        help="batch of fine-tuning and mask steps (default per scale)")
    parser.add_argument("--pool", type=int, default=None, help="trajectories per pool (default per scale)")
    parser.add_argument("--ddim-steps", type=int, default=50, help="DDIM steps of the ESD/SDD x_t sampler (papers: 50)")
    parser.add_argument("--mixed-precision", choices=("no", "bf16", "fp16"), default=None,
                        help="autocast (default: bf16 on CUDA, no on the CPU)")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="time steps by the wall clock or by this process's CPU time (a shared CPU, one thread)")
    parser.add_argument("--compile", action="store_true",
                        help="compile_sampler for ESD/SDD (CUDA graphs; no-op on CPU)")
    args = parser.parse_args()
    args.mixed_precision = args.mixed_precision or ("bf16" if args.device.startswith("cuda") else "no")
    settings = SETTINGS[args.scale]
    batch, pool = args.batch or settings["batch"], args.pool or settings["pool"]

    bench = Bench(args)
    started = time.perf_counter()
    pipe = load_scale(args.scale, args.device)
    unet_params = sum(p.numel() for p in pipe.unet.parameters())
    processors = sorted({type(p).__name__ for p in pipe.unet.attn_processors.values()})
    device = torch.cuda.get_device_name() if bench.cuda else cpu_name()
    print(f"scale {args.scale}: UNet {unet_params / 1e6:.1f} M parameters, attention {', '.join(processors)}; "
          f"built in {time.perf_counter() - started:.1f} s")
    print(f"device {args.device} ({device}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} CPUs); autocast {args.mixed_precision}; gradient checkpointing "
          f"{'on' if args.gradient_checkpointing else 'off'}; compiled sampler {'on' if args.compile else 'off'}; "
          f"{args.steps} measured steps after {args.warmup}; {args.clock} clock")

    jobs = {
        "ft": lambda: bench_finetune(bench, pipe, batch),
        "esd-faithful": lambda: bench_trajectory_method(bench, pipe, "esd", False, pool),
        "esd-pooled": lambda: bench_trajectory_method(bench, pipe, "esd", True, pool),
        "sdd-faithful": lambda: bench_trajectory_method(bench, pipe, "sdd", False, pool),
        "sdd-pooled": lambda: bench_trajectory_method(bench, pipe, "sdd", True, pool),
        "uce": lambda: bench_uce(bench, pipe),
        "mask": lambda: bench_mask(bench, pipe, batch),
        "guarded-ft": lambda: bench_finetune(bench, pipe, batch, frozen_ratio=0.3),
    }
    rows = []
    for name in args.methods:
        start = time.perf_counter()
        try:
            row = jobs[name]()
        except torch.cuda.OutOfMemoryError:
            row = Row(name, "out of memory")
        except Exception as exc:  # report and go on: one method's failure should not hide the others' figures
            row = Row(name, f"failed: {type(exc).__name__}: {str(exc)[:200]}")
        bench.free()
        print(f"  {row.method}: {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
        rows.append(row)

    print()
    print("| method | setting | s/it | peak GiB | notes |")
    print("|---|---|---:|---:|---|")
    for row in rows:
        print(f"| {row.method} | {row.setting} | {row.s_per_it:.4f} | {row.peak_gib:.1f} | {'; '.join(row.notes)} |")
    by_name = {row.method: row for row in rows}
    full, guarded = by_name.get("full FT"), next((r for r in rows if r.method.startswith("guarded FT")), None)
    mask = by_name.get("mask step")
    print()
    for label, row, goal in (("mask step", mask, "<= 1.3x"), ("guarded FT", guarded, "<= 0.9x time, <= 0.8x memory")):
        if full is not None and row is not None:
            memory = f", memory {row.peak_gib / full.peak_gib:.2f}x" if bench.cuda else ""
            print(f"{label} vs full FT: time {row.s_per_it / full.s_per_it:.2f}x{memory} (goal {goal})")


if __name__ == "__main__":
    main()
