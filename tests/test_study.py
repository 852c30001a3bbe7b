"""Studies end to end on a real local Ray, real Optuna SQLite storage and a real MLflow SQLite store.

Covers: trials logged once each, resume without duplicates, failures recorded with reasons (raise, NaN,
a worker process killed mid-trial and retried), the driver killed with SIGKILL and restarted, two studies
in one storage, and a two-node Ray cluster on this machine.
"""

from __future__ import annotations

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

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")


def child_runs(uri: str, name: str) -> list:
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(f"lsv/{name}")
    runs = client.search_runs([exp.experiment_id], "tags.`lsv.optuna_trial` != ''", max_results=1000)
    return runs


def test_study_logs_every_trial_once_and_resumes(tiny_study_inputs: dict[str, Path], tmp_path: Path) -> None:
    cfg = parse_study_config(study_raw_config(tiny_study_inputs, tmp_path, name="basic"))
    result = run_study(cfg, progress=False)
    study = optuna.load_study(study_name="basic", storage=cfg.optuna_url)
    assert len(study.trials) == 6 and all(t.state.is_finished() for t in study.trials)
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(complete) >= 4
    # The uniform seeds were enqueued first, one per choice.
    assert [t.user_attrs.get("seed") for t in study.trials[:4]] == ["uniform-1a", "uniform-2", "uniform-4", "uniform-8"]
    sizes = [t.values[1] for t in study.trials[:4]]
    assert sizes == sorted(sizes)
    for t in complete:
        if "memoized_from" not in t.user_attrs:
            assert Path(t.user_attrs["packed_path"]).is_file()
    runs = child_runs(cfg.mlflow_uri, "basic")
    numbers = sorted(int(r.data.tags["lsv.optuna_trial"]) for r in runs)
    assert numbers == list(range(6))
    run0 = next(r for r in runs if r.data.tags["lsv.optuna_trial"] == "0")
    assert run0.data.metrics["eer"] == pytest.approx(study.trials[0].values[0])
    assert run0.data.metrics["size_bytes"] == study.trials[0].values[1]
    assert run0.data.params["bits.conv1"] == "1a"
    assert result.status.n_complete == len(complete) and result.status.pareto_size >= 1
    # The baseline's initial codebooks were written once for the study's workers to share.
    codebooks = sorted(p.name for p in (cfg.study_dir / "codebooks").glob("*.safetensors"))
    assert codebooks and all(".k" in name for name in codebooks)

    resumed = run_study(cfg.with_overrides(n_trials=8), progress=False)
    assert resumed.resumed
    study = optuna.load_study(study_name="basic", storage=cfg.optuna_url)
    assert len(study.trials) == 8
    numbers = sorted(int(r.data.tags["lsv.optuna_trial"]) for r in child_runs(cfg.mlflow_uri, "basic"))
    assert numbers == list(range(8))  # no duplicate runs
    # A different config for the same study folder is refused rather than mixed in.
    from lsv_core.errors import ConfigError

    changed = parse_study_config(study_raw_config(tiny_study_inputs, tmp_path, name="basic", msft={"total_steps": 5}))
    with pytest.raises(ConfigError, match="different config"):
        run_study(changed, progress=False)
    # A study whose sizes were logged in the old unit (packed tensors) is not mixed with model.onnx bytes.
    from search.cluster.storage import read_record
    from search.results.record import save_record

    record, study = read_record(cfg)
    save_record(study, None, record.__class__.from_dict({**record.to_dict(), "size_format": None}))
    with pytest.raises(ConfigError, match="counted the packed tensors only"):
        run_study(cfg.with_overrides(n_trials=9), progress=False)
    save_record(study, None, record)


