"""Write a method's results atomically: a loadable pipeline, a weight delta and a model card.

Layout of an output folder::

    pipeline/            complete diffusers pipeline (safetensors), loads with plain diffusers
    delta.safetensors    only the changed tensors, keyed "unet.down_blocks...", with provenance
    README.md            model card: what was done, configuration, changed tensors, how to load
    manifest.json        sha256 of every file above
    ...                  any extra files the method adds (masks, logs)

Nothing half-written is ever visible under the final name: everything is built in a hidden
sibling folder, fsynced, then renamed into place (rename within one file system is atomic).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import torch
import yaml

from conceptguard import __version__
from conceptguard.errors import ConceptGuardError
from conceptguard.models.io import content_hash, detect_family, model_components, read_safetensors_header

DELTA_FORMAT = "conceptguard-delta"
OUTPUT_FORMAT = "conceptguard-output"
PIPELINE_DIR = "pipeline"
DELTA_FILE = "delta.safetensors"
CARD_FILE = "README.md"
MANIFEST_FILE = "manifest.json"
_RESERVED = (PIPELINE_DIR, DELTA_FILE, CARD_FILE, MANIFEST_FILE)

# The card lists changed tensors one per line up to this many; the delta file has them all.
_CARD_TENSOR_LIST_LIMIT = 100

_FAMILY_TAGS = {"sd1": "stable-diffusion", "sd2": "stable-diffusion", "sdxl": "stable-diffusion-xl"}
_FAMILY_NAMES = {"sd1": "Stable Diffusion 1.x", "sd2": "Stable Diffusion 2.x", "sdxl": "Stable Diffusion XL"}


# --------------------------------------------------------------------------------------------
# Atomic file helpers
# --------------------------------------------------------------------------------------------

def _temp_sibling(path: Path, kind: str) -> Path:
    return path.parent / f".{path.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}"


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    # Makes a rename or a new entry durable; POSIX only (Windows cannot open a directory).
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _io_error(action: str, path: Path, exc: OSError) -> ConceptGuardError:
    reason = exc.strerror or str(exc)
    return ConceptGuardError(f"cannot {action} {path}: {reason}")


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never a part."""
    path = Path(path)
    temp = _temp_sibling(path, "tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(temp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
        _fsync_dir(path.parent)
    except OSError as exc:
        _remove_quietly(temp)
        raise _io_error("write", path, exc) from exc
    except BaseException:
        _remove_quietly(temp)
        raise
    return path


def atomic_write_text(path: str | Path, text: str, encoding: str = "utf-8") -> Path:
    return atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(path: str | Path, data: Any, indent: int = 2) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=indent, default=str) + "\n")


def _remove_quietly(path: Path) -> None:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    except OSError:
        pass


def sha256_file(path: str | Path, chunk_size: int = 1 << 20) -> str:
    hasher = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            hasher.update(chunk)
    return hasher.hexdigest()


def _walk_files(root: Path) -> Iterator[Path]:
    for folder, _, files in os.walk(root):
        for name in sorted(files):
            yield Path(folder) / name


# --------------------------------------------------------------------------------------------
# Checks done before any work
# --------------------------------------------------------------------------------------------

