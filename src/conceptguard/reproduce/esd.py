"""ESD-x vs ESD-u (Gandikota et al., ICCV 2023): where the erasure acts decides what it costs.

ESD-x fine-tunes cross-attention only, so the edit is tied to the concept's word: it should
interfere less with everything else (the paper's artist-style erasure). ESD-u fine-tunes every
other layer, so it acts whatever the prompt says: it should remove an implicit concept even from
prompts that never name it (the paper's nudity erasure; here the halo triggered by "holy").

Both variants erase the same concepts with the same budget from the same base model; one
evaluation set per concept measures erasure (detection on target/paraphrase/implicit prompts) and
interference (the detector's agreement with the prompted labels on preservation prompts).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from conceptguard.reproduce.common import (
    EFFECT,
    KEEP_DROP,
    Check,
    Context,
    Experiment,
    Table,
    below,
    compare,
    dropped_at_most,
    prompt_records,
    summarize,
)

VARIANTS = ("x", "u")


@dataclass(frozen=True)
class ESDClaimConfig:
    targeted_concept: str = "striped"  # a style: the analogue of the paper's artists
    implicit_concept: str = "halo"  # triggered by words that never name it, as nudity
    steps: int = 150  # the world setting of the ESD tests
    lr: float = 2e-4
    eta: float = 1.0
    ddim_steps: int = 50
    n_target: int = 32
    n_paraphrase: int = 16
    n_implicit: int = 32
    preservation_per_concept: int = 4  # x (8 shapes + 16 characters) preservation images
    eval_steps: int = 25
    guidance_scale: float = 7.5

    def concepts(self) -> list[str]:
        return list(dict.fromkeys([self.targeted_concept, self.implicit_concept]))


# Quick: one concept, a fifth of the steps at five times the learning rate, few images.
QUICK = ESDClaimConfig(targeted_concept="halo", steps=30, lr=1e-3, ddim_steps=10, n_target=8, n_paraphrase=0,
                       n_implicit=16, preservation_per_concept=1, eval_steps=10)
FULL = ESDClaimConfig()


def run(config: ESDClaimConfig, ctx: Context) -> dict[str, Any]:
    from conceptguard.methods import apply_method

    numbers: dict[str, Any] = {}
    for concept in config.concepts():
        records = prompt_records([concept], seed=ctx.seed, target=config.n_target, paraphrase=config.n_paraphrase,
                                 implicit=config.n_implicit, preservation_per_concept=config.preservation_per_concept)
        evaluate = lambda pipe, label: summarize(ctx.evaluate(  # noqa: E731
            pipe, f"{label}-{concept}", [concept], records, num_inference_steps=config.eval_steps,
            guidance_scale=config.guidance_scale), [concept])
        models = {"base": evaluate(ctx.pipeline(), "base")}
        for variant in VARIANTS:
            pipe = ctx.pipeline()
            apply_method(pipe, "esd", run_dir=ctx.run_dir(f"esd-{variant}-{concept}"), concepts=[concept],
                         variant=variant, eta=config.eta, ddim_steps=config.ddim_steps,
                         train_config=ctx.train_config(config.steps, config.lr))
            models[f"esd-{variant}"] = evaluate(pipe, f"esd-{variant}")
            ctx.log(f"[esd] ESD-{variant} on {concept}: {models[f'esd-{variant}']['erasure']}, "
                    f"preservation {models[f'esd-{variant}']['preservation']}")
        numbers[concept] = models
    return numbers


def checks(numbers: dict[str, Any], config: ESDClaimConfig) -> list[Check]:
    targeted, implicit = numbers[config.targeted_concept], numbers[config.implicit_concept]
    px, pu = targeted["esd-x"]["preservation"], targeted["esd-u"]["preservation"]
    tx, t_base = targeted["esd-x"]["erasure"]["target"], targeted["base"]["erasure"]["target"]
    ix, iu = implicit["esd-x"]["erasure"]["implicit"], implicit["esd-u"]["erasure"]["implicit"]
    i_base = implicit["base"]["erasure"]["implicit"]
    pu_implicit, p_base = implicit["esd-u"]["preservation"], implicit["base"]["preservation"]
    points = f"{100 * EFFECT:.0f} points"
    return [
        Check("ESD-x is more targeted than ESD-u (less interference with other concepts)",
              f"after erasing {config.targeted_concept!r}: ESD-x erased it (target detection ≥ {points} below the "
              "base model's) and its preservation accuracy (detector agreement with the prompted labels on "
              "preservation prompts) > ESD-u's",
              {"ESD-x preservation": px, "ESD-u preservation": pu, "ESD-x target detection": tx,
               "base target detection": t_base},
              compare(px, ">", pu) and below(tx, t_base, EFFECT)),
        Check("ESD-u is stronger on implicit prompts",
              f"after erasing {config.implicit_concept!r}: ESD-u's detection rate on implicit prompts (trigger "
              f"words only) is ≥ {points} below ESD-x's and the base model's, with ESD-u's preservation down by "
              f"≤ {100 * KEEP_DROP:.0f} points (docs/methods/esd.md's bar: a lower rate bought by damage is not "
              "erasure)",
              {"ESD-x implicit detection": ix, "ESD-u implicit detection": iu, "base implicit detection": i_base,
               "ESD-u preservation": pu_implicit, "base preservation": p_base},
              below(iu, ix, EFFECT) and below(iu, i_base, EFFECT)
              and dropped_at_most(pu_implicit, p_base, KEEP_DROP)),
    ]


def tables(numbers: dict[str, Any], config: ESDClaimConfig) -> list[Table]:
    out = []
    for concept, models in numbers.items():
        rows = [[name, m["erasure"]["target"], m["erasure"]["paraphrase"], m["erasure"]["implicit"], m["preservation"],
                 m["fid"], m["clip"]] for name, m in models.items()]
        out.append(Table(
            f"Erasing {concept!r}: ESD-x vs ESD-u ({config.steps} steps, lr {config.lr:g}, eta {config.eta:g})",
            ["model", "target det. ↓", "paraphrase det. ↓", "implicit det. ↓", "preservation ↑", "FID ↓",
             "CLIP ↑"],
            rows, formats=["text", "pct", "pct", "pct", "pct", "num", "num"],
            note=f"{config.n_target} target, {config.n_paraphrase} paraphrase, {config.n_implicit} implicit prompts "
                 f"(where the concept has them), {config.preservation_per_concept} preservation image(s) per shape and "
                 f"character; {config.eval_steps} DDIM steps, guidance {config.guidance_scale:g}."))
    return out


EXPERIMENT = Experiment(
    name="esd",
    title="ESD-x vs ESD-u",
    claim="ESD-x (cross-attention) is more targeted than ESD-u: it interferes less with other concepts; ESD-u "
          "(all but cross-attention) is stronger on implicit prompts that never name the concept.",
    source="Gandikota et al., Erasing Concepts from Diffusion Models (ICCV 2023), §4 and Fig. 3–5",
    profiles={"quick": QUICK, "full": FULL},
    run=run, checks=checks, tables=tables,
)
