"""MIMA's closed-form Merge: parity with the explicit formula, Custom Diffusion's constraint, gradients."""

from __future__ import annotations

import pytest
import torch

from conceptguard.methods.merge import concept_targets, merge, merge_adapted


def explicit_merge(w0, c, v, c_reg, ridge):
    """The paper's formula with explicit float64 inverses, ridge as documented (relative to the mean diagonal)."""
    w0, c, v, c_reg = (t.double() for t in (w0, c, v, c_reg))
    gram = c_reg.T @ c_reg
    gram = gram + ridge * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=torch.float64)
    d = c @ torch.linalg.inv(gram)
    return w0 + (v - w0 @ c.T) @ torch.linalg.inv(d @ c.T) @ d


def test_hand_checkable_case_replaces_the_concept_column():
    # C_reg = I and one concept row e_1: W = W0 + (v - W0 e_1) e_1ᵀ, i.e. column 1 of W0 becomes v.
    w0 = torch.arange(12, dtype=torch.float64).reshape(3, 4)
    c = torch.tensor([[0.0, 1.0, 0.0, 0.0]], dtype=torch.float64)
    v = torch.tensor([[10.0], [20.0], [30.0]], dtype=torch.float64)
    merged = merge(w0, c, v, torch.eye(4, dtype=torch.float64), ridge=0.0)
    expected = w0.clone()
    expected[:, 1] = v[:, 0]
    torch.testing.assert_close(merged, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("ridge", [0.0, 1e-2])
def test_matches_the_explicit_float64_formula(ridge):
    g = torch.Generator().manual_seed(0)
    w0, c, v, c_reg = (torch.randn(shape, generator=g) for shape in ((5, 8), (3, 8), (5, 3), (20, 8)))
    merged = merge(w0, c, v, c_reg, ridge=ridge)
    assert merged.dtype == torch.float32
    torch.testing.assert_close(merged.double(), explicit_merge(w0, c, v, c_reg, ridge), rtol=1e-4, atol=1e-5)
    # The comparison can tell the ridge apart.
    if ridge:
        assert not torch.allclose(merged.double(), explicit_merge(w0, c, v, c_reg, 0.0), rtol=1e-4, atol=1e-5)


def test_each_concept_row_maps_to_its_own_adapted_target():
    """Custom Diffusion's constraint: W C_nᵀ = W'_n C_nᵀ for every concept n."""
    g = torch.Generator().manual_seed(1)
    d, out = 16, 6
    w0 = torch.randn(out, d, generator=g)
    adapted = [w0 + 0.5 * torch.randn(out, d, generator=g) for _ in range(3)]
    rows = [torch.randn(k, d, generator=g) for k in (2, 1, 3)]
    c_reg = torch.randn(64, d, generator=g)  # well-conditioned
    merged = merge_adapted(w0, adapted, rows, c_reg)
    for w_n, c_n in zip(adapted, rows):
        torch.testing.assert_close(merged @ c_n.T, w_n @ c_n.T, rtol=1e-4, atol=1e-4)
    # ... while on generic text it stays much closer to W0 than any single adapted weight does.
    generic = torch.randn(32, d, generator=g)
    moved = ((merged - w0) @ generic.T).norm()
    assert moved < min(((w - w0) @ generic.T).norm() for w in adapted)


def test_low_precision_inputs_are_solved_in_fp32():
    g = torch.Generator().manual_seed(2)
    w0, c, v, c_reg = (torch.randn(shape, generator=g) for shape in ((4, 8), (2, 8), (4, 2), (30, 8)))
    merged = merge(w0.bfloat16(), c.bfloat16(), v.bfloat16(), c_reg.bfloat16())
    assert merged.dtype == torch.bfloat16
    reference = merge(*(t.bfloat16().float() for t in (w0, c, v, c_reg)))
    torch.testing.assert_close(merged.float(), reference, rtol=2e-2, atol=2e-2)


def test_gradient_flows_through_merge_into_theta_and_passes_gradcheck():
    """θ enters as W0 and through every W'_n = θ + Δ_n (first-order inner level)."""
    g = torch.Generator().manual_seed(3)
    d, out = 5, 3
    theta = torch.randn(out, d, generator=g, dtype=torch.float64, requires_grad=True)
    deltas = [torch.randn(out, d, generator=g, dtype=torch.float64) for _ in range(2)]
    rows = [torch.randn(1, d, generator=g, dtype=torch.float64), torch.randn(2, d, generator=g, dtype=torch.float64)]
    c_reg = torch.randn(12, d, generator=g, dtype=torch.float64)
    probe = torch.randn(4, d, generator=g, dtype=torch.float64)

    def merged_output(t):
        return merge_adapted(t, [t + delta for delta in deltas], rows, c_reg, ridge=1e-2) @ probe.T

    assert torch.autograd.gradcheck(merged_output, (theta,), eps=1e-6, atol=1e-6)
    merged_output(theta).square().sum().backward()
    assert theta.grad is not None and theta.grad.abs().sum() > 0

    # The no-gradient variant (MIMA's merge_gradient=False, the public code): θ gets nothing.
    theta.grad = None
    with torch.no_grad():
        constant = merge_adapted(theta, [theta + delta for delta in deltas], rows, c_reg)
    assert not constant.requires_grad
    assert theta.grad is None


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="targets"):
        merge(torch.zeros(3, 4), torch.zeros(2, 4), torch.zeros(3, 1), torch.eye(4))
    with pytest.raises(ValueError, match="input size"):
        merge(torch.zeros(3, 4), torch.zeros(2, 5), torch.zeros(3, 2), torch.eye(4))
    with pytest.raises(ValueError, match="one adapted weight"):
        concept_targets([torch.zeros(3, 4)], [])
