"""Honest uncertainty for the audit: intervals that treat the attacked class as the unit.

The K reconstructions of one class share that class's optimisation (the same pool, the same
target gradient towards one label), so they succeed or fail together. A Wilson interval over
classes x K images assumes independent images and is far too narrow: with 10 classes x 20
images at 50 %, half the classes all-hit and half all-miss, Wilson says 43-57 % while the
data hold only ten independent numbers. Everything here resamples classes instead
(a cluster bootstrap) and the gate decides on the interval's upper end, so uncertainty counts
against release. See docs/audit.md for how to read the numbers.

numpy arithmetic, deterministic given a seed; inputs may be numpy arrays, lists or CPU tensors.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from statistics import NormalDist

import numpy as np

# A class counts as reached when, over its kept reconstructions, the scoring model (the target; the
# surrogates for the transfer attack) ranks it first on at least this share of the final crops. A
# rank, not the softmax: a temperature the owner puts on the logits (x1e3, x1e-3) would make every
# class reached, or none, at any softmax threshold.
MIN_REACHED = 0.5
# A gate over fewer attacked classes is anti-conservative: simulated with `class_bootstrap`, 3
# classes at a true 55 % against a 50 % threshold passed 7 % of the time, not the nominal 2.5 %
# (docs/audit.md "How the gate decides"); a pass over fewer classes is inconclusive.
MIN_GATE_CLASSES = 5

METHOD = "class-bootstrap (expanded percentile) + Wilson floor"
PAIRED_METHOD = "paired class-bootstrap (expanded percentile)"
NO_CLASSES_METHOD = "none: one class gives no between-class information"


@dataclass(frozen=True)
class Interval:
    """A point estimate and its interval, with what it was computed from.

    `degenerate` marks an interval that carries no between-class information (one class, or all
    classes gave exactly the same figure); `note` says why in one sentence.
    """

    estimate: float
    low: float
    high: float
    level: float
    method: str
    classes: int
    images: int
    resamples: int
    degenerate: bool = False
    note: str | None = None

    def covers(self, value: float) -> bool:
        return self.low <= value <= self.high

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Verdict:
    """The audit's conclusion for one model: "leaky", "passes", "inconclusive" (never passes) or
    "not gated" (conclusive, but no threshold was given)."""

    status: str
    reason: str
    # why, as a word the advice can follow (VERDICT_CAUSES); report.json records it beside the reason
    cause: str = ""

    @property
    def passed(self) -> bool:
        return self.status == "passes"

    def to_dict(self) -> dict:
        return {"status": self.status, "passed": self.passed, "reason": self.reason, "cause": self.cause}


# What each verdict's cause means for the next step (the CLI's advice on a failed gate follows it).
VERDICT_CAUSES = {
    "unreached": "the attack did not reach some classes: raise the budget (--preset, -I, -C) or give a prior closer to the data",
    "few_classes": f"a gate over fewer than {MIN_GATE_CLASSES} attacked classes cannot pass: audit more classes (--classes)",
    "no_gain": "no attack beat the selection-only baseline beyond its noise: raise the budget, or audit more classes to narrow the noise",
    "misled": "the optimisation drove the candidates away from what the evaluation model recognises: the model misleads "
              "attacks that read it on generated images; run transfer with --surrogate",
    "masking": "the model's gradients or its answers on generated images look masked: run the blackbox attack, "
               "or transfer with --surrogate, so that an attack it cannot mislead decides",
    "below_chance": "the evaluation model files reconstructions under other classes: check it (mishield train-eval) and the class order",
    "one_class": "one class gives no interval: audit more classes",
    "uncertain": "the estimate is under the threshold but the interval is too wide: audit more classes (--classes) or repeat (--seeds)",
    "leaky": "the model leaks: harden it (mishield harden) or choose a stronger defence, then audit again",
}


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion: honest at small n and near 0 or 1."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def _hits(hits, name: str = "hits") -> np.ndarray:
    a = np.asarray(hits, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] < 1 or a.shape[1] < 1:
        raise ValueError(f"{name} must be a non-empty [classes, images] array, got shape {a.shape}.")
    if np.isnan(a).any():
        raise ValueError(f"{name} holds NaN; pass one 0/1 outcome per kept image.")
    return a


def t_quantile(p: float, df: int) -> float:
    """Student-t quantile: exact for 1 and 2 degrees of freedom, Cornish-Fisher beyond.

    Abramowitz & Stegun 26.7.5; the error at p = 0.975 is below 1e-3 from 3 degrees of freedom
    on, far under the bootstrap's own Monte-Carlo noise.
    """
    if df < 1:
        raise ValueError(f"degrees of freedom must be at least 1, got {df}.")
    if df == 1:
        return math.tan(math.pi * (p - 0.5))
    if df == 2:
        return (2 * p - 1) / math.sqrt(2 * p * (1 - p))
    z = NormalDist().inv_cdf(p)
    g1 = (z**3 + z) / 4
    g2 = (5 * z**5 + 16 * z**3 + 3 * z) / 96
    g3 = (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384
    g4 = (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / 92160
    return z + g1 / df + g2 / df**2 + g3 / df**3 + g4 / df**4


def expanded_tail(level: float, n: int) -> float:
    """The one-sided tail to read percentiles at, for n resampled units (Hesterberg 2015).

    The plain percentile bootstrap is too narrow with few units: it spreads like a z-interval
    whose variance is shrunk by (n-1)/n, where the honest reference is Student's t with n-1
    degrees of freedom. Reading the percentiles at Phi(-sqrt(n/(n-1)) t_{n-1}) undoes both;
    at 10 classes a 95 % interval reads the 0.85 % and 99.15 % percentiles.
    """
    half = (1 - level) / 2
    if n < 2:
        return half
    return NormalDist().cdf(-math.sqrt(n / (n - 1)) * t_quantile(1 - half, n - 1))


def _bootstrap_means(per_class: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = per_class.shape[0]
    idx = rng.integers(0, n, size=(resamples, n))
    return per_class[idx].mean(axis=1)


def _percentiles(means: np.ndarray, level: float, n: int) -> tuple[float, float]:
    tail = expanded_tail(level, n)
    lo, hi = np.quantile(means, [tail, 1 - tail])
    return float(lo), float(hi)


def _check(level: float, resamples: int) -> None:
    if not 0 < level < 1:
        raise ValueError(f"level must lie strictly between 0 and 1, got {level}.")
    if resamples < 100:
        raise ValueError(f"at least 100 bootstrap resamples are needed for a stable interval, got {resamples}.")


def class_bootstrap(hits, *, level: float = 0.95, resamples: int = 2000, seed: int = 0) -> Interval:
    """Interval on attack accuracy from per-image outcomes `hits` [classes, images] (0/1).

    Resamples classes with replacement and reads expanded percentiles (see `expanded_tail`);
    the result is widened, never narrowed, to the Wilson interval over all images, which is
    what independent images would give: clustering can only add uncertainty, and the floor
    keeps the interval honest near 0 % and 100 % where a percentile bootstrap collapses.
    One class gives no between-class information: the interval is [0, 1], flagged degenerate.
    """
    _check(level, resamples)
    a = _hits(hits)
    n_cls, k = a.shape
    per_class = a.mean(axis=1)
    estimate = float(per_class.mean())
    common = {"level": level, "classes": n_cls, "images": n_cls * k, "resamples": resamples}
    if n_cls == 1:
        return Interval(estimate, 0.0, 1.0, method=NO_CLASSES_METHOD, degenerate=True,
                        note="one class cannot say how much another class would differ; audit more classes.", **common)  # fmt: skip
    lo, hi = _percentiles(_bootstrap_means(per_class, resamples, seed), level, n_cls)
    z = NormalDist().inv_cdf(1 - (1 - level) / 2)
    w_lo, w_hi = wilson_interval(round(a.sum()), a.size, z)
    same = bool(np.ptp(per_class) == 0)
    note = "every class gave the same accuracy, so the spread between classes is unknown; the interval is Wilson's." if same else None
    return Interval(estimate, min(lo, w_lo), max(hi, w_hi), method=METHOD, degenerate=same, note=note, **common)


def paired_difference(hits_a, hits_b, *, level: float = 0.95, resamples: int = 2000, seed: int = 0) -> Interval:
    """Interval on accuracy(b) - accuracy(a) for two models audited on the same classes.

    Both models were attacked with the same pool and crops, so a class that is easy for one is
    usually easy for the other; resampling the SAME class indices for both keeps that pairing
    and cancels the shared class difficulty, which an unpaired comparison would count twice.
    Row i of both arrays must be the same class. One class gives [-1, 1], flagged degenerate.
    """
    _check(level, resamples)
    a, b = _hits(hits_a, "hits_a"), _hits(hits_b, "hits_b")
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"both models must be audited on the same classes; got {a.shape[0]} and {b.shape[0]} rows.")
    d = b.mean(axis=1) - a.mean(axis=1)
    n_cls = d.shape[0]
    common = {"level": level, "classes": n_cls, "images": a.size + b.size, "resamples": resamples}
    if n_cls == 1:
        return Interval(float(d[0]), -1.0, 1.0, method=NO_CLASSES_METHOD, degenerate=True,
                        note="one class cannot say how much another class would differ; audit more classes.", **common)  # fmt: skip
    lo, hi = _percentiles(_bootstrap_means(d, resamples, seed), level, n_cls)
    if np.ptp(d) == 0:
        lo, hi = _newcombe(a, b, level)
        return Interval(float(d.mean()), lo, hi, method="Newcombe (unpaired; no between-class spread)", degenerate=True,
                        note="every class moved by the same amount, so the spread between classes is unknown; "
                             "the interval treats the images as independent.", **common)  # fmt: skip
    return Interval(float(d.mean()), lo, hi, method=PAIRED_METHOD, **common)


RATIO_METHOD = "class-bootstrap of a ratio (expanded percentile) + Wilson floor"


def ratio_bootstrap(numerators, denominators, *, level: float = 0.95, resamples: int = 2000, seed: int = 0) -> Interval | None:
    """Interval on sum(numerators) / sum(denominators) from per-class counts (a share of hits, say).

    Each class weighs by its denominator. Classes are resampled with replacement, the SAME draw
    for numerator and denominator, and the expanded percentiles of the ratio are read; the result
    is widened to the Wilson interval over the denominator's units as if they were independent,
    as `class_bootstrap` is. A resample that drew no class with a denominator has no ratio and is
    left out (said in `note`). None when the denominators sum to 0; one class gives [0, 1].
    """
    _check(level, resamples)
    num, den = np.asarray(numerators, dtype=np.float64), np.asarray(denominators, dtype=np.float64)
    if den.sum() == 0:
        return None
    estimate = float(num.sum() / den.sum())
    n_cls = num.shape[0]
    common = {"level": level, "classes": n_cls, "images": int(den.sum()), "resamples": resamples}
    if n_cls == 1:
        return Interval(estimate, 0.0, 1.0, method=NO_CLASSES_METHOD, degenerate=True,
                        note="one class cannot say how much another class would differ; audit more classes.", **common)  # fmt: skip
    nb, db = _bootstrap_means(num, resamples, seed), _bootstrap_means(den, resamples, seed)  # same seed: same classes
    kept = db > 0
    lo, hi = _percentiles(nb[kept] / db[kept], level, n_cls)
    w_lo, w_hi = wilson_interval(round(num.sum()), round(den.sum()), NormalDist().inv_cdf(1 - (1 - level) / 2))
    dropped = int((~kept).sum())
    note = f"{dropped} of {resamples} resamples drew no class with a denominator and were left out." if dropped else None
    return Interval(estimate, min(lo, w_lo), max(hi, w_hi), method=RATIO_METHOD, note=note, **common)


def _newcombe(a: np.ndarray, b: np.ndarray, level: float) -> tuple[float, float]:
    """Newcombe's hybrid score interval for b - a from two Wilson intervals (independent images)."""
    z = NormalDist().inv_cdf(1 - (1 - level) / 2)
    pa, pb = float(a.mean()), float(b.mean())
    la, ua = wilson_interval(round(a.sum()), a.size, z)
    lb, ub = wilson_interval(round(b.sum()), b.size, z)
    d = pb - pa
    return max(-1.0, d - math.hypot(pb - lb, ua - pa)), min(1.0, d + math.hypot(ub - pb, pa - la))


