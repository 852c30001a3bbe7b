"""Reading a study's results: its trials as Pareto points (from Optuna or MLflow), its progress numbers,
and the Pareto tags of its MLflow runs.

Optuna's storage is the source of truth; MLflow mirrors it for browsing. The dashboards read results
through this module and never the reverse.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

import optuna
from optuna.trial import TrialState

from lsv_core.quant.recipe import LayerSpec
from search.objectives import rounded
from search.results.pareto import (
    TrialPoint,
    hypervolume,
    knee_point,
    pareto_ranks,
    reference_point,
    significant_front,
)

if TYPE_CHECKING:
    from search.config import StudyConfig
    from search.results.tracking import StudyTracker

__all__ = [
    "CONTROL_ATTR",
    "CONTROL_BOOT",
    "NOT_COUNTED",
    "control_delta",
    "refresh_control_deltas",
    "CostSummary",
    "PARETO_OPTIMAL_CI_TAG",
    "PARETO_OPTIMAL_TAG",
    "PARETO_RANK_TAG",
    "KNEE_TAG",
    "progress_metrics",
    "StudyStatus",
    "load_points",
    "load_control",
    "load_points_from_mlflow",
    "refresh_pareto_tags",
    "study_cost",
    "study_status",
]

# MLflow run tags (README, "Browse"): the UI filter `tags.pareto_optimal = "true"` lists the front;
# `pareto_optimal_ci` the front within the noise (search.results.pareto.significant_front: front points better than
# every smaller model beyond the evaluation noise, paired bootstrap); `knee` the front's knee.
PARETO_OPTIMAL_TAG = "pareto_optimal"
PARETO_OPTIMAL_CI_TAG = "pareto_optimal_ci"
PARETO_RANK_TAG = "pareto_rank"
KNEE_TAG = "knee"


# -- study-level numbers, shared by `lsv run`'s progress line and `lsv status` ------------------------------
# Failed trials that are not failures of the search: re-queued after a driver stopped, or asked again.
NOT_COUNTED = ("interrupted (driver stopped)", "duplicate of a running trial")


@dataclass
class CostSummary:
    """What a study cost, in full-trial equivalents (FTE: one trial at the study's full schedule = 1), itemized:
    ``trials_fte`` (the trials, each the share of its schedule it ran), ``probes_fte`` (the unit probes of
    ``sampler = "probe"``), ``sensitivity_fte`` (the baseline's Hessian traces) and ``control_fte`` (the fp32
    control run); ``total_fte`` is their sum. Probes and Hessian traces are priced by their CPU-seconds over
    a full trial's (the median wall time of the trials trained to the end, times the CPUs of one trial), as
    ``bench/hypervolume.py`` does. Also the trials' wall, CPU and GPU seconds, fine-tuning samples and
    evaluated utterances, and what memoization (a repeated recipe costs nothing: 1 FTE saved each) and
    early stopping (1 - the share run) saved."""

    total_fte: float = 0.0
    trials_fte: float = 0.0
    probes_fte: float = 0.0
    sensitivity_fte: float = 0.0
    control_fte: float = 0.0
    full_trial_wall_s: float | None = None  # the median wall time of a full trial (what 1 FTE is worth)
    wall_s: float = 0.0
    cpu_s: float = 0.0
    gpu_s: float = 0.0
    finetune_samples: float = 0.0
    eval_utterances: float = 0.0
    n_trained: int = 0
    n_memoized: int = 0
    n_pruned: int = 0
    saved_by_memo_fte: float = 0.0
    saved_by_early_stop_fte: float = 0.0

    def line(self) -> str:
        return (f"cost {self.total_fte:.1f} full-trial equivalents (trials {self.trials_fte:.1f}, unit probes "
                f"{self.probes_fte:.1f}, Hessian traces {self.sensitivity_fte:.1f}, fp32 control {self.control_fte:.1f}; "
                f"{self.wall_s / 3600:.2f} worker-hours, "
                f"{self.cpu_s / 3600:.2f} CPU-hours, {self.gpu_s / 3600:.2f} GPU-hours); saved "
                f"{self.saved_by_memo_fte:.1f} by memoization, {self.saved_by_early_stop_fte:.1f} by early stopping")


def _full_trial_wall_s(trials: list[optuna.trial.FrozenTrial]) -> float | None:
    """Median wall time of the trials trained to the end (what one full-trial equivalent took)."""
    import statistics

    walls = [float(t.user_attrs["trial_wall_s"]) for t in trials
             if t.state == TrialState.COMPLETE and "memoized_from" not in t.user_attrs
             and float((t.user_attrs.get("cost") or {}).get("fte", 1.0)) >= 1.0 and t.user_attrs.get("trial_wall_s")]
    return statistics.median(walls) if walls else None


def _side_cost_fte(measured: Any, full_wall_s: float | None, trial_cpus: float) -> float:
    """A driver/worker measurement ``{"wall_s", "threads"}`` in full-trial equivalents (0 before any full
    trial has finished: nothing to price it by yet)."""
    if not isinstance(measured, dict) or not full_wall_s:
        return 0.0
    cpu_s = float(measured.get("wall_s") or 0.0) * max(1, int(measured.get("threads") or 1))
    return cpu_s / (full_wall_s * max(trial_cpus, 1e-9))


def study_cost(trials: list[optuna.trial.FrozenTrial], study: optuna.Study | None = None) -> CostSummary:
    """The cost of ``trials``; with ``study``, also of its unit probes, Hessian traces and fp32 control."""
    c = CostSummary()
    for t in trials:
        cost = t.user_attrs.get("cost") or {}
        if "memoized_from" in t.user_attrs:
            c.n_memoized += 1
            c.saved_by_memo_fte += 1.0
            continue
        c.trials_fte += float(cost.get("fte", 0.0))
        c.wall_s += float(cost.get("wall_s", 0.0))
        c.cpu_s += float(cost.get("cpu_s", 0.0))
        c.gpu_s += float(cost.get("gpu_s", 0.0))
        c.finetune_samples += float(cost.get("finetune_samples", 0.0))
        c.eval_utterances += float(cost.get("eval_utterances", 0.0))
        if t.state == TrialState.PRUNED and cost:
            c.n_pruned += 1
            c.saved_by_early_stop_fte += max(0.0, 1.0 - float(cost.get("fte", 1.0)))
        elif cost:
            c.n_trained += 1
    if study is not None:
        from search.results.record import stored_record

        record = stored_record(study)
        c.full_trial_wall_s = _full_trial_wall_s(trials)
        cpus = float(((record.config if record else {}).get("resources") or {}).get("cpu") or 1.0)
        if record is not None:
            c.probes_fte = _side_cost_fte(record.unit_probes, c.full_trial_wall_s, cpus)
            c.sensitivity_fte = _side_cost_fte((record.extra or {}).get("hessian_cost"), c.full_trial_wall_s, cpus)
        control = study.user_attrs.get(CONTROL_ATTR)
        if isinstance(control, dict):
            c.control_fte = float((control.get("cost") or {}).get("fte", 1.0))
    # Rounded to what they mean (FTE to 4 decimals, seconds to 2), the total the sum of the rounded parts.
    for f in fields(c):
        value = getattr(c, f.name)
        if isinstance(value, float):
            setattr(c, f.name, rounded(f.name, value))
    c.total_fte = rounded("total_fte", c.trials_fte + c.probes_fte + c.sensitivity_fte + c.control_fte)
    return c


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
    cost: CostSummary = field(default_factory=CostSummary)
    accuracy: str = "eer"  # the accuracy objective ([objectives] accuracy): "eer" or "min_dcf"
    best_min_dcf_under_budget: float | None = None  # with accuracy = "min_dcf"

    def line(self) -> str:
        best = "-" if self.best_eer_under_budget is None else f"{self.best_eer_under_budget:.2f} %"
        dcf = ("" if self.best_min_dcf_under_budget is None
               else f" | best minDCF under budget {self.best_min_dcf_under_budget:.4f}")
        return (f"{self.name}: done {self.n_complete} (memoized {self.n_memoized}), running {self.n_running}, "
                f"failed {self.n_failed}, pruned {self.n_pruned} | Pareto front {self.pareto_size} | "
                f"best EER under budget {best}{dcf}")


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
    st.cost = study_cost(trials, study)
    st.accuracy = _accuracy_of(study)
    if complete:
        front = {t.number: t for t in study.best_trials}
        st.pareto_size = len({tuple(t.values) for t in front.values()})
        st.pareto = [{"number": t.number, "eer": _eer_of(t, st.accuracy),
                      **({"min_dcf": t.values[0]} if st.accuracy == "min_dcf" else {}), "size_bytes": int(t.values[1])}
                     for t in sorted(front.values(), key=lambda t: t.values[1])]
        ok = [t for t in complete if budget_bytes is None or t.values[1] <= budget_bytes]
        eers = [e for e in (_eer_of(t, st.accuracy) for t in ok) if e is not None]
        if eers:
            st.best_eer_under_budget = min(eers)
        if ok and st.accuracy == "min_dcf":
            st.best_min_dcf_under_budget = min(t.values[0] for t in ok)
        st.smallest_bytes = int(min(t.values[1] for t in complete))
    return st


def progress_metrics(status: StudyStatus, *, fp32_bytes: int | None, baseline_eer: float | None) -> dict[str, float | None]:
    """The parent run's metric histories at one finished trial: ``hypervolume`` (EER points x fraction of the
    fp32 size, against the report's reference point: 2 x the baseline's EER, or without it 1.1 x the worst
    front EER so far, which moves), ``front_size``, ``best_eer_under_budget`` (percent), ``cost_fte``
    (full-trial equivalents spent so far) and ``n_finished`` (the step)."""
    front = [(float(p["eer"]), float(p["size_bytes"])) for p in status.pareto]
    hv = None
    if front and fp32_bytes:
        ref = reference_point(front, fp32_bytes=fp32_bytes, baseline_eer=baseline_eer)
        hv = hypervolume(front, ref, size_scale=float(fp32_bytes))
    return {"hypervolume": hv, "front_size": float(status.pareto_size),
            "best_eer_under_budget": status.best_eer_under_budget, "cost_fte": status.cost.total_fte,
            "n_finished": float(status.n_complete + status.n_failed + status.n_pruned)}


def _accuracy_of(study: optuna.Study) -> str:
    """The study's accuracy objective, from its Optuna metric names (``min_dcf_p...``: minDCF; else EER)."""
    names = study.metric_names or []
    return "min_dcf" if names and str(names[0]).startswith("min_dcf") else "eer"


