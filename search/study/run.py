"""Running a study: check everything, prepare the baseline, then Ray Tune trials steered by an Optuna study.

Everything lives under ``runs/<study>/`` on the driver: ``optuna.db`` (the source of truth for trials and
the study record, :mod:`search.results.record`), ``mlflow.db`` and ``mlartifacts/`` (a parent run for the study, a
child run per trial; on a tracking server, in the server's stores), ``trials/`` (packed models, sent by
the workers through Ray), ``codebooks/``, ``ray/`` (Ray Tune's folders) and ``study.json`` (a copy of the
record). Nothing needs a filesystem shared with the worker nodes (:mod:`search.cluster.ray_cluster`).

Order: the preflight (:mod:`search.study.preflight`) checks config, storage, data, checkpoint, space and budget
and raises before anything is written; the corpus / default baseline are made if planned; every Ray node
is checked (a bad node stops the run before the study exists: nothing written, Ray shut down again); the
study is created or resumed under a driver lease (:mod:`search.cluster.lease`: one live driver per study); then
the trials run.

Resuming: running a study that exists continues it. Trials left RUNNING by a driver that died are
marked failed ("interrupted") and their assignments re-queued; finished trials missing from MLflow
(the driver died between Optuna's tell and the MLflow write) are logged then, so nothing is lost
and nothing is logged twice. Ctrl-C (SIGINT) or SIGTERM stops the trials, re-queues the running ones
and raises :class:`StudyInterrupted`. ``fresh=True`` moves the old folder aside (never deletes it). A
driver stalled past ``storage.lease_timeout_s`` whose study another driver took over stops at its next
step (no ask, no tell, no MLflow write; its Tune trials and control stopped) and raises
:class:`~search.cluster.lease.LeaseLost`.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState
from rich.console import Console

from lsv_core.atomic import build_dir, write_text_atomic
from lsv_core.errors import ConfigError, LsvError
from lsv_core.quant import BitRecipe, LayerSpec
from search.cluster.lease import DriverLease
from search.cluster.storage import open_study, redacted
from search.config import StudyConfig
from search.objectives import objective_keys, rounded, rounded_metrics
from search.results.reading import (
    CONTROL_ATTR,
    CONTROL_BOOT,
    NOT_COUNTED,
    StudyStatus,
    control_delta,
    load_control,
    progress_metrics,
    refresh_control_deltas,
    refresh_pareto_tags,
    study_status,
)
from search.results.record import StudyRecord, save_record, stored_record
from search.results.system_attrs import set_study_data, trial_boot
from search.results.tracking import CONTROL_TAG, StudyTracker, TrackingThread, TrialRecord
from search.space import SearchSpace
from search.study.preflight import Preflight, preflight_study
from search.study.progress import ProgressBoard

__all__ = ["RunResult", "StudyInterrupted", "run_study"]

console = Console(stderr=True)
INTERRUPTED = "interrupted (driver stopped)"
# The config fields logged as params of the study's parent run: the few users filter studies on (each param
# is a column of the MLflow runs table; the whole config is the run's config.json artifact).
PARENT_PARAMS = ("study.sampler", "study.seed", "study.n_trials", "space.granularity", "space.bits",
                 "objectives.size_budget_mb", "objectives.min_dcf", "msft.order", "msft.total_steps",
                 "data.max_trials", "model.checkpoint")


class StudyInterrupted(LsvError):
    """The driver was stopped by SIGINT/SIGTERM; running trials were re-queued and nothing was lost."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        name = signal.Signals(signum).name
        super().__init__(f"stopped by {name}; the running trials were re-queued: `lsv run` again resumes the study")


@dataclass
class RunResult:
    status: StudyStatus
    study_dir: Path
    wall_s: float
    resumed: bool


# -- the run ---------------------------------------------------------------------------------------------
def run_study(config: StudyConfig, *, address: str | None = None, fresh: bool = False, progress: bool = True,
              fault_plan: dict[int, dict[str, Any]] | None = None,
              on_status: Callable[[StudyStatus], None] | None = None, control_only: bool = False) -> RunResult:
    """Run (or resume) the study described by ``config``; returns its status when no trials remain.

    Raises :class:`~search.study.preflight.PreflightFailed` (nothing written) for bad input,
    :class:`~search.cluster.lease.StudyBusy` when another driver runs the study, :class:`~search.cluster.lease.LeaseLost` when
    another driver took the study over while this one was stalled (its trials stopped, nothing more told),
    :class:`StudyInterrupted` after a clean stop on SIGINT/SIGTERM. ``fault_plan`` maps Optuna trial numbers to injected faults (fault tests).
    ``control_only`` runs only the study's fp32 control (a study made before controls existed), no trials.
    """
    t0 = time.monotonic()
    address = address or config.storage.ray_address or os.environ.get("RAY_ADDRESS")
    pre = preflight_study(config, address=address)
    _make_planned_inputs(config, pre, progress)
    ray_here = _connect_and_check_nodes(config, pre, address)
    try:
        return _run_checked(config, pre, t0, address=address, fresh=fresh, progress=progress,
                            fault_plan=fault_plan, on_status=on_status, control_only=control_only)
    finally:
        if ray_here:
            import ray

            ray.shutdown()


