"""``lsv verify``: re-run chosen recipes with other seeds and a longer fine-tune, to tell a lucky trial
from a good recipe.

Every EER on a front comes from one fine-tuning seed at the search's short budget. :func:`verify_study`
takes the front, the knee or given trials, re-runs each recipe ``seeds`` times (fine-tuning seeds
``study.seed + 1, + 2, ...``) with ``steps_mult`` times the study's MSFT steps, on the study's Ray cluster,
scored on the study's trials like a trial (also on the shared bootstrap replicates). Each run is logged to
MLflow as a verification run nested under its trial's run (tags ``lsv.role = verification``,
``lsv.verifies = <trial>``) and kept in the study's storage (``lsv.verification.<trial>``), so a second
``lsv verify`` adds nothing twice. The report gives, per point, the mean and standard deviation of the
verified EERs, a 95 % interval of the mean (Student t over seeds), the paired difference to the fp32
control, and whether the point stays on the front when every verified point takes its mean EER.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from rich.console import Console

from lsv_core.errors import ConfigError, LsvError
from search.objectives import rounded_metrics
from search.results.pareto import TrialPoint, knee_point, pareto_front
from search.results.system_attrs import set_study_data

if TYPE_CHECKING:
    import optuna

    from search.config import StudyConfig

__all__ = ["VERIFY_ATTR", "NoControl", "PointCheck", "VerifyPlan", "VerifyReport", "verification_of", "verify_study"]

VERIFY_ATTR = "lsv.verification."
console = Console(stderr=True)


class NoControl(LsvError):
    """The study has no fp32 control (made before controls existed)."""

    def __init__(self, name: str, toml: str = "STUDY.toml") -> None:
        super().__init__(f"study {name!r} has no fp32 control run (it was made before studies had one); add it "
                         f"with `lsv run {toml} --control-only` (it runs the control alone, no new trials)")


@dataclass(frozen=True)
class VerifyPlan:
    """Which points (``"front"``, ``"knee"`` or ``trials``), how many extra seeds, how much longer."""

    which: Literal["front", "knee", "trials"] = "front"
    trials: tuple[int, ...] = ()
    seeds: int = 3
    steps_mult: float = 2.0

    def __post_init__(self) -> None:
        if self.seeds < 1:
            raise ConfigError(f"seeds={self.seeds} should be >= 1")
        if not self.steps_mult > 0:
            raise ConfigError(f"steps_mult={self.steps_mult} should be > 0")
        if self.which == "trials" and not self.trials:
            raise ConfigError("give the trials to verify (--trials N [N ...]), or --front / --knee")


@dataclass
class PointCheck:
    """One verified point: its logged EER and the verification runs' EERs (percent)."""

    point: TrialPoint
    eers: list[float] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    steps: int = 0
    control_delta: tuple[float, float, float] | None = None  # of the verified mean, paired, EER points
    stays_on_front: bool = False

    @property
    def mean(self) -> float:
        return sum(self.eers) / len(self.eers)

    @property
    def sd(self) -> float:
        n = len(self.eers)
        return math.sqrt(sum((e - self.mean) ** 2 for e in self.eers) / (n - 1)) if n > 1 else 0.0

    @property
    def ci(self) -> tuple[float, float]:
        """95 % interval of the mean over seeds (Student t); a single run gives a zero-width interval."""
        n = len(self.eers)
        if n < 2:
            return self.mean, self.mean
        from scipy.stats import t

        half = float(t.ppf(0.975, n - 1)) * self.sd / math.sqrt(n)
        return self.mean - half, self.mean + half

    def line(self) -> str:
        lo, hi = self.ci
        delta = ("" if self.control_delta is None else
                 f"; vs control {self.control_delta[0]:+.2f} [{self.control_delta[1]:+.2f}, {self.control_delta[2]:+.2f}]")
        return (f"trial {self.point.number}: logged {self.point.eer:.2f} %, verified {self.mean:.2f} ± {self.sd:.2f} % "
                f"(95 % CI {lo:.2f}-{hi:.2f}, {len(self.eers)} seeds, {self.steps} steps){delta}; "
                f"{'stays on' if self.stays_on_front else 'drops off'} the front")


