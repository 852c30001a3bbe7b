"""Browsing a study where users look: trials in words, the front within the noise, `lsv status` answers, and
(slow) a real study's parent run in MLflow: plots, front table and progress histories logged by `lsv run`
alone, run names, descriptions, few params and tags users can filter on."""

from __future__ import annotations

import ast
import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient

from lsv_core.errors import ConfigError
from search.results.describe import recipe_in_words, run_name, trial_description
from search.results.pareto import (
    TrialPoint,
    best_eer_with_size_at_most,
    knee_point,
    pareto_front,
    significant_front,
    significantly_better,
    smallest_with_eer_at_most,
)
from tests.conftest import study_raw_config, to_toml

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART_KNEE = {"conv1": 4, "layer1.0.conv1": 4, "layer1.0.conv2": 4, "layer2.0.conv1": 4, "layer2.0.conv2": 4,
                   "layer2.0.shortcut.0": 4, "layer3.0.conv1": 2, "layer3.0.conv2": 2, "layer3.0.shortcut.0": 2,
                   "layer4.0.conv1": 1, "layer4.0.conv2": 1, "layer4.0.shortcut.0": 1, "seg_1": 1}


# -- trials in words ------------------------------------------------------------------------------------------
def test_recipe_in_words_groups_blocks_and_names_the_exceptions() -> None:
    assert recipe_in_words(QUICKSTART_KNEE) == "4 bit; layer3 2 bit; layer4 and embedding 1 bit adaptive"
    assert trial_description(QUICKSTART_KNEE, eer=7.2431, size_bytes=34_512, compression_ratio=18.52) == (
        "4 bit; layer3 2 bit; layer4 and embedding 1 bit adaptive — 7.24 % EER, 34.5 kB, 18.5x")
    # One layer of a block differs: that layer is named, not the block.
    mixed = {**QUICKSTART_KNEE, "layer3.0.conv2": 8, "layer3.0.shortcut.0": {"bits": 1, "mode": "static"}}
    assert recipe_in_words(mixed) == ("4 bit; layer3.0.conv2 8 bit; layer3.0.conv1 2 bit; "
                                      "layer3.0.shortcut.0 1 bit static; layer4 and embedding 1 bit adaptive")
    assert recipe_in_words({"conv1": 8, "seg_1": 8}) == "8 bit everywhere"
    assert recipe_in_words({"conv1": None, "layer1.0.conv1": 2, "layer1.0.conv2": 2}) == "2 bit; conv1 fp32"
    assert recipe_in_words({}) == "fp32 (nothing quantized)"
    assert trial_description({}, state="failed", reason="over budget") == "no recipe — failed: over budget"
    assert trial_description({"conv1": 4}, eer=3.0, size_bytes=2000, memoized_from=2) == (
        "4 bit everywhere — 3.00 % EER, 2.0 kB (repeats trial 2)")


def test_run_names_sort_in_trial_order_and_stay_short() -> None:
    names = [run_name(n, QUICKSTART_KNEE, eer=7.2431, size_bytes=34_512) for n in (10, 2, 100, 1)]
    assert sorted(names) == [run_name(n, QUICKSTART_KNEE, eer=7.2431, size_bytes=34_512) for n in (1, 2, 10, 100)]
    # The runs table shows the name without picking columns: EER and size first, then the recipe.
    assert names[0].startswith("0010 7.24% 34.5kB 4 bit; layer3 2 bit; layer4") and all(len(n) <= 77 for n in names)
    assert run_name(3, {"conv1": 2}, state="failed") == "0003 failed 2 bit everywhere"


# -- the front within the noise -------------------------------------------------------------------------------
def _noisy_points(eers: list[float], sizes: list[int], spread: float, seed: int = 0) -> list[TrialPoint]:
    """Points whose bootstrap replicates share the trial list's noise (as the study's paired replicates do)."""
    rng = np.random.default_rng(seed)
    shared = rng.normal(0, spread, 200)
    out = []
    for n, (e, s) in enumerate(zip(eers, sizes, strict=True)):
        boot = tuple(e + shared + rng.normal(0, spread / 4, 200))
        out.append(TrialPoint(n, eer=e, size_bytes=s, eer_ci_low=e - 2 * spread, eer_ci_high=e + 2 * spread,
                              eer_boot=boot))
    return out