def check_output_target(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() or out_dir.is_symlink():
        if not overwrite:
            raise ConceptGuardError(
                f"output folder {out_dir} already exists; choose another output or pass --overwrite")
        if not out_dir.is_dir():
            raise ConceptGuardError(f"output path {out_dir} exists and is not a folder; refusing to replace it")
    parent = out_dir.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _io_error("create the output folder's parent", parent, exc) from exc
    if not parent.is_dir():
        raise ConceptGuardError(f"cannot write {out_dir}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConceptGuardError(f"cannot write {out_dir}: {parent} is not writable")


def _split_component_name(key: str, components: dict[str, torch.nn.Module]) -> tuple[str, str]:
    component, _, name = key.partition(".")
    if component not in components or not name:
        raise ValueError(f"changed tensor {key!r} must be prefixed by one of {', '.join(components)}")
    return component, name


def _checked_delta(pipe, changed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The changed tensors as contiguous CPU tensors, after checking they are the pipeline's weights.

    The delta must reproduce ``pipeline/`` when applied to the base, so each tensor has to be
    the pipeline's current value (compared in the pipeline's dtype).
    """
    components = model_components(pipe)
    states = {name: module.state_dict() for name, module in components.items()}
    delta = {}
    for key in sorted(changed):
        component, name = _split_component_name(key, components)
        if name not in states[component]:
            raise ValueError(f"changed tensor {key!r} is not a weight of the pipeline's {component}")
        current = states[component][name]
        value = changed[key].detach()
        if tuple(value.shape) != tuple(current.shape):
            raise ValueError(f"changed tensor {key!r} has shape {tuple(value.shape)}, the pipeline's {tuple(current.shape)}")
        if not torch.equal(value.to(device=current.device, dtype=current.dtype), current):
            raise ValueError(f"changed tensor {key!r} differs from the pipeline's current weight")
        delta[key] = value.to("cpu").contiguous()
    return delta


def _checked_extra_files(extra_files: dict[str, bytes] | None) -> dict[PurePosixPath, bytes]:
    checked = {}
    for name, data in (extra_files or {}).items():
        relative = PurePosixPath(name)
        if relative.is_absolute() or ".." in relative.parts or not relative.parts:
            raise ValueError(f"extra file name {name!r} must be a relative path inside the output folder")
        if relative.parts[0] in _RESERVED:
            raise ValueError(f"extra file name {name!r} collides with a standard output file")
        checked[relative] = bytes(data)
    return checked


# --------------------------------------------------------------------------------------------
# Model card
# --------------------------------------------------------------------------------------------

def _markdown_cell(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return "`" + text.replace("|", "\\|").replace("`", "'").replace("\n", " ") + "`"


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def _model_card(*, method: str, family: str, summary: str, config: dict[str, Any], delta: dict[str, torch.Tensor],
                base_hash: str, model_hash: str, total_params: int) -> str:
    front_matter = {
        "library_name": "diffusers",
        "pipeline_tag": "text-to-image",
        "tags": ["conceptguard", f"conceptguard-{method}", _FAMILY_TAGS[family], "text-to-image"],
        "base_model_hash": f"sha256:{base_hash}",
        "model_hash": f"sha256:{model_hash}",
        "conceptguard_method": method,
        "conceptguard_version": __version__,
    }
    changed_params = sum(t.numel() for t in delta.values())
    share = 100.0 * changed_params / total_params if total_params else 0.0
    lines = [
        "---",
        yaml.safe_dump(front_matter, sort_keys=False).rstrip(),
        "---",
        "",
        f"# {_FAMILY_NAMES[family]} model edited with `{method}`",
        "",
        summary.strip() or f"Weights edited with conceptguard's `{method}` method.",
        "",
        "## What was done",
        "",
        f"conceptguard {__version__} applied **{method}** to a {_FAMILY_NAMES[family]} pipeline and "
        f"changed **{_plural(len(delta), 'tensor')}** ({changed_params:,} parameters, {share:.2f}% of the model's "
        f"{total_params:,}); every other weight is bit-identical to the base model.",
        "",
        f"- base model content hash: `{base_hash}`",
        f"- edited model content hash: `{model_hash}`",
        "",
        "Content hashes are conceptguard's sha256 over the UNet, text encoder(s) and VAE weights; "
        "`conceptguard info --model PATH` prints them.",
        "",
        "## Configuration",
        "",
        "| option | value |",
        "|---|---|",
    ]
    lines += [f"| {_markdown_cell(key)} | {_markdown_cell(value)} |" for key, value in sorted(config.items())]
    if not config:
        lines.append("| *(defaults)* | |")
    lines += ["", "## Changed tensors", "", f"{_plural(len(delta), 'tensor')}, {changed_params:,} parameters:", ""]
    for key in list(delta)[:_CARD_TENSOR_LIST_LIMIT]:
        lines.append(f"- `{key}` {tuple(delta[key].shape)}")
    if len(delta) > _CARD_TENSOR_LIST_LIMIT:
        lines.append(f"- ... and {len(delta) - _CARD_TENSOR_LIST_LIMIT} more (all are in `{DELTA_FILE}`)")
    lines += [
        "",
        "## How to load",
        "",
        f"The `{PIPELINE_DIR}/` folder is a complete diffusers pipeline:",
        "",
        "```python",
        "from diffusers import DiffusionPipeline",
        "",
        f'pipe = DiffusionPipeline.from_pretrained("path/to/this/folder/{PIPELINE_DIR}")',
        "```",
        "",
        f"`{DELTA_FILE}` holds only the changed tensors; apply it to the base model it was made "
        "from (its content hash is checked):",
        "",
        "```python",
        "from conceptguard.models import load_pipeline",
        "from conceptguard.outputs import apply_delta",
        "",
        'pipe = load_pipeline("path/to/base/model")',
        f'apply_delta(pipe, "path/to/this/folder/{DELTA_FILE}")',
        "```",
        "",
        f"`{MANIFEST_FILE}` lists the sha256 of every file in this folder.",
        "",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------

def _write_delta(path: Path, delta: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    save_file(delta, str(path), metadata=metadata)


def _write_contents(folder: Path, pipe, delta: dict[str, torch.Tensor], delta_metadata: dict[str, str],
                    card: str, extra_files: dict[PurePosixPath, bytes], manifest_head: dict[str, Any]) -> None:
    pipe.save_pretrained(folder / PIPELINE_DIR, safe_serialization=True)
    _write_delta(folder / DELTA_FILE, delta, delta_metadata)
    (folder / CARD_FILE).write_text(card, encoding="utf-8")
    for relative, data in extra_files.items():
        target = folder.joinpath(*relative.parts)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    files = {}
    for path in _walk_files(folder):
        files[path.relative_to(folder).as_posix()] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    manifest = dict(manifest_head, files=files)
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    for path in _walk_files(folder):
        _fsync_file(path)
    for sub, _, _ in os.walk(folder):
        _fsync_dir(Path(sub))


def _swap_into_place(temp: Path, out_dir: Path) -> None:
    if not out_dir.exists():
        os.replace(temp, out_dir)
        _fsync_dir(out_dir.parent)
        return
    # A directory cannot atomically replace a non-empty one: move the old one aside first, and
    # put it back if the swap fails, so the user keeps either the old or the new result.
    old = _temp_sibling(out_dir, "old")
    os.replace(out_dir, old)
    try:
        os.replace(temp, out_dir)
    except BaseException:
        os.replace(old, out_dir)
        raise
    _fsync_dir(out_dir.parent)
    shutil.rmtree(old, ignore_errors=True)


def save_method_outputs(
    pipe,
    out_dir: str | Path,
    *,
    base_pipe_hash: str,
    changed: dict[str, torch.Tensor],
    method: str,
    config: dict[str, Any],
    summary: str,
    overwrite: bool = False,
    extra_files: dict[str, bytes] | None = None,
) -> Path:
    """Write ``pipeline/``, ``delta.safetensors``, ``README.md`` and ``manifest.json`` into ``out_dir``.

    ``changed`` maps component-prefixed names (``"unet.down_blocks.0...."``) to the edited
    tensors, which must equal the pipeline's current weights. ``out_dir`` appears complete or not
    at all; an existing ``out_dir`` is an error unless ``overwrite``, and is only removed once
    the new one is in place. Returns ``out_dir``.
    """
    out_dir = Path(out_dir).expanduser().absolute()
    check_output_target(out_dir, overwrite)
    delta = _checked_delta(pipe, changed)
    extras = _checked_extra_files(extra_files)
    family = detect_family(pipe)
    model_hash = content_hash(pipe)
    config_json = json.dumps(config, sort_keys=True, default=str)
    delta_metadata = {
        "format": DELTA_FORMAT,
        "method": method,
        "config": config_json,
        "base_model_hash": base_pipe_hash,
        "model_hash": model_hash,
        "family": family,
        "conceptguard_version": __version__,
    }
    total_params = sum(p.numel() for module in model_components(pipe).values() for p in module.parameters())
    card = _model_card(method=method, family=family, summary=summary, config=json.loads(config_json), delta=delta,
                       base_hash=base_pipe_hash, model_hash=model_hash, total_params=total_params)
    manifest_head = {
        "format": OUTPUT_FORMAT,
        "conceptguard_version": __version__,
        "method": method,
        "family": family,
        "base_model_hash": base_pipe_hash,
        "model_hash": model_hash,
        "changed_tensors": len(delta),
    }

    temp = _temp_sibling(out_dir, "tmp")
    try:
        temp.mkdir()
        _write_contents(temp, pipe, delta, delta_metadata, card, extras, manifest_head)
        _swap_into_place(temp, out_dir)
    except OSError as exc:
        _remove_quietly(temp)
        raise _io_error("write outputs to", out_dir, exc) from exc
    except BaseException:
        _remove_quietly(temp)
        raise
    return out_dir


# --------------------------------------------------------------------------------------------
# Reading and applying deltas
# --------------------------------------------------------------------------------------------

def read_delta_metadata(path: str | Path) -> dict[str, Any]:
    """A delta's provenance, with ``config`` decoded back into a dict."""
    path = Path(path)
    if not path.is_file():
        raise ConceptGuardError(f"delta file not found: {path}")
    metadata = dict(read_safetensors_header(path).get("__metadata__") or {})
    if metadata.get("format") != DELTA_FORMAT:
        raise ConceptGuardError(f"{path} is not a conceptguard delta (no '{DELTA_FORMAT}' format tag)")
    try:
        metadata["config"] = json.loads(metadata.get("config") or "{}")
    except json.JSONDecodeError as exc:
        raise ConceptGuardError(f"{path} has a corrupt config in its metadata") from exc
    return metadata


def apply_delta(pipe, delta_path: str | Path, expected_base_hash: str | None = None) -> list[str]:
    """Overwrite ``pipe``'s weights with a delta's tensors; returns the names written.

    The delta records the content hash of the model it was made from and is refused on any
    other: it replaces tensors, so on a different base it would silently produce a hybrid.
    ``expected_base_hash`` is ``pipe``'s content hash when the caller already knows it (hashing
    a large model takes seconds); otherwise it is computed. ``pipe`` is left untouched when
    anything is wrong.
    """
    from safetensors import safe_open

    delta_path = Path(delta_path)
    metadata = read_delta_metadata(delta_path)
    recorded = metadata.get("base_model_hash", "")
    actual = expected_base_hash or content_hash(pipe)
    if recorded != actual:
        raise ConceptGuardError(
            f"delta {delta_path} was made for base model {recorded[:16]}... but this model hashes to "
            f"{actual[:16]}...; apply it to the model it was made from")

    components = model_components(pipe)
    header = read_safetensors_header(delta_path)
    targets: dict[str, torch.Tensor] = {}
    states = {name: module.state_dict(keep_vars=True) for name, module in components.items()}
    for key in sorted(k for k in header if k != "__metadata__"):
        component, _, name = key.partition(".")
        target = states.get(component, {}).get(name)
        if target is None:
            raise ConceptGuardError(f"delta {delta_path} changes {key!r}, which this model does not have")
        if tuple(target.shape) != tuple(header[key]["shape"]):
            raise ConceptGuardError(f"delta {delta_path} has {key!r} with another shape than this model's")
        targets[key] = target
    with safe_open(str(delta_path), framework="pt", device="cpu") as handle, torch.no_grad():
        for key, target in targets.items():
            target.copy_(handle.get_tensor(key).to(device=target.device, dtype=target.dtype))
    return list(targets)
