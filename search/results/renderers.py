"""Pictures of a running study in its MLflow parent run, drawn by packages that know how to draw.

``search`` knows no plots (the dashboards read results, never the reverse), yet ``lsv run`` should leave the
Pareto plot, the hypervolume over cost, the bit heatmap and the front table in the parent run while the
study runs and when it ends. So, as ``lsv report`` joins the command line (``search.cli.COMMAND_GROUP``),
a package offers a renderer through the entry-point group :data:`RENDERER_GROUP`::

    [project.entry-points."lsv.renderers"]
    parent_run = "dashboards.browse:log_to_parent_run"

A renderer is ``f(config: StudyConfig, tracker: StudyTracker) -> None``; it reads the study from its storage
and logs to ``tracker.parent_run_id``. ``lsv run`` calls every renderer on the tracking thread
(:class:`search.results.tracking.TrackingThread`) every ``study.report_every`` finished trials, and when the study
ends or is interrupted, so trials never wait on drawing. Without any renderer installed (``search`` alone)
the study only logs its metric histories.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from search.config import StudyConfig
    from search.results.tracking import StudyTracker

__all__ = ["RENDERER_GROUP", "Renderer", "load_renderers", "render_study"]

RENDERER_GROUP = "lsv.renderers"
Renderer = Callable[["StudyConfig", "StudyTracker"], Any]
log = logging.getLogger(__name__)


def load_renderers() -> list[tuple[str, Renderer]]:
    """``(name, callable)`` of every installed renderer; one that fails to import is skipped with a warning
    (a broken plotting install must not stop a study)."""
    found: list[tuple[str, Renderer]] = []
    for ep in sorted(entry_points(group=RENDERER_GROUP), key=lambda ep: ep.name):
        try:
            found.append((ep.name, ep.load()))
        except Exception as err:  # noqa: BLE001 - reported, the study goes on without these pictures
            log.warning("renderer %s (%s) cannot be loaded: %s", ep.name, ep.value, err)
    return found


def render_study(renderers: list[tuple[str, Renderer]], config: StudyConfig, tracker: StudyTracker) -> None:
    """Run each renderer; a failing one is reported and the others still run (the study's results are safe in
    its storage, and ``lsv report`` draws them again)."""
    for name, render in renderers:
        try:
            render(config, tracker)
        except Exception as err:  # noqa: BLE001 - see the docstring
            log.warning("renderer %s failed: %s: %s", name, type(err).__name__, err)
