"""The study report: one static ``index.html`` (opens from disk, no server, no network) plus PNGs.

``write_report(config)`` reads the study from its Optuna storage (the source of truth: its trials and
its record, :mod:`search.results.record`, with the baseline's layer order, size, EER and Hessian traces), writes
``runs/<study>/report/``::

    index.html         interactive plots (plotly.js inlined once) and a table of the Pareto front
    pareto.png         size vs EER, front highlighted (matplotlib)
    hypervolume.png    hypervolume after each trial
    bits_heatmap.png   per-layer bits of the front
    sensitivity.png    per-layer Hessian traces (only when the study computed them)
    front.json         the front as data (EER and CI in percent, bytes), for scripts

then refreshes the ``pareto_optimal`` / ``pareto_rank`` tags of the trial runs and logs the folder as
the ``report/`` artifact of the study's MLflow parent run. The folder is replaced as a whole (written
beside it, then renamed), so a reader never sees half a report.
"""

from __future__ import annotations

import html
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dashboards.plots import (
    Baseline,
    bits_heatmap_figure,
    figure_html,
    hypervolume_figure,
    pareto_figure,
    save_bits_heatmap_png,
    save_hypervolume_png,
    save_pareto_png,
    save_sensitivity_png,
    sensitivity_figure,
)
from lsv_core.atomic import replace_dir
from search.cluster.storage import read_record
from search.results.pareto import (
    TrialPoint,
    hypervolume,
    knee_point,
    paired_front,
    pareto_front,
    pareto_ranks,
    reference_point,
)
from search.results.reading import control_delta, load_control, load_points, refresh_pareto_tags, study_status
from search.results.record import StudyRecord

if TYPE_CHECKING:
    from search.config import StudyConfig

__all__ = ["study_baseline", "write_report"]

log = logging.getLogger(__name__)


def study_baseline(record: StudyRecord, fp32_fallback: int | None = None) -> Baseline:
    """The fp32 reference of a study, from its record: its model.onnx bytes (what the size objective is
    measured against) and the checkpoint's own evaluation (``lsv train`` stores it; a WeSpeaker ``.pt``
    has none), which may use more trials than the study's ``data.max_trials`` subset (``n_trials``)."""
    ev = record.baseline_eval or {}
    return Baseline(size_bytes=int(record.fp32_bytes or fp32_fallback or 0), eer=ev.get("eer"),
                    eer_ci_low=ev.get("eer_ci_low"), eer_ci_high=ev.get("eer_ci_high"), n_trials=ev.get("n_trials"))


def write_report(config: StudyConfig, out_dir: str | os.PathLike[str] | None = None, *,
                 log_to_mlflow: bool = True) -> Path:
    """Write the study report (see the module docstring) and return the path of its ``index.html``.

    ``out_dir`` defaults to ``runs/<study>/report``. With ``log_to_mlflow`` the trial runs' Pareto tags
    are refreshed and the folder is logged to the parent run (skipped, with a warning, when the study has
    no MLflow parent run yet).
    """
    record, study = read_record(config)
    out = Path(out_dir) if out_dir is not None else config.study_dir / "report"
    points = load_points(study)
    baseline = study_baseline(record, study.user_attrs.get("fp32_bytes"))
    layer_order = list(record.layers) if record.layers else None
    status = study_status(study, config.size_budget_bytes)
    traces = dict(record.hessian_traces) if record.hessian_traces else None
    control = load_control(study)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; a report is meant to be shared/served
    try:
        _render(tmp, config, points, baseline, layer_order, traces, status, control)
        replace_dir(tmp, out, overwrite=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)

    if log_to_mlflow:
        _log_to_mlflow(config, points, out)
    return out / "index.html"


