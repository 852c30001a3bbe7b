"""Paired bootstrap of EER differences: is model A really better than model B on the same trial list?

Two models scored on the same trials share the trials' difficulty; comparing their separate bootstrap
intervals ignores that and calls many real differences noise (and the reverse when the intervals are
narrow by luck). A *paired* bootstrap resamples the same trials for both models in every replicate.

:func:`bootstrap_eers` returns a model's EER (percent) on ``n_boot`` replicates whose resampled trials
depend only on the labels and ``seed`` (targets and nontargets resampled separately, by their position in
the trial list): every model scored on the same list with the same seed sees the same replicates, so the
vectors of two models can be subtracted replicate by replicate at any later time (:func:`paired_delta`)
without keeping their scores. A study computes one vector per trial in the worker and keeps it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lsv_core.metrics.eer import _as_arrays, _eer_from_curves, _sweep

__all__ = ["PairedDelta", "bootstrap_eers", "paired_delta", "replicate_weights"]


def replicate_weights(labels: object, n_boot: int, seed: int) -> np.ndarray:
    """``(n_boot, n_trials)`` multiplicities of each trial (in list order) in each replicate, stratified
    by label; a function of the labels, ``n_boot`` and ``seed`` only."""
    y = np.asarray(labels).ravel().astype(bool)
    if n_boot < 1:
        raise ValueError(f"n_boot={n_boot} should be >= 1")
    rng = np.random.default_rng(seed)
    w = np.zeros((n_boot, y.size))
    for group in (np.flatnonzero(y), np.flatnonzero(~y)):
        draws = rng.integers(0, group.size, size=(n_boot, group.size))
        flat = (np.arange(n_boot)[:, None] * group.size + draws).ravel()
        w[:, group] = np.bincount(flat, minlength=n_boot * group.size).reshape(n_boot, group.size)
    return w


def bootstrap_eers(scores: object, labels: object, *, n_boot: int = 200, seed: int = 0) -> np.ndarray:
    """EER (percent) of ``scores`` on each of the ``n_boot`` shared replicates (see the module docstring)."""
    s, y = _as_arrays(scores, labels)
    order = np.argsort(s, kind="stable")
    weights = replicate_weights(y, n_boot, seed)
    out = np.empty(n_boot)
    chunk = max(1, min(n_boot, 4_000_000 // s.size))
    for start in range(0, n_boot, chunk):
        w = weights[start : start + chunk][:, order]
        p_miss, p_fa = _sweep(s[order], y[order], w)
        out[start : start + chunk] = _eer_from_curves(p_miss, p_fa) * 100.0
    return out


@dataclass(frozen=True)
class PairedDelta:
    """``delta = EER_a - EER_b`` (percent points) with a ``level`` two-sided paired percentile interval;
    ``p_a_better`` is the share of replicates where A's EER is lower."""

    delta: float
    low: float
    high: float
    p_a_better: float
    level: float

    @property
    def a_better(self) -> bool:
        """A is significantly better (the whole interval below 0)."""
        return self.high < 0

    @property
    def a_worse(self) -> bool:
        """A is significantly worse (the whole interval above 0)."""
        return self.low > 0


def paired_delta(eer_a: float, boot_a: object, eer_b: float, boot_b: object, *, level: float = 0.95) -> PairedDelta:
    """The paired difference of two models from their :func:`bootstrap_eers` vectors (same list, seed, n)."""
    a, b = np.asarray(boot_a, dtype=float), np.asarray(boot_b, dtype=float)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"bootstrap vectors differ or are empty: {a.shape} vs {b.shape}")
    if not 0 < level < 1:
        raise ValueError(f"level={level} should be in (0, 1), e.g. 0.95")
    d = a - b
    low, high = np.quantile(d, [(1 - level) / 2, 1 - (1 - level) / 2])
    return PairedDelta(float(eer_a - eer_b), float(low), float(high), float(np.mean(d < 0)), level)
