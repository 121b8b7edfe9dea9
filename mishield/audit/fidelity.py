"""Judging reconstructions as a distribution, and by a judge that is not a classifier.

Attack accuracy asks one evaluation classifier about each reconstruction. Ho et al. (2025,
"Revisiting model inversion evaluation") measured that such an evaluator has many false
positives: reconstructions that carry adversarial features the evaluator shares with the target
rather than the private class's appearance. This module gives the figures the field reports
beside accuracy, all computed in a feature space that did NOT come from the target:

* `frechet_distance` (FID: Heusel et al., NeurIPS 2017) and its extrapolation to infinitely many
  samples, `frechet_distance_extrapolated` (Chong & Forsyth, CVPR 2020, "FID_inf");
* `precision_recall_density_coverage` (Naeem, Oh, Uh, Choi, Yoo, ICML 2020);
* `knn_judge_hits`: a reconstruction of class c counts when its nearest private training image,
  among ALL classes, is of class c;
* `judge_agreement`: how often the evaluator and the KNN judge disagree, and the share of the
  evaluator's hits the KNN judge rejects (the estimate of false positives), with class-bootstrap
  intervals (`mishield.audit.stats`: the attacked class is the unit);
* `fidelity_summary`: all distribution figures per class and pooled, with their cost.

Every distance is computed in float64 and in row blocks (`chunk`), so memory stays bounded at
chunk x (number of reference rows) whatever the sizes. docs/audit.md ("Distribution metrics and the
KNN judge") explains how to read the figures and why figures from different feature extractors do
not compare; `mishield.audit.feature_spaces` computes them in the audit.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import numpy as np
import torch

from mishield.audit.stats import (
    Interval,
    _check,
    class_bootstrap,
    paired_difference,
    ratio_bootstrap,
)
from mishield.errors import BadInputError, UsageError

DEFAULT_K = 5  # Naeem et al.'s recommended k for precision / recall / density / coverage
DEFAULT_CHUNK = 1024  # rows per distance block: 1024 x 10,000 float64 distances are 80 MB
# Subsample fractions of the FID_inf fit: FID is linear in 1/n over this range once n >> dims.
FID_FRACTIONS = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


# ----------------------------------------------------------------------------- inputs


def _features(x, name: str) -> torch.Tensor:
    """A float64 CPU [N, D] copy of `x` (numpy array, tensor or nested list), checked."""
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x.detach())
    t = t.to(device="cpu", dtype=torch.float64)
    if t.ndim != 2:
        raise UsageError(f"`{name}` must be an [images, dims] feature array, got shape {tuple(t.shape)}.")
    if not torch.isfinite(t).all():
        raise BadInputError(f"`{name}` holds NaN or infinite features; the feature extractor's output is broken.")
    return t


def _same_width(a: torch.Tensor, b: torch.Tensor, names: str) -> None:
    if a.shape[1] != b.shape[1]:
        raise UsageError(f"{names} must come from the same feature extractor; got {a.shape[1]} and {b.shape[1]} dims.")


def _labels(y, n: int, name: str) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(y) if not isinstance(y, torch.Tensor) else y.detach()).to("cpu").long().flatten()
    if t.shape[0] != n:
        raise UsageError(f"`{name}` must give one label per feature row: {t.shape[0]} labels for {n} rows.")
    return t


def _check_chunk(chunk: int) -> None:
    if chunk < 1:
        raise UsageError(f"`chunk` is a number of rows per distance block, at least 1; got {chunk}.")


def _sq_dist(x: torch.Tensor, y: torch.Tensor, x2: torch.Tensor, y2: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances [len(x), len(y)] from precomputed squared norms.

    Squared, not square-rooted: every comparison here is between distances, and the square root
    of the matrix-product form turns a rounding error of 1e-13 at zero distance into 1e-7.
    """
    return (x2[:, None] + y2[None, :] - 2.0 * (x @ y.T)).clamp_min_(0.0)


