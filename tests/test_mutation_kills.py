"""Tests written to kill mutants that survived the fast suite (docs/testing.md lists the rest).

Each test names the behaviour of the definition it pins; the comment says which slip it catches.
"""

from __future__ import annotations

import math

import pytest
import torch
import torchvision
from torch import nn

from mishield.attack.augment import candidate_keys
from mishield.attack.poincare import ONEHOT_SHRINK, poincare_loss
from mishield.audit.metrics import deltas, knn_distances, summarize
from mishield.errors import BadInputError, UsageError
from mishield.surgery import apply_plan, plan_surgery, rebuild
from mishield.training.bido import (
    bido_loss,
    bido_terms,
    gaussian_kernel,
    hsic,
    label_kernel,
)

# ---------------------------------------------------------------------------------------------
# Poincaré loss (Struppek et al., ICML 2022, eq. 3)


def _reference64(logits: list[float], target: int) -> float:
    l1 = sum(abs(v) for v in logits)
    u = [v / l1 for v in logits]
    v = [max(0.0, (1.0 if i == target else 0.0) - ONEHOT_SHRINK) for i in range(len(logits))]
    uu, vv = sum(a * a for a in u), sum(b * b for b in v)
    dd = sum((a - b) ** 2 for a, b in zip(u, v))
    return math.acosh(1 + 2 * dd / ((1 - uu) * (1 - vv)))


def test_poincare_distance_near_the_shrunk_one_hot_is_small_and_exact():
    """Close to v the distance is O(1), where `acosh(1 + δ)` and a wrong constant (`acosh(2 + δ)`)
    or an unclamped v (non-target entries at -1e-4) differ plainly; with typical logits δ is ~1e4
    and both slips hide below float32 precision."""
    others = ONEHOT_SHRINK / 9
    logits = [others] * 10
    logits[4] = 1.0 - ONEHOT_SHRINK
    expected = _reference64(logits, 4)
    assert 0.05 < expected < 1.0  # really the small-distance regime
    got = float(poincare_loss(torch.tensor([logits], dtype=torch.float64), torch.tensor([4])))
    assert math.isclose(got, expected, rel_tol=2e-2), (got, expected)


