"""Figures of a study, each twice: an interactive plotly figure (for HTML) and a matplotlib PNG.

* :func:`pareto_figure` / :func:`save_pareto_png`: size vs EER of every complete trial, the front
  highlighted as a staircase, seed trials (uniform precision, allocator) and the fp32 baseline as
  reference markers, bootstrap EER intervals as error bars; hovering a point shows its trial number
  and per-layer bits.
* :func:`hypervolume_figure` / :func:`save_hypervolume_png`: hypervolume after each trial.
* :func:`bits_heatmap_figure` / :func:`save_bits_heatmap_png`: per-layer bit widths of the front.
* :func:`sensitivity_figure` / :func:`save_sensitivity_png`: per-layer Hessian traces, when the study
  computed them (the study record holds them).

PNGs come from matplotlib (Agg, no pyplot state): plotly's own PNG export needs kaleido and a Chrome
download at run time, which offline machines cannot do. EER is in percent, sizes in bytes.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lsv_core.quant.recipe import ALLOWED_BITS, LayerSpec
from search.results.pareto import TrialPoint, hypervolume_history, pareto_front, pareto_ranks

if TYPE_CHECKING:
    import plotly.graph_objects as go
    from matplotlib.figure import Figure

__all__ = [
    "Baseline",
    "bits_heatmap_figure",
    "bits_token",
    "figure_html",
    "hypervolume_figure",
    "pareto_figure",
    "save_bits_heatmap_png",
    "save_hypervolume_png",
    "save_pareto_png",
    "save_sensitivity_png",
    "sensitivity_figure",
    "write_figure_html",
]

FRONT_COLOR = "#d62728"
OTHER_COLOR = "#7f7f7f"
SEED_COLOR = "#1f77b4"
BASELINE_COLOR = "#2ca02c"
CONTROL_COLOR = "#9467bd"
# Heatmap colour positions per bit width: ordinal, so 8 and float do not squash 1-4 together.
_BIT_LEVELS = (*ALLOWED_BITS, 32)


@dataclass(frozen=True)
class Baseline:
    """The float (fp32) baseline as a reference point: its model.onnx bytes, and its EER when known.

    ``n_trials`` says which evaluation the EER comes from (the checkpoint's training-time evaluation may
    use more trials than the study's ``data.max_trials`` subset).
    """

    size_bytes: int
    eer: float | None = None
    eer_ci_low: float | None = None
    eer_ci_high: float | None = None
    n_trials: int | None = None

    @property
    def label(self) -> str:
        on = f" ({self.n_trials} trials)" if self.n_trials else ""
        return f"fp32 baseline{on}"


# -- shared helpers -----------------------------------------------------------------------------------------
def bits_token(spec: Any) -> str:
    """A recipe entry as text: its :attr:`LayerSpec.token` (``"4"``, ``"1a"``, ``"1s"``), ``"fp32"`` for float."""
    parsed = LayerSpec.parse(spec)
    return "fp32" if parsed is None else parsed.token


def _bits_of(spec: Any) -> int:
    parsed = LayerSpec.parse(spec)
    return 32 if parsed is None else parsed.bits


def _natural_key(name: str) -> list[Any]:
    # layer2.10.conv1 after layer2.9.conv1: compare digit runs as numbers.
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _layer_names(points: Sequence[TrialPoint], layer_order: Sequence[str] | None = None) -> list[str]:
    """Layers named by any recipe, in ``layer_order`` (the model's order) or natural name order."""
    named = {name for p in points for name in p.recipe}
    if layer_order is not None:
        return list(layer_order) + sorted(named - set(layer_order), key=_natural_key)
    return sorted(named, key=_natural_key)


def _hover(p: TrialPoint, rank: int, layers: Sequence[str]) -> str:
    ci = ""
    if p.eer_ci_low is not None and p.eer_ci_high is not None:
        ci = f" [{p.eer_ci_low:.2f}, {p.eer_ci_high:.2f}]"
    lines = [f"<b>trial {p.number}</b>" + (f" ({p.seed})" if p.seed else ""),
             f"EER {p.eer:.2f} %{ci}", f"{p.size_bytes:,} bytes"]
    if p.compression_ratio:
        lines.append(f"{p.compression_ratio:.1f}x smaller than fp32")
    if p.avg_bits is not None:
        lines.append(f"avg {p.avg_bits:.2f} bits")
    if p.memoized_from is not None:
        lines.append(f"memoized from trial {p.memoized_from}")
    lines.append(f"Pareto rank {rank}")
    lines += [f"{name}: {bits_token(p.recipe.get(name))}" for name in layers]
    return "<br>".join(lines)


def _error_bars(points: Sequence[TrialPoint]) -> tuple[list[float], list[float]]:
    plus = [max(0.0, p.eer_ci_high - p.eer) if p.eer_ci_high is not None else 0.0 for p in points]
    minus = [max(0.0, p.eer - p.eer_ci_low) if p.eer_ci_low is not None else 0.0 for p in points]
    return plus, minus


def _staircase(points: Sequence[TrialPoint], front: Sequence[int]) -> tuple[list[float], list[float]]:
    """The front as a step line: from each point, right at its EER until the next smaller-EER point."""
    pts = sorted({(points[i].size_bytes, points[i].eer) for i in front})
    xs: list[float] = []
    ys: list[float] = []
    for k, (s, e) in enumerate(pts):
        xs.append(s)
        ys.append(e)
        if k + 1 < len(pts):
            xs.append(pts[k + 1][0])
            ys.append(e)
    return xs, ys


# -- plotly -------------------------------------------------------------------------------------------------
def pareto_figure(points: Sequence[TrialPoint], *, baseline: Baseline | None = None,
                  layer_order: Sequence[str] | None = None, knee: int | None = None,
                  title: str = "EER vs model size", control: Baseline | None = None,
                  ci_front: Sequence[int] = ()) -> go.Figure:
    """Interactive size (bytes, log axis) vs EER (percent) scatter of ``points``; see the module docstring.

    ``control`` (the fp32 control run) is drawn as the reference line with its 95 % interval shaded;
    ``ci_front`` points off the plain front but within the noise of it (paired bootstrap) are ringed."""
    import plotly.graph_objects as go

    ranks = pareto_ranks(points)
    front = set(pareto_front(points))
    layers = _layer_names(points, layer_order)
    fig = go.Figure()
    if control is not None and control.eer is not None:
        if control.eer_ci_low is not None and control.eer_ci_high is not None:
            fig.add_hrect(y0=control.eer_ci_low, y1=control.eer_ci_high, fillcolor=CONTROL_COLOR, opacity=0.15,
                          line_width=0)
        fig.add_hline(y=control.eer, line={"color": CONTROL_COLOR, "dash": "dash"},
                      annotation_text=f"fp32 control {control.eer:.2f} % (band: its 95 % CI)",
                      annotation_position="top left")
    near = [i for i in ci_front if i not in front]
    if near:
        fig.add_trace(go.Scatter(x=[points[i].size_bytes for i in near], y=[points[i].eer for i in near],
                                 mode="markers", name="within the noise of the front (paired bootstrap)",
                                 marker={"symbol": "diamond-open", "size": 16, "color": FRONT_COLOR,
                                         "line": {"width": 1.5}}, hoverinfo="skip"))
    groups = (
        ("other trials", [i for i in range(len(points)) if i not in front and not points[i].seed], OTHER_COLOR,
         "circle", 7),
        ("seed trials (uniform / allocator)", [i for i in range(len(points)) if i not in front and points[i].seed],
         SEED_COLOR, "square", 8),
        ("Pareto front", sorted(front), FRONT_COLOR, "diamond", 11),
    )
    if front:
        xs, ys = _staircase(points, sorted(front))
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", line={"color": FRONT_COLOR, "width": 1.5, "dash": "dot"},
                                 name="front (staircase)", hoverinfo="skip"))
    for name, idx, color, symbol, size in groups:
        if not idx:
            continue
        sel = [points[i] for i in idx]
        plus, minus = _error_bars(sel)
        fig.add_trace(go.Scatter(
            x=[p.size_bytes for p in sel], y=[p.eer for p in sel], mode="markers+text" if name != "other trials"
            else "markers", name=name,
            text=[(p.seed or f"#{p.number}") if name != "other trials" else "" for p in sel],
            textposition="top center", textfont={"size": 9},
            marker={"color": color, "symbol": symbol, "size": size, "line": {"width": 0.5, "color": "black"}},
            error_y={"type": "data", "array": plus, "arrayminus": minus, "thickness": 1, "width": 2,
                     "color": color},
            hovertext=[_hover(points[i], ranks[i], layers) for i in idx], hoverinfo="text",
            customdata=[points[i].number for i in idx],
        ))
    if knee is not None:
        p = points[knee]
        fig.add_trace(go.Scatter(x=[p.size_bytes], y=[p.eer], mode="markers", name=f"knee (trial {p.number})",
                                 marker={"symbol": "circle-open", "size": 20, "color": "black",
                                         "line": {"width": 2}}, hoverinfo="skip"))
    if baseline is not None and baseline.eer is not None:
        err = {}
        if baseline.eer_ci_low is not None and baseline.eer_ci_high is not None:
            err = {"error_y": {"type": "data", "array": [baseline.eer_ci_high - baseline.eer],
                               "arrayminus": [baseline.eer - baseline.eer_ci_low], "color": BASELINE_COLOR}}
        fig.add_trace(go.Scatter(x=[baseline.size_bytes], y=[baseline.eer], mode="markers+text",
                                 name=baseline.label, text=["fp32"], textposition="top center",
                                 marker={"symbol": "star", "size": 16, "color": BASELINE_COLOR,
                                         "line": {"width": 0.5, "color": "black"}},
                                 hovertext=[f"{baseline.label}<br>EER {baseline.eer:.2f} %<br>"
                                            f"{baseline.size_bytes:,} bytes"], hoverinfo="text", **err))
    elif baseline is not None:
        fig.add_vline(x=baseline.size_bytes, line={"color": BASELINE_COLOR, "dash": "dash"},
                      annotation_text="fp32 size")
    fig.update_layout(title=title, xaxis_title="model.onnx size (bytes, log scale)", yaxis_title="EER (%)",
                      xaxis_type="log", template="plotly_white", hovermode="closest", height=560,
                      legend={"orientation": "h", "y": -0.18})
    return fig