@dataclass
class VerifyReport:
    study: str
    checks: list[PointCheck]

    def lines(self) -> list[str]:
        return [c.line() for c in self.checks]


def verification_of(study: optuna.Study, number: int) -> dict[str, Any] | None:
    """What ``lsv verify`` stored for trial ``number`` (``{"runs": [...], ...}``), or None."""
    from search.results.system_attrs import study_data

    v = study.user_attrs.get(f"{VERIFY_ATTR}{number}")
    if not isinstance(v, dict) or not v.get("runs"):
        return None
    boots = study_data(study, f"{VERIFY_ATTR}{number}.eer_boot") or {}  # older studies: inside each run
    for r in v["runs"]:
        boot = boots.get(f"{r['seed']}/{r['total_steps']}")
        if boot:
            r["eer_boot"] = boot
    return v


def _chosen(points: list[TrialPoint], plan: VerifyPlan) -> list[TrialPoint]:
    from search.results.selection import NoTrialMeetsRule, closest_trials

    if plan.which == "knee":
        k = knee_point(points)
        return [] if k is None else [points[k]]
    if plan.which == "front":
        return [points[i] for i in pareto_front(points)]
    by_number = {p.number: p for p in points}
    missing = [n for n in plan.trials if n not in by_number]
    if missing:
        raise NoTrialMeetsRule(f"trial {missing[0]} is not a complete trial of the study."
                               + closest_trials(points, missing[0]))
    return [by_number[n] for n in plan.trials]


def verify_study(config: StudyConfig, plan: VerifyPlan, *, address: str | None = None,
                 toml: str = "STUDY.toml") -> VerifyReport:
    """Re-run the plan's points on the study's Ray (see the module docstring) and report them."""
    import os

    import ray

    from search.cluster import ray_cluster as cluster
    from search.cluster.storage import read_record
    from search.results.reading import control_delta, load_control, load_points
    from search.results.tracking import StudyTracker
    from search.study.preflight import ADDRESS_FIELDS, PreflightFailed, check_ray_address, preflight_study

    address = address or config.storage.ray_address or os.environ.get("RAY_ADDRESS")
    if address and (problems := check_ray_address(address, where=ADDRESS_FIELDS)):  # before reading the study
        raise PreflightFailed(problems, what="the verification")
    record, study = read_record(config)
    control = load_control(study)
    if control is None:
        raise NoControl(config.study.name, toml)
    points = [p for p in load_points(study) if p.memoized_from is None]
    chosen = _chosen(points, plan)
    if not chosen:
        raise LsvError(f"study {config.study.name!r} has no complete trials to verify")
    pre = preflight_study(config, address=address)
    assert pre.baseline is not None and pre.space is not None
    tracker = StudyTracker(config.mlflow_uri, config.study.name)
    steps = int(round(config.msft.total_steps * plan.steps_mult))
    seeds = [config.study.seed + k for k in range(1, plan.seeds + 1)]
    started = cluster.connect(config, address)
    try:
        excluded = cluster.preflight_nodes(config, record.baseline_digest, ray.put(pre.baseline.weights()))
        shared = cluster.shared_inputs(config, pre.baseline, pre.space, record.baseline_digest or "")
        shared_ref = ray.put(shared)
        todo = []
        for p in chosen:
            done = {(r["seed"], r["total_steps"]) for r in (verification_of(study, p.number) or {}).get("runs", [])}
            todo += [(p, s) for s in seeds if (s, steps) not in done]
        console.print(f"verifying {len(chosen)} point(s): {len(todo)} run(s) of {steps} steps "
                      f"({plan.seeds} seeds x {plan.steps_mult:g} the study's steps)")
        omega = None
        if config.msft.order == "sensitivity":  # the stage order needs the study's sensitivities
            from lsv_core.quant.sensitivity import quantization_errors, sensitivity

            if not record.hessian_traces:
                raise LsvError(f"study {config.study.name!r} uses msft.order = 'sensitivity' but its record has no "
                               "Hessian traces; run it once more with `lsv run` first")
            omega = sensitivity(record.hessian_traces, quantization_errors(pre.baseline.model, seed=config.study.seed))
        refs = {cluster.submit_recipe(config, shared_ref, dict(p.recipe), seed=s, steps_mult=plan.steps_mult,
                                      excluded=excluded, omega=omega): (p, s) for p, s in todo}
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            p, s = refs[ready[0]]
            result = ray.get(ready[0])
            _keep(study, tracker, p, result)
            console.print(f"  trial {p.number}, seed {s}: EER {result['eer']:.2f} %")
    finally:
        if started:
            ray.shutdown()
    checks = []
    for p in chosen:
        runs = [r for r in verification_of(study, p.number)["runs"] if r["total_steps"] == steps and r["seed"] in seeds]
        check = PointCheck(p, [r["eer"] for r in runs], [r["seed"] for r in runs], steps)
        boots = [r["eer_boot"] for r in runs if r.get("eer_boot")]
        if boots and len(boots) == len(runs):
            mean_boot = tuple(sum(v) / len(boots) for v in zip(*boots, strict=True))
            check.control_delta = control_delta(TrialPoint(p.number, check.mean, p.size_bytes, eer_boot=mean_boot),
                                                control)
        checks.append(check)
    _mark_front(points, checks)
    return VerifyReport(config.study.name, checks)


