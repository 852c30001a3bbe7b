"""Report, plots and Pareto tags: figures from synthetic points (fast), then one real small study (slow):
tags in the real MLflow store, the report's files and artifacts, and the page drawn by headless Chromium.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import mlflow
import numpy as np
import optuna
import pytest

from dashboards.plots import (
    Baseline,
    bits_heatmap_figure,
    bits_token,
    pareto_figure,
    save_bits_heatmap_png,
    save_pareto_png,
)
from search.results.pareto import TrialPoint, pareto_front, pareto_ranks
from search.results.reading import load_points, refresh_pareto_tags
from tests.conftest import study_raw_config, to_toml

RECIPE_A = {"conv1": 8, "layer1.0.conv1": {"bits": 1, "mode": "static"}, "seg_1": 2}
RECIPE_B = {"conv1": 4, "layer1.0.conv1": 4, "seg_1": 4}


def synthetic_points() -> list[TrialPoint]:
    return [
        TrialPoint(0, eer=9.0, size_bytes=1000, eer_ci_low=8.0, eer_ci_high=10.0, recipe=RECIPE_A, seed="uniform-1a"),
        TrialPoint(1, eer=3.0, size_bytes=4000, eer_ci_low=2.5, eer_ci_high=3.5, recipe=RECIPE_B, seed="uniform-4"),
        TrialPoint(2, eer=5.0, size_bytes=5000, recipe=RECIPE_B),
        TrialPoint(3, eer=3.0, size_bytes=4000, recipe=RECIPE_B, memoized_from=1),
    ]


# -- fast: figures and inputs ---------------------------------------------------------------------------------
def test_pareto_figure_hover_and_groups() -> None:
    pts = synthetic_points()
    fig = pareto_figure(pts, baseline=Baseline(size_bytes=20000, eer=2.0, n_trials=100), knee=1)
    names = [t.name for t in fig.data]
    assert "Pareto front" in names and "fp32 baseline (100 trials)" in names and "knee (trial 1)" in names
    front = next(t for t in fig.data if t.name == "Pareto front")
    assert sorted(front.customdata) == [0, 1, 3]  # the memoized duplicate is on the front too
    hover = " ".join(front.hovertext)
    assert "trial 3" in hover and "layer1.0.conv1: 1s" in hover and "seg_1: 2" in hover
    assert fig.layout.xaxis.type == "log"
    assert bits_token(None) == "fp32" and bits_token({"bits": 1, "mode": "adaptive"}) == "1a" and bits_token(8) == "8"


def test_heatmap_and_pngs(tmp_path: Path) -> None:
    import matplotlib.image

    pts = synthetic_points()
    fig = bits_heatmap_figure(pts, layer_order=["conv1", "layer1.0.conv1", "layer1.0.conv2", "seg_1"])
    assert fig is not None
    heat = fig.data[0]
    assert list(heat.x) == ["conv1", "layer1.0.conv1", "layer1.0.conv2", "seg_1"]
    assert len(heat.y) == 2  # trials 1 and 3 share a recipe: one row
    assert [list(r) for r in heat.text] == [["8", "1s", "fp32", "2"], ["4", "4", "fp32", "4"]]
    assert bits_heatmap_figure([]) is None and save_bits_heatmap_png([], tmp_path / "none.png") is None
    for png in (save_pareto_png(pts, tmp_path / "p.png", baseline=Baseline(20000, 2.0)),
                save_bits_heatmap_png(pts, tmp_path / "h.png")):
        image = matplotlib.image.imread(png)
        assert image.shape[0] > 200 and float(np.std(image)) > 0.01  # drawn, not blank
    save_pareto_png([], tmp_path / "empty.png")  # an empty study still gets a (blank-axes) figure


def test_study_record_round_trip_and_baseline() -> None:
    from dashboards.report import study_baseline
    from search.results.record import StudyRecord

    record = StudyRecord(name="s", digest="d", config={"study": {"name": "s"}}, layers=["conv1", "seg_1"],
                         baseline_digest="abc", fp32_bytes=640288,
                         baseline_eval={"eer": 1.3, "eer_ci_low": 1.1, "eer_ci_high": 1.5, "n_trials": 900})
    again = StudyRecord.from_dict(json.loads(json.dumps(record.to_dict())))
    assert again == record and again.to_dict()["format"] == "lsv-study-record/1"
    assert again.with_traces({"conv1": 2}).hessian_traces == {"conv1": 2.0}
    base = study_baseline(again)
    assert (base.size_bytes, base.eer, base.eer_ci_low, base.n_trials) == (640288, 1.3, 1.1, 900)
    legacy = StudyRecord(name="s", digest="d", config={})  # a study made before records: size from the study
    assert study_baseline(legacy, 1000).size_bytes == 1000 and study_baseline(legacy).eer is None


# -- slow: one real study -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_study(tiny_study_inputs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A finished 6-trial study with the allocator seed (so the Hessian traces exist, computed on a Ray
    worker), fine-tuned in the MSFT "sensitivity" order (two stages per trial, whatever its bits)."""
    from search.config import parse_study_config
    from search.study.run import run_study

    root = tmp_path_factory.mktemp("report_study")
    raw = study_raw_config(tiny_study_inputs, root, name="rep", seeds={"uniform": True, "allocator_fractions": [0.3]},
                           msft={"order": "sensitivity", "n_groups": 2, "stage_eval_frames": 100},
                           resources={"hessian": "worker"})  # the traces computed by a Ray task
    config = parse_study_config(raw)
    run_study(config, progress=False)
    toml = root / "rep.toml"
    toml.write_text(to_toml(raw))
    return {"config": config, "toml": toml, "root": root}


