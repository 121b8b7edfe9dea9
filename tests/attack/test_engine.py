"""The attack engine's selection logic, its randomness, and the reproducibility sharding relies on."""

from __future__ import annotations

import pytest
import torch
from attack_support import CPU, HALF, flat_colour_prior
from torch import nn

from mishield.attack.augment import (
    candidate_keys,
    crop_thetas,
    identity_thetas,
    uniforms,
    warp,
)
from mishield.attack.config import make_config
from mishield.attack.engine import (
    InversionAttack,
    chunks,
    out_of_memory_hint,
    select_top,
)
from mishield.attack.inputs import ModelInput
from mishield.attack.priors import DCGANGenerator, GeneratorPrior
from mishield.audit.runner import parse_classes
from mishield.errors import BadInputError, UsageError
from mishield.preprocessing import Preprocessing


class ChannelMeanClassifier(nn.Module):
    """logits = W @ (per-channel mean): blind to crops and flips, so scores are known in closed form."""

    def __init__(self, classes: int = 4):
        super().__init__()
        torch.manual_seed(3)
        self.head = nn.Linear(3, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x.mean(dim=(2, 3)))


def _attack(**overrides) -> InversionAttack:
    config = make_config("quick", **{"samples": 40, "candidates": 6, "iterations": 10, "keep": 3, "final_augmentations": 4, "batch_size": 7, **overrides})
    return InversionAttack(flat_colour_prior(), ChannelMeanClassifier(), HALF, config, CPU)


def test_initial_selection_keeps_the_top_c_pool_images_of_each_class():
    attack = _attack()
    latents, scores = attack.initial_selection([1, 3])
    pool = torch.randn(40, 3, generator=torch.Generator().manual_seed(0))  # the seed's pool
    with torch.no_grad():
        expected = attack.target.head(torch.tanh(pool)).softmax(dim=1)
    for row, c in enumerate([1, 3]):
        top = expected[:, c].topk(6)
        assert torch.allclose(scores[row], top.values, atol=1e-6)
        assert torch.allclose(latents[row * 6 : (row + 1) * 6], pool[top.indices])


def test_a_saturated_softmax_is_ranked_by_the_logit_margin_not_by_pool_order():
    """Logits x1e3 make the confidence of every image in the class exactly 1.0; the margin still orders them."""
    hot = InversionAttack(flat_colour_prior(), Scaled(ChannelMeanClassifier(), 1e3), HALF, _attack().config, CPU)
    latents, scores = hot.initial_selection([1, 3])
    pool = torch.randn(40, 3, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = hot.target.model.head(torch.tanh(pool))
    for row, c in enumerate([1, 3]):
        assert (scores[row] == 1.0).sum() >= 2  # ties that pool order would have decided
        others = torch.cat([logits[:, :c], logits[:, c + 1 :]], dim=1).amax(dim=1)
        top = (logits[:, c] - others).topk(6).indices  # z_c - max_{j != c} z_j
        assert torch.equal(latents[row * 6 : (row + 1) * 6], pool[top])
    assert select_top(torch.tensor([1.0, 1.0, 0.5, 1.0]), 1, 2, tiebreak=torch.tensor([3.0, 7.0, 9.0, 5.0]))[0].tolist() == [1, 3]


class Scaled(nn.Module):
    def __init__(self, model: nn.Module, t: float):
        super().__init__()
        self.model, self.t = model, t

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x) * self.t


def test_optimisation_raises_target_confidence_and_final_selection_sorts_it():
    result = _attack().run([0, 2])
    assert result.images.shape == (2, 3, 3, 8, 8) and result.images.dtype == torch.uint8
    assert (result.final_scores[:, :-1] >= result.final_scores[:, 1:]).all()  # best first
    assert ((result.final_top1 >= 0) & (result.final_top1 <= 1)).all() and result.final_top1.shape == (2, 3)
    assert len(result.loss_curve) == 10 and result.loss_curve[-1] < result.loss_curve[0]
    # against the same run at lr 0 (same pool, keys and crops): selection alone cannot pass this
    frozen = _attack(lr=0.0).run([0, 2])
    assert (result.final_scores.mean(1) > frozen.final_scores.mean(1)).all()