def _blocks(n: int, chunk: int):
    for s in range(0, n, chunk):
        yield s, min(s + chunk, n)


# ----------------------------------------------------------------------------- FID


def _trace_sqrt_sample_space(xa: torch.Tensor, xb: torch.Tensor) -> float:
    """tr sqrt(Sa Sb) from centred samples, exact for any rank: the nuclear norm of Xa Xb^T / sqrt((na-1)(nb-1)).

    With Sa = Xa^T Xa / (na-1), the nonzero eigenvalues of Sa Sb are those of C C^T with
    C = Xa Xb^T (AB and BA share them), whose square roots are C's singular values: no matrix
    square root, no negative eigenvalue to clip. Costs an SVD of an na x nb matrix.
    """
    c = xa @ xb.T
    return float(torch.linalg.svdvals(c).sum()) / math.sqrt((xa.shape[0] - 1) * (xb.shape[0] - 1))


def _trace_sqrt_feature_space(xa: torch.Tensor, xb: torch.Tensor) -> float:
    """tr sqrt(Sa Sb) through the symmetric form sqrt(Sa) Sb sqrt(Sa), in the D x D feature space.

    sqrt(Sa) Sb sqrt(Sa) is symmetric positive semi-definite and has the eigenvalues of Sa Sb,
    so its eigenvalues (rounding can make tiny ones negative: clipped to 0) give the trace
    without the non-symmetric square root that scipy's sqrtm takes, which turns complex on
    singular covariances. Costs a few D x D products and two symmetric eigendecompositions.
    """
    sa = xa.T @ xa / (xa.shape[0] - 1)
    sb = xb.T @ xb / (xb.shape[0] - 1)
    w, v = torch.linalg.eigh(sa)
    root = (v * w.clamp_min(0.0).sqrt()) @ v.T
    m = root @ sb @ root
    ev = torch.linalg.eigvalsh((m + m.T) / 2)
    return float(ev.clamp_min(0.0).sqrt().sum())


def _fid(a: torch.Tensor, b: torch.Tensor) -> float:
    mu_a, mu_b = a.mean(dim=0), b.mean(dim=0)
    xa, xb = a - mu_a, b - mu_b
    tr_a = float((xa * xa).sum()) / (a.shape[0] - 1)
    tr_b = float((xb * xb).sum()) / (b.shape[0] - 1)
    # The cheaper exact route: the sample space when either set has no more rows than dims.
    cross = _trace_sqrt_sample_space(xa, xb) if min(a.shape[0], b.shape[0]) <= a.shape[1] else _trace_sqrt_feature_space(xa, xb)
    mean_term = float(((mu_a - mu_b) ** 2).sum())
    return max(0.0, mean_term + tr_a + tr_b - 2.0 * cross)  # >= 0 in exact arithmetic


def _fid_inputs(a, b) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = _features(a, "a"), _features(b, "b")
    _same_width(a, b, "`a` and `b`")
    if min(a.shape[0], b.shape[0]) < 2:
        raise UsageError(f"FID needs at least 2 feature rows per set for a covariance; got {a.shape[0]} and {b.shape[0]}.")
    return a, b