# -- rendering ----------------------------------------------------------------------------------------------
def _render(out: Path, config: StudyConfig, points: list[TrialPoint], baseline: Baseline,
            layer_order: list[str] | None, traces: dict[str, float] | None, status: Any,
            control: TrialPoint | None) -> None:
    size_scale = float(baseline.size_bytes) if baseline.size_bytes else 1.0
    by_dcf = config.objectives.accuracy == "min_dcf"  # fronts, knee and hypervolume on the minDCF
    ref = reference_point(points, fp32_bytes=size_scale, baseline_eer=None if by_dcf else baseline.eer)
    front = pareto_front(points)
    ci_front = set(paired_front(points))
    reference = None if control is None else Baseline(baseline.size_bytes, control.eer, control.eer_ci_low,
                                                        control.eer_ci_high)
    ranks = pareto_ranks(points)
    knee = knee_point(points)
    hv = hypervolume(points, ref, size_scale=size_scale)
    title = f"{config.study.name}: EER vs model size" + (
        f" (front and knee by minDCF at p_target {config.objectives.p_target:g})" if by_dcf else "")

    sections: list[str] = []
    figures = []
    if points:
        figures.append(("EER vs size", pareto_figure(points, baseline=baseline, layer_order=layer_order,
                                                        knee=knee, title=title, control=reference,
                                                        ci_front=sorted(ci_front)), "pareto.png",
                        "Every complete trial; hover a point for its per-layer bits. Error bars: 95 % bootstrap "
                        "interval of the EER. Dashed line and band: the fp32 control (the baseline fine-tuned "
                        "like every trial, nothing quantized) and its 95 % interval. Ringed: points off the "
                        "front that no front point beats beyond the evaluation noise (paired bootstrap)."))
        save_pareto_png(points, out / "pareto.png", baseline=baseline, knee=knee, title=title, control=reference,
                        ci_front=sorted(ci_front))
        figures.append(("Hypervolume", hypervolume_figure(points, ref, size_scale=size_scale), "hypervolume.png",
                        _hypervolume_note(ref, size_scale, baseline, by_dcf)))
        save_hypervolume_png(points, out / "hypervolume.png", ref, size_scale=size_scale)
        figures.append(("Hypervolume against cost", hypervolume_figure(points, ref, size_scale=size_scale,
                                                                       by_cost=True), None,
                        "The same hypervolume against what the study had spent when each trial finished, in "
                        "full-trial equivalents (one trial at the full schedule = 1; trials stopped early count "
                        "their share; memoized repeats nothing), the unit probes, Hessian traces and fp32 control "
                        "included from the start: the axis ends at the study's total cost."))
        heat = bits_heatmap_figure(points, layer_order=layer_order)
        if heat is not None:
            figures.append(("Bit widths of the front", heat, "bits_heatmap.png",
                            "1a / 1s: adaptive / static 1-bit; fp32: left unquantized."))
            save_bits_heatmap_png(points, out / "bits_heatmap.png", layer_order=layer_order)
    if traces:
        figures.append(("Layer sensitivity", sensitivity_figure(traces), "sensitivity.png",
                        "Hessian trace Tr(H) of each layer's weights (Hutchinson estimate on the fp32 baseline); "
                        "the bit allocator weighs each layer's quantization error ||W - Q(W)||^2 by it."))
        save_sensitivity_png(traces, out / "sensitivity.png")

    sections.append(_summary_html(config, points, baseline, status, ref, hv, knee, len(front), len(ci_front),
                                  control))
    if points:
        sections.append(_front_table_html(points, front, ci_front, knee, control, config.objectives.p_target))
    else:
        sections.append("<p><b>No complete trials yet.</b> Run the study (<code>lsv run</code>) and report again.</p>")
    for k, (heading, fig, png, note) in enumerate(figures):
        link = f" <a href='{png}'>PNG</a>" if png else ""
        sections.append(f"<h2>{html.escape(heading)}</h2><p class='note'>{html.escape(note)}{link}</p>"
                        f"{figure_html(fig, include_plotlyjs=k == 0)}")

    (out / "index.html").write_text(_page(f"lsv report: {config.study.name}", "\n".join(sections)))
    (out / "front.json").write_text(json.dumps({
        "study": config.study.name,
        "config_digest": config.digest(),
        "fp32_bytes": baseline.size_bytes,
        "baseline": asdict(baseline),
        "reference_point": {"eer": ref[0], "size_bytes": ref[1]},
        "hypervolume": hv,
        "knee_trial": points[knee].number if knee is not None else None,
        "front": [_point_dict(points[i], ranks[i], i in ci_front, control) for i in front],
        "ci_front_trials": sorted(points[i].number for i in ci_front),
        "control": None if control is None else {"eer": control.eer, "eer_ci_low": control.eer_ci_low,
                                                 "eer_ci_high": control.eer_ci_high, "min_dcf": control.min_dcf},
        "cost": asdict(status.cost),
    }, indent=2))


