"""The (EER, size) trade-off of a study: Pareto front, non-dominated ranks, hypervolume, knee, queries.

Both objectives are minimised: EER in percent and the deployable model size in bytes (``model.onnx``). The
math is pure functions over a sequence of points; a point is a :class:`TrialPoint` (what
:func:`search.results.reading.load_points` reads from a study), or a plain ``(eer, size_bytes)`` or ``(eer, size_bytes, eer_ci_low, eer_ci_high)`` tuple.
Functions return *indices* into the sequence they were given, so callers keep their own objects.

Conventions (the tests check each one against brute force):

* **Dominance.** ``a`` dominates ``b`` when it is no worse in both objectives and better in one.
  Points equal in both objectives (duplicates: a memoized trial repeats its source's values) do not
  dominate each other, so *every* copy of a front point is on the front (as in Optuna's ``best_trials``).
* **CI-aware dominance** (``ci=...``). ``a`` dominates ``b`` only when ``a`` is no bigger *and* its EER is
  better beyond both bootstrap intervals: ``a.size <= b.size and a.eer_ci_high < b.eer_ci_low``. A point
  without an interval counts as ``[eer, eer]``. When each EER lies inside its interval this front
  contains the plain front: it only keeps points whose EER gap is within the evaluation noise.
* **Hypervolume** is measured in (EER percent) x (size / ``size_scale``); with ``size_scale`` = fp32 bytes
  it is in "EER points x fraction of the fp32 model", comparable across studies of one baseline.
  :func:`reference_point` gives the reference this project uses (see there).
* **Accuracy objective.** A study may minimise the minDCF instead of the EER (``[objectives] accuracy``):
  its points carry ``accuracy = "min_dcf"`` and fronts, ranks, knee and hypervolume use the minDCF
  (without intervals; the CI-aware front and knee, built on the EER's bootstrap, are then the plain ones).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "DEFAULT_LEVEL",
    "TrialPoint",
    "best_eer_with_size_at_most",
    "ci_knee_point",
    "paired_front",
    "significant_front",
    "significantly_better",
    "smallest_not_worse_than",
    "smallest_within_of",
    "hypervolume",
    "hypervolume_history",
    "knee_point",
    "pareto_front",
    "pareto_ranks",
    "reference_point",
    "smallest_with_eer_at_most",
]


@dataclass(frozen=True)
class TrialPoint:
    """One finished trial of a study. EERs are in percent, sizes in bytes (the deployable ``model.onnx``,
    :func:`lsv_core.quant.packed_size_bytes`)."""

    number: int
    eer: float
    size_bytes: int
    eer_ci_low: float | None = None
    eer_ci_high: float | None = None
    min_dcf: float | None = None  # normalised minDCF at the study's p_target (0.01 unless configured)
    compression_ratio: float | None = None
    avg_bits: float | None = None
    recipe: Mapping[str, Any] = field(default_factory=dict)  # layer -> bits or {"bits": 1, "mode": ...}
    seed: str | None = None  # label of an enqueued seed trial, e.g. "uniform-4", "allocator-0.1"
    memoized_from: int | None = None  # trial whose result this one repeats (same recipe, not retrained)
    packed_path: str | None = None
    digest: str | None = None  # BitRecipe.digest() of the recipe
    # EER (percent) on the study's shared bootstrap replicates (lsv_core.metrics.paired): lets any two
    # points of a study, or a point and the fp32 control, be compared by a paired bootstrap.
    eer_boot: tuple[float, ...] | None = field(default=None, repr=False)
    cost_fte: float | None = None  # what this trial cost, in full-trial equivalents (memoized: 0)
    found_after_fte: float | None = None  # the study's total cost when this trial finished (trial order)
    # The study's accuracy objective ([objectives] accuracy): "eer", or "min_dcf" (then ``min_dcf`` is at the
    # study's p_target and fronts, knee and hypervolume use it; intervals and paired tests are the EER's).
    accuracy: str = "eer"

    @property
    def accuracy_value(self) -> float:
        """The accuracy objective's value: the EER (percent) or the minDCF, as ``accuracy`` says."""
        if self.accuracy == "eer":
            return self.eer
        if self.min_dcf is None:
            raise ValueError(f"trial {self.number} has no minDCF, the study's accuracy objective")
        return self.min_dcf


