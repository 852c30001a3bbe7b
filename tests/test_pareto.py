"""Pareto math against brute force on random point sets with many ties and duplicates (small integer grids)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from search.results.pareto import (
    TrialPoint,
    best_eer_with_size_at_most,
    hypervolume,
    hypervolume_history,
    knee_point,
    pareto_front,
    pareto_ranks,
    reference_point,
    smallest_with_eer_at_most,
)


def dominates(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return a[0] <= b[0] and a[1] <= b[1] and (a[0] < b[0] or a[1] < b[1])


def brute_front(pts: list[tuple[float, float]]) -> set[int]:
    return {i for i, p in enumerate(pts) if not any(dominates(q, p) for q in pts)}


def brute_ci_front(pts: list[tuple[float, float, float, float]]) -> set[int]:
    return {i for i, b in enumerate(pts) if not any(a[1] <= b[1] and a[3] < b[2] for a in pts)}


def brute_hypervolume(pts: list[tuple[float, float]], ref: tuple[float, float]) -> float:
    """Union of the boxes [size, ref_size] x [eer, ref_eer], by coordinate compression."""
    inside = [p for p in pts if p[0] < ref[0] and p[1] < ref[1]]
    xs = sorted({p[1] for p in inside} | {ref[1]})
    ys = sorted({p[0] for p in inside} | {ref[0]})
    area = 0.0
    for x0, x1 in itertools.pairwise(xs):
        for y0, y1 in itertools.pairwise(ys):
            if any(p[1] <= x0 and p[0] <= y0 for p in inside):
                area += (x1 - x0) * (y1 - y0)
    return area


def random_points(rng: np.random.Generator, n: int, grid: int = 6) -> list[tuple[float, float]]:
    # A coarse grid makes equal sizes, equal EERs and exact duplicates frequent.
    return [(float(rng.integers(0, grid)), float(rng.integers(1, grid + 1) * 100)) for _ in range(n)]


@pytest.mark.parametrize("seed", range(40))
def test_front_and_ranks_match_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    pts = random_points(rng, int(rng.integers(1, 30)))
    front = pareto_front(pts)
    assert set(front) == brute_front(pts)
    # Ordered by size, then EER.
    assert [(pts[i][1], pts[i][0]) for i in front] == sorted((pts[i][1], pts[i][0]) for i in front)
    # Every duplicate of a front point is on the front.
    for i in front:
        assert {j for j, p in enumerate(pts) if p == pts[i]} <= set(front)
    ranks = pareto_ranks(pts)
    left = set(range(len(pts)))
    r = 0
    while left:
        sub = sorted(left)
        layer = {sub[k] for k in brute_front([pts[i] for i in sub])}
        assert {i for i in left if ranks[i] == r} == layer
        left -= layer
        r += 1


@pytest.mark.parametrize("seed", range(30))
def test_ci_front_matches_brute_force_and_contains_plain_front(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    base = random_points(rng, int(rng.integers(1, 25)))
    pts = []
    for e, s in base:
        half = float(rng.integers(0, 3))
        pts.append((e, s, e - half, e + half))
    ci_front = pareto_front(pts, ci=True)
    assert set(ci_front) == brute_ci_front(pts)
    assert set(pareto_front([p[:2] for p in pts])) <= set(ci_front)
    # Explicit intervals give the same answer as the points' own.
    assert pareto_front([p[:2] for p in pts], ci=[(p[2], p[3]) for p in pts]) == ci_front
    # Zero-width intervals: a point is CI-dominated iff a no-bigger point has a strictly lower EER.
    zero = pareto_front([p[:2] for p in pts], ci=[(p[0], p[0]) for p in pts])
    assert set(zero) == brute_ci_front([(e, s, e, e) for e, s, _, _ in pts])
    ranks = pareto_ranks(pts, ci=True)
    assert {i for i, r in enumerate(ranks) if r == 0} == set(ci_front)


def test_ci_dominance_needs_separated_intervals() -> None:
    small_worse = TrialPoint(0, eer=3.0, size_bytes=100, eer_ci_low=2.0, eer_ci_high=4.0)
    big_better = TrialPoint(1, eer=2.5, size_bytes=200, eer_ci_low=1.5, eer_ci_high=3.5)
    big_worse = TrialPoint(2, eer=6.0, size_bytes=200, eer_ci_low=5.0, eer_ci_high=7.0)
    pts = [small_worse, big_better, big_worse]
    assert pareto_front(pts) == [0, 1]
    assert pareto_front(pts, ci=True) == [0, 1]  # 2 is worse beyond both intervals: dominated
    overlapping = TrialPoint(3, eer=5.0, size_bytes=200, eer_ci_low=3.9, eer_ci_high=6.0)
    assert pareto_front([small_worse, overlapping], ci=True) == [0, 1]
    assert pareto_front([small_worse, overlapping]) == [0]
    with pytest.raises(ValueError, match="eer_ci_low"):
        pareto_front([TrialPoint(0, 1.0, 10, eer_ci_low=2.0, eer_ci_high=1.0)], ci=True)
    with pytest.raises(ValueError, match="2 intervals for 3 points"):
        pareto_front(pts, ci=[(0, 1), (0, 1)])


@pytest.mark.parametrize("seed", range(40))
def test_hypervolume_matches_brute_force(seed: int) -> None:
    rng = np.random.default_rng(200 + seed)
    pts = random_points(rng, int(rng.integers(0, 25)))
    ref = (float(rng.integers(3, 8)), float(rng.integers(3, 8) * 100))
    assert hypervolume(pts, ref) == pytest.approx(brute_hypervolume(pts, ref), abs=1e-9)
    assert hypervolume(pts, ref, size_scale=ref[1]) == pytest.approx(brute_hypervolume(pts, ref) / ref[1], abs=1e-12)
    history = hypervolume_history(pts, ref)
    assert len(history) == len(pts)
    assert all(b >= a - 1e-12 for a, b in itertools.pairwise(history))  # never decreases
    for k in range(len(pts)):
        assert history[k] == pytest.approx(brute_hypervolume(pts[: k + 1], ref), abs=1e-9)


def test_hypervolume_by_hand_and_reference() -> None:
    # Staircase by size: [0.5,1] x [5,10] + [1,2] x [2,10] + [2,4] x [1,10] = 2.5 + 8 + 18 (EER x bytes).
    assert hypervolume([(2.0, 1.0), (1.0, 2.0), (1.0, 2.0), (5.0, 0.5)], (10.0, 4.0)) == pytest.approx(28.5)
    assert hypervolume([], (10.0, 4.0)) == 0.0
    assert hypervolume([(10.0, 1.0), (2.0, 4.0)], (10.0, 4.0)) == 0.0  # on the reference: nothing
    assert reference_point([(3.0, 10)], fp32_bytes=1000, baseline_eer=2.0) == (4.0, 1000.0)
    assert reference_point([(3.0, 10), (5.0, 20)], fp32_bytes=1000) == (pytest.approx(5.5), 1000.0)
    with pytest.raises(ValueError, match="size_scale"):
        hypervolume([(1.0, 1.0)], (2.0, 2.0), size_scale=0)


def brute_knee(pts: list[tuple[float, float]]) -> set[int]:
    """Every index that may be the knee: farthest (normalised) from the extremes' line, before tie-breaks."""
    front = sorted(brute_front(pts))
    es, ss = [pts[i][0] for i in front], [pts[i][1] for i in front]
    if max(es) == min(es) or max(ss) == min(ss):
        return set(front)
    d = {i: abs((pts[i][1] - min(ss)) / (max(ss) - min(ss)) + (pts[i][0] - min(es)) / (max(es) - min(es)) - 1)
         for i in front}
    best = max(d.values())
    return {i for i in front if d[i] >= best - 1e-9}


