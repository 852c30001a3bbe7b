"""Dashboards of a study: the Pareto math, its figures and the static HTML report.

Import from here: ``TrialPoint``, ``load_points``, ``pareto_front``, ``pareto_ranks``, ``hypervolume``,
``knee_point``, ``refresh_pareto_tags``, ``write_report``. Figures are in :mod:`dashboards.plots`.
"""

from dashboards.pareto import (
    TrialPoint,
    best_eer_with_size_at_most,
    hypervolume,
    hypervolume_history,
    knee_point,
    load_points,
    load_points_from_mlflow,
    pareto_front,
    pareto_ranks,
    reference_point,
    refresh_pareto_tags,
    smallest_with_eer_at_most,
)
from dashboards.report import write_report

__all__ = [
    "TrialPoint",
    "best_eer_with_size_at_most",
    "hypervolume",
    "hypervolume_history",
    "knee_point",
    "load_points",
    "load_points_from_mlflow",
    "pareto_front",
    "pareto_ranks",
    "reference_point",
    "refresh_pareto_tags",
    "smallest_with_eer_at_most",
    "write_report",
]
