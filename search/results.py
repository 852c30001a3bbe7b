"""Reading a study's results: its trials as Pareto points (from Optuna or MLflow), its progress numbers,
and the Pareto tags of its MLflow runs.

Optuna's storage is the source of truth; MLflow mirrors it for browsing. The dashboards read results
through this module and never the reverse.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import optuna
from optuna.trial import TrialState

from lsv_core.quant.recipe import LayerSpec
from search.pareto import TrialPoint, pareto_ranks

if TYPE_CHECKING:
    from search.config import StudyConfig
    from search.tracking import StudyTracker

__all__ = [
    "NOT_COUNTED",
    "PARETO_OPTIMAL_TAG",
    "PARETO_RANK_TAG",
    "StudyStatus",
    "load_points",
    "load_points_from_mlflow",
    "refresh_pareto_tags",
    "study_status",
]

# MLflow run tags: the UI filter `tags.pareto_optimal = "true"` lists the front.
PARETO_OPTIMAL_TAG = "pareto_optimal"
PARETO_RANK_TAG = "pareto_rank"


# -- study-level numbers, shared by `lsv run`'s progress line and `lsv status` ------------------------------
# Failed trials that are not failures of the search: re-queued after a driver stopped, or asked again.
NOT_COUNTED = ("interrupted (driver stopped)", "duplicate of a running trial")


@dataclass
class StudyStatus:
    name: str
    n_complete: int = 0
    n_pruned: int = 0
    n_failed: int = 0
    n_running: int = 0
    n_memoized: int = 0
    pareto_size: int = 0
    best_eer_under_budget: float | None = None
    smallest_bytes: int | None = None
    budget_bytes: int | None = None
    pareto: list[dict[str, Any]] = field(default_factory=list)
    failure_reasons: dict[str, int] = field(default_factory=dict)  # reason -> trials

    def line(self) -> str:
        best = "-" if self.best_eer_under_budget is None else f"{self.best_eer_under_budget:.2f} %"
        return (f"{self.name}: done {self.n_complete} (memoized {self.n_memoized}), running {self.n_running}, "
                f"failed {self.n_failed}, pruned {self.n_pruned} | Pareto front {self.pareto_size} | "
                f"best EER under budget {best}")


def study_status(study: optuna.Study, budget_bytes: int | None = None) -> StudyStatus:
    trials = study.get_trials(deepcopy=False)
    st = StudyStatus(study.study_name, budget_bytes=budget_bytes)
    complete = [t for t in trials if t.state == TrialState.COMPLETE and t.values is not None]
    st.n_complete = len(complete)
    st.n_memoized = sum(1 for t in complete if "memoized_from" in t.user_attrs)
    st.n_pruned = sum(1 for t in trials if t.state == TrialState.PRUNED
                      and t.user_attrs.get("reason") not in NOT_COUNTED)
    failed = [t for t in trials if t.state == TrialState.FAIL and t.user_attrs.get("reason") not in NOT_COUNTED]
    st.n_failed = len(failed)
    for t in failed:
        reason = str(t.user_attrs.get("reason") or "unknown")[:200]
        st.failure_reasons[reason] = st.failure_reasons.get(reason, 0) + 1
    st.n_running = sum(1 for t in trials if t.state == TrialState.RUNNING)
    if complete:
        front = {t.number: t for t in study.best_trials}
        st.pareto_size = len({tuple(t.values) for t in front.values()})
        st.pareto = [{"number": t.number, "eer": t.values[0], "size_bytes": int(t.values[1])}
                     for t in sorted(front.values(), key=lambda t: t.values[1])]
        ok = [t for t in complete if budget_bytes is None or t.values[1] <= budget_bytes]
        if ok:
            st.best_eer_under_budget = min(t.values[0] for t in ok)
        st.smallest_bytes = int(min(t.values[1] for t in complete))
    return st


# -- loading --------------------------------------------------------------------------------------------
def _optional_float(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def load_points(source: StudyConfig | optuna.Study, *, include_memoized: bool = True) -> list[TrialPoint]:
    """The COMPLETE trials of a study (its Optuna storage is the source of truth), by trial number.

    ``source`` is a :class:`~search.config.StudyConfig` (its study is opened read-only) or an
    ``optuna.Study``. Memoized trials repeat their source's values; ``include_memoized=False`` drops them.
    """
    if isinstance(source, optuna.Study):
        study = source
    else:
        from search.storage import open_study

        study = open_study(source, create=False)
    points = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if t.values is None or len(t.values) < 2:
            continue
        attrs = t.user_attrs
        memo = attrs.get("memoized_from")
        if memo is not None and not include_memoized:
            continue
        points.append(TrialPoint(
            number=t.number, eer=float(t.values[0]), size_bytes=int(t.values[1]),
            eer_ci_low=_optional_float(attrs.get("eer_ci_low")), eer_ci_high=_optional_float(attrs.get("eer_ci_high")),
            min_dcf=_optional_float(attrs.get("min_dcf_001")),
            compression_ratio=_optional_float(attrs.get("compression_ratio")),
            avg_bits=_optional_float(attrs.get("avg_bits")), recipe=dict(attrs.get("recipe") or {}),
            seed=attrs.get("seed"), memoized_from=None if memo is None else int(memo),
            packed_path=attrs.get("packed_path"), digest=attrs.get("digest"),
        ))
    return sorted(points, key=lambda p: p.number)


def load_points_from_mlflow(tracker: StudyTracker) -> list[TrialPoint]:
    """The complete trials as MLflow's child runs record them (for stores without the Optuna database).

    Recipes come from the ``bits.<layer>`` params (``"4"``, ``"1a"``/``"1s"`` for adaptive/static 1 bit).
    """
    from search.tracking import FLOAT_PARAM, TRIAL_TAG

    points = []
    for run in tracker.child_runs():
        tags, metrics = run.data.tags, run.data.metrics
        if tags.get("lsv.state") != "complete" or "eer" not in metrics or "size_bytes" not in metrics:
            continue
        recipe = {key[5:]: LayerSpec.from_token(value).to_json_value()
                  for key, value in run.data.params.items() if key.startswith("bits.") and value != FLOAT_PARAM}
        memo = tags.get("lsv.memoized_from")
        points.append(TrialPoint(
            number=int(tags[TRIAL_TAG]), eer=float(metrics["eer"]), size_bytes=int(metrics["size_bytes"]),
            eer_ci_low=metrics.get("eer_ci_low"), eer_ci_high=metrics.get("eer_ci_high"),
            min_dcf=metrics.get("min_dcf"), compression_ratio=metrics.get("compression_ratio"),
            avg_bits=metrics.get("avg_bits"), recipe=recipe,
            memoized_from=None if memo is None else int(memo), digest=tags.get("lsv.config_hash"),
        ))
    return sorted(points, key=lambda p: p.number)


# -- MLflow tags ----------------------------------------------------------------------------------------
def refresh_pareto_tags(tracker: StudyTracker, study: optuna.Study | Sequence[TrialPoint]) -> int:
    """Tag every trial run: ``pareto_optimal`` ("true"/"false") and, for complete trials, ``pareto_rank``.

    ``study`` is the Optuna study (read through :func:`load_points`) or points already loaded. Only tags
    whose value changed are written, so calling this after every few trials costs one run search plus
    a store call per changed run. Runs of failed/pruned trials get ``pareto_optimal=false`` and no rank.
    Returns the number of runs whose tags were written.
    """
    from search.tracking import TRIAL_TAG

    points = list(study) if isinstance(study, Sequence) else load_points(study)
    ranks = dict(zip((p.number for p in points), pareto_ranks(points), strict=True))
    changed = 0
    for run in tracker.child_runs():
        number = int(run.data.tags.get(TRIAL_TAG, "-1"))
        rank = ranks.get(number)
        want = {PARETO_OPTIMAL_TAG: "true" if rank == 0 else "false"}
        if rank is not None:
            want[PARETO_RANK_TAG] = str(rank)
        if any(run.data.tags.get(k) != v for k, v in want.items()):
            tracker.set_tags(run.info.run_id, want)
            changed += 1
    return changed