def test_failures_are_recorded_and_killed_worker_is_retried(tiny_study_inputs: dict[str, Path], tmp_path: Path) -> None:
    cfg = parse_study_config(study_raw_config(tiny_study_inputs, tmp_path, name="faults", study={"n_trials": 5},
                                              msft={"order": "depth", "total_steps": 4}))
    plan = {1: {"kind": "raise"}, 2: {"kind": "nan"}, 3: {"kind": "kill", "once_file": str(tmp_path / "killed")}}
    run_study(cfg, progress=False, fault_plan=plan)
    study = optuna.load_study(study_name="faults", storage=cfg.optuna_url)
    by_number = {t.number: t for t in study.trials}
    assert len(study.trials) == 5
    assert by_number[1].state == TrialState.FAIL and "injected failure" in by_number[1].user_attrs["reason"]
    assert by_number[2].state == TrialState.FAIL and "nan" in by_number[2].user_attrs["reason"]
    assert (tmp_path / "killed").exists()  # the worker really died once ...
    assert by_number[3].state == TrialState.COMPLETE  # ... and the retried trial finished
    assert by_number[0].state == by_number[4].state == TrialState.COMPLETE
    runs = {r.data.tags["lsv.optuna_trial"]: r for r in child_runs(cfg.mlflow_uri, "faults")}
    assert runs["1"].info.status == "FAILED" and "injected" in runs["1"].data.tags["lsv.reason"]
    assert runs["3"].info.status == "FINISHED"


def _complete_numbers(url: str, name: str) -> set[int]:
    """Completed trial numbers, read through a read-only SQLite connection: opening the study with Optuna
    while the driver is still creating the schema would race it (both would stamp alembic's version)."""
    import sqlite3

    path = Path(url.removeprefix("sqlite:///"))
    if not path.exists():
        return set()
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5) as con:
            rows = con.execute(
                "SELECT t.number FROM trials t JOIN studies s ON s.study_id = t.study_id "
                "WHERE s.study_name = ? AND t.state = 'COMPLETE'", (name,)).fetchall()
    except sqlite3.OperationalError:  # schema not created yet, or a write lock held right now
        return set()
    return {r[0] for r in rows}


def test_driver_sigkill_then_resume_loses_nothing(tiny_study_inputs: dict[str, Path], tmp_path: Path) -> None:
    import tomllib  # noqa: F401  (the config below is written as TOML by hand)

    raw = study_raw_config(tiny_study_inputs, tmp_path, name="crash", study={"n_trials": 8, "concurrency": 1})
    toml = tmp_path / "crash.toml"
    toml.write_text(to_toml(raw))
    cfg = parse_study_config(raw)
    log = tmp_path / "driver.log"
    proc = spawn_driver(["run", str(toml)], log)
    deadline = time.monotonic() + 240
    while len(_complete_numbers(cfg.optuna_url, "crash")) < 2:
        assert proc.poll() is None, "driver ended before it could be killed:\n" + log.read_text()[-3000:]
        assert time.monotonic() < deadline, "no trial completed in time"
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = _complete_numbers(cfg.optuna_url, "crash")
    # The killed driver's local Ray (its session folder ends in the driver's pid) dies with it; other Ray
    # instances on the machine are left alone.
    kill_ray_processes(rf"session_[\d_-]+_{proc.pid}(?!\d)")

    result = run_study(cfg, progress=False)
    assert result.resumed
    study = optuna.load_study(study_name="crash", storage=cfg.optuna_url)
    after = {t.number for t in study.trials if t.state == TrialState.COMPLETE}
    assert before <= after  # no completed trial lost
    interrupted = [t for t in study.trials if t.user_attrs.get("reason") == "interrupted (driver stopped)"]
    finished = [t for t in study.trials if t.state.is_finished()]
    assert len(finished) - len(interrupted) >= 8
    numbers = [int(r.data.tags["lsv.optuna_trial"]) for r in child_runs(cfg.mlflow_uri, "crash")]
    assert len(numbers) == len(set(numbers))  # no duplicate MLflow run
    assert set(numbers) == {t.number for t in finished}