def _hypervolume_note(ref: tuple[float, float], size_scale: float, baseline: Baseline, by_dcf: bool = False) -> str:
    if by_dcf:
        return (f"Area dominated by the minDCF front up to the reference point (minDCF {ref[0]:.4f} = 1.1 x the "
                f"worst observed; size = fp32 {ref[1]:,.0f} bytes), with sizes divided by {size_scale:,.0f} bytes.")
    why = "2 x the fp32 baseline EER" if baseline.eer is not None else "1.1 x the worst EER observed"
    return (f"Area dominated by the front up to the reference point (EER {ref[0]:.2f} % = {why}; size = fp32 "
            f"{ref[1]:,.0f} bytes), with sizes divided by {size_scale:,.0f} bytes: comparable across studies "
            "of one baseline.")


def _point_dict(p: TrialPoint, rank: int, in_ci_front: bool, control: TrialPoint | None) -> dict[str, Any]:
    delta = control_delta(p, control)
    return {"trial": p.number, "eer": p.eer, "eer_ci_low": p.eer_ci_low, "eer_ci_high": p.eer_ci_high,
            "min_dcf": p.min_dcf, "size_bytes": p.size_bytes, "compression_ratio": p.compression_ratio,
            "avg_bits": p.avg_bits, "seed": p.seed, "memoized_from": p.memoized_from, "pareto_rank": rank,
            "ci_front": in_ci_front, "recipe": dict(p.recipe),
            "eer_delta_control": None if delta is None else {"delta": delta[0], "low": delta[1], "high": delta[2]},
            "cost_fte": p.cost_fte, "found_after_fte": p.found_after_fte}


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def _summary_html(config: StudyConfig, points: Sequence[TrialPoint], baseline: Baseline, status: Any,
                  ref: tuple[float, float], hv: float, knee: int | None, n_front: int, n_ci_front: int,
                  control: TrialPoint | None) -> str:
    by_dcf = config.objectives.accuracy == "min_dcf"
    rows = [
        ("study", f"{config.study.name} (config digest {config.digest()})"),
        ("trials", f"{status.n_complete} complete ({status.n_memoized} memoized), {status.n_failed} failed, "
                   f"{status.n_pruned} pruned, {status.n_running} running"),
        ("fp32 baseline", f"{baseline.size_bytes:,} bytes; EER "
                          f"{_fmt(baseline.eer, '.2f', ' %')} {_ci(baseline.eer_ci_low, baseline.eer_ci_high)}"
                          + (f" on {baseline.n_trials} trials" if baseline.n_trials else "")),
        ("fp32 control", "none (made before studies had one: lsv run STUDY.toml --control-only adds it)"
         if control is None else f"EER {control.eer:.2f} % {_ci(control.eer_ci_low, control.eer_ci_high)}: the "
         "baseline fine-tuned with the trials' schedule, nothing quantized, scored on the same trials"),
        ("evaluation", f"{config.data.max_trials or 'all'} trials per model (data.max_trials), subset seed {config.data.subset_seed}"),
        ("cost", status.cost.line()),
        ("size budget", "-" if config.size_budget_bytes is None else f"{config.size_budget_bytes:,} bytes"),
        ("Pareto front", f"{n_front} trials; {n_ci_front} are not beaten beyond the evaluation noise by a smaller "
                         "or equal model (CI-aware front, paired bootstrap at 95 %)"),
        ("objectives", f"{'minDCF at p_target ' + format(config.objectives.p_target, 'g') if by_dcf else 'EER'} "
                       "and model.onnx bytes, both minimised ([objectives] accuracy)"),
        ("hypervolume", f"{hv:.4g} (reference {'minDCF' if by_dcf else 'EER'} {ref[0]:.4g}, size {ref[1]:,.0f} bytes)"),
        ("knee", "-" if knee is None else f"trial {points[knee].number}: EER {points[knee].eer:.2f} %, "
                                          f"minDCF {_fmt(points[knee].min_dcf, '.4f')}, "
                                          f"{points[knee].size_bytes:,} bytes"),
        ("generated", time.strftime("%Y-%m-%d %H:%M:%S")),
    ]
    body = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows)
    return f"<table class='summary'>{body}</table>"