def _connect_and_check_nodes(config: StudyConfig, pre: Preflight, address: str | None) -> bool:
    """Join (or start) Ray and check every node before the study exists, so that a bad node leaves nothing
    behind (no study folder, no Optuna study, no MLflow experiment); returns whether Ray was started here.
    On a bad node Ray is shut down again and :class:`~search.study.preflight.PreflightFailed` raised. Each node must
    receive the baseline the driver loaded (its state-dict digest)."""
    import ray

    from lsv_core.quant.sensitivity import state_dict_digest
    from search.cluster import ray_cluster as cluster

    assert pre.baseline is not None
    _refuse_if_busy(config)
    started_here = cluster.connect(config, address)
    try:
        pre.excluded_nodes = cluster.preflight_nodes(config, state_dict_digest(pre.baseline.model),
                                                     ray.put(pre.baseline.weights()))
    except BaseException:
        if started_here:
            ray.shutdown()
        raise
    return started_here


def _refuse_if_busy(config: StudyConfig) -> None:
    """Raise :class:`~search.cluster.lease.StudyBusy` when a live driver holds the study's lease, before Ray is touched
    (the lease itself is taken once the study is opened). Reads only: no table, file or study is created."""
    from search.cluster.lease import DriverLease, StudyBusy
    from search.cluster.storage import sqlite_file

    db = sqlite_file(config.optuna_url)
    if db is not None and not db.is_file():
        return
    try:
        storage = optuna.storages.RDBStorage(config.optuna_url, heartbeat_interval=None, skip_table_creation=True)
        study = optuna.load_study(study_name=config.study.name, storage=storage)
    except Exception:  # noqa: BLE001 - no study (or no tables) yet: nobody runs it
        return
    lease = DriverLease(study, config.storage.lease_timeout_s)
    held = lease.current()
    if held is not None and not lease.is_dead(held):
        raise StudyBusy(f"study {config.study.name!r} is being run by another driver ({held.describe()}); wait for "
                        f"it to finish, stop it, or wait {lease.timeout_s:g} s after it died (storage.lease_timeout_s)")


def _run_checked(config: StudyConfig, pre: Preflight, t0: float, *, address: str | None, fresh: bool,
                 progress: bool, fault_plan: dict[int, dict[str, Any]] | None,
                 on_status: Callable[[StudyStatus], None] | None, control_only: bool) -> RunResult:
    """:func:`run_study` once everything (nodes included) is checked: create or resume, then run the trials."""
    study_dir = config.study_dir
    if fresh:
        _move_aside(config)
    study_dir.mkdir(parents=True, exist_ok=True)
    study = open_study(config, create=True)
    with _stop_signals() as stopped, DriverLease(study, config.storage.lease_timeout_s) as lease:
        if lease.taken_over is not None:
            console.print(f"taking over the study from a driver that stopped ({lease.taken_over.describe()})",
                          soft_wrap=True)
        record, resumed = _open_record(config, study, pre)
        tracker = StudyTracker(config.mlflow_uri, config.study.name)
        baseline = {"baseline_size_bytes": float(record.fp32_bytes or 0)}
        if (record.baseline_eval or {}).get("eer") is not None:
            baseline["baseline_eer"] = float(record.baseline_eval["eer"])
        tracker.start_study(config.public_dump(), config.digest(), baseline, param_keys=PARENT_PARAMS)
        _recover(study, tracker)
        done = sum(1 for t in study.get_trials(deepcopy=False)
                   if t.state.is_finished() and t.user_attrs.get("reason") not in NOT_COUNTED)
        remaining = None if config.study.n_trials is None else max(0, config.study.n_trials - done)
        if control_only:
            remaining = 0
        if remaining != 0 or load_control(study) is None:
            _run_trials(config, study, pre, record, tracker, remaining, address, progress, fault_plan,
                        on_status, stopped, lease)
        refresh_pareto_tags(tracker, study)
        status = study_status(study, config.size_budget_bytes)
        cost = status.cost
        tracker.finish_study(rounded_metrics({
            "n_complete": status.n_complete, "n_failed": status.n_failed, "n_pruned": status.n_pruned,
            "pareto_size": status.pareto_size, "cost_total_fte": cost.total_fte, "cost_trials_fte": cost.trials_fte,
            "cost_probes_fte": cost.probes_fte, "cost_sensitivity_fte": cost.sensitivity_fte,
            "cost_control_fte": cost.control_fte, "cost_wall_s": cost.wall_s, "cost_cpu_s": cost.cpu_s,
            "cost_gpu_s": cost.gpu_s, "cost_saved_by_memo_fte": cost.saved_by_memo_fte,
            "cost_saved_by_early_stop_fte": cost.saved_by_early_stop_fte}))
        write_text_atomic(study_dir / "status.json", json.dumps(asdict(status), indent=2), overwrite=True)
    return RunResult(status, study_dir, time.monotonic() - t0, resumed)