PointLike = TrialPoint | Sequence[float]


# -- coordinates ----------------------------------------------------------------------------------------
def _coords(points: Sequence[PointLike]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(eer, size, ci_low, ci_high)`` arrays; a missing interval is ``[eer, eer]``."""
    n = len(points)
    eer, size = np.empty(n), np.empty(n)
    low, high = np.empty(n), np.empty(n)
    for i, p in enumerate(points):
        if isinstance(p, TrialPoint) and p.accuracy != "eer":
            e, s, lo, hi = p.accuracy_value, p.size_bytes, None, None  # no interval: it is the EER's
        elif isinstance(p, TrialPoint):
            e, s, lo, hi = p.eer, p.size_bytes, p.eer_ci_low, p.eer_ci_high
        else:
            if len(p) not in (2, 4):
                raise ValueError(f"points[{i}]={p!r} should be (eer, size_bytes) or (eer, size_bytes, ci_low, ci_high)")
            e, s = p[0], p[1]
            lo, hi = (p[2], p[3]) if len(p) == 4 else (None, None)
        e, s = float(e), float(s)
        if not (math.isfinite(e) and math.isfinite(s)):
            raise ValueError(f"points[{i}] has a non-finite EER or size: eer={e!r}, size_bytes={s!r}")
        eer[i], size[i] = e, s
        low[i] = e if lo is None or not math.isfinite(float(lo)) else float(lo)
        high[i] = e if hi is None or not math.isfinite(float(hi)) else float(hi)
        if low[i] > high[i]:
            raise ValueError(f"points[{i}] has eer_ci_low={low[i]!r} > eer_ci_high={high[i]!r}")
    return eer, size, low, high


def _intervals(points: Sequence[PointLike], ci: bool | Sequence[tuple[float, float]]) -> tuple[np.ndarray, np.ndarray]:
    if ci is True:
        _, _, low, high = _coords(points)
        return low, high
    pairs = np.asarray(ci, dtype=float).reshape(-1, 2) if len(ci) else np.empty((0, 2))
    if len(pairs) != len(points):
        raise ValueError(f"ci has {len(pairs)} intervals for {len(points)} points; give one (low, high) per point")
    bad = np.flatnonzero(~(pairs[:, 0] <= pairs[:, 1]))
    if len(bad):
        raise ValueError(f"ci[{bad[0]}]={tuple(pairs[bad[0]])} should be a (low, high) interval with low <= high")
    return pairs[:, 0], pairs[:, 1]


# -- fronts and ranks -----------------------------------------------------------------------------------
def _size_groups(order: np.ndarray, size: np.ndarray) -> Iterator[np.ndarray]:
    """Runs of ``order`` (indices sorted by size) that share one size, in ascending size."""
    i = 0
    while i < len(order):
        j = i
        while j < len(order) and size[order[j]] == size[order[i]]:
            j += 1
        yield order[i:j]
        i = j


def _front_mask(eer: np.ndarray, size: np.ndarray) -> np.ndarray:
    """Plain non-dominated mask in O(n log n): sweep sizes upward, tracking the best EER seen so far."""
    mask = np.zeros(len(eer), dtype=bool)
    if not len(eer):
        return mask
    order = np.lexsort((eer, size))  # by size, then EER
    best_smaller = math.inf  # lowest EER among strictly smaller sizes
    for group in _size_groups(order, size):
        group_min = eer[group[0]]
        # Equal EER at a smaller size dominates, hence the strict "<"; inside the group only the
        # lowest EER survives, with all its duplicates.
        if group_min < best_smaller:
            mask[group[eer[group] == group_min]] = True
            best_smaller = group_min
    return mask


def _ci_front_mask(size: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """CI-aware mask: ``b`` is dominated iff some ``a`` with ``a.size <= b.size`` has ``a.high < b.low``."""
    mask = np.ones(len(size), dtype=bool)
    if not len(size):
        return mask
    order = np.argsort(size, kind="stable")
    min_high = math.inf  # lowest upper bound among sizes <= the current one
    for group in _size_groups(order, size):
        min_high = min(min_high, float(high[group].min()))  # "<=" in size: the own size group counts
        mask[group] = ~(min_high < low[group])
    return mask


def pareto_front(points: Sequence[PointLike], *, ci: bool | Sequence[tuple[float, float]] | None = None) -> list[int]:
    """Indices of the non-dominated points, ordered by size (then EER, then index).

    Args:
        points: :class:`TrialPoint` s or ``(eer, size_bytes[, ci_low, ci_high])`` tuples.
        ci: None/False for plain dominance; True for CI-aware dominance with each point's own EER
            interval; or one ``(low, high)`` interval (percent) per point. See the module docstring.
    """
    eer, size, _, _ = _coords(points)
    if ci is None or ci is False:
        mask = _front_mask(eer, size)
    else:
        low, high = _intervals(points, ci)
        mask = _ci_front_mask(size, low, high)
    idx = np.flatnonzero(mask)
    return [int(i) for i in idx[np.lexsort((idx, eer[idx], size[idx]))]]


def pareto_ranks(points: Sequence[PointLike], *, ci: bool | Sequence[tuple[float, float]] | None = None) -> list[int]:
    """Non-dominated sorting: rank 0 is the front, rank 1 the front of what is left, and so on."""
    eer, size, _, _ = _coords(points)
    if ci is not None and ci is not False:
        low, high = _intervals(points, ci)
    ranks = np.full(len(eer), -1)
    left = np.arange(len(eer))
    rank = 0
    while len(left):
        if ci is None or ci is False:
            mask = _front_mask(eer[left], size[left])
        else:
            mask = _ci_front_mask(size[left], low[left], high[left])
        ranks[left[mask]] = rank
        left = left[~mask]
        rank += 1
    return [int(r) for r in ranks]


# -- hypervolume ----------------------------------------------------------------------------------------
def reference_point(points: Sequence[PointLike], *, fp32_bytes: float, baseline_eer: float | None = None) -> tuple[float, float]:
    """The hypervolume reference ``(eer, size_bytes)`` used by this project's reports.

    Size: ``fp32_bytes`` (the unquantized baseline; a quantized model larger than it is worthless).
    EER: twice the fp32 baseline's EER when it is known (a model more than twice as bad as the
    baseline is not a useful trade-off), else 1.1 x the largest EER among ``points``. The reference is
    fixed for a study, so hypervolumes of its prefixes (:func:`hypervolume_history`) are comparable.
    """
    if baseline_eer is not None and math.isfinite(baseline_eer) and baseline_eer > 0:
        return 2.0 * float(baseline_eer), float(fp32_bytes)
    eer, _, _, _ = _coords(points)
    worst = float(eer.max()) if len(eer) else 1.0
    return 1.1 * worst if worst > 0 else 1.0, float(fp32_bytes)


def hypervolume(points: Sequence[PointLike], ref: tuple[float, float], *, size_scale: float = 1.0) -> float:
    """Exact 2-D hypervolume: the area dominated by ``points`` and bounded by ``ref = (eer, size_bytes)``.

    Units: EER percent x (bytes / ``size_scale``); pass ``size_scale=fp32_bytes`` to normalise sizes.
    Points not strictly better than ``ref`` in both objectives add nothing.
    """
    if size_scale <= 0:
        raise ValueError(f"size_scale={size_scale!r} should be > 0 (e.g. the fp32 size in bytes)")
    eer, size, _, _ = _coords(points)
    ref_eer, ref_size = float(ref[0]), float(ref[1])
    inside = (eer < ref_eer) & (size < ref_size)
    eer, size = eer[inside], size[inside]
    front = np.flatnonzero(_front_mask(eer, size))
    # One point per distinct (size, eer) on the front, by size ascending (EER then descends).
    pts = sorted({(float(size[i]), float(eer[i])) for i in front})
    area = 0.0
    for k, (s, e) in enumerate(pts):
        s_next = pts[k + 1][0] if k + 1 < len(pts) else ref_size
        area += (s_next - s) * (ref_eer - e)
    return area / size_scale


def hypervolume_history(points: Sequence[PointLike], ref: tuple[float, float], *, size_scale: float = 1.0) -> list[float]:
    """Hypervolume of ``points[:k+1]`` for each k (give points in trial order): the study's progress."""
    eer, size, _, _ = _coords(points)
    out: list[float] = []
    front: list[tuple[float, float]] = []
    for e, s in zip(eer, size, strict=True):
        front.append((float(e), float(s)))
        front = [front[i] for i in pareto_front(front)]  # keeps the running set small
        out.append(hypervolume(front, ref, size_scale=size_scale))
    return out