@pytest.mark.slow
def test_sensitivity_order_runs_every_trial_in_n_groups_stages(real_study: dict) -> None:
    config = real_study["config"]
    study = optuna.load_study(study_name="rep", storage=config.optuna_url)
    trained = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE
               and "memoized_from" not in t.user_attrs]
    assert trained and any(t.user_attrs.get("seed", "").startswith("uniform") for t in trained)
    # In the "bits" order a uniform recipe would be one stage; here every trial has two.
    assert all(len(t.user_attrs["stage_eers"]) == 2 for t in trained)


@pytest.mark.slow
def test_refresh_pareto_tags_in_real_mlflow_store(real_study: dict) -> None:
    from search.results.tracking import TRIAL_TAG, StudyTracker

    config = real_study["config"]
    study = optuna.load_study(study_name="rep", storage=config.optuna_url)
    tracker = StudyTracker(config.mlflow_uri, "rep")
    refresh_pareto_tags(tracker, study)
    assert refresh_pareto_tags(tracker, study) == 0  # unchanged tags are not rewritten

    points = load_points(study)
    front = {points[i].number for i in pareto_front(points)}
    ranks = {p.number: r for p, r in zip(points, pareto_ranks(points), strict=True)}
    client = mlflow.MlflowClient(config.mlflow_uri)
    tagged = client.search_runs([tracker.experiment_id], 'tags.pareto_optimal = "true"')
    assert {int(r.data.tags[TRIAL_TAG]) for r in tagged} == front and front
    for run in tracker.child_runs():
        number = int(run.data.tags[TRIAL_TAG])
        assert run.data.tags["pareto_optimal"] == ("true" if number in front else "false")
        if number in ranks:
            assert run.data.tags["pareto_rank"] == str(ranks[number])

    # The MLflow child runs tell the same story as the Optuna storage.
    from search.results.reading import load_points_from_mlflow

    from_mlflow = load_points_from_mlflow(tracker)
    assert [(p.number, p.size_bytes, dict(p.recipe)) for p in from_mlflow] == \
        [(p.number, p.size_bytes, dict(p.recipe)) for p in points]
    assert [p.eer for p in from_mlflow] == pytest.approx([p.eer for p in points])