def _run_trials(config: StudyConfig, study: optuna.Study, pre: Preflight, record: StudyRecord,
                tracker: StudyTracker, remaining: int | None, address: str | None, progress: bool,
                fault_plan: dict[int, dict[str, Any]] | None, on_status: Callable[[StudyStatus], None] | None,
                stopped: _StopEvent, lease: DriverLease) -> None:
    import ray

    from lsv_core.quant import packed_size_bytes
    from search.cluster import ray_cluster as cluster
    from search.cluster.artifacts import start_sink
    from search.results.renderers import load_renderers, render_study
    from search.study.searcher import AskTellSearcher

    assert pre.baseline is not None and pre.space is not None
    model, space = pre.baseline.model, pre.space
    started_here = cluster.connect(config, address)
    stopped.install()  # Ray's core worker installs its own SIGTERM handler (it aborts the process)
    writer = TrackingThread()
    searcher: AskTellSearcher | None = None
    renderers = load_renderers()  # e.g. the dashboards' plots of the parent run (search never imports them)
    try:
        shared = cluster.shared_inputs(config, pre.baseline, space, record.baseline_digest or "", progress)
        shared_ref = ray.put(shared)
        excluded = pre.excluded_nodes  # checked before the study was created
        omega, record = _prepare_priors(config, study, record, pre, shared_ref, excluded, lease)
        control = _Control(config, study, tracker, writer, record)
        if control.point is None:  # the fp32 control runs beside the first trials (one trial's resources)
            control.ref = cluster.submit_recipe(config, shared_ref, {}, excluded=excluded)
        if remaining == 0:  # only the control was missing (e.g. `lsv run --control-only`)
            control.wait()
            return
        sink_name = f"lsv-sink-{config.study.name}-{uuid.uuid4().hex[:8]}"
        sink = start_sink(config.study_dir, sink_name)
        board = ProgressBoard(config.study.name, n_trials=config.study.n_trials, timeout_s=config.study.timeout_s,
                              console=console, live=None if progress else False)
        on_record = _trial_sink(config, study, tracker, writer, control, board, progress, on_status, lease,
                                renderers, record)
        make = cluster.make_trial_config(config, sink_name,
                                         omega if config.msft.order == "sensitivity" else None, fault_plan)
        searcher = AskTellSearcher(study, space, size_of=lambda r: packed_size_bytes(model, r),
                                   budget_bytes=config.size_budget_bytes, make_config=make, sink=on_record,
                                   objectives=objective_keys(config.objectives.accuracy),
                                   max_trials=remaining, on_progress=board.update)
        searcher.stopping = stopped
        searcher.lease = lease
        with board:
            stopped.in_tune = True
            try:
                cluster.run_trials(config, searcher, shared, excluded, sink_name)
            finally:
                stopped.in_tune = False
        if stopped.is_set():  # Tune ended its loop on our SIGINT/SIGTERM: close up like an interrupt
            raise KeyboardInterrupt  # (before any other Ray call: a signal to the group may have hit Ray too)
        ray.kill(sink)
        if not lease.holds():  # taken over: Tune stopped the trials; the control goes too, nothing is told
            if control.ref is not None:
                ray.cancel(control.ref, force=True)
            lease.check()
        control.wait()
    except KeyboardInterrupt:  # SIGINT/SIGTERM (see _stop_signals): the trials still running go back in the queue
        _requeue_after_interrupt(study, searcher, lease)
        raise
    finally:
        # The front as it stands, also when stopped: tags, then the pictures (lsv report redraws them later);
        # not by a driver that was taken over (the study's MLflow runs are the new driver's to write).
        if lease.holds():
            writer.submit(refresh_pareto_tags, tracker, study)
            if renderers:
                writer.submit(render_study, renderers, config, tracker)
        failed = writer.close()
        if started_here:
            ray.shutdown()
    if failed:  # Optuna has every result: log what MLflow is missing now (a resumed run would too)
        from search.redaction import scrub_known

        console.print(f"[yellow]{len(failed)} MLflow call(s) failed during the study ({scrub_known(failed[0])}); "
                      "retrying[/]")  # MLflow's messages hold the request URL
        _log_missing(study, tracker)


