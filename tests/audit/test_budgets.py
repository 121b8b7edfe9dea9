"""Attack budgets: presets' numbers and sources, the lr schedule, the latent constraint, the
selection-only baseline, the minimum budget for a gate, and the generator-free mode's checks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from attack_support import CPU, HALF, noise_splits
from torch import nn

from mishield.attack.config import make_config
from mishield.attack.engine import InversionAttack
from mishield.attack.priors import (
    STYLEGAN_CENTER_CROP,
    DCGANGenerator,
    GeneratorPrior,
    PixelPrior,
    Prior,
    center_crop,
)
from mishield.audit.budgets import below_minimum, budget_warnings, travel
from mishield.audit.runner import AuditRun
from mishield.errors import UsageError


class BrightClassifier(nn.Module):
    """logits = W @ (per-channel mean) + BatchNorm-free: the gradient always pushes latents one way."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.head = nn.Linear(3, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x.mean(dim=(2, 3)))


class LinearPrior(Prior):
    """latent (3,) -> an 8x8 image of colour tanh(latent / 4): unbounded latents stay finite images."""

    def __init__(self):
        super().__init__((3, 8, 8), (3,), {"source": "test"})

    def generate(self, latents: torch.Tensor) -> torch.Tensor:
        return torch.tanh(latents / 4)[:, :, None, None].expand(-1, -1, 8, 8)


def _dcgan_prior() -> GeneratorPrior:
    torch.manual_seed(0)
    return GeneratorPrior(DCGANGenerator(latent_dim=8, resolution=32, channels=3, width=4).eval(), 8, {"source": "test"})


def test_presets_hold_the_public_configs_numbers():
    # PPA configs/attacking/default_attacking_local.yaml (FaceScrub) and CelebA_FFHQ.yaml
    fs = make_config("ppa-facescrub")
    assert (fs.samples, fs.candidates, fs.iterations, fs.keep, fs.final_augmentations) == (2000, 200, 50, 50, 100)
    assert (fs.lr, fs.betas, fs.milestones, fs.gamma) == (0.005, (0.1, 0.1), (30, 40), 0.1)
    ce = make_config("ppa-celeba")
    assert (ce.samples, ce.candidates, ce.iterations, ce.keep, ce.final_augmentations) == (5000, 200, 70, 50, 100)
    assert ce.milestones == ()  # CelebA_FFHQ.yaml has no lr_scheduler
    koh = make_config("koh2024-facescrub")
    assert (koh.samples, koh.candidates, koh.iterations, koh.keep, koh.final_augmentations) == (2000, 16, 50, 8, 100)
    assert koh.milestone_steps() == [30, 40]
    with pytest.warns(FutureWarning, match="deprecated"):
        assert make_config("paper") == make_config("ppa-celeba")
    with pytest.warns(FutureWarning):
        assert make_config("quick").preset == "default"


def test_budget_fields_left_open_come_from_the_prior_kind():
    z = make_config("default").resolve(_dcgan_prior())
    assert (z.lr, z.iterations, z.milestone_steps()) == (0.05, 100, [60, 80])
    pixels = make_config("default").resolve(PixelPrior((3, 8, 8)))
    assert (pixels.lr, pixels.iterations, pixels.betas) == (0.05, 2000, (0.5, 0.9))
    assert make_config("ci").resolve(PixelPrior((3, 8, 8))).iterations == 200  # CI-sized generator-free run
    assert make_config("default", lr=0.01, iterations=7).resolve(_dcgan_prior()).lr == 0.01  # explicit wins


def test_lr_is_cut_at_the_milestones_in_the_optimisation_loop():
    config = make_config("ci", samples=12, candidates=3, keep=1, final_augmentations=1, iterations=10,
                         lr=0.1, milestones=(0.5, 8), gamma=0.1)  # fmt: skip
    attack = InversionAttack(LinearPrior(), BrightClassifier(), HALF, config, CPU)
    seen: list[float] = []
    attack.step.run(torch.zeros(3, 3), torch.tensor([0, 1, 2]), torch.arange(3), 10,
                    lambda step: seen.append(attack.step.optimizer.param_groups[0]["lr"]))  # fmt: skip
    assert seen == pytest.approx([0.1] * 5 + [0.01] * 3 + [0.001] * 2)
    assert config.to_dict()["milestones"] == [0.5, 8] and config.to_dict()["gamma"] == 0.1


def test_z_space_latent_constraint_keeps_coordinates_and_norms_bounded():
    prior = LinearPrior()  # z-space defaults: |z_i| <= 3
    config = make_config("ci", samples=12, candidates=3, keep=1, final_augmentations=1, iterations=200, lr=0.5, milestones=())
    attack = InversionAttack(prior, BrightClassifier(), HALF, config, CPU)
    out = attack.step.run(torch.zeros(6, 3), torch.tensor([0, 1, 2, 3, 0, 1]), torch.arange(6), 200)
    assert out.abs().max() <= prior.latent_clamp + 1e-6 and out.abs().max() > 2.0  # it got pushed to the bound
    assert (out.norm(dim=1) <= prior.latent_clamp * 3**0.5 + 1e-5).all()
    prior.latent_clamp = None  # unconstrained: the same run drifts past it
    free = InversionAttack(prior, BrightClassifier(), HALF, config, CPU).step.run(torch.zeros(6, 3), torch.tensor([0, 1, 2, 3, 0, 1]), torch.arange(6), 200)
    assert free.abs().max() > 3.5


