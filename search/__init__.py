"""search: bit-width search studies over speaker-verification networks (Optuna + Ray Tune + MLflow).

Import the public API from here::

    from search import load_study_config, run_study, study_status, export_trial, SelectionRule

* :func:`load_study_config` / :func:`parse_study_config` / :class:`StudyConfig` - a study TOML, validated;
* :func:`run_study` / :class:`RunResult` - run or resume a study on a local Ray or a cluster;
* :func:`read_record` / :class:`StudyRecord` / :class:`StudyNotRun` - what a study was made from;
* :func:`load_points` / :func:`study_status` / :class:`StudyStatus` - its results (``search.results.pareto`` has the
  front, hypervolume and knee math);
* :func:`export_trial` / :class:`SelectionRule` / :class:`ExportOptions` / :class:`ExportResult` - export
  one trial as a deployable, registered bundle.

Names are imported on first use, so ``import search`` stays cheap for the CLI.
"""

from __future__ import annotations

import importlib
from typing import Any

_PUBLIC = {
    "StudyConfig": "search.config",
    "load_study_config": "search.config",
    "parse_study_config": "search.config",
    "RunResult": "search.study.run",
    "run_study": "search.study.run",
    "StudyNotRun": "search.results.record",
    "StudyRecord": "search.results.record",
    "read_record": "search.cluster.storage",
    "StudyStatus": "search.results.reading",
    "load_points": "search.results.reading",
    "study_status": "search.results.reading",
    "SelectionRule": "search.results.selection",
    "NoTrialMeetsRule": "search.results.selection",
    "ExportOptions": "search.results.export",
    "ExportResult": "search.results.export",
    "export_trial": "search.results.export",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'search' has no attribute {name!r}")
