"""IMMA — Immunizing text-to-image models against malicious adaptation (Zheng & Yeh, ECCV 2024).

A bi-level program: find weights θ from which the *adaptation* an attacker would run fails::

    max_θ  L_adapt(θ'(θ))        θ'(θ) = argmin_φ L_adapt(φ) started from θ

``L_adapt`` is the attacker's own objective (LoRA, Custom Diffusion, DreamBooth, full fine-tuning —
the recipes of :mod:`conceptguard.attacks.relearn`, reused here unchanged) on images of the concept.
As in the authors' code, the two levels alternate: every optimizer step first runs ``inner_steps``
steps of the simulated adaptation, then one *outer* step ascends ``L_adapt`` on the immunized
parameters θ (preset ``imma``: to_q/to_k/to_v/to_out of self- and cross-attention).

First-order outer gradient. θ' depends on θ through the inner steps; like the authors, we do not
unroll them: ``d L_adapt(θ'(θ)) / dθ ≈ ∇_φ L_adapt(φ) |_{φ=θ'}``, the gradient *at the adapted
weights*, applied to θ. Concretely:

- adaptations with their own parameters (LoRA adapters) keep them beside θ: the outer loss is
  computed through the adapted model ``θ + BA`` and its gradient lands on θ directly (for LoRA
  ``∂(θ + BA)/∂θ = I``, so this is exact for the current adapter);
- adaptations that train UNet weights in place (Custom Diffusion's k/v, full fine-tuning,
  DreamBooth) keep an offset ``Δ = θ' − θ``: each step swaps ``θ + Δ`` in, runs the inner steps
  (which move Δ), computes the outer loss at θ', and after the optimizer step puts back
  ``θ + (optimizer update)`` — the update computed at θ' applied to θ. Weights the inner adaptation
  trains outside θ are restored bit for bit.

The simulated attacker persists across outer steps (its adapter or Δ, and its own Adam state),
which is what "alternate one inner and one outer step" means: the defender keeps moving the
starting point while the attacker keeps adapting from it. Both are checkpointed through the
recipe's ``state_dict``, so ``--resume`` continues bit for bit.

Optionally (``prior_weight > 0``, off by default as in IMMA's objective) a prior-preservation term
keeps θ's predictions on generic captions close to the original model's; see :class:`PriorTerm`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F

from conceptguard.config import config_to_dict
from conceptguard.errors import ConceptGuardError
from conceptguard.methods import MethodResult, register_method
from conceptguard.models.params import select_parameters

ADAPTATIONS = ("lora", "custom", "finetune", "dreambooth")

# Generic captions: the C_reg of MIMA's Merge and the prompts of the prior-preservation term. Short
# and concept-free on purpose; pass your own (e.g. COCO captions) for a real model.
DEFAULT_REGULARIZATION_PROMPTS = (
    "a photo", "a picture of an object", "an image of a scene", "a drawing", "a photo of a thing on a background",
    "a simple picture", "a close-up photo", "a painting",
)


PRIOR_DATA_HELP = ("folders of images + captions the model must keep drawing (e.g. other people or styles); the "
                   "prior term pins the model's predictions on them (default: the concept images under generic "
                   "captions)")


ASCENT_CAP_HELP = ("stop ascending the adaptation loss once it exceeds this value (0: unbounded, as the "
                   "papers); beyond it only the prior acts, so the ascent cannot run away from the model")


def bounded_ascent(loss: torch.Tensor, cap: float) -> torch.Tensor:
    """``loss`` clamped at ``cap`` (no gradient above it); unchanged when ``cap`` is 0."""
    return torch.clamp(loss, max=cap) if cap > 0 else loss


def check_bounded_prior_options(config) -> None:
    """Normalise and validate the options IMMA and MIMA share: ``ascent_cap`` and ``prior_data``."""
    config.ascent_cap = float(config.ascent_cap)
    if config.ascent_cap < 0:
        raise ValueError(f"ascent_cap must be >= 0, got {config.ascent_cap}")
    data = config.prior_data
    config.prior_data = [str(d) for d in ([data] if isinstance(data, (str, Path)) else data)]


def _help(text: str) -> dict[str, str]:
    return {"help": text}


# --------------------------------------------------------------------------------------------
# Shared with MIMA: data, prior preservation, an inner optimizer that checkpoints as tensors
# --------------------------------------------------------------------------------------------

def concept_data(data: Sequence[str | Path], concepts: Sequence[str], size: int,
                 ) -> list[tuple[torch.Tensor, list[str]]]:
    """(images, captions) per concept: one folder per concept, or folders whose captions name the
    concepts (each image goes to every concept its caption mentions)."""
    from conceptguard.attacks.tokens import mentions
    from conceptguard.finetune import images_and_captions

    if not data:
        raise ConceptGuardError("immunization needs training images of the concepts (--data)")
    if not concepts:
        raise ConceptGuardError("immunization needs at least one concept (--concepts)")
    if len(data) == len(concepts):
        return [images_and_captions(folder, size) for folder in data]
    images, captions = images_and_captions(list(data), size)
    groups = []
    for concept in concepts:
        idx = [i for i, caption in enumerate(captions) if mentions(caption, concept)]
        if not idx:
            raise ConceptGuardError(
                f"no caption in {', '.join(map(str, data))} names {concept!r}; give one folder per concept")
        groups.append((images[idx], [captions[i] for i in idx]))
    return groups


class PriorTerm:
    """Prior preservation: ``MSE(model(x_t, c), original(x_t, c))`` on preservation data.

    The preservation data is either the publisher's own images and captions (``prior_data``: what
    the model must keep drawing — DreamBooth's class images play this role) or, by default, the
    concept images under generic captions. The term does not teach anything, it only pins the
    model's *function* on that data to the original model's. Both predictions come from the caller
    (:func:`~conceptguard.methods.trajectory.functional_predictor` for the original).
    """

    def __init__(self, pipe, images: torch.Tensor, captions: Sequence[str], device, batch_size: int = 2):
        from conceptguard.finetune import CaptionedLatents

        if not len(captions) or len(captions) != len(images):
            raise ConceptGuardError("prior preservation needs one caption per image")
        self.captions = list(captions)
        self.data = CaptionedLatents(pipe, images, self.captions, device)
        self.batch_size = batch_size

    def loss(self, predict, original_predict, generator: torch.Generator) -> torch.Tensor:
        noisy, timesteps, cond, _ = self.data.draw(self.batch_size, generator)
        with torch.no_grad():
            target = original_predict(noisy, timesteps, cond).float()
        return F.mse_loss(predict(noisy, timesteps, cond).float(), target)


def prior_term(pipe, config, concept_images: torch.Tensor, device) -> PriorTerm:
    """The prior term of ``config`` (IMMA or MIMA): on ``config.prior_data`` if given, else on the
    concept images with ``config.regularization_prompts`` as captions."""
    from conceptguard.diffusion import image_size
    from conceptguard.finetune import images_and_captions

    if config.prior_data:
        images, captions = images_and_captions(list(config.prior_data), image_size(pipe))
        return PriorTerm(pipe, images, captions, device, batch_size=config.prior_batch_size)
    prompts = config.regularization_prompts
    if not prompts:
        raise ConceptGuardError("prior preservation needs generic prompts (--regularization-prompts) or --prior-data")
    captions = [prompts[i % len(prompts)] for i in range(len(concept_images))]
    return PriorTerm(pipe, concept_images, captions, device, batch_size=config.prior_batch_size)


class InnerAdam:
    """The simulated attacker's own Adam over ``params`` (by name), checkpointable as flat tensors.

    Gradients are passed in (from ``torch.autograd.grad``) rather than read from ``.grad``, so the
    outer loop's accumulated gradients on shared tensors are never touched.
    """

    def __init__(self, params: dict[str, torch.Tensor], lr: float, betas=(0.9, 0.999), eps: float = 1e-8):
        self.params = params
        self.lr, self.betas, self.eps = lr, betas, eps
        self.step_count = torch.zeros((), dtype=torch.int64)
        self.exp_avg = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
        self.exp_avg_sq = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}

    @torch.no_grad()
    def step(self, grads: dict[str, torch.Tensor]) -> None:
        self.step_count += 1
        t = int(self.step_count)
        beta1, beta2 = self.betas
        correction1, correction2 = 1 - beta1 ** t, 1 - beta2 ** t
        for name, grad in grads.items():
            grad = grad.float()
            m, v = self.exp_avg[name], self.exp_avg_sq[name]
            m.mul_(beta1).add_(grad, alpha=1 - beta1)
            v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            update = (m / correction1) / ((v / correction2).sqrt() + self.eps)
            self.params[name].sub_(self.lr * update.to(self.params[name].dtype))

    def state_dict(self, prefix: str) -> dict[str, torch.Tensor]:
        state = {f"{prefix}step": self.step_count.clone()}
        for name in self.params:
            state[f"{prefix}exp_avg.{name}"] = self.exp_avg[name]
            state[f"{prefix}exp_avg_sq.{name}"] = self.exp_avg_sq[name]
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor], prefix: str) -> None:
        self.step_count.copy_(state[f"{prefix}step"])
        for name in self.params:
            self.exp_avg[name].copy_(state[f"{prefix}exp_avg.{name}"])
            self.exp_avg_sq[name].copy_(state[f"{prefix}exp_avg_sq.{name}"])


@contextlib.contextmanager
def requires_grad(on: Iterable[torch.Tensor], off: Iterable[torch.Tensor] = ()) -> Iterator[None]:
    """Temporarily switch gradients on for ``on`` and off for ``off`` (restoring the flags after)."""
    on, off = list(on), list(off)
    saved = [(p, p.requires_grad) for p in on + off]
    try:
        for p in off:
            p.requires_grad_(False)
        for p in on:
            p.requires_grad_(True)
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


def immunized_parameters(unet, preset: str, include: Sequence[str], exclude: Sequence[str]):
    return select_parameters(unet, preset, include=include, exclude=exclude)


# --------------------------------------------------------------------------------------------
# IMMA
# --------------------------------------------------------------------------------------------

@dataclass
class IMMAConfig:
    """What IMMA immunizes against; the outer optimizer lives in TrainConfig (defaults: ``default_train``)."""

    concepts: list[str] = field(default_factory=list, metadata=_help(
        "concepts to immunize; with several, their images are pooled into one simulated adaptation"))
    data: list[str] = field(default_factory=list, metadata=_help(
        "image folders (metadata.jsonl or .txt captions): one per concept, or folders whose captions name them"))
    adaptation: Literal["lora", "custom", "finetune", "dreambooth"] = field(default="lora", metadata=_help(
        "the adaptation to immunize against: lora, custom (Custom Diffusion k/v), finetune, dreambooth"))
    inner_steps: int = field(default=1, metadata=_help("simulated adaptation steps per immunization step"))
    inner_lr: float = field(default=1e-4, metadata=_help("learning rate of the simulated adaptation (Adam)"))
    inner_batch_size: int = field(default=2, metadata=_help("images per simulated adaptation step"))
    lora_rank: int = field(default=4, metadata=_help("[lora] rank of the simulated attacker's adapters"))
    num_class_images: int = field(default=50, metadata=_help("[dreambooth] class images for prior preservation"))
    class_inference_steps: int = field(default=25, metadata=_help("[dreambooth] sampling steps of class images"))
    preset: str = field(default="imma", metadata=_help("UNet parameters to immunize (IMMA: attention projections)"))
    include: list[str] = field(default_factory=list, metadata=_help("narrow the immunized parameters to patterns"))
    exclude: list[str] = field(default_factory=list, metadata=_help("keep parameters matching patterns unchanged"))
    ascent_cap: float = field(default=0.0, metadata=_help(ASCENT_CAP_HELP))
    prior_weight: float = field(default=0.0, metadata=_help(
        "weight of the prior-preservation term on generic prompts (IMMA: 0, MIMA: 1)"))
    regularization_prompts: list[str] = field(default_factory=lambda: list(DEFAULT_REGULARIZATION_PROMPTS),
                                              metadata=_help("generic captions of the prior-preservation term"))
    prior_data: list[str] = field(default_factory=list, metadata=_help(PRIOR_DATA_HELP))
    prior_batch_size: int = field(default=2, metadata=_help("images per prior-preservation term"))

    # The outer (ascent) optimizer: Adam as in the authors' scripts; not tuned for the tiny world.
    default_train: ClassVar[dict[str, Any]] = dict(
        steps=1000, lr=1e-5, optimizer="adam", weight_decay=0.0, lr_schedule="constant", warmup_steps=0,
        max_grad_norm=0.0)

    def __post_init__(self) -> None:
        if isinstance(self.concepts, str):
            self.concepts = [self.concepts]
        if isinstance(self.data, (str, Path)):
            self.data = [self.data]
        self.concepts, self.data = list(self.concepts), [str(d) for d in self.data]
        self.inner_lr, self.prior_weight = float(self.inner_lr), float(self.prior_weight)
        check_bounded_prior_options(self)
        if self.adaptation == "ti":
            raise ValueError("adaptation 'ti' is not supported for immunization: Textual Inversion adds a token "
                             "to the tokenizer, which the immunized model must not keep")
        if self.adaptation not in ADAPTATIONS:
            raise ValueError(f"adaptation must be one of {', '.join(ADAPTATIONS)}; got {self.adaptation!r}")
        for name in ("inner_steps", "inner_batch_size", "lora_rank", "num_class_images", "class_inference_steps",
                     "prior_batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not self.inner_lr > 0:
            raise ValueError(f"inner_lr must be positive, got {self.inner_lr}")
        if self.prior_weight < 0:
            raise ValueError(f"prior_weight must be >= 0, got {self.prior_weight}")
        if self.adaptation == "dreambooth" and len(self.concepts) > 1:
            raise ValueError("dreambooth immunization takes one concept (its identifier replaces the concept's word)")


class IMMARecipe:
    """IMMA as a :class:`~conceptguard.training.loop.Recipe`: loss = −L_adapt at the adapted weights."""

    def __init__(self, pipe, config: IMMAConfig, images: torch.Tensor, captions: Sequence[str],
                 parameter_names: Sequence[str]):
        if not config.concepts:
            raise ConceptGuardError("IMMA needs at least one concept to immunize (--concepts)")
        self.pipe, self.config = pipe, config
        self.images, self.captions = images, list(captions)
        self.parameter_names = list(parameter_names)
        self._swapped_in = False

    def setup(self, accelerator) -> None:
        from conceptguard.attacks.relearn import RelearnConfig, build_recipe
        from conceptguard.methods.trajectory import functional_predictor, module_predictor

        config, pipe = self.config, self.pipe
        attacker = RelearnConfig(kind=config.adaptation, batch_size=config.inner_batch_size, lora_rank=config.lora_rank,
                                 merge=False, num_class_images=config.num_class_images,
                                 class_inference_steps=config.class_inference_steps)
        unet = pipe.unet
        # Taken before LoRA wraps the layers (peft renames `to_k.weight` to `to_k.base_layer.weight`,
        # keeping the same Parameter): θ keeps its plain names, in checkpoints and in the output.
        named = dict(unet.named_parameters())
        self.theta = {name: named[name] for name in self.parameter_names}
        # Built here, after the loop seeded the RNGs: LoRA's random init is the same on resume.
        self.inner, _, _ = build_recipe(pipe, self.images, self.captions, config.concepts[0], attacker)
        self.inner.setup(accelerator)
        named = dict(unet.named_parameters())
        self.inner_params = dict(self.inner.trainable_parameters())
        # UNet weights the attacker trains in place get the Δ treatment; its own tensors (LoRA) do not.
        self.swapped = [name for name in self.inner_params if name in named and "lora_" not in name]
        self.delta = {name: torch.zeros_like(named[name]) for name in self.swapped}
        self.inner_optimizer = InnerAdam(self.inner_params, config.inner_lr)
        for param in self.theta.values():
            param.requires_grad_(True)

        self.prior = None
        if config.prior_weight > 0:
            self.original = {name: p.detach().clone() for name, p in self.theta.items()}
            self.prior = prior_term(pipe, config, self.images, accelerator.device)
            # functional_call needs the names as they are now (under peft's wrappers, if any).
            current = {id(p): name for name, p in named.items()}
            self.original_predict = functional_predictor(
                unet, {current[id(self.theta[n])]: value for n, value in self.original.items()})
            self.live_predict = module_predictor(unet)

    def trainable_parameters(self) -> dict[str, torch.nn.Parameter]:
        return dict(self.theta)

    # --- one immunization step ----------------------------------------------------------------

    @torch.no_grad()
    def _swap_in(self) -> None:
        """Params ← θ + Δ for the weights the attacker trains in place (once per optimizer step)."""
        named = dict(self.pipe.unet.named_parameters())
        self.clean = {name: named[name].detach().clone() for name in self.swapped}
        for name in self.swapped:
            named[name].add_(self.delta[name])
        self._swapped_in = True

    def inner_step(self, step: int, generator: torch.Generator) -> float:
        """One step of the simulated adaptation: descend L_adapt on the attacker's parameters only."""
        names = list(self.inner_params)
        theta_only = [p for n, p in self.theta.items() if n not in self.inner_params]
        with requires_grad(on=self.inner_params.values(), off=theta_only):
            loss = self.inner.loss(step, generator)
            grads = torch.autograd.grad(loss, [self.inner_params[n] for n in names])
        self.inner_optimizer.step(dict(zip(names, grads)))
        return float(loss.detach())

    def outer_loss(self, step: int, generator: torch.Generator) -> torch.Tensor:
        """L_adapt at the adapted weights, with gradients to θ only."""
        attacker_only = [p for n, p in self.inner_params.items() if n not in self.theta]
        with requires_grad(on=self.theta.values(), off=attacker_only):
            return self.inner.loss(step, generator)

    def prior_loss(self, generator: torch.Generator) -> torch.Tensor:
        """The prior term at the *clean* θ: adapters off, in-place-adapted weights read as θ."""
        from torch.func import functional_call

        named = dict(self.pipe.unet.named_parameters())
        # θ + (p − sg p): the value of θ, the gradient of p (first-order, like the outer loss).
        values = {n: self.clean[n] + (named[n] - named[n].detach()) if n in self.theta else self.clean[n]
                  for n in self.swapped}
        unet = self.pipe.unet

        def predict(noisy, timesteps, cond):
            return functional_call(unet, values, (noisy, timesteps), {
                "encoder_hidden_states": cond.embeds, "added_cond_kwargs": cond.added_cond_kwargs()}).sample

        with self._adapters_disabled():
            return self.prior.loss(predict, self.original_predict, generator)

    @contextlib.contextmanager
    def _adapters_disabled(self):
        has_adapters = self.config.adaptation == "lora"
        if has_adapters:
            self.pipe.unet.disable_adapters()
        try:
            yield
        finally:
            if has_adapters:
                self.pipe.unet.enable_adapters()

    def adapt(self, step: int, generator: torch.Generator) -> None:
        """The lower level: move the model to θ' = θ + Δ and run ``inner_steps`` adaptation steps."""
        if not self._swapped_in:
            self._swap_in()
        for _ in range(self.config.inner_steps):
            self.inner_step(step, generator)
        named = dict(self.pipe.unet.named_parameters())
        with torch.no_grad():
            for name in self.swapped:
                self.delta[name].copy_(named[name] - self.clean[name])
            # θ' as the optimizer will see it: its update is read back against this.
            self.adapted = {name: named[name].detach().clone() for name in self.swapped if name in self.theta}

    def loss(self, step: int, generator: torch.Generator) -> torch.Tensor:
        self.adapt(step, generator)
        loss = -bounded_ascent(self.outer_loss(step, generator), self.config.ascent_cap)
        if self.prior is not None:
            loss = loss + self.config.prior_weight * self.prior_loss(generator)
        return loss

    @torch.no_grad()
    def on_optimizer_step(self, step: int) -> None:
        """θ ← θ + (the update the optimizer made at θ'); weights outside θ back to their clean values."""
        named = dict(self.pipe.unet.named_parameters())
        for name in self.swapped:
            if name in self.theta:
                named[name].copy_(self.clean[name] + (named[name] - self.adapted[name]))
            else:
                named[name].copy_(self.clean[name])
        self._swapped_in = False

    def finish(self) -> None:
        """Remove the simulated attacker: LoRA adapters are deleted (never merged), and weights it
        adapted in place go back to θ if a step was cut short."""
        if self._swapped_in:
            named = dict(self.pipe.unet.named_parameters())
            with torch.no_grad():
                for name in self.swapped:
                    named[name].copy_(self.clean[name])
            self._swapped_in = False
        if self.config.adaptation == "lora" and getattr(self, "inner", None) is not None:
            # Removes the peft wrappers too, so the saved UNet has diffusers' plain weight names.
            self.pipe.unet.unload_lora()

    # --- checkpointed attacker state ------------------------------------------------------------

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"delta.{n}": t for n, t in self.delta.items()}
        state.update({f"attacker.{n}": p.detach() for n, p in self.inner_params.items() if n not in self.delta})
        state.update(self.inner_optimizer.state_dict("attacker_adam."))
        return state

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for name, tensor in self.delta.items():
            tensor.copy_(state[f"delta.{name}"])
        for name, param in self.inner_params.items():
            if name not in self.delta:
                param.copy_(state[f"attacker.{name}"])
        self.inner_optimizer.load_state_dict(state, "attacker_adam.")