def frechet_distance(a, b) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets `a` [Na, D] and `b` [Nb, D].

    FID = ||mu_a - mu_b||^2 + tr(Sa) + tr(Sb) - 2 tr sqrt(Sa Sb), with sample means and unbiased
    (n - 1) covariances, in float64. tr sqrt(Sa Sb) is computed exactly and stably: through the
    symmetric form sqrt(Sa) Sb sqrt(Sa) (eigenvalues, tiny negative ones clipped) when both sets
    have more rows than dims, else as the nuclear norm of Xa Xb^T in the sample space, which is
    cheaper there and never needs a square root of a singular matrix.

    Few samples (N <= D): the covariance has rank at most N - 1, and the value is the exact
    Fréchet distance between the two degenerate Gaussians fitted to the samples: finite,
    non-negative, symmetric, 0 for identical sets, but heavily biased. Bias at any N: the mean
    term is inflated by tr(Sa)/Na + tr(Sb)/Nb and tr sqrt(Sa Sb) is underestimated, so FID
    comes out too large, by roughly c / N (Chong & Forsyth, CVPR 2020), with c depending on the
    distributions AND the dims. Measured on Gaussians in 512 dims: 20 vs 15 samples gave about
    1,700 for a true 387, and two samples of the SAME distribution gave about 1,570;
    2,580 vs 1,935 samples overestimated by about 82. Compare FIDs only at equal sample sizes
    and from the same feature extractor; `frechet_distance_extrapolated` removes most of the
    bias when N is several times D. At least 2 rows per set; a non-finite feature is a
    BadInputError, mismatched widths a UsageError.
    """
    a, b = _fid_inputs(a, b)
    return _fid(a, b)


def frechet_distance_extrapolated(a, b, *, fractions=FID_FRACTIONS, repeats: int = 2, seed: int = 0) -> float:
    """FID extrapolated to infinitely many samples (Chong & Forsyth, CVPR 2020, "FID_inf").

    FID's bias is close to linear in 1/n once n is several times the dims: with both sets
    subsampled (without replacement) to the same fraction t of their size, FID(t) ~ FID_inf +
    c / t. This fits that line by least squares over `fractions` (`repeats` random subsets per
    fraction below 1, one full set at 1) and returns its intercept. Only meaningful when the
    smallest subsample has several times more rows than dims: measured on Gaussians, 2,580 vs
    1,935 samples in 512 dims brought the error from about +82 to within 3 (true 387), 500 vs
    400 in 64 dims from about +6 to about 1; at 20 vs 15 samples in 512 dims it stays off by
    over 1,000, like plain FID. May come out slightly negative when the true distance is
    near 0 (an extrapolation, not a distance); deterministic given `seed`.
    """
    a, b = _fid_inputs(a, b)
    fr = sorted({float(f) for f in fractions})
    if len(fr) < 2 or fr[0] <= 0 or fr[-1] > 1:
        raise UsageError(f"`fractions` needs at least two distinct subsample fractions in (0, 1]; got {list(fractions)}.")
    if repeats < 1:
        raise UsageError(f"`repeats` is the number of random subsets per fraction, at least 1; got {repeats}.")
    if round(fr[0] * min(a.shape[0], b.shape[0])) < 2:
        raise UsageError(f"the smallest fraction {fr[0]} leaves fewer than 2 rows of a set of {min(a.shape[0], b.shape[0])}.")
    g = torch.Generator().manual_seed(seed)
    xs, ys = [], []
    for t in fr:
        for _ in range(repeats if t < 1 else 1):
            ia = torch.randperm(a.shape[0], generator=g)[: round(t * a.shape[0])]
            ib = torch.randperm(b.shape[0], generator=g)[: round(t * b.shape[0])]
            xs.append(1.0 / t)
            ys.append(_fid(a[ia], b[ib]))
    _slope, intercept = np.polyfit(np.asarray(xs), np.asarray(ys), 1)
    return float(intercept)


# ----------------------------------------------------------------------------- PRDC


def _knn_sq_radii(x: torch.Tensor, x2: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    """Squared distance from each row of `x` to its k-th nearest OTHER row (the point itself excluded)."""
    out = torch.empty(x.shape[0], dtype=torch.float64)
    for s, e in _blocks(x.shape[0], chunk):
        d = _sq_dist(x[s:e], x, x2[s:e], x2)
        d[torch.arange(e - s), torch.arange(s, e)] = math.inf
        out[s:e] = d.kthvalue(k, dim=1).values
    return out


def _prdc(real: torch.Tensor, fake: torch.Tensor, k: int, chunk: int) -> dict:
    """The four figures in one pass over fake-row blocks; recall is None when the fake set has k rows or fewer.

    A ball B(x, r) is OPEN: a point at exactly the k-th neighbour's distance is outside, so each
    real ball holds its centre and k - 1 other real points, and a set scored against itself
    has density exactly 1 without ties (with a closed ball it would be (k + 1) / k).
    """
    n, m = real.shape[0], fake.shape[0]
    r2, f2 = (real * real).sum(1), (fake * fake).sum(1)
    real_radii = _knn_sq_radii(real, r2, k, chunk)
    fake_radii = _knn_sq_radii(fake, f2, k, chunk) if m > k else None
    inside_some, inside_total = 0, 0
    nearest_fake = torch.full((n,), math.inf, dtype=torch.float64)
    recalled = torch.zeros(n, dtype=torch.bool)
    for s, e in _blocks(m, chunk):
        d = _sq_dist(fake[s:e], real, f2[s:e], r2)  # [fake block, real]
        inside = d < real_radii[None, :]  # fake j inside real ball i
        counts = inside.sum(dim=1)
        inside_some += int((counts > 0).sum())
        inside_total += int(counts.sum())
        nearest_fake = torch.minimum(nearest_fake, d.min(dim=0).values)
        if fake_radii is not None:
            recalled |= (d < fake_radii[s:e, None]).any(dim=0)  # real i inside fake ball j
    return {
        "precision": inside_some / m,
        "recall": float(recalled.double().mean()) if fake_radii is not None else None,
        "density": inside_total / (k * m),
        "coverage": float((nearest_fake < real_radii).double().mean()),
    }


def _check_k(k: int) -> None:
    if not isinstance(k, int) or k < 1:
        raise UsageError(f"`k` is a number of nearest neighbours, at least 1; got {k!r}.")


def precision_recall_density_coverage(real, fake, *, k: int = DEFAULT_K, chunk: int = DEFAULT_CHUNK) -> dict:
    """Precision, recall, density and coverage of `fake` [M, D] against `real` [N, D] (Naeem et al., ICML 2020).

    With r(x) the distance from a sample to its k-th nearest neighbour in its own set (itself
    excluded) and B(x, r(x)) the open ball:

    * precision = share of fake samples inside at least one real ball (fidelity);
    * recall = share of real samples inside at least one FAKE ball (balls of the fake samples'
      own k-NN radii; diversity);
    * density = (1 / kM) sum over fake j of the number of real balls holding j: about 1 when
      fake and real come from one distribution, above 1 where fakes crowd dense real regions,
      and not capped at 1 as precision is;
    * coverage = share of real samples whose own ball holds at least one fake sample.

    Returns the four as floats in a dict. `real` and `fake` are not interchangeable (swapping
    them swaps precision and recall and changes density and coverage). Needs k < N and k < M
    (a k-th neighbour other than the point itself); small sets give large radii, so the figures
    compare only at equal k and equal set sizes. Squared distances in float64, in blocks of
    `chunk` fake rows.
    """
    _check_k(k)
    _check_chunk(chunk)
    real, fake = _features(real, "real"), _features(fake, "fake")
    _same_width(real, fake, "`real` and `fake`")
    if k >= real.shape[0] or k >= fake.shape[0]:
        raise UsageError(f"`k` = {k} needs more than k samples in each set (a k-th neighbour besides the point itself); "
                         f"got {real.shape[0]} real and {fake.shape[0]} fake.")  # fmt: skip
    return _prdc(real, fake, k, chunk)


# ----------------------------------------------------------------------------- the KNN judge


def _nearest(x: torch.Tensor, p: torch.Tensor, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    x2, p2 = (x * x).sum(1), (p * p).sum(1)
    best = torch.full((x.shape[0],), math.inf, dtype=torch.float64)
    index = torch.zeros(x.shape[0], dtype=torch.long)
    for ps, pe in _blocks(p.shape[0], chunk):
        for s, e in _blocks(x.shape[0], chunk):
            d, i = _sq_dist(x[s:e], p[ps:pe], x2[s:e], p2[ps:pe]).min(dim=1)
            closer = d < best[s:e]  # strict: an earlier block keeps an exact tie
            best[s:e] = torch.where(closer, d, best[s:e])
            index[s:e] = torch.where(closer, i + ps, index[s:e])
    return best, index


def _judge_inputs(features, private_features, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    _check_chunk(chunk)
    x, p = _features(features, "features"), _features(private_features, "private_features")
    _same_width(x, p, "the reconstructions' and the private images' features")
    if p.shape[0] == 0:
        raise UsageError("`private_features` is empty; the KNN judge needs private training images to compare with.")
    return x, p


def nearest_private(features, private_features, *, chunk: int = DEFAULT_CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row of `features`, the squared L2 distance to its nearest row of `private_features`
    and that row's index (the first such row on exact ties): ((N,) float64, (N,) long).

    Blocks of `chunk` rows on BOTH sides with a running minimum, so memory is chunk x chunk
    distances whatever the sizes.
    """
    return _nearest(*_judge_inputs(features, private_features, chunk), chunk)


