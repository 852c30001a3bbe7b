"""search: bit-width search studies over speaker-verification networks (Optuna + Ray Tune + MLflow).

Import the public API from here::

    from search import load_study_config, run_study, study_status, export_trial, SelectionRule

* :func:`load_study_config` / :func:`parse_study_config` / :class:`StudyConfig` - a study TOML, validated;
* :func:`run_study` / :class:`RunResult` - run or resume a study on a local Ray or a cluster;
* :func:`read_record` / :class:`StudyRecord` / :class:`StudyNotRun` - what a study was made from;
* :func:`load_points` / :func:`study_status` / :class:`StudyStatus` - its results (``search.pareto`` has the
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
    "RunResult": "search.study",
    "run_study": "search.study",
    "StudyNotRun": "search.record",
    "StudyRecord": "search.record",
    "read_record": "search.storage",
    "StudyStatus": "search.results",
    "load_points": "search.results",
    "study_status": "search.results",
    "SelectionRule": "search.selection",
    "NoTrialMeetsRule": "search.selection",
    "ExportOptions": "search.trial_export",
    "ExportResult": "search.trial_export",
    "export_trial": "search.trial_export",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'search' has no attribute {name!r}")