def test_significant_front_keeps_the_steps_the_noise_cannot_explain() -> None:
    # Front 0 -> 1 -> 2 -> 3; 2 gains 0.02 points over 1 (noise), 3 gains 2 points (real); 4 is off the front.
    pts = _noisy_points([10.0, 5.0, 4.98, 3.0, 6.0], [1000, 2000, 3000, 4000, 3500], spread=0.3)
    assert pareto_front(pts) == [0, 1, 2, 3]
    assert significant_front(pts) == [0, 1, 3]
    # Brute force of the definition: front points significantly better than every strictly smaller point.
    want = [j for j in pareto_front(pts)
            if all(significantly_better(pts[j], p) for p in pts if p.size_bytes < pts[j].size_bytes)]
    assert significant_front(pts) == want
    # With a tiny noise every front step is real; with a huge one only the smallest model stands.
    assert significant_front(_noisy_points([10.0, 5.0, 4.98, 3.0], [1, 2, 3, 4], spread=0.001)) == [0, 1, 2, 3]
    assert significant_front(_noisy_points([10.0, 5.0, 4.98, 3.0], [1, 2, 3, 4], spread=50.0)) == [0]
    assert significant_front([]) == []


# -- config and layering --------------------------------------------------------------------------------------
def test_report_every_is_validated_and_leaves_the_digest_alone(tmp_path: Path) -> None:
    from search.config import parse_study_config

    inputs = {"checkpoint": tmp_path / "c.safetensors", "corpus": tmp_path / "corpus", "cache": tmp_path / "cache"}
    with pytest.raises(ConfigError, match=r"study\.report_every \(got -1\)"):
        parse_study_config(study_raw_config(inputs, tmp_path, study={"report_every": -1}))
    with pytest.raises(ConfigError, match=r"study\.report_every"):
        parse_study_config(study_raw_config(inputs, tmp_path, study={"report_every": "4"}))
    a = parse_study_config(study_raw_config(inputs, tmp_path, study={"report_every": 0}))
    b = parse_study_config(study_raw_config(inputs, tmp_path, study={"report_every": 16}))
    assert a.study.report_every == 0 and a.digest() == b.digest()


def test_search_never_imports_dashboards_but_finds_its_renderer() -> None:
    for path in (ROOT / "search").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n.split(".")[0] == "dashboards" for n in names), f"{path.name} imports dashboards"
    from dashboards.browse import log_to_parent_run
    from search.results.renderers import load_renderers

    found = dict(load_renderers())
    assert found.get("parent_run") is log_to_parent_run, (
        f"entry point lsv.renderers:parent_run not registered (found {sorted(found)}): reinstall the project "
        "(pip install -e '.[dev]', make install) so its entry points are current")


