"""A driver whose lease was taken over stops: it asks, trains and tells nothing more, and exits 4.

The first tests drive the lease, the searcher and Tune's stopper directly on a real Optuna SQLite study. The
slow ones run two real drivers (``python -m search.cli run``) on one study, in SQLite and in a throwaway
PostgreSQL, on one Ray cluster: driver A is frozen (SIGSTOP) mid-study, B takes the study over after
``storage.lease_timeout_s``, A is woken (SIGCONT) and must stop without telling any further trial; B finishes
the study, with no trial told twice and no duplicate MLflow run.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from lsv_core.models import build_model
from lsv_core.quant import packed_size_bytes
from search.cluster.lease import LEASE_ATTR, DriverLease, LeaseLost
from search.cluster.storage import rdb_storage
from search.config import SpaceSection
from search.results.tracking import TrialRecord
from search.space import SearchSpace
from search.study.scheduler import LeaseStopper
from search.study.searcher import AskTellSearcher

MODEL = build_model("ThinResNet", m_channels=4, first_stride=2, embed_dim=32)


def _study(url: str) -> optuna.Study:
    return optuna.create_study(study_name="s", storage=url, directions=["minimize", "minimize"],
                               load_if_exists=True, sampler=optuna.samplers.RandomSampler(seed=0))


def _stall(lease: DriverLease) -> None:
    """The driver hangs: its heartbeat stops, the lease is not released."""
    lease._stop.set()
    assert lease._thread is not None
    lease._thread.join()


def test_a_displaced_driver_asks_and_tells_nothing_more(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'o.db'}"
    study = _study(url)
    a = DriverLease(study, timeout_s=1.0, settle_s=0.05, recheck_s=0.2)
    a.acquire()
    space = SearchSpace.build(MODEL, SpaceSection(granularity="stage", bits=[2, 4]))
    records: list[TrialRecord] = []
    searcher = AskTellSearcher(study, space, size_of=lambda r: packed_size_bytes(MODEL, r), budget_bytes=None,
                               make_config=lambda r, n: {"recipe": r.to_dict(), "optuna_trial": n},
                               sink=records.append)
    searcher.lease = a
    stopper = LeaseStopper(a)
    assert searcher.suggest("t1") is not None and searcher.suggest("t2") is not None
    assert study.trials[0].user_attrs["driver"] == a.holder
    assert a.holds() and not stopper.stop_all()
    searcher.on_trial_complete("t1", {"final": True, "eer": 3.0, "size_bytes": 10, "stage_eers": [3.0]})
    assert study.trials[0].state == TrialState.COMPLETE

    _stall(a)
    time.sleep(1.3)
    b = DriverLease(_study(url), timeout_s=1.0, settle_s=0.05)
    b.acquire()  # takes over; its recovery would close and re-queue A's running trial
    try:
        assert b.taken_over is not None and b.taken_over.token == a.token
        assert stopper.stop_all()  # Tune ends A's run at its next step
        assert not a.holds() and a.lost.is_set()
        with pytest.raises(LeaseLost, match=rf"taken over by another driver \(host \S+, pid {os.getpid()}"):
            a.check()
        n_before = len(study.trials)
        assert searcher.suggest("t3") is None  # nothing asked
        assert len(study.trials) == n_before
        searcher.on_trial_complete("t2", {"final": True, "eer": 2.0, "size_bytes": 10, "stage_eers": [2.0]})
        assert study.trials[1].state == TrialState.RUNNING  # nothing told: it is B's to re-queue
        assert len(records) == 1
        a.release()  # a displaced driver's release leaves B's lease alone
        held = study.user_attrs[LEASE_ATTR]
        assert held["token"] == b.token and not held["released"]
    finally:
        b.release()


def test_a_frozen_driver_reads_the_lease_before_its_first_step(tmp_path: Path) -> None:
    """A driver frozen longer than the recheck period does not trust its last confirmation: its first call
    reads the storage, before its heartbeat thread has had a chance to notice."""
    url = f"sqlite:///{tmp_path / 'o.db'}"
    a = DriverLease(_study(url), timeout_s=60.0, settle_s=0.05, recheck_s=0.3)
    a.acquire()
    try:
        assert a.holds()
        # Another driver writes its lease (as a takeover does); A's heartbeat (every 15 s) has not run since.
        now = time.time()
        _study(url).set_user_attr(LEASE_ATTR, {"token": "other", "host": "elsewhere", "pid": 1, "since": now,
                                               "heartbeat": now})
        time.sleep(0.4)
        assert not a.holds()
        assert a.taken_by is not None and a.taken_by.host == "elsewhere"
    finally:
        a.release()
    assert _study(url).user_attrs[LEASE_ATTR]["token"] == "other"


# -- two real drivers ----------------------------------------------------------------------------------------
def _trials(url: str) -> list[optuna.trial.FrozenTrial]:
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).exists():
        return []  # the driver has not made it yet (a read would create it)
    try:  # opened as the drivers open it: this poll may be the one that meets a driver making the tables
        return optuna.load_study(study_name="twodrivers", storage=rdb_storage(url)).get_trials(deepcopy=False)
    except KeyError:  # not created yet
        return []


def _wait(procs: list, what: str, cond, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        for proc, log in procs:
            assert proc.poll() is None, f"driver ended before {what}:\n" + log.read_text()[-3000:]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def _two_drivers(inputs: dict[str, Path], tmp_path: Path, optuna_url: str | None) -> None:
    import mlflow

    from search.config import parse_study_config
    from tests.conftest import spawn_driver, study_raw_config, to_toml
    from tests.services import RayHead

    n_trials = 8
    storage = {"lease_timeout_s": 5}
    if optuna_url is not None:
        storage["optuna"] = optuna_url
    head = RayHead(cpus=4).start()
    storage["ray_address"] = head.address
    raw = study_raw_config(inputs, tmp_path, name="twodrivers", study={"n_trials": n_trials, "concurrency": 1},
                           msft={"total_steps": 12, "batch_size": 16}, storage=storage,
                           early_stop={"enabled": True, "min_peers": 2})
    toml = tmp_path / "twodrivers.toml"
    toml.write_text(to_toml(raw))
    cfg = parse_study_config(raw)
    url = cfg.optuna_url
    log_a, log_b = tmp_path / "a.log", tmp_path / "b.log"
    a = spawn_driver(["run", str(toml)], log_a)
    b = None
    try:
        me_a = None

        def a_mid_study() -> bool:
            ts = _trials(url)
            return (any(t.state == TrialState.COMPLETE for t in ts)
                    and any(t.state == TrialState.RUNNING and t.user_attrs.get("driver") for t in ts))

        _wait([(a, log_a)], "A mid-study", a_mid_study)
        os.kill(a.pid, signal.SIGSTOP)  # A hangs: no heartbeat, no progress, the lease not released
        me_a = next(t.user_attrs["driver"] for t in _trials(url) if t.user_attrs.get("driver"))
        assert me_a.endswith(f":{a.pid}")
        b = spawn_driver(["run", str(toml)], log_b)

        def b_took_over() -> bool:
            study = optuna.load_study(study_name="twodrivers", storage=url)
            ts = study.get_trials(deepcopy=False)
            return (study.user_attrs.get(LEASE_ATTR, {}).get("pid") == b.pid
                    and not any(t.state == TrialState.RUNNING and t.user_attrs.get("driver") == me_a for t in ts))

        _wait([(b, log_b)], "B's takeover and recovery", b_took_over)
        a_trials = {t.number: t.state for t in _trials(url) if t.user_attrs.get("driver") == me_a}
        t_cont = time.time()
        os.kill(a.pid, signal.SIGCONT)
        # A notices at its first step (the lease is read back before it asks or tells), well within one
        # heartbeat (timeout/4 = 1.25 s; 1 s more for the OS to wake a process on a busy machine).
        while "taken by another driver" not in log_a.read_text() and a.poll() is None:
            time.sleep(0.05)
        noticed_after = time.time() - t_cont
        assert noticed_after < 1.25 + 1.0, (noticed_after, log_a.read_text()[-3000:])
        assert a.wait(timeout=180) == 4, log_a.read_text()[-3000:]
        stopped_after = time.time() - t_cont
        text = log_a.read_text()
        assert "lease lost" in text and "taken over by another driver" in text and f"pid {b.pid}" in text, text[-3000:]
        assert "Traceback" not in text, text[-3000:]
        # Nothing asked or told by A after it woke: its trials are those it had, in the states B left them.
        after = {t.number: t for t in _trials(url) if t.user_attrs.get("driver") == me_a}
        assert {n: t.state for n, t in after.items()} == a_trials
        assert all(t.datetime_complete is not None and t.datetime_complete.timestamp() < t_cont
                   for t in after.values())
        assert b.wait(timeout=600) == 0, log_b.read_text()[-3000:]
        assert "taking over the study" in log_b.read_text()
    finally:
        for proc in (a, b):
            if proc is not None and proc.poll() is None:
                os.kill(proc.pid, signal.SIGCONT)
                os.killpg(proc.pid, signal.SIGKILL)
        head.stop()
    # The study ends consistent: every trial finished once, each in MLflow exactly once, n_trials counted.
    study = optuna.load_study(study_name="twodrivers", storage=url)
    trials = study.get_trials(deepcopy=False)
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    requeued = [t for t in trials if t.user_attrs.get("reason") == "interrupted (driver stopped)"]
    assert requeued and all(t.user_attrs["driver"] == me_a for t in requeued)
    assert len([t for t in trials if t.state.is_finished()]) - len(requeued) == n_trials
    client = mlflow.MlflowClient(cfg.mlflow_uri)
    exp = client.get_experiment_by_name("lsv/twodrivers")
    runs = client.search_runs([exp.experiment_id], "tags.`lsv.role` = 'trial'", max_results=1000)
    numbers = [int(r.data.tags["lsv.optuna_trial"]) for r in runs]
    assert sorted(numbers) == sorted(t.number for t in trials), "lost or duplicated MLflow runs"
    # The early stopper's per-stage history is in the storage, ready for a resume.
    trained = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
               and "memoized_from" not in t.user_attrs]
    assert trained and all(isinstance(t.user_attrs.get("stage_plan"), str) and t.user_attrs.get("stage_eers")
                           for t in trained)
    print(f"A noticed the takeover {noticed_after:.2f} s and exited {stopped_after:.1f} s after it was woken")


@pytest.mark.slow
def test_two_drivers_on_sqlite(tiny_study_inputs: dict[str, Path], tmp_path: Path) -> None:
    _two_drivers(tiny_study_inputs, tmp_path, None)


@pytest.mark.slow
def test_two_drivers_on_postgres(tiny_study_inputs: dict[str, Path], tmp_path: Path, postgres) -> None:
    _two_drivers(tiny_study_inputs, tmp_path, postgres.create_database("lease_enforced"))
