"""The closed-form, differentiable Merge of MIMA (Custom Diffusion's constrained least squares).

Given a cross-attention projection ``W0`` (``out × d``, e.g. an ``attn2.to_k``), concept token
embeddings ``C`` (``s × d``, the rows of every concept stacked) with their targets
``V`` (``out × s``, the columns ``W'_n c`` of each concept's adapted weight), and embeddings of
generic captions ``C_reg`` (``r × d``), Merge solves::

    min_W || (W - W0) C_regᵀ ||²   subject to   W Cᵀ = V

— stay as close as possible to ``W0`` on generic text while mapping every concept token exactly
where its own adapted weight maps it. The solution (Kumari et al. 2023, eq. 5; MIMA eq. "Merge")::

    W = W0 + (V - W0 Cᵀ) (D Cᵀ)⁻¹ D,        D = C (C_regᵀ C_reg)⁻¹

Numerics. ``C_regᵀ C_reg`` is ``d × d`` and singular whenever there are fewer generic token rows than
``d`` (always for real SD: d = 768+), so it gets a ridge ``ridge · mean(diag) · I`` — a ridge
relative to its scale, so the same value works for any text encoder. ``D Cᵀ`` (``s × s``) is
invertible when the concept rows are linearly independent; ``constraint_ridge`` (default 0, exact
constraint) regularizes it for near-duplicate rows at the price of meeting the constraint only
approximately. Both systems are solved with ``torch.linalg.solve`` — never an explicit inverse — in
at least fp32 (bf16/fp16 inputs are upcast; float64 stays float64), and the result is cast back to
``W0``'s dtype.

Everything is differentiable: gradients reach ``W0`` directly and through ``V``, which is how MIMA
backpropagates the outer loss *through* the Merge into the immunized weights.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _ridged(gram: torch.Tensor, ridge: float) -> torch.Tensor:
    if ridge <= 0:
        return gram
    scale = gram.diagonal().mean().clamp_min(torch.finfo(gram.dtype).tiny)
    return gram + ridge * scale * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)


def merge(w0: torch.Tensor, concept_rows: torch.Tensor, targets: torch.Tensor, reg_rows: torch.Tensor, *,
          ridge: float = 1e-3, constraint_ridge: float = 0.0) -> torch.Tensor:
    """The merged weight ``W0 + (V - W0 Cᵀ)(D Cᵀ)⁻¹ D`` (see the module docstring).

    ``w0``: (out, d); ``concept_rows`` C: (s, d); ``targets`` V: (out, s); ``reg_rows`` C_reg: (r, d).
    """
    if concept_rows.ndim != 2 or reg_rows.ndim != 2 or w0.ndim != 2 or targets.ndim != 2:
        raise ValueError("merge expects 2-D tensors: W0 (out, d), C (s, d), V (out, s), C_reg (r, d)")
    if concept_rows.shape[1] != w0.shape[1] or reg_rows.shape[1] != w0.shape[1]:
        raise ValueError(f"token rows must have W0's input size {w0.shape[1]}, got C {tuple(concept_rows.shape)} "
                         f"and C_reg {tuple(reg_rows.shape)}")
    if targets.shape != (w0.shape[0], concept_rows.shape[0]):
        raise ValueError(f"targets must be (out, s) = {(w0.shape[0], concept_rows.shape[0])}, got {tuple(targets.shape)}")
    dtype = _compute_dtype(w0, concept_rows, targets, reg_rows)
    w, c, v, c_reg = (t.to(dtype) for t in (w0, concept_rows, targets, reg_rows))

    gram = _ridged(c_reg.T @ c_reg, ridge)  # (d, d), symmetric
    d = torch.linalg.solve(gram, c.T).T  # C G⁻¹ = (G⁻¹ Cᵀ)ᵀ since G is symmetric; (s, d)
    constraint = _ridged(d @ c.T, constraint_ridge)  # D Cᵀ = C G⁻¹ Cᵀ, symmetric; (s, s)
    residual = v - w @ c.T  # (out, s)
    # residual · M⁻¹ = (M⁻¹ residualᵀ)ᵀ, M symmetric.
    correction = torch.linalg.solve(constraint, residual.T).T @ d
    return (w + correction).to(w0.dtype)


def concept_targets(adapted: Sequence[torch.Tensor], rows: Sequence[torch.Tensor]) -> torch.Tensor:
    """V = [W'_1 C_1ᵀ, ..., W'_N C_Nᵀ]: each concept's rows mapped by its own adapted weight."""
    if len(adapted) != len(rows):
        raise ValueError(f"need one adapted weight per concept's rows, got {len(adapted)} and {len(rows)}")
    return torch.cat([w @ c.to(w.dtype).T for w, c in zip(adapted, rows)], dim=1)


def merge_adapted(w0: torch.Tensor, adapted: Sequence[torch.Tensor], rows: Sequence[torch.Tensor],
                  reg_rows: torch.Tensor, *, ridge: float = 1e-3, constraint_ridge: float = 0.0) -> torch.Tensor:
    """Merge per-concept adapted weights ``adapted[n]`` (each ``out × d``), concept ``n`` owning
    token rows ``rows[n]`` (``s_n × d``), into one weight around ``w0``."""
    targets = concept_targets(adapted, rows)
    return merge(w0, torch.cat(list(rows)), targets, reg_rows, ridge=ridge, constraint_ridge=constraint_ridge)


__all__ = ["concept_targets", "merge", "merge_adapted"]