@pytest.mark.parametrize("seed", range(40))
def test_knee_matches_brute_force(seed: int) -> None:
    rng = np.random.default_rng(300 + seed)
    pts = random_points(rng, int(rng.integers(1, 30)), grid=10)
    knee = knee_point(pts)
    assert knee is not None and knee in brute_knee(pts)
    assert knee_point([]) is None


def test_knee_of_an_l_shaped_front() -> None:
    pts = [(10.0, 1.0), (1.1, 2.0), (1.0, 10.0), (9.0, 9.0)]
    assert knee_point(pts) == 1
    # Duplicates: the first copy is returned.
    assert knee_point([(5.0, 5.0), (5.0, 5.0)]) == 0
    assert knee_point([(2.0, 1.0), (1.0, 2.0)]) == 1  # both on the line: the more accurate one


@pytest.mark.parametrize("seed", range(20))
def test_queries_match_brute_force(seed: int) -> None:
    rng = np.random.default_rng(400 + seed)
    pts = random_points(rng, int(rng.integers(1, 25)))
    for limit in (0.0, 2.0, 3.5, 10.0):
        ok = [i for i, p in enumerate(pts) if p[0] <= limit]
        want = min(ok, key=lambda i: (pts[i][1], pts[i][0], i)) if ok else None
        assert smallest_with_eer_at_most(pts, limit) == want
    for limit in (50.0, 100.0, 350.0, 1e9):
        ok = [i for i, p in enumerate(pts) if p[1] <= limit]
        want = min(ok, key=lambda i: (pts[i][0], pts[i][1], i)) if ok else None
        assert best_eer_with_size_at_most(pts, limit) == want


def test_points_are_validated() -> None:
    with pytest.raises(ValueError, match="points\\[1\\]"):
        pareto_front([(1.0, 2.0), (1.0, 2.0, 3.0)])
    with pytest.raises(ValueError, match="non-finite"):
        pareto_front([(math.nan, 2.0)])
    assert pareto_front([]) == [] and pareto_ranks([]) == []
