"""MLflow tracking of a study (search/results/tracking.py) against a real SQLite store, read back through MlflowClient.

One SQLite store serves the whole module (its first initialisation costs seconds); each test uses its own
study name, which is itself the isolation the tracker promises.
"""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

import pytest
from mlflow import MlflowClient

from lsv_core.errors import ConfigError
from lsv_core.quant.recipe import BitRecipe
from search.results import tracking
from search.results.tracking import StudyTracker, TrialRecord, bits_param, default_tracking_uri

RECIPE = {"conv1": 8, "layer1.0.conv1": 4, "layer2.0.conv1": {"bits": 1, "mode": "static"}, "seg_1": 1}
CONFIG = {"study": {"name": "x", "trials": 20}, "search": {"bits": [1, 2, 4, 8]}, "notes": "demo"}
BASELINE = {"eer": 2.0, "size_bytes": 564_000}


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("study")
    StudyTracker.for_study_dir(path, "warmup")  # creates the schema once for the module
    return path


@pytest.fixture(scope="module")
def client(study_dir: Path) -> MlflowClient:
    return MlflowClient(tracking_uri=default_tracking_uri(study_dir))


def open_study(study_dir: Path, name: str) -> StudyTracker:
    tracker = StudyTracker.for_study_dir(study_dir, name)
    tracker.start_study(CONFIG, "cfg-1", BASELINE)
    return tracker


def record(number: int, state: str = "complete", **fields) -> TrialRecord:
    values = dict(
        recipe=RECIPE,
        avg_bits=3.25,
        eer=2.5,
        eer_ci_low=2.0,
        eer_ci_high=3.0,
        min_dcf=0.21,
        size_bytes=70_500,
        compression_ratio=8.0,
        stage_eers=[4.0, 3.0, 2.5],
        wall_s=12.5,
        config_hash=f"hash-{number}",
        ray_trial_id=f"ray_{number}",
    )
    values.update(fields)
    return TrialRecord(number=number, state=state, **values)


def local_path(artifact_uri: str) -> Path:
    return Path(url2pathname(urlparse(artifact_uri).path))


def trial_runs(client: MlflowClient, tracker: StudyTracker, number: int) -> list:
    return client.search_runs([tracker.experiment_id], f"tags.\"lsv.optuna_trial\" = '{number}'")


# ------------------------------------------------------------------------------------------- values


@pytest.mark.parametrize(
    ("spec", "text"),
    [
        (4, "4"),
        (8, "8"),
        (1, "1a"),
        ({"bits": 1, "mode": "static"}, "1s"),
        ({"bits": 1, "mode": "adaptive"}, "1a"),
    ],
)
def test_bits_param(spec, text: str) -> None:
    assert bits_param(spec) == text


def test_bad_bits_and_states_are_rejected() -> None:
    with pytest.raises(ConfigError, match="bits=5"):
        bits_param(5)
    with pytest.raises(ValueError, match="state='done'"):
        TrialRecord(number=0, state="done", recipe=RECIPE)


def test_default_uri_is_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert default_tracking_uri("s") == f"sqlite:///{tmp_path.resolve()}/s/mlflow.db"


@pytest.mark.parametrize(
    "uri", ["bogus://nowhere", "http://127.0.0.1:1", "sqlite:////proc/no/such/mlflow.db"]
)
def test_bad_uri_raises_config_error_naming_it(uri: str) -> None:
    with pytest.raises(ConfigError, match="tracking_uri=") as err:
        StudyTracker(uri, "s")
    assert uri in str(err.value)


# ------------------------------------------------------------------------------------------ parent run