def _eer_of(t: optuna.trial.FrozenTrial, accuracy: str) -> float | None:
    return float(t.values[0]) if accuracy == "eer" else _optional_float(t.user_attrs.get("eer"))


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
        from search.cluster.storage import open_study

        study = open_study(source, create=False)
    from search.results.system_attrs import trial_boot

    accuracy = _accuracy_of(study)
    found_after = _found_after_fte(study)
    points = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if t.values is None or len(t.values) < 2:
            continue
        attrs = t.user_attrs
        memo = attrs.get("memoized_from")
        if memo is not None and not include_memoized:
            continue
        eer = _eer_of(t, accuracy)
        if eer is None:
            continue
        seed = attrs.get("seed")
        if seed and attrs.get("repaired"):  # an enqueued seed the size budget changed: say so
            seed = f"{seed} → repaired"
        points.append(TrialPoint(
            number=t.number, eer=eer, size_bytes=int(t.values[1]),
            eer_ci_low=_optional_float(attrs.get("eer_ci_low")), eer_ci_high=_optional_float(attrs.get("eer_ci_high")),
            min_dcf=(float(t.values[0]) if accuracy == "min_dcf"
                     else _optional_float(attrs.get("min_dcf", attrs.get("min_dcf_001")))),
            compression_ratio=_optional_float(attrs.get("compression_ratio")),
            avg_bits=_optional_float(attrs.get("avg_bits")), recipe=dict(attrs.get("recipe") or {}),
            seed=seed, memoized_from=None if memo is None else int(memo),
            packed_path=attrs.get("packed_path"), digest=attrs.get("digest"), eer_boot=trial_boot(t),
            cost_fte=_optional_float((attrs.get("cost") or {}).get("fte")), found_after_fte=found_after[t.number],
            accuracy=accuracy,
        ))
    return sorted(points, key=lambda p: p.number)


