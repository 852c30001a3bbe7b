"""EER / minDCF against a brute-force threshold sweep (ties included), bootstrap CI, cosine and AS-norm."""

from __future__ import annotations

import numpy as np
import pytest

from lsv_core.metrics import as_norm, bootstrap_eer_ci, compute_eer, compute_min_dcf, cosine_scores


def brute_force_curves(scores: np.ndarray, labels: np.ndarray) -> list[tuple[float, float]]:
    """(P_miss, P_fa) at each threshold: every distinct score and +inf, counted one trial at a time."""
    points = []
    for thr in sorted(set(scores.tolist())) + [np.inf]:
        miss = sum(1 for s, y in zip(scores, labels, strict=True) if y == 1 and s < thr)
        fa = sum(1 for s, y in zip(scores, labels, strict=True) if y == 0 and s >= thr)
        points.append((miss / labels.sum(), fa / (len(labels) - labels.sum())))
    return points


def brute_force_eer(scores: np.ndarray, labels: np.ndarray) -> float:
    pts = brute_force_curves(scores, labels)
    for (m0, f0), (m1, f1) in zip(pts, pts[1:], strict=False):
        if m1 - f1 >= 0 > m0 - f0:
            t = (f0 - m0) / ((m1 - f1) - (m0 - f0))
            return 100 * (m0 + t * (m1 - m0))
    m, f = pts[0]
    assert m >= f
    return 100 * m


def brute_force_min_dcf(scores: np.ndarray, labels: np.ndarray, p: float) -> float:
    return min(p * m + (1 - p) * f for m, f in brute_force_curves(scores, labels)) / min(p, 1 - p)


@pytest.mark.parametrize("seed", range(12))
def test_eer_and_min_dcf_match_brute_force_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(8, 60))
    labels = (rng.random(n) < 0.4).astype(int)
    labels[:2] = [0, 1]
    # Coarse rounding makes many tied scores, some across the two classes.
    scores = np.round(rng.standard_normal(n) + labels * rng.uniform(0, 2), 1)
    assert compute_eer(scores, labels) == pytest.approx(brute_force_eer(scores, labels), abs=1e-9)
    for p in (0.01, 0.05, 0.5):
        assert compute_min_dcf(scores, labels, p) == pytest.approx(brute_force_min_dcf(scores, labels, p), abs=1e-9)


def test_eer_extremes_and_units() -> None:
    assert compute_eer([0.1, 0.9], [0, 1]) == 0.0
    assert compute_eer([0.9, 0.1], [0, 1]) == 100.0
    assert compute_eer([0.5, 0.5, 0.5, 0.5], [0, 1, 0, 1]) == pytest.approx(50.0)
    rng = np.random.default_rng(0)
    y = (rng.random(20000) < 0.5).astype(int)
    s = rng.standard_normal(20000) + 2 * y
    # Two unit-variance Gaussians 2 apart: EER = Phi(-1) = 15.87 %.
    assert compute_eer(s, y) == pytest.approx(15.87, abs=0.8)


def test_metric_input_errors() -> None:
    with pytest.raises(ValueError, match="both target"):
        compute_eer([1, 2], [1, 1])
    with pytest.raises(ValueError, match="NaN"):
        compute_eer([np.nan, 1], [0, 1])
    with pytest.raises(ValueError, match="differ in length"):
        compute_eer([1, 2, 3], [0, 1])
    with pytest.raises(ValueError, match="p_target"):
        compute_min_dcf([1, 2], [0, 1], p_target=1.5)


def test_bootstrap_ci_covers_and_shrinks() -> None:
    rng = np.random.default_rng(1)

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = (rng.random(n) < 0.3).astype(int)
        return rng.standard_normal(n) + 2.5 * y, y

    small = bootstrap_eer_ci(*draw(1000), n_boot=300, seed=0)
    large = bootstrap_eer_ci(*draw(30000), n_boot=300, seed=0)
    for ci in (small, large):
        assert ci.low <= ci.eer <= ci.high
    assert (large.high - large.low) < (small.high - small.low) / 3
    assert large.low < 10.56 < large.high  # Phi(-1.25)


def test_bootstrap_is_seeded() -> None:
    rng = np.random.default_rng(2)
    y = (rng.random(500) < 0.3).astype(int)
    s = rng.standard_normal(500) + 2 * y
    assert bootstrap_eer_ci(s, y, n_boot=100, seed=3) == bootstrap_eer_ci(s, y, n_boot=100, seed=3)


def test_cosine_scores() -> None:
    a = np.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    b = np.array([[3.0, 0.0], [1.0, 0.0], [-1.0, -1.0]])
    np.testing.assert_allclose(cosine_scores(a, b), [1.0, 0.0, -1.0])


def test_as_norm_matches_its_definition() -> None:
    rng = np.random.default_rng(0)
    d, n_spk = 16, 40
    centres = rng.standard_normal((n_spk, d))
    cohort = rng.standard_normal((200, d))
    e = centres[:, None, :] + 0.9 * rng.standard_normal((n_spk, 6, d))
    enroll, test, labels = [], [], []
    for i in range(n_spk):
        for j in range(n_spk):
            enroll.append(e[i, 0])
            test.append(e[j, 1])
            labels.append(int(i == j))
    enroll, test, labels = np.array(enroll), np.array(test), np.array(labels)
    raw = cosine_scores(enroll, test)
    normed = as_norm(raw, enroll, test, cohort, top_k=50)
    # Definition check on one trial.
    c = cohort / np.linalg.norm(cohort, axis=1, keepdims=True)

    def side(x: np.ndarray) -> tuple[float, float]:
        top = np.sort(c @ (x / np.linalg.norm(x)))[-50:]
        return top.mean(), top.std()

    (me, se), (mt, st) = side(enroll[5]), side(test[5])
    expect = 0.5 * ((raw[5] - me) / se + (raw[5] - mt) / st)
    assert normed[5] == pytest.approx(expect, rel=1e-5)
    with pytest.raises(ValueError, match="cohort"):
        as_norm(raw, enroll, test, cohort[:1])