@pytest.mark.slow
def test_report_files_and_mlflow_artifacts(real_study: dict) -> None:
    import matplotlib.image

    from dashboards.report import write_report
    from search.results.tracking import StudyTracker

    config = real_study["config"]
    index = write_report(config)
    out = index.parent
    assert out == config.study_dir / "report"
    names = {p.name for p in out.iterdir()}
    assert {"index.html", "pareto.png", "hypervolume.png", "bits_heatmap.png", "sensitivity.png",
            "front.json"} <= names
    for png in out.glob("*.png"):
        assert float(np.std(matplotlib.image.imread(png))) > 0.01, png
    page = index.read_text()
    # plotly.js is inlined (several MB), no <script src=...>: the page works offline. (The bundle still
    # names cdn.plot.ly as a default for geo maps' topojson, which these plots never fetch.)
    assert "<script src=" not in page and len(page) > 1_000_000
    assert page.count("Plotly.newPlot") == 5  # pareto, hypervolume (by trials, by cost), heatmap, sensitivity
    assert "fp32 control" in page and "full-trial equivalents" in page
    front = json.loads((out / "front.json").read_text())
    points = load_points(config)
    want = [points[i].number for i in pareto_front(points)]
    assert [row["trial"] for row in front["front"]] == want
    for number in want:
        assert f"<tr><td>{number}" in page
    assert front["reference_point"]["size_bytes"] == front["fp32_bytes"]

    tracker = StudyTracker(config.mlflow_uri, "rep")
    logged = {a.path for a in tracker.client.list_artifacts(tracker.parent_run_id, "report")}
    assert "report/index.html" in logged and "report/pareto.png" in logged

    # The report reads the study's record, not the baseline's files: with the checkpoint and the trace
    # cache moved away it renders the same sections. A rewrite replaces the folder whole; a record without
    # traces (a study that never computed them) skips the sensitivity section.
    from search.cli import main
    from search.cluster.storage import read_record
    from search.results.record import save_record

    moved = [(config.data.cache_dir / "hessian_traces.json", real_study["root"] / "traces.json"),
             (config.model.checkpoint, real_study["root"] / "ckpt.moved")]
    record, study = read_record(config)
    try:
        for src, dst in moved:
            shutil.move(src, dst)
        assert main(["report", str(real_study["toml"]), "--no-mlflow"]) == 0
        assert (out / "sensitivity.png").exists() and "Layer sensitivity" in index.read_text()
        assert record.layers and list(json.loads((out / "front.json").read_text())["front"][0]["recipe"])
        save_record(study, None, record.__class__.from_dict({**record.to_dict(), "hessian_traces": None}))
        assert main(["report", str(real_study["toml"]), "--no-mlflow"]) == 0
        assert not (out / "sensitivity.png").exists()
        assert "Layer sensitivity" not in index.read_text()
    finally:
        save_record(study, None, record)
        for src, dst in moved:
            shutil.move(dst, src)


def _chromium() -> str | None:
    return next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


@pytest.mark.slow
def test_report_renders_in_headless_chromium(real_study: dict, tmp_path: Path) -> None:
    import matplotlib.image

    from dashboards.report import write_report

    browser = _chromium()
    if browser is None:
        pytest.skip("no chromium on PATH (Debian: apt-get install -y chromium)")
    index = write_report(real_study["config"], tmp_path / "report", log_to_mlflow=False)
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
             "--virtual-time-budget=15000", "--window-size=1280,2000"]
    dom = subprocess.run([*flags, "--dump-dom", index.as_uri()], capture_output=True, text=True, timeout=180)
    assert dom.returncode == 0, dom.stderr[-2000:]
    # plotly draws each figure into <svg class="main-svg"> elements only when its script ran.
    assert dom.stdout.count('class="main-svg"') >= 4, dom.stdout[:500]
    assert "js-plotly-plot" in dom.stdout and "<table class=\"front\">" in dom.stdout
    shot = tmp_path / "shot.png"
    run = subprocess.run([*flags, f"--screenshot={shot}", index.as_uri()], capture_output=True, text=True, timeout=180)
    assert run.returncode == 0 and shot.exists(), run.stderr[-2000:]
    pixels = matplotlib.image.imread(shot)[..., :3]
    non_white = float(np.mean(pixels.min(axis=-1) < 0.9))
    assert non_white > 0.02, f"screenshot looks blank ({non_white:.3%} non-white pixels)"


def test_report_of_a_study_never_run_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from search.cli import main

    inputs = {"checkpoint": tmp_path / "none.safetensors", "corpus": tmp_path / "corpus", "cache": tmp_path / "c"}
    toml = tmp_path / "never.toml"
    toml.write_text(to_toml(study_raw_config(inputs, tmp_path, name="never")))
    assert main(["report", str(toml)]) == 2
    assert "has not been run yet" in capsys.readouterr().err.replace("\n", " ")
    assert not (tmp_path / "never").exists()