def hypervolume_figure(points: Sequence[TrialPoint], ref: tuple[float, float], *, size_scale: float,
                       by_cost: bool = False) -> go.Figure:
    """Hypervolume (EER points x fraction of ``size_scale``) after each complete trial, in trial order;
    ``by_cost`` puts the study's cumulative cost (full-trial equivalents) on the x axis instead."""
    import plotly.graph_objects as go

    ordered = sorted(points, key=lambda p: p.number)
    hv = hypervolume_history(ordered, ref, size_scale=size_scale)
    xs = [p.found_after_fte if by_cost and p.found_after_fte is not None else p.number for p in ordered]
    fig = go.Figure(go.Scatter(x=xs, y=hv, mode="lines+markers", line={"shape": "hv"}, name="hypervolume"))
    what = "cost" if by_cost else "trials"
    fig.update_layout(title=f"Hypervolume over {what} (reference: EER {ref[0]:.2f} %, {ref[1]:,.0f} bytes)",
                      xaxis_title="cost so far (full-trial equivalents, all costs)" if by_cost else "Optuna trial number",
                      yaxis_title="hypervolume (EER % x size / fp32 size)", template="plotly_white", height=380)
    return fig


def _heatmap_data(points: Sequence[TrialPoint], front: Sequence[int],
                  layer_order: Sequence[str] | None) -> tuple[list[str], list[str], list[list[int]], list[list[str]]]:
    # One row per distinct recipe on the front (duplicates add nothing), smallest model first.
    rows: list[TrialPoint] = []
    seen: set[str] = set()
    for i in sorted(front, key=lambda i: (points[i].size_bytes, points[i].eer, points[i].number)):
        key = json.dumps(dict(points[i].recipe), sort_keys=True)
        if key not in seen:
            seen.add(key)
            rows.append(points[i])
    layers = _layer_names(rows, layer_order)
    labels = [f"#{p.number} {p.eer:.2f} % {p.size_bytes / 1e3:,.1f} kB" for p in rows]
    z = [[_BIT_LEVELS.index(_bits_of(p.recipe.get(n))) for n in layers] for p in rows]
    text = [[bits_token(p.recipe.get(n)) for n in layers] for p in rows]
    return layers, labels, z, text


