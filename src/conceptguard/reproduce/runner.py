"""Run the reproduction experiments, cache each result, and write docs/results.md and the HTML report.

Run folder (``--out``, default ``runs/reproduce``)::

    <experiment>/result.json   config, seed, base model hash, numbers, checks and verdict (no timings:
                               a second run with the same seed writes the same bytes)
    <experiment>/timing.json   wall-clock seconds of the experiment
    <experiment>/eval|attacks  evaluation and attack run folders (read by ``conceptguard report``)
    <experiment>/report.html   the experiment's HTML report
    report.html                one HTML report over every experiment's runs

An experiment's result is reused (``resume``) when its ``result.json`` was made with the same
profile, config, seed and base model; otherwise it runs again. An interrupted experiment leaves its
finished parts in ``<experiment>/stages/`` (``Context.stage``: the attack matrix's rows, the immunize
claim's tasks, with the guard table's own finished cells): resumed with the same fingerprint, it runs
only the rest, and its numbers are those of an uninterrupted run. Any other folder is cleared first.
With ``jobs`` > 1 the parts of an experiment that declares them (``Experiment.parts``) are computed by
separate processes into the same ``stages/`` folder, and the experiment is assembled from them.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import platform
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from conceptguard.errors import ConceptGuardError
from conceptguard.reproduce.common import Check, Context, Experiment, Table, World, verdict

# One module per claim, in the order of docs/results.md; each defines EXPERIMENT.
EXPERIMENT_MODULES = (
    "conceptguard.reproduce.esd",
    "conceptguard.reproduce.sdd",
    "conceptguard.reproduce.guard",
    "conceptguard.reproduce.immunize",
    "conceptguard.reproduce.attacks",
)
PROFILES = ("quick", "full")
RESULT_FORMAT = "conceptguard-reproduce"
RESULT_VERSION = 1
# Bumped when a code change alters what an experiment measures (2: LoRA attacks seeded from the run's seed), so
# that --resume never reuses a result or a finished part measured by older code.
NUMBERS_VERSION = 2
RESULT_FILE = "result.json"
TIMING_FILE = "timing.json"
# An unfinished experiment's finished parts (Context.stage), with the fingerprint of the run that made them.
STAGES_DIR = "stages"
FINGERPRINT_FILE = "fingerprint"


def experiments() -> dict[str, Experiment]:
    found = [importlib.import_module(m).EXPERIMENT for m in EXPERIMENT_MODULES]
    return {e.name: e for e in found}


def config_dict(config: Any) -> dict[str, Any]:
    from conceptguard.config import config_to_dict

    return config_to_dict(config)


def fingerprint(profile: str, config: Any, seed: int, base_hash: str) -> str:
    """What makes two results comparable: same profile, config, seed, base model and measuring code."""
    payload = json.dumps({"profile": profile, "config": config_dict(config), "seed": seed, "base_model": base_hash,
                          "numbers_version": NUMBERS_VERSION}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


def load_result(folder: Path) -> dict[str, Any] | None:
    path = folder / RESULT_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) and data.get("format") == RESULT_FORMAT else None


def run_experiment(experiment: Experiment, config: Any, world: World, out_dir: Path, *, profile: str, seed: int,
                   resume: bool, log: Callable[[str], None] = print, prepared: bool = False) -> dict[str, Any]:
    """Run one experiment (or reuse its cached result) and write ``out_dir/<name>/result.json``.

    ``prepared``: the folder was opened by :func:`open_experiment` and its parts computed by other
    processes; this assembles the experiment from them.
    """
    from conceptguard.outputs import atomic_write_json

    folder = out_dir / experiment.name
    key = fingerprint(profile, config, seed, world.content_hash)
    if prepared:
        resuming = True
    else:
        cached = reusable_result(experiment, config, folder, key, resume=resume, log=log)
        if cached is not None:
            return cached
        resuming = open_experiment(experiment, folder, key, resume=resume, profile=profile, seed=seed, log=log)
    stages = folder / STAGES_DIR
    ctx = Context(world, folder, seed=seed, name=experiment.name, log=log, stages=stages, resuming=resuming)
    started, cpu_started = time.perf_counter(), time.process_time()
    numbers = experiment.run(config, ctx)
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    _drop_checkpoints(folder)
    result = judge(experiment, config, numbers)
    result.update({
        "format": RESULT_FORMAT, "version": RESULT_VERSION, "experiment": experiment.name, "profile": profile,
        "seed": seed, "base_model_hash": world.content_hash, "fingerprint": key, "config": config_dict(config),
        "runs": [str(p.relative_to(folder)) for p in ctx.report_runs],
    })
    result = json.loads(json.dumps(result, default=str))  # plain JSON types, as a cached result reads back
    # CPU time says what the experiment costs on a machine shared with other jobs, where wall time does not.
    # Both add up what every part cost where it ran (another process, an earlier run); ``resumed`` says that
    # some reused parts were saved without their times, so the figures leave them out.
    seconds += ctx.reused_seconds
    cpu_seconds += ctx.reused_cpu_seconds
    atomic_write_json(folder / TIMING_FILE, {"seconds": round(seconds, 1), "cpu_seconds": round(cpu_seconds, 1),
                                             "threads": _threads(), "resumed": ctx.untimed_parts > 0,
                                             "untimed_parts": ctx.untimed_parts})
    atomic_write_json(folder / RESULT_FILE, result)  # last: its presence means the experiment finished
    shutil.rmtree(stages, ignore_errors=True)  # the finished parts are in result.json now
    log(f"[reproduce] {experiment.name}: {result['verdict']} ({seconds:.0f} s, {cpu_seconds:.0f} s CPU)")
    return result


def reusable_result(experiment: Experiment, config: Any, folder: Path, key: str, *, resume: bool,
                    log: Callable[[str], None]) -> dict[str, Any] | None:
    """The experiment's cached result, judged again, when ``resume`` may reuse it (same fingerprint)."""
    cached = load_result(folder)
    if not (resume and cached is not None and cached.get("fingerprint") == key):
        return None
    try:
        result = rejudge(experiment, config, cached, folder)
    except (KeyError, TypeError, ValueError):  # numbers laid out by another version of the experiment
        log(f"[reproduce] {experiment.name}: the cached result does not fit this version; running again")
        return None
    log(f"[reproduce] {experiment.name}: reusing {folder / RESULT_FILE}")
    return result