def pool_seeds(runs: Sequence) -> np.ndarray:
    """Pool repeated audits (`--seeds N`) of the same classes into one [classes, N x images] array.

    The seeds are independent replicates of the attack on the SAME classes, so the class stays
    the unit: each class's accuracy becomes its mean over all seeds' images and the bootstrap
    then resamples classes. Counting class x seed as separate clusters would treat two runs on
    one class as two classes, although what makes a class easy (its look, the target's
    training) is shared by every seed: the interval would be too narrow. Row i of every run
    must be the same class.
    """
    arrays = [_hits(r, f"runs[{i}]") for i, r in enumerate(runs)]
    if not arrays:
        raise ValueError("pool_seeds needs at least one run.")
    rows = {x.shape[0] for x in arrays}
    if len(rows) != 1:
        raise ValueError(f"every run must cover the same classes; got {sorted(rows)} rows.")
    return np.concatenate(arrays, axis=1)


def chance_level(num_classes: int, k: int = 1) -> float:
    """Attack accuracy @k of an evaluator that guesses: k / number of classes (capped at 1)."""
    if num_classes < 1 or k < 1:
        raise ValueError(f"need at least one class and k >= 1, got {num_classes} classes and k={k}.")
    return min(k, num_classes) / num_classes


def below_chance(interval: Interval, chance: float) -> bool:
    """Significantly below chance: the whole interval lies under it."""
    return interval.high < chance


