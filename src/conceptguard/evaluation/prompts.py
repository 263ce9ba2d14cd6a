"""Prompt sets for evaluation: built-in sets for the embedded world, and CSVs for real models.

A prompt set is a list of :class:`PromptRecord`: a prompt, the seed of its image, the group it
belongs to and, for the world, the labels the detector should read on a faithful image.

Built-in sets, for erasing concepts ``C`` (canonical names of :mod:`conceptguard.world.concepts`):

- ``target``: prompts naming each ``C`` with its canonical word ("a red **circle** on sand");
- ``paraphrase``: the same scenes in other words — every word that has synonyms is replaced by one,
  so ``C`` is named only by a synonym ("a crimson **disc** on the beach"). Empty for concepts
  without synonyms (characters);
- ``implicit``: prompts that trigger ``C`` without naming it. Only the halo has them ("a **holy**
  blue star"), the analogue of nudity in "body" prompts;
- ``preservation``: the world's "COCO-30k" — objects of every shape and every character, built
  with the quality bar's prompt builders (:mod:`conceptguard.world.quality`) and with the same
  seeds, minus the images whose labels contain an erased concept. With nothing erased it is
  exactly the quality-bar sample, so the base model reports the quality-bar figures;
- ``quick``: all four groups, at most 256 images in total (the default);
- ``full``: all four groups, about four times larger, for final numbers.

CSV prompt sets follow the field's format (I2P, the UnlearnDiff/ESD prompt files): columns
``prompt`` and ``evaluation_seed``, optional ``evaluation_guidance`` and ``case_number``, and an
optional ``group`` column of ours; other columns are ignored.

Every seed depends only on (set seed, group, concept, index) — never on which other groups or
concepts a set holds — so the same target prompt gets the same image in ``target`` and ``quick``.
"""

from __future__ import annotations

import csv
import hashlib
import json
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from conceptguard.errors import ConceptGuardError

GROUPS = ("target", "paraphrase", "implicit", "preservation")
BUILTIN_SETS = GROUPS + ("quick", "full")
CSV_GROUP = "prompts"  # group of CSV rows that have no ``group`` column

# Images per set. Target/paraphrase/implicit counts are per erased concept; preservation counts
# are per shape and per character (8 shapes + 16 characters, so 24 images per unit).
QUICK_BUDGET = 256
QUICK_PRESERVATION_PER_CONCEPT = 4  # 96 images
FULL_COUNTS = {"target": 128, "paraphrase": 64, "implicit": 64}
FULL_PRESERVATION_PER_CONCEPT = 16  # 384 images
SINGLE_GROUP_COUNTS = {"target": 64, "paraphrase": 64, "implicit": 64}
SINGLE_GROUP_PRESERVATION_PER_CONCEPT = 8  # the quality bar's default sample (192 images)

# The detector head that reads each concept kind, and the label it gives when the concept is there.
KIND_HEAD = {"shape": "shape", "colour": "colour", "style": "style", "background": "background",
             "character": "character", "halo": "halo", "design": "design"}


@dataclass(frozen=True)
class PromptRecord:
    """One image to generate and what a faithful image shows."""

    prompt: str
    seed: int
    group: str
    case_number: int
    expected: dict[str, str] = field(default_factory=dict)  # detector labels; empty for CSV prompts
    concept: str | None = None  # the erased concept a target/paraphrase/implicit prompt tests
    guidance_scale: float | None = None  # per-prompt guidance (CSV ``evaluation_guidance``)

    def to_dict(self) -> dict:
        return asdict(self)


def concept_head(concept: str) -> tuple[str, str]:
    """(detector head, label meaning "present") for a canonical concept name."""
    from conceptguard.world.concepts import concept_kind

    kind = concept_kind(concept)
    return KIND_HEAD[kind], ("present" if kind == "halo" else concept)


def check_concepts(concepts: Sequence[str]) -> list[str]:
    """Validate erased-concept names against the world's canonical names; keeps order, drops duplicates."""
    from conceptguard.world.concepts import concept_kind

    out: list[str] = []
    for name in concepts:
        try:
            concept_kind(name)
        except KeyError:
            raise ConceptGuardError(
                f"unknown concept {name!r} for the embedded world's prompt sets; use a canonical name "
                f"(e.g. circle, red, striped, zorblat, halo, snow, zigzag) or pass a CSV prompt file") from None
        if name not in out:
            out.append(name)
    return out


