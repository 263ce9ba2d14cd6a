"""MIMA — Multi-concept immunization against malicious adaptation (Zheng & Yeh, 2025).

IMMA's bi-level program over N concepts at once, with a *differentiable Merge* between the levels:

1. inner (lower level): for each concept n, a Custom-Diffusion-style adaptation of the
   cross-attention keys and values (``attn2.to_k/to_v``) from the immunized weights θ:
   ``W'_n = θ_kv + Δ_n``, with Δ_n trained by its own Adam on concept n's images;
2. Merge: the N adapted weights are combined in closed form into one multi-concept model
   (:func:`conceptguard.methods.merge.merge`) — every concept's token rows ``C_n`` mapped to
   ``W'_n C_n``, generic-caption rows kept where θ maps them;
3. outer (upper level): ascend the mean diffusion loss of the merged model on the concepts'
   images, w.r.t. θ (preset ``imma``), **through the Merge**: ``W_merged`` depends on θ both as
   ``W0`` and through every ``W'_n``; the public code copies the merged weights under ``no_grad``
   and so never sends the outer gradient back to θ_kv. ``merge_gradient=False`` reproduces that
   variant for comparison (θ_kv then gets only the prior term's gradient).

The inner level is first-order, as in IMMA: ``dW'_n/dθ_kv = I`` (Δ_n is a constant for the outer
step), i.e. the outer gradient is taken at the adapted weights. The attackers (Δ_n and their Adam
states) persist across steps and are checkpointed, so a run resumes bit for bit.

A prior-preservation term (``prior_weight``, default 1) keeps θ's predictions on generic captions
close to the original model's (:class:`~conceptguard.methods.imma.PriorTerm`), so non-target
concepts still generate — and still personalize.

Token rows. ``C_n`` is the text encoder's output for the prompt ``concept_prompt`` (default: the
concept's name alone) at the positions after the start token up to the end token: with CLIP's
causal text encoder these are exactly the rows that carry the concept. ``C_reg`` is every row up
to the end token of the generic captions. Rows shared by several concepts (a common first word)
are kept once, their target the mean of those concepts' targets — the least-squares compromise —
so the constraint system stays invertible.

Runs in one process: the outer gradient flows through ``torch.func.functional_call`` on the
unwrapped UNet.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch

from conceptguard.diffusion import encode_prompts, prepare_trainable
from conceptguard.errors import ConceptGuardError
from conceptguard.methods import MethodResult, register_method
from conceptguard.methods.imma import (
    DEFAULT_REGULARIZATION_PROMPTS,
    ASCENT_CAP_HELP,
    PRIOR_DATA_HELP,
    InnerAdam,
    bounded_ascent,
    check_bounded_prior_options,
    concept_data,
    immunized_parameters,
    prior_term,
    requires_grad,
    run_immunization,
)
from conceptguard.methods.merge import merge


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass
class MIMAConfig:
    """What MIMA immunizes; the outer optimizer lives in TrainConfig (defaults: ``default_train``)."""

    concepts: list[str] = field(default_factory=list, metadata=_help("concepts to immunize, together"))
    data: list[str] = field(default_factory=list, metadata=_help(
        "image folders (metadata.jsonl or .txt captions): one per concept, or folders whose captions name them"))
    adaptation: Literal["custom"] = field(default="custom", metadata=_help(
        "the inner adaptation: custom (Custom Diffusion k/v, what the Merge combines); the immunized model "
        "can then be attacked with any adaptation"))
    inner_steps: int = field(default=1, metadata=_help("simulated adaptation steps per concept and immunization step"))
    inner_lr: float = field(default=1e-4, metadata=_help("learning rate of the simulated adaptation (Adam)"))
    inner_batch_size: int = field(default=2, metadata=_help("images per simulated adaptation step"))
    merge_gradient: bool = field(default=True, metadata=_help(
        "backpropagate the outer loss through the Merge (false: the public code's no-gradient copy)"))
    merge_ridge: float = field(default=1e-3, metadata=_help(
        "ridge on C_regᵀC_reg, relative to its mean diagonal (it is singular with fewer generic tokens than dims)"))
    concept_prompt: str = field(default="{concept}", metadata=_help(
        "prompt whose concept tokens are the Merge's rows C_n ('{concept}' stands for the concept)"))
    preset: str = field(default="imma", metadata=_help("UNet parameters to immunize (attention projections)"))
    include: list[str] = field(default_factory=list, metadata=_help("narrow the immunized parameters to patterns"))
    exclude: list[str] = field(default_factory=list, metadata=_help("keep parameters matching patterns unchanged"))
    ascent_cap: float = field(default=0.0, metadata=_help(ASCENT_CAP_HELP))
    cap_each_concept: bool = field(default=False, metadata=_help(
        "apply --ascent-cap to each concept's loss before averaging, not to the mean: a concept already far "
        "above the cap no longer stops the ascent on the others"))
    prior_weight: float = field(default=1.0, metadata=_help(
        "weight of the prior-preservation term on generic prompts (IMMA: 0, MIMA: 1)"))
    regularization_prompts: list[str] = field(default_factory=lambda: list(DEFAULT_REGULARIZATION_PROMPTS),
                                              metadata=_help("generic captions: C_reg of the Merge and the prior term"))
    prior_data: list[str] = field(default_factory=list, metadata=_help(PRIOR_DATA_HELP))
    prior_batch_size: int = field(default=2, metadata=_help("images per prior-preservation term"))

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
        self.merge_ridge = float(self.merge_ridge)
        check_bounded_prior_options(self)
        if self.adaptation != "custom":
            raise ValueError(f"MIMA's inner adaptation is custom (the Merge combines k/v weights); got "
                             f"{self.adaptation!r} — use imma for other adaptations")
        for name in ("inner_steps", "inner_batch_size", "prior_batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not self.inner_lr > 0:
            raise ValueError(f"inner_lr must be positive, got {self.inner_lr}")
        if self.prior_weight < 0 or self.merge_ridge < 0:
            raise ValueError("prior_weight and merge_ridge must be >= 0")
        if "{concept}" not in self.concept_prompt:
            raise ValueError(f"concept_prompt must contain '{{concept}}', got {self.concept_prompt!r}")
        if not isinstance(self.merge_gradient, bool):
            raise ValueError(f"merge_gradient must be true or false, got {self.merge_gradient!r}")


def _token_count(pipe, prompt: str) -> int:
    """Tokens of ``prompt`` including start and end (the rows the encoder computes for it)."""
    ids = pipe.tokenizer(prompt, truncation=True, max_length=pipe.tokenizer.model_max_length).input_ids
    return len(ids)


def concept_rows(pipe, prompts: Sequence[str], device, *, skip_start: bool) -> list[torch.Tensor]:
    """Per prompt, the text encoder's rows up to its end token (fp32), as the UNet receives them."""
    embeds = encode_prompts(pipe, list(prompts), device=device).embeds.float()
    first = 1 if skip_start else 0
    return [embeds[i, first:_token_count(pipe, prompt)] for i, prompt in enumerate(prompts)]


