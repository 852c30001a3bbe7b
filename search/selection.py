"""Choosing a trial of a study: by number, the best EER under a size, the smallest under an EER, or the knee.

:func:`select_trial` is a pure function of the study's points (:func:`search.results.load_points`); a rule
no trial meets raises :class:`NoTrialMeetsRule` naming the closest trials.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from lsv_core.errors import ConfigError, LsvError
from search.pareto import TrialPoint, best_eer_with_size_at_most, knee_point, smallest_with_eer_at_most

__all__ = ["NoTrialMeetsRule", "SelectionRule", "select_trial"]


class NoTrialMeetsRule(LsvError):
    """No complete trial satisfies the selection rule; the message lists the closest ones."""


@dataclass(frozen=True)
class SelectionRule:
    """Which trial to export; give exactly one field.

    * ``trial``: that Optuna trial number;
    * ``max_size_mb``: the lowest EER among trials of at most this many MB (10^6 bytes of ``model.onnx``);
    * ``max_eer``: the smallest trial with an EER of at most this many percent points;
    * ``knee``: the knee of the Pareto front (:func:`search.pareto.knee_point`).
    """

    trial: int | None = None
    max_size_mb: float | None = None
    max_eer: float | None = None
    knee: bool = False

    def __post_init__(self) -> None:
        given = [k for k in ("trial", "max_size_mb", "max_eer") if getattr(self, k) is not None] + (
            ["knee"] if self.knee else [])
        if len(given) != 1:
            raise ConfigError(f"give exactly one of trial, max_size_mb, max_eer, knee (got {given or 'none'})")
        if self.max_size_mb is not None and not self.max_size_mb > 0:
            raise ConfigError(f"max_size_mb={self.max_size_mb!r} should be > 0")
        if self.max_eer is not None and not 0 <= self.max_eer <= 100:
            raise ConfigError(f"max_eer={self.max_eer!r} should be an EER in percent, 0 to 100")
        if self.trial is not None and self.trial < 0:
            raise ConfigError(f"trial={self.trial!r} should be an Optuna trial number >= 0")

    def describe(self) -> str:
        if self.trial is not None:
            return f"trial {self.trial}"
        if self.max_size_mb is not None:
            return f"lowest EER with size <= {self.max_size_mb:g} MB ({int(self.max_size_mb * 1e6):,} bytes)"
        if self.max_eer is not None:
            return f"smallest model with EER <= {self.max_eer:g} %"
        return "knee of the Pareto front"


# -- selection ------------------------------------------------------------------------------------------
def _closest(points: Sequence[TrialPoint], key: Any, n: int = 3) -> str:
    near = sorted(points, key=key)[:n]
    if not near:
        return " The study has no complete trials."
    rows = "; ".join(f"trial {p.number}: EER {p.eer:.2f} %, {p.size_bytes:,} bytes" for p in near)
    return f" Closest: {rows}."


def select_trial(points: Sequence[TrialPoint], rule: SelectionRule) -> TrialPoint:
    """The complete trial ``rule`` picks; raises :class:`NoTrialMeetsRule` listing the 3 closest otherwise."""
    if not points:
        raise NoTrialMeetsRule(f"no trial meets the rule ({rule.describe()}): the study has no complete trials")
    if rule.trial is not None:
        match = [p for p in points if p.number == rule.trial]
        if match:
            return match[0]
        raise NoTrialMeetsRule(f"trial {rule.trial} is not a complete trial of the study."
                               + _closest(points, lambda p: (abs(p.number - rule.trial), p.number)))
    if rule.max_size_mb is not None:
        limit = rule.max_size_mb * 1e6
        i = best_eer_with_size_at_most(points, limit)
        if i is None:
            raise NoTrialMeetsRule(f"no trial has size <= {rule.max_size_mb:g} MB ({int(limit):,} bytes)."
                                   + _closest(points, lambda p: (p.size_bytes, p.eer, p.number)))
        return points[i]
    if rule.max_eer is not None:
        i = smallest_with_eer_at_most(points, rule.max_eer)
        if i is None:
            raise NoTrialMeetsRule(f"no trial has EER <= {rule.max_eer:g} %."
                                   + _closest(points, lambda p: (p.eer, p.size_bytes, p.number)))
        return points[i]
    i = knee_point(points)
    assert i is not None  # points is not empty
    return points[i]