def open_experiment(experiment: Experiment, folder: Path, key: str, *, resume: bool, profile: str, seed: int,
                    log: Callable[[str], None]) -> bool:
    """Make ``folder`` ready for a run: kept when resuming the same fingerprint, else cleared.
    Returns whether its finished parts may be reused."""
    from conceptguard.outputs import atomic_write_text

    stages = folder / STAGES_DIR
    resuming = resume and _read_text(stages / FINGERPRINT_FILE) == key
    if not resuming:  # a stale or another experiment's half-finished run must not leak into this one
        shutil.rmtree(folder, ignore_errors=True)
    stages.mkdir(parents=True, exist_ok=True)
    atomic_write_text(stages / FINGERPRINT_FILE, key)
    log(f"[reproduce] {experiment.name}: " + ("resuming" if resuming else "running")
        + f" the {profile} profile (seed {seed})")
    return resuming


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def _drop_checkpoints(folder: Path) -> None:
    """Training checkpoints are most of the disk an experiment uses (a gigabyte for the quick profile)
    and serve no purpose once it finished (an unfinished one resumes by finished part, never from a
    checkpoint inside one). The runs' configs and logs stay."""
    for checkpoints in sorted(folder.rglob("checkpoints")):
        if checkpoints.is_dir():
            shutil.rmtree(checkpoints, ignore_errors=True)


def rejudge(experiment: Experiment, config: Any, cached: dict[str, Any], folder: Path) -> dict[str, Any]:
    """A cached result judged again from its numbers by the current checks and tables (they are pure
    functions of the numbers); ``result.json`` is rewritten only if that changes anything."""
    from conceptguard.outputs import atomic_write_json

    result = json.loads(json.dumps({**cached, **judge(experiment, config, cached["numbers"])}, default=str))
    if result != cached:
        atomic_write_json(folder / RESULT_FILE, result)
    return result