def test_status_refuses_bad_questions_before_opening_the_study(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    from search.cli import main

    inputs = {"checkpoint": tmp_path / "c.safetensors", "corpus": tmp_path / "corpus", "cache": tmp_path / "cache"}
    toml = tmp_path / "s.toml"
    toml.write_text(to_toml(study_raw_config(inputs, tmp_path, name="never")))
    for flag, value, allowed in (("--max-eer", "150", ">= 0 and <= 100"), ("--max-size-mb", "0", "> 0")):
        with pytest.raises(SystemExit) as stop:  # the parser refuses it, naming the flag and the range
            main(["status", str(toml), flag, value])
        assert stop.value.code == 2
        assert f"argument {flag}: {value} should be {allowed}" in capsys.readouterr().err
    assert main(["status", str(toml), "--knee"]) == 2
    assert "has not been run yet" in capsys.readouterr().err.replace("\n", " ")
    with pytest.raises(SystemExit):  # argparse: one question at a time
        main(["status", str(toml), "--knee", "--max-eer", "5"])
    assert not (tmp_path / "never").exists()


# -- slow: a real study in MLflow -----------------------------------------------------------------------------
def _parent(client: MlflowClient, tracker) -> object:
    return client.get_run(tracker.parent_run_id)


@pytest.mark.slow
def test_lsv_run_alone_logs_plots_front_table_and_progress(browse_study: dict, tmp_path: Path) -> None:
    import matplotlib.image

    from search.results.reading import load_points
    from search.results.tracking import StudyTracker

    config = browse_study["config"]
    tracker = StudyTracker(config.mlflow_uri, "browse")
    client = MlflowClient(config.mlflow_uri)
    parent = tracker.parent_run_id
    files = {a.path for a in client.list_artifacts(parent)}
    assert {"pareto.png", "hypervolume_by_cost.png", "bits_heatmap.png", "front.csv", "front.json",
            "config.json"} <= files
    local = Path(client.download_artifacts(parent, "", str(tmp_path)))
    for png in ("pareto.png", "hypervolume_by_cost.png", "bits_heatmap.png"):
        assert float(np.std(matplotlib.image.imread(local / png))) > 0.01, png  # drawn, not blank

    # The front table is the study's front (Optuna's storage is the truth), smallest first.
    points = load_points(config)
    front = [points[i] for i in pareto_front(points)]
    rows = list(csv.DictReader(io.StringIO((local / "front.csv").read_text())))
    assert [int(r["trial"]) for r in rows] == [p.number for p in front]
    assert [int(r["size_bytes"]) for r in rows] == [p.size_bytes for p in front]
    assert all(r["recipe"] for r in rows) and json.loads((local / "front.json").read_text())["n_complete"] == len(points)

    # Refreshed during the study (report_every = 4): what a user saw after 6 finished trials was a drawing
    # of an unfinished study, not only the final one.
    mid = browse_study["mid_study_front"]
    assert mid is not None, "no front.json in the parent run while the study ran"
    assert 4 <= mid["n_complete"] < len(points)

    # Histories with one step per finished trial.
    st = browse_study["status"]
    finished = st.n_complete + st.n_failed + st.n_pruned
    history = {k: client.get_metric_history(parent, k) for k in ("hypervolume", "front_size",
                                                                  "best_eer_under_budget", "cost_fte")}
    for key, values in history.items():
        assert sorted(m.step for m in values) == list(range(1, finished + 1)), key
    hv = [m.value for m in sorted(history["hypervolume"], key=lambda m: m.step)]
    assert all(b >= a - 1e-9 for a, b in zip(hv, hv[1:], strict=False)) and hv[-1] > 0
    by_step = {k: max(v, key=lambda m: m.step).value for k, v in history.items()}
    assert by_step["front_size"] == st.pareto_size
    assert by_step["best_eer_under_budget"] == pytest.approx(st.best_eer_under_budget)
    assert by_step["cost_fte"] == pytest.approx(st.cost.total_fte)


@pytest.mark.slow
def test_trial_runs_are_named_described_and_carry_few_params(browse_study: dict) -> None:
    from search.results.reading import load_points
    from search.results.tracking import TRIAL_TAG, StudyTracker
    from search.study.run import PARENT_PARAMS

    config = browse_study["config"]
    tracker = StudyTracker(config.mlflow_uri, "browse")
    client = MlflowClient(config.mlflow_uri)
    runs = tracker.child_runs()
    assert [r.info.run_name for r in runs] == sorted(r.info.run_name for r in runs)
    points = {p.number: p for p in load_points(config)}
    for run in runs:
        number = int(run.data.tags[TRIAL_TAG])
        assert run.info.run_name.startswith(f"{number:04d} ")
        if number in points:
            assert run.info.run_name.startswith(f"{number:04d} {points[number].eer:.2f}% ")
        note = run.data.tags["mlflow.note.content"]
        if number in points:
            p = points[number]
            assert note.startswith(recipe_in_words(p.recipe) + " — ") and f"{p.eer:.2f} % EER" in note
        assert set(run.data.params) <= {"avg_bits"} | {k for k in run.data.params if k.startswith("bits.")}
    params = _parent(client, tracker).data.params
    assert set(params) <= set(PARENT_PARAMS) and "study.sampler" in params and len(params) <= 12
    logged = json.loads(Path(client.download_artifacts(tracker.parent_run_id, "config.json")).read_text())
    assert logged == config.public_dump()  # the whole config is one artifact


@pytest.mark.slow
def test_tags_select_the_front_its_noise_front_the_knee_and_the_control(browse_study: dict) -> None:
    from search.results.reading import load_points
    from search.results.tracking import TRIAL_TAG, StudyTracker

    config = browse_study["config"]
    tracker = StudyTracker(config.mlflow_uri, "browse")
    client = MlflowClient(config.mlflow_uri)
    points = load_points(config)

    def tagged(tag: str) -> set[int]:
        runs = client.search_runs([tracker.experiment_id], f'tags.{tag} = "true"')
        return {int(r.data.tags[TRIAL_TAG]) for r in runs if TRIAL_TAG in r.data.tags}

    front = {points[i].number for i in pareto_front(points)}
    significant = {points[i].number for i in significant_front(points)}
    assert tagged("pareto_optimal") == front
    assert tagged("pareto_optimal_ci") == significant and significant <= front and significant
    assert min(significant, key=lambda n: next(p.size_bytes for p in points if p.number == n)) in significant
    assert tagged("knee") == {points[knee_point(points)].number}
    control = client.search_runs([tracker.experiment_id], 'tags.control = "true"')
    assert len(control) == 1 and control[0].data.tags["lsv.role"] == "control"
    assert control[0].data.tags["mlflow.note.content"].startswith("fp32 control")


@pytest.mark.slow
def test_status_answers_the_anytime_questions_from_the_record(browse_study: dict,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    from search.cli import main
    from search.results.reading import load_points

    toml = str(browse_study["toml"])
    points = load_points(browse_study["config"])
    capsys.readouterr()

    def ask(*flags: str) -> dict:
        assert main(["status", toml, *flags, "--json"]) == 0
        return json.loads(capsys.readouterr().out)["selected"]

    knee = points[knee_point(points)]
    got = ask("--knee")
    assert got["number"] == knee.number and got["size_bytes"] == knee.size_bytes
    assert (got["eer"], got["eer_ci_low"], got["eer_ci_high"]) == (knee.eer, knee.eer_ci_low, knee.eer_ci_high)
    assert got["recipe"] == recipe_in_words(knee.recipe)
    eers = sorted({p.eer for p in points})
    limit = eers[len(eers) // 2]
    assert ask("--max-eer", str(limit))["number"] == points[smallest_with_eer_at_most(points, limit)].number
    sizes = sorted({p.size_bytes for p in points})
    mb = sizes[len(sizes) // 2] / 1e6
    assert ask("--max-size-mb", repr(mb))["number"] == points[best_eer_with_size_at_most(points, mb * 1e6)].number
    # Words without --json; a question no trial meets names the closest trials (exit 2).
    assert main(["status", toml, "--knee"]) == 0
    assert f"trial {knee.number}: EER {knee.eer:.2f} %" in capsys.readouterr().out
    assert main(["status", toml, "--max-eer", "0.001"]) == 2
    assert "no trial has EER <= 0.001 %. Closest: trial" in capsys.readouterr().err.replace("\n", " ")


@pytest.mark.slow
def test_export_tags_the_chosen_run(browse_study: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from search.cli import main
    from search.results.tracking import TRIAL_TAG, StudyTracker

    capsys.readouterr()
    assert main(["export", str(browse_study["toml"]), "--knee", "--out", str(tmp_path / "bundle")]) == 0
    result = json.loads(capsys.readouterr().out)
    tracker = StudyTracker(browse_study["config"].mlflow_uri, "browse")
    runs = MlflowClient(browse_study["config"].mlflow_uri).search_runs([tracker.experiment_id],
                                                                        'tags.exported = "true"')
    assert [int(r.data.tags[TRIAL_TAG]) for r in runs] == [result["source_trial"]]
    assert runs[0].data.tags["exported_as"].startswith("lsv-browse v")


@pytest.mark.slow
def test_a_study_stopped_by_ctrl_c_still_leaves_its_pictures(tiny_study_inputs: dict, tmp_path: Path) -> None:
    """``report_every = 0`` draws only when the study ends or stops: after SIGINT the parent run has the
    plots and the front table of the trials done so far."""
    import os
    import signal
    import time

    import optuna
    from optuna.trial import TrialState

    from search.config import parse_study_config
    from search.results.tracking import StudyTracker
    from tests.conftest import kill_ray_processes, spawn_driver

    raw = study_raw_config(tiny_study_inputs, tmp_path, name="stopped",
                           study={"n_trials": 8, "concurrency": 1, "report_every": 0},
                           msft={"total_steps": 12, "batch_size": 16})
    toml = tmp_path / "stopped.toml"
    toml.write_text(to_toml(raw))
    config = parse_study_config(raw)
    log = tmp_path / "driver.log"
    proc = spawn_driver(["run", str(toml)], log)

    def count(state: TrialState) -> int:
        try:
            study = optuna.load_study(study_name="stopped", storage=config.optuna_url)
        except Exception:  # noqa: BLE001 - not created yet
            return 0
        return len(study.get_trials(deepcopy=False, states=(state,)))

    deadline = time.monotonic() + 300
    while not (count(TrialState.COMPLETE) >= 2 and count(TrialState.RUNNING) >= 1):
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.3)
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=180) == 130, log.read_text()[-3000:]
    kill_ray_processes(rf"session_[\d_-]+_{proc.pid}(?!\d)")
    assert "Traceback" not in log.read_text() and "renderer" not in log.read_text(), log.read_text()[-3000:]
    tracker = StudyTracker(config.mlflow_uri, "stopped")
    client = MlflowClient(config.mlflow_uri)
    assert {"pareto.png", "front.csv", "front.json"} <= {a.path for a in client.list_artifacts(tracker.parent_run_id)}
    drawn = json.loads(Path(client.download_artifacts(tracker.parent_run_id, "front.json", str(tmp_path))).read_text())
    assert drawn["n_complete"] == count(TrialState.COMPLETE) >= 2
