"""Distribution metrics and the KNN judge (mishield/audit/fidelity.py), pinned to their definitions.

FID against closed forms on point sets built to have exactly the wanted sample mean and
covariance; precision / recall / density / coverage against values worked out by hand in the
comments and against a brute-force loop written straight from Naeem et al.'s definitions; the
KNN judge on constructed clusters and on real Fashion-MNIST images; the false-positive share and
its class-bootstrap interval against hand counts and the Wilson floor.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mishield.audit.fidelity import (
    _trace_sqrt_feature_space,
    _trace_sqrt_sample_space,
    fidelity_summary,
    frechet_distance,
    frechet_distance_extrapolated,
    judge_agreement,
    knn_judge_hits,
    nearest_private,
    precision_recall_density_coverage,
    rejected_share,
)
from mishield.audit.stats import wilson_interval
from mishield.errors import BadInputError, UsageError

prdc = precision_recall_density_coverage


def exact_moments(n: int, mean, cov, seed: int = 0) -> np.ndarray:
    """n points whose sample mean is exactly `mean` and unbiased sample covariance exactly `cov`."""
    mean, cov = np.asarray(mean, dtype=np.float64), np.asarray(cov, dtype=np.float64)
    z = np.random.default_rng(seed).standard_normal((n, mean.shape[0]))
    z -= z.mean(axis=0)
    white = z @ np.linalg.inv(np.linalg.cholesky(z.T @ z / (n - 1)).T)  # sample covariance I
    return white @ np.linalg.cholesky(cov).T + mean


def gaussian(n: int, d: int, seed: int, scale=1.0, shift=0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, dtype=torch.float64, generator=g) * scale + shift


# ----------------------------------------------------------------------------- FID


def test_fid_matches_the_closed_form_for_diagonal_gaussians():
    m1, m2 = np.array([0.0, 1.0, -2.0, 0.5]), np.array([1.0, 1.0, 0.0, 0.0])
    s1, s2 = np.array([1.0, 2.0, 0.5, 1.5]), np.array([2.0, 1.0, 0.5, 0.1])
    a, b = exact_moments(40, m1, np.diag(s1**2), 1), exact_moments(30, m2, np.diag(s2**2), 2)
    # For commuting covariances tr sqrt(S1 S2) = sum s1 s2, so FID = |m1-m2|^2 + sum (s1-s2)^2.
    expected = ((m1 - m2) ** 2).sum() + ((s1 - s2) ** 2).sum()  # 5.25 + 1 + 1 + 0 + 1.96
    assert expected == pytest.approx(9.21)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-10)


def test_fid_matches_the_closed_form_for_non_commuting_2d_covariances():
    c1 = np.array([[2.0, 0.8], [0.8, 1.0]])
    c2 = np.array([[1.0, -0.3], [-0.3, 0.5]])
    a, b = exact_moments(25, [0.0, 0.0], c1, 3), exact_moments(35, [1.0, -1.0], c2, 4)
    # For 2x2 matrices with positive eigenvalues, tr sqrt(M) = sqrt(tr M + 2 sqrt(det M)).
    m = c1 @ c2
    tr_sqrt = math.sqrt(np.trace(m) + 2 * math.sqrt(np.linalg.det(c1) * np.linalg.det(c2)))
    expected = 2.0 + np.trace(c1) + np.trace(c2) - 2 * tr_sqrt
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-10)
    assert frechet_distance(b, a) == pytest.approx(expected, rel=1e-10)


def test_fid_is_zero_on_itself_symmetric_and_a_translation_costs_its_squared_length():
    a, b = gaussian(60, 8, 0), gaussian(50, 8, 1, scale=2.0)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-10)
    t = torch.tensor([3.0, -1.0, 0.0, 0.0, 2.0, 0.0, 0.0, 0.5], dtype=torch.float64)
    assert frechet_distance(a, a + t) == pytest.approx(float((t**2).sum()), rel=1e-10)  # 14.25


@pytest.mark.parametrize(("n", "rel"), [(5, 1e-6), (16, 1e-7), (40, 1e-9)])  # rank 4, 15 (both deficient), full
def test_both_routes_to_the_trace_term_agree_whatever_the_rank(n, rel):
    xa, xb = gaussian(n, 16, 5), gaussian(n + 3, 16, 6, scale=0.7)
    xa, xb = xa - xa.mean(0), xb - xb.mean(0)
    # With rank-deficient covariances the feature-space route takes square roots of rounding
    # noise on the null eigenvalues (sqrt(1e-16) = 1e-8 each): why FID uses the sample space there.
    assert _trace_sqrt_sample_space(xa, xb) == pytest.approx(_trace_sqrt_feature_space(xa, xb), rel=rel)


def test_fid_with_fewer_samples_than_dims_is_defined_and_biased_upwards():
    a, b = gaussian(10, 64, 7), gaussian(12, 64, 8)  # the same distribution: the true FID is 0
    small = frechet_distance(a, b)
    assert math.isfinite(small) and small > 0
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    large = frechet_distance(gaussian(1000, 64, 9), gaussian(1200, 64, 10))
    assert large < small / 5  # the bias shrinks roughly like 1/n


def test_extrapolated_fid_removes_most_of_the_small_sample_bias():
    d = 64
    s1, s2 = torch.linspace(0.5, 2, d, dtype=torch.float64), torch.linspace(2, 0.5, d, dtype=torch.float64)
    shift = torch.zeros(d, dtype=torch.float64)
    shift[0] = 1.0
    true = float(1 + ((s1 - s2) ** 2).sum())
    plain, extrapolated = [], []
    for seed in range(3):
        a, b = gaussian(500, d, 2 * seed, s1), gaussian(400, d, 2 * seed + 1, s2, shift)
        plain.append(abs(frechet_distance(a, b) - true))
        extrapolated.append(abs(frechet_distance_extrapolated(a, b, seed=seed) - true))
    # measured: plain about +6 (true 50.5), extrapolated within about 1
    assert np.mean(plain) > 3
    assert np.mean(extrapolated) < 0.35 * np.mean(plain)
    a, b = gaussian(500, d, 0, s1), gaussian(400, d, 1, s2, shift)
    assert frechet_distance_extrapolated(a, b, seed=3) == frechet_distance_extrapolated(a, b, seed=3)


def test_fid_refuses_what_it_cannot_compute():
    with pytest.raises(UsageError, match="at least 2"):
        frechet_distance(np.zeros((1, 3)), np.zeros((5, 3)))
    with pytest.raises(UsageError, match="same feature extractor"):
        frechet_distance(np.zeros((4, 3)), np.zeros((5, 2)))
    with pytest.raises(UsageError, match="images, dims"):
        frechet_distance(np.zeros(4), np.zeros((5, 2)))
    bad = np.zeros((4, 3))
    bad[1, 2] = np.nan
    with pytest.raises(BadInputError, match="NaN"):
        frechet_distance(bad, np.ones((4, 3)))
    with pytest.raises(UsageError, match="fractions"):
        frechet_distance_extrapolated(np.eye(5), np.eye(5), fractions=(1.0,))


# ----------------------------------------------------------------------------- precision, recall, density, coverage

# k = 2, one dimension. Real radii (2nd nearest other real point): 0->2, 1->1, 2->2, 10->2,
# 11->1, 12->2. Fake radii: -30->31.5, 0.5->3.5, 1.5->2.5, 4->2.5, 4.5->3, 8->4.
REAL = [[0.0], [1.0], [2.0], [10.0], [11.0], [12.0]]
FAKE = [[-30.0], [0.5], [1.5], [4.0], [4.5], [8.0]]


def test_prdc_on_a_hand_built_set():
    got = prdc(REAL, FAKE, k=2)
    # precision: 0.5 and 1.5 lie in real balls; 4 sits exactly on the ball of 2 and 8 exactly on
    # the ball of 10, both outside because balls are open -> 2/6.
    assert got["precision"] == pytest.approx(1 / 3)
    # recall: 0, 1, 2 lie in the ball of 0.5; 10 and 11 in the ball of 8 (radius 4); 12 is on it -> 5/6.
    assert got["recall"] == pytest.approx(5 / 6)
    # density: 0.5 lies in the balls of 0, 1, 2 and 1.5 in the same three; no other fake in any -> 6 / (2 * 6).
    assert got["density"] == pytest.approx(0.5)
    # coverage: the balls of 0, 1, 2 hold a fake; 10's ball has 8 on its edge; 11 and 12 hold none -> 3/6.
    assert got["coverage"] == pytest.approx(0.5)


def test_swapping_real_and_fake_swaps_precision_and_recall_and_changes_the_rest():
    got, swapped = prdc(REAL, FAKE, k=2), prdc(FAKE, REAL, k=2)
    assert swapped["precision"] == pytest.approx(got["recall"])
    assert swapped["recall"] == pytest.approx(got["precision"])
    assert swapped["density"] != pytest.approx(got["density"])
    assert swapped["coverage"] != pytest.approx(got["coverage"])


def test_precision_rises_by_one_sample_when_an_outlier_moves_into_a_real_ball():
    moved = [[0.2]] + FAKE[1:]  # -30 -> 0.2, inside the balls of 0, 1 and 2
    assert prdc(REAL, moved, k=2)["precision"] == pytest.approx(1 / 3 + 1 / 6)


def test_density_counts_balls_and_is_not_capped_like_precision():
    # Eight real points evenly on the unit circle: with k = 3 each radius is the chord to the
    # third neighbour (90 degrees away), sqrt(2) > 1, so every real ball holds the centre.
    angles = np.arange(8) * np.pi / 4
    real = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    got = prdc(real, np.zeros((4, 2)), k=3)  # four fakes, all on the centre
    assert got["precision"] == 1.0
    assert got["density"] == pytest.approx(8 * 4 / (3 * 4))  # each fake in all 8 balls: 8/3, not capped at 1
    assert got["coverage"] == 1.0
    assert got["recall"] == 0.0  # the fakes' own radius is 0: an open ball of radius 0 is empty


def test_coverage_exposes_mode_collapse_that_precision_misses():
    real = gaussian(200, 2, 1)
    collapsed = real[:1].repeat(20, 1) + 1e-3  # 20 near copies of one real sample
    got = prdc(real, collapsed, k=5)
    assert got["precision"] == 1.0
    assert got["coverage"] < 0.1  # only the few balls around that sample hold a fake
    spread = prdc(real, gaussian(200, 2, 2), k=5)
    assert spread["coverage"] > 0.8


def test_identical_sets_score_one_and_far_sets_score_zero():
    a = gaussian(200, 16, 3)
    same = prdc(a, a.clone(), k=5)
    assert (same["precision"], same["recall"], same["coverage"]) == (1.0, 1.0, 1.0)
    assert same["density"] == pytest.approx(1.0, abs=0.02)  # each open ball holds its centre and k-1 others
    far = prdc(a, gaussian(150, 16, 4, shift=1000.0), k=5)
    assert far == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}


def brute_force_prdc(real: np.ndarray, fake: np.ndarray, k: int) -> dict:
    """Naeem et al.'s definitions, one loop per sum, with open balls."""

    def radius(points, i):
        d = sorted(float(np.linalg.norm(points[i] - points[j])) for j in range(len(points)) if j != i)
        return d[k - 1]

    rr = [radius(real, i) for i in range(len(real))]
    fr = [radius(fake, j) for j in range(len(fake))]
    dist = lambda x, y: float(np.linalg.norm(x - y))
    inside = [[dist(fake[j], real[i]) < rr[i] for i in range(len(real))] for j in range(len(fake))]
    return {
        "precision": np.mean([any(row) for row in inside]),
        "recall": np.mean([any(dist(real[i], fake[j]) < fr[j] for j in range(len(fake))) for i in range(len(real))]),
        "density": sum(map(sum, inside)) / (k * len(fake)),
        "coverage": np.mean([min(dist(real[i], f) for f in fake) < rr[i] for i in range(len(real))]),
    }