def _requeue_after_interrupt(study: optuna.Study, searcher: Any, lease: DriverLease) -> None:
    """After SIGINT/SIGTERM: this driver's running trials go back in the queue (nothing lost, nothing doubled);
    a driver that was taken over touches nothing (the running trials are the other driver's now)."""
    if not lease.holds():
        return
    if searcher is not None:
        searcher.abandon_live(INTERRUPTED)
    # The signal may land between Optuna's ask and the searcher's bookkeeping: every trial still RUNNING
    # is this driver's (it holds the lease), so all of them go back in the queue. A storage transaction
    # the interrupt cut short is rolled back first (SQLite would otherwise stay locked by it).
    _end_interrupted_session(study)
    _requeue_running(study)


def _prepare_priors(config: StudyConfig, study: optuna.Study, record: StudyRecord, pre: Preflight,
                    shared_ref: Any, excluded: Any, lease: DriverLease) -> tuple[Any, StudyRecord]:
    """What the trials need first: the sensitivities (``omega``, when the MSFT order or the allocator seeds use
    them), the unit probes (``sampler = "probe"``), and the seed recipes, enqueued once per study. Returns
    ``omega`` (None when unused) and the record (with the probes when they were measured now)."""
    assert pre.baseline is not None and pre.space is not None
    model, space = pre.baseline.model, pre.space
    omega = None
    seeded = "seeded" in study.user_attrs
    if config.msft.order == "sensitivity" or (not seeded and config.seeds.allocator_fractions):
        omega = _sensitivities(config, study, record, pre, shared_ref, excluded)
    if config.study.sampler == "probe" and not record.unit_probes:
        record = _unit_probes(config, study, record, pre, shared_ref, excluded)
    lease.check()  # the steps above can be long: a driver taken over meanwhile writes nothing more
    if not seeded:
        for label, recipe in _seed_recipes(config, space, model, omega):
            study.enqueue_trial(space.params_from_recipe(recipe), user_attrs={"seed": label})
        study.set_user_attr("seeded", True)
        study.set_user_attr("fp32_bytes", record.fp32_bytes)
    return omega, record


def _trial_sink(config: StudyConfig, study: optuna.Study, tracker: StudyTracker, writer: TrackingThread,
                control: _Control, board: ProgressBoard, progress: bool,
                on_status: Callable[[StudyStatus], None] | None,
                lease: DriverLease, renderers: list[Any], record: StudyRecord) -> Callable[[TrialRecord], None]:
    """What the driver does with each finished trial's record: its difference to the control, its MLflow run
    and a step of the parent run's progress histories (through ``writer``), the Pareto tags every fourth trial,
    the parent run's pictures every ``study.report_every`` trials, the progress board and ``on_status``."""
    from search.results.renderers import render_study

    logged = [0]
    baseline_eer = (record.baseline_eval or {}).get("eer")

    def on_record(rec: TrialRecord) -> None:
        control.poll()
        if control.point is not None and rec.eer_boot is not None and rec.eer is not None:
            from search.results.pareto import TrialPoint

            rec.control_delta = control_delta(TrialPoint(rec.number, rec.eer, int(rec.size_bytes or 0),
                                                         eer_boot=rec.eer_boot), control.point)
        writer.submit(_log_unless_displaced, lease, tracker, rec)
        logged[0] += 1
        st = study_status(study, config.size_budget_bytes)
        # One step per finished trial: MLflow's chart view draws the search's progress from these.
        history = progress_metrics(st, fp32_bytes=record.fp32_bytes, baseline_eer=baseline_eer)
        writer.submit(tracker.log_progress, int(history.pop("n_finished") or 0), history)
        if logged[0] % 4 == 0:  # keep `tags.pareto_optimal = "true"` usable in the UI during the study
            writer.submit(refresh_pareto_tags, tracker, study)
        every = config.study.report_every
        if renderers and every and logged[0] % every == 0:
            writer.submit(render_study, renderers, config, tracker)
        if progress:
            board.finished(rec, st)
        if on_status is not None:
            on_status(st)

    return on_record