# -- knee and queries -----------------------------------------------------------------------------------
def knee_point(points: Sequence[PointLike]) -> int | None:
    """Index of the front point farthest from the line joining the front's two extremes; None if empty.

    Coordinates are min-max normalised over the front (both axes to [0, 1]) so neither unit dominates.
    With one distinct front point that point is the knee; with two (both on the line) the one with the
    lower EER. Ties go to the smaller size, then the lower index (the first of duplicates).
    """
    front = pareto_front(points)
    if not front:
        return None
    eer, size, _, _ = _coords(points)
    e, s = eer[front], size[front]
    e_span, s_span = e.max() - e.min(), s.max() - s.min()
    if e_span == 0 or s_span == 0:  # one distinct point (duplicates only)
        return front[0]
    x, y = (s - s.min()) / s_span, (e - e.min()) / e_span
    # Extremes: the smallest model (x=0, y=1) and the most accurate (x=1, y=0); the line x + y = 1.
    dist = np.abs(x + y - 1.0) / math.sqrt(2.0)
    best = float(dist.max())
    if best <= 1e-12:  # every point on the line: prefer accuracy
        return min(front, key=lambda i: (eer[i], size[i], i))
    candidates = [front[k] for k in range(len(front)) if dist[k] >= best - 1e-12]
    return min(candidates, key=lambda i: (size[i], eer[i], i))


