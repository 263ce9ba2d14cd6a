"""Stack defenses in one run: erase → immunize → guard, from one config, with one model card.

    from conceptguard.stack import load_stack_config, stack
    result = stack("embedded", load_stack_config("stack.yaml"), "protected/")

Each stage is optional; those given run in the fixed order erase, immunize, guard, each on the
previous stage's weights:

- **erase** — any registered method of kind ``erase`` (ESD, SDD, UCE) with its Config;
- **immunize** — any registered method of kind ``immunize`` (IMMA, MIMA) with its Config;
- **guard** — FreezeAsGuard mask learning (:func:`conceptguard.guard.mask.learn_mask`) on the
  erased and immunized model, so the mask is bound to the weights that are published.

The output folder is a standard method output (:func:`conceptguard.outputs.save_method_outputs`):
``pipeline/`` with the final weights, ``delta.safetensors`` against the *original* base model,
``README.md`` (a model card with one section per stage), ``manifest.json``, plus ``stack.json``
(every stage's record) and ``guard.safetensors`` (the mask, when there is a guard stage).

Run folder (default ``OUT.run``)::

    stack.json              the resolved stages and the base model's content hash
    stack_log.jsonl         one line per stage event: started, finished, reused
    <stage>/train/          the stage's training run (checkpoints, logs); resumes inside the stage
    <stage>/output/         erase/immunize: the stage's own method output (delta vs the stage's input)
    <stage>/guard.safetensors   guard: the mask
    <stage>/stage.json      the stage's record, written last: its presence marks the stage finished

With ``resume=True`` a finished stage is not run again: its delta is re-applied (checked against
the recorded input hash) or its mask reloaded; an unfinished one continues from its training
loop's newest checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from conceptguard.errors import ConceptGuardError

logger = logging.getLogger(__name__)

STAGES = ("erase", "immunize", "guard")
GUARD_METHOD = "freezeasguard"
STACK_FORMAT = "conceptguard-stack"
STACK_FILE = "stack.json"
LOG_FILE = "stack_log.jsonl"
STAGE_FILE = "stage.json"
MASK_FILE = "guard.safetensors"

# Keys a stage section of the config file may hold besides its Config's fields.
_METHOD_STAGE_KEYS = ("method", "train")
_GUARD_STAGE_KEYS = ("method", "train", "illegal", "innocent")


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


@dataclass
class MethodStage:
    """An erase or immunize stage: a registered method, its Config and TrainConfig overrides.

    ``config`` is the method's Config dataclass or a mapping of its fields (None: its defaults);
    ``train`` holds TrainConfig fields that replace the method's paper recipe (trained methods only).
    """

    method: str
    config: Any = None
    train: dict[str, Any] = field(default_factory=dict)


@dataclass
class GuardStage:
    """The FreezeAsGuard stage: illegal and innocent data folders, GuardConfig and TrainConfig overrides."""

    illegal: list[str] = field(default_factory=list)
    innocent: list[str] = field(default_factory=list)
    config: Any = None
    train: dict[str, Any] = field(default_factory=dict)
    method: str = GUARD_METHOD


@dataclass
class StackConfig:
    """Which stages to run (at least one); ``model`` is the default base model of a config file."""

    erase: MethodStage | None = None
    immunize: MethodStage | None = None
    guard: GuardStage | None = None
    model: str | None = None


def stack_config_from_dict(data: Mapping[str, Any], source: str = "stack config") -> StackConfig:
    """A :class:`StackConfig` from the config file's layout.

    Top level: ``model`` and one section per stage. An erase/immunize section holds ``method``,
    an optional ``train`` mapping and the method's Config fields, flat; the guard section holds
    ``illegal``, ``innocent``, an optional ``train`` mapping and GuardConfig fields, flat.
    """
    if not isinstance(data, Mapping):
        raise ConceptGuardError(f"{source} must be a mapping with sections {', '.join(STAGES)}")
    unknown = sorted(str(key) for key in data if key not in (*STAGES, "model"))
    if unknown:
        raise ConceptGuardError(
            f"unknown key(s) in {source}: {', '.join(unknown)}; known: model, {', '.join(STAGES)}")
    sections = {}
    for name in STAGES:
        section = data.get(name)
        if section is None:
            continue
        if not isinstance(section, Mapping):
            raise ConceptGuardError(f"{source}: the {name} section must be a mapping of option: value")
        values = {str(key).replace("-", "_"): value for key, value in section.items()}
        train = values.pop("train", None) or {}
        if not isinstance(train, Mapping):
            raise ConceptGuardError(f"{source}: {name}.train must be a mapping of TrainConfig options")
        if name == "guard":
            sections[name] = GuardStage(illegal=_as_list(values.pop("illegal", [])),
                                        innocent=_as_list(values.pop("innocent", [])),
                                        method=values.pop("method", GUARD_METHOD), config=values, train=dict(train))
        else:
            if "method" not in values:
                raise ConceptGuardError(f"{source}: the {name} section needs a method (e.g. method: esd)")
            sections[name] = MethodStage(method=str(values.pop("method")), config=values, train=dict(train))
    model = data.get("model")
    return StackConfig(**sections, model=None if model is None else str(model))


def load_stack_config(path: str | Path) -> StackConfig:
    """Read a stack config file (YAML or JSON; see :func:`stack_config_from_dict`)."""
    from conceptguard.config import load_config_file

    return stack_config_from_dict(load_config_file(path), source=f"config file {path}")


def _as_list(value: Any) -> list[str]:
    """Folder lists as strings; a single folder may be given on its own."""
    if value is None:
        return []
    return [str(item) for item in value] if isinstance(value, (list, tuple)) else [str(value)]


@dataclass
class _Stage:
    """One stage, resolved: built configs, checked before anything runs or is written."""

    name: str
    method: str
    config: Any  # the method's Config instance (GuardConfig for the guard stage)
    train: Any  # TrainConfig, or None for methods that do not train (UCE)
    spec: Any = None  # MethodSpec; None for the guard stage
    illegal: list[str] = field(default_factory=list)
    innocent: list[str] = field(default_factory=list)

    def record(self) -> dict[str, Any]:
        """What defines the stage's result; compared on resume, shown in the model card."""
        from conceptguard.config import config_to_dict

        record = {"stage": self.name, "method": self.method, "config": config_to_dict(self.config),
                  "train": config_to_dict(self.train) if self.train is not None else None}
        if self.name == "guard":
            record.update(illegal=self.illegal, innocent=self.innocent)
        return record


