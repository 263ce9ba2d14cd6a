"""Defenses of the attack matrix: each is a small callable that turns the base model into a defended one.

A defense gets a :class:`DefenseSetup` (the context, the concept, the publisher's images of it and
an innocent domain's) and returns a :class:`Defended`: the pipeline to attack and, for FreezeAsGuard
and the stack that ends with it, the mask the publisher's fine-tuning API enforces on the attacker.
Every defense runs the library's own entry points (``apply_method``, ``learn_mask``,
``conceptguard.stack.stack``) with the settings of :func:`method_settings`; the stacked defense
uses the very same settings for its stages, so it is exactly its parts run one after the other.
Registering one more is one decorated function::

    @register_defense("uce")
    def uce(setup): ...
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from conceptguard.errors import ConceptGuardError


class DefenseUnavailable(ConceptGuardError):
    """The defense cannot be built in this installation (e.g. a module that does not exist yet)."""


@dataclass
class DefenseSetup:
    ctx: Any  # conceptguard.reproduce.common.Context
    config: Any  # conceptguard.reproduce.attacks.AttackMatrixConfig
    concept: str
    publisher_data: Path  # the publisher's images of the concept (not the attacker's)
    innocent_data: Path  # an innocent domain, for FreezeAsGuard's mask


@dataclass
class Defended:
    pipe: Any
    guard: Any = None  # a GuardMask enforced when the attacker fine-tunes UNet tensors in place
    summary: str = ""


DEFENSES: dict[str, Callable[[DefenseSetup], Defended]] = {}


def register_defense(name: str):
    def decorator(fn):
        DEFENSES[name] = fn
        return fn

    return decorator


def build_defense(name: str, setup: DefenseSetup) -> Defended:
    if name not in DEFENSES:
        raise ConceptGuardError(f"unknown defense {name!r}; available: {', '.join(DEFENSES)}")
    return DEFENSES[name](setup)


# --------------------------------------------------------------------------------------------
# Settings shared by the single defenses and the stack's stages
# --------------------------------------------------------------------------------------------


def method_settings(defense: str, setup: DefenseSetup) -> tuple[str, dict[str, Any], Any]:
    """(registered method, its Config fields, TrainConfig or None) of an erase/immunize defense."""
    c, ctx, concepts = setup.config, setup.ctx, [setup.concept]
    if defense in ("esd-x", "esd-u"):
        return "esd", dict(concepts=concepts, variant=defense[-1], ddim_steps=c.erase_ddim_steps), \
            ctx.train_config(c.erase_steps, c.erase_lr)
    if defense == "sdd":
        return "sdd", dict(concepts=concepts, ema_decay=c.sdd_ema_decay, ddim_steps=c.erase_ddim_steps), \
            ctx.train_config(c.erase_steps, c.sdd_lr, "adamw", weight_decay=1e-2, max_grad_norm=1.0)
    if defense == "uce":
        return "uce", dict(concepts=concepts), None
    data = [str(setup.publisher_data)]
    train = ctx.train_config(c.immunize_steps, c.immunize_lr)
    if defense == "imma":
        return "imma", dict(concepts=concepts, data=data, adaptation=c.imma_adaptation, inner_lr=c.inner_lr,
                            inner_batch_size=c.inner_batch_size), train
    if defense == "mima":
        return "mima", dict(concepts=concepts, data=data, inner_lr=c.inner_lr,
                            inner_batch_size=c.inner_batch_size), train
    raise ConceptGuardError(f"{defense!r} is not an erase or immunize defense")


def guard_settings(setup: DefenseSetup) -> tuple[Any, Any]:
    """(GuardConfig, TrainConfig) of FreezeAsGuard: the guard table's world-calibrated settings."""
    table = setup.config.guard_table_config(setup.ctx.seed)
    return table.guard_config(setup.config.guard_ratio), table.mask_train_config()


def _apply(defense: str, setup: DefenseSetup) -> Defended:
    from conceptguard.methods import apply_method

    method, values, train = method_settings(defense, setup)
    pipe = setup.ctx.pipeline()
    kwargs = {"train_config": train} if train is not None else {}
    result = apply_method(pipe, method, run_dir=setup.ctx.run_dir("defense", defense), **kwargs, **values)
    return Defended(pipe, summary=result.summary)


for _name in ("esd-x", "esd-u", "sdd", "uce", "imma", "mima"):
    register_defense(_name)(lambda setup, _defense=_name: _apply(_defense, setup))


@register_defense("none")
def no_defense(setup: DefenseSetup) -> Defended:
    return Defended(setup.ctx.pipeline(), summary="the base model")


@register_defense("freezeasguard")
def freezeasguard(setup: DefenseSetup) -> Defended:
    """The base model unchanged, published with a learned mask."""
    from conceptguard.guard.mask import learn_mask

    guard_config, train = guard_settings(setup)
    pipe = setup.ctx.pipeline()
    result = learn_mask(pipe, setup.publisher_data, setup.innocent_data, setup.ctx.run_dir("defense", "freezeasguard"),
                        config=guard_config, train_config=train)
    return Defended(pipe, guard=result.mask, summary=result.mask.describe())


@register_defense("stack")
def stacked(setup: DefenseSetup) -> Defended:
    """Erase → immunize → guard in one run (``conceptguard.stack``), each stage with the settings its
    single defense uses; the mask is learned on the erased and immunized weights."""
    from conceptguard.config import config_to_dict

    try:
        from conceptguard.stack import GuardStage, MethodStage, StackConfig, stack
    except ImportError as exc:
        raise DefenseUnavailable(f"the stacked defense needs conceptguard.stack, which is not available: {exc}"
                                 ) from exc

    stages = {}
    for stage, defense in (("erase", setup.config.stack_erase), ("immunize", setup.config.stack_immunize)):
        method, values, train = method_settings(defense, setup)
        stages[stage] = MethodStage(method, config=values, train=config_to_dict(train) if train is not None else {})
    guard_config, guard_train = guard_settings(setup)
    stages["guard"] = GuardStage(illegal=[str(setup.publisher_data)], innocent=[str(setup.innocent_data)],
                                 config=guard_config, train=config_to_dict(guard_train))
    run_dir = setup.ctx.run_dir("defense", "stack")
    result = stack(setup.ctx.pipeline(), StackConfig(**stages), run_dir / "out", run_dir=run_dir / "run")
    chain = " → ".join(f"{r['stage']} ({r['method']})" for r in result.stages)
    return Defended(result.pipe, guard=result.mask, summary=f"stacked: {chain}")
