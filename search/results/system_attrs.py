"""Machine-only data of a study, kept in Optuna *system* attrs: the study record (``lsv.record``), the
fp32 control's and every trial's paired-bootstrap EERs (``lsv.eer_boot``: 200 floats each) and the
verification runs' bootstrap EERs.

They live in the same storage as the trials, so a study on a PostgreSQL server still works from any
machine, but out of the user attrs that Optuna's clients show (``optuna studies``, ``optuna best-trials``,
optuna-dashboard cut a user attr at 1,024 characters): user attrs stay small (under 2 kB each) and
readable. The study user attr ``lsv.machine_data`` says where these are. Studies made before this keep
the data in user attrs: every reader here falls back to the old place.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import optuna
from optuna.trial import FrozenTrial

__all__ = ["EER_BOOT", "MACHINE_DATA_NOTE", "set_study_data", "set_trial_data", "study_data", "trial_boot",
           "trial_data"]

EER_BOOT = "lsv.eer_boot"
MACHINE_DATA_ATTR = "lsv.machine_data"
MACHINE_DATA_NOTE = ("Optuna system attrs: study 'lsv.record' (the study record; a copy in study.json), "
                     "'lsv.control.eer_boot' and each trial's 'lsv.eer_boot' (EER in percent on the study's "
                     "shared bootstrap replicates), 'lsv.verify.<n>.eer_boot' (lsv verify's runs)")


def set_study_data(study: optuna.Study, key: str, value: Any) -> None:
    study._storage.set_study_system_attr(study._study_id, key, value)
    if study.user_attrs.get(MACHINE_DATA_ATTR) != MACHINE_DATA_NOTE:
        study.set_user_attr(MACHINE_DATA_ATTR, MACHINE_DATA_NOTE)


def study_data(study: optuna.Study, key: str, old_user_attr: str | None = None) -> Any:
    """System attr ``key`` of the study, else (a study made before) its user attr ``old_user_attr``."""
    value = study._storage.get_study_system_attrs(study._study_id).get(key)
    if value is None and old_user_attr is not None:
        value = study.user_attrs.get(old_user_attr)
    return value


def set_trial_data(study: optuna.Study, trial_id: int, key: str, value: Any) -> None:
    study._storage.set_trial_system_attr(trial_id, key, value)


def trial_data(trial: FrozenTrial, key: str) -> Any:
    return trial.system_attrs.get(key)


def trial_boot(trial: FrozenTrial) -> tuple[float, ...] | None:
    """A trial's paired-bootstrap EERs (system attr, or user attr ``eer_boot`` of older studies)."""
    boot: Sequence[float] | None = trial.system_attrs.get(EER_BOOT) or trial.user_attrs.get("eer_boot")
    return tuple(float(x) for x in boot) if boot else None