def knn_judge_hits(recon_features, recon_labels, private_features, private_labels, *, chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """Bool (N,): whether each reconstruction's nearest private training image, among ALL classes, is of its class.

    A judge that is not a classifier: it has no decision boundary an attack could push a
    reconstruction across, only the private images themselves. Use features from an extractor
    that did not come from the target (docs/audit.md): in the target's own feature space,
    adversarial features would again count as likeness. Unlike `mishield.audit.metrics.
    knn_distances`, which only looks at the attacked class, a reconstruction nearer to another
    class's images is a miss here. Blocks of `chunk` rows on both sides (`nearest_private`).
    """
    x, p = _judge_inputs(recon_features, private_features, chunk)
    labels = _labels(recon_labels, x.shape[0], "recon_labels")
    private = _labels(private_labels, p.shape[0], "private_labels")
    _, index = _nearest(x, p, chunk)
    return private[index] == labels


# ----------------------------------------------------------------------------- evaluator vs KNN judge


@dataclass(frozen=True)
class JudgeAgreement:
    """The evaluator's and the KNN judge's verdicts on the same reconstructions, with intervals.

    `rejected_share` (the estimate of false positives) is None when the evaluator counted no
    hit at all; `counts` are image counts: `rejected` evaluator hits the KNN judge rejects,
    `rescued` KNN-judge hits the evaluator missed.
    """

    evaluator_acc1: Interval
    knn_judge_acc1: Interval
    disagreement: Interval
    evaluator_minus_knn: Interval
    rejected_share: Interval | None
    counts: dict
    note: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)  # the Intervals become dicts too


