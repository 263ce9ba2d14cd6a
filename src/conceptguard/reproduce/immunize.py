"""MIMA vs IMMA on several concepts at once (Zheng & Yeh, ECCV 2024 / 2025): MSGR and MRSGR.

Two tasks, each immunizing several characters together with MIMA and with IMMA (same concepts, data,
adaptation, step budget and prior weight) and then attacking each character with a re-learning
attack (LoRA by default) on a copy of the model:

- personalization (MSGR): held-out characters the base model never learned; "without immunization"
  is the base model;
- re-learning (MRSGR): seen characters, first erased together with ESD; "without immunization" is
  the erased model, the immunized ones are immunized *after* erasure.

The similarity M of the SGR is the world detector's rate of the character in the attacked model's
images, at each checkpoint of the attack after step 0: ``SGR = (M_without − M_with) / M_without``,
averaged over checkpoints, then concepts. A pair whose ``M_without`` is 0 (the attack did not teach
the character even without immunization) leaves SGR undefined and is skipped; the count is reported.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from conceptguard.reproduce.common import Check, Context, CurveSettings, Experiment, Table, compare, curve_summary

TASKS = {"personalization": "MSGR", "relearning": "MRSGR"}
METHODS = ("imma", "mima")


@dataclass(frozen=True)
class ImmunizeClaimConfig:
    # Characters the world LoRA attacker personalizes on the plain model (ospera: 25% at 200 steps).
    personalization_concepts: tuple[str, ...] = ("yulbar", "hobrin", "lumetta")
    relearning_concepts: tuple[str, ...] = ("zorblat", "quimble", "fennix")
    images_per_concept: int = 16
    immunize_steps: int = 200
    immunize_lr: float = 5e-4
    inner_lr: float = 1e-3
    inner_batch_size: int = 4
    # World setting of docs/methods/imma-mima.md; IMMA gets the same, so the comparison is about the Merge.
    prior_weight: float = 10.0
    # The prior pins the model on images of this many seen characters that are not targets (the publisher's
    # own data, 63 images in all); 0 uses the concept images under generic captions.
    prior_characters: int = 7
    prior_images: int = 63
    # Bounded ascent: unbounded (0), immunization that stops the world attacker also breaks the model.
    ascent_cap: float = 0.3
    imma_adaptation: str = "custom"  # MIMA's inner adaptation is Custom Diffusion: IMMA is given the same
    erase_variant: str = "x"
    erase_steps: int = 450  # ESD-x on three characters at once: 0% each, others kept
    erase_lr: float = 1e-4
    erase_ddim_steps: int = 20
    attack_kind: str = "lora"
    attack_steps: int = 200
    attack_lr: float = 1e-3
    attack_batch: int = 8
    lora_rank: int = 8
    checkpoints: tuple[int, ...] = (0, 100, 200)
    curve: CurveSettings = field(default_factory=CurveSettings)

    def concepts(self, task: str) -> list[str]:
        return list(self.personalization_concepts if task == "personalization" else self.relearning_concepts)


QUICK = ImmunizeClaimConfig(personalization_concepts=("yulbar", "drennik"), relearning_concepts=("zorblat", "quimble"),
                            images_per_concept=8, immunize_steps=5, immunize_lr=1e-4, prior_weight=1.0,
                            prior_characters=0, ascent_cap=0.0,
                            erase_steps=20, erase_lr=1e-3, erase_ddim_steps=10,
                            attack_steps=20, attack_lr=3e-3, attack_batch=4, lora_rank=4, checkpoints=(0, 20),
                            curve=CurveSettings(prompts=8, steps=10))
FULL = ImmunizeClaimConfig()


def _immunize(pipe, method: str, config: ImmunizeClaimConfig, concepts: list[str], folders: list[str], ctx: Context,
              task: str, prior_folders: list[str]):
    from conceptguard.methods import apply_method

    values = dict(concepts=concepts, data=folders, inner_lr=config.inner_lr, inner_batch_size=config.inner_batch_size,
                  prior_weight=config.prior_weight, ascent_cap=config.ascent_cap)
    if prior_folders:
        values.update(prior_data=prior_folders, prior_batch_size=4)
    if method == "imma":
        values["adaptation"] = config.imma_adaptation
    apply_method(pipe, method, run_dir=ctx.run_dir(f"{task}-{method}"),
                 train_config=ctx.train_config(config.immunize_steps, config.immunize_lr), **values)
    return pipe


def _prior_folders(config: ImmunizeClaimConfig, concepts: list[str], ctx: Context) -> list[str]:
    """Images of seen characters that are not targets: what the publisher wants the model to keep."""
    from conceptguard.world.concepts import SEEN_CHARACTERS

    keep = [c for c in SEEN_CHARACTERS if c not in concepts][:config.prior_characters]
    return [str(ctx.data_folder(f"prior-{c}", config.prior_images // len(keep), ctx.seed + 3 + i, "pretrain",
                                character=c)) for i, c in enumerate(keep)]


def run(config: ImmunizeClaimConfig, ctx: Context) -> dict[str, Any]:
    # Each task takes tens of minutes in the full profile: an interrupted run resumes by task.
    return {task: ctx.stage(task, lambda: _run_task(config, ctx, task)) for task in TASKS}


def _run_task(config: ImmunizeClaimConfig, ctx: Context, task: str) -> dict[str, Any]:
    import copy

    from conceptguard.methods import apply_method

    concepts = config.concepts(task)
    split = "held_out_characters" if task == "personalization" else "pretrain"
    folders = [str(ctx.data_folder(c, config.images_per_concept, ctx.seed + 7, split, character=c))
               for c in concepts]
    start = ctx.pipeline()
    if task == "relearning":
        apply_method(start, "esd", run_dir=ctx.run_dir("relearning-esd"), concepts=concepts,
                     variant=config.erase_variant, ddim_steps=config.erase_ddim_steps,
                     train_config=ctx.train_config(config.erase_steps, config.erase_lr))
    models = {"without": start}
    prior = _prior_folders(config, concepts, ctx) if config.prior_characters else []
    for method in METHODS:
        models[method] = _immunize(copy.deepcopy(start), method, config, concepts, folders, ctx, task, prior)
    curves: dict[str, dict[str, Any]] = {}
    for name, pipe in models.items():
        for concept, folder in zip(concepts, folders):
            record = ctx.relearn(
                copy.deepcopy(pipe), f"{task}-{name}-{concept}", kind=config.attack_kind, concept=concept,
                data=folder, steps=config.attack_steps, lr=config.attack_lr, checkpoints=config.checkpoints,
                eval=config.curve, chart=f"{TASKS[task]}: {config.attack_kind} attacks",
                legend=f"{name} / {concept}", batch_size=config.attack_batch, lora_rank=config.lora_rank)
            curves.setdefault(name, {})[concept] = curve_summary(record)
    numbers = {"concepts": concepts, "curves": curves, **scores(curves, concepts)}
    ctx.log(f"[immunize] {TASKS[task]}: " + ", ".join(f"{m} {numbers['score'][m]}" for m in METHODS))
    return numbers


def scores(curves: dict[str, dict[str, Any]], concepts: list[str]) -> dict[str, Any]:
    """MSGR (or MRSGR) of each method from the curves; SGR pairs with ``M_without = 0`` are skipped."""
    from conceptguard.evaluation.metrics import msgr

    score, skipped = {}, {}
    for method in METHODS:
        pairs, skipped[method] = {}, 0
        for concept in concepts:
            without = dict((s, v) for s, v in curves["without"][concept]["curve"] if s > 0)
            with_ = dict((s, v) for s, v in curves[method][concept]["curve"] if s > 0)
            for step, value in without.items():
                if value > 0 and step in with_:
                    pairs.setdefault(concept, []).append((value, with_[step]))
                else:
                    skipped[method] += 1
        score[method] = round(msgr(pairs), 6) if pairs else None
    return {"score": score, "skipped_pairs": skipped}


def checks(numbers: dict[str, Any], config: ImmunizeClaimConfig) -> list[Check]:
    out = []
    for task, metric in TASKS.items():
        entry = numbers[task]
        imma, mima = entry["score"]["imma"], entry["score"]["mima"]
        note = "" if imma is not None and mima is not None else (
            f"{metric} undefined: the attack did not teach any character to the model without immunization "
            "(every M_without is 0)")
        out.append(Check(
            f"MIMA immunizes several concepts better than IMMA ({metric}, {task})",
            f"{metric} of MIMA > {metric} of IMMA over {', '.join(entry['concepts'])} under {config.attack_kind} "
            f"(M = detection rate at each attack checkpoint after step 0)",
            {f"MIMA {metric}": mima, f"IMMA {metric}": imma}, compare(mima, ">", imma), note))
    return out


def tables(numbers: dict[str, Any], config: ImmunizeClaimConfig) -> list[Table]:
    out = []
    for task, metric in TASKS.items():
        entry = numbers[task]
        concepts, curves = entry["concepts"], entry["curves"]
        steps = [s for s, _ in curves["without"][concepts[0]]["curve"]]
        rows = []
        for name in ("without", *METHODS):
            for concept in concepts:
                values = dict((s, v) for s, v in curves[name][concept]["curve"])
                rows.append([name, concept] + [values.get(s) for s in steps])
        out.append(Table(
            f"{metric} ({task}): detection of each character during the {config.attack_kind} attack",
            ["model", "character"] + [f"step {s}" for s in steps], rows,
            formats=["text", "text"] + ["pct"] * len(steps),
            note=f"{metric}: MIMA {_fmt(entry['score']['mima'])}, IMMA {_fmt(entry['score']['imma'])} (skipped pairs "
                 f"with M_without = 0: MIMA {entry['skipped_pairs']['mima']}, IMMA {entry['skipped_pairs']['imma']}). "
                 f"Immunization: {config.immunize_steps} steps, lr {config.immunize_lr:g}, inner lr "
                 f"{config.inner_lr:g}, "
                 f"prior weight {config.prior_weight:g}"
                 + (f" on {config.prior_images} images of seen non-target characters" if config.prior_characters else "")
                 + (f", ascent capped at {config.ascent_cap:g}" if config.ascent_cap else "")
                 + f", IMMA against {config.imma_adaptation}"
                 + (f"; erased first with ESD-{config.erase_variant} ({config.erase_steps} steps)"
                    if task == "relearning" else "")
                 + f". Attack: {config.attack_steps} steps, lr {config.attack_lr:g}, batch {config.attack_batch}, "
                 f"{config.images_per_concept} images per character; curve on {config.curve.prompts} prompts, "
                 f"{config.curve.steps} DDIM steps."))
    return out


def _fmt(value: float | None) -> str:
    return "undefined" if value is None else f"{value:.3f}"


EXPERIMENT = Experiment(
    name="immunize",
    title="MIMA vs IMMA on several concepts",
    claim="Immunizing several concepts at once, MIMA (adaptations merged in closed form, gradient through the "
          "Merge) reaches a higher MSGR (personalization) and MRSGR (re-learning after erasure) than IMMA.",
    source="Zheng & Yeh, IMMA (ECCV 2024) and Multi-concept model immunization (MIMA, 2025): MSGR / MRSGR tables",
    profiles={"quick": QUICK, "full": FULL},
    run=run, checks=checks, tables=tables,
)
