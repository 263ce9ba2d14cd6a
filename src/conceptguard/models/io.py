"""Load text-to-image pipelines from what users actually have, and identify them.

Sources: the embedded world model, a diffusers pipeline folder, a single ``.safetensors`` file
(diffusers-prefixed keys or an original LDM/SD checkpoint) and, only on request, pickle files.
Everything is local (``local_files_only=True``): nothing is ever downloaded.

Every problem with the input becomes a one-line :class:`ConceptGuardError` *before* diffusers is
imported where possible, so that the CLI fails fast and says what to do. Loading never runs code
from the model folder and never unpickles unless ``allow_pickle=True``.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import sys
from pathlib import Path
from typing import Any

import torch

from conceptguard.errors import ConceptGuardError

FAMILIES = ("sd1", "sd2", "sdxl")

# Components that hold weights, in the order they are hashed and reported.
MODEL_COMPONENTS = ("unet", "text_encoder", "text_encoder_2", "vae")

# model_index.json class names we load; the classes are imported lazily from diffusers.
SUPPORTED_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")

PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth", ".pkl")
SAFETENSORS_SUFFIX = ".safetensors"

# Names that select the embedded world model instead of a path.
EMBEDDED_NAMES = ("embedded",)

# A safetensors header larger than this is certainly corrupt (real ones are a few MB at most).
_MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024


_quiet_requested = False


def quiet_libraries() -> None:
    """Silence diffusers/transformers warnings and progress bars, for clean CLI output.

    The CLI's contract is that stderr holds at most one ``error:`` line; library chatter (e.g.
    transformers' notice about torchvision on import) would break it. Importing diffusers takes
    seconds, so this does not import it: the verbosity goes through the libraries' environment
    variables, and the progress bars are switched off as soon as this module imports diffusers.
    """
    global _quiet_requested
    _quiet_requested = True
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    _apply_quiet_settings()


def _apply_quiet_settings() -> None:
    if not _quiet_requested:
        return
    for name in ("diffusers.utils.logging", "transformers.utils.logging"):
        module = sys.modules.get(name)
        if module is not None:
            module.set_verbosity_error()
            module.disable_progress_bar()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    line = text.splitlines()[0] if text else ""
    return f"{type(exc).__name__}: {line}" if line else type(exc).__name__


# --------------------------------------------------------------------------------------------
# safetensors checks (pure Python: no diffusers import, and no reading of tensor data)
# --------------------------------------------------------------------------------------------

def read_safetensors_header(path: str | Path) -> dict[str, Any]:
    """The parsed JSON header of a safetensors file, after checking the file is complete.

    safetensors itself reports a truncated file only when it maps the data, with a message that
    does not name the file; checking that the tensors' byte ranges exactly cover the data section
    catches truncation and corruption up front, in microseconds.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise ConceptGuardError(f"{path} is not a valid safetensors file (only {size} bytes)")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > min(size - 8, _MAX_SAFETENSORS_HEADER):
                raise ConceptGuardError(f"{path} is truncated or not a safetensors file (bad header length)")
            header = json.loads(handle.read(header_len).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConceptGuardError(f"{path} is corrupt: its safetensors header is not valid JSON") from exc
    except OSError as exc:
        raise ConceptGuardError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if not isinstance(header, dict):
        raise ConceptGuardError(f"{path} is corrupt: its safetensors header is not a mapping")
    data_size = size - 8 - header_len
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, stop = info["data_offsets"]
        except (TypeError, KeyError, ValueError) as exc:
            raise ConceptGuardError(f"{path} is corrupt: tensor {name!r} has no valid data offsets") from exc
        end = max(end, int(stop))
    if end > data_size:
        raise ConceptGuardError(
            f"{path} is truncated: its header describes {end} bytes of tensor data but only "
            f"{data_size} are present (re-download or re-export the file)")
    if end < data_size:
        raise ConceptGuardError(f"{path} is corrupt: {data_size - end} trailing bytes after the tensor data")
    return header


def safetensors_keys(path: str | Path) -> list[str]:
    return sorted(k for k in read_safetensors_header(path) if k != "__metadata__")


# --------------------------------------------------------------------------------------------
# Identification
# --------------------------------------------------------------------------------------------

def model_components(pipe) -> dict[str, torch.nn.Module]:
    """The pipeline's weight-bearing components, by attribute name, in :data:`MODEL_COMPONENTS` order."""
    found = {}
    for name in MODEL_COMPONENTS:
        module = getattr(pipe, name, None)
        if isinstance(module, torch.nn.Module):
            found[name] = module
    return found


def _config_value(config: Any, key: str, default: Any = None) -> Any:
    if config is None:
        return default
    if isinstance(config, dict):
        return config.get(key, default)
    return getattr(config, key, default)


def detect_family(pipe) -> str:
    """``"sd1"``, ``"sd2"`` or ``"sdxl"`` from the pipeline's architecture (not its class name)."""
    unet = getattr(pipe, "unet", None)
    text_encoder = getattr(pipe, "text_encoder", None)
    unet_config = getattr(unet, "config", None)
    cross_dim = _config_value(unet_config, "cross_attention_dim")
    if unet is None or cross_dim is None or getattr(pipe, "vae", None) is None:
        raise ConceptGuardError(
            f"unsupported model: {type(pipe).__name__} is not a Stable Diffusion text-to-image pipeline "
            f"(needs a cross-attention UNet, a VAE and a text encoder)")
    has_second_encoder = getattr(pipe, "text_encoder_2", None) is not None
    if has_second_encoder and _config_value(unet_config, "addition_embed_type") == "text_time":
        if text_encoder is None:
            raise ConceptGuardError(
                "unsupported model: an SDXL pipeline without its first text encoder (e.g. the refiner)")
        return "sdxl"
    if text_encoder is None:
        raise ConceptGuardError(f"unsupported model: {type(pipe).__name__} has no text encoder")
    if has_second_encoder:
        raise ConceptGuardError(
            "unsupported model: two text encoders but the UNet has no SDXL text_time conditioning")
    hidden_act = _config_value(getattr(text_encoder, "config", None), "hidden_act")
    if cross_dim == 1024 or hidden_act == "gelu" or _config_value(unet_config, "use_linear_projection"):
        return "sd2"
    return "sd1"


def prediction_type(pipe) -> str:
    """What the UNet predicts: ``"epsilon"``, ``"v_prediction"`` or ``"sample"``."""
    return _config_value(getattr(pipe.scheduler, "config", None), "prediction_type", "epsilon") or "epsilon"


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    # Viewing as uint8 works for every dtype (numpy has no bfloat16) and copies nothing on CPU.
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def content_hash(pipe) -> str:
    """sha256 over every weight of the UNet, text encoder(s) and VAE.

    Tensors are visited in sorted-name order and hashed as ``component.name|dtype|shape`` followed
    by their raw bytes, one at a time, so the hash depends only on the weights (not on process,
    device or load order) and the model is never copied as a whole.
    """
    hasher = hashlib.sha256()
    for component_name, module in model_components(pipe).items():
        state = module.state_dict()
        for name in sorted(state):
            tensor = state[name]
            hasher.update(f"{component_name}.{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
            hasher.update(_tensor_bytes(tensor))
    return hasher.hexdigest()


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------

def _pipeline_class(class_name: str):
    import diffusers

    # Resolving a pipeline class imports transformers too: both libraries are loaded after this.
    pipeline_cls = getattr(diffusers, class_name)
    _apply_quiet_settings()
    return pipeline_cls


def _finish(pipe, torch_dtype, device):
    detect_family(pipe)  # refuses architectures we cannot work on, whatever the source
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    current = getattr(pipe, "dtype", None)
    if torch_dtype is not None and current != torch_dtype:
        pipe = pipe.to(dtype=torch_dtype)
    return pipe.to(device) if device is not None else pipe


def _no_safety_checker_kwargs(class_name: str) -> dict[str, Any]:
    # SDXL pipelines have no safety checker and would warn about unexpected keyword arguments.
    if class_name == "StableDiffusionPipeline":
        return {"safety_checker": None, "requires_safety_checker": False}
    return {}


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConceptGuardError(f"cannot read {what} {path}: {_first_line(exc)}") from exc
    if not isinstance(data, dict):
        raise ConceptGuardError(f"{what} {path} does not hold a JSON object")
    return data


def _index_class_name(folder: Path) -> str:
    """The supported pipeline class named by ``folder/model_index.json``."""
    class_name = _read_json(folder / "model_index.json", "pipeline index").get("_class_name")
    if class_name not in SUPPORTED_PIPELINES:
        raise ConceptGuardError(
            f"unsupported pipeline {class_name!r} in {folder}; supported: {', '.join(SUPPORTED_PIPELINES)}")
    return class_name


def _check_pipeline_folder(folder: Path, allow_pickle: bool) -> str:
    """Validate a diffusers folder without importing diffusers; returns the pipeline class name."""
    try:
        return _check_pipeline_folder_contents(folder, allow_pickle)
    except OSError as exc:
        raise ConceptGuardError(f"cannot read model folder {folder}: {exc.strerror or exc}") from exc


def _check_pipeline_folder_contents(folder: Path, allow_pickle: bool) -> str:
    if not any(folder.iterdir()):
        raise ConceptGuardError(f"model folder {folder} is empty")
    if not (folder / "model_index.json").is_file():
        config_path = folder / "config.json"
        if config_path.is_file():
            class_name = _read_json(config_path, "model config").get("_class_name") or "model"
            raise ConceptGuardError(
                f"{folder} holds a single {class_name} component, not a pipeline: pass the pipeline "
                f"folder that contains model_index.json")
        raise ConceptGuardError(f"{folder} is not a diffusers pipeline folder (no model_index.json)")
    class_name = _index_class_name(folder)
    index = _read_json(folder / "model_index.json", "pipeline index")
    for component, spec in index.items():
        if component.startswith("_") or not isinstance(spec, list) or not spec or spec[0] is None:
            continue
        subfolder = folder / component
        if not subfolder.is_dir():
            raise ConceptGuardError(f"{folder} lists component {component!r} but has no {component}/ folder")
        if not (subfolder / "config.json").is_file():
            continue  # schedulers, tokenizers, processors: configs only, no weights
        files = [p for p in subfolder.iterdir() if p.is_file()]
        safetensors_files = [p for p in files if p.name.endswith(SAFETENSORS_SUFFIX)]
        pickle_files = [p for p in files if p.suffix in PICKLE_SUFFIXES]
        if not safetensors_files and not pickle_files:
            raise ConceptGuardError(f"component {component!r} in {folder} has no weight files")
        if not safetensors_files and not allow_pickle:
            raise ConceptGuardError(
                f"component {component!r} in {folder} has only pickle weights ({pickle_files[0].name}), "
                f"which can run arbitrary code when loaded; convert them to safetensors or pass "
                f"--allow-pickle if you trust the source")
        for weights in safetensors_files:
            read_safetensors_header(weights)
    return class_name


def _load_folder(folder: Path, allow_pickle: bool, torch_dtype):
    class_name = _check_pipeline_folder(folder, allow_pickle)
    pipeline_cls = _pipeline_class(class_name)
    try:
        return pipeline_cls.from_pretrained(
            folder,
            dtype=torch_dtype,  # diffusers' current name for torch_dtype
            local_files_only=True,
            # None lets diffusers fall back to .bin files, which the checks above allowed.
            use_safetensors=None if allow_pickle else True,
            **_no_safety_checker_kwargs(class_name),
        )
    except ConceptGuardError:
        raise
    except Exception as exc:  # diffusers/transformers raise many types for a broken folder
        raise ConceptGuardError(f"cannot load the pipeline in {folder}: {_first_line(exc)}") from exc


def _has_diffusers_prefixes(keys: list[str]) -> bool:
    prefixes = tuple(f"{name}." for name in MODEL_COMPONENTS)
    return bool(keys) and all(key.startswith(prefixes) for key in keys)


def _split_by_component(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    split: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        component, _, name = key.partition(".")
        split.setdefault(component, {})[name] = tensor
    return split


def _load_state_into(pipe, state: dict[str, torch.Tensor], source: Path, architecture: str) -> None:
    """Load a diffusers-prefixed state dict into ``pipe``'s components, strictly."""
    by_component = _split_by_component(state)
    components = model_components(pipe)
    unknown = sorted(set(by_component) - set(components))
    if unknown:
        raise ConceptGuardError(
            f"{source} has weights for {', '.join(unknown)}, which the {architecture} does not have")
    missing = sorted(set(components) - set(by_component))
    if missing:
        raise ConceptGuardError(f"{source} has no weights for {', '.join(missing)}")
    for name, module in components.items():
        expected = module.state_dict()
        given = by_component[name]
        problems = [f"{name}.{k} is missing" for k in sorted(set(expected) - set(given))]
        problems += [f"{name}.{k} is unexpected" for k in sorted(set(given) - set(expected))]
        problems += [f"{name}.{k} has shape {tuple(v.shape)}, expected {tuple(expected[k].shape)}"
                     for k, v in sorted(given.items()) if k in expected and tuple(v.shape) != tuple(expected[k].shape)]
        if problems:
            more = f" (and {len(problems) - 1} more differences)" if len(problems) > 1 else ""
            raise ConceptGuardError(
                f"{source} does not match the {architecture}: {problems[0]}{more}; "
                f"pass --config-dir DIR with a diffusers folder of the checkpoint's family")
        try:
            module.load_state_dict(given, strict=True)
        except RuntimeError as exc:
            raise ConceptGuardError(f"cannot load {name} weights from {source}: {_first_line(exc)}") from exc


def _read_state_file(path: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    if path.suffix == SAFETENSORS_SUFFIX:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        read_safetensors_header(path)
        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            raise ConceptGuardError(f"{path} is not a readable safetensors file: {_first_line(exc)}") from exc
    try:
        # weights_only refuses arbitrary objects even after the user allowed pickle files.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling raises anything from EOFError to UnpicklingError
        raise ConceptGuardError(f"{path} is not a readable PyTorch checkpoint: {_first_line(exc)}") from exc
    # Original LDM checkpoints wrap the weights; a few tools wrap them once more.
    while isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ConceptGuardError(f"{path} does not hold a state dict")
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def _load_single_file(path: Path, allow_pickle: bool, config_dir, torch_dtype):
    is_pickle = path.suffix in PICKLE_SUFFIXES
    if is_pickle and not allow_pickle:
        raise ConceptGuardError(
            f"{path} is a pickle checkpoint, which can run arbitrary code when loaded; convert it to "
            f"safetensors or pass --allow-pickle if you trust the source")
    if not is_pickle and path.suffix != SAFETENSORS_SUFFIX:
        raise ConceptGuardError(
            f"unsupported model file {path}: expected a diffusers folder or a .safetensors checkpoint")
    if config_dir is not None:
        config_dir = Path(config_dir).expanduser()
        if not config_dir.is_dir():
            raise ConceptGuardError(f"config folder not found: {config_dir}")

    keys = safetensors_keys(path) if not is_pickle else None
    state = None
    if keys is None:
        state = _read_state_file(path, allow_pickle)
        keys = sorted(state)
    if not keys:
        raise ConceptGuardError(f"{path} holds no tensors")

    if _has_diffusers_prefixes(keys):
        if config_dir is not None:
            pipe = _load_folder(config_dir, allow_pickle, torch.float32)
            architecture = f"pipeline in {config_dir}"
        else:
            pipe = load_embedded()
            architecture = "embedded pipeline"
        _load_state_into(pipe, state if state is not None else _read_state_file(path, allow_pickle), path, architecture)
        return pipe

    # An original LDM/SD checkpoint: diffusers converts it, but offline it cannot fetch the
    # matching diffusers configs, so the user must point at a local folder of the same family.
    if config_dir is None:
        raise ConceptGuardError(
            f"{path} is a single-file (original SD) checkpoint; loading it offline needs --config-dir DIR, "
            f"a local diffusers pipeline folder of the same model family")
    class_name = _check_config_folder(config_dir)
    pipeline_cls = _pipeline_class(class_name)
    try:
        return pipeline_cls.from_single_file(
            str(path),
            config=str(config_dir),
            local_files_only=True,
            dtype=torch_dtype,  # diffusers' current name for torch_dtype
            **_no_safety_checker_kwargs(class_name),
        )
    except Exception as exc:  # conversion errors come in many types; the first line says enough
        raise ConceptGuardError(f"cannot load single-file checkpoint {path}: {_first_line(exc)}") from exc


def _check_config_folder(folder: Path) -> str:
    if not (folder / "model_index.json").is_file():
        raise ConceptGuardError(f"config folder {folder} is not a diffusers pipeline folder (no model_index.json)")
    return _index_class_name(folder)


def load_embedded():
    """The embedded world model (a tiny SD-1 pipeline shipped with the package)."""
    _pipeline_class("StableDiffusionPipeline")  # so that quiet_libraries() applies to the world's loading
    from conceptguard.world import load_embedded_pipeline

    return load_embedded_pipeline()


def load_pipeline(
    source: str | Path | None = None,
    *,
    allow_pickle: bool = False,
    config_dir: str | Path | None = None,
    torch_dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
):
    """Load a Stable Diffusion (1.x, 2.x) or SDXL pipeline from a local source.

    ``source`` is ``None``/``"embedded"`` (the embedded world model), a diffusers pipeline folder,
    or a single ``.safetensors`` file. A file whose keys carry diffusers component prefixes
    (``unet.``, ``text_encoder.`` ...) is loaded strictly into the architecture of ``config_dir``
    (or of the embedded model when shapes match); any other file is converted as an original
    SD checkpoint with diffusers' ``from_single_file``, which offline needs ``config_dir``.
    Pickle files are refused unless ``allow_pickle``. The safety checker is always disabled.
    """
    if source is None or (isinstance(source, str) and source in EMBEDDED_NAMES):
        return _finish(load_embedded(), torch_dtype, device)
    path = Path(source).expanduser()
    if not path.exists():
        raise ConceptGuardError(f"model path not found: {path}")
    if path.is_dir():
        pipe = _load_folder(path, allow_pickle, torch_dtype)
    elif path.is_file():
        pipe = _load_single_file(path, allow_pickle, config_dir, torch_dtype)
    else:
        raise ConceptGuardError(f"model path {path} is neither a folder nor a file")
    return _finish(pipe, torch_dtype, device)
