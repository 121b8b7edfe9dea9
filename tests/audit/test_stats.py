"""The audit's statistics: class-bootstrap intervals against Wilson, the paired difference, the gate.

Simulations use known clustered processes (each class draws its own success rate, its images
then succeed independently at that rate), so coverage is checked against the truth.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mishield.audit.stats import (
    Interval,
    above_chance,
    below_chance,
    chance_level,
    class_bootstrap,
    expanded_tail,
    gate_decision,
    paired_difference,
    pool_seeds,
    t_quantile,
    unreached_classes,
    verdict,
    wilson_interval,
)


def clustered(rng: np.random.Generator, classes: int, images: int, p: float, icc: float) -> np.ndarray:
    """Hits [classes, images]: class rates ~ Beta with mean p and intra-class correlation icc."""
    s = (1 - icc) / icc
    rates = rng.beta(p * s, (1 - p) * s, classes)
    return rng.random((classes, images)) < rates[:, None]


def width(lo_hi) -> float:
    return lo_hi[1] - lo_hi[0]


def test_correlated_classes_give_a_far_wider_interval_than_wilson():
    # the example: 10 classes x 20 images at 50 %, half the classes all-hit, half all-miss
    hits = np.zeros((10, 20), dtype=bool)
    hits[:5] = True
    iv = class_bootstrap(hits, seed=0)
    wilson = wilson_interval(100, 200)
    assert wilson == pytest.approx((0.431, 0.569), abs=1e-3)
    assert iv.estimate == 0.5 and iv.classes == 10 and iv.images == 200 and not iv.degenerate
    assert iv.low < 0.3 and iv.high > 0.7
    assert width((iv.low, iv.high)) > 3 * width(wilson)


def test_independent_hits_give_about_wilson():
    rng = np.random.default_rng(1)
    for classes in (10, 20):
        hits = rng.random((classes, 20)) < 0.5
        iv = class_bootstrap(hits, seed=0)
        wilson = wilson_interval(int(hits.sum()), hits.size)
        # never narrower than Wilson (the floor), and only t-with-few-classes wider
        assert iv.low <= wilson[0] and iv.high >= wilson[1]
        assert width((iv.low, iv.high)) < 1.25 * width(wilson)


def test_class_bootstrap_covers_the_truth_where_wilson_does_not():
    rng = np.random.default_rng(123)
    p, runs = 0.4, 200
    boot = wil = 0
    for i in range(runs):
        hits = clustered(rng, 10, 20, p, icc=0.3)
        boot += class_bootstrap(hits, resamples=500, seed=i).covers(p)
        lo, hi = wilson_interval(int(hits.sum()), hits.size)
        wil += lo <= p <= hi
    assert boot / runs >= 0.88
    assert wil / runs <= 0.7


def test_bootstrap_is_deterministic_given_a_seed_and_accepts_tensors():
    hits = clustered(np.random.default_rng(0), 8, 10, 0.6, 0.2)
    a = class_bootstrap(hits, seed=5)
    assert class_bootstrap(torch.from_numpy(hits), seed=5) == a
    assert class_bootstrap(hits.astype(float), seed=5) == a
    other = class_bootstrap(hits, seed=6)
    assert other.estimate == a.estimate and abs(other.high - a.high) < 0.05


def test_one_class_gives_the_widest_interval_and_is_flagged():
    iv = class_bootstrap(np.ones((1, 50)))
    assert (iv.low, iv.high) == (0.0, 1.0) and iv.degenerate and iv.note
    assert paired_difference(np.ones((1, 5)), np.zeros((1, 5))).to_dict()["low"] == -1.0


def test_identical_classes_fall_back_to_wilson_not_to_a_point():
    iv = class_bootstrap(np.zeros((10, 20)))
    assert iv.degenerate and iv.low == 0.0 and iv.high == pytest.approx(wilson_interval(0, 200)[1], rel=1e-4)
    assert iv.high > 0.01


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="classes, images"):
        class_bootstrap(np.ones(10))
    with pytest.raises(ValueError, match="same classes"):
        paired_difference(np.ones((3, 4)), np.ones((4, 4)))
    with pytest.raises(ValueError, match="resamples"):
        class_bootstrap(np.ones((3, 4)), resamples=10)
    with pytest.raises(ValueError, match="NaN"):
        class_bootstrap(np.full((3, 4), np.nan))


def test_paired_difference_cancels_shared_class_difficulty():
    rng = np.random.default_rng(7)
    a = clustered(rng, 12, 20, 0.5, icc=0.5)
    # b: the same classes, a defence that removes about 30 % of each class's hits
    b = a & (rng.random(a.shape) > 0.3)
    paired = paired_difference(a, b, seed=0)
    ia, ib = class_bootstrap(a, seed=1), class_bootstrap(b, seed=2)
    unpaired_width = (ib.high - ia.low) - (ib.low - ia.high)
    assert paired.estimate == pytest.approx(b.mean() - a.mean())
    assert paired.high < 0  # the drop is significant
    assert width((paired.low, paired.high)) < 0.5 * unpaired_width
    # a model against itself: the difference is exactly zero, the interval honest about it
    same = paired_difference(a, a)
    assert same.estimate == 0 and same.degenerate and same.low < 0 < same.high


def test_paired_difference_covers_zero_when_models_do_not_differ():
    rng = np.random.default_rng(3)
    covered = 0
    for i in range(100):
        rates = rng.beta(1, 1, 10)[:, None]  # shared class difficulty, independent images
        a, b = rng.random((10, 20)) < rates, rng.random((10, 20)) < rates
        covered += paired_difference(a, b, resamples=500, seed=i).covers(0.0)
    assert covered >= 88


def test_pooled_seeds_keep_the_class_as_the_unit():
    rng = np.random.default_rng(11)
    runs = [clustered(rng, 10, 20, 0.5, 0.3) for _ in range(3)]
    pooled = pool_seeds(runs)
    assert pooled.shape == (10, 60)
    iv = class_bootstrap(pooled)
    assert iv.classes == 10 and iv.estimate == pytest.approx(np.mean([r.mean() for r in runs]))
    # a perfectly repeatable attack: three seeds add no information about other classes
    one = clustered(rng, 10, 20, 0.5, 0.9)
    assert class_bootstrap(pool_seeds([one, one, one])).high == pytest.approx(class_bootstrap(one).high, abs=0.01)
    with pytest.raises(ValueError, match="same classes"):
        pool_seeds([np.ones((3, 2)), np.ones((4, 2))])


def test_chance_level_and_significance():
    assert chance_level(5) == 0.2 and chance_level(5, k=5) == 1.0 and chance_level(530, 5) == pytest.approx(5 / 530)
    iv = Interval(0.02, 0.0, 0.07, 0.95, "test", 5, 80, 2000)
    assert below_chance(iv, 0.2) and not above_chance(iv, 0.2)
    iv = Interval(0.5, 0.3, 0.7, 0.95, "test", 5, 80, 2000)
    assert above_chance(iv, 0.2) and not below_chance(iv, 0.2) and not below_chance(iv, 0.5)


def test_gate_decides_on_the_upper_end():
    iv = Interval(0.25, 0.15, 0.38, 0.95, "test", 10, 200, 2000)
    passed, reason = gate_decision(iv, 0.30)
    assert not passed and "upper end" in reason  # the estimate alone would have passed
    assert gate_decision(iv, 0.38)[0] and not gate_decision(iv, 0.2)[0]
    with pytest.raises(ValueError):
        gate_decision(iv, 30)


def test_a_failed_attack_is_inconclusive_and_never_passes():
    # the case: 5 classes, attack accuracy 2 %, the target ranking class 2 first on 17 % of its crops
    hits = np.zeros((5, 20), dtype=bool)
    hits[0, :2] = True
    iv = class_bootstrap(hits)
    conf = np.full((5, 20), 0.6)
    conf[2] = 0.17
    v = verdict(iv, 1.0, chance=chance_level(5), reached=conf)
    assert v.status == "inconclusive" and not v.passed and "did not reach" in v.reason
    assert unreached_classes(conf) == [2] and unreached_classes([0.9, float("nan")]) == [1]
    # confident target but accuracy far below chance: the evaluator files them elsewhere
    v = verdict(iv, 1.0, chance=0.2, reached=np.full(5, 0.9))
    assert v.status == "inconclusive" and "below chance" in v.reason and not v.to_dict()["passed"]
    # one class: no interval worth the name
    v = verdict(class_bootstrap(np.ones((1, 20))), 1.0, chance=0.2, reached=[0.9])
    assert v.status == "inconclusive"


def test_verdict_leaky_and_passes():
    conf = np.full(10, 0.95)
    hot = np.zeros((10, 20), dtype=bool)
    hot[:8] = True
    assert verdict(class_bootstrap(hot), 0.5, chance=0.1, reached=conf).status == "leaky"
    rng = np.random.default_rng(2)
    cool = rng.random((10, 20)) < 0.12
    iv = class_bootstrap(cool)
    v = verdict(iv, 0.3, chance=0.1, reached=conf)
    assert v.status == "passes" and v.passed and iv.high <= 0.3


def test_t_quantile_and_expanded_tail():
    assert t_quantile(0.975, 1) == pytest.approx(12.7062, abs=1e-4)
    assert t_quantile(0.975, 2) == pytest.approx(4.3027, abs=1e-4)
    assert t_quantile(0.975, 9) == pytest.approx(2.2622, abs=1e-3)
    assert t_quantile(0.975, 1000) == pytest.approx(1.9623, abs=1e-3)
    assert expanded_tail(0.95, 10) == pytest.approx(0.0085, abs=5e-4)
    assert expanded_tail(0.95, 10_000) == pytest.approx(0.025, abs=1e-3)