def _check_level(level: float, resamples: int) -> None:
    try:
        _check(level, resamples)
    except ValueError as err:  # the statistics module's own message, as a usage error
        raise UsageError(f"`level` / `resamples`: {err}") from None


def _outcomes(hits, name: str) -> np.ndarray:
    a = np.asarray(hits.numpy() if isinstance(hits, torch.Tensor) else hits, dtype=np.float64)
    if a.ndim != 2 or a.size == 0:
        raise UsageError(f"`{name}` must be a non-empty [classes, images] array of 0/1 outcomes, got shape {a.shape}.")
    if not np.isin(a, (0.0, 1.0)).all():
        raise UsageError(f"`{name}` must hold 0/1 outcomes (one per kept reconstruction), not NaN or other values.")
    return a


def rejected_share(evaluator_hits, knn_hits, *, level: float = 0.95, resamples: int = 2000, seed: int = 0) -> Interval | None:
    """Share of the evaluator's hits that the KNN judge rejects, with a class-bootstrap interval; None without any evaluator hit.

    The estimate is a ratio of sums, (evaluator hit and KNN miss) / (evaluator hit), so each
    class weighs by its number of evaluator hits. The interval resamples CLASSES with
    replacement, the same draw for numerator and denominator (`mishield.audit.stats.ratio_bootstrap`), reads the expanded percentiles of the ratio, and is widened to the
    Wilson interval over the evaluator's hits as if they were independent, as `class_bootstrap`
    is. A resample that drew no class with an evaluator hit has no ratio and is left out (said
    in `note`). One class gives [0, 1], flagged degenerate.
    """
    _check_level(level, resamples)
    e, kn = _outcomes(evaluator_hits, "evaluator_hits"), _outcomes(knn_hits, "knn_hits")
    if e.shape != kn.shape:
        raise UsageError(f"`evaluator_hits` and `knn_hits` must judge the same reconstructions; shapes {e.shape} and {kn.shape}.")
    return ratio_bootstrap((e * (1 - kn)).sum(axis=1), e.sum(axis=1), level=level, resamples=resamples, seed=seed)


