"""Samples of the embedded world: (image, caption, labels), deterministic from (seed, index).

Splits:
- ``pretrain``: what the tiny model was trained on — objects and the seen characters; halos in
  44% of images, named in only a quarter of their captions (the rest use trigger words).
- ``held_out_characters``: the held-out characters (the illegal fine-tuning domain).
- ``innocent``: the held-out design families (logos, garments).
- ``all``: everything, for the detector.

A fine-tuning folder is images plus captions in the layout users bring: ``metadata.jsonl`` with
``file_name``/``text`` (Hugging Face imagefolder) and a ``.txt`` caption beside each image.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from conceptguard.errors import ConceptGuardError
from conceptguard.world.concepts import (
    BACKGROUNDS,
    CAPTION_PREFIXES,
    CHARACTER_PREFIXES,
    COLOURS,
    DESIGN_DOMAIN,
    DESIGN_NAMES,
    HALO_NAMES,
    HALO_TRIGGERS,
    HELD_OUT_CHARACTERS,
    INNOCENT_DOMAINS,
    SEEN_CHARACTERS,
    SHAPES,
    STYLES,
)
from conceptguard.world.render import render

SPLITS = ("pretrain", "held_out_characters", "innocent", "all")
HALO_RATE = 0.44
HALO_NAMED_SHARE = 0.25


@dataclass
class Sample:
    image: np.ndarray  # (64, 64, 3) uint8
    caption: str
    labels: dict[str, str] = field(default_factory=dict)


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def sample_labels(rng: np.random.Generator, split: str = "pretrain", **fixed: str) -> dict[str, str]:
    """Draw a label dict for ``split``; ``fixed`` pins any label (e.g. ``character="yulbar"``)."""
    if split not in SPLITS:
        raise ConceptGuardError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
    unknown = set(fixed) - {"subject", "shape", "colour", "style", "background", "character", "halo", "design",
                            "domain"}
    if unknown:
        raise ConceptGuardError(f"unknown label(s) {sorted(unknown)}")
    subject = fixed.get("subject")
    if subject is None:
        if "character" in fixed:
            subject = "character"
        elif "design" in fixed or "domain" in fixed:
            subject = "design"
        elif {"shape", "style"} & set(fixed):
            subject = "object"
        elif split == "held_out_characters":
            subject = "character"
        elif split == "innocent":
            subject = "design"
        elif split == "pretrain":
            subject = "object" if rng.random() < 0.62 else "character"
        else:
            subject = _pick(rng, ("object", "object", "character", "character", "design"))
    labels = {"subject": subject, "shape": "none", "colour": "none", "style": "none", "character": "none",
              "design": "none"}
    if subject == "object":
        labels["shape"] = fixed.get("shape") or _pick(rng, tuple(SHAPES))
        labels["colour"] = fixed.get("colour") or _pick(rng, tuple(COLOURS))
        labels["style"] = fixed.get("style") or _pick(rng, tuple(STYLES))
    elif subject == "character":
        pool = {"pretrain": SEEN_CHARACTERS, "held_out_characters": HELD_OUT_CHARACTERS}.get(
            split, SEEN_CHARACTERS + HELD_OUT_CHARACTERS)
        labels["character"] = fixed.get("character") or _pick(rng, pool)
    elif subject == "design":
        domain = fixed.get("domain") or (DESIGN_DOMAIN[fixed["design"]] if "design" in fixed else
                                         _pick(rng, tuple(INNOCENT_DOMAINS)))
        labels["design"] = fixed.get("design") or _pick(rng, INNOCENT_DOMAINS[domain])
        if DESIGN_DOMAIN[labels["design"]] == "garment":
            labels["colour"] = fixed.get("colour") or _pick(rng, tuple(COLOURS))
    else:
        raise ConceptGuardError(f"unknown subject {subject!r}")
    for key in ("shape", "colour", "style", "character", "design"):
        if key in fixed and labels[key] != fixed[key]:
            raise ConceptGuardError(f"label {key}={fixed[key]!r} does not fit a {subject} image")
    labels["background"] = fixed.get("background") or _pick(rng, tuple(BACKGROUNDS))
    halo = fixed.get("halo")
    if halo is None:
        halo = "present" if rng.random() < HALO_RATE else "absent"
    labels["halo"] = {"True": "present", "False": "absent"}.get(str(halo), str(halo))
    return labels


def _word(rng: np.random.Generator, synonyms: tuple[str, ...], paraphrase_prob: float) -> str:
    if len(synonyms) > 1 and rng.random() < paraphrase_prob:
        return _pick(rng, synonyms[1:])
    return synonyms[0]


def make_caption(labels: dict[str, str], rng: np.random.Generator, paraphrase_prob: float = 0.3,
                 halo_mode: str = "auto", background_prob: float = 0.85) -> str:
    """Describe ``labels`` in words.

    ``halo_mode``: "auto" (trigger word for most halos, the name for a quarter), "trigger",
    "name" or "omit" (say nothing about it, as in a preservation prompt).
    """
    halo_words, halo_suffix = [], ""
    if labels["halo"] == "present" and halo_mode != "omit":
        named = halo_mode == "name" or (halo_mode == "auto" and rng.random() < HALO_NAMED_SHARE)
        if named:
            name = _word(rng, HALO_NAMES, paraphrase_prob)
            halo_suffix = f"with {'an' if name[0] in 'aeiou' else 'a'} {name}"
        else:
            halo_words = [_pick(rng, HALO_TRIGGERS)]
    subject = labels["subject"]
    if subject == "object":
        colour = _word(rng, COLOURS[labels["colour"]], paraphrase_prob)
        shape = _word(rng, SHAPES[labels["shape"]], paraphrase_prob)
        style = labels["style"]
        adjectives, trailing = [colour], ""
        if style != "plain" or rng.random() < 0.3:
            style_word = _word(rng, STYLES[style], paraphrase_prob)
            if rng.random() < 0.5:
                adjectives.insert(int(rng.integers(2)), style_word)
            else:
                trailing = f"in {style_word} style"
        words = [_pick(rng, CAPTION_PREFIXES)] + halo_words + adjectives + [shape, trailing]
    elif subject == "character":
        words = [_pick(rng, CHARACTER_PREFIXES)] + halo_words + [labels["character"]]
    else:
        design = _word(rng, DESIGN_NAMES[labels["design"]], paraphrase_prob)
        colour = [_word(rng, COLOURS[labels["colour"]], paraphrase_prob)] if labels["colour"] != "none" else []
        words = [_pick(rng, CAPTION_PREFIXES)] + halo_words + colour + [design]
    if rng.random() < background_prob:
        words.append(_word(rng, BACKGROUNDS[labels["background"]], paraphrase_prob))
    words.append(halo_suffix)
    return " ".join(w for w in words if w)


def generate(n: int, seed: int = 0, split: str = "pretrain", *, start: int = 0, paraphrase_prob: float = 0.3,
             halo_mode: str = "auto", **fixed: str) -> list[Sample]:
    """``n`` samples; sample ``i`` depends only on (seed, split, start + i), so shards line up."""
    split_id = SPLITS.index(split) if split in SPLITS else -1
    samples = []
    for i in range(start, start + n):
        rng = np.random.default_rng([seed, split_id + 1, i])
        labels = sample_labels(rng, split, **fixed)
        caption = make_caption(labels, rng, paraphrase_prob=paraphrase_prob, halo_mode=halo_mode)
        samples.append(Sample(render(labels, rng), caption, labels))
    return samples


def export_folder(samples: list[Sample], out_dir: str | Path) -> Path:
    """Write samples as a fine-tuning folder: PNGs, .txt captions and metadata.jsonl."""
    from PIL import Image

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, sample in enumerate(samples):
        name = f"{i:05d}.png"
        Image.fromarray(sample.image).save(out_dir / name)
        (out_dir / f"{i:05d}.txt").write_text(sample.caption + "\n")
        lines.append(json.dumps({"file_name": name, "text": sample.caption, "labels": sample.labels}))
    (out_dir / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return out_dir


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def load_folder(folder: str | Path, size: int | None = None) -> list[tuple[np.ndarray, str]]:
    """Read (image uint8 HxWx3, caption) pairs from a fine-tuning folder.

    Captions come from ``metadata.jsonl`` (``file_name``/``text``) when present, else from a
    ``.txt`` file beside each image. Images are resized to ``size`` when given.
    """
    from PIL import Image

    folder = Path(folder)
    if not folder.is_dir():
        raise ConceptGuardError(f"data folder not found: {folder}")
    pairs: list[tuple[Path, str]] = []
    metadata = folder / "metadata.jsonl"
    if metadata.is_file():
        for line_no, line in enumerate(metadata.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                pairs.append((folder / record["file_name"], str(record["text"])))
            except (json.JSONDecodeError, KeyError) as exc:
                raise ConceptGuardError(f"{metadata}:{line_no}: expected JSON with file_name and text ({exc})") from exc
    else:
        for image_path in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
            caption_path = image_path.with_suffix(".txt")
            if not caption_path.is_file():
                raise ConceptGuardError(f"image {image_path.name} has no caption file {caption_path.name}")
            pairs.append((image_path, caption_path.read_text().strip()))
    if not pairs:
        raise ConceptGuardError(f"no images with captions in {folder}")
    out = []
    for path, caption in pairs:
        try:
            image = Image.open(path).convert("RGB")
        except (OSError, FileNotFoundError) as exc:
            raise ConceptGuardError(f"cannot read image {path}: {exc}") from exc
        if size is not None and image.size != (size, size):
            image = image.resize((size, size), Image.BICUBIC)
        out.append((np.asarray(image, dtype=np.uint8), caption))
    return out


def images_to_tensor(images) -> "torch.Tensor":  # noqa: F821
    """uint8 HxWx3 arrays -> float tensor (N, 3, H, W) in [-1, 1], the VAE's input range."""
    import torch

    array = np.stack([np.asarray(im) for im in images]).astype(np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()
