"""The evaluation harness: seeded images from a model (and its base), scored, written to a run folder.

``evaluate`` generates one image per prompt record, sharded over the processes of an
``accelerate`` launch, scores them on the main process and writes::

    OUT/results.json         config, versions, scorer settings, metrics, one record per image
    OUT/images/model/*.png   the evaluated model's images, named by record index
    OUT/images/base/*.png    the base model's images with the same prompts and seeds (with a base)
    OUT/timing.json          wall-clock seconds (kept out of results.json, which is reproducible)

Reproducibility: an image depends only on (model, prompt, seed) — see
:func:`conceptguard.sampling.generate_images` — and the harness cuts the records into the same
fixed batches whatever the number of processes (processes receive whole batches), so the
batch composition, and hence every float, is the same with 1 or N processes. Scoring runs on the
main process alone, in a fixed order, so results.json is byte-identical across runs and process
counts. results.json holds no paths of the run folder and no timings.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from conceptguard.errors import ConceptGuardError
from conceptguard.evaluation import metrics as M
from conceptguard.evaluation.prompts import (
    GROUPS,
    PromptRecord,
    check_concepts,
    concept_head,
    is_builtin,
    prompt_set_digest,
    resolve_prompt_set,
)
from conceptguard.evaluation.sources import ImageSource

RESULTS_FORMAT = "conceptguard-eval"
RESULTS_VERSION = 1
RESULTS_FILE = "results.json"
TIMING_FILE = "timing.json"
IMAGES_DIR = "images"

METRICS = ("detection", "preservation", "clip", "fid", "lpips", "nudenet")
ROUND = 6  # decimals kept in results.json: far below any meaningful difference, easy to read

# The 2-D features compared by the LPIPS-like distance and FID need images of the scorer's size.
_SCORE_BATCH = 64


# --------------------------------------------------------------------------------------------
# Scorers: the models that read images
# --------------------------------------------------------------------------------------------

class Scorer(Protocol):
    """What the harness needs from the models that score images.

    ``supports`` names the metrics (of :data:`METRICS`, minus nudenet) the scorer can compute;
    the harness calls only the methods those metrics need.
    """

    supports: frozenset[str]

    def describe(self) -> dict: ...

    def labels(self, images: np.ndarray) -> list[dict[str, str]]: ...

    def clip_scores(self, images: np.ndarray, prompts: Sequence[str]) -> np.ndarray: ...

    def fid_features(self, images: np.ndarray) -> np.ndarray: ...

    def fid_reference(self, records: Sequence[PromptRecord], base_images: np.ndarray | None) -> tuple[np.ndarray, str]: ...

    def distances(self, images_a: np.ndarray, images_b: np.ndarray) -> np.ndarray: ...


def _pooled(output) -> torch.Tensor:
    # transformers 5 returns a model output whose pooler_output is the projected embedding.
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _batches(n: int, size: int = _SCORE_BATCH) -> Iterable[slice]:
    return (slice(i, i + size) for i in range(0, n, size))


def _sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _weights_digest(folder: Path) -> str:
    """sha256 over a model folder's files (names and bytes, sorted), to pin a scorer's version."""
    hasher = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        hasher.update(path.relative_to(folder).as_posix().encode() + b"\n")
        hasher.update(_sha256_file(path).encode())
    return hasher.hexdigest()


class WorldScorer:
    """Scores images with the embedded world's detector and CLIP.

    - detection / preservation: detector heads (argmax of each head's logits);
    - CLIP score: the world CLIP's image and text embeddings;
    - FID: ``detector.features`` (256-d) of generated images vs rendered world images of the same
      labels (the world's ground truth, as COCO images are for COCO captions);
    - LPIPS-like: ``detector.feature_maps`` (four stages).

    Images of another size than the world's 64×64 are resized (bicubic) before scoring.
    """

    supports = frozenset({"detection", "preservation", "clip", "fid", "lpips"})

    def __init__(self, detector, clip_model, tokenizer, *, info: dict | None = None):
        self.detector, self.clip_model, self.tokenizer = detector, clip_model, tokenizer
        self.info = dict(info or {})

    @classmethod
    def from_assets(cls, assets: str | Path | None = None) -> "WorldScorer":
        """Load the detector and CLIP from the world's assets (default: the shipped ones)."""
        from conceptguard.world import ASSETS_DIR, load_clip, load_detector

        assets = Path(assets) if assets is not None else ASSETS_DIR
        detector = load_detector(assets)
        clip_model, tokenizer = load_clip(assets)
        manifest = json.loads((assets / "manifest.json").read_text())
        files = manifest.get("files", {})
        info = {
            "manifest_sha256": _sha256_file(assets / "manifest.json"),
            "detector_sha256": files.get("detector/model.safetensors"),
            "clip_sha256": files.get("clip/model.safetensors"),
        }
        return cls(detector, clip_model, tokenizer, info=info)

    def describe(self) -> dict:
        return {
            "kind": "world",
            **self.info,
            "image_size": 64,
            "resize": "bicubic to 64x64 when images differ",
            "detector_decision": "argmax of each head's logits (halo: present when its logit is the larger)",
            "clip_score": "100 * max(cos(image, text), 0), world CLIP",
            "fid_features": "detector.features (256-d); reference: rendered world images of the prompted labels",
            "lpips_features": "detector.feature_maps (4 stages), unit-normalised per position, squared differences",
        }

    def _tensor(self, images: np.ndarray) -> torch.Tensor:
        from conceptguard.world.dataset import images_to_tensor

        return images_to_tensor(_resize(images, 64))

    @torch.no_grad()
    def labels(self, images):
        found = self.detector.predict(self._tensor(images))
        return [{head: found[head][i] for head in found} for i in range(len(images))]

    @torch.no_grad()
    def clip_scores(self, images, prompts):
        from conceptguard.world.models import MAX_TOKENS

        scores = []
        for part in _batches(len(images)):
            ids = self.tokenizer(list(prompts[part]), padding="max_length", max_length=MAX_TOKENS, truncation=True,
                                 return_tensors="pt").input_ids
            text = _pooled(self.clip_model.get_text_features(input_ids=ids))
            image = _pooled(self.clip_model.get_image_features(pixel_values=self._tensor(images[part])))
            scores.append(M.clip_score(image, text))
        return torch.cat(scores).numpy()

    @torch.no_grad()
    def fid_features(self, images):
        return torch.cat([self.detector.features(self._tensor(images[p])) for p in _batches(len(images))]).double().numpy()

    def fid_reference(self, records, base_images):
        from conceptguard.world.render import render

        # Render each prompted scene with its own rng, so the reference is fixed per record.
        rendered = np.stack([render(r.expected, np.random.default_rng([r.seed, 99])) for r in records])
        return self.fid_features(rendered), "rendered world images of the prompted labels"

    @torch.no_grad()
    def distances(self, images_a, images_b):
        out = []
        for part in _batches(len(images_a)):
            maps_a = self.detector.feature_maps(self._tensor(images_a[part]))
            maps_b = self.detector.feature_maps(self._tensor(images_b[part]))
            out.append(M.lpips_like(maps_a, maps_b))
        return torch.cat(out).numpy()


class ExternalScorer:
    """Scores a real model's images with models from local paths (nothing is downloaded).

    - CLIP score and the LPIPS-like distance: a transformers CLIP folder (``clip_path``); the
      distance uses the vision tower's hidden states (patch tokens as positions);
    - FID: torchmetrics' Inception (torch-fidelity's FID Inception weights from
      ``inception_path``), against a folder of reference images or, without one, the base
      model's images.
    """

    def __init__(self, clip_path: str | Path | None = None, inception_path: str | Path | None = None,
                 fid_reference: str | Path | None = None):
        self.clip_path = Path(clip_path) if clip_path else None
        self.inception_path = Path(inception_path) if inception_path else None
        self.fid_reference_dir = Path(fid_reference) if fid_reference else None
        supports = set()
        if self.clip_path:
            if not self.clip_path.is_dir():
                raise ConceptGuardError(f"CLIP folder not found: {self.clip_path}")
            supports |= {"clip", "lpips"}
        if self.inception_path:
            if not self.inception_path.is_file():
                raise ConceptGuardError(f"Inception weights not found: {self.inception_path}")
            supports.add("fid")
        self.supports = frozenset(supports)
        self._clip = self._inception = None

    def describe(self) -> dict:
        info: dict = {"kind": "external"}
        if self.clip_path:
            info["clip"] = {"path": str(self.clip_path), "sha256": _weights_digest(self.clip_path),
                            "clip_score": "100 * max(cos(image, text), 0)",
                            "lpips_features": "CLIP vision hidden states, unit-normalised per token"}
        if self.inception_path:
            info["fid"] = {"inception": str(self.inception_path), "sha256": _sha256_file(self.inception_path),
                           "features": "torchmetrics NoTrainInceptionV3 pool3 (2048-d)",
                           "reference": str(self.fid_reference_dir) if self.fid_reference_dir else "base model images"}
        return info

    def _load_clip(self):
        if self._clip is None:
            from transformers import CLIPModel, CLIPProcessor

            try:
                model = CLIPModel.from_pretrained(self.clip_path, local_files_only=True).eval()
                processor = CLIPProcessor.from_pretrained(self.clip_path, local_files_only=True)
            except (OSError, ValueError) as exc:
                raise ConceptGuardError(f"cannot load a CLIP model from {self.clip_path}: {exc}") from exc
            self._clip = (model, processor)
        return self._clip

    def _load_inception(self):
        if self._inception is None:
            from torchmetrics.image import fid

            if not fid._TORCH_FIDELITY_AVAILABLE:
                raise ConceptGuardError("FID on a real model needs torch-fidelity: pip install torch-fidelity")
            self._inception = fid.NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                                     feature_extractor_weights_path=str(self.inception_path)).eval()
        return self._inception

    def labels(self, images):
        raise ConceptGuardError("detector metrics need the embedded world's detector (a world model and prompt set)")

    @torch.no_grad()
    def clip_scores(self, images, prompts):
        model, processor = self._load_clip()
        scores = []
        for part in _batches(len(images), 16):
            inputs = processor(text=list(prompts[part]), images=list(images[part]), return_tensors="pt",
                               padding=True, truncation=True)
            text = _pooled(model.get_text_features(input_ids=inputs["input_ids"],
                                                   attention_mask=inputs["attention_mask"]))
            image = _pooled(model.get_image_features(pixel_values=inputs["pixel_values"]))
            scores.append(M.clip_score(image, text))
        return torch.cat(scores).numpy()

    @torch.no_grad()
    def fid_features(self, images):
        inception = self._load_inception()
        feats = [inception(torch.from_numpy(images[p]).permute(0, 3, 1, 2).contiguous()) for p in _batches(len(images), 16)]
        return torch.cat(feats).double().numpy()

    def fid_reference(self, records, base_images):
        if self.fid_reference_dir is not None:
            from PIL import Image

            paths = sorted(p for p in self.fid_reference_dir.iterdir()
                           if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))
            if len(paths) < 2:
                raise ConceptGuardError(f"FID reference folder {self.fid_reference_dir} needs at least two images")
            images = np.stack([np.asarray(Image.open(p).convert("RGB").resize((299, 299), Image.BICUBIC))
                               for p in paths])
            return self.fid_features(images), f"{len(paths)} images in {self.fid_reference_dir}"
        if base_images is None:
            raise ConceptGuardError("FID on a real model needs reference images: pass --fid-reference DIR or --base")
        return self.fid_features(base_images), "base model images with the same prompts and seeds"

    @torch.no_grad()
    def distances(self, images_a, images_b):
        model, processor = self._load_clip()
        out = []
        for part in _batches(len(images_a), 16):
            maps = []
            for images in (images_a[part], images_b[part]):
                pixels = processor(images=list(images), return_tensors="pt")["pixel_values"]
                hidden = model.vision_model(pixel_values=pixels, output_hidden_states=True).hidden_states[1:]
                # (N, tokens, D) -> (N, D, tokens, 1), dropping the class token: positions are patches.
                maps.append([h[:, 1:].transpose(1, 2).unsqueeze(-1) for h in hidden])
            out.append(M.lpips_like(maps[0], maps[1]))
        return torch.cat(out).numpy()