def test_start_study_creates_one_parent_run(study_dir: Path, client: MlflowClient) -> None:
    tracker = StudyTracker.for_study_dir(study_dir, "parent")
    run_id = tracker.start_study(CONFIG, "cfg-1", BASELINE)
    assert tracker.start_study(CONFIG, "cfg-1", BASELINE) == run_id
    assert StudyTracker.for_study_dir(study_dir, "parent").start_study(CONFIG, "cfg-1", BASELINE) == run_id

    experiment = client.get_experiment(tracker.experiment_id)
    assert experiment.name == "lsv/parent"
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert experiment.artifact_location == (study_dir / "mlartifacts").resolve().as_uri()
    assert len(client.search_runs([tracker.experiment_id], "tags.\"lsv.role\" = 'study'")) == 1

    run = client.get_run(run_id)
    assert run.data.params["study.trials"] == "20"
    assert run.data.params["search.bits"] == "[1, 2, 4, 8]"
    assert run.data.params["notes"] == "demo"
    assert run.data.metrics == {"baseline_eer": 2.0, "baseline_size_bytes": 564_000.0}
    assert run.data.tags["lsv.study"] == "parent" and run.data.tags["lsv.config_hash"] == "cfg-1"
    assert client.get_metric_history(run_id, "baseline_eer")[0].value == 2.0
    assert len(client.get_metric_history(run_id, "baseline_eer")) == 1  # resuming logs nothing twice
    config_file = local_path(run.info.artifact_uri) / "config.json"
    assert config_file.is_relative_to(study_dir) and json.loads(config_file.read_text()) == CONFIG

    with pytest.raises(ConfigError, match="config_hash='cfg-2'"):
        tracker.start_study(CONFIG, "cfg-2", BASELINE)


