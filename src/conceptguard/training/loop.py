"""The one training loop every method (ESD, SDD, IMMA, MIMA, FreezeAsGuard, fine-tuning attacks) runs on.

A method is a *recipe* (:class:`Recipe`): it owns its models and computes a loss. This loop owns
everything around that — optimizer, lr schedule, mixed precision, gradient accumulation and
clipping, seeding, logging, checkpoints and resume — so every method gets them the same way and a
killed run resumes bit for bit. Multi-GPU comes from ``accelerate launch`` unchanged.

Steps are numbered from 1 everywhere: ``recipe.loss(step, generator)`` computes optimizer step
``step``, ``recipe.on_optimizer_step(step)`` runs right after it is applied, the ``log.jsonl`` line
with ``"step": step`` reports it, and ``checkpoints/step-{step:06d}`` holds the state after it.

Run folder::

    config.json     the resolved config: the method's ``resolved_config`` plus ``"train"`` (TrainConfig)
    log.jsonl       one JSON line every ``log_every`` steps: step, loss, lr, grad_norm, time, elapsed
    checkpoints/    see :mod:`conceptguard.training.checkpoint`
    tensorboard/    with ``tensorboard=True``
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import gather_object, set_seed
from tqdm.auto import tqdm

from conceptguard.config import config_to_dict
from conceptguard.errors import ConceptGuardError
from conceptguard.training import checkpoint as ckpt

logger = get_logger(__name__)

# TrainConfig fields that may change when resuming: they decide how long to train, what gets
# written and how much memory it takes, not what the optimizer computes.
RESUMABLE_CHANGES = frozenset(
    f"train.{name}"
    for name in ("steps", "checkpoint_every", "keep_checkpoints", "log_every", "tensorboard", "progress",
                 "gradient_checkpointing"))


@runtime_checkable
class Recipe(Protocol):
    """What a method provides to :func:`train`.

    Required:

    ``setup(accelerator)``
        Move frozen modules to ``accelerator.device`` (cast them to bf16/fp16 if you like) and
        ``accelerator.prepare`` the modules being trained. Called once, after seeding.
    ``trainable_parameters() -> {name: Parameter}``
        The parameters to optimize, in fp32 (the loop refuses anything else: optimizer steps on
        bf16 weights lose small updates to rounding). Name them as in the *unwrapped* model
        (``accelerator.unwrap_model(m).named_parameters()``) so checkpoints load anywhere.
    ``loss(step, generator) -> scalar tensor``
        One micro-batch's loss, called ``grad_accum`` times per step under ``accelerator.autocast()``.
        All randomness of a step must come from ``generator`` — a CPU generator, so draw on the CPU
        and move (``torch.randn(shape, generator=generator).to(device)``), which also makes a run
        reproducible across devices. Do not call backward.

    Optional (looked up with ``getattr``; a recipe without them gets the defaults):

    ``param_groups() -> list[dict] | None``
        Optimizer groups (each trainable parameter exactly once), e.g. a larger lr for a mask.
    ``on_optimizer_step(step)``
        Runs after each applied optimizer step, e.g. an EMA-teacher update or a projection.
    ``state_dict() -> {name: tensor}`` / ``load_state_dict(state)``
        Extra tensors to checkpoint (e.g. EMA weights); ``load_state_dict`` gets them on the CPU.
    ``set_gradient_checkpointing(enable)``
        Turn activation checkpointing of the trained model on or off; needed for
        ``gradient_checkpointing=True``. Called before ``setup`` and again (off) when training ends.

    A recipe should not itself be an ``nn.Module``: its ``state_dict`` would then checkpoint every
    weight of the module, frozen ones included.
    """

    def setup(self, accelerator: Accelerator) -> None: ...

    def trainable_parameters(self) -> dict[str, torch.nn.Parameter]: ...

    def loss(self, step: int, generator: torch.Generator) -> torch.Tensor: ...


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass
class TrainConfig:
    """Settings of :func:`train`; CLI flags come from ``config.add_dataclass_arguments``."""

    steps: int = field(default=1000, metadata=_help("number of optimizer steps"))
    lr: float = field(default=1e-5, metadata=_help("peak learning rate"))
    optimizer: Literal["adam", "adamw", "sgd"] = field(
        default="adamw", metadata=_help("optimizer: adam, adamw (decoupled weight decay) or sgd (no momentum)"))
    betas: tuple[float, float] = field(default=(0.9, 0.999), metadata=_help("Adam betas, two numbers"))
    weight_decay: float = field(default=0.0, metadata=_help("weight decay"))
    lr_schedule: Literal["constant", "cosine", "linear"] = field(
        default="constant", metadata=_help("learning-rate decay after warmup: constant, cosine or linear (to 0)"))
    warmup_steps: int = field(default=0, metadata=_help("steps of linear learning-rate warmup from 0"))
    grad_accum: int = field(default=1, metadata=_help("micro-batches (loss calls) accumulated per optimizer step"))
    max_grad_norm: float | None = field(
        default=1.0, metadata=_help("clip the global gradient norm to this; 0 disables clipping"))
    mixed_precision: Literal["no", "bf16", "fp16"] = field(
        default="no", metadata=_help("autocast the forward pass to bf16 or fp16 (weights stay fp32); fp16 needs a GPU"))
    gradient_checkpointing: bool = field(default=False, metadata=_help(
        "recompute UNet activations during backward instead of keeping them: less memory, about a third more time"))
    seed: int = field(default=0, metadata=_help("random seed (process i uses seed + i for its generator)"))
    checkpoint_every: int = field(default=500, metadata=_help("save a resumable checkpoint every N steps"))
    keep_checkpoints: int = field(default=2, metadata=_help("how many of the newest checkpoints to keep"))
    log_every: int = field(default=10, metadata=_help("write a log.jsonl line every N steps"))
    tensorboard: bool = field(default=False, metadata=_help("also log to TensorBoard (needs the tensorboard package)"))
    progress: bool = field(default=True, metadata=_help("show a progress bar"))

    def __post_init__(self) -> None:
        # Config files are YAML, which reads "1e-5" as a string; accept any number-like value.
        self.lr = _number("lr", self.lr)
        self.weight_decay = _number("weight_decay", self.weight_decay)
        if self.max_grad_norm is not None:
            self.max_grad_norm = _number("max_grad_norm", self.max_grad_norm)
        if isinstance(self.betas, str) or len(tuple(self.betas)) != 2:
            raise ValueError(f"betas must be two numbers, got {self.betas!r}")
        self.betas = (_number("betas", self.betas[0]), _number("betas", self.betas[1]))
        for name in ("steps", "grad_accum", "checkpoint_every", "keep_checkpoints", "log_every"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not _is_int(self.warmup_steps) or not 0 <= self.warmup_steps <= self.steps:
            raise ValueError(
                f"warmup_steps must be an integer between 0 and steps={self.steps}, got {self.warmup_steps!r}")
        if not _is_int(self.seed) or not 0 <= self.seed < 2**32:
            raise ValueError(f"seed must be an integer in [0, 2**32), got {self.seed!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not all(0 <= beta < 1 for beta in self.betas):
            raise ValueError(f"betas must lie in [0, 1), got {self.betas}")
        if self.max_grad_norm is not None and self.max_grad_norm < 0:
            raise ValueError(f"max_grad_norm must be >= 0 (0 disables clipping), got {self.max_grad_norm}")
        _check_choice("optimizer", self.optimizer, ("adam", "adamw", "sgd"))
        _check_choice("lr_schedule", self.lr_schedule, ("constant", "cosine", "linear"))
        _check_choice("mixed_precision", self.mixed_precision, ("no", "bf16", "fp16"))
        for name in ("gradient_checkpointing", "tensorboard", "progress"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")


@dataclass
class TrainResult:
    run_dir: Path
    steps_done: int  # optimizer steps completed in all, including those before a resume
    start_step: int  # the step this call resumed from (0 for a fresh run)
    final_loss: float | None  # loss of the last step this call ran; None if it ran none
    losses: list[float]  # every step this call ran: losses[i] is step start_step + 1 + i
    log_path: Path
    checkpoint: Path | None  # the newest checkpoint, i.e. the final state


def train(
    recipe: Recipe,
    config: TrainConfig,
    run_dir: str | Path,
    *,
    resume: bool = False,
    accelerator: Accelerator | None = None,
    resolved_config: dict[str, Any] | None = None,
    allow_config_changes: Collection[str] = (),
) -> TrainResult:
    """Train ``recipe`` for ``config.steps`` optimizer steps, writing the run folder ``run_dir``.

    ``resume=True`` continues from the newest complete checkpoint in ``run_dir`` (or starts from
    scratch if there is none); the config must then match the saved ``config.json`` except for the
    keys in :data:`RESUMABLE_CHANGES` and ``allow_config_changes`` (e.g. ``{"train.lr"}`` to lower
    the learning rate after a divergence); allowed optimizer hyperparameters take effect, the
    optimizer's moments carry over. Without ``resume`` the run folder must hold no checkpoints.

    ``accelerator`` defaults to a new one built from the config; a given one must agree with it on
    mixed precision (its gradient-accumulation steps are set to ``config.grad_accum``).
    ``resolved_config`` is the method's full config, saved with the TrainConfig under ``"train"``.
    Raises ConceptGuardError, without applying the step, when the loss or gradient norm stops being finite.
    """
    run_dir = Path(run_dir)
    if config.gradient_checkpointing and not hasattr(recipe, "set_gradient_checkpointing"):
        raise ConceptGuardError(f"{type(recipe).__name__} does not support gradient_checkpointing; turn it off")
    owns_accelerator = accelerator is None
    if accelerator is None:
        accelerator = _make_accelerator(config)
    _check_accelerator(accelerator, config)
    summary_writer_cls = _summary_writer_cls() if config.tensorboard else None
    run_config = _run_config(config, resolved_config)
    resume_from = _resume_checkpoint(run_dir, run_config, config, resume, allow_config_changes)
    if config.gradient_checkpointing:
        recipe.set_gradient_checkpointing(True)
    try:
        return _train(recipe, config, run_dir, accelerator, run_config, resume_from, summary_writer_cls)
    finally:
        if config.gradient_checkpointing:
            # The model outlives the run: whoever fine-tunes it next should not pay for the recomputation.
            recipe.set_gradient_checkpointing(False)
        if owns_accelerator:
            accelerator.free_memory()  # drops its references to the prepared models and optimizer


def _train(recipe: Recipe, config: TrainConfig, run_dir: Path, accelerator: Accelerator, run_config: dict[str, Any],
           resume_from: Path | None, summary_writer_cls) -> TrainResult:
    set_seed(config.seed)
    recipe.setup(accelerator)
    params = _trainable_parameters(recipe)
    optimizer = _make_optimizer(config, _param_groups(recipe, params))
    # Stepped by hand once per applied optimizer step: accelerate's prepared scheduler would step
    # once per process, shortening the schedule under `accelerate launch`.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda done: lr_multiplier(done + 1, config))
    run = _Run(run_dir, config, accelerator, recipe, params, accelerator.prepare(optimizer), scheduler,
               # Each process draws its own batches; on one process this is just `seed`.
               generator=torch.Generator().manual_seed(config.seed + accelerator.process_index))

    start_step, last_checkpoint = 0, resume_from
    if resume_from is not None:
        start_step = _load_checkpoint(run, resume_from)
        logger.info(f"resuming {run_dir} from {resume_from.name}")
    if accelerator.is_main_process:
        _start_run_dir(run_dir, run_config, start_step)
    accelerator.wait_for_everyone()

    optimizer, generator = run.optimizer, run.generator
    max_norm = config.max_grad_norm or math.inf  # an infinite bound still measures the norm
    on_optimizer_step = getattr(recipe, "on_optimizer_step", None)
    losses: list[float] = []
    started = time.time()
    with contextlib.ExitStack() as stack:
        log = stack.enter_context(_RunLog(run_dir, accelerator.is_main_process, summary_writer_cls, start_step))
        bar = stack.enter_context(tqdm(
            total=config.steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
            disable=not (config.progress and accelerator.is_main_process)))
        for step in range(start_step + 1, config.steps + 1):
            step_loss = torch.zeros((), device=accelerator.device)
            for micro in range(config.grad_accum):
                with _micro_batch(accelerator, last=micro == config.grad_accum - 1):
                    with accelerator.autocast():
                        loss = recipe.loss(step, generator)
                    _check_scalar(loss, step)
                    accelerator.backward(loss)  # divides by grad_accum
                step_loss += loss.detach().float().to(step_loss.device) / config.grad_accum
            grad_norm = accelerator.clip_grad_norm_(list(params.values()), max_norm)  # unscales fp16 grads first
            grad_norm = None if grad_norm is None else float(grad_norm)
            # Every process must take the same decision below, so they all look at the mean loss.
            loss_value = accelerator.gather(step_loss.reshape(1)).mean().item()
            lr = optimizer.param_groups[0]["lr"]

            diverged = _nonfinite(loss_value, grad_norm, fp16=accelerator.scaler is not None)
            if diverged:
                log.write({"event": "nonfinite", "step": step, "loss": _json_number(loss_value),
                           "grad_norm": _json_number(grad_norm), "lr": lr, "time": round(time.time(), 3)})
                raise _divergence_error(diverged, step, last_checkpoint, config)

            optimizer.step()
            if not optimizer.step_was_skipped:  # an fp16 step with inf gradients is skipped by the grad scaler
                scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if on_optimizer_step is not None:
                on_optimizer_step(step)
            losses.append(loss_value)

            if step % config.log_every == 0 or step == config.steps:
                log.write({"step": step, "loss": loss_value, "lr": lr, "grad_norm": grad_norm,
                           "time": round(time.time(), 3), "elapsed": round(time.time() - started, 3)})
                log.scalars(step, loss=loss_value, lr=lr, grad_norm=grad_norm)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4g}", lr=f"{lr:.3g}", refresh=False)
            if step % config.checkpoint_every == 0 or step == config.steps:
                last_checkpoint = _save_checkpoint(run, step)

    return TrainResult(
        run_dir=run_dir, steps_done=config.steps, start_step=start_step, final_loss=losses[-1] if losses else None,
        losses=losses, log_path=run_dir / "log.jsonl", checkpoint=last_checkpoint)


def _nonfinite(loss: float, grad_norm: float | None, *, fp16: bool) -> str | None:
    """What diverged ("loss became nan"), or None."""
    if not math.isfinite(loss):
        return f"loss became {loss}"
    # With fp16 an infinite gradient is routine (the loss scale probes upwards) and the grad scaler
    # skips that step itself; anywhere else it means divergence.
    if grad_norm is not None and not math.isfinite(grad_norm) and not fp16:
        return f"gradient norm became {grad_norm}"
    return None


def _divergence_error(what: str, step: int, last_checkpoint: Path | None, config: TrainConfig) -> ConceptGuardError:
    if last_checkpoint is None:
        return ConceptGuardError(
            f"{what} at step {step}; no checkpoint was written yet (checkpoint_every={config.checkpoint_every}); "
            "start again with a lower learning rate")
    return ConceptGuardError(
        f"{what} at step {step}; last good checkpoint: {last_checkpoint} "
        "(resume with --resume after lowering the learning rate)")


def lr_multiplier(step: int, config: TrainConfig) -> float:
    """Fraction of the peak lr used by optimizer step ``step`` (1-based)."""
    if step <= config.warmup_steps:
        return step / config.warmup_steps
    if config.lr_schedule == "constant":
        return 1.0
    # Runs from 0 on the first step after warmup to just below 1 on the last, so no step gets lr 0.
    progress = min(1.0, (step - config.warmup_steps - 1) / max(1, config.steps - config.warmup_steps))
    if config.lr_schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


# --- setup -----------------------------------------------------------------------------------------


def _make_accelerator(config: TrainConfig) -> Accelerator:
    try:
        return Accelerator(mixed_precision=config.mixed_precision)
    except ValueError as exc:  # e.g. another Accelerator in this process already fixed the precision
        raise ConceptGuardError(
            f"cannot set up accelerate with mixed_precision={config.mixed_precision!r}: {exc}") from exc


def _check_accelerator(accelerator: Accelerator, config: TrainConfig) -> None:
    if accelerator.mixed_precision != config.mixed_precision:
        raise ConceptGuardError(
            f"the accelerator uses mixed_precision={accelerator.mixed_precision!r} but the config asks for "
            f"{config.mixed_precision!r}; make them agree")
    if config.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        # accelerate would silently train in fp32 instead.
        raise ConceptGuardError("mixed_precision='fp16' needs a GPU; on the CPU use 'bf16' or 'no'")
    accelerator.gradient_accumulation_steps = config.grad_accum  # accelerator.backward divides by it


def _summary_writer_cls():
    # Imported lazily: TensorBoard is an optional extra, and checked before any work is done.
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise ConceptGuardError(
            "tensorboard=True needs the tensorboard package: pip install 'conceptguard[tensorboard]' "
            "(or set tensorboard to false)") from exc
    return SummaryWriter


def _trainable_parameters(recipe: Recipe) -> dict[str, torch.nn.Parameter]:
    params = dict(recipe.trainable_parameters())
    if not params:
        raise ConceptGuardError(f"{type(recipe).__name__}.trainable_parameters() returned no parameters")
    not_fp32 = [f"{name} ({p.dtype})" for name, p in params.items() if p.dtype != torch.float32]
    if not_fp32:
        raise ConceptGuardError(
            f"trainable parameters must be fp32 master weights, but {ckpt.few_names(not_fp32)} are not; keep trained "
            "modules in fp32 and use mixed_precision=bf16/fp16 (only frozen modules may be cast down)")
    return params


def _param_groups(recipe: Recipe, params: dict[str, torch.nn.Parameter]) -> list[dict[str, Any]]:
    hook = getattr(recipe, "param_groups", None)
    groups = hook() if hook is not None else None
    if groups is None:
        return [{"params": list(params.values())}]
    groups = [{**group, "params": list(group["params"])} for group in groups]
    grouped = sorted(id(p) for group in groups for p in group["params"])
    if grouped != sorted(id(p) for p in params.values()):
        raise ConceptGuardError(
            f"{type(recipe).__name__}.param_groups() must hold each trainable parameter exactly once "
            "(and nothing else), or the checkpoints would not match the optimizer")
    return groups


def _make_optimizer(config: TrainConfig, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, weight_decay=config.weight_decay)
    cls = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    return cls(groups, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay)


@contextlib.contextmanager
def _micro_batch(accelerator: Accelerator, *, last: bool) -> Iterator[None]:
    """What ``accelerator.accumulate`` does, but counted by this loop.

    accelerate's own counter also ends an accumulation at the end of any prepared dataloader, which
    would silently drop optimizer steps for a recipe that iterates a dataloader of its own.
    """
    accelerator.sync_gradients = last  # read by the prepared optimizer and by DeepSpeed's backward
    with contextlib.ExitStack() as stack:
        if not last:
            # DDP all-reduces on every backward; only the last micro-batch's is needed. accelerate
            # keeps no public list of the modules the recipe prepared, hence `_models`.
            for model in getattr(accelerator, "_models", ()):
                stack.enter_context(accelerator.no_sync(model))
        yield


def _check_scalar(loss: Any, step: int) -> None:
    if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ConceptGuardError(f"recipe.loss must return a scalar tensor, got {shape} at step {step}")


# --- run folder ------------------------------------------------------------------------------------


def _run_config(config: TrainConfig, resolved_config: dict[str, Any] | None) -> dict[str, Any]:
    run_config = json.loads(json.dumps(dict(resolved_config or {}), default=str))
    run_config["train"] = config_to_dict(config)
    return run_config


def _resume_checkpoint(run_dir: Path, run_config: dict[str, Any], config: TrainConfig, resume: bool,
                       allow_config_changes: Collection[str]) -> Path | None:
    """The checkpoint to resume from, after checking that it may be resumed with this config.

    Only reads files, so every process runs it and they all raise the same errors together.
    """
    latest = ckpt.latest_checkpoint(run_dir)
    if not resume:
        if latest is not None:
            raise ConceptGuardError(
                f"{run_dir} already holds checkpoints (newest: {latest.name}); resume it with --resume "
                "or choose another run folder")
        return None
    if latest is None:
        logger.warning(f"--resume: no checkpoint in {run_dir} yet; starting from scratch")
        return None
    saved_path = run_dir / "config.json"
    try:
        saved = json.loads(saved_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConceptGuardError(f"cannot resume {run_dir}: its config.json cannot be read ({exc})") from exc
    allowed = RESUMABLE_CHANGES | {key if "." in key else f"train.{key}" for key in allow_config_changes}
    changed = _config_differences(saved, run_config, allowed)
    if changed:
        raise ConceptGuardError(
            f"cannot resume {run_dir} with a different config; changed: {'; '.join(changed)}. "
            "Resume with the saved values, or allow these changes explicitly")
    step = int(ckpt.read_state(latest)["step"])
    if step > config.steps:
        raise ConceptGuardError(f"{latest} is at step {step}, beyond steps={config.steps}; raise steps to resume it")
    return latest


def _config_differences(saved: dict[str, Any], current: dict[str, Any], allowed: Collection[str]) -> list[str]:
    saved_flat, current_flat = _flatten(saved), _flatten(current)
    missing = "<unset>"
    return [
        f"{key} (saved {saved_flat.get(key, missing)!r}, now {current_flat.get(key, missing)!r})"
        for key in sorted(saved_flat.keys() | current_flat.keys())
        if key not in allowed and saved_flat.get(key, missing) != current_flat.get(key, missing)]


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _start_run_dir(run_dir: Path, run_config: dict[str, Any], start_step: int) -> None:
    """Main process only: write config.json and cut log.jsonl back to the resumed step."""
    (run_dir / ckpt.CHECKPOINTS).mkdir(parents=True, exist_ok=True)
    ckpt.write_json_atomic(run_dir / "config.json", run_config)
    log_path = run_dir / "log.jsonl"
    kept = []
    if start_step > 0 and log_path.is_file():
        for line in log_path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by the kill
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= start_step:
                kept.append(line)
    ckpt.write_lines_atomic(log_path, kept)
    ckpt.remove_incomplete(run_dir)


class _RunLog:
    """Appends to log.jsonl (and TensorBoard) on the main process; does nothing elsewhere."""

    def __init__(self, run_dir: Path, enabled: bool, summary_writer_cls, start_step: int):
        self._file = open(run_dir / "log.jsonl", "a", buffering=1) if enabled else None
        # purge_step drops events a killed run logged after the checkpoint being resumed.
        self._tensorboard = (summary_writer_cls(str(run_dir / "tensorboard"), purge_step=start_step + 1)
                             if enabled and summary_writer_cls is not None else None)

    def write(self, record: dict[str, Any]) -> None:
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")

    def scalars(self, step: int, **values: float | None) -> None:
        if self._tensorboard is not None:
            for name, value in values.items():
                if value is not None:
                    self._tensorboard.add_scalar(f"train/{name}", value, step)

    def __enter__(self) -> _RunLog:
        return self

    def __exit__(self, *exc_info) -> None:
        if self._file is not None:
            self._file.close()
        if self._tensorboard is not None:
            self._tensorboard.close()


# --- checkpoints -----------------------------------------------------------------------------------


@dataclass
class _Run:
    """What a checkpoint saves and restores."""

    run_dir: Path
    config: TrainConfig
    accelerator: Accelerator
    recipe: Recipe
    params: dict[str, torch.nn.Parameter]
    optimizer: torch.optim.Optimizer  # prepared by accelerate
    scheduler: torch.optim.lr_scheduler.LambdaLR
    generator: torch.Generator


def _save_checkpoint(run: _Run, step: int) -> Path:
    accelerator = run.accelerator
    path = ckpt.checkpoint_path(run.run_dir, step)
    # Anything that may need every process comes first; then only the main process writes.
    rng_states = gather_object([ckpt.capture_rng_state(run.generator, accelerator.device)])
    recipe_state = run.recipe.state_dict() if hasattr(run.recipe, "state_dict") else None
    training_state = {"optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict()}
    if accelerator.scaler is not None:
        training_state["scaler"] = accelerator.scaler.state_dict()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        ckpt.write_checkpoint(path, step=step, params=run.params, training_state=training_state,
                              recipe_state=recipe_state, rng_states=rng_states)
        ckpt.prune_checkpoints(run.run_dir, run.config.keep_checkpoints)
    accelerator.wait_for_everyone()
    return path


def _load_checkpoint(run: _Run, path: Path) -> int:
    """Restore everything a checkpoint holds; returns its step."""
    step = int(ckpt.read_state(path)["step"])
    ckpt.copy_parameters_into(run.params, ckpt.load_trainable_parameters(path), path)

    optimizer, scheduler = run.optimizer, run.scheduler
    training_state = ckpt.load_torch(path, ckpt.OPTIMIZER)
    # Hyperparameters (lr, betas, ...) come from the current config — they differ from the saved
    # ones only where the caller allowed it; the optimizer's moments and step counts come from disk.
    hyperparameters = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    try:
        optimizer.load_state_dict(training_state["optimizer"])
    except (ValueError, KeyError) as exc:
        raise ConceptGuardError(f"optimizer state of {path} does not match this recipe's parameters: {exc}") from exc
    scheduler.load_state_dict(training_state["scheduler"])
    for group, hyper in zip(optimizer.param_groups, hyperparameters):
        group.update(hyper)
    scheduler.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
    for group in optimizer.param_groups:  # the very product LambdaLR computes, so a plain resume is exact
        group["lr"] = group["initial_lr"] * lr_multiplier(scheduler.last_epoch + 1, run.config)
    if run.accelerator.scaler is not None and "scaler" in training_state:
        run.accelerator.scaler.load_state_dict(training_state["scaler"])

    recipe_state = ckpt.load_recipe_state(path)
    if recipe_state is not None and hasattr(run.recipe, "load_state_dict"):
        run.recipe.load_state_dict(recipe_state)

    rng_states = ckpt.load_torch(path, ckpt.RNG)["processes"]
    index = run.accelerator.process_index
    if index < len(rng_states):
        ckpt.restore_rng_state(rng_states[index], run.generator, run.accelerator.device)
    else:
        # Resumed on more processes than the run was saved with: the extra ones keep their fresh
        # seeds, so training goes on correctly but is no longer bit-identical to an uninterrupted run.
        logger.warning(f"{path} has no RNG state for process {index}; it keeps a fresh seed", main_process_only=False)
    return step


# --- small helpers ---------------------------------------------------------------------------------


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_choice(name: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def _json_number(value: float | None) -> float | str | None:
    # json.dumps would write NaN/Infinity, which strict JSON readers reject.
    return value if value is None or math.isfinite(value) else str(value)
