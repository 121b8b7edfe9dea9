"""Attack accuracy, KNN distance, intervals and Δ on tiny tensors with known answers."""

from __future__ import annotations

import math

import pytest
import torch

from mishield.audit.metrics import (
    deltas,
    knn_distances,
    summarize,
    topk_hits,
)
from mishield.audit.stats import wilson_interval


def test_topk_hits():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.5, 0.2, 0.3], [0.2, 0.3, 0.5]])
    labels = torch.tensor([1, 2, 0])
    assert topk_hits(logits, labels, 1).tolist() == [True, False, False]
    assert topk_hits(logits, labels, 2).tolist() == [True, True, False]
    assert topk_hits(logits, labels, 5).all()  # k is capped at the number of classes


def test_knn_distance_is_the_squared_distance_to_the_nearest_private_image_of_the_same_class():
    gen = torch.Generator().manual_seed(0)
    feats, labels = torch.randn(7, 4, generator=gen), torch.tensor([0, 0, 1, 1, 1, 2, 2])
    private, private_labels = torch.randn(12, 4, generator=gen), torch.tensor([0, 1, 2] * 4)
    got = knn_distances(feats, labels, private, private_labels)
    for i in range(7):
        same = [private[j] for j in range(12) if private_labels[j] == labels[i]]
        expected = min(float(((feats[i] - p) ** 2).sum()) for p in same)
        assert got[i].item() == pytest.approx(expected, rel=1e-6)
    # a class without private images is missing (NaN), never a distance of zero
    assert torch.isnan(knn_distances(feats[:1], torch.tensor([5]), private, private_labels)).all()


def test_wilson_interval_known_values():
    lo, hi = wilson_interval(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-4) and hi == pytest.approx(0.9433, abs=1e-4)
    assert wilson_interval(0, 20)[0] == 0.0 and wilson_interval(20, 20)[1] == 1.0
    assert all(math.isnan(v) for v in wilson_interval(0, 0))


def test_summarize_and_deltas():
    s = summarize(torch.tensor([True, False, True, True]), torch.tensor([True, True, True, True]), torch.tensor([1.0, float("nan"), 3.0, 2.0]))
    assert s["n"] == 4 and s["attack_acc1"] == 0.75 and s["attack_acc5"] == 1.0 and s["knn_dist"] == pytest.approx(2.0)
    base = {"natural_acc": 0.9458, "attack_acc1": 0.8276, "attack_acc5": 0.95, "knn_dist": 100.0}
    rolss = {"natural_acc": 0.9289, "attack_acc1": 0.6844, "attack_acc5": 0.9, "knn_dist": 120.0}
    d = deltas(base, rolss)
    # the paper's ResNet-50 RoLSS row: 14.32 points of attack accuracy for 1.69 of accuracy, Δ 8.5
    assert d["delta"] == pytest.approx(8.47, abs=0.01)
    assert d["attack_acc1"] == pytest.approx(-0.1432) and d["knn_dist"] == pytest.approx(20.0)
    assert deltas(base, {**rolss, "natural_acc": 0.95})["delta"] is None  # accuracy did not drop
    assert deltas(base, {**rolss, "natural_acc": None})["natural_acc"] is None