def test_finish_then_resume(study_dir: Path, client: MlflowClient) -> None:
    tracker = open_study(study_dir, "finish")
    tracker.finish_study({"hypervolume": 0.75, "n_pareto": 4})
    run = client.get_run(tracker.parent_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["hypervolume"] == 0.75 and run.data.metrics["n_pareto"] == 4.0
    StudyTracker.for_study_dir(study_dir, "finish").start_study(CONFIG, "cfg-1", BASELINE)
    assert client.get_run(tracker.parent_run_id).info.status == "RUNNING"


def test_long_and_many_config_params_are_cut_and_chunked(study_dir: Path, client: MlflowClient) -> None:
    config = {f"layer{i}": i for i in range(150)} | {"long": "x" * 7000, "odd key!": 1}
    run_id = StudyTracker.for_study_dir(study_dir, "params").start_study(config, "c", {})
    params = client.get_run(run_id).data.params
    assert len(params) == 152
    assert len(params["long"]) == 6000 and params["long"].endswith("...")
    assert params["odd key_"] == "1"


# ------------------------------------------------------------------------------------------ trial runs


def test_log_trial_writes_a_nested_child_run(study_dir: Path, client: MlflowClient, tmp_path: Path) -> None:
    tracker = open_study(study_dir, "trial")
    model = tmp_path / "trial-3.bin"
    model.write_bytes(b"packed")
    run_id = tracker.log_trial(record(3, artifacts={"model/model.lsvq": str(model)}))
    assert run_id is not None

    run = client.get_run(run_id)
    # The name sorts in trial order; the description (MLflow's "Description") says the recipe in words.
    assert run.info.status == "FINISHED" and run.info.run_name.startswith("0003 2.50% 70.5kB 8 bit; layer1 4 bit; ")
    assert run.data.tags["mlflow.note.content"] == (
        "8 bit; layer1 4 bit; layer2 1 bit static; embedding 1 bit adaptive — 2.50 % EER, 70.5 kB, 8.0x")
    assert run.info.end_time - run.info.start_time == 12_500
    assert run.data.params == {
        "bits.conv1": "8",
        "bits.layer1.0.conv1": "4",
        "bits.layer2.0.conv1": "1s",
        "bits.seg_1": "1a",
        "avg_bits": "3.25",
    }
    assert run.data.metrics == {
        "eer": 2.5,
        "eer_ci_low": 2.0,
        "eer_ci_high": 3.0,
        "min_dcf": 0.21,
        "size_bytes": 70_500.0,
        "size_mb": 0.0705,
        "compression_ratio": 8.0,
        "avg_bits": 3.25,
        "wall_s": 12.5,
        "stage_eer": 2.5,  # the latest step
    }
    tags = run.data.tags
    assert tags["mlflow.parentRunId"] == tracker.parent_run_id
    assert tags["lsv.optuna_trial"] == "3" and tags["lsv.state"] == "complete"
    assert tags["lsv.ray_trial_id"] == "ray_3" and tags["lsv.config_hash"] == "hash-3"
    assert "lsv.reason" not in tags and "lsv.memoized_from" not in tags

    history = client.get_metric_history(run_id, "stage_eer")
    assert sorted((m.step, m.value) for m in history) == [(0, 4.0), (1, 3.0), (2, 2.5)]

    assert {a.path for a in client.list_artifacts(run_id)} == {"recipe.json", "model"}
    root = local_path(run.info.artifact_uri)
    assert root.is_relative_to(study_dir / "mlartifacts")
    assert (root / "model" / "model.lsvq").read_bytes() == b"packed"
    assert BitRecipe.from_json((root / "recipe.json").read_text()) == BitRecipe(RECIPE)
    assert tracker.logged_trials() == {3}


def test_failed_and_memoized_trials(study_dir: Path, client: MlflowClient, tmp_path: Path) -> None:
    tracker = open_study(study_dir, "failed")
    (tmp_path / "worker.log").write_text("Traceback ...")
    failed = tracker.log_trial(
        record(
            0,
            "failed",
            eer=None,
            stage_eers=[],
            reason="CUDA out of memory",
            artifacts={"worker.log": str(tmp_path / "worker.log")},
        )
    )
    memo = tracker.log_trial(record(1, memoized_from=0, wall_s=0.0))
    run = client.get_run(failed)
    assert run.info.status == "FAILED"
    assert run.data.tags["lsv.state"] == "failed" and run.data.tags["lsv.reason"] == "CUDA out of memory"
    assert "eer" not in run.data.metrics
    assert (local_path(run.info.artifact_uri) / "worker.log").read_text() == "Traceback ..."
    assert client.get_run(memo).data.tags["lsv.memoized_from"] == "0"


def test_same_trial_twice_and_after_restart_logs_once(study_dir: Path, client: MlflowClient) -> None:
    tracker = open_study(study_dir, "resume")
    assert tracker.log_trial(record(7)) is not None
    assert tracker.log_trial(record(7, eer=9.9)) is None

    restarted = open_study(study_dir, "resume")  # a new driver process on the same store
    assert restarted.logged_trials() == {7}
    assert restarted.log_trial(record(7, eer=9.9)) is None
    assert restarted.log_trial(record(8)) is not None
    assert len(trial_runs(client, tracker, 7)) == 1
    assert [r.data.tags["lsv.optuna_trial"] for r in restarted.child_runs()] == ["7", "8"]


def test_a_run_left_running_by_a_crash_is_replaced(study_dir: Path, client: MlflowClient) -> None:
    tracker = open_study(study_dir, "crash")
    stale = client.create_run(
        tracker.experiment_id,
        tags={"lsv.role": "trial", "lsv.optuna_trial": "2", "mlflow.parentRunId": tracker.parent_run_id},
    ).info.run_id
    restarted = open_study(study_dir, "crash")
    assert restarted.logged_trials() == set()
    new = restarted.log_trial(record(2))
    assert [r.info.run_id for r in trial_runs(client, tracker, 2)] == [new]
    assert client.get_run(stale).info.lifecycle_stage == "deleted"


def test_bad_artifact_leaves_no_run(study_dir: Path, client: MlflowClient, tmp_path: Path) -> None:
    tracker = open_study(study_dir, "badart")
    with pytest.raises(FileNotFoundError, match="model"):
        tracker.log_trial(record(0, artifacts={"model.lsvq": str(tmp_path / "missing.lsvq")}))
    assert tracker.child_runs() == [] and tracker.logged_trials() == set()


def test_log_trial_before_start_study_is_an_error(study_dir: Path) -> None:
    with pytest.raises(RuntimeError, match="start_study"):
        StudyTracker.for_study_dir(study_dir, "unstarted").log_trial(record(0))


def test_studies_in_one_store_are_isolated(study_dir: Path, client: MlflowClient) -> None:
    a, b = open_study(study_dir, "iso-a"), open_study(study_dir, "iso-b")
    a.log_trial(record(0))
    a.log_trial(record(1))
    assert b.log_trial(record(0)) is not None  # trial 0 of another study is not a duplicate
    assert a.experiment_id != b.experiment_id
    assert a.logged_trials() == {0, 1} and b.logged_trials() == {0}
    assert {r.info.experiment_id for r in b.child_runs()} == {b.experiment_id}
    assert {r.data.tags["mlflow.parentRunId"] for r in a.child_runs()} == {a.parent_run_id}


def test_search_by_state_tags_and_pagination(
    study_dir: Path, client: MlflowClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    tracker = open_study(study_dir, "search")
    for number, state in enumerate(["complete", "pruned", "complete", "failed", "complete"]):
        tracker.log_trial(record(number, state))
    complete = client.search_runs([tracker.experiment_id], "tags.\"lsv.state\" = 'complete'")
    assert sorted(r.data.tags["lsv.optuna_trial"] for r in complete) == ["0", "2", "4"]

    tracker.set_tags(complete[0].info.run_id, {"lsv.pareto": "true"})
    front = client.search_runs([tracker.experiment_id], "tags.\"lsv.pareto\" = 'true'")
    assert [r.info.run_id for r in front] == [complete[0].info.run_id]

    monkeypatch.setattr(tracking, "_SEARCH_PAGE", 2)  # forces three pages
    fresh = StudyTracker.for_study_dir(study_dir, "search")
    assert [int(r.data.tags["lsv.optuna_trial"]) for r in fresh.child_runs()] == [0, 1, 2, 3, 4]
    assert fresh.logged_trials() == {0, 1, 2, 3, 4}


def test_study_artifact_and_runs_url(study_dir: Path, client: MlflowClient, tmp_path: Path) -> None:
    tracker = open_study(study_dir, "report")
    plot = tmp_path / "pareto.html"
    plot.write_text("<html></html>")
    tracker.log_study_artifact(plot, "plots")
    assert [a.path for a in client.list_artifacts(tracker.parent_run_id, "plots")] == ["plots/pareto.html"]
    assert tracker.runs_url(port=5001) == f"http://127.0.0.1:5001/#/experiments/{tracker.experiment_id}/runs"


def test_tracking_thread_logs_in_order_and_survives_a_failing_call(
    study_dir: Path, client: MlflowClient, tmp_path: Path
) -> None:
    import threading

    from search.results.tracking import TrackingThread

    tracker = open_study(study_dir, "threaded")
    writer = TrackingThread()
    threads: list[str] = []
    writer.submit(lambda: threads.append(threading.current_thread().name))
    writer.submit(tracker.log_trial, record(0))
    writer.submit(tracker.log_trial, record(1, artifacts={"model.lsvq": str(tmp_path / "missing.lsvq")}))
    for n in (2, 3):
        writer.submit(tracker.log_trial, record(n))
    errors = writer.close()
    assert threads == ["lsv-tracking"]  # off the caller's thread
    assert len(errors) == 1 and "log_trial" in errors[0] and "missing.lsvq" in errors[0]
    runs = tracker.child_runs()
    assert [r.data.tags["lsv.optuna_trial"] for r in runs] == ["0", "2", "3"]
    assert [r.info.start_time for r in runs] == sorted(r.info.start_time for r in runs)  # submission order
    assert writer.close() == errors  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        writer.submit(tracker.log_trial, record(4))


def test_drivers_starting_together_on_a_new_mlflow_sqlite(tmp_path: Path) -> None:
    """MLflow makes and migrates its tables when a client first opens a store; without the lock, four
    trackers opening a new SQLite file together lost three of them on average, in every round
    (bench/open_race.py: "table ... already exists", "duplicate column name", an Alembic migration that
    "expected to match one row")."""
    from tests.conftest import at_once

    for i in range(3):
        uri = f"sqlite:///{tmp_path / f'new{i}' / 'mlflow.db'}"
        (tmp_path / f"new{i}").mkdir()
        got = at_once([lambda j=j, uri=uri: StudyTracker(uri, f"s{j}") for j in range(3)])
        assert got == ["ok"] * 3, got
        names = {e.name for e in MlflowClient(tracking_uri=uri).search_experiments()}
        assert {"lsv/s0", "lsv/s1", "lsv/s2"} <= names
