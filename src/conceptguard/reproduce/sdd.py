"""SDD vs ESD on single- and multi-concept erasure (Kim et al., 2023, Tables 1–2).

The paper: self-distillation removes nudity more thoroughly than ESD while keeping image quality
(Table 1, single concept), and keeps that advantage when removing many concepts at once (Table 2,
the 20 I2P concepts). In the world: the halo (the nudity analogue, measured on target, paraphrase
and implicit prompts) alone, and several seen characters together. Each setting trains SDD and ESD
with the same step budget from the same base model and measures erasure (mean detection rate of
the erased concepts, lower is better) and preservation (detector agreement on preservation prompts).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from conceptguard.reproduce.common import (
    EFFECT,
    Check,
    Context,
    Experiment,
    Table,
    below,
    compare,
    prompt_records,
    summarize,
)

SETTINGS = ("single", "multi")


@dataclass(frozen=True)
class SDDClaimConfig:
    single_concept: str = "halo"
    multi_concepts: tuple[str, ...] = ("zorblat", "quimble", "fennix", "borvo", "tallix")
    # The paper's ESD baselines: ESD-u for nudity, ESD-x for named concepts.
    esd_variant_single: str = "u"
    esd_variant_multi: str = "x"
    esd_eta: float = 1.0
    esd_lr: float = 2e-4
    single_steps: int = 150
    multi_steps: int = 250  # the world setting of the SDD test (five characters)
    sdd_lr: float = 3e-4
    sdd_ema_decay: float = 0.99  # the paper's fast recipe's faster EMA, for a few hundred steps
    ddim_steps: int = 50
    n_target: int = 32
    n_paraphrase: int = 16
    n_implicit: int = 32
    n_target_multi: int = 16  # per concept
    preservation_per_concept: int = 4
    eval_steps: int = 25
    guidance_scale: float = 7.5

    def setting(self, name: str) -> tuple[list[str], str, int]:
        """(concepts, ESD variant, steps) of the single or multi setting."""
        if name == "single":
            return [self.single_concept], self.esd_variant_single, self.single_steps
        return list(self.multi_concepts), self.esd_variant_multi, self.multi_steps


# Quick: 30 steps at about five times the learning rates, an EMA horizon of ~10 steps, few images.
QUICK = SDDClaimConfig(multi_concepts=("zorblat", "quimble", "fennix"), single_steps=30, multi_steps=30, ddim_steps=10,
                       esd_lr=1e-3, sdd_lr=1.5e-3, sdd_ema_decay=0.9, n_target=8, n_paraphrase=0, n_implicit=8,
                       n_target_multi=4, preservation_per_concept=1,
                       eval_steps=10)
FULL = SDDClaimConfig()


def _erasure(summary: dict[str, Any]) -> float | None:
    """Mean detection over the groups the concepts have: %nude-like for one concept, mean for many."""
    values = [v for v in summary["erasure"].values() if v is not None]
    return sum(values) / len(values) if values else None


def run(config: SDDClaimConfig, ctx: Context) -> dict[str, Any]:
    from conceptguard.methods import apply_method

    numbers: dict[str, Any] = {}
    for setting in SETTINGS:
        concepts, esd_variant, steps = config.setting(setting)
        multi = setting == "multi"
        records = prompt_records(concepts, seed=ctx.seed,
                                 target=config.n_target_multi if multi else config.n_target,
                                 paraphrase=0 if multi else config.n_paraphrase,
                                 implicit=0 if multi else config.n_implicit,
                                 preservation_per_concept=config.preservation_per_concept)

        def evaluate(pipe, label: str) -> dict[str, Any]:
            summary = summarize(ctx.evaluate(pipe, f"{setting}-{label}", concepts, records,
                                             num_inference_steps=config.eval_steps,
                                             guidance_scale=config.guidance_scale), concepts)
            return {**summary, "erasure_mean": _erasure(summary)}

        models = {"base": evaluate(ctx.pipeline(), "base")}
        pipe = ctx.pipeline()
        apply_method(pipe, "esd", run_dir=ctx.run_dir(f"{setting}-esd"), concepts=concepts, variant=esd_variant,
                     eta=config.esd_eta, ddim_steps=config.ddim_steps,
                     train_config=ctx.train_config(steps, config.esd_lr))
        models[f"esd-{esd_variant}"] = evaluate(pipe, f"esd-{esd_variant}")
        pipe = ctx.pipeline()
        # The paper's fast recipe (constant lr, no warm-up) with AdamW, weight decay and clipping as its code.
        apply_method(pipe, "sdd", run_dir=ctx.run_dir(f"{setting}-sdd"), concepts=concepts,
                     ema_decay=config.sdd_ema_decay, ddim_steps=config.ddim_steps,
                     train_config=ctx.train_config(steps, config.sdd_lr, "adamw", weight_decay=1e-2,
                                                   max_grad_norm=1.0, lr_schedule="constant", warmup_steps=0))
        models["sdd"] = evaluate(pipe, "sdd")
        ctx.log(f"[sdd] {setting}: " + ", ".join(f"{k} erasure {v['erasure_mean']} preservation {v['preservation']}"
                                                 for k, v in models.items()))
        numbers[setting] = {"concepts": concepts, "esd": f"esd-{esd_variant}", "models": models}
    return numbers


def checks(numbers: dict[str, Any], config: SDDClaimConfig) -> list[Check]:
    out = []
    for setting in SETTINGS:
        entry = numbers[setting]
        esd_name, models = entry["esd"], entry["models"]
        esd, sdd = models[esd_name], models["sdd"]
        shown = "ESD-" + esd_name.split("-", 1)[1]  # esd-u -> ESD-u
        what = (f"{config.single_concept!r} alone" if setting == "single"
                else f"{len(entry['concepts'])} concepts together ({', '.join(entry['concepts'])})")
        label = "Table 1, single concept" if setting == "single" else "Table 2, multi-concept"
        base = models["base"]["erasure_mean"]
        out.append(Check(
            f"SDD erases at least as well as ESD ({label})",
            f"erasing {what}: SDD's mean detection rate of the erased concept(s) over their prompt groups ≤ "
            f"{shown}'s, and ≥ {100 * EFFECT:.0f} points below the base model's (two models that both fail to "
            "erase tie, but show nothing)",
            {"SDD erasure": sdd["erasure_mean"], f"{shown} erasure": esd["erasure_mean"], "base": base},
            compare(sdd["erasure_mean"], "<=", esd["erasure_mean"]) and below(sdd["erasure_mean"], base, EFFECT)))
        out.append(Check(
            f"SDD preserves other concepts at least as well as ESD ({label})",
            f"erasing {what}: SDD's preservation accuracy ≥ {shown}'s",
            {"SDD preservation": sdd["preservation"], f"{shown} preservation": esd["preservation"]},
            compare(sdd["preservation"], ">=", esd["preservation"])))
    return out


def tables(numbers: dict[str, Any], config: SDDClaimConfig) -> list[Table]:
    out = []
    for setting in SETTINGS:
        entry = numbers[setting]
        concepts = entry["concepts"]
        _, _, steps = config.setting(setting)
        if setting == "single":
            columns = ["model", "target det. ↓", "paraphrase det. ↓", "implicit det. ↓", "erasure (mean) ↓",
                       "preservation ↑", "FID ↓", "CLIP ↑"]
            rows = [[name, m["erasure"]["target"], m["erasure"]["paraphrase"], m["erasure"]["implicit"],
                     m["erasure_mean"], m["preservation"], m["fid"], m["clip"]] for name, m in entry["models"].items()]
            formats = ["text", "pct", "pct", "pct", "pct", "pct", "num", "num"]
        else:
            columns = (["model"] + [f"{c} det. ↓" for c in concepts]
                       + ["erasure (mean) ↓", "preservation ↑", "FID ↓", "CLIP ↑"])
            rows = [[name] + [m["detection"][c]["target"] for c in concepts]
                    + [m["erasure_mean"], m["preservation"], m["fid"], m["clip"]]
                    for name, m in entry["models"].items()]
            formats = ["text"] + ["pct"] * (len(concepts) + 2) + ["num", "num"]
        title = ("Single concept (Table 1 analogue): " if setting == "single" else "Multi-concept (Table 2 analogue): ")
        out.append(Table(
            title + f"{', '.join(concepts)} — SDD vs ESD-{entry['esd'].split('-', 1)[1]}, {steps} steps each",
            columns, rows, formats=formats,
            note=f"ESD lr {config.esd_lr:g} (Adam, eta {config.esd_eta:g}); SDD lr {config.sdd_lr:g} (AdamW, EMA "
                 f"{config.sdd_ema_decay:g}); x_t from {config.ddim_steps} DDIM steps. Evaluation: "
                 f"{config.eval_steps} DDIM steps, guidance {config.guidance_scale:g}."))
    return out


EXPERIMENT = Experiment(
    name="sdd",
    title="SDD vs ESD, single and multi-concept",
    claim="Safe self-distillation erases a concept at least as thoroughly as ESD while preserving other concepts "
          "at least as well, alone (nudity, Table 1) and with many concepts at once (I2P, Table 2).",
    source="Kim et al., Towards Safe Self-Distillation of Internet-Scale Text-to-Image Diffusion Models (2023), "
           "Tables 1–2",
    profiles={"quick": QUICK, "full": FULL},
    run=run, checks=checks, tables=tables,
)