def _is_trained(config_cls: type) -> bool:
    # As in the erase/immunize CLI: trained methods declare their paper recipe as ``default_train``.
    return isinstance(getattr(config_cls, "default_train", None), dict)


def _build(config_cls: type, values: Any, where: str):
    from conceptguard.config import build_config

    if dataclasses.is_dataclass(values) and not isinstance(values, type):
        if not isinstance(values, config_cls):
            raise ConceptGuardError(f"{where}: expected a {config_cls.__name__}, got a {type(values).__name__}")
        return values
    try:
        return build_config(config_cls, cli_values=dict(values or {}))
    except ConceptGuardError as exc:
        raise ConceptGuardError(f"{where}: {exc}") from exc


def _train_config(defaults: Mapping[str, Any], values: Mapping[str, Any], where: str):
    from conceptguard.methods.trajectory import train_config_with_defaults

    try:
        return train_config_with_defaults(defaults, values)
    except ConceptGuardError as exc:
        raise ConceptGuardError(f"{where}.train: {exc}") from exc


def _check_folders(folders: list[str], what: str) -> None:
    for folder in folders:
        if not Path(folder).is_dir():
            raise ConceptGuardError(f"{what}: data folder not found: {folder}")


def _resolve_method_stage(name: str, stage: MethodStage) -> _Stage:
    from conceptguard.methods import methods

    registry = methods()
    of_kind = sorted(n for n, spec in registry.items() if spec.kind == name)
    if stage.method not in registry:
        raise ConceptGuardError(f"{name} stage: unknown method {stage.method!r}; {name} methods: {', '.join(of_kind)}")
    spec = registry[stage.method]
    if spec.kind != name:
        raise ConceptGuardError(
            f"{name} stage: {stage.method} is an {spec.kind} method, not an {name} method; "
            f"{name} methods: {', '.join(of_kind)}")
    config = _build(spec.config, stage.config, f"{name} stage ({spec.name})")
    # Fail now rather than after the earlier stages have trained for hours.
    if hasattr(config, "concepts") and not config.concepts:
        raise ConceptGuardError(f"{name} stage ({spec.name}) needs concepts: name the concept(s) to {name}")
    if hasattr(config, "data"):
        if not config.data:
            raise ConceptGuardError(f"{name} stage ({spec.name}) needs data: folder(s) of images of the concepts")
        _check_folders(list(config.data), f"{name} stage ({spec.name})")
    if _is_trained(spec.config):
        train = _train_config(spec.config.default_train, stage.train, name)
    elif stage.train:
        raise ConceptGuardError(f"{name} stage: {spec.name} does not train, so {name}.train does not apply")
    else:
        train = None
    return _Stage(name, spec.name, config, train, spec=spec)