def judge_agreement(evaluator_hits, knn_hits, *, level: float = 0.95, resamples: int = 2000, seed: int = 0) -> JudgeAgreement:
    """Compare the evaluator's top-1 hits with the KNN judge's on the same [classes, images] reconstructions.

    Row i of both arrays must be the same attacked class. Returns each judge's accuracy
    (`class_bootstrap`), the disagreement rate (share of reconstructions the two judge
    differently, `class_bootstrap` of the 0/1 disagreement), the paired difference
    evaluator - KNN judge (`paired_difference`: the net surplus of the evaluator's hits), and
    `rejected_share`, the estimate of the evaluator's false positives. Every interval treats
    the attacked class as the unit, as the rest of the audit does.
    """
    e, kn = _outcomes(evaluator_hits, "evaluator_hits"), _outcomes(knn_hits, "knn_hits")
    if e.shape != kn.shape:
        raise UsageError(f"`evaluator_hits` and `knn_hits` must judge the same reconstructions; shapes {e.shape} and {kn.shape}.")
    _check_level(level, resamples)
    opts = {"level": level, "resamples": resamples, "seed": seed}
    share = rejected_share(e, kn, **opts)
    counts = {"images": int(e.size), "evaluator_hits": int(e.sum()), "knn_hits": int(kn.sum()),
              "both": int((e * kn).sum()), "rejected": int((e * (1 - kn)).sum()), "rescued": int(((1 - e) * kn).sum())}  # fmt: skip
    return JudgeAgreement(
        evaluator_acc1=class_bootstrap(e, **opts),
        knn_judge_acc1=class_bootstrap(kn, **opts),
        disagreement=class_bootstrap((e != kn).astype(np.float64), **opts),
        evaluator_minus_knn=paired_difference(kn, e, **opts),
        rejected_share=share,
        counts=counts,
        note=None if share is not None else "the evaluator counted no hit, so no share of its hits can be rejected.",
    )


# ----------------------------------------------------------------------------- per-class summary

METRICS = ("fid", "precision", "recall", "density", "coverage")


def _distribution_figures(fake: torch.Tensor, real: torch.Tensor, k: int, chunk: int) -> dict:
    """FID and PRDC of one (reconstructions, private) pair; a figure that cannot be computed is None with a reason in `skipped`."""
    m, n = fake.shape[0], real.shape[0]
    out: dict = {"reconstructions": m, "private": n, **dict.fromkeys(METRICS), "fid_rank_deficient": None, "skipped": {}}
    if n == 0 or m == 0:
        reason = "no private images of this class" if n == 0 else "no reconstructions of this class"
        out["skipped"] = dict.fromkeys(METRICS, reason)
        return out
    if min(m, n) >= 2:
        out["fid"] = _fid(fake, real)
        out["fid_rank_deficient"] = min(m, n) <= fake.shape[1]
    else:
        out["skipped"]["fid"] = f"a covariance needs at least 2 samples per set; got {m} reconstructions and {n} private images"
    if n > k:
        out.update(_prdc(real, fake, k, chunk))
        if out["recall"] is None:
            out["skipped"]["recall"] = f"recall needs more than k = {k} reconstructions for their radii; got {m}"
    else:
        reason = f"k = {k} needs more than k private images for their radii; got {n}"
        out["skipped"].update({key: reason for key in ("precision", "density", "coverage")})
        out["skipped"]["recall"] = reason if m > k else f"{reason} (and {m} reconstructions)"
    return out