def _ci(low: float | None, high: float | None) -> str:
    return "" if low is None or high is None else f"[{low:.2f}, {high:.2f}]"


def _front_table_html(points: Sequence[TrialPoint], front: Sequence[int], ci_front: set[int], knee: int | None,
                      control: TrialPoint | None, p_target: float = 0.01) -> str:
    head = ("<tr><th>trial</th><th>origin</th><th>EER %</th><th>95 % CI</th><th>vs control (paired)</th>"
            f"<th>minDCF({p_target:g})</th><th>bytes</th><th>compression</th><th>avg bits</th><th>cost (FTE)</th>"
            "<th>found after (FTE)</th><th>CI-aware front</th></tr>")
    body = []
    for i in front:
        p = points[i]
        origin = p.seed or (f"memoized from #{p.memoized_from}" if p.memoized_from is not None else "sampler")
        mark = " (knee)" if i == knee else ""
        d = control_delta(p, control)
        vs = "-" if d is None else f"{d[0]:+.2f} [{d[1]:+.2f}, {d[2]:+.2f}]"
        body.append(
            f"<tr><td>{p.number}{mark}</td><td>{html.escape(origin)}</td><td>{p.eer:.2f}</td>"
            f"<td>{_ci(p.eer_ci_low, p.eer_ci_high)}</td><td>{vs}</td><td>{_fmt(p.min_dcf, '.3f')}</td>"
            f"<td>{p.size_bytes:,}</td><td>{_fmt(p.compression_ratio, '.1f', 'x')}</td>"
            f"<td>{_fmt(p.avg_bits, '.2f')}</td><td>{_fmt(p.cost_fte, '.2f')}</td>"
            f"<td>{_fmt(p.found_after_fte, '.1f')}</td><td>{'yes' if i in ci_front else 'no'}</td></tr>")
    return ("<h2>Pareto front</h2><p class='note'>Trials no other trial beats in both EER and size, smallest first. "
            "Export one with <code>lsv export STUDY.toml --trial N --out DIR</code>.</p>"
            f"<table class='front'>{head}{''.join(body)}</table>")


def _page(title: str, body: str) -> str:
    css = ("body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1150px;color:#222}"
           "table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #ccc;padding:4px 8px;text-align:left}"
           "table.front td{text-align:right}.note{color:#555;font-size:0.9em}h2{margin-top:1.6em}")
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{css}</style></head><body><h1>{html.escape(title)}</h1>{body}</body></html>\n")


def _log_to_mlflow(config: StudyConfig, points: list[TrialPoint], out: Path) -> None:
    from search.results.tracking import StudyTracker

    tracker = StudyTracker(config.mlflow_uri, config.study.name)
    try:
        _ = tracker.parent_run_id  # the study's parent run; absent when the study never reached MLflow
    except RuntimeError as err:
        log.warning("not logging the report to MLflow: %s", err)
        return
    refresh_pareto_tags(tracker, points)
    tracker.log_study_artifact(out, "report")
