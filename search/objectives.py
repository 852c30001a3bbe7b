"""The study's two objectives, both minimised: an accuracy value (``[objectives] accuracy``: the EER in
percent, or the normalised minDCF at ``p_target``) and the deployable size in bytes.

One place says what they are called in Optuna (``study.set_metric_names``, so every Optuna client shows
``eer_percent`` / ``size_bytes`` instead of "Objective 0 / 1"), which trial-result key holds each, and to
how many decimals a metric means something (EER in percent to 4 decimals, minDCF to 5, bytes as integers),
so values in Optuna and MLflow read as measured (``7.244``, not ``7.244000000000001``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

__all__ = ["ACCURACY_KEYS", "accuracy_name", "objective_keys", "objective_names", "rounded", "rounded_metrics"]

SIZE_NAME = "size_bytes"
# accuracy -> the trial-result key that holds it (min_dcf: at the study's p_target)
ACCURACY_KEYS = {"eer": "eer", "min_dcf": "min_dcf"}

# Decimals a metric is worth: the EER of a few thousand trials moves in the 3rd decimal of a percent; minDCF
# is a cost in [0, 1]; wall times in seconds to the centisecond.
_DECIMALS = {"eer": 4, "eer_ci_low": 4, "eer_ci_high": 4, "min_dcf": 5, "min_dcf_001": 5, "min_dcf_005": 5,
             "compression_ratio": 4, "avg_bits": 4, "size_mb": 6, "trial_wall_s": 2, "setup_s": 2, "wall_s": 2,
             "stage_eer": 4, "stage_eers": 4, "eer_delta_control": 4, "eer_delta_control_low": 4,
             "eer_delta_control_high": 4}
_INTEGERS = ("size_bytes", "fp32_bytes", "finetune_samples", "eval_utterances", "n_trials")


def accuracy_name(accuracy: str, p_target: float) -> str:
    """The Optuna metric name of the accuracy objective: ``eer_percent`` or ``min_dcf_p<p_target>``."""
    return "eer_percent" if accuracy == "eer" else f"min_dcf_p{p_target:g}"


def objective_names(accuracy: str = "eer", p_target: float = 0.01) -> list[str]:
    return [accuracy_name(accuracy, p_target), SIZE_NAME]


def objective_keys(accuracy: str = "eer") -> tuple[str, str]:
    """The trial-result keys of the two objectives, in Optuna's order."""
    return ACCURACY_KEYS[accuracy], "size_bytes"


def rounded(key: str, value: Any) -> Any:
    """``value`` of metric ``key`` rounded to what it means (unknown keys and non-numbers unchanged)."""
    if isinstance(value, list | tuple):
        return [rounded(key, v) for v in value]
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return value
    key = key.removeprefix("cost_")
    if key in _INTEGERS:
        return int(round(value))
    decimals = _DECIMALS.get(key)
    if decimals is None:
        decimals = 4 if key.endswith("fte") else 2 if key.endswith("_s") else None
    return value if decimals is None else round(float(value), decimals)


def rounded_metrics(values: Mapping[str, Any]) -> dict[str, Any]:
    return {k: rounded(k, v) for k, v in values.items()}