def _class_mean(rows: list[dict]) -> dict:
    """Mean of each figure over the classes where it was measured, and how many those were."""
    out = {}
    for key in METRICS:
        values = [r[key] for r in rows if r[key] is not None]
        out[key] = float(np.mean(values)) if values else None
        out[f"{key}_classes"] = len(values)
    return out


def fidelity_summary(reconstructions: Mapping, private: Mapping, *, k: int = DEFAULT_K, extractor: str | None = None,
                     extrapolate: bool = True, chunk: int = DEFAULT_CHUNK) -> dict:  # fmt: skip
    """FID, precision, recall, density and coverage of the reconstructions against the private
    training images, per class, pooled and as a mean over classes, with the time they took.

    `reconstructions` and `private` map a class to its [images, dims] features from ONE
    extractor (`extractor` names it for the report). `per_class` follows the order of
    `reconstructions`; `pooled` compares all reconstructions with the private images of the
    reconstructed classes only (a cross-class comparison: a reconstruction near another
    attacked class's images still counts as close). A figure that cannot be computed is None,
    with the reason in `skipped`: no private image or reconstruction, under 2 samples for a
    covariance, k or fewer for the k-NN radii. `fid_rank_deficient` marks an FID from no more
    samples than dims (biased upwards, see `frechet_distance`); the pooled `fid_extrapolated`
    (FID_inf) is given when `extrapolate` and half of the smaller pooled set still has more rows
    than dims. `seconds` holds the wall and process CPU time of the whole computation.
    """
    _check_k(k)
    _check_chunk(chunk)
    wall, cpu = time.perf_counter(), time.process_time()
    fakes = {c: _features(v, f"reconstructions[{c}]") for c, v in reconstructions.items()}
    reals = {c: _features(private[c], f"private[{c}]") if c in private else None for c in fakes}
    widths = {t.shape[1] for t in [*fakes.values(), *reals.values()] if t is not None and t.shape[0]}
    if len(widths) > 1:
        raise UsageError(f"all features must come from one extractor with one width; got widths {sorted(widths)}.")
    if not widths:
        raise UsageError("`reconstructions` holds no features; pass at least one class's reconstruction features.")
    dims = widths.pop()
    empty = torch.empty(0, dims, dtype=torch.float64)
    rows = [{"class": c, **_distribution_figures(f, reals[c] if reals[c] is not None else empty, k, chunk)} for c, f in fakes.items()]
    per_class_s = time.perf_counter() - wall
    pooled_fake = torch.cat([f for f in fakes.values() if f.shape[0]] or [empty])
    pooled_real = torch.cat([r for r in reals.values() if r is not None and r.shape[0]] or [empty])
    pooled = _distribution_figures(pooled_fake, pooled_real, k, chunk)
    pooled["fid_extrapolated"] = None
    if not extrapolate:
        pooled["skipped"]["fid_extrapolated"] = "not asked for (`extrapolate` is off)"
    elif min(pooled_fake.shape[0], pooled_real.shape[0]) * FID_FRACTIONS[0] <= dims:
        pooled["skipped"]["fid_extrapolated"] = (f"half of the smaller pooled set ({min(pooled_fake.shape[0], pooled_real.shape[0])} "
                                                 f"rows) must exceed the {dims} dims for the 1/n law to hold")  # fmt: skip
    else:
        pooled["fid_extrapolated"] = frechet_distance_extrapolated(pooled_fake, pooled_real)
    return {
        "extractor": extractor, "k": k, "dims": dims, "per_class": rows, "pooled": pooled, "class_mean": _class_mean(rows),
        "seconds": {"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu, "per_class_wall": per_class_s},
    }  # fmt: skip