def test_select_top_is_per_class_stable_and_flat_indexed():
    scores = torch.tensor([0.1, 0.9, 0.5, 0.9, 0.3, 0.2, 0.8, 0.7])  # 2 classes x 4 candidates
    flat, kept = select_top(scores, 2, 2)
    assert flat.tolist() == [1, 3, 6, 7]  # tie 0.9/0.9 keeps pool order
    assert kept.tolist() == [[pytest.approx(0.9), pytest.approx(0.9)], [pytest.approx(0.8), pytest.approx(0.7)]]


def test_chunks_cover_everything_in_near_equal_slices():
    parts = list(chunks(10, 4))
    assert [p.stop - p.start for p in parts] == [4, 3, 3]
    assert parts[0].start == 0 and parts[-1].stop == 10


def test_reconstructions_do_not_depend_on_which_classes_share_the_batch():
    """What lets a sharded run (a subset of classes per rank) reproduce the single-process run."""
    torch.manual_seed(0)
    prior = GeneratorPrior(DCGANGenerator(16, 32, 1, 8), 16, {"source": "test"})
    target = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))
    pre = Preprocessing((3, 24, 24), (0.5,) * 3, (0.25,) * 3)
    config = make_config("quick", samples=30, candidates=4, iterations=3, keep=2, final_augmentations=3, batch_size=16)
    everything = InversionAttack(prior, target, pre, config, CPU).run([0, 1, 2, 3, 4])
    shard = InversionAttack(prior, target, pre, config, CPU).run([1, 4])
    assert torch.equal(shard.images, everything.images[[1, 4]])
    assert torch.equal(shard.final_scores, everything.final_scores[[1, 4]])


def test_logit_loss_with_a_surrogate_does_not_depend_on_which_classes_share_the_batch():
    """Class prototypes come from each class's own candidates, so sharding still reproduces the run."""
    torch.manual_seed(0)
    prior = GeneratorPrior(DCGANGenerator(16, 32, 1, 8), 16, {"source": "test"})

    def net(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))

    pre = Preprocessing((3, 24, 24), (0.5,) * 3, (0.25,) * 3)
    surrogate_pre = Preprocessing((3, 16, 16), (0.5,) * 3, (0.5,) * 3)
    config = make_config("quick", samples=30, candidates=4, iterations=3, keep=2, final_augmentations=3, batch_size=10, loss="logit")
    everything = InversionAttack(prior, net(0), pre, config, CPU, surrogates=[(net(1), surrogate_pre)]).run([0, 1, 2, 3, 4])
    shard = InversionAttack(prior, net(0), pre, config, CPU, surrogates=[(net(1), surrogate_pre)]).run([1, 4])
    assert torch.equal(shard.images, everything.images[[1, 4]])
    assert torch.equal(shard.final_scores, everything.final_scores[[1, 4]])


def test_hashed_uniforms_are_deterministic_uniform_and_independent():
    keys = candidate_keys(7, torch.arange(50).repeat_interleave(40), torch.arange(40).repeat(50))
    u = uniforms(keys, 3, 5)
    assert u.shape == (2000, 5) and (u >= 0).all() and (u < 1).all()
    assert torch.equal(u, uniforms(keys, 3, 5))
    assert abs(float(u.mean()) - 0.5) < 0.02 and abs(float(u.var()) - 1 / 12) < 0.01
    assert float((u - uniforms(keys, 4, 5)).abs().mean()) > 0.2  # another step, other crops
    assert abs(float(torch.corrcoef(torch.stack([u[:, 0], u[:, 1]]))[0, 1])) < 0.1
    other_seed = candidate_keys(8, torch.arange(50).repeat_interleave(40), torch.arange(40).repeat(50))
    assert (keys != other_seed).float().mean() > 0.99