def _found_after_fte(study: optuna.Study) -> dict[int, float]:
    """trial number -> the study's cost (FTE) once that trial had run, in trial order. The unit probes, the
    Hessian traces and the fp32 control (it runs beside the first trials) are paid before the first trial,
    so a cost axis counts every cost and ends at :attr:`CostSummary.total_fte`."""
    trials = study.get_trials(deepcopy=False)
    whole = study_cost(trials, study)
    spent = whole.probes_fte + whole.sensitivity_fte + whole.control_fte
    found_after = {}
    for t in sorted(trials, key=lambda t: t.number):
        spent += float((t.user_attrs.get("cost") or {}).get("fte", 0.0))
        found_after[t.number] = spent
    return found_after


def load_points_from_mlflow(tracker: StudyTracker) -> list[TrialPoint]:
    """The complete trials as MLflow's child runs record them (for stores without the Optuna database).

    Recipes come from the ``bits.<layer>`` params (``"4"``, ``"1a"``/``"1s"`` for adaptive/static 1 bit).
    """
    from search.results.tracking import FLOAT_PARAM, TRIAL_TAG

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
    """Tag every trial run: ``pareto_optimal``, ``pareto_optimal_ci`` (:func:`~search.results.pareto.significant_front`)
    and ``knee`` ("true"/"false") and, for complete trials, ``pareto_rank``.

    ``study`` is the Optuna study (read through :func:`load_points`) or points already loaded. Only tags
    whose value changed are written, so calling this after every few trials costs one run search plus
    a store call per changed run. Runs of failed/pruned trials get ``pareto_optimal=false`` and no rank.
    Returns the number of runs whose tags were written.
    """
    from search.results.tracking import TRIAL_TAG

    points = list(study) if isinstance(study, Sequence) else load_points(study)
    ranks = dict(zip((p.number for p in points), pareto_ranks(points), strict=True))
    ci_front = {points[i].number for i in significant_front(points)}
    knee = knee_point(points)
    knee_number = points[knee].number if knee is not None else None
    changed = 0
    for run in tracker.child_runs():
        number = int(run.data.tags.get(TRIAL_TAG, "-1"))
        rank = ranks.get(number)
        want = {PARETO_OPTIMAL_TAG: "true" if rank == 0 else "false",
                PARETO_OPTIMAL_CI_TAG: "true" if number in ci_front else "false",
                KNEE_TAG: "true" if number == knee_number else "false"}
        if rank is not None:
            want[PARETO_RANK_TAG] = str(rank)
        if any(run.data.tags.get(k) != v for k, v in want.items()):
            tracker.set_tags(run.info.run_id, want)
            changed += 1
    return changed