def bits_heatmap_figure(points: Sequence[TrialPoint], *, layer_order: Sequence[str] | None = None) -> go.Figure | None:
    """Per-layer bit widths of the front members (rows, smallest first) x layers; None without a front."""
    import plotly.graph_objects as go

    front = pareto_front(points)
    if not front:
        return None
    layers, labels, z, text = _heatmap_data(points, front, layer_order)
    fig = go.Figure(go.Heatmap(
        z=z, x=layers, y=labels, text=text, texttemplate="%{text}", zmin=0, zmax=len(_BIT_LEVELS) - 1,
        colorscale="Viridis", colorbar={"title": "bits", "tickvals": list(range(len(_BIT_LEVELS))),
                                        "ticktext": [str(b) if b < 32 else "fp32" for b in _BIT_LEVELS]},
        hovertemplate="%{y}<br>%{x}: %{text} bits<extra></extra>",
    ))
    fig.update_layout(title="Bit widths of the Pareto front (rows: trial, EER, size)", template="plotly_white",
                      height=max(340, 160 + 28 * len(labels)), xaxis={"tickangle": -45},
                      yaxis={"autorange": "reversed"})
    return fig


def sensitivity_figure(traces: Mapping[str, float]) -> go.Figure:
    """Bar plot of each layer's Hessian trace (the sensitivity that seeds the allocator)."""
    import plotly.graph_objects as go

    fig = go.Figure(go.Bar(x=list(traces), y=list(traces.values()), marker_color=SEED_COLOR,
                           hovertemplate="%{x}: Tr(H) = %{y:.4g}<extra></extra>"))
    fig.update_layout(title="Per-layer sensitivity: Hessian trace of the training loss (Hutchinson)",
                      xaxis_title="layer", yaxis_title="Tr(H)", template="plotly_white", height=380,
                      xaxis={"tickangle": -45})
    return fig