def test_selection_only_equals_an_attack_with_zero_steps():
    kw = {"samples": 30, "candidates": 4, "keep": 2, "final_augmentations": 3, "batch_size": 5, "lr": 0.2, "milestones": ()}
    result = InversionAttack(LinearPrior(), BrightClassifier(), HALF, make_config("ci", iterations=8, **kw), CPU).run([0, 3])
    zero = InversionAttack(LinearPrior(), BrightClassifier(), HALF, make_config("ci", iterations=0, **kw), CPU).run([0, 3])
    base = result.selection_only
    assert base is not None and base.classes == [0, 3] and base.image_steps == 0
    assert torch.equal(base.images, zero.images) and torch.allclose(base.final_scores, zero.final_scores)
    assert base.images.shape == result.images.shape and base.final_scores.shape == result.final_scores.shape
    assert not torch.equal(result.images, base.images)  # the optimised images are another set
    off = InversionAttack(LinearPrior(), BrightClassifier(), HALF, make_config("ci", iterations=2, selection_baseline=False, **kw), CPU).run([0])
    assert off.selection_only is None


def test_minimum_budget_per_prior_kind():
    prior = _dcgan_prior()
    assert budget_warnings(make_config("default"), prior) == []
    assert budget_warnings(make_config("ci"), prior) == []
    # PPA's w-space lr on a z-space prior for 30 steps (the former `quick`) hardly moves a latent
    weak = budget_warnings(make_config("default", iterations=30, lr=0.005, milestones=()), prior)
    assert len(weak) == 1 and "moves a latent by at most 0.15" in weak[0]
    assert below_minimum(make_config("default", iterations=1), prior)
    assert travel(make_config("ppa-facescrub")) == pytest.approx(0.1555)


def test_generator_free_mode_flags_a_target_without_batchnorm():
    pixels = PixelPrior((3, 8, 8))
    config = make_config("default")
    with_bn = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))
    assert budget_warnings(config, pixels, [with_bn]) == []
    flagged = budget_warnings(config, pixels, [with_bn, BrightClassifier()])
    assert len(flagged) == 1 and "model 2 has no BatchNorm" in flagged[0]
    assert below_minimum(make_config("ci"), pixels)  # 200 steps: CI only, never a gate


def test_a_weak_gate_is_refused_and_an_allowed_one_is_flagged(tmp_path, monkeypatch):

    import mishield

    noise_splits(tmp_path / "data", train=3, val=2)
    kw = {"data": tmp_path / "data", "prior": "none", "classes": "0,2", "device": "cpu", "max_attack_acc": 0.5, "trust_checkpoint": True,
          "eval_model": mishield.load_model("attack_support:small_plain_cnn", num_classes=3, input_size=16),
          "attack": {"samples": 6, "candidates": 2, "iterations": 1, "keep": 1, "final_augmentations": 1, "batch_size": 6}}
    target = mishield.load_model("attack_support:tiny_resnet", num_classes=3, input_size=16)
    # random-data models: the trust checks (tests/audit/test_trust.py) would refuse them first
    monkeypatch.setattr(AuditRun, "_trust", lambda run: ([{"accuracy": None}] * len(run.evaluations), [], None))
    with pytest.raises(UsageError, match="too weak to gate"):
        mishield.audit(target, out=tmp_path / "refused", **kw)
    report = mishield.audit(target, out=tmp_path / "flagged", allow_weak_budget=True, **kw)
    assert any(w.startswith("weak_audit: iterations 1 is below") for w in report.warnings)


def test_center_crop_is_off_for_z_space_and_ppas_for_high_resolution_stylegan():
    images = torch.arange(2 * 1 * 1024 * 1024, dtype=torch.float32).view(2, 1, 1024, 1024)
    assert center_crop(images, STYLEGAN_CENTER_CROP).shape[-2:] == (800, 800)
    assert center_crop(images, None) is images
    assert _dcgan_prior().center_crop is None and _dcgan_prior().image_shape == (3, 32, 32)
    cropped = GeneratorPrior(DCGANGenerator(latent_dim=8, resolution=32, channels=3, width=4).eval(), 8, {"source": "t"}, 0.75)
    assert cropped.image_shape == (3, 24, 24)


def test_the_crop_warp_antialiases_when_it_downsamples():
    from mishield.attack.augment import identity_thetas, warp
    from mishield.attack.inputs import ModelInput

    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    x = ModelInput(HALF)(images, identity_thetas(2, "cpu"))  # HALF: model input == image
    resized = F.interpolate(images, size=(8, 8), mode="bilinear", align_corners=False, antialias=True)
    assert torch.allclose(x, resized, atol=1e-5)  # what the evaluator's resize gives
    assert not torch.allclose(warp(images, identity_thetas(2, "cpu"), (8, 8)), resized, atol=0.05)  # bilinear alone aliases