# -- the fp32 control ----------------------------------------------------------------------------------------
CONTROL_ATTR = "lsv.control"  # user attr: the control's metrics and cost
CONTROL_BOOT = "lsv.control.eer_boot"  # system attr: its paired-bootstrap EERs (search.results.system_attrs)


def load_control(study: optuna.Study) -> TrialPoint | None:
    """The study's fp32 control (the baseline fine-tuned with the trials' schedule, nothing quantized) as a
    point of number -1 at the fp32 size, or None when the study has none yet."""
    from search.results.system_attrs import study_data

    c = study.user_attrs.get(CONTROL_ATTR)
    if not isinstance(c, dict) or c.get("eer") is None:
        return None
    boot = study_data(study, CONTROL_BOOT) or c.get("eer_boot")  # older studies: inside the user attr
    accuracy = _accuracy_of(study)
    return TrialPoint(number=-1, eer=float(c["eer"]), size_bytes=int(c.get("size_bytes") or 0),
                      eer_ci_low=_optional_float(c.get("eer_ci_low")), eer_ci_high=_optional_float(c.get("eer_ci_high")),
                      min_dcf=_optional_float(c.get("min_dcf", c.get("min_dcf_001"))), seed="control",
                      eer_boot=tuple(float(x) for x in boot) if boot else None,
                      cost_fte=_optional_float((c.get("cost") or {}).get("fte")), accuracy=accuracy)


def control_delta(point: TrialPoint, control: TrialPoint | None, level: float = 0.95) -> tuple[float, float, float] | None:
    """``(EER - EER_control, low, high)``: the paired bootstrap difference in EER points (None without vectors)."""
    if control is None or point.eer_boot is None or control.eer_boot is None:
        return None
    if len(point.eer_boot) != len(control.eer_boot):
        return None
    from lsv_core.metrics.paired import paired_delta

    d = paired_delta(point.eer, point.eer_boot, control.eer, control.eer_boot, level=level)
    return d.delta, d.low, d.high


def refresh_control_deltas(tracker: StudyTracker, study: optuna.Study) -> int:
    """Log ``eer_delta_control[_low|_high]`` on every complete trial run that lacks them (trials that
    finished before the control did); returns how many runs were updated."""
    from search.results.tracking import CONTROL_DELTA_METRICS, TRIAL_TAG

    control = load_control(study)
    if control is None:
        return 0
    points = {p.number: p for p in load_points(study)}
    changed = 0
    for run in tracker.child_runs():
        point = points.get(int(run.data.tags.get(TRIAL_TAG, "-1")))
        if point is None or CONTROL_DELTA_METRICS[0] in run.data.metrics:
            continue
        delta = control_delta(point, control)
        if delta is not None:
            tracker.log_metrics(run.info.run_id, dict(zip(CONTROL_DELTA_METRICS, delta, strict=True)))
            changed += 1
    return changed

