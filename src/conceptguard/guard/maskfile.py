"""The guard-mask file: which UNet tensors a model's publisher freezes, by name, with provenance.

A mask is one ``.safetensors`` file::

    <tensor name>         uint8 scalar: 1 = frozen, 0 = trainable (one key per UNet parameter)
    soft/<tensor name>    float32 scalar: the learned soft mask m = sigmoid(x / T) of that tensor
    __metadata__          format tag, the manifest (JSON) and the sha256 of manifest + tensors

Keys are the diffusers parameter names, never positions: the public FreezeAsGuard code saves a
nameless column in parameter order, which silently freezes the wrong tensors on any architecture
difference. Here a mask is refused unless it names exactly the model's tensors *and* the model's
content hash (:func:`conceptguard.models.io.content_hash`) is the one it was learned for.

The manifest records the base model's content hash and family, the target ratio ρ and the ratios
reached (of tensors, exactly ρ up to rounding, and of parameters), the domains the mask was
learned from (folder paths and a hash of their files), the method and its config, and the
conceptguard version. The ``sha256`` covers the manifest and every tensor, so a mask edited by
hand (a tensor unfrozen, the base hash rewritten) is refused. It is an integrity check, not a
signature: whoever can write the file can recompute it — enforcement relies on the publisher
controlling the fine-tuning API, as in the paper.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from conceptguard import __version__
from conceptguard.errors import ConceptGuardError

MASK_FORMAT = "conceptguard-guard-mask"
MASK_FORMAT_VERSION = 1
SOFT_PREFIX = "soft/"  # "/" never occurs in torch parameter names, so soft keys cannot collide


def exact_count(ratio: float, total: int) -> int:
    """How many of ``total`` tensors a ratio freezes: ``ratio * total`` rounded half up."""
    if not 0.0 <= ratio <= 1.0:
        raise ConceptGuardError(f"freeze ratio must lie in [0, 1], got {ratio}")
    return min(total, int(math.floor(ratio * total + 0.5)))


def top_k_frozen(soft: Mapping[str, float], ratio: float) -> list[str]:
    """The ``exact_count(ratio, N)`` tensors with the largest soft mask, sorted by name.

    Thresholding (or rounding) the soft mask, as the public code does, misses the target ratio by
    however many values sit on the wrong side of 0.5; taking the top k hits it exactly. Ties are
    broken by name so that the result never depends on dict order.
    """
    k = exact_count(ratio, len(soft))
    ranked = sorted(soft, key=lambda name: (-float(soft[name]), name))
    return sorted(ranked[:k])


def random_frozen(names: Iterable[str], ratio: float, seed: int) -> list[str]:
    """The Random-ρ baseline: exactly ``exact_count(ratio, N)`` tensors, chosen by ``seed``.

    The choice depends only on the sorted names and the seed (not on the global RNG or on the
    order the model lists its parameters).
    """
    names = sorted(names)
    k = exact_count(ratio, len(names))
    order = torch.randperm(len(names), generator=torch.Generator().manual_seed(int(seed))).tolist()
    return sorted(names[i] for i in order[:k])


def describe_data(data: Any) -> dict[str, Any]:
    """Provenance of a training domain: a folder's path and a hash of its files, or in-memory pairs.

    The folder hash covers every file's relative path, size and content, so the manifest tells
    whether a mask was learned from the data set a reader has in front of them.
    """
    if isinstance(data, (str, Path)):
        folder = Path(data)
        if not folder.is_dir():
            raise ConceptGuardError(f"data folder not found: {folder}")
        hasher = hashlib.sha256()
        files = sorted(p for p in folder.rglob("*") if p.is_file())
        for path in files:
            relative = path.relative_to(folder).as_posix()
            hasher.update(f"{relative}|{path.stat().st_size}\n".encode())
            hasher.update(hashlib.sha256(path.read_bytes()).digest())
        return {"path": str(folder.absolute()), "files": len(files), "sha256": hasher.hexdigest()}
    pairs = list(data)
    hasher = hashlib.sha256()
    for image, caption in pairs:
        array = image if isinstance(image, torch.Tensor) else torch.as_tensor(image)
        hasher.update(f"{caption}|{tuple(array.shape)}\n".encode())
        hasher.update(array.contiguous().numpy().tobytes())
    return {"path": None, "pairs": len(pairs), "sha256": hasher.hexdigest()}


def _payload_sha256(tensors: Mapping[str, torch.Tensor], manifest_json: str) -> str:
    hasher = hashlib.sha256()
    hasher.update(manifest_json.encode())
    for key in sorted(tensors):
        tensor = tensors[key].contiguous()
        hasher.update(f"\n{key}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        hasher.update(tensor.numpy().tobytes())
    return hasher.hexdigest()


@dataclass
class GuardMask:
    """A binary freeze mask over a UNet's tensors, by name, with its soft values and manifest.

    ``soft`` holds every tensor name of the model (the frozen ones and the rest); ``frozen`` is
    the subset that fine-tuning must leave untouched.
    """

    frozen: frozenset[str]
    soft: dict[str, float]
    manifest: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    def __post_init__(self) -> None:
        self.frozen = frozenset(self.frozen)
        unknown = sorted(self.frozen - set(self.soft))
        if unknown:
            raise ValueError(f"frozen tensor {unknown[0]!r} is not among the mask's tensor names")

    @property
    def names(self) -> list[str]:
        return sorted(self.soft)

    @property
    def base_model_hash(self) -> str:
        return str(self.manifest.get("base_model_hash", ""))

    @property
    def sha256(self) -> str:
        """The payload hash this mask is (or would be) stored with."""
        tensors, manifest_json = self._tensors_and_manifest()
        return _payload_sha256(tensors, manifest_json)

    def describe(self) -> str:
        m = self.manifest
        return (f"{m.get('method', '?')} mask: {m.get('frozen_tensors', len(self.frozen))}/"
                f"{m.get('total_tensors', len(self.soft))} tensors frozen ({100 * m.get('ratio_tensors', 0):.1f}% of "
                f"tensors, {100 * m.get('ratio_parameters', 0):.1f}% of parameters; target "
                f"{100 * m.get('ratio', 0):.1f}%)")

    # --- checks ------------------------------------------------------------------------------

    def check_model(self, pipe, model_hash: str | None = None) -> None:
        """Refuse (ConceptGuardError) unless this mask was made for exactly ``pipe``'s weights."""
        from conceptguard.models.io import content_hash

        where = f"guard mask {self.path}" if self.path else "guard mask"
        actual = model_hash or content_hash(pipe)
        if self.base_model_hash != actual:
            raise ConceptGuardError(
                f"{where} was made for model {self.base_model_hash[:16]}... but this model hashes to "
                f"{actual[:16]}...; use the mask published with this model")
        names = {name for name, _ in pipe.unet.named_parameters()}
        if names != set(self.soft):
            missing, extra = sorted(names - set(self.soft)), sorted(set(self.soft) - names)
            detail = f"lacks {missing[0]!r}" if missing else f"names {extra[0]!r}, which the UNet does not have"
            raise ConceptGuardError(f"{where} does not match this UNet's tensors: it {detail}")

    # --- file I/O ----------------------------------------------------------------------------

    def _tensors_and_manifest(self) -> tuple[dict[str, torch.Tensor], str]:
        tensors: dict[str, torch.Tensor] = {}
        for name in sorted(self.soft):
            tensors[name] = torch.tensor(1 if name in self.frozen else 0, dtype=torch.uint8)
            tensors[SOFT_PREFIX + name] = torch.tensor(float(self.soft[name]), dtype=torch.float32)
        return tensors, json.dumps(self.manifest, sort_keys=True, default=str)

    def save(self, path: str | Path) -> Path:
        """Write the mask atomically (readers see the old file or the new one, never a part)."""
        from safetensors.torch import save as save_bytes

        from conceptguard.outputs import atomic_write_bytes

        tensors, manifest_json = self._tensors_and_manifest()
        metadata = {
            "format": MASK_FORMAT,
            "format_version": str(MASK_FORMAT_VERSION),
            "manifest": manifest_json,
            "sha256": _payload_sha256(tensors, manifest_json),
        }
        path = atomic_write_bytes(Path(path), save_bytes(tensors, metadata=metadata))
        self.path = path
        return path

    @classmethod
    def load(cls, path: str | Path) -> GuardMask:
        """Read and verify a mask file; any damage or tampering is a one-line ConceptGuardError."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        from conceptguard.models.io import read_safetensors_header

        path = Path(path)
        if not path.is_file():
            raise ConceptGuardError(f"guard mask not found: {path}")
        metadata = read_safetensors_header(path).get("__metadata__") or {}
        if metadata.get("format") != MASK_FORMAT:
            raise ConceptGuardError(f"{path} is not a conceptguard guard mask (no '{MASK_FORMAT}' format tag)")
        if metadata.get("format_version") != str(MASK_FORMAT_VERSION):
            raise ConceptGuardError(
                f"{path} has mask format version {metadata.get('format_version')!r}; this conceptguard reads "
                f"version {MASK_FORMAT_VERSION}")
        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError) as exc:
            raise ConceptGuardError(f"cannot read guard mask {path}: {exc}") from exc
        manifest_json = metadata.get("manifest", "")
        if _payload_sha256(tensors, manifest_json) != metadata.get("sha256"):
            raise ConceptGuardError(
                f"guard mask {path} was modified after it was written (its sha256 does not match); "
                "use the mask as published")
        manifest = json.loads(manifest_json)
        soft = {key[len(SOFT_PREFIX):]: float(value) for key, value in tensors.items() if key.startswith(SOFT_PREFIX)}
        binary = {key: int(value) for key, value in tensors.items() if not key.startswith(SOFT_PREFIX)}
        if set(binary) != set(soft) or any(v not in (0, 1) for v in binary.values()):
            raise ConceptGuardError(f"guard mask {path} is malformed: every tensor needs a 0/1 and a soft value")
        return cls(frozenset(n for n, v in binary.items() if v == 1), soft, manifest, path)


def build_manifest(pipe, *, method: str, ratio: float, frozen: Iterable[str], model_hash: str,
                   config: Mapping[str, Any] | None = None,
                   domains: Mapping[str, list[dict[str, Any]]] | None = None) -> dict[str, Any]:
    """The manifest of a mask over ``pipe.unet``: provenance plus the ratios actually reached."""
    from conceptguard.models.io import detect_family

    params = dict(pipe.unet.named_parameters())
    frozen = set(frozen)
    frozen_params = sum(params[name].numel() for name in frozen)
    total_params = sum(p.numel() for p in params.values())
    return {
        "format": MASK_FORMAT,
        "conceptguard_version": __version__,
        "method": method,
        "base_model_hash": model_hash,
        "family": detect_family(pipe),
        "ratio": float(ratio),
        "frozen_tensors": len(frozen),
        "total_tensors": len(params),
        "ratio_tensors": len(frozen) / len(params),
        "frozen_parameters": frozen_params,
        "total_parameters": total_params,
        "ratio_parameters": frozen_params / total_params,
        "domains": dict(domains or {}),
        "config": dict(config or {}),
    }


def random_mask(pipe, ratio: float, seed: int = 0, *, model_hash: str | None = None) -> GuardMask:
    """A Random-ρ baseline mask for ``pipe``, in the same format as a learned one."""
    from conceptguard.models.io import content_hash

    names = [name for name, _ in pipe.unet.named_parameters()]
    frozen = set(random_frozen(names, ratio, seed))
    manifest = build_manifest(pipe, method="random", ratio=ratio, frozen=frozen,
                              model_hash=model_hash or content_hash(pipe), config={"seed": seed})
    soft = {name: 1.0 if name in frozen else 0.0 for name in names}
    return GuardMask(frozenset(frozen), soft, manifest)


def load_mask(mask: str | Path | GuardMask) -> GuardMask:
    return mask if isinstance(mask, GuardMask) else GuardMask.load(mask)
