"""ESD — Erasing Concepts from Diffusion Models (Gandikota et al., ICCV 2023).

The model is fine-tuned so that, prompted with concept ``c``, it predicts what the *frozen* model
predicts under negative guidance away from ``c``::

    loss = || eps(x_t, c, t) - sg[ eps*(x_t, a, t) - eta * (eps*(x_t, c, t) - eps*(x_t, ∅, t)) ] ||²

with anchor ``a = ∅`` (the paper) or ``a = c_from`` with ``erase_from``, in which case the edited
model is also prompted with ``c_from`` and ``x_t`` sampled from it. ``eta`` is the paper's: 1 by
default. The authors' newest code always anchors on ``eps*(c)`` (``erase_from`` = the concept
itself), which shifts its scale by one: its ``eta = 2`` is the paper's ``eta = 1`` — here,
``erase_from=[concept], eta=2`` gives exactly the paper's loss with ``eta=1``.

``x_t`` comes from DDIM (50 steps, CFG 3, eta 0) on the concept's prompt, stopped after
``k ~ U{0..49}`` steps, run by the model being trained (``sampler="model"``, the paper) or by the
frozen model (``sampler="frozen"``, the newest code); see :mod:`conceptguard.methods.trajectory`.
With the frozen sampler, ``trajectory_pool=K`` samples ``K`` whole trajectories per concept in one
batch and hands out their states one per step: the same distribution of ``x_t`` for a fraction of
the sampling cost (the frozen model never changes, so a state sampled early is as good as one
sampled late).

The loss is computed in the UNet's own output space (epsilon, or v for SD 2.x-v): the target is an
affine combination whose weights sum to one, so converting every term to epsilon gives the same
target, and the squared error differs only by the per-timestep factor ``alpha_bar_t`` — the
weighting the model was pretrained with.

Memory: the frozen model ``eps*`` is *not* a second UNet. Only the trained tensors are copied at
setup; ``eps*`` runs the live UNet with those original values swapped in through
``torch.func.functional_call``. ESD-x thus costs a few MB extra on SD 1.5, ESD-u about one copy
of the non-attention weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F

from conceptguard.config import config_to_dict
from conceptguard.diffusion import (
    Conditioning,
    encode_prompts,
    eval_mode,
    prepare_trainable,
    set_gradient_checkpointing,
)
from conceptguard.errors import ConceptGuardError
from conceptguard.methods import MethodResult, register_method
from conceptguard.methods.trajectory import (
    PartialDDIM,
    TrajectoryPool,
    TrajectorySample,
    compile_predictor,
    empty_conditioning,
    functional_predictor,
    latent_shape,
    module_predictor,
    train_config_with_defaults,
)
from conceptguard.models.params import select_for


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass
class ESDConfig:
    """What ESD erases and how; optimizer settings live in TrainConfig (defaults: ``default_train``)."""

    concepts: list[str] = field(default_factory=list, metadata=_help(
        "concepts to erase; with several, each step erases one picked at random"))
    variant: Literal["x", "x-strict", "u", "all"] = field(default="x", metadata=_help(
        "UNet parameters to train: x (cross-attention, ESD-x), x-strict (attn2 to_k/to_v), "
        "u (all but cross-attention, ESD-u), all"))
    eta: float = field(default=1.0, metadata=_help(
        "negative guidance, paper definition (the newest authors' code's 2 equals 1 here)"))
    erase_from: list[str] = field(default_factory=list, metadata=_help(
        "anchor concept(s) c_from: target eps*(c_from) - eta*(eps*(c) - eps*(∅)) for the model prompted with "
        "c_from; one for all concepts or one per concept (default: anchor on the empty prompt)"))
    sampler: Literal["model", "frozen"] = field(default="model", metadata=_help(
        "which model samples x_t: model (the one being trained, paper) or frozen (newest code)"))
    ddim_steps: int = field(default=50, metadata=_help("DDIM steps of the x_t sampler"))
    sample_guidance: float = field(default=3.0, metadata=_help("classifier-free guidance of the x_t sampler"))
    trajectory_pool: int = field(default=0, metadata=_help(
        "whole x_t trajectories per concept, sampled in one batch, one state used per step (ESD: with sampler "
        "frozen); 0 samples x_t afresh every step (the papers)"))
    pool_refresh: int = field(default=0, metadata=_help(
        "training steps after which a concept's trajectory pool is sampled again, when next drawn "
        "(0: once every state has been used)"))
    compile_sampler: bool = field(default=False, metadata=_help(
        "torch.compile the x_t sampler's UNet calls with CUDA graphs (GPU only; ignored on the CPU)"))
    include: list[str] = field(default_factory=list, metadata=_help("narrow the variant to these name patterns"))
    exclude: list[str] = field(default_factory=list, metadata=_help("keep parameters matching these patterns frozen"))
    exclude_time_and_out: bool = field(default=False, metadata=_help(
        "also freeze time_embedding and conv_out (the original ESD code's u variant)"))

    # The paper's optimization; TrainConfig fields a caller does not set come from here.
    default_train: ClassVar[dict[str, Any]] = dict(
        steps=1000, lr=1e-5, optimizer="adam", weight_decay=0.0, lr_schedule="constant", warmup_steps=0,
        max_grad_norm=0.0)

    def __post_init__(self) -> None:
        if isinstance(self.concepts, str):
            self.concepts = [self.concepts]
        if isinstance(self.erase_from, str):
            self.erase_from = [self.erase_from]
        self.concepts, self.erase_from = list(self.concepts), list(self.erase_from)
        self.eta = float(self.eta)
        self.sample_guidance = float(self.sample_guidance)
        if self.variant not in ("x", "x-strict", "u", "all"):
            raise ValueError(f"variant must be x, x-strict, u or all; got {self.variant!r}")
        if self.sampler not in ("model", "frozen"):
            raise ValueError(f"sampler must be model or frozen; got {self.sampler!r}")
        if not isinstance(self.ddim_steps, int) or self.ddim_steps < 1:
            raise ValueError(f"ddim_steps must be a positive integer, got {self.ddim_steps!r}")
        for name in ("trajectory_pool", "pool_refresh"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {getattr(self, name)!r}")
        if self.trajectory_pool and self.sampler != "frozen":
            # States sampled by the model being trained would lag it by up to K * ddim_steps steps.
            raise ValueError("trajectory_pool needs sampler='frozen': the model being trained changes every step")
        if self.erase_from and len(self.erase_from) not in (1, len(self.concepts)):
            raise ValueError(f"erase_from needs one anchor or one per concept ({len(self.concepts)}), "
                             f"got {len(self.erase_from)}")

    def anchors(self) -> list[str | None]:
        """The anchor prompt of each concept (None = the empty prompt, the paper's anchor)."""
        if not self.erase_from:
            return [None] * len(self.concepts)
        return self.erase_from * len(self.concepts) if len(self.erase_from) == 1 else list(self.erase_from)


class ESDRecipe:
    """The ESD loss as a :class:`~conceptguard.training.loop.Recipe` (batch 1, one concept per step)."""

    def __init__(self, pipe, config: ESDConfig, parameter_names: list[str]):
        if not config.concepts:
            raise ConceptGuardError("ESD needs at least one concept to erase (--concepts)")
        self.pipe = pipe
        self.config = config
        self.parameter_names = list(parameter_names)
        self.sampler = PartialDDIM(pipe.scheduler.config, config.ddim_steps, config.sample_guidance)
        self.pools = [TrajectoryPool(self.sampler, config.trajectory_pool, config.pool_refresh)
                      for _ in config.concepts] if config.trajectory_pool else []

    def setup(self, accelerator) -> None:
        pipe, device = self.pipe, accelerator.device
        self.trainable = prepare_trainable(pipe, self.parameter_names, device)
        unet = pipe.unet
        # Taken before the loop loads a checkpoint, so on resume this is still the original model.
        self.frozen = {name: p.detach().clone() for name, p in self.trainable.items()}

        concepts, anchors = self.config.concepts, self.config.anchors()
        self.empty = empty_conditioning(pipe, device)
        self.cond = [encode_prompts(pipe, [c], device=device) for c in concepts]
        self.anchor = [self.empty if a is None else encode_prompts(pipe, [a], device=device) for a in anchors]
        # With an anchor concept the edited model is prompted (and x_t sampled) with c_from.
        self.prompt = [self.cond[i] if a is None else self.anchor[i] for i, a in enumerate(anchors)]

        self.unet = accelerator.prepare(unet)
        self.base_unet = accelerator.unwrap_model(self.unet)
        self.device = device
        self.shape = latent_shape(self.base_unet)
        self.frozen_predict = functional_predictor(self.base_unet, self.frozen)
        self.live_predict = module_predictor(self.base_unet)
        self.train_predict = module_predictor(self.unet)  # the prepared module: DDP syncs its gradients
        self.sample_predict = self.live_predict if self.config.sampler == "model" else self.frozen_predict
        if self.config.compile_sampler:
            self.sample_predict = compile_predictor(self.sample_predict, device)

    def trainable_parameters(self) -> dict[str, torch.nn.Parameter]:
        return self.trainable

    def set_gradient_checkpointing(self, enable: bool) -> None:
        set_gradient_checkpointing(self.pipe.unet, enable)

    def draw(self, generator: torch.Generator, step: int = 1) -> tuple[int, TrajectorySample]:
        """Pick a concept and sample its on-trajectory latent and timestep (or take one from its pool)."""
        index = int(torch.randint(0, len(self.cond), (1,), generator=generator))
        with eval_mode(self.base_unet):
            args = (self.sample_predict, self.prompt[index], self.empty, generator, self.shape)
            if self.pools:
                sample = self.pools[index].draw(*args, step=step, device=self.device)
            else:
                sample = self.sampler.sample(*args, device=self.device)
        return index, sample

    def target(self, index: int, latents: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        """The frozen model's negatively guided prediction (no gradient)."""
        eta, is_paper_anchor = self.config.eta, self.anchor[index] is self.empty
        parts = [self.empty, self.cond[index]] + ([] if is_paper_anchor else [self.anchor[index]])
        with torch.no_grad():
            out = self.frozen_predict(latents.repeat(len(parts), 1, 1, 1), timestep.repeat(len(parts)),
                                      Conditioning.cat(parts)).float()
        out_empty, out_concept = out[0:1], out[1:2]
        out_anchor = out_empty if is_paper_anchor else out[2:3]
        return out_anchor - eta * (out_concept - out_empty)

    def loss_at(self, index: int, sample: TrajectorySample) -> torch.Tensor:
        target = self.target(index, sample.latents, sample.timestep)
        prediction = self.train_predict(sample.latents, sample.timestep, self.prompt[index])
        return F.mse_loss(prediction.float(), target)

    def loss(self, step: int, generator: torch.Generator) -> torch.Tensor:
        return self.loss_at(*self.draw(generator, step))

    # The trajectory pools are checkpointed so that a resumed run hands out the same states.
    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v for i, pool in enumerate(self.pools) for k, v in pool.state_dict(f"pool.{i}.").items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for i, pool in enumerate(self.pools):
            pool.load_state_dict(state, f"pool.{i}.", self.device)


@register_method("esd", kind="erase", config=ESDConfig)
def apply(pipe, config: ESDConfig, *, run_dir: str | Path, resume: bool = False, train_config=None,
          resolved_config: dict | None = None) -> MethodResult:
    """fine-tune so the concept's prediction follows the frozen model's negative guidance (Gandikota et al. 2023)"""
    from conceptguard.training.loop import train

    train_config = train_config or train_config_with_defaults(ESDConfig.default_train)
    names = list(select_for(pipe.unet, config))
    recipe = ESDRecipe(pipe, config, names)
    resolved = {"method": "esd", "esd": config_to_dict(config)}
    resolved.update(resolved_config or {})
    result = train(recipe, train_config, run_dir, resume=resume, resolved_config=resolved)

    pipe.unet.requires_grad_(False).eval()
    live = dict(pipe.unet.named_parameters())
    changed = [f"unet.{name}" for name in names if not torch.equal(live[name], recipe.frozen[name])]
    concepts = ", ".join(repr(c) for c in config.concepts)
    pool = f", pooled from {config.trajectory_pool} trajectories per concept" if config.trajectory_pool else ""
    summary = (f"ESD-{config.variant} erased {concepts} (eta {config.eta:g}, x_t from the "
               f"{'trained' if config.sampler == 'model' else 'frozen'} model{pool}) in {result.steps_done} steps; "
               f"{len(changed)} UNet tensors changed.")
    metrics = {"final_loss": result.final_loss, "steps": result.steps_done, "run_dir": str(result.run_dir)}
    return MethodResult(changed=changed, summary=summary, metrics=metrics)


__all__ = ["ESDConfig", "ESDRecipe", "apply"]