def test_poincare_loss_ignores_the_scale_of_the_logits():
    """u = logits / ||logits||_1 for any scale, including an L1 norm below 1 (a clamp of the norm
    at 1 instead of at a tiny epsilon would stop normalising small logits)."""
    logits = torch.randn(5, 6, generator=torch.Generator().manual_seed(0))
    targets = torch.tensor([0, 1, 2, 3, 5])
    base = poincare_loss(logits, targets)
    for scale in (1e-3, 0.1, 10.0):
        torch.testing.assert_close(poincare_loss(logits * scale, targets), base, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Audit metrics (docs/architecture.md; Koh et al., ECCV 2024, Table 1 for Δ)


def test_summarize_of_no_reconstructions_reports_missing_values_not_a_crash():
    """A sharded rank or a filtered class list can leave no images: NaN / None, never 0 / 0."""
    empty = torch.zeros(0, dtype=torch.bool)
    out = summarize(empty, empty, torch.zeros(0, dtype=torch.float64))
    assert out["n"] == 0 and out["knn_dist"] is None
    assert math.isnan(out["attack_acc1"]) and math.isnan(out["attack_acc5"])


def test_summarize_reports_point_estimates_without_an_interval():
    # intervals need the per-class layout (attack.stats.class_bootstrap), not a flat image list
    top1 = torch.tensor([True, False, True, True, False])
    out = summarize(top1, torch.ones(5, dtype=torch.bool), torch.tensor([1.0, float("nan"), 3.0, 2.0, 2.0]))
    assert out["attack_acc1"] == pytest.approx(0.6) and "attack_acc1_ci95" not in out
    assert out["attack_acc5"] == 1.0 and out["knn_dist"] == 2.0  # NaN (class without private images) left out


def test_deltas_include_top5_and_leave_delta_undefined_without_an_accuracy_drop():
    base = {"natural_acc": 0.9, "attack_acc1": 0.8, "attack_acc5": 0.95, "knn_dist": 10.0}
    same_acc = {"natural_acc": 0.9, "attack_acc1": 0.5, "attack_acc5": 0.75, "knn_dist": 12.0}
    d = deltas(base, same_acc)
    assert d["attack_acc5"] == pytest.approx(-0.2) and d["knn_dist"] == pytest.approx(2.0)
    assert d["delta"] is None  # no accuracy cost: the ratio is undefined, not a division by zero


def test_knn_distance_continues_past_a_class_without_private_images():
    features = torch.tensor([[0.0, 0.0], [1.0, 1.0], [3.0, 0.0]])
    labels = torch.tensor([0, 1, 2])  # class 1 has no private images
    private = torch.tensor([[0.0, 1.0], [3.0, 2.0]])
    private_labels = torch.tensor([0, 2])
    out = knn_distances(features, labels, private, private_labels)
    assert out[0] == 1.0 and math.isnan(out[1]) and out[2] == 4.0


# ---------------------------------------------------------------------------------------------
# Surgery planning and rewriting (docs/architecture.md; Koh et al., ECCV 2024, Sec. 4)


class _TopLevelSkip(nn.Module):
    """A skip whose merge sits in the root module (no block path), plus a module forward never
    calls: its weights are not the surgery's to drop."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.head = nn.Linear(3, 4)
        self.unused = nn.Linear(2, 2)

    def forward(self, x):
        x = torch.relu(self.conv(x)) + x
        return self.head(x.mean((2, 3)))


def _small_densenet() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.DenseNet(
        growth_rate=8, block_config=(2, 3), num_init_features=16, bn_size=2, num_classes=10
    ).eval()


def test_plan_defaults_rolss_with_k_zero_and_the_papers_ssf_constants():
    resnet = torchvision.models.resnet18(num_classes=10).eval()
    plan = plan_surgery(resnet, input_size=(3, 64, 64))  # the default method is RoLSS
    assert plan.method == "rolss" and plan.alpha == 0.0
    assert plan.selection.startswith("stage ") and "layer4" in plan.selection
    assert plan.to_dict()["selected"] == plan.selected and plan.to_dict()["alpha"] == 0.0
    assert plan.to_dict()["analysis"] == plan.analysis.to_dict()
    assert plan_surgery(resnet, "ssf", input_size=(3, 64, 64)).alpha == 0.2  # additive default
    assert plan_surgery(_small_densenet(), "ssf", input_size=(3, 32, 32)).alpha == 0.01  # concatenative default
    with pytest.raises(UsageError, match="`method` must be rolss or ssf"):
        plan_surgery(resnet, "prune", input_size=(3, 64, 64))


@pytest.mark.parametrize("method,alpha", [("rolss", None), ("ssf", 0.3)])
def test_rebuild_from_the_recorded_spec_gives_the_same_model(method, alpha):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    result = apply_plan(model, plan_surgery(model, method, alpha=alpha, input_size=(3, 64, 64)))
    assert result.spec["method"] == method and result.spec["sites"] == result.plan.selected
    assert result.seconds >= 0.0 and math.isfinite(result.seconds)  # a duration, not a deadline
    again = rebuild(model, result.spec, (3, 64, 64)).eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(again(x), result.model.eval()(x), rtol=0, atol=0)
    with pytest.raises(BadInputError, match="does not match"):
        rebuild(model, {**result.spec, "sites": ["layer4.0.add", "layer9.add"]}, (3, 64, 64))


def test_a_plan_naming_a_site_the_model_lacks_is_refused():
    model = torchvision.models.resnet18(num_classes=10).eval()
    plan = plan_surgery(model, "rolss", input_size=(3, 64, 64))
    plan.selected = [*plan.selected, "layer9.0.add"]
    with pytest.raises(BadInputError, match="not in the model's graph"):
        apply_plan(model, plan)


def test_ssf_on_a_skip_in_the_root_module_keeps_unused_modules():
    torch.manual_seed(0)
    model = _TopLevelSkip().eval()
    result = apply_plan(model, plan_surgery(model, "ssf", alpha=0.25, input_size=(3, 8, 8)))
    assert result.dropped_parameters == []  # `unused` is kept: it was never the surgery's
    assert set(model.state_dict()) <= set(result.model.state_dict())
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        expected = model.head((torch.relu(model.conv(x)) + 0.25 * x).mean((2, 3)))
        torch.testing.assert_close(result.model(x), expected)


# ---------------------------------------------------------------------------------------------
# The attack engine (PPA, Struppek et al., ICML 2022)


def test_adam_uses_the_configured_lr_and_ppas_betas():
    from attack.test_attack_mechanisms import _attack

    attack = _attack(lr=0.07)
    group = attack.step.make_optimizer(torch.zeros(2, 8, requires_grad=True)).param_groups[0]
    assert group["lr"] == 0.07 and group["betas"] == (0.1, 0.1)


def test_each_step_sees_its_own_random_crop():
    """The loss is taken under RandomResizedCrop per step (keyed by the step counter): the same
    latents at two steps give two losses. Without the crop they would be equal."""
    from attack.test_attack_mechanisms import CLASSES, _attack

    attack = _attack(lr=0.2)
    latents, _ = attack.initial_selection(CLASSES)
    labels = torch.tensor(CLASSES).repeat_interleave(attack.config.candidates)
    keys = candidate_keys(0, labels, torch.arange(attack.config.candidates).repeat(len(CLASSES)))
    with torch.no_grad():
        first = attack.step.forward(latents, labels, keys, torch.tensor(0))
        second = attack.step.forward(latents, labels, keys, torch.tensor(1))
    assert first != second


def test_run_reports_progress_image_steps_and_timings(monkeypatch):
    import itertools
    import types

    from attack.test_attack_mechanisms import CLASSES, _attack

    import mishield.attack.engine

    # A clock that advances by exactly one second per read: the timings are then exact sums of
    # whole numbers, independent of the machine's load (real clock reads made this test flaky).
    ticks = itertools.count(1.0)
    monkeypatch.setattr(mishield.attack.engine, "time", types.SimpleNamespace(perf_counter=lambda: next(ticks)))
    calls = []
    attack = _attack(lr=0.2, iterations=4)
    result = attack.run(CLASSES, progress=lambda *a: calls.append(a))
    total = len(CLASSES) * attack.config.candidates * 4
    assert result.image_steps == total
    assert {c[0] for c in calls} == {"attack"} and calls[-1][1:] == (total, total)
    done = [c[1] for c in calls]
    assert done == sorted(done) and done[0] > 0 and all(c[2] == total for c in calls)
    t = result.timings
    assert set(t) == {"initial_selection_s", "optimisation_s", "final_selection_s", "selection_only_s"}
    # each phase lies between its own clock reads, and the run's seconds are exactly its three
    # phases (the selection-only baseline is timed apart, after them)
    assert t["initial_selection_s"] > 0 and t["optimisation_s"] > 0 and t["final_selection_s"] > 0
    assert result.seconds == t["initial_selection_s"] + t["optimisation_s"] + t["final_selection_s"]
    assert t["selection_only_s"] >= 0


def test_images_map_minus_one_to_zero_and_one_to_255():
    from mishield.attack.engine import to_uint8

    out = to_uint8(torch.tensor([-3.0, -1.0, 0.0, 0.5, 1.0, 2.0]))
    assert out.dtype == torch.uint8 and out.tolist() == [0, 0, 128, 191, 255, 255]


def test_config_bounds_accept_the_smallest_valid_values():
    from mishield.attack.config import make_config

    cfg = make_config("ci", samples=1, candidates=1, iterations=0, keep=1, final_augmentations=1, batch_size=1)
    assert (cfg.samples, cfg.candidates, cfg.keep, cfg.iterations) == (1, 1, 1, 0)  # I = 0: selection only
    make_config("ci", samples=5, candidates=5, keep=5)  # C = S and K = C are allowed
    with pytest.raises(UsageError, match="final_augmentations` must be at least 1, got 0"):
        make_config("ci", final_augmentations=0)
    with pytest.raises(UsageError, match="preset` must be one of ci, default"):
        make_config("huge")


# ---------------------------------------------------------------------------------------------
# BiDO (Peng et al., KDD 2022): the library's loss, beside the trainer's own use of the terms


def _bido_batch():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, 3, 4, 4, generator=g)
    labels = torch.arange(12) % 3
    feats = [x.flatten(1)[:, :20] * 2 + torch.randn(12, 20, generator=g), torch.randn(12, 6, generator=g)]
    return feats, x, labels


def test_bido_loss_is_lx_hsic_x_minus_ly_hsic_y_with_the_authors_defaults():
    feats, x, labels = _bido_batch()
    hx, hy = bido_terms(feats, x, labels, 3)
    expected = sum(0.05 * a - 0.5 * b for a, b in zip(hx, hy))
    torch.testing.assert_close(bido_loss(feats, x, labels, 3), expected)
    hx2, hy2 = bido_terms(feats, x, labels, 3, sigma=2.0, estimator="biased")
    got = bido_loss(feats, x, labels, 3, lx=3.0, ly=7.0, sigma=2.0, estimator="biased")
    torch.testing.assert_close(got, sum(3.0 * a - 7.0 * b for a, b in zip(hx2, hy2)))


def test_bido_terms_use_sigma_for_every_gaussian_kernel():
    feats, x, labels = _bido_batch()
    hx, hy = bido_terms(feats, x, labels, 3, sigma=2.0)
    k_x, k_y = gaussian_kernel(x, 2.0), label_kernel(labels, 3)
    for z, a, b in zip(feats, hx, hy):
        k_z = gaussian_kernel(z, 2.0)
        torch.testing.assert_close(a, hsic(k_x, k_z).float(), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(b, hsic(k_y, k_z).float(), rtol=1e-4, atol=1e-5)
    default_x, _ = bido_terms(feats, x, labels, 3)
    assert not torch.allclose(torch.stack(hx), torch.stack(default_x))  # sigma really matters here


def test_hsic_refuses_kernels_that_are_not_square():
    with pytest.raises(ValueError, match="two \\(m, m\\) kernel matrices"):
        hsic(torch.ones(3, 4), torch.ones(3, 4))