def smallest_with_eer_at_most(points: Sequence[PointLike], max_eer: float) -> int | None:
    """Index of the smallest point with ``eer <= max_eer`` (percent); ties: lower EER, then lower index."""
    eer, size, _, _ = _coords(points)
    ok = [i for i in range(len(eer)) if eer[i] <= max_eer]
    return min(ok, key=lambda i: (size[i], eer[i], i)) if ok else None


def best_eer_with_size_at_most(points: Sequence[PointLike], max_bytes: float) -> int | None:
    """Index of the lowest-EER point with ``size_bytes <= max_bytes``; ties: smaller size, then lower index."""
    eer, size, _, _ = _coords(points)
    ok = [i for i in range(len(eer)) if size[i] <= max_bytes]
    return min(ok, key=lambda i: (eer[i], size[i], i)) if ok else None


# -- CI-aware choices (paired bootstrap) ----------------------------------------------------------------------
DEFAULT_LEVEL = 0.95  # two-sided confidence of "significantly better"


def significantly_better(a: TrialPoint, b: TrialPoint, level: float = DEFAULT_LEVEL) -> bool:
    """Whether ``a``'s EER is lower than ``b``'s beyond the evaluation noise: the paired bootstrap interval of
    ``EER_a - EER_b`` lies below 0 (both carry ``eer_boot``). Without both vectors the separate intervals
    decide (``a.eer_ci_high < b.eer_ci_low``), which is stricter."""
    if a.eer_boot is not None and b.eer_boot is not None and len(a.eer_boot) == len(b.eer_boot):
        from lsv_core.metrics.paired import paired_delta

        return paired_delta(a.eer, a.eer_boot, b.eer, b.eer_boot, level=level).a_better
    a_high = a.eer_ci_high if a.eer_ci_high is not None else a.eer
    b_low = b.eer_ci_low if b.eer_ci_low is not None else b.eer
    return a_high < b_low