def _resolve_guard_stage(stage: GuardStage) -> _Stage:
    from conceptguard.guard.mask import GuardConfig

    if stage.method != GUARD_METHOD:
        raise ConceptGuardError(f"guard stage: unknown method {stage.method!r}; guard methods: {GUARD_METHOD}")
    config = _build(GuardConfig, stage.config, "guard stage")
    for role in ("illegal", "innocent"):
        folders = _as_list(getattr(stage, role))
        if not folders:
            raise ConceptGuardError(f"guard stage needs {role}: folder(s) of images with captions of the {role} domain")
        _check_folders(folders, "guard stage")
    train = _train_config(GuardConfig.default_train, stage.train, "guard")
    if train.grad_accum != 1:
        raise ConceptGuardError("guard.train: mask learning takes one mask update per step; set grad_accum to 1")
    return _Stage("guard", GUARD_METHOD, config, train,
                  illegal=[str(Path(p).absolute()) for p in _as_list(stage.illegal)],
                  innocent=[str(Path(p).absolute()) for p in _as_list(stage.innocent)])


def resolve_stages(config: StackConfig) -> list[_Stage]:
    """Build and check every stage's configs, in run order; a ConceptGuardError on any problem."""
    if not isinstance(config, StackConfig):
        raise ConceptGuardError(f"expected a StackConfig, got {type(config).__name__}")
    stages = []
    for name in STAGES:
        stage = getattr(config, name)
        if stage is None:
            continue
        expected = GuardStage if name == "guard" else MethodStage
        if not isinstance(stage, expected):
            raise ConceptGuardError(f"{name} stage must be a {expected.__name__}, got {type(stage).__name__}")
        stages.append(_resolve_guard_stage(stage) if name == "guard" else _resolve_method_stage(name, stage))
    if not stages:
        raise ConceptGuardError(f"the stack config names no stage; give at least one of {', '.join(STAGES)}")
    return stages


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------


@dataclass
class StackResult:
    out: Path
    run_dir: Path
    pipe: Any  # the final pipeline (the caller's, edited in place, when one was passed)
    base_model_hash: str
    model_hash: str
    stages: list[dict[str, Any]]  # each stage's record, with "reused": whether this call ran it
    mask: Any = None  # GuardMask of the guard stage


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConceptGuardError(f"cannot read {path}: {exc}") from exc


def _log(run_dir: Path, stage: str, event: str, **extra: Any) -> None:
    line = json.dumps({"time": round(time.time(), 3), "stage": stage, "event": event, **extra}, default=str)
    with open(run_dir / LOG_FILE, "a") as handle:
        handle.write(line + "\n")
    logger.info(f"{stage}: {event}")


# TrainConfig fields that may differ when a finished stage is reused: they decide how a run is
# logged and checkpointed, not its result (the loop's resumable changes, less ``steps``).
def _cosmetic_train_fields() -> frozenset[str]:
    from conceptguard.training.loop import RESUMABLE_CHANGES

    return frozenset(key.split(".", 1)[1] for key in RESUMABLE_CHANGES) - {"steps"}


# The keys of a stage record that define its result (the rest is what running it produced).
_DEFINING_KEYS = ("stage", "method", "config", "train", "illegal", "innocent")


def _comparable(record: dict[str, Any]) -> dict[str, Any]:
    keep = {k: v for k, v in record.items() if k in _DEFINING_KEYS}
    if keep.get("train"):
        cosmetic = _cosmetic_train_fields()
        keep["train"] = {k: v for k, v in keep["train"].items() if k not in cosmetic}
    return json.loads(json.dumps(keep, default=str))