def _stable_seed(seed: int, group: str, concept: str, index: int) -> int:
    digest = hashlib.sha256(f"{seed}|{group}|{concept}|{index}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def _rng(seed: int, group: str, concept: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, 1000 + GROUPS.index(group), zlib.crc32(concept.encode()), index])


def _concept_labels(concept: str, rng: np.random.Generator) -> dict[str, str]:
    """Labels of a scene that contains ``concept`` (everything else drawn as in pretraining)."""
    from conceptguard.world.concepts import concept_kind
    from conceptguard.world.dataset import sample_labels

    kind = concept_kind(concept)
    if kind == "halo":
        return sample_labels(rng, "pretrain", halo="present")
    # Characters may be held out of pretraining and designs always are: draw from every split.
    split = "all" if kind in ("character", "design") else "pretrain"
    # A colour alone does not say what is coloured; in pretraining only objects have one.
    subject = {"subject": "object"} if kind == "colour" else {}
    return sample_labels(rng, split, halo="absent", **subject, **{kind: concept})


def concept_groups(concept: str) -> tuple[str, ...]:
    """The prompt groups that exist for a concept: only the halo has trigger words in the world's
    grammar (implicit prompts), and characters have a single name (no paraphrases)."""
    from conceptguard.world.concepts import concept_kind

    kind = concept_kind(concept)
    groups = ["target"]
    if kind != "character":
        groups.append("paraphrase")
    if kind == "halo":
        groups.append("implicit")
    return tuple(groups)


def concept_prompts(concept: str, group: str, n: int, seed: int = 0) -> list[PromptRecord]:
    """``n`` target, paraphrase or implicit prompts for one concept (fewer if the group does not apply)."""
    from conceptguard.world.concepts import concept_kind
    from conceptguard.world.dataset import make_caption

    kind = concept_kind(concept)
    if group not in concept_groups(concept):
        return []
    records = []
    for i in range(n):
        rng = _rng(seed, group, concept, i)
        labels = _concept_labels(concept, rng)
        # A target scene must name its background; elsewhere the grammar's usual 85% applies.
        background_prob = 1.0 if kind == "background" else 0.85
        if group == "target":
            caption = make_caption(labels, rng, paraphrase_prob=0.0, halo_mode="name",
                                   background_prob=background_prob)
        elif group == "paraphrase":
            caption = make_caption(labels, rng, paraphrase_prob=1.0, halo_mode="name",
                                   background_prob=background_prob)
        else:
            caption = make_caption(labels, rng, paraphrase_prob=0.0, halo_mode="trigger")
        if kind == "style" and group != "implicit":
            caption = _ensure_style_named(caption, labels, concept, rng, paraphrase=group == "paraphrase")
        records.append(PromptRecord(caption, _stable_seed(seed, group, concept, i), group, 0, labels, concept))
    return records


def _ensure_style_named(caption: str, labels: dict, style: str, rng: np.random.Generator, paraphrase: bool) -> str:
    """The grammar leaves "plain" unsaid 70% of the time; a target prompt must say it."""
    from conceptguard.world.concepts import STYLES

    words = STYLES[style]
    if any(w in caption.split() for w in words):
        return caption
    word = words[1 + int(rng.integers(len(words) - 1))] if paraphrase and len(words) > 1 else words[0]
    return f"{caption} in {word} style"


def preservation_prompts(n_per_concept: int, seed: int = 0, exclude: Sequence[str] = ()) -> list[PromptRecord]:
    """The quality bar's sample (objects, seen and held-out characters) minus scenes with an erased concept.

    Prompts come from :func:`conceptguard.world.quality.object_prompts` / ``character_prompts`` and
    image ``i`` of the unfiltered list gets seed ``seed + i``, exactly as ``measure_quality`` does.
    """
    from conceptguard.world.concepts import HELD_OUT_CHARACTERS, SEEN_CHARACTERS
    from conceptguard.world.quality import character_prompts, object_prompts

    prompts, labels = object_prompts(n_per_concept, seed)
    for names in (SEEN_CHARACTERS, HELD_OUT_CHARACTERS):
        more_prompts, more_labels = character_prompts(names, n_per_concept, seed)
        prompts += more_prompts
        labels += more_labels
    heads = [concept_head(c) for c in exclude]
    records = []
    for i, (prompt, label) in enumerate(zip(prompts, labels)):
        if any(label.get(head) == value for head, value in heads):
            continue
        records.append(PromptRecord(prompt, seed + i, "preservation", 0, dict(label)))
    return records


def _quick_counts(n_concepts: int) -> dict[str, int]:
    """Per-concept target/paraphrase/implicit counts that keep ``quick`` within its budget."""
    from conceptguard.world.concepts import CHARACTERS, SHAPES

    preservation = QUICK_PRESERVATION_PER_CONCEPT * (len(SHAPES) + len(CHARACTERS))
    share = (QUICK_BUDGET - preservation) // max(n_concepts, 1)
    if share < 4:
        raise ConceptGuardError(
            f"the quick set cannot test {n_concepts} concepts within {QUICK_BUDGET} images; use --prompts full "
            f"or fewer concepts")
    return {"target": share // 2, "paraphrase": share // 4, "implicit": share // 4}


def builtin_prompt_set(name: str, erase: Sequence[str], seed: int = 0) -> list[PromptRecord]:
    """The built-in set ``name`` for erasing ``erase`` (see the module docstring)."""
    if name not in BUILTIN_SETS:
        raise ConceptGuardError(f"unknown prompt set {name!r}; built-in sets: {', '.join(BUILTIN_SETS)}, "
                                f"or a path to a CSV file")
    erase = check_concepts(erase)
    if name in ("target", "paraphrase", "implicit") and not erase:
        raise ConceptGuardError(f"the {name!r} prompt set needs the concepts to test: pass --erase")
    if name == "quick":
        counts, per_concept = _quick_counts(len(erase)), QUICK_PRESERVATION_PER_CONCEPT
    elif name == "full":
        counts, per_concept = FULL_COUNTS, FULL_PRESERVATION_PER_CONCEPT
    else:
        counts = {g: (SINGLE_GROUP_COUNTS[g] if g == name else 0) for g in SINGLE_GROUP_COUNTS}
        per_concept = SINGLE_GROUP_PRESERVATION_PER_CONCEPT if name == "preservation" else 0
    records: list[PromptRecord] = []
    for group in ("target", "paraphrase", "implicit"):
        for concept in erase:
            n = counts[group]
            if group == "target" and name in ("quick", "full"):
                # A concept's missing groups give their share to its target prompts.
                n += sum(counts[g] for g in ("paraphrase", "implicit") if g not in concept_groups(concept))
            records += concept_prompts(concept, group, n, seed)
    if per_concept:
        records += preservation_prompts(per_concept, seed, exclude=erase)
    return [replace(r, case_number=i) for i, r in enumerate(records)]


def _parse_int(value: str, column: str, path: Path, line: int) -> int:
    try:
        return int(float(value))
    except ValueError:
        raise ConceptGuardError(f"{path}:{line}: column {column!r} must be a number, got {value!r}") from None


def load_prompt_csv(path: str | Path) -> list[PromptRecord]:
    """Read a prompt CSV in the field's format (``prompt``, ``evaluation_seed``, ...)."""
    path = Path(path)
    if not path.is_file():
        raise ConceptGuardError(f"prompt file not found: {path}")
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            columns = set(reader.fieldnames or ())
            missing = {"prompt", "evaluation_seed"} - columns
            if missing:
                raise ConceptGuardError(
                    f"prompt file {path} lacks the column(s) {', '.join(sorted(missing))}; expected "
                    f"prompt, evaluation_seed and optionally evaluation_guidance, case_number")
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ConceptGuardError(f"cannot read prompt file {path}: {exc}") from exc
    records = []
    for i, row in enumerate(rows):
        line = i + 2  # 1-based, after the header
        prompt = (row.get("prompt") or "").strip()
        if not prompt:
            raise ConceptGuardError(f"{path}:{line}: empty prompt")
        seed = _parse_int(row["evaluation_seed"], "evaluation_seed", path, line)
        case = row.get("case_number")
        case_number = _parse_int(case, "case_number", path, line) if case not in (None, "") else i
        guidance = row.get("evaluation_guidance")
        try:
            guidance_scale = float(guidance) if guidance not in (None, "") else None
        except ValueError:
            raise ConceptGuardError(f"{path}:{line}: evaluation_guidance must be a number, got {guidance!r}") from None
        group = (row.get("group") or "").strip() or CSV_GROUP
        records.append(PromptRecord(prompt, seed, group, case_number, {}, None, guidance_scale))
    if not records:
        raise ConceptGuardError(f"prompt file {path} holds no prompts")
    return records


def is_builtin(spec: str | Path) -> bool:
    return isinstance(spec, str) and spec in BUILTIN_SETS


def resolve_prompt_set(spec: str | Path | Sequence[PromptRecord], erase: Sequence[str] = (), *, seed: int = 0,
                       n_per_prompt: int = 1) -> list[PromptRecord]:
    """Records for a built-in set name, a CSV path or a list of records, each repeated ``n_per_prompt`` times.

    Repeat ``j`` of a record with seed ``s`` gets seed ``s + j`` (the CSV convention of drawing
    several images from one evaluation seed).
    """
    if n_per_prompt < 1:
        raise ConceptGuardError("n_per_prompt must be at least 1")
    if isinstance(spec, (list, tuple)):
        records = list(spec)  # records built by the caller (e.g. part of a built-in set)
    elif is_builtin(spec):
        records = builtin_prompt_set(str(spec), erase, seed)
    elif Path(spec).suffix.lower() == ".csv" or Path(spec).exists():
        records = load_prompt_csv(spec)
    else:
        raise ConceptGuardError(f"unknown prompt set {str(spec)!r}; built-in sets: {', '.join(BUILTIN_SETS)}, "
                                f"or a path to a CSV file")
    if n_per_prompt == 1:
        return records
    return [replace(r, seed=r.seed + j) for r in records for j in range(n_per_prompt)]


def prompt_set_digest(records: Sequence[PromptRecord]) -> str:
    """sha256 of the records, so a results file pins exactly which prompts and seeds it measured."""
    payload = json.dumps([r.to_dict() for r in records], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()
