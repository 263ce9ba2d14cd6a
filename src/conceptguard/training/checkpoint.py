"""Atomic training checkpoints: what one holds, how it is written, how the newest is found.

One checkpoint, ``run_dir/checkpoints/step-000042/`` (the state *after* optimizer step 42)::

    trainable.safetensors   the recipe's trainable parameters (fp32 master weights), by name
    recipe.safetensors      the recipe's extra state (e.g. EMA weights), if it keeps any
    optimizer.pt            optimizer, lr-scheduler and fp16 grad-scaler state
    rng.pt                  every process's RNG states: torch, CUDA, numpy, python, the loop's generator
    state.json              the step; written last

A checkpoint is written into a hidden ``.tmp-*`` folder beside it, flushed to disk and renamed into
place, so a folder named ``step-N`` holding ``state.json`` is always complete. Anything else under
``checkpoints/`` (a leftover of a run killed mid-write) is never loaded; the next run sweeps the
``.tmp-*`` leftovers away.

This module only touches files; the loop decides what goes in and which process writes.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from conceptguard.errors import ConceptGuardError

CHECKPOINTS = "checkpoints"
TRAINABLE = "trainable.safetensors"
RECIPE = "recipe.safetensors"
OPTIMIZER = "optimizer.pt"
RNG = "rng.pt"
STATE = "state.json"

_STEP_DIR = re.compile(r"step-(\d+)")
_TMP_PREFIX = ".tmp-"


def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"step-{step:06d}"


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run as ``(step, path)``, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _STEP_DIR.fullmatch(path.name)
        if match and path.is_dir() and (path / STATE).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    checkpoints = list_checkpoints(run_dir)
    return checkpoints[-1][1] if checkpoints else None


def read_state(path: str | Path) -> dict[str, Any]:
    """The ``state.json`` of a checkpoint (``step``, ``num_processes``)."""
    try:
        return json.loads((Path(path) / STATE).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConceptGuardError(f"cannot read checkpoint {path}: {exc}") from exc


def load_trainable_parameters(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The trainable parameters saved in a checkpoint, by name (e.g. to evaluate a checkpoint)."""
    file = Path(path) / TRAINABLE
    if not file.is_file():
        raise ConceptGuardError(f"{path} is not a training checkpoint (no {TRAINABLE})")
    return load_file(file, device=str(device))


def load_recipe_state(path: str | Path) -> dict[str, torch.Tensor] | None:
    file = Path(path) / RECIPE
    return load_file(file) if file.is_file() else None


def load_torch(path: str | Path, name: str) -> Any:
    """Load one of the ``torch.save`` files of a checkpoint, tensors only (no pickled code)."""
    try:
        return torch.load(Path(path) / name, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError) as exc:
        raise ConceptGuardError(f"cannot read {name} of checkpoint {path}: {exc}") from exc


def copy_parameters_into(
        params: Mapping[str, torch.nn.Parameter], saved: Mapping[str, torch.Tensor], source: Path) -> None:
    """Overwrite live parameters in place (the optimizer holds references to them) from a checkpoint."""
    missing = sorted(set(params) - set(saved))
    unexpected = sorted(set(saved) - set(params))
    if missing or unexpected:
        raise ConceptGuardError(
            f"checkpoint {source} does not match the recipe's trainable parameters "
            f"(missing: {few_names(missing)}; unexpected: {few_names(unexpected)}); "
            "was it written by another method or model?")
    with torch.no_grad():
        for name, param in params.items():
            if saved[name].shape != param.shape:
                raise ConceptGuardError(
                    f"checkpoint {source}: parameter {name} has shape {tuple(saved[name].shape)}, "
                    f"the recipe's has {tuple(param.shape)}")
            param.copy_(saved[name])


def capture_rng_state(generator: torch.Generator, device: torch.device) -> dict[str, Any]:
    """This process's RNG states, as plain tensors and numbers so ``torch.load(weights_only=True)`` reads them."""
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    return {
        "python": random.getstate(),
        # numpy keeps uint32 words; int64 round-trips them exactly and is a plain torch dtype.
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached_gaussian)),
        "torch": torch.get_rng_state(),
        # Only this process's own GPU: querying all of them would create a CUDA context on each.
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "generator": generator.get_state(),
    }


def restore_rng_state(state: Mapping[str, Any], generator: torch.Generator, device: torch.device) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached_gaussian))
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
    generator.set_state(state["generator"])


def write_checkpoint(
    path: Path,
    *,
    step: int,
    params: Mapping[str, torch.Tensor],
    training_state: dict[str, Any],
    recipe_state: Mapping[str, torch.Tensor] | None,
    rng_states: list[dict[str, Any]],
) -> None:
    """Write a complete checkpoint at ``path``, atomically: a reader sees all of it or none of it."""
    tmp = path.parent / f"{_TMP_PREFIX}{path.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(_cpu_copies(params), tmp / TRAINABLE)
    if recipe_state is not None:
        save_file(_cpu_copies(recipe_state), tmp / RECIPE)
    torch.save(training_state, tmp / OPTIMIZER)
    torch.save({"processes": rng_states}, tmp / RNG)
    (tmp / STATE).write_text(json.dumps({"step": step, "num_processes": len(rng_states)}) + "\n")
    # A rename is only atomic for data already on disk; without the fsyncs a power cut could leave a
    # complete-looking folder with empty files.
    for file in tmp.iterdir():
        _fsync(file)
    _fsync(tmp)
    if path.exists():
        # Only reachable when a step is re-saved (e.g. a user removed newer checkpoints and resumed);
        # the old folder holds the same step of the same run.
        shutil.rmtree(path)
    os.replace(tmp, path)
    _fsync(path.parent)


def prune_checkpoints(run_dir: str | Path, keep: int) -> None:
    """Delete all but the newest ``keep`` complete checkpoints."""
    for _, path in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


def remove_incomplete(run_dir: str | Path) -> None:
    """Sweep away temporary folders left by a run killed while writing a checkpoint."""
    root = Path(run_dir) / CHECKPOINTS
    if root.is_dir():
        for path in root.glob(f"{_TMP_PREFIX}*"):
            shutil.rmtree(path, ignore_errors=True)


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f"{_TMP_PREFIX}{path.name}-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    _fsync(tmp)
    os.replace(tmp, path)


def write_lines_atomic(path: Path, lines: list[str]) -> None:
    tmp = path.with_name(f"{_TMP_PREFIX}{path.name}-{os.getpid()}")
    tmp.write_text("".join(line + "\n" for line in lines))
    _fsync(tmp)
    os.replace(tmp, path)


def _cpu_copies(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # copy=True: safetensors refuses tensors that share storage (tied weights, views), and a copy
    # also detaches the file from parameters the optimizer keeps updating.
    return {name: t.detach().to("cpu", copy=True).contiguous() for name, t in tensors.items()}


def _fsync(path: Path) -> None:
    if os.name != "posix":  # directories cannot be opened for fsync elsewhere
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def few_names(names: list[str], limit: int = 5) -> str:
    if not names:
        return "none"
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more
