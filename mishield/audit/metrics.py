"""The audit's metrics (docs/architecture.md §4, "metrics"): attack accuracy @1/@5, KNN distance, Δ against a baseline.

All of them are judged by an *independent* evaluation model: the target itself would call its
own adversarial-looking reconstructions perfect.
"""

from __future__ import annotations

import torch


def topk_hits(logits: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """Bool (N,): whether `labels` is among the k largest logits (k is capped at the class count)."""
    k = min(k, logits.shape[1])
    return (logits.topk(k, dim=1).indices == labels[:, None]).any(dim=1)


def knn_distances(
    features: torch.Tensor,
    labels: torch.Tensor,
    private_features: torch.Tensor,
    private_labels: torch.Tensor,
) -> torch.Tensor:
    """Squared L2 from each feature to the nearest private feature of the same class: (N,).

    A class without private images gives NaN (the caller reports it as missing, never as 0).
    """
    out = torch.full((features.shape[0],), float("nan"), dtype=torch.float64)
    features = features.double()
    private_features = private_features.double()
    for c in labels.unique().tolist():
        rows = (labels == c).nonzero().flatten()
        ref = private_features[private_labels == c]
        if ref.shape[0] == 0:
            continue
        out[rows] = torch.cdist(features[rows], ref).pow(2).min(dim=1).values
    return out


def summarize(top1: torch.Tensor, top5: torch.Tensor, knn: torch.Tensor) -> dict:
    """Aggregate per-image outcomes into point estimates (fractions in [0, 1]).

    No interval here: the images of one class are not independent, so the audit's intervals come
    from `mishield.audit.stats.class_bootstrap`, which needs the per-class layout.
    """
    n = int(top1.numel())
    hits = int(top1.sum())
    finite = knn[~torch.isnan(knn)]
    return {
        "n": n,
        "attack_acc1": hits / n if n else float("nan"),
        "attack_acc5": float(top5.float().mean()) if n else float("nan"),
        "knn_dist": float(finite.mean()) if finite.numel() else None,
    }


def deltas(baseline: dict, other: dict) -> dict:
    """Differences against the baseline model, and the paper's Δ = attack-accuracy drop / accuracy drop.

    Δ (Koh et al., ECCV 2024, Table 1) is how many points of attack accuracy a defence removes
    per point of natural accuracy it costs; it is undefined (None) when accuracy did not drop.
    """

    def diff(key: str) -> float | None:
        a, b = baseline.get(key), other.get(key)
        return None if a is None or b is None else b - a

    d_acc, d_att = diff("natural_acc"), diff("attack_acc1")
    ratio = d_att / d_acc if d_acc is not None and d_att is not None and d_acc < 0 else None
    return {
        "natural_acc": d_acc,
        "attack_acc1": d_att,
        "attack_acc5": diff("attack_acc5"),
        "knn_dist": diff("knn_dist"),
        "delta": ratio,
    }
