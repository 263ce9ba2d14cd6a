"""FreezeAsGuard vs Random-ρ vs Full FT vs UCE vs IMMA across freeze ratios (Ye et al., 2024, Tables 2/4).

The table itself is :func:`conceptguard.guard.table.run_table`: an attacker fine-tunes the published
model on held-out characters (illegal), an innocent user on a held-out design family, under Full FT,
Random-ρ and FreezeAsGuard-ρ. The unlearning baselines of the paper run through the same function on
an edited model with no mask (``methods=[]``), so their "Full FT" row is "UCE, then fine-tuned" and
"IMMA, then fine-tuned": the same attacker, data, steps and measurements.

The paper: at every ratio FreezeAsGuard mitigates the illegal adaptation better than Random-ρ, Full
FT and the unlearning baselines (which cannot stop re-learning from new data), while the innocent
domain still adapts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from conceptguard.reproduce.common import Check, Context, Experiment, Table, compare

BASELINES = ("uce", "imma")


@dataclass(frozen=True)
class GuardClaimConfig:
    # TableConfig fields (conceptguard.guard.table); the seed is the run's.
    table: dict[str, Any] = field(default_factory=lambda: {"ratios": [0.1, 0.2, 0.3], "finetune_steps": 300})
    imma_steps: int = 40
    imma_lr: float = 1e-4
    imma_inner_lr: float = 1e-3
    imma_adaptation: str = "finetune"  # the table's attacker fine-tunes every tensor
    innocent_floor: float = 0.9  # docs/guard.md's bar: the innocent domain keeps ≥ 90% of Full FT's agreement

    def table_config(self, seed: int, **overrides: Any):
        from conceptguard.guard.table import TableConfig

        return TableConfig(**{**self.table, **overrides, "seed": seed})


QUICK = GuardClaimConfig(
    # A larger learning rate, so that 30 steps teach the characters something at all.
    table={"ratios": [0.3], "publisher_images": 8, "user_images": 8, "finetune_steps": 30, "finetune_lr": 1e-3,
           "eval_images": 4, "eval_steps": 10, "mask_steps": 8, "init_steps": 10, "inner_steps": 2, "mask_batch": 2},
    imma_steps=5)
FULL = GuardClaimConfig()


def _baseline_pipeline(name: str, config: GuardClaimConfig, table_config, ctx: Context):
    """The base model edited by UCE (erasing the illegal characters) or IMMA (immunized against
    fine-tuning on the publisher's images of them)."""
    from conceptguard.methods import apply_method

    pipe = ctx.pipeline()
    concepts = list(table_config.illegal_characters)
    if name == "uce":
        apply_method(pipe, "uce", run_dir=ctx.run_dir("uce"), concepts=concepts)
    else:
        folders = [str(ctx.data_folder(f"publisher-{c}", table_config.publisher_images, table_config.seed + 100,
                                       "held_out_characters", character=c)) for c in concepts]
        apply_method(pipe, "imma", run_dir=ctx.run_dir("imma"), concepts=concepts, data=folders,
                     adaptation=config.imma_adaptation, inner_lr=config.imma_inner_lr,
                     inner_batch_size=table_config.finetune_batch,
                     train_config=ctx.train_config(config.imma_steps, config.imma_lr))
    return pipe


def run(config: GuardClaimConfig, ctx: Context) -> dict[str, Any]:
    from conceptguard.guard.table import run_table, table_rows

    table_config = config.table_config(ctx.seed)
    log = lambda text: ctx.log(text)  # noqa: E731
    # The table keeps its finished cells (keyed by its config and base model): a resumed run reuses them.
    fresh = not ctx.resuming
    ctx.reused_parts += sum(not fresh and (ctx.work_dir / table / "results.json").is_file()
                            for table in ["table"] + [f"table-{name}" for name in BASELINES])
    main = run_table(ctx.pipeline(), ctx.detector, ctx.work_dir / "table", table_config, fresh=fresh, log=log)
    rows = table_rows(main, table_config)
    full_innocent = next(r["innocent"] for r in rows if r["key"] == "full")
    baseline_config = config.table_config(ctx.seed, methods=[])
    for name in BASELINES:
        pipe = _baseline_pipeline(name, config, table_config, ctx)
        results = run_table(pipe, ctx.detector, ctx.work_dir / f"table-{name}", baseline_config, fresh=fresh, log=log)
        for row in table_rows(results, baseline_config):
            label = {"pretrained": f"{name.upper()} (no fine-tuning)", "full": f"{name.upper()} + Full FT"}[row["key"]]
            rows.append({**row, "method": label, "key": f"{name}-{row['key']}"})
    for row in rows:  # every row's innocent agreement as a share of the plain model's Full FT
        known = row["innocent"] is not None and full_innocent
        row["innocent_kept"] = row["innocent"] / full_innocent if known else None
    keep = ("method", "key", "ratio", "ratio_tensors", "ratio_parameters", "illegal", "innocent", "innocent_kept")
    return {"rows": [{k: row.get(k) for k in keep} for row in rows]}


def _row(numbers: dict[str, Any], key: str, ratio: float | None = None) -> dict[str, Any]:
    """The row of ``key`` (``full``, ``uce-full``...) or, with a ratio, of method ``key`` at that ratio."""
    for row in numbers["rows"]:
        if (row["key"] == key if ratio is None else row["key"].startswith(f"{key}-") and row["ratio"] == ratio):
            return row
    return {"method": f"{key} {ratio if ratio is not None else ''}".strip()}


def checks(numbers: dict[str, Any], config: GuardClaimConfig) -> list[Check]:
    ratios = config.table_config(0).ratios
    fag = {r: _row(numbers, "freezeasguard", r) for r in ratios}
    rnd = {r: _row(numbers, "random", r) for r in ratios}
    baselines = {"Full FT": _row(numbers, "full"), "UCE + Full FT": _row(numbers, "uce-full"),
                 "IMMA + Full FT": _row(numbers, "imma-full")}

    vs_random = {}
    for r in ratios:
        vs_random[fag[r]["method"]] = fag[r].get("illegal")
        vs_random[rnd[r]["method"]] = rnd[r].get("illegal")
    vs_baselines = {fag[r]["method"]: fag[r].get("illegal") for r in ratios}
    vs_baselines.update({name: row.get("illegal") for name, row in baselines.items()})
    kept = {fag[r]["method"]: fag[r].get("innocent_kept") for r in ratios}
    full_innocent = baselines["Full FT"].get("innocent")
    kept_note = ("Full FT's innocent agreement is 0: the share it keeps is undefined (the innocent domain was not "
                 "learned at all)" if full_innocent == 0 else "")
    return [
        Check("FreezeAsGuard mitigates the illegal adaptation better than freezing at random (Table 2)",
              "at every ratio ρ: illegal detection (the attacker's characters recognized after fine-tuning) of "
              "FreezeAsGuard-ρ < Random-ρ",
              vs_random, all(compare(fag[r].get("illegal"), "<", rnd[r].get("illegal")) for r in ratios)),
        Check("FreezeAsGuard beats Full FT and the unlearning baselines UCE and IMMA (Tables 2/4)",
              "at every ratio ρ: illegal detection of FreezeAsGuard-ρ < that of Full FT, UCE + Full FT and "
              "IMMA + Full FT",
              vs_baselines, all(compare(fag[r].get("illegal"), "<", row.get("illegal"))
                                for r in ratios for row in baselines.values())),
        Check("The innocent domain still adapts under FreezeAsGuard",
              f"at every ratio ρ: FreezeAsGuard-ρ keeps ≥ {100 * config.innocent_floor:g}% of Full FT's innocent "
              "design agreement",
              kept, all(compare(fag[r].get("innocent_kept"), ">=", config.innocent_floor) for r in ratios), kept_note),
    ]


def tables(numbers: dict[str, Any], config: GuardClaimConfig) -> list[Table]:
    table_config = config.table_config(0)
    rows = [[r["method"], r["ratio_tensors"], r["ratio_parameters"], r["illegal"], r["innocent"], r["innocent_kept"]]
            for r in numbers["rows"]]
    return [Table(
        "FreezeAsGuard vs Random vs Full FT vs UCE vs IMMA (Table 2/4 analogue)",
        ["method", "frozen tensors", "frozen params", "illegal detection ↓", "innocent agreement ↑",
         "innocent kept ↑"], rows, formats=["text", "pct", "pct", "pct", "pct", "pct"],
        note=f"Illegal: {', '.join(table_config.illegal_characters)} ({table_config.eval_images} images each); "
             "innocent: "
             f"{table_config.innocent_domain} designs ({table_config.eval_images} per design). Attacker and user: "
             f"{table_config.finetune_steps} Adam steps, lr {table_config.finetune_lr:g}, batch "
             f"{table_config.finetune_batch}, {table_config.user_images} images per character/domain. Masks: "
             f"{table_config.mask_steps} updates ({table_config.mask_optimizer}, lr {table_config.mask_lr:g}). UCE "
             f"erases the characters' names; IMMA ({config.imma_steps} steps, against {config.imma_adaptation}) "
             "immunizes against the publisher's images of them. 'kept' is a share of the plain model's Full FT.")]


EXPERIMENT = Experiment(
    name="guard",
    title="FreezeAsGuard vs Random vs Full FT vs UCE vs IMMA",
    claim="Freezing a learned share of the UNet's tensors mitigates fine-tuning into an illegal domain better than "
          "random freezing, full fine-tuning and the unlearning baselines UCE and IMMA at every freeze ratio, while "
          "an innocent domain still adapts.",
    source="Ye et al., FreezeAsGuard (2024), Tables 2 and 4",
    profiles={"quick": QUICK, "full": FULL},
    run=run, checks=checks, tables=tables,
)
