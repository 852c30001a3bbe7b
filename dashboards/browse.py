"""What a study shows in its MLflow parent run while it runs: the renderer ``lsv run`` calls (entry point
``lsv.renderers``, :mod:`search.results.renderers`) every ``study.report_every`` finished trials and at the end.

Logged at the top of the parent run's artifacts, replaced at each call::

    pareto.png                 EER vs size, front, knee, fp32 baseline and control (as in the report)
    hypervolume_by_cost.png    hypervolume against the study's cost so far (full-trial equivalents)
    bits_heatmap.png           per-layer bits of the front
    front.csv                  the front as a table (the MLflow UI shows CSV artifacts as tables)
    front.json                 the same rows for scripts

The full interactive report stays ``lsv report`` (it also logs its folder as ``report/``).
"""

from __future__ import annotations

import csv
import json
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dashboards.plots import Baseline, save_bits_heatmap_png, save_hypervolume_png, save_pareto_png
from search.cluster.storage import read_record
from search.results.describe import recipe_in_words
from search.results.pareto import TrialPoint, knee_point, pareto_front, reference_point, significant_front
from search.results.reading import control_delta, load_control, load_points

if TYPE_CHECKING:
    from search.config import StudyConfig
    from search.results.tracking import StudyTracker

__all__ = ["FRONT_COLUMNS", "front_rows", "log_to_parent_run"]

FRONT_COLUMNS = ("trial", "recipe", "eer", "eer_ci_low", "eer_ci_high", "size_bytes", "compression_ratio",
                 "avg_bits", "eer_delta_control", "pareto_optimal_ci", "knee", "origin")


def front_rows(points: Sequence[TrialPoint], control: TrialPoint | None = None) -> list[dict[str, Any]]:
    """One row per front point, smallest first (EER in percent, sizes in bytes, recipe in words)."""
    front = pareto_front(points)
    significant = set(significant_front(points))
    knee = knee_point(points)
    rows = []
    for i in front:
        p = points[i]
        delta = control_delta(p, control)
        rows.append({
            "trial": p.number, "recipe": recipe_in_words(p.recipe) if p.recipe else "", "eer": round(p.eer, 3),
            "eer_ci_low": None if p.eer_ci_low is None else round(p.eer_ci_low, 3),
            "eer_ci_high": None if p.eer_ci_high is None else round(p.eer_ci_high, 3),
            "size_bytes": p.size_bytes,
            "compression_ratio": None if p.compression_ratio is None else round(p.compression_ratio, 2),
            "avg_bits": None if p.avg_bits is None else round(p.avg_bits, 3),
            "eer_delta_control": None if delta is None else round(delta[0], 3),
            "pareto_optimal_ci": i in significant, "knee": i == knee,
            "origin": p.seed or (f"memoized from #{p.memoized_from}" if p.memoized_from is not None else "sampler"),
        })
    return rows


def log_to_parent_run(config: StudyConfig, tracker: StudyTracker) -> None:
    """Draw the study as it stands (read from its storage) and log the files to the parent run."""
    from dashboards.report import study_baseline

    record, study = read_record(config)
    points = load_points(study)
    if not points:
        return
    baseline = study_baseline(record, study.user_attrs.get("fp32_bytes"))
    control = load_control(study)
    reference = None if control is None else Baseline(baseline.size_bytes, control.eer, control.eer_ci_low,
                                                        control.eer_ci_high)
    size_scale = float(baseline.size_bytes) if baseline.size_bytes else 1.0
    ref = reference_point(points, fp32_bytes=size_scale, baseline_eer=baseline.eer)
    with tempfile.TemporaryDirectory(prefix="lsv-browse-") as tmp:
        out = Path(tmp)
        save_pareto_png(points, out / "pareto.png", baseline=baseline, knee=knee_point(points),
                        title=f"{config.study.name}: EER vs model size ({len(points)} trials)", control=reference)
        save_hypervolume_png(points, out / "hypervolume_by_cost.png", ref, size_scale=size_scale, by_cost=True)
        save_bits_heatmap_png(points, out / "bits_heatmap.png",
                              layer_order=list(record.layers) if record.layers else None)
        rows = front_rows(points, control)
        with (out / "front.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=FRONT_COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
        (out / "front.json").write_text(json.dumps({"study": config.study.name, "n_complete": len(points),
                                                    "front": rows}, indent=2))
        for path in sorted(out.iterdir()):
            tracker.log_study_artifact(path)