def _resize(images: np.ndarray, size: int) -> np.ndarray:
    if images.shape[1:3] == (size, size):
        return images
    from PIL import Image

    return np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.BICUBIC)) for im in images])


# --------------------------------------------------------------------------------------------
# Sharded generation
# --------------------------------------------------------------------------------------------

def fixed_batches(records: Sequence[PromptRecord], batch_size: int, guidance_scale: float) -> list[tuple[float, list[int]]]:
    """Cut the records into consecutive batches of equal guidance, at most ``batch_size`` each.

    The cut depends only on the records, never on the number of processes: processes then receive
    whole batches, so every image is computed in the same batch whatever the sharding.
    """
    batches: list[tuple[float, list[int]]] = []
    for i, record in enumerate(records):
        guidance = record.guidance_scale if record.guidance_scale is not None else guidance_scale
        if batches and batches[-1][0] == guidance and len(batches[-1][1]) < batch_size:
            batches[-1][1].append(i)
        else:
            batches.append((guidance, [i]))
    return batches


def generate_sharded(source: ImageSource, records: Sequence[PromptRecord], *, num_inference_steps: int,
                     guidance_scale: float, batch_size: int, state=None) -> np.ndarray:
    """All records' images, uint8 (N, H, W, 3), generated by the processes of ``state`` together.

    Every process returns the full array (accelerate's ``gather_object`` is an all-gather).
    """
    from accelerate import PartialState
    from accelerate.utils import gather_object

    state = state or PartialState(cpu=not torch.cuda.is_available())
    batches = fixed_batches(records, batch_size, guidance_scale)
    produced = []
    with state.split_between_processes(list(range(len(batches)))) as mine:
        for b in mine:
            guidance, indices = batches[b]
            images = source.generate([records[i].prompt for i in indices], [records[i].seed for i in indices],
                                     num_inference_steps=num_inference_steps, guidance_scale=guidance,
                                     batch_size=len(indices))
            produced.append((b, np.asarray(images, dtype=np.uint8)))
    if state.num_processes > 1:
        produced = gather_object(produced)
    produced.sort(key=lambda item: item[0])
    if [b for b, _ in produced] != list(range(len(batches))):
        raise RuntimeError("sharded generation lost or duplicated a batch")
    return np.concatenate([images for _, images in produced])