def _prepare_run_dir(run_dir: Path, stages: list[_Stage], base_hash: str, model_name: str, resume: bool) -> None:
    """Check that ``run_dir`` may hold (or continue) this stack, then write its ``stack.json``."""
    from conceptguard.outputs import atomic_write_json

    if run_dir.exists() and not run_dir.is_dir():
        raise ConceptGuardError(f"run folder {run_dir} exists and is not a folder")
    saved_path = run_dir / STACK_FILE
    leftovers = [p.name for p in (saved_path, *(run_dir / s for s in STAGES)) if p.exists()]
    if not resume and leftovers:
        raise ConceptGuardError(
            f"{run_dir} already holds a stack run ({', '.join(leftovers)}); continue it with --resume "
            "or choose another run folder")
    if resume and saved_path.is_file():
        saved = _read_json(saved_path)
        if saved.get("base_model_hash") != base_hash:
            raise ConceptGuardError(
                f"cannot resume {run_dir}: it was started from model {str(saved.get('base_model_hash'))[:16]}... "
                f"but this model hashes to {base_hash[:16]}...")
        saved_stages = ", ".join(f"{s.get('stage')} ({s.get('method')})" for s in saved.get("stages", []))
        now = ", ".join(f"{s.name} ({s.method})" for s in stages)
        if saved_stages != now:
            raise ConceptGuardError(
                f"cannot resume {run_dir} with other stages: saved {saved_stages or 'none'}; now {now}")
    for stage in stages:
        finished = run_dir / stage.name / STAGE_FILE
        if resume and finished.is_file() and _comparable(_read_json(finished)) != _comparable(stage.record()):
            raise ConceptGuardError(
                f"cannot resume {run_dir}: stage {stage.name} finished with another config; "
                "use the saved config or another run folder")
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(saved_path, {"format": STACK_FORMAT, "model": model_name, "base_model_hash": base_hash,
                                   "stages": [stage.record() for stage in stages]})


def _finished_record(stage: _Stage, stage_dir: Path, input_hash: str) -> dict[str, Any] | None:
    """The stage's saved record if it finished on this input; None if it did not finish."""
    path = stage_dir / STAGE_FILE
    if not path.is_file():
        return None
    saved = _read_json(path)  # its config was checked against this stage's by _prepare_run_dir
    if saved.get("input_hash") != input_hash:
        raise ConceptGuardError(
            f"cannot resume: stage {stage.name} in {stage_dir.parent} ran on model "
            f"{str(saved.get('input_hash'))[:16]}... "
            f"but its input now hashes to {input_hash[:16]}...")
    return saved


def _reuse(stage: _Stage, stage_dir: Path, pipe, saved: dict[str, Any], input_hash: str):
    """Bring ``pipe`` to a finished stage's output; returns the stage's mask (guard) or None."""
    from conceptguard.guard.maskfile import GuardMask
    from conceptguard.models.io import content_hash
    from conceptguard.outputs import DELTA_FILE, apply_delta

    if stage.name == "guard":
        mask = GuardMask.load(stage_dir / MASK_FILE)
        mask.check_model(pipe, input_hash)
        return mask
    apply_delta(pipe, stage_dir / "output" / DELTA_FILE, expected_base_hash=input_hash)
    if content_hash(pipe) != saved["output_hash"]:
        raise ConceptGuardError(
            f"cannot resume: stage {stage.name}'s saved delta in {stage_dir} does not reproduce its recorded output")
    return None


def _run_method_stage(stage: _Stage, stage_dir: Path, pipe, input_hash: str, model_name: str,
                      resume: bool) -> dict[str, Any]:
    from conceptguard.config import config_to_dict
    from conceptguard.models.io import model_components
    from conceptguard.outputs import DELTA_FILE, read_delta_metadata, save_method_outputs

    # The stage's input hash goes into the training run's config, so a checkpoint is never
    # resumed on other weights.
    resolved = {"model": model_name, "base_model_hash": input_hash, "stack_stage": stage.name}
    extra = {"train_config": stage.train, "resolved_config": dict(resolved)} if stage.train is not None else {}
    result = stage.spec.apply(pipe, stage.config, run_dir=stage_dir / "train", resume=resume, **extra)

    states = {name: module.state_dict() for name, module in model_components(pipe).items()}
    changed = {}
    for key in result.changed:
        component, _, name = key.partition(".")
        changed[key] = states[component][name]
    resolved[stage.method] = config_to_dict(stage.config)
    if stage.train is not None:
        resolved["train"] = config_to_dict(stage.train)
    output = save_method_outputs(pipe, stage_dir / "output", base_pipe_hash=input_hash, changed=changed,
                                 method=stage.method, config=resolved, summary=result.summary, overwrite=True)
    return {"summary": result.summary, "metrics": dict(result.metrics), "changed": sorted(changed),
            "changed_parameters": sum(t.numel() for t in changed.values()),
            "output_hash": read_delta_metadata(output / DELTA_FILE)["model_hash"]}