def _log_unless_displaced(lease: DriverLease, tracker: StudyTracker, rec: TrialRecord) -> None:
    """Log a told trial to MLflow, unless another driver took the study over meanwhile: that driver logged
    every trial told before it took over (``_recover``), and a second run of it would be a duplicate."""
    if lease.holds():
        tracker.log_trial(rec)
    else:
        console.print(f"[yellow]trial {rec.number} is left for the driver that took the study over to log[/]")


class _Control:
    """The study's fp32 control: the baseline fine-tuned with the trials' schedule, nothing quantized,
    scored like a trial (also on the shared bootstrap replicates, so every trial's EER difference to it
    has a paired interval). Runs once per study as a Ray task; kept in the study's storage
    (``lsv.control``) and as an MLflow run tagged ``lsv.role = control``; a study stopped before it finished
    runs it again on resume."""

    def __init__(self, config: StudyConfig, study: optuna.Study, tracker: StudyTracker, writer: TrackingThread,
                 record: StudyRecord) -> None:
        self.study, self.tracker, self.writer, self.record = study, tracker, writer, record
        self.point = load_control(study)
        self.ref: Any = None

    def poll(self) -> None:
        import ray

        if self.ref is not None and ray.wait([self.ref], timeout=0)[0]:
            self._store()

    def wait(self) -> None:
        if self.ref is not None:
            console.print("waiting for the fp32 control run ...")
            self._store()

    def _store(self) -> None:
        import ray

        ref, self.ref = self.ref, None
        try:
            result = ray.get(ref)
        except Exception as err:  # noqa: BLE001 - the study goes on; the next run tries again
            console.print(f"[yellow]the fp32 control run failed ({type(err).__name__}: "
                          f"{str(err).strip().splitlines()[-1][:300] if str(err).strip() else ''}); "
                          "`lsv run` again retries it[/]", soft_wrap=True)
            return
        result["size_bytes"] = self.record.fp32_bytes
        result["cost"] = rounded_metrics({"fte": 1.0, **{k[5:]: v for k, v in result.items() if k.startswith("cost_")}})
        boot = result.pop("eer_boot", None)
        if boot:  # machine data: a system attr (search.results.system_attrs); the summary stays readable
            set_study_data(self.study, CONTROL_BOOT, rounded("eer", boot))
        self.study.set_user_attr(CONTROL_ATTR, rounded_metrics(result))
        self.point = load_control(self.study)
        console.print(f"fp32 control (same fine-tuning, nothing quantized): EER {result['eer']:.2f} % "
                      f"[{result['eer_ci_low']:.2f}, {result['eer_ci_high']:.2f}]", soft_wrap=True)
        self.writer.submit(_log_control, self.study, self.tracker)
        self.writer.submit(refresh_control_deltas, self.tracker, self.study)


class _StopEvent(threading.Event):
    """Set by SIGINT/SIGTERM; ``install()`` (re-)installs the handlers (``ray.init`` replaces them);
    ``in_tune`` is true while Ray Tune runs the trials (then the stop goes through Tune, see below)."""

    signum: int = signal.SIGINT
    in_tune: bool = False

    def install(self) -> None:
        return None


@contextmanager
def _stop_signals() -> Iterator[_StopEvent]:
    """SIGINT and SIGTERM stop the study cleanly: the running trials are re-queued, MLflow is flushed, the
    lease released and :class:`StudyInterrupted` raised. While Ray Tune runs, the stop is handed to Tune's
    own interrupt (SIGUSR1: it ends its loop and stops the trials), so no exception ever lands in the middle
    of a storage transaction; elsewhere KeyboardInterrupt is raised. Handlers are restored afterwards."""
    stopped = _StopEvent()
    if threading.current_thread() is not threading.main_thread():
        yield stopped
        return

    def handler(signum: int, frame: Any) -> None:
        if stopped.is_set():
            return  # already stopping: let the clean-up finish
        stopped.signum = signum
        stopped.set()
        console.print(f"[yellow]{signal.Signals(signum).name}: stopping the study (running trials are "
                      "re-queued) ...[/]")
        if stopped.in_tune:
            os.kill(os.getpid(), signal.SIGUSR1)  # Tune's interrupt handler, installed while it runs
            return
        raise KeyboardInterrupt

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}

    def install() -> None:
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, handler)

    stopped.install = install  # type: ignore[method-assign]
    tune_handler = os.environ.get("TUNE_DISABLE_SIGINT_HANDLER")
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    try:
        yield stopped
    except KeyboardInterrupt:
        raise StudyInterrupted(stopped.signum) from None
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        if tune_handler is None:
            os.environ.pop("TUNE_DISABLE_SIGINT_HANDLER", None)
        else:
            os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = tune_handler