def above_chance(interval: Interval, chance: float) -> bool:
    """Significantly above chance: the whole interval lies over it."""
    return interval.low > chance


def gate_decision(interval: Interval, threshold: float) -> tuple[bool, str]:
    """Pass only if the interval's UPPER end is at or below `threshold` (uncertainty counts against release)."""
    if not 0 <= threshold <= 1:
        raise ValueError(f"the threshold is a fraction between 0 and 1, got {threshold}.")
    shown = f"attack accuracy {interval.estimate:.1%} ({interval.level:.0%} interval {interval.low:.1%}-{interval.high:.1%})"
    if interval.high <= threshold:
        return True, f"{shown}: the upper end is at or below the threshold {threshold:.1%}."
    if interval.estimate <= threshold:
        return False, f"{shown}: the estimate is below the threshold {threshold:.1%} but the upper end is not; audit more classes or images."
    return False, f"{shown} exceeds the threshold {threshold:.1%}."


def unreached_classes(reached, min_reached: float = MIN_REACHED) -> list[int]:
    """Rows (classes) whose mean `reached` share on the kept reconstructions is below `min_reached`.

    `reached` is [classes] or [classes, images]: per kept reconstruction, the share of the final
    crops on which the scoring model ranks the attacked class first.
    """
    c = np.asarray(reached, dtype=np.float64)
    per_class = c.reshape(c.shape[0], -1).mean(axis=1) if c.ndim else c.reshape(1)
    return [i for i, v in enumerate(per_class.tolist()) if not v >= min_reached]  # NaN counts as unreached


