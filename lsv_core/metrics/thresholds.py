"""Decision thresholds at an operating point: the score above which a trial is accepted as "same speaker".

Same convention as :mod:`lsv_core.metrics.eer`: a trial is accepted when ``score >= threshold``, and the
operating points are the distinct scores plus +inf. A deployed model needs the threshold itself, not
only the error rate, so these functions return both the threshold and the error rates it gives on the
trials it was chosen on (fractions, not percent).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from lsv_core.metrics.eer import _as_arrays

__all__ = ["OperatingPoint", "eer_threshold", "min_dcf_threshold"]


@dataclass(frozen=True)
class OperatingPoint:
    """A threshold and what it does on the trials it was chosen on.

    ``p_miss``/``p_fa`` are fractions (0-1) of targets rejected / nontargets accepted with
    ``score >= threshold``; ``n_target``/``n_nontarget`` count the trials.
    """

    name: str
    threshold: float
    p_miss: float
    p_fa: float
    n_target: int
    n_nontarget: int
    p_target: float | None = None  # for a DCF point

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _curves(s: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct thresholds (ascending, then +inf) and P_miss, P_fa at each."""
    order = np.argsort(s, kind="stable")
    s, y = s[order], y[order]
    first = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
    cum_t = np.r_[0, np.cumsum(y)]
    cum_n = np.r_[0, np.cumsum(~y)]
    idx = np.r_[first, s.size]
    thresholds = np.r_[s[first], np.inf]
    return thresholds, cum_t[idx] / cum_t[-1], (cum_n[-1] - cum_n[idx]) / cum_n[-1]


def _point(name: str, threshold: float, s: np.ndarray, y: np.ndarray, p_target: float | None = None) -> OperatingPoint:
    accept = s >= threshold
    return OperatingPoint(name, float(threshold), p_miss=float(np.mean(~accept[y])), p_fa=float(np.mean(accept[~y])),
                          n_target=int(y.sum()), n_nontarget=int((~y).sum()), p_target=p_target)


def eer_threshold(scores: object, labels: object) -> OperatingPoint:
    """The threshold at the equal error rate.

    :func:`lsv_core.metrics.compute_eer` places the EER where the piecewise-linear (P_fa, P_miss) curve
    crosses the diagonal, between two neighbouring operating points; the threshold is interpolated
    between their scores by the same fraction (unseen scores fall between the trial scores too).
    """
    s, y = _as_arrays(scores, labels)
    t, p_miss, p_fa = _curves(s, y)
    d = p_miss - p_fa
    i = max(int(np.argmax(d >= 0)), 1)
    frac = -d[i - 1] / (d[i] - d[i - 1]) if d[i] > d[i - 1] else 0.0
    threshold = t[i - 1] if not np.isfinite(t[i]) else t[i - 1] + frac * (t[i] - t[i - 1])
    return _point("eer", threshold, s, y)


def min_dcf_threshold(scores: object, labels: object, p_target: float = 0.01, c_miss: float = 1.0,
                      c_fa: float = 1.0) -> OperatingPoint:
    """The threshold of the minimum detection cost (as :func:`lsv_core.metrics.compute_min_dcf`).

    Any threshold between the best operating point's score and the next lower distinct score makes the
    same decisions on the trials; the midpoint is returned, the least sensitive to small score changes.
    """
    if not 0.0 < p_target < 1.0:
        raise ValueError(f"p_target={p_target} should be in (0, 1)")
    s, y = _as_arrays(scores, labels)
    t, p_miss, p_fa = _curves(s, y)
    i = int(np.argmin(c_miss * p_target * p_miss + c_fa * (1.0 - p_target) * p_fa))
    if i == 0:
        threshold = t[0]  # accept everything
    elif not np.isfinite(t[i]):
        threshold = np.nextafter(t[i - 1], np.inf)  # reject everything
    else:
        threshold = 0.5 * (t[i - 1] + t[i])
    return _point(f"min_dcf_{p_target:g}", threshold, s, y, p_target=p_target)