# -- preparation -------------------------------------------------------------------------------------------
def _make_planned_inputs(config: StudyConfig, pre: Preflight, progress: bool) -> None:
    """Synthesize the default corpus / train the default baseline when the preflight planned it (each
    built aside and moved into place, so an interrupted build is never taken as done), then check them."""
    from search.study.preflight import PreflightFailed, Problem, check_space

    for line in pre.plan:
        console.print(f"about to {line}", soft_wrap=True)
    if pre.synthesize_corpus:
        from lsv_core.data.synth import SynthConfig, synthesize_corpus

        assert config.data.corpus is not None
        build_dir(config.data.corpus, lambda tmp: synthesize_corpus(
            tmp, SynthConfig(seed=config.study.seed), progress=progress, overwrite=True))
    if pre.train_baseline:
        from lsv_core.train import TrainConfig, train_baseline

        paths = config.data_paths()
        tc = TrainConfig(seed=config.study.seed, device=config.device)
        if config.model.train_steps:
            tc.steps = config.model.train_steps
        train_baseline(tc, paths.train, out=config.model.checkpoint, eval_dir=paths.eval, trials=paths.trials,
                       cache_dir=config.data.cache_dir, progress=progress)
    if pre.synthesize_corpus or pre.train_baseline:
        fresh = preflight_study(config)  # what was just made, checked like everything else
        pre.baseline, pre.space, pre.train, pre.eval, pre.trials = (fresh.baseline, fresh.space, fresh.train,
                                                                    fresh.eval, fresh.trials)
    if pre.baseline is None or pre.space is None:  # cannot happen after a passing preflight
        problems: list[Problem] = []
        check_space(config, pre, problems)
        raise PreflightFailed(problems or [Problem("model.checkpoint", "the baseline could not be read")])


def _move_aside(config: StudyConfig) -> None:
    """``--fresh``: the study folder (and its SQLite stores) is renamed to a unique ``.old-*`` sibling."""
    from search.cluster.storage import sqlite_file

    study_dir = config.study_dir
    external = [u for u in (config.optuna_url, config.mlflow_uri)
                if not ((db := sqlite_file(u)) is not None and study_dir in db.resolve().parents)]
    if external:
        raise ConfigError(f"--fresh cannot start over a study kept outside its folder ({', '.join(map(redacted, external))}): "
                          "give the study a new name (study.name) instead")
    if not study_dir.exists():
        return
    stamp = time.strftime("%Y%m%d-%H%M%S")
    backup = study_dir.with_name(f"{study_dir.name}.old-{stamp}")
    n = 1
    while backup.exists():
        n += 1
        backup = study_dir.with_name(f"{study_dir.name}.old-{stamp}-{n}")
    os.replace(study_dir, backup)
    console.print(f"--fresh: moved the previous study to {backup}")


def _open_record(config: StudyConfig, study: optuna.Study, pre: Preflight) -> tuple[StudyRecord, bool]:
    """The study's record (created now for a new study); refuses a study made with another config."""
    record = stored_record(study)
    legacy = config.study_dir / "study.json"
    made_with = record.digest if record is not None else (
        json.loads(legacy.read_text()).get("digest") if legacy.exists() else None)
    if made_with is not None and made_with != config.digest():
        raise ConfigError(f"{config.study_dir} holds study {config.study.name!r} made with a different config "
                          f"(digest {made_with} != {config.digest()}); rerun with --fresh to start over "
                          "(the old study is moved aside, not deleted), or use another study.name")
    from lsv_core.export import CODEBOOK_ONNX_FORMAT

    if (record is None or record.size_format != CODEBOOK_ONNX_FORMAT) and study.get_trials(deepcopy=False):
        raise ConfigError(f"study {config.study.name!r} was made when sizes counted the packed tensors only; today "
                          f"they are the bytes of model.onnx ({CODEBOOK_ONNX_FORMAT}) and one front cannot mix the two: "
                          "rerun with --fresh (the old study is moved aside) or use another study.name")
    if record is None or record.layers is None:
        assert pre.baseline is not None
        record = _new_record(config, pre.baseline.model, pre.baseline.meta)
        save_record(study, config.study_dir, record)
    return record, made_with is not None