def figure_html(fig: go.Figure, *, include_plotlyjs: bool) -> str:
    """A ``<div>`` of ``fig``; with ``include_plotlyjs`` plotly.js is inlined (opens offline, no CDN)."""
    return fig.to_html(full_html=False, include_plotlyjs=bool(include_plotlyjs),
                       config={"displaylogo": False, "responsive": True})


def write_figure_html(fig: go.Figure, path: str | Path) -> Path:
    """A standalone HTML page of ``fig`` with plotly.js inlined (several MB; no server, no network)."""
    path = Path(path)
    fig.write_html(str(path), include_plotlyjs=True, full_html=True, config={"displaylogo": False})
    return path


# -- matplotlib (PNG) ---------------------------------------------------------------------------------------
def _new_figure(width: float, height: float) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def save_pareto_png(points: Sequence[TrialPoint], path: str | Path, *, baseline: Baseline | None = None,
                    knee: int | None = None, title: str = "EER vs model size", control: Baseline | None = None,
                    ci_front: Sequence[int] = ()) -> Path:
    """The PNG counterpart of :func:`pareto_figure` (no hover; front points labelled by trial number)."""
    fig = _new_figure(8, 5.2)
    ax = fig.add_subplot()
    front = set(pareto_front(points))
    if control is not None and control.eer is not None:
        if control.eer_ci_low is not None and control.eer_ci_high is not None:
            ax.axhspan(control.eer_ci_low, control.eer_ci_high, color=CONTROL_COLOR, alpha=0.15, lw=0)
        ax.axhline(control.eer, color=CONTROL_COLOR, ls="--", lw=1.2, label=f"fp32 control {control.eer:.2f} %")
    near = [i for i in ci_front if i not in front]
    if near:
        ax.scatter([points[i].size_bytes for i in near], [points[i].eer for i in near], s=110, facecolors="none",
                   edgecolors=FRONT_COLOR, linewidths=1.2, label="within the noise of the front", zorder=4)
    if front:
        xs, ys = _staircase(points, sorted(front))
        ax.plot(xs, ys, ":", color=FRONT_COLOR, lw=1.2)
    for name, idx, color, marker, size in (
        ("other trials", [i for i in range(len(points)) if i not in front and not points[i].seed], OTHER_COLOR, "o", 25),
        ("seed trials", [i for i in range(len(points)) if i not in front and points[i].seed], SEED_COLOR, "s", 30),
        ("Pareto front", sorted(front), FRONT_COLOR, "D", 45),
    ):
        if not idx:
            continue
        sel = [points[i] for i in idx]
        plus, minus = _error_bars(sel)
        ax.errorbar([p.size_bytes for p in sel], [p.eer for p in sel], yerr=[minus, plus], fmt="none",
                    ecolor=color, elinewidth=0.8, alpha=0.6)
        ax.scatter([p.size_bytes for p in sel], [p.eer for p in sel], c=color, marker=marker, s=size,
                   edgecolors="black", linewidths=0.4, label=name, zorder=3)
        if name != "other trials":
            for p in sel:
                ax.annotate(p.seed or f"#{p.number}", (p.size_bytes, p.eer), textcoords="offset points",
                            xytext=(0, 6), ha="center", fontsize=7)
    if knee is not None:
        ax.scatter([points[knee].size_bytes], [points[knee].eer], s=260, facecolors="none", edgecolors="black",
                   linewidths=1.5, label=f"knee (trial {points[knee].number})", zorder=4)
    if baseline is not None and baseline.eer is not None:
        ax.scatter([baseline.size_bytes], [baseline.eer], marker="*", s=220, c=BASELINE_COLOR, edgecolors="black",
                   linewidths=0.5, label=baseline.label, zorder=4)
    elif baseline is not None:
        ax.axvline(baseline.size_bytes, color=BASELINE_COLOR, ls="--", label="fp32 size")
    ax.set_xscale("log")
    ax.set_xlabel("model.onnx size (bytes, log scale)")
    ax.set_ylabel("EER (%)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    if points or baseline is not None:
        ax.legend(fontsize=8, loc="best")
    fig.savefig(path)
    return Path(path)


def save_hypervolume_png(points: Sequence[TrialPoint], path: str | Path, ref: tuple[float, float], *,
                         size_scale: float, by_cost: bool = False) -> Path:
    """The PNG counterpart of :func:`hypervolume_figure`."""
    ordered = sorted(points, key=lambda p: p.number)
    hv = hypervolume_history(ordered, ref, size_scale=size_scale)
    fig = _new_figure(8, 3.6)
    ax = fig.add_subplot()
    xs = [p.found_after_fte if by_cost and p.found_after_fte is not None else p.number for p in ordered]
    ax.step(xs, hv, where="post", marker="o", ms=3)
    ax.set_xlabel("cost so far (full-trial equivalents)" if by_cost else "Optuna trial number")
    ax.set_ylabel("hypervolume\n(EER % x size / fp32)")
    what = "cost" if by_cost else "trials"
    ax.set_title(f"Hypervolume over {what} (reference: EER {ref[0]:.2f} %, {ref[1]:,.0f} bytes)")
    ax.grid(True, alpha=0.3)
    fig.savefig(path)
    return Path(path)


def save_bits_heatmap_png(points: Sequence[TrialPoint], path: str | Path, *,
                          layer_order: Sequence[str] | None = None) -> Path | None:
    """The PNG counterpart of :func:`bits_heatmap_figure`; None (nothing written) without a front."""
    from matplotlib.colors import BoundaryNorm

    front = pareto_front(points)
    if not front:
        return None
    layers, labels, z, text = _heatmap_data(points, front, layer_order)
    fig = _new_figure(max(6.0, 0.38 * len(layers) + 3), max(2.6, 0.42 * len(labels) + 1.8))
    ax = fig.add_subplot()
    norm = BoundaryNorm([k - 0.5 for k in range(len(_BIT_LEVELS) + 1)], 256)
    image = ax.imshow(z, cmap="viridis", norm=norm, aspect="auto")
    for r, row in enumerate(text):
        for c, token in enumerate(row):
            ax.text(c, r, token, ha="center", va="center", fontsize=7,
                    color="white" if z[r][c] < len(_BIT_LEVELS) / 2 else "black")
    ax.set_xticks(range(len(layers)), layers, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    bar = fig.colorbar(image, ax=ax, ticks=range(len(_BIT_LEVELS)))
    bar.ax.set_yticklabels([str(b) if b < 32 else "fp32" for b in _BIT_LEVELS])
    bar.set_label("bits")
    ax.set_title("Bit widths of the Pareto front")
    fig.savefig(path)
    return Path(path)


def save_sensitivity_png(traces: Mapping[str, float], path: str | Path) -> Path:
    """The PNG counterpart of :func:`sensitivity_figure`."""
    fig = _new_figure(max(6.0, 0.35 * len(traces) + 2), 3.8)
    ax = fig.add_subplot()
    ax.bar(range(len(traces)), list(traces.values()), color=SEED_COLOR)
    ax.set_xticks(range(len(traces)), list(traces), rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("Tr(H)")
    ax.set_title("Per-layer sensitivity: Hessian trace (Hutchinson)")
    ax.grid(True, axis="y", alpha=0.3)
    fig.savefig(path)
    return Path(path)
