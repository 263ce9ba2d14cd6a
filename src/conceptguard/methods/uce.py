"""UCE — Unified Concept Editing (Gandikota et al., WACV 2024): closed-form erasure, no training.

Every cross-attention key/value projection ``W`` (``attn2.to_k`` / ``attn2.to_v``) is replaced by
the minimiser of

    λ‖W' − W‖² + s_e Σ_i ‖W' c_i − v*_i‖² + s_p Σ_j ‖W' c_j − W c_j‖²,

where ``c_i`` are text-encoder embeddings of the erased concepts, ``v*_i = W c_guide(i)`` what
their guide concept (default: the empty prompt) projects to, and ``c_j`` the preserved concepts,
whose projections are kept. The minimiser is

    W_new = [λW + s_e Σ_i v*_i c_iᵀ + s_p Σ_j (W c_j) c_jᵀ]
            · [λI + s_e Σ_i c_i c_iᵀ + s_p Σ_j c_j c_jᵀ]⁻¹.

Because every target is ``W`` applied to some embedding, the left factor is ``W · Nᵀ`` with
``N = λI + s_e Σ_i c_i c_guide(i)ᵀ + s_p Σ_j c_j c_jᵀ`` the same for every layer, so
``W_new = W · T`` with one transform ``T = Nᵀ M⁻¹`` shared by all key/value matrices of the
UNet. ``T`` comes from one fp32 linear solve of the (symmetric) right factor ``M``, never an
explicit inverse; editing SDXL's ~140 matrices for 20+ concepts then costs one matrix product
per matrix.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from conceptguard.config import config_to_dict
from conceptguard.diffusion import encode_prompts
from conceptguard.errors import ConceptGuardError
from conceptguard.methods import MethodResult, register_method
from conceptguard.models.params import select_parameters

RECORD_FILE = "uce.json"

_KEY_VALUE_WEIGHT = re.compile(r"(^|\.)attn2\.to_[kv]\.weight$")


@dataclass
class UCEConfig:
    """What to erase, what to map it to, and what to keep."""

    concepts: list[str] = field(default_factory=list, metadata={"help": "concepts to erase (one or more)"})
    guides: list[str] | None = field(default=None, metadata={
        "help": "what each erased concept becomes: one guide for all, or one per concept; default the empty prompt"})
    preserve: list[str] = field(default_factory=list, metadata={"help": "concepts whose outputs must not change"})
    lam: float = field(default=0.5, metadata={"help": "weight λ of staying close to the original weights"})
    erase_scale: float = field(default=1.0, metadata={"help": "weight s_e of the erase terms"})
    preserve_scale: float = field(default=1.0, metadata={"help": "weight s_p of the preserve terms"})
    token_selection: Literal["last", "all"] = field(default="last", metadata={
        "help": "embedding rows per phrase: its last token (authors' current code), or its last token and every "
                "row after it (EOS and padding; the authors' original code)"})


def resolved_guides(config: UCEConfig) -> list[str]:
    """One guide per concept: the configured ones, one broadcast to all, or the empty prompt."""
    guides = [""] if not config.guides else list(config.guides)
    if len(guides) == 1:
        guides = guides * len(config.concepts)
    return guides


def _validate(config: UCEConfig) -> None:
    if not config.concepts:
        raise ConceptGuardError("UCE needs at least one concept to erase (--concepts)")
    guides = [""] if not config.guides else list(config.guides)
    if len(guides) not in (1, len(config.concepts)):
        raise ConceptGuardError(
            f"UCE got {len(guides)} guides for {len(config.concepts)} concepts; "
            "give one guide for all or one per concept")
    overlap = sorted(set(config.concepts) & set(config.preserve))
    if overlap:
        raise ConceptGuardError(f"concept(s) {', '.join(map(repr, overlap))} are both erased and preserved")
    if config.token_selection not in ("last", "all"):
        raise ConceptGuardError(f"token_selection must be 'last' or 'all', got {config.token_selection!r}")
    for name in ("lam", "erase_scale", "preserve_scale"):
        value = getattr(config, name)
        if not value >= 0:  # also rejects NaN
            raise ConceptGuardError(f"UCE {name} must be >= 0, got {value}")


def _last_token_index(tokenizer, text: str) -> int:
    """Position of the phrase's last token in the encoder output: BOS sits at 0, so a phrase of
    n tokens ends at n; the empty prompt gives 0, the BOS row (as in the authors' code)."""
    ids = tokenizer(text, truncation=True, max_length=tokenizer.model_max_length)["input_ids"]
    return max(len(ids) - 2, 0)


def concept_rows(pipe, config: UCEConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Embedding rows (fp32): erased ``C`` and their guides ``G`` (row i of G is the target of row
    i of C), and preserved ``P``; each (rows, D) in the UNet's cross-attention input space.

    The embeddings are what the UNet receives at inference (``encode_prompts``), so SDXL's two
    encoders are used concatenated, as its cross-attention sees them.
    """
    guides = resolved_guides(config)
    texts = list(dict.fromkeys([*config.concepts, *guides, *config.preserve]))
    embeds = encode_prompts(pipe, texts).embeds.float()
    # SDXL's tokenizers share CLIP's BPE, so one gives the token positions of both encoders.
    tokenizer = pipe.tokenizer if getattr(pipe, "tokenizer", None) is not None else pipe.tokenizer_2
    row = {text: embeds[k] for k, text in enumerate(texts)}
    last = {text: _last_token_index(tokenizer, text) for text in texts}
    length = embeds.shape[1]

    erase, guide, preserve = [], [], []
    for concept, target in zip(config.concepts, guides):
        if config.token_selection == "last":
            erase.append(row[concept][last[concept]][None])
            guide.append(row[target][last[target]][None])
        else:
            # The rows from the last token on all depend on the whole phrase (causal attention);
            # concept and guide rows are paired from their last tokens onward.
            span = length - max(last[concept], last[target])
            erase.append(row[concept][last[concept]:last[concept] + span])
            guide.append(row[target][last[target]:last[target] + span])
    for concept in config.preserve:
        start = last[concept]
        stop = start + 1 if config.token_selection == "last" else length
        preserve.append(row[concept][start:stop])
    empty = embeds.new_zeros((0, embeds.shape[-1]))
    return torch.cat(erase), torch.cat(guide), torch.cat(preserve) if preserve else empty


def uce_transform(erase: torch.Tensor, guide: torch.Tensor, preserve: torch.Tensor, *, lam: float,
                  erase_scale: float, preserve_scale: float) -> torch.Tensor:
    """The (D, D) matrix ``T`` with ``W_new = W @ T`` for every key/value matrix ``W``.

    ``T = Nᵀ M⁻¹`` with ``M = λI + s_e CᵀC + s_p PᵀP`` (symmetric) and ``N = λI + s_e CᵀG + s_p PᵀP``
    (rows of C, G, P are embeddings), obtained as ``(M⁻¹ N)ᵀ`` from the transposed system
    ``M Tᵀ = N`` — a linear solve, which is faster and more accurate than forming ``M⁻¹``.
    """
    erase, guide, preserve = erase.float(), guide.float(), preserve.float()
    dim = erase.shape[1]
    eye = torch.eye(dim, dtype=torch.float32, device=erase.device)
    keep = preserve_scale * preserve.T @ preserve
    right = lam * eye + erase_scale * erase.T @ erase + keep
    left_t = lam * eye + erase_scale * erase.T @ guide + keep
    singular = ConceptGuardError(
        f"the UCE system is singular ({erase.shape[0] + preserve.shape[0]} embedding rows for {dim} dimensions "
        f"and lam={lam}); use lam > 0")
    # λ > 0 makes M positive definite; without it M must have full rank, which a solve does not
    # check (it returns garbage for a numerically singular matrix instead of failing).
    if lam <= 0 and int(torch.linalg.matrix_rank(right)) < dim:
        raise singular
    try:
        transform = torch.linalg.solve(right, left_t).T
    except torch.linalg.LinAlgError as exc:
        raise singular from exc
    if not torch.isfinite(transform).all():
        raise singular
    return transform


def _key_value_weights(unet) -> dict[str, torch.nn.Parameter]:
    selected = select_parameters(unet, "x-strict")
    # Biases (absent in SD, but allowed by diffusers) need no edit: W' c + b ≈ W c_guide + b.
    weights = {name: p for name, p in selected.items() if _KEY_VALUE_WEIGHT.search(name)}
    if not weights:
        raise ConceptGuardError("the UNet has no cross-attention key/value weights (attn2.to_k / attn2.to_v) to edit")
    return weights


@torch.no_grad()
def edit_weights(pipe, config: UCEConfig) -> tuple[list[str], dict[str, int]]:
    """Apply UCE to ``pipe.unet`` in place; returns the edited parameter names and row counts."""
    _validate(config)
    erase, guide, preserve = concept_rows(pipe, config)
    weights = _key_value_weights(pipe.unet)
    transform = uce_transform(erase, guide, preserve, lam=config.lam, erase_scale=config.erase_scale,
                              preserve_scale=config.preserve_scale)
    for name, weight in weights.items():
        if weight.shape[1] != transform.shape[0]:
            raise ConceptGuardError(
                f"{name} takes {weight.shape[1]}-d inputs but the text embeddings are {transform.shape[0]}-d")
        t = transform.to(weight.device)
        weight.copy_((weight.float() @ t).to(weight.dtype))
    return sorted(weights), {"erase_rows": erase.shape[0], "preserve_rows": preserve.shape[0]}


@register_method("uce", kind="erase", config=UCEConfig)
def apply(pipe, config: UCEConfig, *, run_dir: str | Path, resume: bool = False) -> MethodResult:
    """UCE: closed-form edit of the cross-attention keys and values (about a second, no training)."""
    del resume  # a closed-form edit has nothing to resume: rerunning it is as fast
    start = time.perf_counter()
    names, rows = edit_weights(pipe, config)
    seconds = time.perf_counter() - start

    from conceptguard.outputs import atomic_write_json

    changed = [f"unet.{name}" for name in names]
    metrics = {"edit_seconds": seconds, "matrices": len(names), **rows}
    run_dir = Path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConceptGuardError(f"cannot create run folder {run_dir}: {exc.strerror or exc}") from exc
    atomic_write_json(run_dir / RECORD_FILE, {"method": "uce", "config": config_to_dict(config),
                                              "guides": resolved_guides(config), "metrics": metrics,
                                              "changed": changed})
    concepts = ", ".join(config.concepts)
    summary = (f"UCE erased {len(config.concepts)} concept(s) ({concepts}) in {seconds:.2f} s by a closed-form "
               f"edit of {len(names)} cross-attention key/value matrices"
               + (f", preserving {len(config.preserve)} concept(s)" if config.preserve else ""))
    return MethodResult(changed=changed, summary=summary, metrics=metrics)