def _new_record(config: StudyConfig, model: Any, meta: dict[str, Any]) -> StudyRecord:
    """The record of a study about to be created from ``config`` and its loaded baseline."""
    from lsv_core import __version__
    from lsv_core.export import CODEBOOK_ONNX_FORMAT
    from lsv_core.quant import packed_size_bytes, quantizable_layers
    from lsv_core.quant.sensitivity import state_dict_digest

    return StudyRecord(name=config.study.name, digest=config.digest(), config=config.public_dump(),
                       layers=quantizable_layers(model), baseline_digest=state_dict_digest(model),
                       fp32_bytes=packed_size_bytes(model, BitRecipe({})), baseline_eval=meta.get("eval") or None,
                       lsv_version=__version__, size_format=CODEBOOK_ONNX_FORMAT)


def _sensitivities(config: StudyConfig, study: optuna.Study, record: StudyRecord, pre: Preflight, shared_ref: Any,
                   excluded: list[str]) -> dict[str, dict[int, float]]:
    """Ω per (layer, bits) from the baseline's Hessian traces (the record's, else computed on the driver or
    a worker as ``resources.hessian`` says, cached per baseline in ``<cache_dir>/hessian_traces.json``)."""
    from lsv_core.quant.sensitivity import quantization_errors, sensitivity

    assert pre.baseline is not None
    traces = dict(record.hessian_traces) if record.hessian_traces else None
    if traces is None:
        import torch

        t0 = time.monotonic()
        threads = max(1, int(config.resources.cpu)) if config.resources.hessian == "worker" else torch.get_num_threads()
        if config.resources.hessian == "worker":
            from search.cluster.ray_cluster import hessian_on_worker

            console.print("computing the baseline's Hessian traces on a worker ...")
            traces = hessian_on_worker(config, shared_ref, excluded)
        else:
            from lsv_core.workbench import Workbench

            console.print("computing the baseline's Hessian traces on the driver ...")
            bench = Workbench.load(config.workbench_spec().replace(codebook_dir=None), baseline=pre.baseline,
                                   progress=False)
            traces = bench.hessian_traces(cache_path=config.data.cache_dir / "hessian_traces.json",
                                          seed=config.study.seed)
        # What the traces cost (search.results.reading.CostSummary.sensitivity_fte); a cache hit costs its read.
        spent = {"wall_s": round(time.monotonic() - t0, 2), "threads": threads}
        record = record.with_traces(traces)
        save_record(study, config.study_dir, replace(record, extra={**record.extra, "hessian_cost": spent}))
    return sensitivity(traces, quantization_errors(pre.baseline.model, seed=config.study.seed))


def _unit_probes(config: StudyConfig, study: optuna.Study, record: StudyRecord, pre: Preflight, shared_ref: Any,
                 excluded: list[str]) -> StudyRecord:
    """Measure the unit probes the "probe" sampler's prior needs (:meth:`Workbench.probe`), on the driver or a
    worker as ``resources.hessian`` says, with one trial's CPU threads; stored in the study's record.
    ``wall_s`` counts the whole measurement, loading the data included (what the search paid for it)."""
    import dataclasses

    import torch

    from lsv_core.quant.probe import ProbeResult

    assert pre.baseline is not None and pre.space is not None
    units, choices = pre.space.unit_layers(), list(pre.space.choices)
    t0 = time.monotonic()
    if config.resources.hessian == "worker":
        from search.cluster.ray_cluster import probe_on_worker

        console.print(f"probing {len(units)} units on a worker ...")
        probes = ProbeResult.from_dict(probe_on_worker(config, shared_ref, excluded, units, choices))
    else:
        from lsv_core.workbench import Workbench

        console.print(f"probing {len(units)} units on the driver ...")
        threads = torch.get_num_threads()
        torch.set_num_threads(max(1, int(config.resources.cpu)))
        try:
            bench = Workbench.load(config.workbench_spec().replace(codebook_dir=None), baseline=pre.baseline,
                                   progress=False)
            probes = bench.probe(units, choices)
        finally:
            torch.set_num_threads(threads)
    probes = dataclasses.replace(probes, wall_s=time.monotonic() - t0)
    record = (stored_record(study) or record).with_probes(probes.to_dict())  # traces saved meanwhile stay
    save_record(study, config.study_dir, record)
    return record


