"""The clients users browse a study with, started for real on a finished study's stores (all on 127.0.0.1):
optuna-dashboard (PyPI) read through its JSON API, and the MLflow UI drawn by headless Chromium with the
front filter. Chromium is required: CI installs it (.ci/run); without it these tests fail and say so.
"""

from __future__ import annotations

import re

import optuna
import pytest
from mlflow import MlflowClient

from tests.services import MlflowServer, OptunaDashboard, chromium, chromium_page


@pytest.mark.slow
def test_optuna_dashboard_shows_the_objectives_and_the_front(browse_study: dict) -> None:
    config = browse_study["config"]
    study = optuna.load_study(study_name="browse", storage=config.optuna_url)
    dashboard = OptunaDashboard(config.optuna_url).start()
    try:
        summaries = dashboard.get("/api/studies")["study_summaries"]
        summary = next(s for s in summaries if s["study_name"] == "browse")
        detail = dashboard.get(f"/api/studies/{summary['study_id']}")
    finally:
        dashboard.stop()
    assert detail["directions"] == ["minimize", "minimize"]
    # The objective names come from study.set_metric_names (the study record's job): the dashboard shows
    # exactly what the study holds, and when it holds names they say what each objective is.
    assert detail.get("objective_names") == study.metric_names
    if study.metric_names is not None:
        accuracy, size = study.metric_names
        assert re.search("eer|dcf", accuracy, re.I) and re.search("size|bytes", size, re.I)
    front = {t.number for t in study.best_trials}
    assert front and {t["number"] for t in detail["best_trials"]} == front
    shown = {t["number"]: t["values"] for t in detail["trials"] if t["state"] == "Complete"}
    for t in study.best_trials:
        assert shown[t.number] == pytest.approx(t.values)


@pytest.mark.slow
def test_mlflow_ui_front_filter_lists_exactly_the_front_runs(browse_study: dict) -> None:
    from search.results.tracking import StudyTracker

    chromium()  # fails here, with how to install it, where there is no browser
    config = browse_study["config"]
    tracker = StudyTracker(config.mlflow_uri, "browse")
    client = MlflowClient(config.mlflow_uri)
    front = {r.info.run_id: r.info.run_name
             for r in client.search_runs([tracker.experiment_id], 'tags.pareto_optimal = "true"')}
    others = {r.info.run_id for r in tracker.child_runs()} - set(front)
    assert front and others
    server = MlflowServer(backend_store_uri=config.mlflow_uri).start()
    try:
        dom = chromium_page(tracker.front_url(server.uri))
    finally:
        server.stop()
    # Each row of the runs table links to its run: the rendered page lists the front's runs and no other trial.
    linked = set(re.findall(rf"#/experiments/{tracker.experiment_id}/runs/([0-9a-f]{{32}})", dom))
    assert set(front) <= linked, f"front runs missing from the page: {sorted(set(front) - linked)}"
    assert not linked & others, "the filtered runs table lists trials off the front"
    for name in front.values():
        assert name.replace("&", "&amp;") in dom  # the names users read, e.g. "0003 4 bit; layer3 2 bit"
    assert 'tags.pareto_optimal = "true"' in dom.replace("&quot;", '"')  # the filter a user sees and edits