def run_immunization(pipe, recipe, method: str, config, names: Sequence[str], train_config, run_dir,
                     resume: bool, resolved_config: dict | None) -> tuple[Any, list[str]]:
    """Train ``recipe`` on the shared loop; returns (TrainResult, the changed ``unet.`` tensor names)."""
    from conceptguard.training.loop import train

    named = dict(pipe.unet.named_parameters())
    original = {name: named[name].detach().clone() for name in names}
    resolved = {"method": method, method: config_to_dict(config)}
    resolved.update(resolved_config or {})
    try:
        result = train(recipe, train_config, run_dir, resume=resume, resolved_config=resolved)
    finally:
        recipe.finish()  # the simulated attacker must never stay in the released model
    pipe.unet.requires_grad_(False).eval()
    live = dict(pipe.unet.named_parameters())
    return result, [f"unet.{name}" for name, value in original.items() if not torch.equal(live[name], value)]


@register_method("imma", kind="immunize", config=IMMAConfig)
def apply(pipe, config: IMMAConfig, *, run_dir: str | Path, resume: bool = False, train_config=None,
          resolved_config: dict | None = None) -> MethodResult:
    """ascend the simulated adaptation's loss at the adapted weights, alternating with the adaptation (Zheng & Yeh 2024)"""
    from conceptguard.diffusion import image_size
    from conceptguard.methods.trajectory import train_config_with_defaults

    from conceptguard.finetune import images_and_captions

    train_config = train_config or train_config_with_defaults(IMMAConfig.default_train)
    if not config.concepts:
        raise ConceptGuardError("IMMA needs at least one concept to immunize (--concepts)")
    if not config.data:
        raise ConceptGuardError("IMMA needs training images of the concepts (--data)")
    names = list(immunized_parameters(pipe.unet, config.preset, config.include, config.exclude))
    # One simulated attacker learns every concept at once: the folders are pooled.
    images, captions = images_and_captions(list(config.data), image_size(pipe))
    recipe = IMMARecipe(pipe, config, images, captions, names)
    result, changed = run_immunization(pipe, recipe, "imma", config, names, train_config, run_dir, resume,
                                       resolved_config)
    concepts = ", ".join(repr(c) for c in config.concepts)
    summary = (f"IMMA immunized {concepts} against {config.adaptation} ({config.inner_steps} inner step(s) per "
               f"outer step) in {result.steps_done} steps; {len(changed)} UNet tensors changed.")
    metrics = {"final_loss": result.final_loss, "steps": result.steps_done, "run_dir": str(result.run_dir)}
    return MethodResult(changed=changed, summary=summary, metrics=metrics)


__all__ = [
    "ADAPTATIONS",
    "DEFAULT_REGULARIZATION_PROMPTS",
    "IMMAConfig",
    "IMMARecipe",
    "InnerAdam",
    "PriorTerm",
    "apply",
    "bounded_ascent",
    "check_bounded_prior_options",
    "prior_term",
    "concept_data",
    "requires_grad",
]