def verdict(interval: Interval, threshold: float | None, *, chance: float, reached, min_reached: float = MIN_REACHED) -> Verdict:
    """The verdict for one model: "leaky", "passes" or "inconclusive"; inconclusive never passes.

    Inconclusive, checked first: (1) some class was not reached, i.e. the target itself does not
    rank the class first on its own best reconstructions (`reached` below `min_reached`), so the
    attack failed and a low accuracy says nothing about privacy; (2) accuracy is significantly
    below chance, which means the evaluator systematically files reconstructions under other
    classes (a failed attack or a broken evaluator), not that the model is private; (3) the
    interval is degenerate with no between-class information (one class). Otherwise the gate
    decides on the interval's upper end; a pass over fewer than MIN_GATE_CLASSES classes is
    inconclusive (the interval is too narrow there; a leaky verdict stands, since a wider interval
    would reach higher still). Without a threshold (no gate) a conclusive audit is "not gated".
    """
    missed = unreached_classes(reached, min_reached)
    if missed:
        shown = ", ".join(map(str, missed[:5])) + (" ..." if len(missed) > 5 else "")
        return Verdict("inconclusive", f"the attack did not reach the target's class in {len(missed)} of the audited classes "
                                       f"(rows {shown}: the target ranks the class first on less than {min_reached:.0%} of "
                                       "the crops of its best reconstructions).", "unreached")  # fmt: skip
    if below_chance(interval, chance):
        return Verdict("inconclusive", f"attack accuracy ({interval.low:.1%}-{interval.high:.1%}) is significantly below chance "
                                       f"({chance:.1%}): the attack or the evaluation model failed.", "below_chance")  # fmt: skip
    if interval.classes < 2:
        return Verdict("inconclusive", "one audited class gives no interval; audit at least two classes.", "one_class")
    if threshold is None:
        return Verdict("not gated", "no threshold was given; read the interval against your own bar (the gate would use its upper end).",
                       "not_gated")
    passed, reason = gate_decision(interval, threshold)
    if passed and interval.classes < MIN_GATE_CLASSES:
        return Verdict("inconclusive", f"{reason[:-1]}, but a gate over {interval.classes} attacked classes cannot pass: below "
                                       f"{MIN_GATE_CLASSES} the interval is too narrow to trust; audit more classes.", "few_classes")  # fmt: skip
    if passed:
        return Verdict("passes", reason, "passes")
    return Verdict("leaky", reason, "uncertain" if interval.estimate <= threshold else "leaky")