@pytest.mark.slow
def test_control_run_deltas_and_ci_aware_choices(real_study: dict, capsys: pytest.CaptureFixture[str]) -> None:
    """Every study runs the fp32 control once (not a trial); each trial's difference to it has a paired
    interval, in Optuna, MLflow and the report; `lsv status` answers the CI-aware questions."""
    from search.cli import main
    from search.results.reading import control_delta, load_control
    from search.results.tracking import CONTROL_DELTA_METRICS, TRIAL_TAG, StudyTracker

    config = real_study["config"]
    study = optuna.load_study(study_name="rep", storage=config.optuna_url)
    control = load_control(study)
    assert control is not None and control.eer_boot is not None and len(control.eer_boot) == 200
    assert control.eer_ci_low <= control.eer <= control.eer_ci_high
    assert len(study.trials) == 6  # the control is not a trial
    points = [p for p in load_points(study) if p.memoized_from is None]
    assert points and all(p.eer_boot is not None and len(p.eer_boot) == 200 for p in points)
    tracker = StudyTracker(config.mlflow_uri, "rep")
    controls = tracker._search("tags.\"lsv.role\" = 'control'")
    assert len(controls) == 1 and controls[0].data.metrics["eer"] == pytest.approx(control.eer)
    by_number = {p.number: p for p in points}
    for run in tracker.child_runs():
        p = by_number.get(int(run.data.tags[TRIAL_TAG]))
        if p is not None:
            want = control_delta(p, control)
            got = tuple(run.data.metrics[k] for k in CONTROL_DELTA_METRICS)
            # MLflow holds EER points rounded to 4 decimals (search.objectives)
            assert got == pytest.approx(want, abs=5e-5) and got[1] <= got[0] <= got[2]
            assert run.data.tags["pareto_optimal_ci"] in ("true", "false")
            assert run.data.metrics["cost_fte"] == pytest.approx(p.cost_fte) and 0 < p.cost_fte <= 1
    assert main(["status", str(real_study["toml"]), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    choices = status["choices"]
    assert choices["fp32 control"]["eer"] == pytest.approx(control.eer)
    assert "smallest not significantly worse than the control" in choices
    assert status["cost"]["total_fte"] > 0 and status["cost"]["n_trained"] >= 1


@pytest.mark.slow
def test_verify_reruns_the_knee_and_export_requires_it(real_study: dict, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    from search.cli import main
    from search.results.pareto import knee_point
    from search.results.tracking import StudyTracker
    from search.results.verify import verification_of

    config = real_study["config"]
    toml = str(real_study["toml"])
    study = optuna.load_study(study_name="rep", storage=config.optuna_url)
    points = [p for p in load_points(study) if p.memoized_from is None]  # what verify chooses from
    knee = points[knee_point(points)].number
    other = next(p.number for p in points if p.number != knee and p.memoized_from is None)
    assert main(["export", toml, "--trial", str(knee), "--out", str(tmp_path / "no"), "--require-verified",
                 "--no-register"]) == 2
    assert "has not been verified" in capsys.readouterr().err.replace("\n", " ")
    assert main(["verify", toml, "--knee", "--seeds", "2", "--steps-mult", "1.5"]) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert f"trial {knee}: logged" in err and "verified" in err and "vs control" in err and "the front" in err
    study = optuna.load_study(study_name="rep", storage=config.optuna_url)
    kept = verification_of(study, knee)
    steps = int(round(config.msft.total_steps * 1.5))
    assert sorted(r["seed"] for r in kept["runs"]) == [1, 2] and {r["total_steps"] for r in kept["runs"]} == {steps}
    tracker = StudyTracker(config.mlflow_uri, "rep")
    runs = tracker._search("tags.\"lsv.role\" = 'verification'")
    assert len(runs) == 2 and {r.data.tags["lsv.verifies"] for r in runs} == {str(knee)}
    parent = tracker.trial_run(knee).info.run_id
    assert {r.data.tags["mlflow.parentRunId"] for r in runs} == {parent}
    assert main(["verify", toml, "--knee", "--seeds", "2", "--steps-mult", "1.5"]) == 0  # nothing twice
    assert len(tracker._search("tags.\"lsv.role\" = 'verification'")) == 2
    assert main(["verify", toml, "--trials", "999"]) == 2
    assert "trial 999 is not a complete trial" in capsys.readouterr().err.replace("\n", " ")
    # A study made before studies had a control: verify and the control selectors say how to add one.
    kept_control = study.user_attrs["lsv.control"]
    study.set_user_attr("lsv.control", None)
    try:
        assert main(["verify", toml, "--knee"]) == 2
        assert "--control-only" in capsys.readouterr().err.replace("\n", " ")
        assert main(["export", toml, "--not-worse-than-control", "--out", str(tmp_path / "nc"), "--no-register"]) == 2
        assert "--control-only" in capsys.readouterr().err.replace("\n", " ")
        assert not (tmp_path / "nc").exists()
    finally:
        study.set_user_attr("lsv.control", kept_control)
    out = tmp_path / "verified"
    assert main(["export", toml, "--trial", str(knee), "--out", str(out), "--require-verified",
                 "--no-register"]) == 0
    provenance = json.loads((out / "recipe.json").read_text())["provenance"]
    assert provenance["verification"].startswith("2 re-runs")
    assert "2 re-runs" in (out / "model_card.md").read_text()
    assert main(["export", toml, "--trial", str(other), "--out", str(tmp_path / "x"), "--require-verified",
                 "--no-register"]) == 2