def unique_rows(rows: Sequence[torch.Tensor], rtol: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """(C: the distinct rows, A: (rows, concepts) averaging weights): row j's target is
    ``Σ_n A[j, n] · W'_n c_j``, the mean over the concepts that own it."""
    kept: list[torch.Tensor] = []
    owners: list[list[int]] = []
    for n, block in enumerate(rows):
        for row in block:
            for j, other in enumerate(kept):
                if torch.allclose(row, other, rtol=rtol, atol=rtol * float(other.abs().max())):
                    if n not in owners[j]:
                        owners[j].append(n)
                    break
            else:
                kept.append(row)
                owners.append([n])
    weights = torch.zeros(len(kept), len(rows), dtype=kept[0].dtype, device=kept[0].device)
    for j, who in enumerate(owners):
        weights[j, who] = 1.0 / len(who)
    return torch.stack(kept), weights


class MIMARecipe:
    """MIMA as a :class:`~conceptguard.training.loop.Recipe`: loss = −L(Merge(θ, {θ_kv + Δ_n})) + prior."""

    def __init__(self, pipe, config: MIMAConfig, groups: Sequence[tuple[torch.Tensor, list[str]]],
                 parameter_names: Sequence[str]):
        if not config.concepts:
            raise ConceptGuardError("MIMA needs at least one concept to immunize (--concepts)")
        if len(groups) != len(config.concepts):
            raise ConceptGuardError(f"need the images of each of the {len(config.concepts)} concepts")
        self.pipe, self.config, self.groups = pipe, config, list(groups)
        self.parameter_names = list(parameter_names)

    def setup(self, accelerator) -> None:
        from conceptguard.finetune import CaptionedLatents
        from conceptguard.methods.trajectory import functional_predictor, module_predictor

        pipe, config, device = self.pipe, self.config, accelerator.device
        self.theta = prepare_trainable(pipe, self.parameter_names, device)
        unet = pipe.unet
        named = dict(unet.named_parameters())
        self.kv_names = [n for n in immunized_parameters(unet, "x-strict", (), ()) if n.endswith(".weight")]

        self.data = [CaptionedLatents(pipe, images, captions, device) for images, captions in self.groups]
        self.delta = [{name: torch.zeros_like(named[name]) for name in self.kv_names} for _ in self.groups]
        self.inner_optimizers = [InnerAdam(delta, config.inner_lr) for delta in self.delta]

        prompts = [config.concept_prompt.format(concept=c) for c in config.concepts]
        self.rows, self.row_weights = unique_rows(concept_rows(pipe, prompts, device, skip_start=True))
        self.reg_rows = torch.cat(concept_rows(pipe, config.regularization_prompts, device, skip_start=False))

        self.prior = None
        if config.prior_weight > 0:
            all_images = torch.cat([images for images, _ in self.groups])
            self.prior = prior_term(pipe, config, all_images, device)
            self.original = {name: p.detach().clone() for name, p in self.theta.items()}
            self.original_predict = functional_predictor(unet, self.original)
        self.unet = accelerator.prepare(unet)
        self.base_unet = accelerator.unwrap_model(self.unet)
        self.live_predict = module_predictor(self.base_unet)

    def trainable_parameters(self) -> dict[str, torch.nn.Parameter]:
        return dict(self.theta)

    def _predictor(self, values: dict[str, torch.Tensor]):
        from conceptguard.methods.trajectory import functional_predictor

        return functional_predictor(self.base_unet, values)

    def inner_step(self, n: int, step: int, generator: torch.Generator) -> float:
        """One Custom-Diffusion step of concept n's attacker: descend on Δ_n only."""
        leaves = {name: d.detach().clone().requires_grad_(True) for name, d in self.delta[n].items()}
        values = {name: self.theta[name].detach() + leaves[name] for name in self.kv_names}
        with requires_grad(on=(), off=self.theta.values()):
            loss = self.data[n].loss(self._predictor(values), self.config.inner_batch_size, generator)
            grads = torch.autograd.grad(loss, list(leaves.values()))
        self.inner_optimizers[n].step(dict(zip(leaves, grads)))
        return float(loss.detach())

    def merged_weights(self) -> dict[str, torch.Tensor]:
        """Merge(θ_kv, {θ_kv + Δ_n}) per k/v layer; differentiable in θ unless merge_gradient is off."""
        merged = {}
        with torch.set_grad_enabled(self.config.merge_gradient and torch.is_grad_enabled()):
            for name in self.kv_names:
                w0 = self.theta[name] if self.config.merge_gradient else self.theta[name].detach()
                # V = Σ_n (W'_n C_uᵀ) · A[:, n]: each distinct row mapped by (the mean of) its owners' weights.
                targets = sum((w0 + delta[name]) @ self.rows.T * self.row_weights[:, n]
                              for n, delta in enumerate(self.delta))
                merged[name] = merge(w0, self.rows, targets, self.reg_rows, ridge=self.config.merge_ridge)
        return merged

    def outer_losses(self, generator: torch.Generator) -> torch.Tensor:
        """The merged model's diffusion loss on each concept's images."""
        predict = self._predictor(self.merged_weights())
        return torch.stack([data.loss(predict, self.config.inner_batch_size, generator) for data in self.data])

    def loss(self, step: int, generator: torch.Generator) -> torch.Tensor:
        for _ in range(self.config.inner_steps):
            for n in range(len(self.data)):
                self.inner_step(n, step, generator)
        losses, cap = self.outer_losses(generator), self.config.ascent_cap
        loss = -(bounded_ascent(losses, cap).mean() if self.config.cap_each_concept
                 else bounded_ascent(losses.mean(), cap))
        if self.prior is not None:
            loss = loss + self.config.prior_weight * self.prior.loss(self.live_predict, self.original_predict,
                                                                     generator)
        return loss

    def finish(self) -> None:
        """Nothing to remove: the attackers live in Δ tensors, never in the UNet."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        state: dict[str, torch.Tensor] = {}
        for n, (delta, optimizer) in enumerate(zip(self.delta, self.inner_optimizers)):
            state.update({f"delta.{n}.{name}": t for name, t in delta.items()})
            state.update(optimizer.state_dict(f"attacker_adam.{n}."))
        return state

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for n, (delta, optimizer) in enumerate(zip(self.delta, self.inner_optimizers)):
            for name, tensor in delta.items():
                tensor.copy_(state[f"delta.{n}.{name}"])
            optimizer.load_state_dict(state, f"attacker_adam.{n}.")


@register_method("mima", kind="immunize", config=MIMAConfig)
def apply(pipe, config: MIMAConfig, *, run_dir: str | Path, resume: bool = False, train_config=None,
          resolved_config: dict | None = None) -> MethodResult:
    """immunize several concepts at once, backpropagating through a closed-form Merge of per-concept k/v adaptations (Zheng & Yeh 2025)"""
    from conceptguard.diffusion import image_size
    from conceptguard.methods.trajectory import train_config_with_defaults

    train_config = train_config or train_config_with_defaults(MIMAConfig.default_train)
    names = list(immunized_parameters(pipe.unet, config.preset, config.include, config.exclude))
    groups = concept_data(config.data, config.concepts, image_size(pipe))
    recipe = MIMARecipe(pipe, config, groups, names)
    result, changed = run_immunization(pipe, recipe, "mima", config, names, train_config, run_dir, resume,
                                       resolved_config)
    concepts = ", ".join(repr(c) for c in config.concepts)
    gradient = "through the Merge" if config.merge_gradient else "without gradient through the Merge"
    summary = (f"MIMA immunized {concepts} together ({gradient}) in {result.steps_done} steps; "
               f"{len(changed)} UNet tensors changed.")
    metrics = {"final_loss": result.final_loss, "steps": result.steps_done, "run_dir": str(result.run_dir)}
    return MethodResult(changed=changed, summary=summary, metrics=metrics)


__all__ = ["MIMAConfig", "MIMARecipe", "apply", "concept_rows", "unique_rows"]