def paired_front(points: Sequence[TrialPoint], *, level: float = DEFAULT_LEVEL) -> list[int]:
    """CI-aware front: ``b`` is off it only when some ``a`` no bigger is :func:`significantly_better`.

    It contains the plain front and every point whose gap to it is within the noise. Ordered by size,
    then EER, then index. The paired bootstrap is the EER's: with minDCF as the objective it is the plain front."""
    if any(p.accuracy != "eer" for p in points):
        return sorted(pareto_front(points), key=lambda i: (points[i].size_bytes, points[i].accuracy_value, i))
    size = np.array([p.size_bytes for p in points], dtype=float)
    eer = np.array([p.eer for p in points], dtype=float)
    keep = []
    for j, b in enumerate(points):
        rivals = [i for i in range(len(points)) if i != j and size[i] <= size[j] and eer[i] < eer[j]]
        if not any(significantly_better(points[i], b, level) for i in rivals):
            keep.append(j)
    return sorted(keep, key=lambda i: (size[i], eer[i], i))


def significant_front(points: Sequence[TrialPoint], *, level: float = DEFAULT_LEVEL) -> list[int]:
    """The front thinned to the steps the noise cannot explain: the plain-front points that are
    :func:`significantly_better` than *every* strictly smaller point (the smallest front point always
    qualifies). Each one is a model no smaller model matches within the evaluation noise, so these are the
    sizes worth choosing between; a front point left out has a smaller model as good as it, as far as the
    evaluation can tell. Ordered by size, then EER, then index. Duplicates of a kept point are kept too."""
    front = pareto_front(points)
    size = np.array([p.size_bytes for p in points], dtype=float)
    keep = []
    for j in front:
        smaller = [i for i in range(len(points)) if size[i] < size[j]]
        if all(significantly_better(points[j], points[i], level) for i in smaller):
            keep.append(j)
    return keep


def ci_knee_point(points: Sequence[TrialPoint], *, level: float = DEFAULT_LEVEL) -> int | None:
    """The knee, made CI-aware: the smallest point that is not significantly worse than the plain knee
    (:func:`knee_point`); a bigger model is only worth it when the noise cannot explain its gain."""
    knee = knee_point(points)
    if knee is None or any(p.accuracy != "eer" for p in points):  # intervals are the EER's
        return knee
    equal = [i for i in paired_front(points, level=level)
             if points[i].size_bytes <= points[knee].size_bytes
             and not significantly_better(points[knee], points[i], level)]
    return min(equal, key=lambda i: (points[i].size_bytes, points[i].eer, i)) if equal else knee


def smallest_not_worse_than(points: Sequence[TrialPoint], reference: TrialPoint, *,
                            level: float = DEFAULT_LEVEL) -> int | None:
    """The smallest point not significantly worse than ``reference`` (e.g. the fp32 control); ties: lower
    EER, then lower index. None if every point is significantly worse."""
    ok = [i for i, p in enumerate(points) if not significantly_better(reference, p, level)]
    return min(ok, key=lambda i: (points[i].size_bytes, points[i].eer, i)) if ok else None


def smallest_within_of(points: Sequence[TrialPoint], reference: TrialPoint, margin: float, *,
                       level: float = DEFAULT_LEVEL) -> int | None:
    """The smallest point whose EER is within ``margin`` points of ``reference``'s with confidence: the upper
    end of the paired interval of ``EER - EER_reference`` is at most ``margin`` (without bootstrap vectors:
    ``eer_ci_high - reference.eer``)."""
    from lsv_core.metrics.paired import paired_delta

    def upper(p: TrialPoint) -> float:
        if p.eer_boot is not None and reference.eer_boot is not None and len(p.eer_boot) == len(reference.eer_boot):
            return paired_delta(p.eer, p.eer_boot, reference.eer, reference.eer_boot, level=level).high
        return (p.eer_ci_high if p.eer_ci_high is not None else p.eer) - reference.eer

    ok = [i for i, p in enumerate(points) if upper(p) <= margin]
    return min(ok, key=lambda i: (points[i].size_bytes, points[i].eer, i)) if ok else None
