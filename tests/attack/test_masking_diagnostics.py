"""The gradient-masking diagnostics (mishield/attack/masking.py): every masked wrapper is flagged, real models are not."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from masking import (
    FMNIST_PRE,
    fmnist_images,
    fmnist_other_target,
    fmnist_target,
    masked_wrappers,
    pca_prior,
)
from torch import nn

from mishield.attack.masking import (
    GradientStats,
    MaskingThresholds,
    gradient_stats,
    input_gradients,
    masking_signals,
)
from mishield.data import load_embedded_fashion_mnist


@functools.cache
def _images() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """250 real held-out images of the private classes with labels, and 200 prior samples."""
    fm = load_embedded_fashion_mnist()
    y = torch.from_numpy(fm.test_labels).long()
    real = fmnist_images(fm.test_images)[y < 5][::2]
    prior = pca_prior()
    return real, y[y < 5][::2], prior.generate(prior.sample(200, torch.Generator().manual_seed(0), torch.device("cpu")))


def _stats(model: nn.Module) -> dict[str, GradientStats]:
    real, labels, generated = _images()
    return {"real": gradient_stats(input_gradients(model, real, labels)), "prior": gradient_stats(input_gradients(model, generated))}


@functools.cache
def _reference() -> dict[str, GradientStats]:
    return _stats(fmnist_target())


@pytest.mark.parametrize("name", ["detach", "detach-hard", "quantise", "temperature-1e3", "temperature-1e-3"])
def test_every_gradient_breaking_wrapper_is_flagged_on_real_and_prior_images(name):
    reasons = masking_signals(_stats(masked_wrappers(fmnist_target(), FMNIST_PRE, 5)[name]), _reference())
    assert any("real images" in r for r in reasons) and any("prior images" in r for r in reasons), reasons


def test_the_detector_is_flagged_on_prior_images_only():
    stats = _stats(masked_wrappers(fmnist_target(), FMNIST_PRE, 5)["detector"])
    reasons = masking_signals(stats, _reference())
    assert reasons and all("prior images" in r for r in reasons), reasons
    assert stats["real"] == _reference()["real"]  # natural inputs: the model itself


def test_real_models_are_not_flagged():
    assert masking_signals(_reference(), _reference()) == []
    other = _stats(fmnist_other_target())  # same recipe, another seed: measured norms within 10 % of the reference's
    assert masking_signals(other, _reference()) == []
    assert other["real"].zero_fraction == 0.0 and other["real"].median_norm > 0


def test_input_gradients_are_the_cross_entropy_gradient_and_default_to_the_own_prediction():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 4))
    x, y = torch.randn(5, 3, 2, 2), torch.tensor([0, 1, 2, 3, 0])
    w = model[1].weight.detach()
    with torch.no_grad():
        p = model(x).softmax(1)
    expected = ((p - F.one_hot(y, 4)) @ w).view_as(x)  # d CE / dx of a linear model
    assert torch.allclose(input_gradients(model, x, y, batch_size=2), expected, atol=1e-6)
    own = ((p - F.one_hot(p.argmax(1), 4)) @ w).view_as(x)
    assert torch.allclose(input_gradients(model, x), own, atol=1e-6)
    assert not any(param.grad is not None for param in model.parameters())


def test_gradient_stats_and_the_thresholds():
    grads = torch.tensor([[3.0, 4.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0], [float("inf"), 1.0, 0.0, 0.0]])
    stats = gradient_stats(grads)
    assert stats.n == 3 and stats.median_norm == pytest.approx(1.0)  # norms 5, 1, 1 (the inf left out)
    assert stats.zero_fraction == pytest.approx(7 / 12) and stats.nonfinite_fraction == pytest.approx(1 / 12)
    ref = {"real": GradientStats(100, 1.0, 0.1, 0.0), "prior": GradientStats(100, 2.0, 0.1, 0.0)}
    limits = MaskingThresholds(zero_excess=0.5, norm_factor=100.0, asymmetry_factor=100.0)
    assert masking_signals({"real": GradientStats(100, 99.0, 0.59, 0.0)}, ref, limits) == []  # just inside both
    assert len(masking_signals({"real": GradientStats(100, 101.0, 0.61, 0.0)}, ref, limits)) == 2
    assert len(masking_signals({"real": GradientStats(100, 0.009, 0.1, 0.0)}, ref, limits)) == 1
    ref = {"real": GradientStats(100, 1.0, 0.0, 0.0), "prior": GradientStats(100, 2.0, 0.0, 0.0)}
    # each norm within the factor of the reference's (x0.1, x20), their ratio not ((40 / 0.1) / (2 / 1) = 200): only the asymmetry
    lopsided = {"real": GradientStats(100, 0.1, 0.0, 0.0), "prior": GradientStats(100, 40.0, 0.0, 0.0)}
    reasons = masking_signals(lopsided, ref, limits)
    assert len(reasons) == 1 and "generated inputs" in reasons[0]
    assert masking_signals({**lopsided, "prior": GradientStats(100, 16.0, 0.0, 0.0)}, ref, limits) == []  # 80: inside
    assert masking_signals({"real": GradientStats(100, 1.0, 0.0, 0.01)}, ref, limits) == ["1% of the input-gradient entries on real images are not finite."]
