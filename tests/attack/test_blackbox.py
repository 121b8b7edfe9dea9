"""The gradient-free attack (mishield/attack/blackbox.py) on a real trained target, and the masked wrappers it must see through.

The target is a small CNN trained for 30 steps on private Fashion-MNIST classes 0-4 of the
embedded subset; the prior is class-disjoint: the 16 principal components of the public classes
5-9 (a linear generator, clamped to [-1, 1]), so prior samples look like garments without being
any private class. Every comparison follows *the same latents* (same candidate ids) before and
after the search, so selection alone cannot make a test pass.
"""

from __future__ import annotations

import copy

import pytest
import torch
from masking import (
    FMNIST_PRE,
    PCA_DIM,
    GeneratedInputDetector,
    PCAPrior,
    Temperature,
    fmnist_images,
    fmnist_target,
    masked_wrappers,
    natural_looking,
    pca_prior,
)
from torch import nn

from mishield.attack.augment import (
    candidate_keys,
    crop_thetas,
    uniforms,
    warp,
)
from mishield.attack.blackbox import (
    BlackBoxAttack,
    BlackBoxConfig,
    BlackBoxResult,
    centred_ranks,
    gaussian,
)
from mishield.attack.config import make_config
from mishield.attack.engine import FINAL_COUNTER_BASE, InversionAttack
from mishield.data import load_embedded_fashion_mnist
from mishield.errors import UsageError
from mishield.runtime import Runtime

CPU = Runtime(torch.device("cpu"))
PRE = FMNIST_PRE
CLASSES = [0, 2, 4]
PER_CLASS = 6


def _config(**overrides):
    values = {"samples": 64, "candidates": PER_CLASS, "keep": 3, "final_augmentations": 4, "batch_size": 24, "milestones": (), **overrides}
    return make_config("ci", **values)


def _attack(model: nn.Module | None = None, **blackbox) -> BlackBoxAttack:
    settings = {"generations": 20, "population": 16, **blackbox}
    return BlackBoxAttack(pca_prior(), copy.deepcopy(model or fmnist_target()), PRE, _config(), CPU, BlackBoxConfig(**settings))


def _candidates(attack: InversionAttack):
    latents, _ = attack.initial_selection(CLASSES)
    labels = torch.tensor(CLASSES).repeat_interleave(PER_CLASS)
    keys = candidate_keys(attack.config.seed, labels, torch.arange(PER_CLASS).repeat(len(CLASSES)))
    return latents, labels, keys


def _constrained(latents: torch.Tensor) -> torch.Tensor:
    """`latents` where the prior keeps them (|z_i| <= 3): what any step of either attack starts from."""
    out = latents.clone()
    pca_prior().constrain_(out)
    return out


