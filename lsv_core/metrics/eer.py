"""Detection metrics for speaker verification: EER (percent), normalised minDCF, bootstrap CI.

Convention: a trial is accepted when ``score >= threshold``; higher scores mean "same speaker".
Thresholds sweep every distinct score (tied scores move together) plus +inf, so ties are handled
exactly. The EER is where the piecewise-linear (P_fa, P_miss) curve through those operating points
crosses P_fa = P_miss.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def _as_arrays(scores: object, labels: object) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels).ravel()
    if s.shape != y.shape:
        raise ValueError(f"scores and labels differ in length: {s.shape[0]} vs {y.shape[0]}")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores contain NaN or Inf")
    if not np.all((y == 0) | (y == 1)):
        raise ValueError("labels must be 0 (nontarget) or 1 (target)")
    y = y.astype(bool)
    if y.all() or not y.any():
        raise ValueError("need both target (1) and nontarget (0) trials")
    return s, y


def _sweep(s_sorted: np.ndarray, y_sorted: np.ndarray, w: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """P_miss and P_fa at each threshold: every distinct score (ascending), then +inf.

    ``w`` are per-trial weights (bootstrap multiplicities); None means 1 each. Shapes: (..., n) -> (..., k+1).
    """
    first = np.flatnonzero(np.r_[True, s_sorted[1:] != s_sorted[:-1]])
    w_t = y_sorted.astype(np.float64) if w is None else w * y_sorted
    w_n = (~y_sorted).astype(np.float64) if w is None else w * ~y_sorted
    zeros = np.zeros(w_t.shape[:-1] + (1,))
    cum_t = np.concatenate([zeros, np.cumsum(w_t, axis=-1)], axis=-1)
    cum_n = np.concatenate([zeros, np.cumsum(w_n, axis=-1)], axis=-1)
    idx = np.r_[first, s_sorted.shape[0]]
    tot_t, tot_n = cum_t[..., -1:], cum_n[..., -1:]
    p_miss = cum_t[..., idx] / tot_t  # targets strictly below the threshold are rejected
    p_fa = (tot_n - cum_n[..., idx]) / tot_n  # nontargets at or above it are accepted
    return p_miss, p_fa


def _eer_from_curves(p_miss: np.ndarray, p_fa: np.ndarray) -> np.ndarray:
    # p_miss rises and p_fa falls along the sweep; find the first point with p_miss >= p_fa and
    # intersect the segment from the previous point with the diagonal.
    d = p_miss - p_fa
    i = np.argmax(d >= 0, axis=-1)
    i = np.maximum(i, 1)
    take = lambda a, j: np.take_along_axis(a, j[..., None], axis=-1)[..., 0]  # noqa: E731
    d0, d1 = take(d, i - 1), take(d, i)
    m0, m1 = take(p_miss, i - 1), take(p_miss, i)
    denom = d1 - d0
    frac = np.where(denom > 0, -d0 / np.where(denom > 0, denom, 1.0), 0.0)
    return m0 + frac * (m1 - m0)


def compute_eer(scores: object, labels: object) -> float:
    """Equal error rate in percent (0-100). ``labels``: 1 = target (same speaker), 0 = nontarget."""
    s, y = _as_arrays(scores, labels)
    order = np.argsort(s, kind="stable")
    p_miss, p_fa = _sweep(s[order], y[order])
    return float(_eer_from_curves(p_miss, p_fa) * 100.0)


def compute_min_dcf(scores: object, labels: object, p_target: float = 0.01, c_miss: float = 1.0,
                    c_fa: float = 1.0) -> float:
    """Minimum detection cost, normalised by the cost of the best trivial system (NIST SRE form)."""
    if not 0.0 < p_target < 1.0:
        raise ValueError(f"p_target={p_target} should be in (0, 1)")
    s, y = _as_arrays(scores, labels)
    order = np.argsort(s, kind="stable")
    p_miss, p_fa = _sweep(s[order], y[order])
    dcf = c_miss * p_target * p_miss + c_fa * (1.0 - p_target) * p_fa
    return float(dcf.min() / min(c_miss * p_target, c_fa * (1.0 - p_target)))


@dataclass(frozen=True)
class EerInterval:
    eer: float
    low: float
    high: float
    n_boot: int


def bootstrap_eer_ci(scores: object, labels: object, *, n_boot: int = 1000, alpha: float = 0.05,
                     seed: int = 0) -> EerInterval:
    """EER (percent) with a percentile bootstrap interval, resampling targets and nontargets separately.

    Scores are sorted once; each replicate is a vector of multiplicities over the sorted trials, so a
    replicate costs one cumulative sum rather than a sort.
    """
    s, y = _as_arrays(scores, labels)
    order = np.argsort(s, kind="stable")
    s, y = s[order], y[order]
    rng = np.random.default_rng(seed)
    tgt, non = np.flatnonzero(y), np.flatnonzero(~y)
    eers = np.empty(n_boot)
    chunk = max(1, min(n_boot, 4_000_000 // s.size))
    for start in range(0, n_boot, chunk):
        b = min(chunk, n_boot - start)
        w = np.zeros((b, s.size))
        for group in (tgt, non):
            draws = rng.integers(0, group.size, size=(b, group.size))
            flat = (np.arange(b)[:, None] * group.size + draws).ravel()
            w[:, group] = np.bincount(flat, minlength=b * group.size).reshape(b, group.size)
        p_miss, p_fa = _sweep(s, y, w)
        eers[start : start + b] = _eer_from_curves(p_miss, p_fa) * 100.0
    p_miss, p_fa = _sweep(s, y)
    eer = float(_eer_from_curves(p_miss, p_fa) * 100.0)
    low, high = np.quantile(eers, [alpha / 2, 1 - alpha / 2])
    return EerInterval(eer, float(low), float(high), n_boot)
