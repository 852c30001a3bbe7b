"""Choosing a trial of a study: by number, the best EER under a size, the smallest under an EER, the knee,
or, CI-aware, the smallest model not significantly worse than the knee or than the fp32 control.

:func:`select_trial` is a pure function of the study's points (:func:`search.results.reading.load_points`); a rule
no trial meets raises :class:`NoTrialMeetsRule` naming the closest trials.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from lsv_core.errors import ConfigError, LsvError
from search.results.pareto import (
    DEFAULT_LEVEL,
    TrialPoint,
    best_eer_with_size_at_most,
    ci_knee_point,
    knee_point,
    smallest_not_worse_than,
    smallest_with_eer_at_most,
    smallest_within_of,
)

__all__ = ["NoTrialMeetsRule", "SelectionRule", "closest_trials", "select_trial"]


class NoTrialMeetsRule(LsvError):
    """No complete trial satisfies the selection rule; the message lists the closest ones."""


@dataclass(frozen=True)
class SelectionRule:
    """Which trial to pick; give exactly one field.

    * ``trial``: that Optuna trial number;
    * ``max_size_mb``: the lowest EER among trials of at most this many MB (10^6 bytes of ``model.onnx``);
    * ``max_eer``: the smallest trial with an EER of at most this many percent points;
    * ``knee``: the knee of the Pareto front (:func:`search.results.pareto.knee_point`);
    * ``knee_ci``: the smallest trial not significantly worse than the knee (:func:`search.results.pareto.ci_knee_point`);
    * ``not_worse_than_control``: the smallest trial not significantly worse than the study's fp32 control;
    * ``within_pp``: the smallest trial within this many EER points of the control, with confidence.

    "Significantly" is a paired bootstrap on the study's trials at ``level`` (two-sided).
    """

    trial: int | None = None
    max_size_mb: float | None = None
    max_eer: float | None = None
    knee: bool = False
    knee_ci: bool = False
    not_worse_than_control: bool = False
    within_pp: float | None = None
    level: float = DEFAULT_LEVEL

    def __post_init__(self) -> None:
        given = [k for k in ("trial", "max_size_mb", "max_eer", "within_pp") if getattr(self, k) is not None] + [
            k for k in ("knee", "knee_ci", "not_worse_than_control") if getattr(self, k)]
        if len(given) != 1:
            raise ConfigError("give exactly one of trial, max_size_mb, max_eer, knee, knee_ci, "
                              f"not_worse_than_control, within_pp (got {given or 'none'})")
        if self.max_size_mb is not None and not self.max_size_mb > 0:
            raise ConfigError(f"max_size_mb={self.max_size_mb!r} should be > 0")
        if self.max_eer is not None and not 0 <= self.max_eer <= 100:
            raise ConfigError(f"max_eer={self.max_eer!r} should be an EER in percent, 0 to 100")
        if self.trial is not None and self.trial < 0:
            raise ConfigError(f"trial={self.trial!r} should be an Optuna trial number >= 0")
        if self.within_pp is not None and not 0 <= self.within_pp <= 100:
            raise ConfigError(f"within_pp={self.within_pp!r} should be EER points, 0 to 100")
        if not 0.5 <= self.level < 1:
            raise ConfigError(f"level={self.level!r} should be a confidence in [0.5, 1), e.g. 0.95")

    @property
    def needs_control(self) -> bool:
        return self.not_worse_than_control or self.within_pp is not None

    def describe(self) -> str:
        if self.trial is not None:
            return f"trial {self.trial}"
        if self.max_size_mb is not None:
            return f"lowest EER with size <= {self.max_size_mb:g} MB ({int(self.max_size_mb * 1e6):,} bytes)"
        if self.max_eer is not None:
            return f"smallest model with EER <= {self.max_eer:g} %"
        if self.knee_ci:
            return f"smallest model not significantly worse than the knee (paired bootstrap, {self.level:.0%})"
        if self.not_worse_than_control:
            return f"smallest model not significantly worse than the fp32 control (paired bootstrap, {self.level:.0%})"
        if self.within_pp is not None:
            return f"smallest model within {self.within_pp:g} EER points of the fp32 control ({self.level:.0%})"
        return "knee of the Pareto front"


# -- selection ------------------------------------------------------------------------------------------
def _closest(points: Sequence[TrialPoint], key: Any, n: int = 3) -> str:
    near = sorted(points, key=key)[:n]
    if not near:
        return " The study has no complete trials."
    rows = "; ".join(f"trial {p.number}: EER {p.eer:.2f} %, {p.size_bytes:,} bytes" for p in near)
    return f" Closest: {rows}."


def closest_trials(points: Sequence[TrialPoint], number: int) -> str:
    """`` Closest: trial ...`` by trial number, for refusing a trial that is not there."""
    return _closest(points, lambda p: (abs(p.number - number), p.number))


def select_trial(points: Sequence[TrialPoint], rule: SelectionRule, control: TrialPoint | None = None) -> TrialPoint:
    """The complete trial ``rule`` picks; raises :class:`NoTrialMeetsRule` listing the 3 closest otherwise.

    ``control`` (the study's fp32 control) is needed by the rules that compare with it."""
    if not points:
        raise NoTrialMeetsRule(f"no trial meets the rule ({rule.describe()}): the study has no complete trials")
    if rule.trial is not None:
        match = [p for p in points if p.number == rule.trial]
        if match:
            return match[0]
        raise NoTrialMeetsRule(f"trial {rule.trial} is not a complete trial of the study."
                               + closest_trials(points, rule.trial))
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
    if rule.needs_control:
        if control is None:
            raise ConfigError(f"the rule ({rule.describe()}) needs the study's fp32 control, which it does not have")
        i = (smallest_not_worse_than(points, control, level=rule.level) if rule.not_worse_than_control
             else smallest_within_of(points, control, float(rule.within_pp), level=rule.level))
        if i is None:
            raise NoTrialMeetsRule(f"no trial meets the rule ({rule.describe()}); control EER {control.eer:.2f} %."
                                   + _closest(points, lambda p: (p.eer, p.size_bytes, p.number)))
        return points[i]
    i = ci_knee_point(points, level=rule.level) if rule.knee_ci else knee_point(points)
    assert i is not None  # points is not empty
    return points[i]
