"""FreezeAsGuard mask learning (Ye et al., 2024): which UNet tensors to freeze so that fine-tuning
cannot teach the illegal domain, while the innocent domain still fine-tunes well.

One trainable logit ``x_i`` per UNet tensor gives the soft mask ``m_i = sigmoid(x_i / T)`` and the
live weights ``W = m·W_pre + (1 − m)·W_ft``: a frozen tensor (m = 1) stays at the publisher's
weights whatever the user trains. Bi-level optimization alternates

- the lower level, a *simulated user* who fine-tunes ``W_ft`` on both domains through the live
  weights for ``inner_steps`` steps (gradients reach ``W_ft`` scaled by ``1 − m``), carried over
  from one mask update to the next; and
- the upper level, one mask update minimising
  ``−w_ill·L_illegal + w_inn·L_innocent + c·(ρ − mean(m))²`` with ``W_ft`` held fixed.

The upper level is a :class:`~conceptguard.training.loop.Recipe` of the shared training loop, so
mask learning gets the loop's optimizer (paper: plain gradient steps of size 10), logging and
bit-identical resume; the user's steps and optimizer live inside the recipe and are checkpointed
through its ``state_dict``. Each loop step is one mask update.

Only two copies of the weights are held: the UNet's own parameters *are* ``W_ft``, and ``W_pre``
is one detached clone. Live weights exist only as the per-forward mix handed to
``torch.func.functional_call``, never as a third model. When learning ends the UNet is given its
``W_pre`` back, so the caller's pipeline is the base model the mask is made for.

The final binary mask freezes exactly ``round(ρ·N)`` tensors: the top-k of the soft mask (see
:func:`~conceptguard.guard.maskfile.top_k_frozen`), not a rounding of it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from torch.func import functional_call

from conceptguard.diffusion import set_gradient_checkpointing
from conceptguard.errors import ConceptGuardError
from conceptguard.guard.maskfile import GuardMask, build_manifest, describe_data, top_k_frozen
from conceptguard.training.loop import TrainConfig, TrainResult, train


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass
class GuardConfig:
    """FreezeAsGuard's settings; defaults are the paper's (SD 1.5). Mask updates and their step
    size are the training loop's ``steps`` and ``lr`` (see :attr:`default_train`)."""

    ratio: float = field(default=0.3, metadata=_help("target share rho of UNet tensors to freeze"))
    temperature: float = field(default=0.2, metadata=_help("T in m = sigmoid(x / T)"))
    sparsity_weight: float = field(default=1.0, metadata=_help("c in c * (rho - mean(m))^2"))
    illegal_weight: float = field(default=1.0, metadata=_help("weight of -L_illegal in the mask objective"))
    innocent_weight: float = field(default=1.0, metadata=_help("weight of L_innocent in the mask objective"))
    inner_steps: int = field(default=10, metadata=_help(
        "simulated-user fine-tuning steps between two mask updates (paper 10, authors' script 4)"))
    user_lr: float = field(default=1e-5, metadata=_help("learning rate of the simulated user"))
    user_optimizer: Literal["adam", "sgd"] = field(default="adam", metadata=_help(
        "optimizer of the simulated user (adam, as the attacker; sgd keeps no optimizer state)"))
    batch_size: int = field(default=16, metadata=_help("images per domain in every loss"))
    mask_batch_size: int = field(default=0, metadata=_help(
        "images per domain in the mask update's losses (0: batch_size); larger means a less noisy mask gradient"))
    shared_noise: bool = field(default=False, metadata=_help(
        "the mask update's illegal and innocent losses use the same noise and timesteps (common random numbers)"))
    init: Literal["paper", "code"] = field(default="paper", metadata=_help(
        "paper: mask near 0 and W_ft fully fine-tuned first; code: mask near 1 and W_ft = W_pre (authors' code)"))
    init_steps: int = field(default=100, metadata=_help(
        "paper init: simulated-user steps, unmasked, that make W_ft the fully fine-tuned model"))
    init_logit: float = field(default=1.0, metadata=_help(
        "magnitude of the initial logits: x = -init_logit (paper) or +init_logit (code), so |x/T| = 5 by default"))
    init_jitter: float = field(default=0.01, metadata=_help(
        "uniform noise added to the initial logits; small so that the learned signal, not the noise, ranks tensors"))

    # The upper level's optimization (the shared loop's TrainConfig): Eq. (8) of the paper is a
    # plain gradient step of size 10 on the logits; clipping would change that step size.
    default_train: ClassVar[dict[str, Any]] = {
        "steps": 200, "optimizer": "sgd", "lr": 10.0, "max_grad_norm": 0.0, "checkpoint_every": 50, "log_every": 1}

    def __post_init__(self) -> None:
        if not 0.0 < self.ratio < 1.0:
            raise ValueError(f"ratio must lie strictly between 0 and 1, got {self.ratio}")
        for name in ("temperature", "user_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("sparsity_weight", "illegal_weight", "innocent_weight", "init_logit", "init_jitter"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("inner_steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.mask_batch_size < 0:
            raise ValueError(f"mask_batch_size must be >= 0, got {self.mask_batch_size}")
        if self.init_steps < 0:
            raise ValueError(f"init_steps must be >= 0, got {self.init_steps}")
        if self.user_optimizer not in ("adam", "sgd"):
            raise ValueError(f"user_optimizer must be adam or sgd, got {self.user_optimizer!r}")
        if self.init not in ("paper", "code"):
            raise ValueError(f"init must be paper or code, got {self.init!r}")


# --------------------------------------------------------------------------------------------
# The masked model: two weight copies, a soft mask, live weights
# --------------------------------------------------------------------------------------------


class MaskedWeights:
    """``W_pre``, ``W_ft`` and one mask logit per tensor of any module.

    ``W_ft`` is the module's own parameters (trained in place by the simulated user); ``W_pre`` is
    a detached clone taken at construction. Works on any ``nn.Module``, so the bi-level arithmetic
    can be checked on a toy model.
    """

    def __init__(self, module: torch.nn.Module, temperature: float, logits: torch.Tensor):
        self.module = module
        self.temperature = temperature
        self.names = [name for name, _ in module.named_parameters()]
        self.w_ft: dict[str, torch.nn.Parameter] = dict(module.named_parameters())
        self.w_pre: dict[str, torch.Tensor] = {name: p.detach().clone() for name, p in self.w_ft.items()}
        if logits.shape != (len(self.names),):
            raise ValueError(f"need one logit per tensor ({len(self.names)}), got shape {tuple(logits.shape)}")
        self.logits = torch.nn.Parameter(logits.detach().clone().float())

    def mask(self) -> torch.Tensor:
        return torch.sigmoid(self.logits / self.temperature)

    def live_weights(self, mask: torch.Tensor, *, grad_to: Literal["mask", "user"]) -> dict[str, torch.Tensor]:
        """``m·W_pre + (1 − m)·W_ft`` per tensor, with gradients flowing to the mask or to ``W_ft``.

        The user's step sees the mask as a constant (its gradient on ``W_ft`` is ``(1 − m)·∂L/∂W``);
        the mask's step sees ``W_ft`` as a constant.
        """
        if grad_to == "user":
            mask = mask.detach()
        live = {}
        for i, name in enumerate(self.names):
            w_ft = self.w_ft[name] if grad_to == "user" else self.w_ft[name].detach()
            live[name] = torch.lerp(w_ft, self.w_pre[name], mask[i])
        return live

    def forward(self, weights: Mapping[str, torch.Tensor] | None, *args, **kwargs):
        """Run the module with ``weights`` in place of its parameters (``None``: its own, i.e. ``W_ft``)."""
        if weights is None:
            return self.module(*args, **kwargs)
        return functional_call(self.module, dict(weights), args, kwargs)

    def soft_mask(self) -> dict[str, float]:
        values = self.mask().detach().cpu().tolist()
        return dict(zip(self.names, values))

    @torch.no_grad()
    def restore_pre(self) -> None:
        """Put ``W_pre`` back into the module (the base model, bit for bit)."""
        for name, param in self.w_ft.items():
            param.copy_(self.w_pre[name])


def mask_objective(illegal_loss: torch.Tensor, innocent_loss: torch.Tensor, mask: torch.Tensor,
                   config: GuardConfig) -> torch.Tensor:
    """The upper-level objective: ``−w_ill·L_illegal + w_inn·L_innocent + c·(ρ − mean(m))²``."""
    sparsity = config.sparsity_weight * (config.ratio - mask.mean()) ** 2
    return -config.illegal_weight * illegal_loss + config.innocent_weight * innocent_loss + sparsity


def initial_logits(count: int, config: GuardConfig, seed: int) -> torch.Tensor:
    """Paper: small random negative logits (mask near 0); code: near 1. Seeded, independent of global RNG."""
    sign = -1.0 if config.init == "paper" else 1.0
    noise = torch.rand(count, generator=torch.Generator().manual_seed(int(seed))) * 2 - 1
    return sign * config.init_logit + config.init_jitter * noise


# --------------------------------------------------------------------------------------------
# The recipe: upper level on the shared loop, lower level inside it
# --------------------------------------------------------------------------------------------


class MaskLearningRecipe:
    """FreezeAsGuard's bi-level optimization as a :class:`~conceptguard.training.loop.Recipe`.

    ``loss(step)`` first runs the simulated user's steps (on step 1 with the paper init, also the
    ``init_steps`` that fully fine-tune ``W_ft``), then returns the mask objective; the loop
    back-propagates it into the logits and applies the mask update.
    """

    def __init__(self, pipe, illegal: tuple[torch.Tensor, list[str]], innocent: tuple[torch.Tensor, list[str]],
                 config: GuardConfig, seed: int = 0, log_path: str | Path | None = None):
        self.pipe = pipe
        self.illegal_data, self.innocent_data = illegal, innocent
        self.config = config
        self.seed = seed
        self.log_path = Path(log_path) if log_path is not None else None
        self.masked: MaskedWeights | None = None
        self.last: dict[str, float] = {}

    def setup(self, accelerator) -> None:
        from conceptguard.finetune import CaptionedLatents

        if accelerator.num_processes > 1:
            raise ConceptGuardError("mask learning runs on one process; start it without `accelerate launch`")
        pipe = self.pipe
        pipe.to(accelerator.device)
        for module in (pipe.vae, pipe.text_encoder, getattr(pipe, "text_encoder_2", None)):
            if module is not None:
                module.requires_grad_(False)
        unet = pipe.unet
        not_fp32 = [name for name, p in unet.named_parameters() if p.dtype != torch.float32]
        if not_fp32:
            raise ConceptGuardError(
                f"mask learning fine-tunes the UNet and needs it in fp32 ({not_fp32[0]} is not); load the model in "
                "fp32 and use mixed_precision=bf16 for speed")
        self._requires_grad = {name: p.requires_grad for name, p in unet.named_parameters()}
        unet.requires_grad_(True)
        count = len(self._requires_grad)
        logits = initial_logits(count, self.config, self.seed).to(accelerator.device)
        self.masked = MaskedWeights(unet, self.config.temperature, logits)
        params = list(self.masked.w_ft.values())
        if self.config.user_optimizer == "adam":
            self.user_optimizer = torch.optim.Adam(params, lr=self.config.user_lr)
        else:
            self.user_optimizer = torch.optim.SGD(params, lr=self.config.user_lr)
        self.illegal = CaptionedLatents(pipe, *self.illegal_data, accelerator.device)
        self.innocent = CaptionedLatents(pipe, *self.innocent_data, accelerator.device)

    def trainable_parameters(self) -> dict[str, torch.nn.Parameter]:
        return {"mask_logits": self.masked.logits}

    def set_gradient_checkpointing(self, enable: bool) -> None:
        # Correct with the live weights handed in through functional_call: see set_gradient_checkpointing.
        set_gradient_checkpointing(self.pipe.unet, enable)

    # --- losses ------------------------------------------------------------------------------

    def _predictor(self, weights: Mapping[str, torch.Tensor] | None) -> Callable:
        def predict(noisy, timesteps, cond):
            return self.masked.forward(weights, noisy, timesteps, encoder_hidden_states=cond.embeds,
                                       added_cond_kwargs=cond.added_cond_kwargs()).sample
        return predict

    def _domain_losses(self, weights, generator: torch.Generator, *, batch_size: int | None = None,
                       shared_noise: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        predict, batch = self._predictor(weights), batch_size or self.config.batch_size
        state = generator.get_state()
        illegal = self.illegal.loss(predict, batch, generator)
        if shared_noise:
            # The diffusion loss varies far more with the timestep than with the mask; drawing the
            # innocent batch's timesteps and noise exactly as the illegal batch's (the same generator
            # state, and both domains draw the same sequence) lets that variation cancel in the
            # difference the mask update follows.
            generator.set_state(state)
        innocent = self.innocent.loss(predict, batch, generator)
        return illegal, innocent

    def user_step(self, generator: torch.Generator, *, masked: bool = True) -> float:
        """One simulated-user step on both domains (Eq. 7); ``masked=False`` trains ``W_ft`` alone."""
        weights = self.masked.live_weights(self.masked.mask(), grad_to="user") if masked else None
        illegal, innocent = self._domain_losses(weights, generator)
        loss = illegal + innocent
        params = list(self.masked.w_ft.values())
        grads = torch.autograd.grad(loss, params)
        for param, grad in zip(params, grads):
            param.grad = grad
        self.user_optimizer.step()
        self.user_optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    def loss(self, step: int, generator: torch.Generator) -> torch.Tensor:
        if step == 1 and self.config.init == "paper":
            for _ in range(self.config.init_steps):
                self.user_step(generator, masked=False)
        user_loss = float("nan")
        for _ in range(self.config.inner_steps):
            user_loss = self.user_step(generator)
        mask = self.masked.mask()
        illegal, innocent = self._domain_losses(self.masked.live_weights(mask, grad_to="mask"), generator,
                                                batch_size=self.config.mask_batch_size or None,
                                                shared_noise=self.config.shared_noise)
        objective = mask_objective(illegal, innocent, mask, self.config)
        self.last = {"illegal_loss": float(illegal.detach()), "innocent_loss": float(innocent.detach()),
                     "user_loss": user_loss, "mean_mask": float(mask.detach().mean())}
        return objective

    def on_optimizer_step(self, step: int) -> None:
        if self.log_path is not None:
            mask = self.masked.mask().detach()
            record = {"step": step, **self.last, "mean_mask_after": float(mask.mean()),
                      "over_half": int((mask > 0.5).sum())}
            with open(self.log_path, "a") as handle:
                handle.write(json.dumps(record) + "\n")

    # --- checkpointing -----------------------------------------------------------------------

    def state_dict(self) -> dict[str, torch.Tensor]:
        """``W_ft`` and the simulated user's optimizer state (the logits are the loop's own)."""
        state = {f"w_ft.{name}": param.detach() for name, param in self.masked.w_ft.items()}
        for name, param in self.masked.w_ft.items():
            for key, value in self.user_optimizer.state.get(param, {}).items():
                if value is not None:  # SGD without momentum keeps an empty buffer slot
                    state[f"user_optimizer.{name}.{key}"] = torch.as_tensor(value)
        return state

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        expected = {f"w_ft.{name}" for name in self.masked.names}
        if not expected <= set(state):
            raise ConceptGuardError("the checkpoint's W_ft does not match this model's UNet tensors")
        for name, param in self.masked.w_ft.items():
            param.copy_(state[f"w_ft.{name}"])
            prefix = f"user_optimizer.{name}."
            # As torch's own load_state_dict does: moments go to the parameter's device, the step
            # count stays a CPU scalar.
            restored = {}
            for key, value in state.items():
                if key.startswith(prefix):
                    short = key[len(prefix):]
                    restored[short] = value.clone() if short == "step" else value.to(param.device).clone()
            if restored:
                self.user_optimizer.state[param] = restored

    def finish(self) -> dict[str, float]:
        """The learned soft mask by tensor name; puts ``W_pre`` back and restores requires_grad."""
        soft = self.masked.soft_mask()
        self.masked.restore_pre()
        for name, param in self.masked.w_ft.items():
            param.requires_grad_(self._requires_grad[name])
            param.grad = None
        self.user_optimizer.state.clear()
        return soft


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


@dataclass
class MaskLearningResult:
    mask: GuardMask
    train: TrainResult


def guard_train_config(**overrides: Any) -> TrainConfig:
    """The upper level's TrainConfig: :attr:`GuardConfig.default_train` plus ``overrides``."""
    return TrainConfig(**{**GuardConfig.default_train, **overrides})


def _trim_log(path: Path, run_dir: Path) -> None:
    """On resume, drop log lines of steps after the checkpoint being resumed (they will be redone)."""
    from conceptguard.training import checkpoint as ckpt

    latest = ckpt.latest_checkpoint(run_dir)
    step = int(ckpt.read_state(latest)["step"]) if latest is not None else 0
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    ckpt.write_lines_atomic(path, kept)


def learn_mask(pipe, illegal, innocent, run_dir: str | Path, *, config: GuardConfig | None = None,
               train_config: TrainConfig | None = None, resume: bool = False, model_hash: str | None = None,
               resolved_config: dict[str, Any] | None = None) -> MaskLearningResult:
    """Learn which of ``pipe.unet``'s tensors to freeze; returns the mask (not yet saved).

    ``illegal`` and ``innocent`` are data folders, lists of folders, or lists of (uint8 image,
    caption) pairs. ``train_config`` defaults to :func:`guard_train_config`; its ``steps`` counts
    mask updates. ``pipe`` ends up with its original weights. The run folder holds the loop's
    checkpoints (mask logits, ``W_ft`` and the user's optimizer) and ``guard_log.jsonl``.
    """
    from conceptguard.config import config_to_dict
    from conceptguard.diffusion import image_size
    from conceptguard.finetune import images_and_captions
    from conceptguard.models.io import content_hash

    config = config or GuardConfig()
    train_config = train_config or guard_train_config()
    if train_config.grad_accum != 1:
        raise ConceptGuardError("mask learning takes one mask update per step; set grad_accum to 1")
    run_dir = Path(run_dir)
    model_hash = model_hash or content_hash(pipe)
    size = image_size(pipe)
    domains = {"illegal": _describe_domain(illegal), "innocent": _describe_domain(innocent)}
    recipe = MaskLearningRecipe(pipe, images_and_captions(illegal, size), images_and_captions(innocent, size),
                                config, seed=train_config.seed, log_path=run_dir / "guard_log.jsonl")
    resolved = {"method": "freezeasguard", "base_model_hash": model_hash, "guard": config_to_dict(config),
                "domains": domains}
    resolved.update(resolved_config or {})
    if resume:
        _trim_log(run_dir / "guard_log.jsonl", run_dir)
    elif (run_dir / "guard_log.jsonl").exists():
        (run_dir / "guard_log.jsonl").unlink()
    try:
        result = train(recipe, train_config, run_dir, resume=resume, resolved_config=resolved)
    finally:
        soft = recipe.finish() if recipe.masked is not None else None
    frozen = top_k_frozen(soft, config.ratio)
    manifest = build_manifest(pipe, method="freezeasguard", ratio=config.ratio, frozen=frozen,
                              model_hash=model_hash, domains=domains,
                              config={"guard": config_to_dict(config), "train": config_to_dict(train_config)})
    return MaskLearningResult(GuardMask(frozenset(frozen), soft, manifest), result)


def _describe_domain(data) -> list[dict[str, Any]]:
    if isinstance(data, (str, Path)):
        return [describe_data(data)]
    items = list(data)
    if items and all(isinstance(item, (str, Path)) for item in items):
        return [describe_data(item) for item in items]
    return [describe_data(items)]