def _seed_recipes(config: StudyConfig, space: SearchSpace, model: Any, omega: dict | None) -> list[tuple[str, BitRecipe]]:
    """Uniform recipes at each choice and the sensitivity allocator's recipes at several budgets."""
    from lsv_core.quant import packed_size_bytes

    seeds: list[tuple[str, BitRecipe]] = []
    if config.seeds.uniform:
        seeds += [(f"uniform-{tok}", space.uniform(tok)) for tok in space.choices]
    if omega is not None and config.seeds.allocator_fractions:
        from lsv_core.quant.sensitivity import allocate_bits

        fp32 = packed_size_bytes(model, BitRecipe({}))
        specs = [LayerSpec.from_token(t) for t in space.choices]
        bits = tuple(sorted({s.bits for s in specs}))
        binary = [s.mode for s in specs if s.bits == 1]
        for frac in config.seeds.allocator_fractions:
            budget = int(frac * fp32)
            try:
                rec = allocate_bits(model, omega, budget, bit_choices=bits,
                                    binary_mode="adaptive" if "adaptive" in binary or not binary else binary[0])
            except ConfigError:
                continue
            # Project onto the search space's units (the allocator works per layer).
            params = {f"b:{u}": _closest_token(rec, layers, space) for u, layers in space.units.items()}
            seeds.append((f"allocator-{frac:g}", space.recipe_from_params(params)))
    return seeds


def _closest_token(recipe: BitRecipe, layers: list[str], space: SearchSpace) -> str:
    tokens = [recipe[n].token if n in recipe else space.choices[-1] for n in layers]
    # A unit takes the widest of its layers' allocations, so the seed is never less precise than planned.
    return max(tokens, key=space.choices.index)


# -- recovery ----------------------------------------------------------------------------------------------
def _recover(study: optuna.Study, tracker: StudyTracker) -> None:
    """Close trials a dead driver left RUNNING (re-queue them) and log finished ones MLflow lacks.

    Only called while holding the study's lease, so no live driver owns those trials."""
    _requeue_running(study)
    _log_missing(study, tracker)


def _end_interrupted_session(study: optuna.Study) -> None:
    backend = getattr(study._storage, "_backend", study._storage)
    session = getattr(backend, "scoped_session", None)
    if session is not None:
        session.remove()


def _requeue_running(study: optuna.Study) -> None:
    """Close every RUNNING trial as failed ("interrupted") and enqueue its assignment again."""
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        try:
            study._storage.set_trial_user_attr(t._trial_id, "reason", INTERRUPTED)
            study.tell(t.number, state=TrialState.FAIL)
        except (RuntimeError, ValueError):  # finished meanwhile
            continue
        if t.params:
            study.enqueue_trial(t.params, user_attrs={"retry_of": t.number})


def _log_control(study: optuna.Study, tracker: StudyTracker) -> None:
    """The control's MLflow run (``lsv.role = control``), once: logging it again finds the existing one."""
    result = study.user_attrs.get(CONTROL_ATTR)
    if not isinstance(result, dict):
        return
    metrics = {k: result[k] for k in ("eer", "eer_ci_low", "eer_ci_high", "min_dcf", "min_dcf_001", "size_bytes")
               if k in result}
    metrics.update({f"cost_{k}": v for k, v in (result.get("cost") or {}).items()})
    from mlflow.utils.mlflow_tags import MLFLOW_RUN_NOTE

    metrics = rounded_metrics(metrics)
    note = (f"fp32 control: the baseline fine-tuned like every trial, nothing quantized — {result['eer']:.2f} % EER"
            + (f", {result['size_bytes'] / 1e3:.1f} kB" if result.get("size_bytes") else ""))
    tracker.log_side_run("control", "control-fp32", metrics, key="control",
                         tags={"lsv.state": "complete", CONTROL_TAG: "true", MLFLOW_RUN_NOTE: note})


def _log_missing(study: optuna.Study, tracker: StudyTracker) -> None:
    """Log the finished Optuna trials (and the control) that have no MLflow run yet (Optuna is the source
    of truth)."""
    from search.study.searcher import record_from

    _log_control(study, tracker)
    logged = tracker.logged_trials()
    state_names = {TrialState.COMPLETE: "complete", TrialState.PRUNED: "pruned", TrialState.FAIL: "failed"}
    for t in study.get_trials(deepcopy=False):
        if t.number in logged or t.state not in state_names:
            continue
        recipe = t.user_attrs.get("recipe", {})
        tracker.log_trial(record_from(t.number, state_names[t.state], recipe,
                                      {**t.user_attrs, "eer_boot": trial_boot(t)}, t.user_attrs.get("memoized_from")))