def judge(experiment: Experiment, config: Any, numbers: dict[str, Any]) -> dict[str, Any]:
    """Checks, verdict and tables: pure functions of the measured numbers."""
    checks: list[Check] = experiment.checks(numbers, config)
    tables: list[Table] = experiment.tables(numbers, config)
    return {"numbers": numbers, "checks": [c.to_dict() for c in checks], "verdict": verdict(checks),
            "tables": [t.to_dict() for t in tables]}


def reproduce(out_dir: str | Path = "runs/reproduce", *, profile: str = "full", seed: int = 0,
              only: Sequence[str] | None = None, results_md: str | Path | None = "docs/results.md",
              resume: bool = False, report: bool = True, jobs: int = 1,
              overrides: dict[str, dict[str, Any]] | None = None, world: World | None = None,
              log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the experiments of ``profile`` (all, or ``only``), then write ``results_md`` and the report.

    ``jobs`` > 1 runs that many experiments, or parts of one (the attack matrix's rows), at once, each
    in its own process (the numbers do not change: every experiment and part is seeded on its own).
    ``overrides`` replaces config fields per experiment (``{"esd": {"steps": 5}}``), for tests and
    quick looks; a result made with overrides is reused only with the same ones. Returns
    ``{"results": {name: result}, "seconds": wall time, "results_md": path, "report": path}``.
    """
    from conceptguard.reproduce.markdown import render_results

    if profile not in PROFILES:
        raise ConceptGuardError(f"unknown profile {profile!r}; choose {' or '.join(PROFILES)}")
    if jobs < 1:
        raise ConceptGuardError(f"jobs must be at least 1, got {jobs}")
    available = experiments()
    chosen = list(only) if only else list(available)
    unknown = [name for name in chosen if name not in available]
    if unknown:
        raise ConceptGuardError(f"unknown claim(s) {', '.join(unknown)}; choose from {', '.join(available)}")
    overrides = overrides or {}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    world = world or World()
    configs = {name: replace(e.profiles[profile], **overrides.get(name, {})) for name, e in available.items()}
    if jobs > 1:
        results = _run_parallel(chosen, configs, out_dir, world=world, profile=profile, seed=seed, resume=resume,
                                jobs=jobs, log=log)
    else:
        results = {name: run_experiment(available[name], configs[name], world, out_dir, profile=profile, seed=seed,
                                        resume=resume, log=log) for name in chosen}
    # Claims not run now are shown from earlier results in the same folder when those match exactly.
    for name in available:
        if name not in results:
            cached = load_result(out_dir / name)
            if cached is not None and cached.get("fingerprint") == fingerprint(profile, configs[name], seed,
                                                                               world.content_hash):
                results[name] = cached
    results = {name: results[name] for name in available if name in results}  # the page's order
    seconds = time.perf_counter() - started
    summary: dict[str, Any] = {"results": results, "seconds": seconds}
    if report:
        summary["report"] = write_reports(out_dir, results, log=log)
    if results_md is not None:
        from conceptguard.outputs import atomic_write_text

        text = render_results(available, results, profile=profile, seed=seed, run_seconds=seconds, jobs=jobs,
                              experiment_seconds=_experiment_seconds(out_dir, results), machine=machine(),
                              out_dir=out_dir)
        summary["results_md"] = atomic_write_text(results_md, text)
        log(f"[reproduce] wrote {results_md}")
    return summary


def _worker_setup() -> None:
    """A worker process logs and computes like the CLI's main process, on one core."""
    import sys

    import torch

    # A spawned worker's stdout is block-buffered when the run is logged to a file: its progress lines
    # would appear only when the experiment ends.
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)

    from conceptguard.models.io import quiet_libraries

    quiet_libraries()  # as the CLI does in the main process: no progress bars from the libraries
    torch.set_num_threads(1)  # one core per worker: the tiny world's ops gain nothing from more threads


def _run_in_process(name: str, config: Any, out_dir: Path, profile: str, seed: int, resume: bool,
                    prepared: bool = False) -> dict[str, Any]:
    """One experiment in a worker process, with its own copy of the world (``prepared``: assemble it)."""
    _worker_setup()
    return run_experiment(experiments()[name], config, World(), out_dir, profile=profile, seed=seed, resume=resume,
                          prepared=prepared)


def _run_part_in_process(name: str, part: str, config: Any, out_dir: Path, seed: int) -> None:
    """One part of an opened experiment in a worker process: it leaves the part's stage file."""
    _worker_setup()
    folder = out_dir / name
    ctx = Context(World(), folder, seed=seed, name=name, stages=folder / STAGES_DIR, resuming=True, only=part)
    experiments()[name].run(config, ctx)  # the numbers are read back from the stage file when assembling


def _run_parallel(chosen: list[str], configs: dict[str, Any], out_dir: Path, *, world: World, profile: str,
                  seed: int, resume: bool, jobs: int, log: Callable[[str], None]) -> dict[str, dict[str, Any]]:
    """``jobs`` worker processes run the whole experiments and the parts of those that have them (the
    attack matrix's rows); an experiment with parts is assembled from them once the last one finished."""
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    available = experiments()
    results: dict[str, dict[str, Any]] = {}
    parts_left: dict[str, set[str]] = {}
    # Whole experiments first, then the parts (shorter, and many): the workers then finish close together.
    whole = [name for name in reversed(chosen) if available[name].parts is None]
    split = [name for name in reversed(chosen) if available[name].parts is not None]
    # spawn: a fresh interpreter per worker, never a fork of a process holding torch's thread pools.
    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        running = {}

        def assemble(name: str) -> None:
            future = pool.submit(_run_in_process, name, configs[name], out_dir, profile, seed, True, True)
            running[future] = (name, None)

        for name in whole:
            running[pool.submit(_run_in_process, name, configs[name], out_dir, profile, seed, resume)] = (name, None)
        for name in split:
            experiment, config, folder = available[name], configs[name], out_dir / name
            key = fingerprint(profile, config, seed, world.content_hash)
            cached = reusable_result(experiment, config, folder, key, resume=resume, log=log)
            if cached is not None:
                results[name] = cached
                continue
            open_experiment(experiment, folder, key, resume=resume, profile=profile, seed=seed, log=log)
            parts_left[name] = {part for part in experiment.parts(config)
                                if not (folder / STAGES_DIR / f"{part}.json").is_file()}
            for part in experiment.parts(config):
                if part in parts_left[name]:
                    running[pool.submit(_run_part_in_process, name, part, config, out_dir, seed)] = (name, part)
            if not parts_left[name]:
                assemble(name)
        try:
            while running:
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in finished:
                    name, part = running.pop(future)
                    value = future.result()
                    if part is None:
                        results[name] = value
                        continue
                    log(f"[reproduce] {name}: finished part {part}")
                    parts_left[name].discard(part)
                    if not parts_left[name]:
                        assemble(name)
        except BaseException:
            for future in running:  # what has not started never will; finished parts stay for --resume
                future.cancel()
            raise
    return {name: results[name] for name in chosen}


def write_reports(out_dir: Path, results: dict[str, dict[str, Any]], log: Callable[[str], None] = print) -> Path | None:
    """One HTML report per experiment and one over all of them (``conceptguard report``'s builder)."""
    from conceptguard.report.html import build_report

    every = []
    for name, result in results.items():
        runs = [out_dir / name / r for r in result.get("runs", []) if (out_dir / name / r).is_dir()]
        if runs:
            build_report(runs, out_dir / name / "report.html")
            every += runs
    if not every:
        return None
    path = build_report(every, out_dir / "report.html")["html"]
    log(f"[reproduce] wrote {path}")
    return path


def _experiment_seconds(out_dir: Path, results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Wall and CPU seconds of each experiment (from its timing.json; empty when missing)."""
    seconds = {}
    for name in results:
        try:
            timing = json.loads((out_dir / name / TIMING_FILE).read_text())
        except (OSError, json.JSONDecodeError):
            timing = {}
        seconds[name] = {k: timing[k] for k in ("seconds", "cpu_seconds") if isinstance(timing.get(k), (int, float))}
        if timing.get("resumed") is True:
            seconds[name]["resumed"] = True
    return seconds


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def machine() -> dict[str, Any]:
    """What the timings were measured on (no host names)."""
    import torch

    return {"system": f"{platform.system()} {platform.machine()}", "cpu_cores": os.cpu_count(),
            "torch_threads": _threads(), "python": platform.python_version(), "torch": torch.__version__,
            "device": "cpu"}