def optimisation_verdict(judged: Verdict, gain: Interval | None, unfiltered_drop: Interval | None, per_class: int = 1) -> Verdict:
    """`judged` unless the optimisation gave no evidence that the attack worked (docs/audit.md "How the gate decides").

    `gain`: the paired interval of attack accuracy minus the selection-only baseline's (same
    classes, same judge); `unfiltered_drop`: of unfiltered accuracy (every optimised candidate)
    minus the selection-only baseline's; `per_class`: kept images per class (K x seeds). A pass
    becomes inconclusive when the attack did not beat selection alone beyond its noise: the gain's
    upper end at or below 0 (no better, whatever the noise), or a gain of less than one kept image
    per class (1 / `per_class`: below what the measurement resolves; an optimiser with nothing to
    follow stays there), or when the optimised candidates fell significantly below the baseline
    (the unfiltered drop's upper end under 0: the model's answers on generated images led the
    optimiser away from the class). Only a pass needs the attack to have worked: "leaky" stands
    (what selection alone recovers, an attacker recovers too), and "not gated" keeps its status
    with the finding added to its reason.
    """
    if judged.status not in ("passes", "not gated"):
        return judged
    found = None
    if unfiltered_drop is not None and unfiltered_drop.high < 0:
        found = Verdict("inconclusive", f"the optimised candidates were judged the attacked class {_points(unfiltered_drop)} less often "
                                        "than the selection-only baseline's: the model's answers on generated images led the attack "
                                        "away from the class, so its low accuracy says nothing about privacy.", "misled")  # fmt: skip
    elif gain is not None and (gain.high <= 0 or gain.estimate < 1.0 / max(per_class, 1)):
        found = Verdict("inconclusive", f"the attack did not beat the selection-only baseline beyond its noise (gain "
                                        f"{100 * gain.estimate:+.1f} points, {gain.level:.0%} interval {100 * gain.low:+.1f} to "
                                        f"{100 * gain.high:+.1f}; one kept image per class is {100 / max(per_class, 1):.1f}), so it "
                                        "says nothing about the model beyond what selection alone finds.", "no_gain")  # fmt: skip
    if found is None:
        return judged
    if judged.status == "not gated":
        return Verdict("not gated", f"{judged.reason} Note: {found.reason}", judged.cause)
    return found


def _points(interval: Interval) -> str:
    return f"{-100 * interval.estimate:.1f} points ({interval.level:.0%} interval {-100 * interval.high:.1f} to {-100 * interval.low:.1f})"