@pytest.mark.parametrize("k", [1, 3, 5])
def test_prdc_agrees_with_a_brute_force_loop_and_does_not_depend_on_the_block_size(k):
    rng = np.random.default_rng(k)
    real, fake = rng.standard_normal((40, 3)), rng.standard_normal((35, 3)) * 1.3 + 0.4
    expected = brute_force_prdc(real, fake, k)
    for chunk in (1, 7, 1024):
        got = prdc(real, fake, k=k, chunk=chunk)
        assert got == pytest.approx(expected)


def test_prdc_refuses_k_without_enough_neighbours():
    with pytest.raises(UsageError, match="more than k samples"):
        prdc(np.eye(5), np.eye(8)[:, :5], k=5)  # 5 real: no 5th neighbour besides the point itself
    with pytest.raises(UsageError, match="more than k samples"):
        prdc(np.eye(8)[:, :5], np.eye(5), k=5)
    with pytest.raises(UsageError, match="at least 1"):
        prdc(np.eye(8), np.eye(8), k=0)


# ----------------------------------------------------------------------------- the KNN judge


def clusters(per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Four well-separated classes in 8 dims: class c around 10 * e_c."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(4).repeat_interleave(per_class)
    centres = 10.0 * torch.eye(8, dtype=torch.float64)[:4]
    return centres[labels] + 0.5 * torch.randn(len(labels), 8, dtype=torch.float64, generator=g), labels


def test_knn_judge_counts_a_reconstruction_only_when_its_nearest_private_image_is_of_its_class():
    private, private_labels = clusters(30, 0)
    near, near_labels = clusters(5, 1)  # 5 per class near their own class: hits
    other, other_labels = clusters(3, 2)  # 3 per class near class c, but labelled c + 1: misses
    recon = torch.cat([near, other])
    labels = torch.cat([near_labels, (other_labels + 1) % 4])
    hits = knn_judge_hits(recon, labels, private, private_labels)
    assert hits.dtype == torch.bool
    assert hits.tolist() == [True] * 20 + [False] * 12
    # batched on both sides, the same verdicts
    assert knn_judge_hits(recon, labels, private, private_labels, chunk=7).tolist() == hits.tolist()


def test_nearest_private_matches_a_full_distance_matrix_at_any_block_size():
    x, p = gaussian(33, 5, 0), gaussian(50, 5, 1)
    full = torch.cdist(x, p).pow(2)
    for chunk in (1, 8, 1024):
        d, i = nearest_private(x, p, chunk=chunk)
        assert torch.allclose(d, full.min(dim=1).values, rtol=1e-10)
        assert i.tolist() == full.argmin(dim=1).tolist()


def test_knn_judge_on_real_fashion_mnist_images():
    from mishield.data import load_embedded_fashion_mnist

    fm = load_embedded_fashion_mnist()

    def pixels(images):  # 14 x 14 average-pooled pixels: a feature space no target produced
        x = torch.as_tensor(images, dtype=torch.float64)[:, None] / 255.0
        return torch.nn.functional.avg_pool2d(x, 2).flatten(1)

    train, train_labels = pixels(fm.train_images), torch.as_tensor(fm.train_labels).long()
    test, test_labels = pixels(fm.test_images[::4]), torch.as_tensor(fm.test_labels[::4]).long()
    true = knn_judge_hits(test, test_labels, train, train_labels).double().mean()
    wrong = knn_judge_hits(test, (test_labels + 1) % 10, train, train_labels).double().mean()
    assert true > 0.7  # 1-NN on pixels; chance is 0.1
    assert wrong < 0.1


def test_knn_judge_refuses_inconsistent_inputs():
    private, labels = clusters(3, 0)
    with pytest.raises(UsageError, match="one label per feature row"):
        knn_judge_hits(private, labels[:-1], private, labels)
    with pytest.raises(UsageError, match="empty"):
        knn_judge_hits(private, labels, torch.empty(0, 8), torch.empty(0))
    with pytest.raises(UsageError, match="dims"):
        knn_judge_hits(private[:, :4], labels, private, labels)


# ----------------------------------------------------------------------------- evaluator vs KNN judge

EVAL = [[1, 1, 1, 1, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]]
KNN = [[1, 1, 0, 0, 0], [1, 0, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]]


def test_agreement_figures_on_hand_counts():
    got = judge_agreement(EVAL, KNN)
    # evaluator hits 4 + 2 + 5 + 0 = 11, of which the KNN judge rejects 2 (class 0) + 1 (class 1)
    assert got.counts == {"images": 20, "evaluator_hits": 11, "knn_hits": 10, "both": 8, "rejected": 3, "rescued": 2}
    assert got.rejected_share.estimate == pytest.approx(3 / 11)
    assert got.disagreement.estimate == pytest.approx(5 / 20)  # 3 rejected + 2 rescued
    assert got.evaluator_acc1.estimate == pytest.approx(0.55)
    assert got.knn_judge_acc1.estimate == pytest.approx(0.50)
    assert got.evaluator_minus_knn.estimate == pytest.approx(0.05)  # evaluator minus judge, not the reverse
    for iv in (got.rejected_share, got.disagreement, got.knn_judge_acc1, got.evaluator_minus_knn):
        assert iv.low <= iv.estimate <= iv.high
    d = got.to_dict()
    assert d["rejected_share"]["estimate"] == pytest.approx(3 / 11) and d["note"] is None


def test_rejected_share_resamples_numerator_and_denominator_by_the_same_classes():
    # Five classes with 2 ... 32 evaluator hits, exactly half of each rejected: every resample of
    # whole classes has a ratio of exactly 0.5, so the interval is the Wilson floor over the 62
    # hits. Drawing the classes of numerator and denominator apart would spread it far wider.
    hits = [2, 4, 8, 16, 32]
    e = np.zeros((5, 40))
    kn = np.zeros((5, 40))
    for c, h in enumerate(hits):
        e[c, :h] = 1
        kn[c, : h // 2] = 1
    got = rejected_share(e, kn)
    lo, hi = wilson_interval(31, 62, 1.959963984540054)
    assert got.estimate == 0.5
    assert (got.low, got.high) == pytest.approx((lo, hi))
    assert got.images == 62 and got.classes == 5


def test_rejected_share_widens_with_classes_that_disagree():
    # Same counts (10 of 20 hits rejected), but all rejections in two classes: the class is the unit.
    e = np.ones((4, 5))
    spread = np.array([[1, 0, 1, 0, 1], [0, 1, 0, 1, 0], [1, 0, 1, 0, 1], [0, 1, 0, 1, 0]])
    lumped = np.array([[0] * 5, [0] * 5, [1] * 5, [1] * 5])
    a, b = rejected_share(e, spread), rejected_share(e, lumped)
    assert a.estimate == b.estimate == 0.5
    assert b.high - b.low > (a.high - a.low) + 0.2


def test_rejected_share_edge_cases():
    assert rejected_share(np.zeros((3, 4)), np.ones((3, 4))) is None
    assert judge_agreement(np.zeros((3, 4)), np.ones((3, 4))).note.startswith("the evaluator counted no hit")
    one = rejected_share([[1, 1, 0]], [[1, 0, 0]])
    assert one.degenerate and (one.low, one.high) == (0.0, 1.0)
    sparse = np.zeros((10, 4))
    sparse[0] = 1  # only one class has evaluator hits: some resamples draw none of it
    assert "left out" in rejected_share(sparse, np.zeros((10, 4))).note
    with pytest.raises(UsageError, match="same reconstructions"):
        judge_agreement(np.ones((3, 4)), np.ones((3, 5)))
    with pytest.raises(UsageError, match="0/1"):
        judge_agreement(np.full((3, 4), 0.5), np.ones((3, 4)))
    with pytest.raises(UsageError, match="resamples"):
        judge_agreement(np.ones((3, 4)), np.ones((3, 4)), resamples=10)


# ----------------------------------------------------------------------------- the per-class summary


def test_summary_per_class_pooled_and_skipped_figures():
    d = 8
    recon = {0: gaussian(20, d, 0), 1: gaussian(4, d, 1, shift=3.0), 2: gaussian(20, d, 2), 3: gaussian(6, d, 3)}
    private = {0: gaussian(15, d, 10), 1: gaussian(15, d, 11, shift=3.0), 3: gaussian(1, d, 13), 7: gaussian(9, d, 17)}
    got = fidelity_summary(recon, private, k=5, extractor="public-cnn", extrapolate=True)
    assert got["extractor"] == "public-cnn" and got["k"] == 5 and got["dims"] == d
    rows = {r["class"]: r for r in got["per_class"]}
    assert [r["class"] for r in got["per_class"]] == [0, 1, 2, 3]
    # class 0: every figure, equal to the direct calls
    direct = prdc(private[0], recon[0], k=5)
    assert {m: rows[0][m] for m in direct} == pytest.approx(direct)
    assert rows[0]["fid"] == pytest.approx(frechet_distance(recon[0], private[0]))
    assert rows[0]["fid_rank_deficient"] is False and rows[0]["skipped"] == {}
    # class 1: 4 reconstructions <= k: no recall, the rest measured
    assert rows[1]["recall"] is None and "recall" in rows[1]["skipped"] and rows[1]["precision"] is not None
    assert rows[1]["fid_rank_deficient"] is True  # 4 samples in 8 dims
    # class 2: no private images at all
    assert all(rows[2][m] is None for m in ("fid", "precision", "recall", "density", "coverage"))
    assert rows[2]["skipped"]["fid"] == "no private images of this class"
    # class 3: one private image: no covariance, no radii
    assert rows[3]["fid"] is None and "covariance" in rows[3]["skipped"]["fid"]
    assert rows[3]["precision"] is None and "k = 5" in rows[3]["skipped"]["precision"]
    # pooled: every reconstruction against the private images of the reconstructed classes (not class 7)
    all_recon = torch.cat(list(recon.values()))
    all_private = torch.cat([private[0], private[1], private[3]])
    assert got["pooled"]["fid"] == pytest.approx(frechet_distance(all_recon, all_private))
    assert got["pooled"]["private"] == 31 and got["pooled"]["reconstructions"] == 50
    assert got["pooled"]["fid_extrapolated"] == pytest.approx(frechet_distance_extrapolated(all_recon, all_private))
    # class means over the measured classes only
    assert got["class_mean"]["fid"] == pytest.approx((rows[0]["fid"] + rows[1]["fid"]) / 2)
    assert got["class_mean"]["recall_classes"] == 1
    assert got["seconds"]["wall"] > 0 and got["seconds"]["cpu"] >= 0


def test_summary_skips_the_extrapolation_below_its_regime_and_refuses_mixed_extractors():
    small = fidelity_summary({0: gaussian(10, 16, 0)}, {0: gaussian(12, 16, 1)})
    assert small["pooled"]["fid_extrapolated"] is None and "dims" in small["pooled"]["skipped"]["fid_extrapolated"]
    with pytest.raises(UsageError, match="one extractor"):
        fidelity_summary({0: gaussian(10, 16, 0)}, {0: gaussian(12, 8, 1)})