@torch.no_grad()
def _confidence(latents: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The unwrapped target's softmax of the attacked class on the uncropped image."""
    x = pca_prior().generate(latents)  # PRE maps prior images to themselves
    return fmnist_target()(x).softmax(1)[torch.arange(len(labels)), labels]


@torch.no_grad()
def _label_hits(latents: torch.Tensor, labels: torch.Tensor, keys: torch.Tensor, crops: int = 16) -> torch.Tensor:
    """Fraction of `crops` final-selection-style crops (counters the search never uses) the target labels as the class."""
    images, hits = pca_prior().generate(latents), torch.zeros(len(labels))
    for a in range(crops):
        theta = crop_thetas(uniforms(keys, FINAL_COUNTER_BASE + 100 + a, 5), (0.5, 0.9), (0.8, 1.2), 0.5)
        hits += (fmnist_target()(warp(images, theta, (28, 28))).argmax(1) == labels).float()
    return hits / crops


def test_search_raises_the_targets_confidence_of_the_same_latents_and_not_at_lr_0():
    attack = _attack()
    before, labels, keys = _candidates(attack)
    after = attack.search.run(before, labels, keys)
    conf_before, conf_after = _confidence(before, labels), _confidence(after, labels)
    assert (conf_after > conf_before).float().mean() >= 0.9, (conf_before, conf_after)
    assert conf_after.mean() > conf_before.mean() + 0.15  # measured 0.61 -> 0.93
    assert torch.equal(attack.search.sigma, torch.full_like(attack.search.sigma, attack.blackbox.sigma))  # scores: fixed radius
    frozen = _attack(lr=0.0)
    assert torch.equal(frozen.search.run(before, labels, keys), _constrained(before))


def test_run_keeps_ppas_selection_and_its_baseline_and_records_its_queries():
    result = _attack().run(CLASSES)
    ppa = InversionAttack(pca_prior(), copy.deepcopy(fmnist_target()), PRE, _config(iterations=5), CPU).run(CLASSES)
    assert isinstance(result, BlackBoxResult)
    assert torch.equal(result.initial_scores, ppa.initial_scores)  # same pool, same candidates
    assert torch.equal(result.selection_only.images, ppa.selection_only.images)  # same baseline
    assert torch.equal(result.selection_only.final_scores, ppa.selection_only.final_scores)
    gain = result.final_scores.mean(1) - result.selection_only.final_scores.mean(1)
    assert (gain > 0.05).all() and gain.mean() > 0.15, gain  # measured +0.33, +0.08, +0.10 (final crops are harder)
    n = len(CLASSES) * PER_CLASS
    assert result.queries["per_candidate"] == 20 * 16 * 1
    assert result.image_steps == result.queries["optimisation"] == n * 20 * 16
    assert result.queries["total"] == 2 * 64 + n * 20 * 16 + 2 * n * 4
    assert result.blackbox["mode"] == "scores" and result.blackbox["queries_per_candidate"] == 320


@pytest.mark.parametrize("name", ["detach", "quantise"])
def test_works_through_zero_gradient_wrappers_where_ppas_step_does_not_move(name):
    wrapped = masked_wrappers(fmnist_target(), PRE, 5)[name]
    ppa = InversionAttack(pca_prior(), copy.deepcopy(wrapped), PRE, _config(iterations=10, lr=0.2), CPU)
    before, labels, keys = _candidates(ppa)
    assert torch.equal(ppa.step.run(before, labels, keys, 10), _constrained(before))  # zero gradient: Adam never moves
    attack = _attack(wrapped)
    wrapped_before, _, _ = _candidates(attack)
    assert torch.equal(wrapped_before, before)
    after = attack.search.run(before, labels, keys)
    assert _confidence(after, labels).mean() > _confidence(before, labels).mean() + 0.15


def test_a_bare_detach_leaves_ppa_where_it_started_and_not_the_search():
    wrapped = masked_wrappers(fmnist_target(), PRE, 5)["detach-hard"]
    ppa = InversionAttack(pca_prior(), copy.deepcopy(wrapped), PRE, _config(iterations=2, lr=0.2), CPU)
    before, labels, keys = _candidates(ppa)
    assert torch.equal(ppa.step.run(before, labels, keys, 2), _constrained(before))  # no graph: no step, no crash
    assert torch.equal(_attack(wrapped).search.run(before, labels, keys), _attack().search.run(before, labels, keys))


@pytest.mark.parametrize("t", [1e3, 1e-3])
def test_a_temperature_on_the_logits_does_not_change_the_search(t):
    """Rank-shaped log-probability margins scale with the temperature and keep their order."""
    plain, hot = _attack(), _attack(Temperature(fmnist_target(), t))
    before, labels, keys = _candidates(plain)
    same = torch.isclose(hot.search.run(before, labels, keys), plain.search.run(before, labels, keys), atol=1e-4).all(dim=1)
    assert same.float().mean() >= 0.9, same  # measured: all; a near-tie rounded the other way would fork a path


class LabelsOnly(nn.Module):
    """What a label-only API gives: a one-hot of the top-1 class, nothing of the scores."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.model(x)
        return nn.functional.one_hot(logits.argmax(1), logits.shape[1]).to(logits.dtype)


def test_label_mode_reads_labels_only_and_raises_the_label_fitness():
    attack = _attack(mode="labels", crops=2)
    before, labels, keys = _candidates(attack)
    short = {"mode": "labels", "crops": 2, "generations": 4}
    assert torch.equal(_attack(LabelsOnly(fmnist_target()), **short).search.run(before, labels, keys), _attack(**short).search.run(before, labels, keys))
    after = attack.search.run(before, labels, keys)
    hits_before, hits_after = _label_hits(before, labels, keys), _label_hits(after, labels, keys)
    assert hits_after.mean() > hits_before.mean() + 0.1, (hits_before, hits_after)  # measured 0.77 -> 0.95
    assert (hits_after >= hits_before).float().mean() >= 0.8  # measured: every candidate
    # BREP-MI's growing radius: candidates whose whole population stayed in the class search further out
    radii = attack.search.sigma
    assert (radii > attack.blackbox.sigma).any() and (radii <= attack.blackbox.sigma * attack.blackbox.label_max_growth + 1e-6).all()
    assert torch.equal(_attack(mode="labels", lr=0.0, generations=2).search.run(before, labels, keys), _constrained(before))


def test_the_search_is_deterministic_per_seed_and_does_not_depend_on_the_other_classes():
    attack = _attack(generations=5)
    first, second = attack.run(CLASSES), _attack(generations=5).run(CLASSES)
    assert torch.equal(first.images, second.images) and torch.equal(first.final_scores, second.final_scores)
    shard = _attack(generations=5).run([2])
    assert torch.equal(shard.images[0], first.images[1])
    # each candidate's own directions and crops, whichever candidates share its pass
    latents, labels, keys = _candidates(attack)
    rows = slice(0, PER_CLASS)
    alone = attack.search.run(latents[rows], labels[rows], keys[rows])
    assert torch.equal(alone, attack.search.run(latents, labels, keys)[rows])
    reseeded = BlackBoxAttack(pca_prior(), copy.deepcopy(fmnist_target()), PRE, _config(seed=1), CPU, BlackBoxConfig(generations=5)).run(CLASSES)
    assert not torch.equal(reseeded.images, first.images)


def test_masked_wrappers_predict_exactly_like_the_model_on_real_images():
    fm = load_embedded_fashion_mnist()
    x, y = fmnist_images(fm.test_images), torch.from_numpy(fm.test_labels)
    x = x[y < 5]
    with torch.no_grad():
        expected = fmnist_target()(x).argmax(1)
        for name, wrapped in masked_wrappers(fmnist_target(), PRE, 5).items():
            assert torch.equal(wrapped(x).argmax(1), expected), name


def test_the_detector_tells_prior_images_from_real_ones_and_answers_them_with_junk():
    detector = GeneratedInputDetector(fmnist_target(), PRE, 5)
    fm = load_embedded_fashion_mnist()
    real = fmnist_images(fm.test_images)
    generated = pca_prior().generate(pca_prior().sample(500, torch.Generator().manual_seed(0), torch.device("cpu")))
    assert natural_looking(real, detector.space).all()
    assert not natural_looking(generated, detector.space).any()
    with torch.no_grad():
        junk = detector(generated)
    assert (junk.softmax(1).amax(1) > 0.99).all()  # confident
    assert (junk.argmax(1) != fmnist_target()(generated).argmax(1)).float().mean() > 0.5  # and unrelated to the model


def test_rank_shaping_and_hashed_gaussians():
    u = centred_ranks(torch.tensor([[3.0, 1.0, 2.0, 2.0], [5.0, 5.0, 5.0, 5.0]]))
    assert u[0].tolist() == pytest.approx([0.5, -0.5, 0.0, 0.0])  # ties share the average rank
    assert u[1].tolist() == [0.0, 0.0, 0.0, 0.0]  # no information, no update
    assert torch.equal(centred_ranks(torch.tensor([[0.1, 9.0, -3.0]])), centred_ranks(torch.tensor([[1e3 * 0.1, 1e3 * 9.0, -3e3]])))
    keys = candidate_keys(0, torch.zeros(400, dtype=torch.long), torch.arange(400))
    g = gaussian(keys, 5, 250)
    assert g.shape == (400, 250) and torch.equal(g, gaussian(keys, 5, 250))
    assert abs(float(g.mean())) < 0.01 and abs(float(g.var()) - 1) < 0.02
    assert abs(float(torch.corrcoef(torch.stack([g[:, 0], g[:, 125]]))[0, 1])) < 0.15  # cos and sin halves independent


def test_config_errors_name_the_parameter():
    for bad, word in [({"mode": "probs"}, "`mode`"), ({"population": 5}, "`population`"), ({"sigma": 0.0}, "`sigma`"),
                      ({"lr": float("nan")}, "`lr`"), ({"crops": 0}, "`crops`"), ({"generations": -1}, "`generations`")]:  # fmt: skip
        with pytest.raises(UsageError, match=word):
            BlackBoxConfig(**bad).validate()
    # generations default to half the gradient attacks' I: one -I sizes every attack, and -I 0 is selection only
    assert BlackBoxConfig(mode="labels").resolve(make_config("default", iterations=100)).queries_per_candidate == 50 * 8 * 4
    assert BlackBoxConfig().resolve(make_config("ci", iterations=3)).generations == 2
    assert BlackBoxConfig().resolve(make_config("ci", iterations=0)).queries_per_candidate == 0
    assert BlackBoxConfig(generations=7).resolve(make_config("ci", iterations=100)).generations == 7
    with pytest.raises(ValueError, match="resolve"):
        _ = BlackBoxConfig().queries_per_candidate


def test_every_queried_latent_and_every_update_respects_the_priors_constraint():
    seen: list[float] = []

    class Recording(PCAPrior):
        def generate(self, latents: torch.Tensor) -> torch.Tensor:
            seen.append(float(latents.abs().max()))
            return super().generate(latents)

    prior = Recording()
    search = BlackBoxAttack(prior, copy.deepcopy(fmnist_target()), PRE, _config(), CPU, BlackBoxConfig(generations=3, sigma=2.0, lr=1.0)).search
    labels = torch.tensor(CLASSES)
    start = torch.full((3, PCA_DIM), 2.9)  # at the edge: a radius of 2 spreads far past |z| = 3
    after = search.run(start, labels, candidate_keys(0, labels, torch.zeros(3, dtype=torch.long)))
    assert seen and max(seen) <= prior.latent_clamp and after.abs().max() <= prior.latent_clamp
