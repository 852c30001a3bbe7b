"""Paired bootstrap and CI-aware choices against brute force."""

from __future__ import annotations

import numpy as np
import pytest

from lsv_core.metrics import bootstrap_eer_ci, compute_eer
from lsv_core.metrics.paired import bootstrap_eers, paired_delta, replicate_weights
from search.results.pareto import (
    TrialPoint,
    ci_knee_point,
    knee_point,
    paired_front,
    pareto_front,
    significantly_better,
    smallest_not_worse_than,
    smallest_within_of,
)


def _scores(n: int = 600, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.3).astype(int)
    return y * 1.5 + rng.standard_normal(n), y


def test_bootstrap_eers_equal_brute_force_resampling() -> None:
    s, y = _scores()
    boot = bootstrap_eers(s, y, n_boot=25, seed=7)
    w = replicate_weights(y, 25, 7)
    for b in range(25):
        reps = w[b].astype(int)
        assert reps[y == 1].sum() == (y == 1).sum() and reps[y == 0].sum() == (y == 0).sum()  # stratified
        brute = compute_eer(np.repeat(s, reps), np.repeat(y, reps))
        assert boot[b] == pytest.approx(brute, abs=1e-9)
    # The replicates depend on the labels and the seed only: another model sees the same ones.
    assert np.array_equal(replicate_weights(y, 25, 7), w) and not np.array_equal(replicate_weights(y, 25, 8), w)


def test_paired_delta_is_the_quantile_of_replicate_differences() -> None:
    s, y = _scores(seed=1)
    rng = np.random.default_rng(5)
    other = s + 0.4 * rng.standard_normal(s.size)
    a, b = bootstrap_eers(s, y, n_boot=200, seed=3), bootstrap_eers(other, y, n_boot=200, seed=3)
    d = paired_delta(compute_eer(s, y), a, compute_eer(other, y), b, level=0.9)
    low, high = np.quantile(a - b, [0.05, 0.95])
    assert (d.low, d.high) == (pytest.approx(low), pytest.approx(high))
    assert d.delta == pytest.approx(compute_eer(s, y) - compute_eer(other, y))
    assert d.p_a_better == pytest.approx(np.mean(a < b))
    with pytest.raises(ValueError, match="differ"):
        paired_delta(1.0, a, 1.0, b[:10])


def test_pairing_sees_a_difference_the_separate_intervals_hide() -> None:
    """B is A with extra noise on the same trials: slightly worse. The separate 95 % intervals overlap; the
    paired interval, which cancels the trials' shared difficulty, is entirely above 0."""
    rng = np.random.default_rng(0)
    n = 4000
    y = (rng.random(n) < 0.25).astype(int)
    a = y * 2.0 + rng.standard_normal(n)
    b = a + 0.35 * rng.standard_normal(n)
    ia, ib = bootstrap_eer_ci(a, y, n_boot=300, seed=1), bootstrap_eer_ci(b, y, n_boot=300, seed=1)
    assert ib.low < ia.high  # indistinguishable by separate intervals
    d = paired_delta(ib.eer, bootstrap_eers(b, y, n_boot=300, seed=1), ia.eer, bootstrap_eers(a, y, n_boot=300, seed=1))
    assert d.a_worse and d.low > 0


def _points(seed: int, n: int = 14) -> list[TrialPoint]:
    """Points on a small grid with shared-noise bootstrap vectors (so pairs can be close or far)."""
    rng = np.random.default_rng(seed)
    common = rng.standard_normal(60)
    pts = []
    for i in range(n):
        eer = float(rng.integers(10, 40)) / 10
        boot = eer + 0.3 * common + float(rng.choice([0.02, 0.3])) * rng.standard_normal(60)
        pts.append(TrialPoint(number=i, eer=eer, size_bytes=int(rng.integers(1, 8)) * 1000,
                              eer_ci_low=eer - 0.5, eer_ci_high=eer + 0.5, eer_boot=tuple(boot)))
    return pts


def _better(a: TrialPoint, b: TrialPoint, level: float = 0.95) -> bool:
    d = np.asarray(a.eer_boot) - np.asarray(b.eer_boot)
    return bool(np.quantile(d, 1 - (1 - level) / 2) < 0)


@pytest.mark.parametrize("seed", range(8))
def test_ci_aware_front_and_selectors_against_brute_force(seed: int) -> None:
    pts = _points(seed)
    brute = {j for j, b in enumerate(pts)
             if not any(i != j and a.size_bytes <= b.size_bytes and a.eer < b.eer and _better(a, b)
                        for i, a in enumerate(pts))}
    front = paired_front(pts)
    assert set(front) == brute
    assert set(pareto_front(pts)) <= brute  # the plain front is always inside the CI-aware one
    for a in pts:
        for b in pts:
            assert significantly_better(a, b) == _better(a, b)
    control = TrialPoint(number=-1, eer=2.0, size_bytes=10**6, eer_boot=tuple(2.0 + 0.3 * np.random.default_rng(
        seed).standard_normal(60)))
    ok = [i for i, p in enumerate(pts) if not _better(control, p)]
    want = min(ok, key=lambda i: (pts[i].size_bytes, pts[i].eer, i)) if ok else None
    assert smallest_not_worse_than(pts, control) == want
    ups = {i: np.quantile(np.asarray(p.eer_boot) - np.asarray(control.eer_boot), 0.975) for i, p in enumerate(pts)}
    within = [i for i in ups if ups[i] <= 0.5]
    want = min(within, key=lambda i: (pts[i].size_bytes, pts[i].eer, i)) if within else None
    assert smallest_within_of(pts, control, 0.5) == want
    knee = knee_point(pts)
    ci_knee = ci_knee_point(pts)
    assert pts[ci_knee].size_bytes <= pts[knee].size_bytes and not _better(pts[knee], pts[ci_knee])
    smaller = [i for i in front if pts[i].size_bytes < pts[ci_knee].size_bytes and not _better(pts[knee], pts[i])]
    assert not smaller  # nothing smaller is equally good


def test_without_bootstrap_vectors_the_separate_intervals_decide() -> None:
    a = TrialPoint(0, eer=1.0, size_bytes=10, eer_ci_low=0.8, eer_ci_high=1.2)
    b = TrialPoint(1, eer=1.5, size_bytes=20, eer_ci_low=1.1, eer_ci_high=1.9)
    c = TrialPoint(2, eer=2.0, size_bytes=30, eer_ci_low=1.7, eer_ci_high=2.3)
    assert not significantly_better(a, b) and significantly_better(a, c)
    assert paired_front([a, b, c]) == [0, 1]
