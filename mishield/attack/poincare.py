"""The Poincaré loss PPA optimises (Struppek et al., ICML 2022, eq. 3).

Logits are L1-normalised into the open unit ball and compared with a slightly shrunk one-hot
vector by their hyperbolic distance. Unlike cross-entropy the distance keeps growing as the
target class dominates, so the optimisation does not stall on an over-confident but unnatural
image, and it does not reward pushing every other logit to -inf.
"""

from __future__ import annotations

import torch

# Shrinks the one-hot target into the open ball, where the distance is finite (PPA's value).
ONEHOT_SHRINK = 1e-4


def poincare_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-sample Poincaré distance between `logits` (N, K) and the one-hot vectors of `targets` (N,).

    Computed in float32 whatever the autocast dtype: the denominator `1 - ||u||^2` loses all
    its digits in bfloat16.
    """
    logits = logits.float()
    u = logits / logits.abs().sum(dim=1, keepdim=True).clamp_min(1e-12)
    # scatter, not F.one_hot: one_hot validates the labels on the host, a sync every step on CUDA.
    one_hot = torch.zeros_like(logits).scatter_(1, targets[:, None], 1.0)
    v = (one_hot - ONEHOT_SHRINK).clamp(0.0, 1.0)
    u_sq = (u * u).sum(dim=1)
    v_sq = (v * v).sum(dim=1)
    diff_sq = ((u - v) ** 2).sum(dim=1)
    # ||u||_2 <= ||u||_1 = 1; the clamp guards the single-non-zero-logit case where ||u||_2 = 1.
    delta = 2.0 * diff_sq / ((1.0 - u_sq).clamp_min(1e-12) * (1.0 - v_sq))
    return torch.acosh(1.0 + delta)