def test_crops_cover_the_requested_area_and_stay_inside_the_image():
    u = torch.rand(500, 5, generator=torch.Generator().manual_seed(1))
    theta = crop_thetas(u, (0.5, 0.9), (0.8, 1.2), flip_p=0.5)
    w, h = theta[:, 0, 0].abs(), theta[:, 1, 1]
    area = w * h
    assert (area <= 0.9 + 1e-6).all() and (area >= 0.5 * 0.8 - 1e-6).all()  # clamping may shrink a side
    assert ((theta[:, 0, 2].abs() + w) <= 1 + 1e-6).all() and ((theta[:, 1, 2].abs() + h) <= 1 + 1e-6).all()
    flipped = float((theta[:, 0, 0] < 0).float().mean())
    assert 0.4 < flipped < 0.6


def test_identity_warp_is_exact_and_flip_mirrors():
    images = torch.rand(2, 3, 8, 8)
    assert torch.allclose(warp(images, identity_thetas(2, "cpu"), (8, 8)), images, atol=1e-6)
    assert torch.allclose(warp(images, identity_thetas(2, "cpu", flip=True), (8, 8)), images.flip(-1), atol=1e-6)


def test_model_input_normalises_with_the_models_own_statistics_and_channels():
    pre = Preprocessing((3, 4, 4), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    grey = torch.full((1, 1, 4, 4), 0.2)  # [-1, 1] -> 0.6 in [0, 1]
    x = ModelInput(pre)(grey)
    expected = (0.6 - torch.tensor(pre.mean)) / torch.tensor(pre.std)
    assert x.shape == (1, 3, 4, 4)
    assert torch.allclose(x[0, :, 0, 0], expected, atol=1e-6)
    with pytest.raises(BadInputError, match="channels"):
        ModelInput(Preprocessing((2, 4, 4), (0.5, 0.5), (0.5, 0.5)))(grey.expand(-1, 3, -1, -1))


def test_class_lists_and_config_errors():
    assert parse_classes("0-3,7, 5", 10) == [0, 1, 2, 3, 5, 7]
    assert parse_classes(None, 3) == [0, 1, 2]
    with pytest.raises(BadInputError, match="unknown class ids"):
        parse_classes("0-9,17", 10)
    with pytest.raises(UsageError):
        parse_classes("3-1", 10)
    with pytest.raises(UsageError):
        parse_classes("a", 10)
    with pytest.raises(UsageError, match="cannot exceed"):
        make_config("quick", samples=10, candidates=20)
    with pytest.raises(UsageError, match="`preset`"):
        make_config("huge")
    assert make_config("paper").candidates == 200


def test_memory_errors_become_one_sentence_about_batch_size():
    hint = out_of_memory_hint(torch.OutOfMemoryError("CUDA out of memory"), 256)
    assert isinstance(hint, UsageError) and "`batch_size` 256" in str(hint) and "128" in str(hint)
    assert out_of_memory_hint(RuntimeError("DefaultCPUAllocator: can't allocate memory"), 8) is not None
    assert out_of_memory_hint(ValueError("other"), 8) is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_step_loop_never_synchronises_with_the_host():
    from mishield.runtime import make_runtime

    runtime = make_runtime("cuda")
    prior = GeneratorPrior(DCGANGenerator(16, 32, 3, 8), 16, {"source": "test"})
    target = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))
    config = make_config("quick", samples=32, candidates=4, iterations=3, keep=2, final_augmentations=2, batch_size=20)
    attack = InversionAttack(prior, target, Preprocessing((3, 32, 32), (0.5,) * 3, (0.5,) * 3), config, runtime)
    latents, _ = attack.initial_selection([0, 1, 2, 3, 4])
    labels = torch.arange(5, device="cuda").repeat_interleave(4)
    keys = candidate_keys(0, labels, torch.arange(4, device="cuda").repeat(5))
    attack.step.run(latents, labels, keys, 1)  # warm-up: lazy init may sync once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        attack.step.run(latents, labels, keys, 3)
    finally:
        torch.cuda.set_sync_debug_mode("default")