# --------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------

def _round(value):
    if isinstance(value, dict):
        return {k: _round(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_round(v) for v in value]
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return round(value, ROUND) if np.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def _group_indices(records: Sequence[PromptRecord]) -> dict[str, list[int]]:
    order = {g: k for k, g in enumerate(GROUPS)}
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        groups.setdefault(r.group, []).append(i)
    return dict(sorted(groups.items(), key=lambda item: (order.get(item[0], len(order)), item[0])))


def _mean_or_none(values: np.ndarray) -> float | None:
    return float(np.mean(values)) if len(values) else None


def _score_images(images: np.ndarray, records: Sequence[PromptRecord], *, scorer: Scorer | None,
                  metrics: set[str], erase: Sequence[str], base_images: np.ndarray | None,
                  nude_flags: list[bool] | None) -> tuple[list[dict], dict]:
    """Per-image readings and per-group summaries of one model's images."""
    from conceptguard.world.concepts import HELD_OUT_CHARACTERS

    per_image: list[dict] = [{} for _ in records]
    labels = scorer.labels(images) if {"detection", "preservation"} & metrics else None
    clip = scorer.clip_scores(images, [r.prompt for r in records]) if "clip" in metrics else None
    for i, item in enumerate(per_image):
        if labels is not None:
            item["detected"] = labels[i]
        if clip is not None:
            item["clip_score"] = float(clip[i])
        if nude_flags is not None:
            item["nude"] = nude_flags[i]

    summary: dict = {"groups": {}}
    for group, indices in _group_indices(records).items():
        entry: dict = {"n": len(indices)}
        if labels is not None and "detection" in metrics and erase:
            entry["detection"] = {}
            for concept in erase:
                head, label = concept_head(concept)
                # Concept groups count the prompts written for this concept; other groups all images.
                chosen = [i for i in indices if records[i].concept in (None, concept)]
                if chosen:  # e.g. no implicit prompts exist for a circle
                    entry["detection"][concept] = M.detection_rate([labels[i] for i in chosen], head, label)
        if clip is not None:
            entry["clip_score"] = _mean_or_none(clip[indices])
        if nude_flags is not None:
            entry["nude_rate"] = _mean_or_none(np.array([nude_flags[i] for i in indices], dtype=float))
        summary["groups"][group] = entry

    preserved = [i for i, r in enumerate(records) if r.group == "preservation" and r.expected]
    if labels is not None and "preservation" in metrics and preserved:
        summary["preservation"] = M.preservation_scores([records[i].expected for i in preserved],
                                                        [labels[i] for i in preserved], HELD_OUT_CHARACTERS)
    if "fid" in metrics:
        # World: the "COCO" images against the world's ground truth; real models: every image.
        chosen = preserved if isinstance(scorer, WorldScorer) else list(range(len(records)))
        if len(chosen) >= 2:
            reference, description = scorer.fid_reference([records[i] for i in chosen],
                                                          None if base_images is None else base_images[chosen])
            summary["fid"] = {"value": M.frechet_distance(scorer.fid_features(images[chosen]), reference),
                              "images": len(chosen), "reference_images": len(reference), "reference": description}
    return per_image, summary


def _comparison(model: dict, base: dict, distances: np.ndarray | None, records: Sequence[PromptRecord]) -> dict:
    out: dict = {}
    if "preservation" in model and "preservation" in base:
        out["preservation_drop"] = {k: (None if base["preservation"][k] is None or model["preservation"][k] is None
                                        else base["preservation"][k] - model["preservation"][k])
                                    for k in model["preservation"]}
    if distances is not None:
        out["lpips"] = {group: _mean_or_none(distances[indices]) for group, indices in _group_indices(records).items()}
        out["lpips"]["all"] = _mean_or_none(distances)
    return out


def _nudenet_flags(paths: Sequence[Path], detector) -> list[bool]:
    return [M.nudenet_flagged(detector.detect(str(p))) for p in paths]


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------

def _png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def _write_images(out_dir: Path, sub: str, images: np.ndarray) -> list[str]:
    from conceptguard.outputs import atomic_write_bytes

    names = []
    for i, image in enumerate(images):
        name = f"{IMAGES_DIR}/{sub}/{i:05d}.png"
        atomic_write_bytes(out_dir / name, _png_bytes(image))
        names.append(name)
    return names


def _pixel_digest(image: np.ndarray) -> str:
    # Hash of the pixels, not of the PNG file: PNG encoders may differ across Pillow versions.
    return hashlib.sha256(np.ascontiguousarray(image).tobytes()).hexdigest()


def _versions() -> dict:
    import accelerate
    import diffusers
    import transformers

    from conceptguard import __version__

    return {"conceptguard": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "accelerate": accelerate.__version__, "numpy": np.__version__}


def _source_info(source: ImageSource, extra: dict | None) -> dict:
    from conceptguard.models.io import content_hash

    info = {"source": getattr(source, "name", type(source).__name__)}
    pipe = getattr(source, "pipe", None)
    if pipe is not None:
        info["content_hash"] = content_hash(pipe)
    info.update(extra or {})
    return info


def _check_out_dir(out_dir: Path, overwrite: bool) -> None:
    if (out_dir / RESULTS_FILE).exists() and not overwrite:
        raise ConceptGuardError(f"{out_dir} already holds evaluation results; choose another --out or pass --overwrite")
    if out_dir.exists() and not out_dir.is_dir():
        raise ConceptGuardError(f"output path {out_dir} exists and is not a folder")


def _resolve_metrics(requested: Iterable[str] | None, scorer: Scorer | None, *, has_base: bool,
                     records: Sequence[PromptRecord], erase: Sequence[str]) -> set[str]:
    supported = set(scorer.supports) if scorer is not None else set()
    if requested is None:
        chosen = set(supported)
        if not has_base:
            chosen.discard("lpips")
        if not any(r.group == "preservation" and r.expected for r in records):
            chosen -= {"preservation"}
        if not erase:
            chosen.discard("detection")
        if isinstance(scorer, WorldScorer) and not any(r.group == "preservation" and r.expected for r in records):
            chosen.discard("fid")  # the world's FID reference is the preservation scenes
        if isinstance(scorer, ExternalScorer) and scorer.fid_reference_dir is None and not has_base:
            chosen.discard("fid")  # nothing to compare with
        return chosen
    chosen = set(requested)
    unknown = chosen - set(METRICS)
    if unknown:
        raise ConceptGuardError(f"unknown metric(s) {', '.join(sorted(unknown))}; known: {', '.join(METRICS)}")
    needs = {
        "detection": "the embedded world's detector (a world prompt set) and --erase concepts",
        "preservation": "the embedded world's detector and a prompt set with preservation prompts",
        "clip": "a CLIP model: the world's, or --clip PATH for a real model",
        "fid": "an Inception network for a real model: --inception PATH (torch-fidelity FID weights)",
        "lpips": "a feature network (the world's detector, or --clip PATH) and --base",
    }
    for metric in sorted(chosen - {"nudenet"}):
        missing = metric not in supported or (metric == "lpips" and not has_base) or (
            metric == "detection" and not erase)
        if (metric == "fid" and isinstance(scorer, ExternalScorer) and scorer.fid_reference_dir is None
                and not has_base):
            raise ConceptGuardError("FID on a real model needs reference images: pass --fid-reference DIR or --base")
        if missing:
            raise ConceptGuardError(f"metric {metric!r} needs {needs[metric]}")
    return chosen


# --------------------------------------------------------------------------------------------
# The entry point
# --------------------------------------------------------------------------------------------

def evaluate(model_source: ImageSource, *, erase: Sequence[str] = (),
             prompt_set: str | Path | Sequence[PromptRecord] = "quick",
             base_source: ImageSource | None = None, seed: int = 0, n_per_prompt: int = 1,
             num_inference_steps: int = 25, guidance_scale: float = 7.5, batch_size: int = 32,
             out_dir: str | Path, scorer: Scorer | str | None = "auto", metrics: Iterable[str] | None = None,
             nudenet: bool = False, world_assets: str | Path | None = None, model_info: dict | None = None,
             base_info: dict | None = None, overwrite: bool = False, state=None) -> dict:
    """Evaluate ``model_source`` on a prompt set; writes ``out_dir`` and returns the results dict.

    - ``erase``: canonical world concepts the model should no longer draw (built-in sets are built
      for them; their detection rates are reported on every group);
    - ``prompt_set``: a built-in set name (:data:`conceptguard.evaluation.prompts.BUILTIN_SETS`),
      a CSV path or a list of :class:`PromptRecord`; ``n_per_prompt`` images per record (seeds
      ``s, s+1, ...``);
    - ``base_source``: the unedited model, for the LPIPS-like distance and preservation drop;
    - ``scorer``: ``"auto"`` (the world's detector and CLIP for a built-in set, none for a CSV),
      ``"world"``, ``None`` (images only), or a :class:`Scorer` such as :class:`ExternalScorer`;
      ``world_assets`` points the world scorer at other assets than the shipped ones;
    - ``metrics``: subset of :data:`METRICS` (default: everything the scorer and run support);
      ``nudenet=True`` adds NudeNet's %nude;
    - ``state``: an ``accelerate.PartialState``; under ``accelerate launch`` the processes share
      the generation, the main process scores and writes, and every process returns the results.
    """
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list

    # Without an explicit state, a launch on a machine without CUDA shares the work over gloo.
    state = state or PartialState(cpu=not torch.cuda.is_available())
    out_dir = Path(out_dir)
    _check_out_dir(out_dir, overwrite)
    builtin = is_builtin(prompt_set)
    if builtin:
        erase = check_concepts(erase)  # before loading anything: a typo fails at once
    if isinstance(prompt_set, (list, tuple)):
        prompt_set_name, prompt_set_kind = "custom", "records"
        builtin = any(r.expected for r in prompt_set)  # records from the world's sets carry labels
    elif builtin:
        prompt_set_name, prompt_set_kind = str(prompt_set), "builtin"
    else:
        prompt_set_name, prompt_set_kind = Path(prompt_set).name, "csv"
    if scorer == "auto":
        scorer = WorldScorer.from_assets(world_assets) if builtin else None
    elif scorer == "world":
        scorer = WorldScorer.from_assets(world_assets)
    # World concepts must be canonical names; for a real model they are free text (e.g. "nudity").
    erase = check_concepts(erase) if builtin or isinstance(scorer, WorldScorer) else list(dict.fromkeys(erase))
    records = resolve_prompt_set(prompt_set, erase, seed=seed, n_per_prompt=n_per_prompt)
    chosen = _resolve_metrics(metrics, scorer, has_base=base_source is not None, records=records, erase=erase)
    if nudenet:
        chosen.add("nudenet")
    nude_detector = nude_version = None
    if "nudenet" in chosen:
        nude_detector, nude_version = M.load_nudenet()  # fail before generating anything

    started = time.perf_counter()
    common = dict(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, batch_size=batch_size,
                  state=state)
    images = generate_sharded(model_source, records, **common)
    base_images = generate_sharded(base_source, records, **common) if base_source is not None else None
    generated = time.perf_counter()

    result = None
    if state.is_main_process:
        if overwrite:
            shutil.rmtree(out_dir / IMAGES_DIR, ignore_errors=True)
            (out_dir / RESULTS_FILE).unlink(missing_ok=True)
        files = _write_images(out_dir, "model", images)
        base_files = _write_images(out_dir, "base", base_images) if base_images is not None else None
        model_nude = base_nude = None
        if nude_detector is not None:
            model_nude = _nudenet_flags([out_dir / f for f in files], nude_detector)
            if base_files is not None:
                base_nude = _nudenet_flags([out_dir / f for f in base_files], nude_detector)
        per_image, model_summary = _score_images(images, records, scorer=scorer, metrics=chosen, erase=erase,
                                                 base_images=base_images, nude_flags=model_nude)
        summaries = {"model": model_summary}
        base_per_image = None
        if base_images is not None:
            base_metrics = chosen - {"fid"} if not isinstance(scorer, WorldScorer) else chosen
            base_per_image, summaries["base"] = _score_images(base_images, records, scorer=scorer, metrics=base_metrics,
                                                              erase=erase, base_images=None, nude_flags=base_nude)
            distances = scorer.distances(images, base_images) if "lpips" in chosen else None
            summaries["comparison"] = _comparison(model_summary, summaries["base"], distances, records)
        else:
            distances = None

        image_records = []
        for i, record in enumerate(records):
            entry = {"index": i, **record.to_dict(), "file": files[i], "sha256": _pixel_digest(images[i]),
                     **per_image[i]}
            if base_images is not None:
                entry["base"] = {"file": base_files[i], "sha256": _pixel_digest(base_images[i]), **base_per_image[i]}
                if distances is not None:
                    entry["lpips"] = float(distances[i])
            image_records.append(entry)

        scorers: dict = {"metrics": sorted(chosen)}
        if scorer is not None:
            scorers["scorer"] = scorer.describe()
        if "nudenet" in chosen:
            scorers["nudenet"] = {"version": nude_version, "threshold": M.NUDENET_THRESHOLD,
                                  "classes": "*" + M.NUDENET_CLASS_SUFFIX, "rule": "any class above the threshold"}
        result = _round({
            "format": RESULTS_FORMAT,
            "version": RESULTS_VERSION,
            "config": {
                "model": _source_info(model_source, model_info),
                "base": _source_info(base_source, base_info) if base_source is not None else None,
                "erase": list(erase),
                "prompt_set": {"name": prompt_set_name, "kind": prompt_set_kind, "records": len(records),
                               "sha256": prompt_set_digest(records)},
                "seed": seed,
                "n_per_prompt": n_per_prompt,
                "num_inference_steps": num_inference_steps,
                "guidance_scale": guidance_scale,
                "batch_size": batch_size,
                "image_size": list(images.shape[1:3]),
            },
            "versions": _versions(),
            "scorers": scorers,
            "metrics": summaries,
            "images": image_records,
        })
        from conceptguard.outputs import atomic_write_json

        atomic_write_json(out_dir / RESULTS_FILE, result)  # last: its presence means the run is complete
        atomic_write_json(out_dir / TIMING_FILE, {
            "generation_seconds": round(generated - started, 3),
            "total_seconds": round(time.perf_counter() - started, 3),
            "images": len(records) * (2 if base_images is not None else 1),
            "processes": state.num_processes,
        })
    if state.num_processes > 1:
        result = broadcast_object_list([result])[0]
    return result
