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

Speed (``docs/performance.md``): sampling ``x_t`` costs ``k`` batch-2 UNet calls per training step
(25 on average), several times the training step itself. Two switches cut it:

- :class:`TrajectoryPool`: a trajectory passes through a state at *every* DDIM step, so ``K``
  whole trajectories sampled in one batch hold ``K * steps`` training latents. When the sampling
  model does not change (ESD's frozen sampler) each pooled state is exactly a draw of the per-step
  sampler; only states of one trajectory share their ``x_T``.
- :func:`compile_predictor`: ``torch.compile`` with CUDA graphs for the sampler's small no-grad
  UNet calls, which are launch-bound on a GPU. A no-op off CUDA.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from conceptguard.diffusion import Conditioning, encode_prompts, is_sdxl

logger = logging.getLogger(__name__)

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
        for latents in self._steps(predict, cond, uncond, latents, k):  # k = 0 keeps the noise itself
            pass
        return TrajectorySample(latents, timestep, k, (low, high))

    @torch.no_grad()
    def trajectories(self, predict: Predictor, cond: Conditioning, uncond: Conditioning,
                     noise: torch.Tensor) -> torch.Tensor:
        """Every state of the guided trajectories from ``noise`` (B, C, H, W), all B in one batch.

        Returns (B, num_steps, C, H, W): entry ``[:, k]`` is the latent after ``k`` steps, what
        :meth:`sample` returns for that ``k`` and the same initial noise (``[:, 0]`` is the noise).
        """
        latents = noise * self.scheduler.init_noise_sigma
        states = [latents]
        states.extend(self._steps(predict, cond, uncond, latents, self.num_steps - 1))
        return torch.stack(states, dim=1)

    def _steps(self, predict: Predictor, cond: Conditioning, uncond: Conditioning, latents: torch.Tensor,
               k: int) -> Iterator[torch.Tensor]:
        """The latents after each of the first ``k`` guided DDIM steps from ``latents`` (B, C, H, W)."""
        batch, device, dtype = latents.shape[0], latents.device, latents.dtype
        # One batched UNet call per step for both CFG branches of every trajectory.
        both = Conditioning.cat([uncond] * batch + [cond] * batch).to(device=device)
        for t in self.scheduler.timesteps[:k]:
            out = predict(torch.cat([latents, latents]), t.reshape(1).repeat(2 * batch).to(device), both)
            out_uncond, out_cond = out.float().chunk(2)
            guided = out_uncond + self.guidance_scale * (out_cond - out_uncond)
            # DDIM's step converts epsilon / v / sample outputs itself, per the prediction type.
            latents = self.scheduler.step(guided, t, latents.float(), eta=0.0).prev_sample.to(dtype)
            yield latents


class TrajectoryPool:
    """Whole trajectories of one prompt, sampled ``size`` at a time, handed out one state per draw.

    A draw takes a state not used yet — trajectory ``j`` after ``k`` steps, in an order drawn from
    the generator, so every ``k`` comes up equally often — and draws ``t`` in step ``k``'s interval
    exactly as :meth:`PartialDDIM.sample` does. The pool is sampled again, from fresh noise and
    with the predictor of that moment, once all ``size * num_steps`` states have been used, or
    when ``refresh`` training steps have passed since it was sampled: a model that changes during
    training, like SDD's EMA teacher, is then at most ``refresh`` steps behind the states handed out.

    All randomness comes from the caller's generator, and :meth:`state_dict` holds everything
    else, so a run with a pool is reproducible and resumes bit for bit.
    """

    def __init__(self, sampler: PartialDDIM, size: int, refresh: int = 0):
        if size < 1:
            raise ValueError(f"a trajectory pool needs at least one trajectory, got {size}")
        if refresh < 0:
            raise ValueError(f"pool refresh must be >= 0 (0: when every state is used), got {refresh}")
        self.sampler = sampler
        self.size = size
        self.refresh = refresh
        self.capacity = size * sampler.num_steps  # states per fill
        self.states: torch.Tensor | None = None  # (size, num_steps, C, H, W)
        self.order = torch.zeros(0, dtype=torch.long)  # flat indices j * num_steps + k, in draw order
        self.used = 0  # draws taken from the current states
        self.filled_at = 0  # the training step of the last fill
        self.fills = 0  # how often the pool was sampled (for tests and benchmarks)

    def draw(self, predict: Predictor, cond: Conditioning, uncond: Conditioning, generator: torch.Generator,
             shape: tuple[int, ...], *, step: int, device, dtype=torch.float32) -> TrajectorySample:
        """One state for training step ``step`` (sampling the pool first when it is used up or too old)."""
        stale = self.refresh and step - self.filled_at >= self.refresh
        if self.states is None or self.used >= self.capacity or stale:
            noise = torch.randn((self.size, *shape[1:]), generator=generator).to(device=device, dtype=dtype)
            self.states = self.sampler.trajectories(predict, cond, uncond, noise)
            self.order = torch.randperm(self.capacity, generator=generator)
            self.used, self.filled_at, self.fills = 0, step, self.fills + 1
        j, k = divmod(int(self.order[self.used]), self.sampler.num_steps)
        self.used += 1
        low, high = self.sampler.interval(k)
        timestep = torch.randint(low, high + 1, (1,), generator=generator).to(device)
        return TrajectorySample(self.states[j, k][None], timestep, k, (low, high))

    def state_dict(self, prefix: str) -> dict[str, torch.Tensor]:
        if self.states is None:
            return {}
        return {f"{prefix}states": self.states, f"{prefix}order": self.order,
                f"{prefix}counters": torch.tensor([self.used, self.filled_at, self.fills])}

    def load_state_dict(self, state: Mapping[str, torch.Tensor], prefix: str, device) -> None:
        if f"{prefix}states" not in state:  # saved before this pool was first filled
            self.states, self.used, self.filled_at, self.fills = None, 0, 0, 0
            return
        self.states = state[f"{prefix}states"].to(device)
        self.order = state[f"{prefix}order"].clone()
        self.used, self.filled_at, self.fills = (int(v) for v in state[f"{prefix}counters"])


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


def compile_predictor(predict: Predictor, device) -> Predictor:
    """``predict`` compiled for the sampler's many small no-grad calls, on CUDA; elsewhere ``predict``.

    A batch-2 UNet call at SD scale is bound by kernel launches, which CUDA graphs
    (``mode="reduce-overhead"``) replay at once. Off CUDA there are no graphs to gain, and compiling
    a UNet on a CPU takes longer than the sampling it would speed up, so the switch is a no-op there.
    """
    if torch.device(device).type != "cuda":
        logger.info("compile_sampler: not on CUDA, sampling uncompiled")
        return predict

    # Tensors in, tensors out: the conditioning is unpacked so the compiled graph's inputs are plain.
    def tensors_predict(latents, timesteps, embeds, pooled, time_ids):
        return predict(latents, timesteps, Conditioning(embeds, pooled, time_ids))

    compiled = torch.compile(tensors_predict, mode="reduce-overhead")

    def run(latents: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        # Each call is a new step for CUDA graph trees: the previous call's output is consumed by then.
        torch.compiler.cudagraph_mark_step_begin()
        return compiled(latents, timesteps, cond.embeds, cond.pooled, cond.time_ids).clone()

    return run


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