def _run_guard_stage(stage: _Stage, stage_dir: Path, pipe, input_hash: str, model_name: str,
                     resume: bool) -> tuple[dict[str, Any], Any]:
    from conceptguard.guard import mask as guard_mask

    # learn_mask gives the UNet its weights back when done: the mask is bound to ``input_hash``,
    # which is the model this stack publishes.
    result = guard_mask.learn_mask(pipe, stage.illegal, stage.innocent, stage_dir / "train", config=stage.config,
                                   train_config=stage.train, resume=resume, model_hash=input_hash,
                                   resolved_config={"model": model_name, "stack_stage": "guard"})
    result.mask.save(stage_dir / MASK_FILE)
    manifest = result.mask.manifest
    metrics = {"final_loss": result.train.final_loss, "steps": result.train.steps_done,
               "run_dir": str(result.train.run_dir)}
    metrics.update({key: manifest[key] for key in ("frozen_tensors", "total_tensors", "ratio_tensors",
                                                  "frozen_parameters", "ratio_parameters")})
    return {"summary": f"FreezeAsGuard learned which tensors to freeze: {result.mask.describe()}.",
            "metrics": metrics, "changed": [], "changed_parameters": 0, "output_hash": input_hash,
            "mask_sha256": result.mask.sha256}, result.mask


def stack(model: Any, config: StackConfig, out: str | Path, *, run_dir: str | Path | None = None,
          resume: bool = False, overwrite: bool = False, **load_options: Any) -> StackResult:
    """Run the stages of ``config`` on ``model`` and write the stacked output folder ``out``.

    ``model`` is a pipeline (edited in place) or anything :func:`~conceptguard.models.io.load_pipeline`
    takes (None: ``config.model``, else the embedded model; ``load_options`` go to ``load_pipeline``).
    Every stage's config is checked before any model is loaded or anything is written. The run
    folder (default ``OUT.run``) keeps each stage's outputs and training runs; with ``resume``
    finished stages are reused and an interrupted one continues from its newest checkpoint.
    """
    from conceptguard.models.io import content_hash, load_pipeline
    from conceptguard.outputs import atomic_write_json, check_output_target

    stages = resolve_stages(config)
    out = Path(out).expanduser().absolute()
    check_output_target(out, overwrite)  # fail before hours of training
    run_dir = Path(run_dir).expanduser().absolute() if run_dir else Path(f"{out}.run")

    if model is None:
        model = config.model or "embedded"
    if isinstance(model, (str, Path)):
        model_name = str(model)
        pipe = load_pipeline(model, **load_options)
    else:
        model_name, pipe = "<pipeline object>", model
    base_hash = content_hash(pipe)
    _prepare_run_dir(run_dir, stages, base_hash, model_name, resume)

    current_hash, mask, records = base_hash, None, []
    for stage in stages:
        stage_dir = run_dir / stage.name
        saved = _finished_record(stage, stage_dir, current_hash)
        if saved is not None:
            stage_mask = _reuse(stage, stage_dir, pipe, saved, current_hash)
            _log(run_dir, stage.name, "reused")
            record = dict(saved, reused=True)
        else:
            _log(run_dir, stage.name, "started")
            if stage.name == "guard":
                outcome, stage_mask = _run_guard_stage(stage, stage_dir, pipe, current_hash, model_name, resume)
            else:
                outcome, stage_mask = _run_method_stage(stage, stage_dir, pipe, current_hash, model_name, resume), None
            record = {**stage.record(), "input_hash": current_hash, **outcome}
            atomic_write_json(stage_dir / STAGE_FILE, record)  # last: marks the stage finished
            _log(run_dir, stage.name, "finished", output_hash=record["output_hash"])
            record = dict(record, reused=False)
        mask = stage_mask or mask
        current_hash = record["output_hash"]
        records.append(record)

    _write_stack_output(pipe, out, records, mask, base_hash=base_hash, model_name=model_name, overwrite=overwrite)
    _log(run_dir, "stack", "wrote", out=str(out), model_hash=current_hash)
    return StackResult(out=out, run_dir=run_dir, pipe=pipe, base_model_hash=base_hash, model_hash=current_hash,
                       stages=records, mask=mask)


# --------------------------------------------------------------------------------------------
# The stacked output and its model card
# --------------------------------------------------------------------------------------------