def test_two_studies_in_one_storage_are_independent(tiny_study_inputs: dict[str, Path], tmp_path: Path) -> None:
    shared = {"optuna": f"sqlite:///{tmp_path / 'shared.db'}", "mlflow": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    a = parse_study_config(study_raw_config(tiny_study_inputs, tmp_path, name="a", storage=shared,
                                            study={"n_trials": 4}))
    b = parse_study_config(study_raw_config(tiny_study_inputs, tmp_path, name="b", storage=shared,
                                            study={"n_trials": 5, "sampler": "random"},
                                            space={"granularity": "stage", "bits": [2, 4]}))
    run_study(a, progress=False)
    run_study(b, progress=False)
    names = set(optuna.get_all_study_names(storage=shared["optuna"]))
    assert names == {"a", "b"}
    assert len(optuna.load_study(study_name="a", storage=shared["optuna"]).trials) == 4
    assert len(optuna.load_study(study_name="b", storage=shared["optuna"]).trials) == 5
    assert len(child_runs(shared["mlflow"], "a")) == 4 and len(child_runs(shared["mlflow"], "b")) == 5
    assert (tmp_path / "a").is_dir() and (tmp_path / "b").is_dir()


def test_two_node_cluster(tiny_study_inputs: dict[str, Path], tmp_path: Path) -> None:
    """`ray start --head` plus a second `ray start --address` node on 127.0.0.1, then `lsv run --address`
    (in its own process, as a user would run it): trials land on both nodes."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(ROOT)}
    port = "6391"
    raw = study_raw_config(tiny_study_inputs, tmp_path, name="cluster", study={"n_trials": 6, "concurrency": 2})
    toml = tmp_path / "cluster.toml"
    toml.write_text(to_toml(raw))
    try:
        subprocess.run([RAY, "start", "--head", "--port", port, "--num-cpus", "1", "--node-ip-address",
                        "127.0.0.1", "--include-dashboard", "false"], env=env, check=True, capture_output=True)
        subprocess.run([RAY, "start", "--address", f"127.0.0.1:{port}", "--num-cpus", "1",
                        "--node-ip-address", "127.0.0.1"], env=env, check=True, capture_output=True)
        run = subprocess.run([sys.executable, "-m", "search.cli", "run", str(toml), "--address", f"127.0.0.1:{port}"],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
        assert run.returncode == 0, run.stderr[-2000:]
        cfg = parse_study_config(raw)
        study = optuna.load_study(study_name="cluster", storage=cfg.optuna_url)
        nodes = {t.user_attrs.get("node_id") for t in study.trials if t.state == TrialState.COMPLETE} - {None}
        # The study's fp32 control runs beside the first trials with one trial's resources, so with one CPU
        # per node the work (trials and control) spreads over both nodes, not always the trials alone.
        nodes |= {study.user_attrs["lsv.control"]["node_id"]}
        assert len(nodes) == 2, [(t.number, t.state.name, t.user_attrs.get("reason")) for t in study.trials]

        # With the cluster still up, a study given no address starts its own Ray instead of joining it.
        beside = parse_study_config(study_raw_config(tiny_study_inputs, tmp_path, name="beside",
                                                     study={"n_trials": 2, "concurrency": 1}))
        run_study(beside, progress=False)
        own = optuna.load_study(study_name="beside", storage=beside.optuna_url)
        own_nodes = {t.user_attrs.get("node_id") for t in own.trials if t.state == TrialState.COMPLETE}
        assert own_nodes and not own_nodes & nodes
    finally:
        assert kill_ray_processes(rf"[:=]{port}(?!\d)")  # this cluster only, never `ray stop` (all of Ray)
        bootstrap = Path("/tmp/ray/ray_current_cluster")  # what `ray stop` would also have removed
        if bootstrap.exists() and f":{port}" in bootstrap.read_text():
            bootstrap.unlink()


