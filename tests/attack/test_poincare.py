"""The Poincaré loss against its formula (Struppek et al., ICML 2022, eq. 3)."""

from __future__ import annotations

import itertools
import math

import torch

from mishield.attack.poincare import ONEHOT_SHRINK, poincare_loss


def _reference(logits: list[float], target: int) -> float:
    l1 = sum(abs(v) for v in logits)
    u = [v / l1 for v in logits]
    v = [max(0.0, min(1.0, (1.0 if i == target else 0.0) - ONEHOT_SHRINK)) for i in range(len(logits))]
    uu = sum(a * a for a in u)
    vv = sum(b * b for b in v)
    dd = sum((a - b) ** 2 for a, b in zip(u, v))
    return math.acosh(1 + 2 * dd / ((1 - uu) * (1 - vv)))


def test_matches_the_formula_sample_by_sample():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 7, generator=gen, dtype=torch.float64) * 3
    targets = torch.tensor([0, 1, 2, 3, 6, 6])
    got = poincare_loss(logits, targets)
    assert got.shape == (6,)
    for i in range(6):
        assert math.isclose(float(got[i]), _reference(logits[i].tolist(), int(targets[i])), rel_tol=1e-4)  # float32 inside


def test_shrinks_as_the_target_logit_dominates_and_stays_finite():
    base = torch.tensor([[0.5, -0.2, 0.1, 0.3]])
    losses = []
    for boost in (0.0, 1.0, 4.0, 16.0, 64.0):
        logits = base.clone()
        logits[0, 2] += boost
        losses.append(float(poincare_loss(logits, torch.tensor([2]))))
    assert all(a > b for a, b in itertools.pairwise(losses))
    one_hot = torch.tensor([[0.0, 0.0, 5.0, 0.0]])  # ||u||_2 = 1: the clamp keeps it finite
    assert torch.isfinite(poincare_loss(one_hot, torch.tensor([2]))).all()


def test_gradient_is_finite_under_bfloat16_logits():
    logits = (torch.randn(4, 10) * 5).to(torch.bfloat16).requires_grad_(True)
    loss = poincare_loss(logits, torch.tensor([1, 2, 3, 4])).sum()
    loss.backward()
    assert loss.dtype == torch.float32
    assert torch.isfinite(logits.grad.float()).all()
