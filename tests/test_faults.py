"""Faults during a study: the driver stopped (SIGINT, SIGTERM), a worker node lost mid-trial, the disk
filling up while trials write their packed models, the MLflow server gone for a while. Each is done for
real to a driver running as a user runs it (`python -m search.cli run`, its own process); afterwards
nothing completed is lost, nothing is logged twice, and the study resumes to the end."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import mlflow
import optuna
import pytest
from optuna.trial import TrialState

from search.config import parse_study_config
from tests.conftest import kill_ray_processes, spawn_driver, study_raw_config, to_toml
from tests.services import RayCluster, unshare_available

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def _count(url: str, name: str, state: str) -> int:
    path = Path(url.removeprefix("sqlite:///"))
    if not path.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5) as con:
            return con.execute("SELECT COUNT(*) FROM trials t JOIN studies s ON s.study_id = t.study_id "
                               "WHERE s.study_name = ? AND t.state = ?", (name, state)).fetchone()[0]
    except sqlite3.OperationalError:
        return 0


def _wait(proc: subprocess.Popen, log: Path, cond, what: str, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert proc.poll() is None, f"driver ended before {what}:\n" + log.read_text()[-3000:]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.3)


def _trial_runs(uri: str, name: str) -> list:
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(f"lsv/{name}")
    return client.search_runs([exp.experiment_id], "tags.`lsv.role` = 'trial'", max_results=1000)


def _assert_consistent(cfg, name: str, n_trials: int) -> optuna.Study:
    """Every finished Optuna trial logged to MLflow exactly once; n_trials counted (re-queued ones aside)."""
    study = optuna.load_study(study_name=name, storage=cfg.optuna_url)
    assert not [t for t in study.trials if t.state == TrialState.RUNNING]
    finished = [t for t in study.trials if t.state.is_finished()]
    requeued = [t for t in finished if t.user_attrs.get("reason") == "interrupted (driver stopped)"]
    assert len(finished) - len(requeued) == n_trials
    numbers = [int(r.data.tags["lsv.optuna_trial"]) for r in _trial_runs(cfg.mlflow_uri, name)]
    assert sorted(numbers) == sorted({t.number for t in finished}), "lost or duplicated MLflow runs"
    return study


def test_sigint_and_sigterm_stop_cleanly_and_the_study_resumes(tiny_study_inputs: dict[str, Path],
                                                               tmp_path: Path) -> None:
    raw = study_raw_config(tiny_study_inputs, tmp_path, name="stops", study={"n_trials": 7, "concurrency": 1},
                           msft={"total_steps": 12, "batch_size": 16})
    toml = tmp_path / "stops.toml"
    toml.write_text(to_toml(raw))
    cfg = parse_study_config(raw)
    for signum, code, after in ((signal.SIGINT, 130, 1), (signal.SIGTERM, 143, 3)):
        log = tmp_path / f"driver-{signum}.log"
        proc = spawn_driver(["run", str(toml)], log)
        _wait(proc, log, lambda n=after: _count(cfg.optuna_url, "stops", "COMPLETE") >= n
              and _count(cfg.optuna_url, "stops", "RUNNING") >= 1, f"trial {after} running")
        if signum == signal.SIGINT:
            os.killpg(proc.pid, signum)  # as Ctrl-C does: the whole foreground group
        else:
            os.kill(proc.pid, signum)  # as `kill PID` does
        assert proc.wait(timeout=120) == code, log.read_text()[-3000:]
        kill_ray_processes(rf"session_[\d_-]+_{proc.pid}(?!\d)")
        text = log.read_text()
        assert "re-queued" in text and "Traceback" not in text, text[-3000:]
        study = optuna.load_study(study_name="stops", storage=cfg.optuna_url)
        assert not [t for t in study.trials if t.state == TrialState.RUNNING]  # closed, not left running
        assert [t for t in study.trials if t.user_attrs.get("reason") == "interrupted (driver stopped)"]
        assert [t for t in study.trials if t.state == TrialState.WAITING]  # ... and queued again
        lease = study.user_attrs["lsv.lease"]
        assert lease["released"] and lease["pid"] == proc.pid
    log = tmp_path / "driver-final.log"
    proc = spawn_driver(["run", str(toml)], log)
    assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]
    _assert_consistent(cfg, "stops", 7)


def test_worker_node_lost_mid_trial_is_retried_elsewhere(tiny_study_inputs: dict[str, Path], tmp_path: Path) -> None:
    raw = study_raw_config(tiny_study_inputs, tmp_path, name="lostnode", study={"n_trials": 4, "concurrency": 2},
                           msft={"total_steps": 40, "batch_size": 16}, resources={"max_failures": 2})
    toml = tmp_path / "lostnode.toml"
    toml.write_text(to_toml(raw))
    cfg = parse_study_config(raw)
    why = unshare_available()
    if why is not None:
        pytest.skip(why)
    (tmp_path / "nothing-hidden").mkdir()
    cluster = RayCluster(hidden=[tmp_path / "nothing-hidden"]).start()  # its own mount namespace
    try:
        log = tmp_path / "driver.log"
        proc = spawn_driver(["run", str(toml), "--address", cluster.address], log)
        # Two trials at once on two one-CPU nodes: one of them runs on the worker node.
        _wait(proc, log, lambda: _count(cfg.optuna_url, "lostnode", "RUNNING") >= 2, "two trials running")
        time.sleep(2)
        assert cluster.kill_worker_node() >= 2  # the whole worker node: raylet, its workers
        assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]
    finally:
        cluster.stop()
    study = _assert_consistent(cfg, "lostnode", 4)
    assert not [t for t in study.trials if t.state == TrialState.FAIL]  # retried, not failed
    assert len([t for t in study.trials if t.state == TrialState.COMPLETE]) == 4


def test_disk_full_while_writing_packed_models(tiny_study_inputs: dict[str, Path], tmp_path: Path) -> None:
    """The study folder on a small tmpfs that fills up mid-study: the trials that cannot write their packed
    model fail with the reason and the study goes on; after space is freed the rest succeeds."""
    why = unshare_available()
    if why is not None:
        pytest.skip(why)
    volume = tmp_path / "small"
    volume.mkdir()
    storage = {"optuna": f"sqlite:///{tmp_path / 'optuna.db'}", "mlflow": f"sqlite:///{tmp_path / 'mlflow.db'}",
               "ray_storage": str(tmp_path / "ray")}  # only the study folder is on the small volume
    raw = study_raw_config(tiny_study_inputs, volume / "runs", name="full", storage=storage,
                           study={"n_trials": 8, "concurrency": 1})
    toml = tmp_path / "full.toml"
    toml.write_text(to_toml(raw))
    cfg = parse_study_config(raw)
    # A mount namespace that outlives the driver, holding a 16 MB tmpfs over the volume.
    holder = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "bash", "-c",
                               f"mount -t tmpfs -o size=16m none {volume} && exec sleep 3600"],
                              start_new_session=True)
    inside = Path(f"/proc/{holder.pid}/root") / volume.relative_to("/")
    filler = inside / "filler"
    try:
        deadline = time.monotonic() + 30
        while not os.path.ismount(f"/proc/{holder.pid}/root{volume}"):
            assert time.monotonic() < deadline
            time.sleep(0.2)
        log = tmp_path / "driver.log"
        proc = spawn_driver(["run", str(toml)], log, prefix=["nsenter", "--mount", f"--target={holder.pid}"])
        _wait(proc, log, lambda: _count(cfg.optuna_url, "full", "COMPLETE") >= 2, "two trials")
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT)  # fill the volume to the last byte
        for chunk in (1 << 20, 4096, 1):
            try:
                while True:
                    os.write(fd, b"\0" * chunk)
            except OSError:
                pass
        os.close(fd)
        _wait(proc, log, lambda: _count(cfg.optuna_url, "full", "FAIL") >= 2, "two failed trials")
        filler.unlink()  # space again
        code = proc.wait(timeout=600)
        text = log.read_text()
        assert code == 3 and "Traceback" not in text, text[-3000:]
        assert "No space left on device" in text, text  # the failure summary names the reason
        study = _assert_consistent(cfg, "full", 8)
        failed = [t for t in study.trials if t.state == TrialState.FAIL]
        assert failed and all("No space left" in t.user_attrs["reason"] for t in failed)
        for t in study.trials:
            if t.state == TrialState.COMPLETE and "memoized_from" not in t.user_attrs:
                packed = Path(f"/proc/{holder.pid}/root{t.user_attrs['packed_path']}")
                assert packed.stat().st_size > 0
        leftovers = [p for p in inside.rglob("*.tmp")]
        assert not leftovers, leftovers  # no half-written file kept
    finally:
        holder.kill()
        holder.wait()


def test_mlflow_server_gone_for_a_while(tiny_study_inputs: dict[str, Path], mlflow_server, tmp_path: Path) -> None:
    """The tracking server dies mid-study and comes back: the trials go on, MLflow catches up at the end
    (Optuna holds every result), each trial logged once."""
    raw = study_raw_config(tiny_study_inputs, tmp_path, name="mlgone", storage={"mlflow": mlflow_server.uri},
                           study={"n_trials": 6, "concurrency": 1})
    toml = tmp_path / "mlgone.toml"
    toml.write_text(to_toml(raw))
    cfg = parse_study_config(raw)
    log = tmp_path / "driver.log"
    proc = spawn_driver(["run", str(toml)], log)
    try:
        _wait(proc, log, lambda: _count(cfg.optuna_url, "mlgone", "COMPLETE") >= 1, "a trial")
        mlflow_server.kill()
        _wait(proc, log, lambda: _count(cfg.optuna_url, "mlgone", "COMPLETE") >= 3, "trials while MLflow is gone")
        mlflow_server.start()
        assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]
    finally:
        if mlflow_server.proc is None or mlflow_server.proc.poll() is not None:
            mlflow_server.start()
    _assert_consistent(cfg, "mlgone", 6)
