"""What every reproduction experiment shares: the result types, the verdict helpers and the context
an experiment runs in (the embedded world's model, its detector, run folders, evaluation).

An experiment is a function ``run(config, ctx) -> numbers`` over a small frozen Config dataclass
(one instance per profile, ``quick`` and ``full``), plus two *pure* functions of those numbers:
``checks(numbers, config)`` — the paper's claims, each with its exact criterion and a verdict — and
``tables(numbers, config)`` — what ``docs/results.md`` shows. Verdicts never see anything but the
measured numbers, so a test can feed them synthetic ones.
"""

from __future__ import annotations

import copy
import operator
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# --------------------------------------------------------------------------------------------
# Results: checks (claims with verdicts) and tables
# --------------------------------------------------------------------------------------------


@dataclass
class Check:
    """One claim of a paper, decided by a stated criterion on measured numbers."""

    claim: str
    criterion: str
    values: dict[str, float | None]
    passed: bool
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Table:
    """A table of docs/results.md; cells are numbers (shown as given by ``formats``), text or None."""

    title: str
    columns: list[str]
    rows: list[list[Any]]
    note: str = ""
    # Per column: "pct" (a share shown in %), "num" (4 significant digits) or "text".
    formats: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_OPS: dict[str, Callable[[float, float], bool]] = {
    "<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge}


# The smallest difference of detection rates a claim counts as an effect: 25 points, the bar of the
# world's method tests (docs/methods/esd.md). Rates come from 16-32 images, where one image is 3-6
# points: a claim must not be "reproduced" by one image more or less.
EFFECT = 0.25
# What an erasure may cost in preservation accuracy before a lower detection rate counts as damage
# rather than erasure (the same tests' bar).
KEEP_DROP = 0.10


def compare(a: float | None, op: str, b: float | None) -> bool:
    """``a op b``; a number that was not measured (None) never satisfies a claim."""
    if a is None or b is None:
        return False
    return _OPS[op](a, b)


def below(a: float | None, b: float | None, margin: float) -> bool:
    """``a`` at least ``margin`` below ``b`` (up to rounding); None never satisfies a claim."""
    return a is not None and b is not None and a <= b - margin + 1e-9


def dropped_at_most(value: float | None, base: float | None, drop: float) -> bool:
    """``value`` at most ``drop`` below ``base``."""
    return below(base, value, -drop)


def verdict(checks: Sequence[Check]) -> str:
    """A claim is reproduced when every one of its checks passed."""
    return "reproduced" if checks and all(c.passed for c in checks) else "not reproduced"


def pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


# --------------------------------------------------------------------------------------------
# The experiment registry entry
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Experiment:
    """A reproduction experiment: its claim, its two profiles and the functions that run and judge it."""

    name: str
    title: str
    claim: str  # the paper's claim, in one or two sentences
    source: str  # paper and table
    profiles: dict[str, Any]  # "quick" / "full" -> Config instance
    run: Callable[[Any, "Context"], dict[str, Any]]
    checks: Callable[[dict[str, Any], Any], list[Check]]
    tables: Callable[[dict[str, Any], Any], list[Table]]
    # The names of the experiment's independent stages (Context.stage), when it has several: with
    # ``reproduce --jobs N`` each may be computed in its own process (``run`` must then leave out the
    # stages that ``ctx.skips``), and the experiment is then assembled from its finished stages.
    parts: Callable[[Any], list[str]] | None = None


# --------------------------------------------------------------------------------------------
# The context an experiment runs in
# --------------------------------------------------------------------------------------------


class World:
    """The embedded world's model and detector, loaded once and shared by every experiment.

    Experiments edit pipelines in place, so each gets a deep copy of the loaded base (a fraction of a
    second for the tiny world, against seconds for loading it from disk again).
    """

    def __init__(self, pipe=None, detector=None):
        from conceptguard.models.io import content_hash
        from conceptguard.world import load_detector, load_embedded_pipeline

        self.pipe = pipe if pipe is not None else load_embedded_pipeline()
        self.detector = detector if detector is not None else load_detector()
        self.content_hash = content_hash(self.pipe)

    def pipeline(self):
        return copy.deepcopy(self.pipe)


class Context:
    """Where one experiment works: ``root/<name>/`` holds its run folders, data and evaluations.

    ``report_runs`` collects the evaluation and attack folders that ``conceptguard report`` reads.
    ``stages`` is the folder where :meth:`stage` keeps the finished parts of an experiment (None: keep
    nothing); ``resuming`` says that the folder holds an interrupted run of this very experiment (same
    profile, config, seed and base model), whose finished parts may be reused. ``only`` names the one
    stage this process computes while other processes compute the others (``Experiment.parts``).
    """

    def __init__(self, world: World, work_dir: str | Path, *, seed: int, name: str, log: Callable[[str], None] = print,
                 stages: str | Path | None = None, resuming: bool = False, only: str | None = None):
        self.world, self.seed, self.name, self.log = world, seed, name, log
        self.work_dir = Path(work_dir)
        self.report_runs: list[Path] = []
        self.stages = Path(stages) if stages is not None else None
        self.resuming = resuming
        self.only = only
        self.reused_parts = 0  # finished parts of an interrupted run taken as they were
        # What the reused parts cost when they were computed; parts saved without their times are counted.
        self.reused_seconds = self.reused_cpu_seconds = 0.0
        self.untimed_parts = 0

    def skips(self, name: str) -> bool:
        """Whether stage ``name`` is left to another process (``run`` must not compute it here)."""
        return self.only is not None and name != self.only

    def stage(self, name: str, compute: Callable[[], Any]) -> Any:
        """``compute()``, or its saved value when an interrupted run of this experiment finished it.

        A stage is a part of an experiment whose numbers depend only on the experiment's config and seed
        (a row of the attack matrix, one task of the immunize claim): reused, it gives exactly what
        running it again would. The run folders it added to the report are added again, in order.
        """
        import json
        import time

        from conceptguard.outputs import atomic_write_json

        path = self.stages / f"{name}.json" if self.stages is not None else None
        if path is not None and self.resuming and path.is_file():
            saved = json.loads(path.read_text())
            self.report_runs += [self.work_dir / run for run in saved["runs"]]
            self.reused_parts += 1
            if "cpu_seconds" in saved:
                self.reused_seconds += saved["seconds"]
                self.reused_cpu_seconds += saved["cpu_seconds"]
            else:  # saved by a version that did not time its parts
                self.untimed_parts += 1
            self.log(f"[{self.name}] {name}: reusing the finished part in {path}")
            return saved["value"]
        if self.skips(name):
            from conceptguard.errors import ConceptGuardError

            raise ConceptGuardError(f"{self.name}: stage {name!r} belongs to another process (this one computes "
                                    f"{self.only!r}); the experiment's run must leave out the stages ctx.skips")
        first_run = len(self.report_runs)
        started, cpu_started = time.perf_counter(), time.process_time()
        # Through JSON, as a reused value comes back: the result is then the same either way.
        value = json.loads(json.dumps(compute(), default=str))
        if path is not None:
            runs = [str(run.relative_to(self.work_dir)) for run in self.report_runs[first_run:]]
            atomic_write_json(path, {"value": value, "runs": runs, "seconds": round(time.perf_counter() - started, 1),
                                     "cpu_seconds": round(time.process_time() - cpu_started, 1)})
        return value

    # --- models and data ---------------------------------------------------------------------

    def pipeline(self):
        """A fresh copy of the base model (the caller may edit it)."""
        return self.world.pipeline()

    @property
    def detector(self):
        return self.world.detector

    def run_dir(self, *parts: str) -> Path:
        """An empty run folder (training runs refuse folders with an earlier run's checkpoints)."""
        path = self.work_dir.joinpath("runs", *parts)
        shutil.rmtree(path, ignore_errors=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def data_folder(self, name: str, n: int, seed: int, split: str, **fixed: str) -> Path:
        """``n`` rendered world images (+ captions) of ``split`` pinned to ``fixed``, as a folder.

        A folder already rendered with the same settings is reused: the processes that compute an
        experiment's parts at once share it (the lock makes one render it while the others wait).
        """
        import json

        from filelock import FileLock

        from conceptguard.errors import ConceptGuardError
        from conceptguard.outputs import atomic_write_text
        from conceptguard.world.dataset import export_folder, generate

        folder = self.work_dir / "data" / name
        # Beside the folder, not in it: a data folder holds only what its loaders read.
        spec_file = folder.with_name(f".{name}.spec")
        spec = json.dumps({"n": n, "seed": seed, "split": split, **fixed}, sort_keys=True)
        folder.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(folder.with_name(f".{name}.lock")):
            found = spec_file.read_text() if spec_file.is_file() else None
            if found == spec and folder.is_dir():
                return folder
            if found is not None and self.only is not None:  # another part may be reading it right now
                raise ConceptGuardError(f"{self.name}: parts of the experiment render data folder {name!r} with "
                                        "different settings; parts that run at once must share their data folders")
            spec_file.unlink(missing_ok=True)  # written last: its presence means the folder is complete
            shutil.rmtree(folder, ignore_errors=True)
            export_folder(generate(n, seed=seed, split=split, **fixed), folder)
            atomic_write_text(spec_file, spec)
        return folder

    def train_config(self, steps: int, lr: float, optimizer: str = "adam", **values: Any):
        """A quiet, seeded TrainConfig that checkpoints only at the end (resume is per experiment)."""
        from conceptguard.training.loop import TrainConfig

        values = {"max_grad_norm": 0.0, **values}
        return TrainConfig(steps=steps, lr=lr, optimizer=optimizer, seed=self.seed, checkpoint_every=steps,
                           keep_checkpoints=1, log_every=max(1, steps // 10), progress=False, **values)

    # --- measurements ------------------------------------------------------------------------

    def evaluate(self, pipe, label: str, erase: Sequence[str], records, *, num_inference_steps: int,
                 guidance_scale: float = 7.5) -> dict[str, Any]:
        """Run the evaluation harness on ``records``; returns the model's metrics summary.

        The run folder (``eval/<experiment>-<label>``, results.json + images) goes into the report.
        """
        from conceptguard.evaluation.harness import evaluate
        from conceptguard.evaluation.sources import PipelineSource

        name = f"{self.name}-{label}"
        out = self.work_dir / "eval" / name
        results = evaluate(PipelineSource(pipe, name=name), erase=list(erase), prompt_set=list(records),
                           seed=self.seed, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                           batch_size=64, out_dir=out, scorer="world", overwrite=True)
        self.report_runs.append(out)
        return results["metrics"]["model"]

    def relearn(self, pipe, label: str, *, kind: str, concept: str, data, steps: int, lr: float,
                checkpoints: Sequence[int], eval: "CurveSettings", chart: str, legend: str | None = None,
                optimizer: str = "adamw", **attack: Any) -> dict[str, Any]:
        """A re-learning attack with its recovery curve (``attacks.relearn_attack``) on ``pipe``
        (edited in place); returns the ``attack.json`` record. ``attack`` sets RelearnConfig fields.

        ``label`` names the run folder (``attacks/<label>``); ``chart`` and ``legend`` tell the report
        which recovery chart the curve belongs to and what to call it (one chart per attack kind, say,
        one line per defense).
        """
        from conceptguard.attacks.curves import GenerationSettings, world_prompts
        from conceptguard.attacks.relearn import RelearnConfig, relearn_attack

        out = self.work_dir / "attacks" / label
        shutil.rmtree(out, ignore_errors=True)
        _, record = relearn_attack(
            pipe, data, concept, out, config=RelearnConfig(kind=kind, **attack),
            train_config=self.train_config(steps, lr, optimizer, max_grad_norm=1.0),
            checkpoints=checkpoints, prompts=world_prompts(concept, eval.prompts, self.seed),
            settings=GenerationSettings(eval.steps, eval.guidance_scale, batch_size=64), model_name=label,
            extra_record={"chart": chart, "label": legend or label})
        # The attacked model's checkpoint is tens of MB per attack and nothing reads it: keep the curve only.
        shutil.rmtree(out / "train" / "checkpoints", ignore_errors=True)
        self.report_runs.append(out)
        return record


@dataclass(frozen=True)
class CurveSettings:
    """How a recovery curve is measured: ``prompts`` seeded target prompts of the concept, generated
    with ``steps`` DDIM steps at ``guidance_scale``, read by the world's detector."""

    prompts: int = 16
    steps: int = 10
    guidance_scale: float = 7.5


def curve_summary(record: dict[str, Any]) -> dict[str, Any]:
    """What a claim keeps of an attack record: the curve and the detection without / after the attack."""
    return {"curve": [[p["step"], p["detection"]] for p in record["curve"]],
            "no_attack": record["asr"]["no_attack"], "attack": record["asr"]["attack"], "step": record["asr"]["step"]}


# --------------------------------------------------------------------------------------------
# Prompt sets and readings of the harness's metrics
# --------------------------------------------------------------------------------------------


def prompt_records(concepts: Sequence[str], *, seed: int, target: int, paraphrase: int = 0, implicit: int = 0,
                   preservation_per_concept: int = 0):
    """A small evaluation set built like the harness's ``quick`` set, with chosen sizes per group.

    Per concept ``target``/``paraphrase``/``implicit`` prompts (groups that do not exist for a concept
    are skipped: only the halo has implicit prompts, characters have no paraphrases), then the
    preservation prompts (``preservation_per_concept`` per shape and character) minus the scenes that
    show an erased concept. Seeds are the harness's, so a prompt gets the same image here as there.
    """
    from dataclasses import replace

    from conceptguard.evaluation.prompts import concept_prompts, preservation_prompts

    counts = {"target": target, "paraphrase": paraphrase, "implicit": implicit}
    records = [r for group, n in counts.items() if n for concept in concepts
               for r in concept_prompts(concept, group, n, seed)]
    if preservation_per_concept:
        records += preservation_prompts(preservation_per_concept, seed, exclude=concepts)
    return [replace(r, case_number=i) for i, r in enumerate(records)]


def detection(metrics: dict[str, Any], group: str, concept: str) -> float | None:
    """Share of ``group``'s images of ``concept`` in which the detector finds it (None: no such prompts)."""
    return metrics.get("groups", {}).get(group, {}).get("detection", {}).get(concept)


def summarize(metrics: dict[str, Any], concepts: Sequence[str]) -> dict[str, Any]:
    """The numbers a claim needs from one evaluation: detection per concept and group, their mean
    over concepts (``erasure``, per group), preservation accuracy, FID and mean CLIP score."""
    groups = ("target", "paraphrase", "implicit")
    per_concept = {c: {g: detection(metrics, g, c) for g in groups} for c in concepts}
    erasure = {}
    for g in groups:
        values = [per_concept[c][g] for c in concepts if per_concept[c][g] is not None]
        erasure[g] = sum(values) / len(values) if values else None
    clip = [e["clip_score"] for e in metrics.get("groups", {}).values() if e.get("clip_score") is not None]
    return {
        "detection": per_concept,
        "erasure": erasure,
        "preservation": (metrics.get("preservation") or {}).get("accuracy"),
        "fid": (metrics.get("fid") or {}).get("value"),
        "clip": round(sum(clip) / len(clip), 6) if clip else None,
    }