def _write_stack_output(pipe, out: Path, records: list[dict[str, Any]], mask, *, base_hash: str, model_name: str,
                        overwrite: bool) -> Path:
    from conceptguard.models.io import model_components
    from conceptguard.outputs import save_method_outputs

    # The delta against the original base holds every tensor any stage changed, at its final value:
    # applied to the base it gives the final weights whatever order the stages changed them in.
    states = {name: module.state_dict() for name, module in model_components(pipe).items()}
    names = sorted({key for record in records for key in record["changed"]})
    changed = {key: states[key.partition(".")[0]][key.partition(".")[2]] for key in names}
    stage_records = [{k: v for k, v in record.items() if k != "reused"} for record in records]
    extra_files = {STACK_FILE: (json.dumps({"format": STACK_FORMAT, "model": model_name, "base_model_hash": base_hash,
                                            "stages": stage_records}, indent=2, default=str) + "\n").encode()}
    if mask is not None:
        extra_files[MASK_FILE] = Path(mask.path).read_bytes()
    config = {"model": model_name, "stages": [r["stage"] for r in records]}
    config.update({r["stage"]: {k: r[k] for k in _DEFINING_KEYS[1:] if k in r} for r in records})
    return save_method_outputs(pipe, out, base_pipe_hash=base_hash, changed=changed, method="stack", config=config,
                               summary=stack_card_section(records), overwrite=overwrite, extra_files=extra_files)


_CARD_NAMES_LIMIT = 8  # changed tensors named per stage in the card; stack.json has them all


def _yaml_block(value: Any) -> list[str]:
    import yaml

    return ["```yaml", yaml.safe_dump(json.loads(json.dumps(value, default=str)), sort_keys=True).rstrip(), "```"]


def stack_card_section(records: list[dict[str, Any]]) -> str:
    """The model card's account of the stages: method, config, changes, summary, metrics, hashes."""
    chain = " → ".join(f"{r['stage']} (`{r['method']}`)" for r in records)
    lines = [f"Defenses stacked by `conceptguard stack`, in this order: {chain}. Each stage ran on the previous "
             "stage's weights (its model hash in is the previous stage's hash out); `delta.safetensors` holds every "
             "tensor any stage changed, against the original base model.", "", "## Stages", ""]
    for number, record in enumerate(records, 1):
        lines += [f"### {number}. {record['stage']}: `{record['method']}`", "", record["summary"].strip(), "",
                  f"- model hash in: `{record['input_hash']}`",
                  f"- model hash out: `{record['output_hash']}`"]
        if record["stage"] == "guard":
            lines += [f"- changed: no weights; the mask `{MASK_FILE}` freezes "
                      f"{record['metrics']['frozen_tensors']}/{record['metrics']['total_tensors']} UNet tensors and "
                      "is bound to the output hash, so it is enforced on this folder's `pipeline/`:",
                      "", "  ```bash",
                      f"  conceptguard finetune --model pipeline/ --guard {MASK_FILE} --data DATA --out tuned/",
                      "  ```"]
        else:
            names = record["changed"]
            shown = ", ".join(f"`{n}`" for n in names[:_CARD_NAMES_LIMIT])
            more = f", ... and {len(names) - _CARD_NAMES_LIMIT} more (all in `{STACK_FILE}`)" \
                if len(names) > _CARD_NAMES_LIMIT else ""
            lines.append(f"- changed: {len(names)} tensors, {record['changed_parameters']:,} parameters"
                         + (f": {shown}{more}" if names else ""))
        metrics = {k: v for k, v in record.get("metrics", {}).items() if k != "run_dir"}
        if metrics:
            lines.append("- metrics: " + ", ".join(f"{k} {_metric(v)}" for k, v in sorted(metrics.items())))
        settings = {"config": record["config"]}
        if record.get("train") is not None:
            settings["train"] = record["train"]
        for role in ("illegal", "innocent"):
            if role in record:
                settings[role] = record[role]
        # Collapsed (on the Hub and GitHub): every option, defaults included, is long.
        lines += ["", "<details><summary>configuration</summary>", "", *_yaml_block(settings), "", "</details>", ""]
    return "\n".join(lines)


def _metric(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


__all__ = ["GuardStage", "MethodStage", "StackConfig", "StackResult", "load_stack_config", "resolve_stages", "stack",
           "stack_card_section", "stack_config_from_dict"]