def _keep(study: optuna.Study, tracker: Any, p: TrialPoint, result: dict[str, Any]) -> None:
    key = f"{VERIFY_ATTR}{p.number}"
    kept = verification_of(study, p.number) or {"trial": p.number, "runs": []}
    kept["runs"] = [r for r in kept["runs"] if (r["seed"], r["total_steps"]) != (result["seed"], result["total_steps"])]
    kept["runs"].append(rounded_metrics({k: result[k] for k in (
        "eer", "eer_ci_low", "eer_ci_high", "min_dcf", "min_dcf_001", "seed", "total_steps", "eer_boot", "cost_wall_s",
        "node_id") if k in result}))
    # The bootstrap EERs are machine data (search.results.system_attrs): the user attr keeps the readable part.
    boots = {f"{r['seed']}/{r['total_steps']}": r.pop("eer_boot") for r in kept["runs"] if r.get("eer_boot")}
    if boots:
        set_study_data(study, f"{key}.eer_boot", boots)
    study.set_user_attr(key, kept)
    run = tracker.trial_run(p.number)
    metrics = rounded_metrics({k: result[k] for k in ("eer", "eer_ci_low", "eer_ci_high", "min_dcf", "min_dcf_001",
                                                      "cost_wall_s") if k in result})
    tracker.log_side_run("verification", f"verify-{p.number}-s{result['seed']}", metrics,
                         tags={"lsv.verifies": str(p.number), "lsv.seed": str(result["seed"]),
                               "lsv.total_steps": str(result["total_steps"])},
                         parent_run_id=run.info.run_id if run is not None else None,
                         key=f"{p.number}-{result['seed']}-{result['total_steps']}")


def _mark_front(points: list[TrialPoint], checks: list[PointCheck]) -> None:
    """Which verified points stay on the front when each takes its verified mean EER."""
    import dataclasses

    means = {c.point.number: c.mean for c in checks}
    moved = [dataclasses.replace(p, eer=means.get(p.number, p.eer)) for p in points]
    front = {moved[i].number for i in pareto_front(moved)}
    for c in checks:
        c.stays_on_front = c.point.number in front
