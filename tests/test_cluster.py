"""Studies on a real multi-node Ray cluster with PostgreSQL and an MLflow server, and no shared filesystem.

The worker node's processes run in their own mount namespace where the driver's study folder is hidden
under an empty tmpfs (or the data is), so anything that only works through a shared path fails here.
Services are real and started by the tests on 127.0.0.1 (tests/services.py).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import optuna
import pytest
from optuna.trial import TrialState

from search.config import parse_study_config
from search.study.run import run_study
from tests.conftest import kill_ray_processes, spawn_driver, study_raw_config, to_toml
from tests.services import RayCluster, unshare_available

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def namespaces() -> None:
    why = unshare_available()
    if why is not None:
        pytest.skip(why)


def _wait_for_nodes(address: str, n: int = 2, timeout_s: float = 120.0) -> None:
    """Until ``n`` nodes are alive (asked through `ray status`, so this process never joins the cluster:
    re-initialising Ray in one process after an earlier ray.shutdown() is not reliable)."""
    ray = str(Path(sys.executable).parent / "ray")
    deadline = time.monotonic() + timeout_s
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    while True:
        out = subprocess.run([ray, "status", "--address", address], capture_output=True, text=True, env=env)
        active = out.stdout.split("Active:", 1)[-1].split("Pending:", 1)[0]
        if active.count("node_") >= n:
            return
        assert time.monotonic() < deadline, f"the Ray nodes did not come up: {out.stdout[-1000:]} {out.stderr[-500:]}"
        time.sleep(1)


def _lsv(args: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """`lsv ...` in its own process, as a user runs it."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled"}
    return subprocess.run([sys.executable, "-m", "search.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _files_containing(roots: list[Path], needle: bytes) -> list[Path]:
    hits = []
    for root in roots:
        for path in root.rglob("*"):
            if path.is_file() and not path.is_symlink():
                try:
                    if needle in path.read_bytes():
                        hits.append(path)
                except OSError:
                    continue
    return hits


def test_cluster_study_postgres_mlflow_server_no_shared_filesystem(
        namespaces: None, tiny_study_inputs: dict[str, Path], postgres, mlflow_server, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from lsv_core.export.packed import load_packed
    from search.cli import main

    driver = tmp_path / "driver"
    driver.mkdir()
    storage = {"optuna": postgres.create_database("cluster_study"), "mlflow": mlflow_server.uri}
    raw = study_raw_config(tiny_study_inputs, driver / "runs", name="onfs", storage=storage,
                           study={"n_trials": 5, "concurrency": 2})
    toml = driver / "onfs.toml"
    toml.write_text(to_toml(raw))
    # The head node (the driver's, which sees the study folder) gets no CPUs, so every trial and the
    # control run on the worker node, where the driver's folder is hidden: placement is never left to chance.
    cluster = RayCluster(hidden=[driver], head_cpus=0, worker_cpus=2).start()
    try:
        _wait_for_nodes(cluster.address)
        driver_run = _lsv(["run", str(toml), "--address", cluster.address], cwd=driver)
    finally:
        cluster.stop()
    assert driver_run.returncode == 0, driver_run.stderr[-3000:]
    study = optuna.load_study(study_name="onfs", storage=storage["optuna"])
    trained = [t for t in study.trials if t.state == TrialState.COMPLETE and "memoized_from" not in t.user_attrs]
    assert len([t for t in study.trials if t.state == TrialState.COMPLETE]) >= 4
    assert not [t for t in study.trials if t.state == TrialState.FAIL]
    nodes = {t.user_attrs["node_id"] for t in trained} | {study.user_attrs["lsv.control"]["node_id"]}
    assert len(nodes) == 1, f"trials ran on the driver's node too: {nodes}"
    for t in trained:  # every packed model reached the driver's study folder, wherever it was trained
        assert Path(t.user_attrs["packed_path"]).is_file() and str(driver) in t.user_attrs["packed_path"]

    # Every child run's packed model is in the tracking server's artifact store and loads.
    client = mlflow.MlflowClient(storage["mlflow"])
    exp = client.get_experiment_by_name("lsv/onfs")
    assert exp.artifact_location.startswith("mlflow-artifacts:"), exp.artifact_location
    runs = client.search_runs([exp.experiment_id], "tags.`lsv.role` = 'trial'", max_results=100)
    assert {int(r.data.tags["lsv.optuna_trial"]) for r in runs} == {t.number for t in study.trials}
    for t in trained:
        run = next(r for r in runs if r.data.tags["lsv.optuna_trial"] == str(t.number))
        local = client.download_artifacts(run.info.run_id, "model.packed.safetensors", str(tmp_path / f"dl{t.number}"))
        assert load_packed(local) is not None and os.path.getsize(local) > 0

    # Report and export from a third folder that has only the two URIs (and the data): the driver's
    # study folder is gone, so the packed model comes from the tracking server.
    third = tmp_path / "third"
    third.mkdir()
    (driver / "runs").rename(tmp_path / "driver-runs-moved")
    raw_third = {**raw, "study": {**raw["study"], "out_dir": "runs"}}
    toml = third / "study.toml"
    toml.write_text(to_toml(raw_third))
    monkeypatch.chdir(third)
    assert main(["report", str(toml)]) == 0
    assert (third / "runs" / "onfs" / "report" / "index.html").is_file()
    assert main(["status", str(toml)]) == 0
    assert main(["export", str(toml), "--knee", "--out", "bundle"]) == 0
    bundle = third / "bundle"
    assert (bundle / "model.packed.safetensors").is_file() and (bundle / "model_card.md").is_file()
    provenance = json.loads((bundle / "recipe.json").read_text())["provenance"]
    assert "***" in provenance["optuna_storage"]

    # The database password is in no file the study, the report or the export wrote, nor in any MLflow
    # param, tag or artifact (the server's store and artifact root are grepped whole), nor in the logs.
    secret = postgres.password.encode()
    written = [tmp_path / "driver-runs-moved", third / "runs", bundle, mlflow_server.root]
    assert _files_containing(written, secret) == []
    for run in client.search_runs([exp.experiment_id], "", max_results=1000):
        text = json.dumps({**run.data.params, **run.data.tags})
        assert postgres.password not in text
    out = capsys.readouterr()
    assert postgres.password not in out.out + out.err + driver_run.stdout + driver_run.stderr


def _completed(url: str, name: str) -> set[int]:
    from sqlalchemy import create_engine, text

    engine = create_engine(url)
    try:
        with engine.connect() as con:
            rows = con.execute(text(
                "SELECT t.number FROM trials t JOIN studies s ON s.study_id = t.study_id "
                "WHERE s.study_name = :n AND t.state = 'COMPLETE'"), {"n": name}).fetchall()
    except Exception:  # noqa: BLE001 - schema not created yet
        return set()
    finally:
        engine.dispose()
    return {r[0] for r in rows}


def test_driver_sigkill_resume_and_second_driver_against_postgres(
        tiny_study_inputs: dict[str, Path], postgres, mlflow_server, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    from search.cli import main

    url = postgres.create_database("crash_study")
    raw = study_raw_config(tiny_study_inputs, tmp_path, name="pgcrash",
                           storage={"optuna": url, "mlflow": mlflow_server.uri},
                           study={"n_trials": 8, "concurrency": 1})
    toml = tmp_path / "pgcrash.toml"
    toml.write_text(to_toml(raw))
    cfg = parse_study_config(raw)
    log = tmp_path / "driver.log"
    proc = spawn_driver(["run", str(toml)], log)
    try:
        deadline = time.monotonic() + 300
        while len(_completed(url, "pgcrash")) < 1:
            assert proc.poll() is None, "driver ended early:\n" + log.read_text()[-3000:]
            assert time.monotonic() < deadline, "no trial completed in time"
            time.sleep(0.5)
        # A second driver on the live study is refused, naming the first (nothing started).
        assert main(["run", str(toml)]) == 2
        err = capsys.readouterr().err.replace("\n", " ")
        assert "another driver" in err and f"pid {proc.pid}" in err
        while len(_completed(url, "pgcrash")) < 2:
            assert proc.poll() is None, "driver ended early:\n" + log.read_text()[-3000:]
            assert time.monotonic() < deadline, "no second trial in time"
            time.sleep(0.5)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        kill_ray_processes(rf"session_[\d_-]+_{proc.pid}(?!\d)")
    before = _completed(url, "pgcrash")
    result = run_study(cfg, progress=False)  # takes the dead driver's lease over at once (same host)
    assert result.resumed
    study = optuna.load_study(study_name="pgcrash", storage=url)
    after = {t.number for t in study.trials if t.state == TrialState.COMPLETE}
    assert before <= after
    finished = [t for t in study.trials if t.state.is_finished()]
    interrupted = [t for t in finished if t.user_attrs.get("reason") == "interrupted (driver stopped)"]
    assert len(finished) - len(interrupted) >= 8
    client = mlflow.MlflowClient(cfg.mlflow_uri)
    exp = client.get_experiment_by_name("lsv/pgcrash")
    numbers = [int(r.data.tags["lsv.optuna_trial"])
               for r in client.search_runs([exp.experiment_id], "tags.`lsv.role` = 'trial'", max_results=1000)]
    assert len(numbers) == len(set(numbers)) and set(numbers) == {t.number for t in finished}


def test_node_without_the_data_is_named_before_any_trial(
        namespaces: None, tiny_study_inputs: dict[str, Path], tmp_path: Path) -> None:
    corpus = tiny_study_inputs["corpus"]
    raw = study_raw_config(tiny_study_inputs, tmp_path, name="nodata", study={"n_trials": 3, "concurrency": 2})
    toml = tmp_path / "nodata.toml"
    toml.write_text(to_toml(raw))
    cluster = RayCluster(hidden=[corpus]).start()
    try:
        _wait_for_nodes(cluster.address)
        run = _lsv(["run", str(toml), "--address", cluster.address], cwd=tmp_path)
        assert run.returncode == 2, run.stderr[-3000:]
        err = " ".join(run.stderr.split())
        assert "problem(s) found before starting the trials" in err and "Traceback" not in run.stderr
        bad = [line for line in err.split(" - ")[1:] if "does not exist" in line]
        assert len(bad) == 1 and bad[0].startswith("node ") and "(127.0.0.1)" in bad[0], err[-2000:]
        assert str(corpus / "train") in bad[0] and "resources.bad_nodes" in bad[0]
        cfg = parse_study_config(raw)
        assert not cfg.study_dir.exists()  # checked before the study was created: nothing left behind

        # With bad_nodes = "skip" the study goes on without that node.
        raw["resources"] = {"bad_nodes": "skip"}
        toml.write_text(to_toml(raw))
        run = _lsv(["run", str(toml), "--address", cluster.address], cwd=tmp_path)
        assert run.returncode == 0, run.stderr[-3000:]
        assert "going on without 1 node" in " ".join(run.stderr.split())
    finally:
        cluster.stop()
    study = optuna.load_study(study_name="nodata", storage=cfg.optuna_url)
    done = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(done) >= 2 and len({t.user_attrs.get("node_id") for t in done} - {None}) == 1
