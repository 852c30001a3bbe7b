"""What a running study shows its user: a live view in a terminal, plain lines otherwise.

The view is fed from events the driver already has (a trial handed to Ray, each MSFT stage it reports, each
trial recorded), so it costs the study nothing: it only redraws (twice a second) what those events left.
In a terminal it shows trials done / running (with their current stage) / failed / pruned, elapsed time,
an ETA, the front size, the best EER under the budget and the last few results; when the output is not a
terminal (a log file, CI) every finished trial prints one plain line instead.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from search.results.reading import StudyStatus
from search.results.tracking import TrialRecord

__all__ = ["ProgressBoard"]


@dataclass
class _Running:
    number: int
    started: float
    stage: int | None = None
    n_stages: int | None = None
    stage_eer: float | None = None


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class ProgressBoard:
    """The live view of one ``lsv run`` (see the module docstring). Use as a context manager."""

    def __init__(self, name: str, *, n_trials: int | None, timeout_s: float | None, console: Console,
                 live: bool | None = None, recent: int = 5) -> None:
        self.name = name
        self.n_trials = n_trials
        self.timeout_s = timeout_s
        self.console = console
        self.live_view = console.is_terminal if live is None else live
        self.started = time.monotonic()
        self.running: dict[str, _Running] = {}
        self.recent: deque[TrialRecord] = deque(maxlen=recent)
        self.status: StudyStatus | None = None
        self.finished_here = 0
        self._live: Live | None = None

    # -- events -------------------------------------------------------------------------------------------
    def update(self, trial_id: str, number: int, result: dict[str, Any]) -> None:
        """A trial was handed to Ray (``{"started": True}``) or reported an MSFT stage."""
        if result.get("started"):
            self.running[trial_id] = _Running(number, time.monotonic())
            return
        run = self.running.setdefault(trial_id, _Running(number, time.monotonic()))
        if "stage" in result:
            run.stage = int(result["stage"])
            run.n_stages = int(result["n_stages"]) if result.get("n_stages") is not None else None
            eer = result.get("eer")
            run.stage_eer = float(eer) if isinstance(eer, (int, float)) and eer == eer else None

    def finished(self, record: TrialRecord, status: StudyStatus) -> None:
        """A trial was recorded (complete, pruned or failed)."""
        for key, run in list(self.running.items()):
            if run.number == record.number:
                del self.running[key]
        self.recent.appendleft(record)
        self.status = status
        self.finished_here += 1
        if not self.live_view:
            self.console.print(status.line(), soft_wrap=True)

    # -- rendering ----------------------------------------------------------------------------------------
    def eta_s(self) -> float | None:
        """Seconds left, from this run's pace (``None`` before the first trial finishes)."""
        elapsed = time.monotonic() - self.started
        left = []
        if self.n_trials is not None and self.status is not None and self.finished_here:
            done = self.status.n_complete + self.status.n_failed + self.status.n_pruned
            remaining = max(0, self.n_trials - done)
            left.append(elapsed / self.finished_here * remaining)
        if self.timeout_s is not None:
            left.append(max(0.0, self.timeout_s - elapsed))
        return min(left) if left else None

    def render(self) -> RenderableType:
        st = self.status
        elapsed = time.monotonic() - self.started
        eta = self.eta_s()
        head = Table.grid(padding=(0, 2))
        done = f"{st.n_complete} done" if st else "0 done"
        counts = (f"{done}, {len(self.running)} running, {st.n_failed if st else 0} failed, "
                  f"{st.n_pruned if st else 0} pruned" + (f" of {self.n_trials}" if self.n_trials else ""))
        best = "-" if st is None or st.best_eer_under_budget is None else f"{st.best_eer_under_budget:.2f} %"
        head.add_row(Text(self.name, style="bold"), counts)
        head.add_row("elapsed", _duration(elapsed) + ("" if eta is None else f"   ETA {_duration(eta)}"))
        head.add_row("front", f"{st.pareto_size if st else 0} trials   best EER under budget {best}")
        if st is not None:
            head.add_row("cost", f"{st.cost.total_fte:.1f} full-trial equivalents")
        running = Table(title="running", title_justify="left", box=None, show_edge=False)
        for col in ("trial", "stage", "stage EER %", "for"):
            running.add_column(col, justify="right")
        for run in sorted(self.running.values(), key=lambda r: r.number):
            stage = "-" if run.stage is None else f"{run.stage + 1}/{run.n_stages or '?'}"
            eer = "-" if run.stage_eer is None else f"{run.stage_eer:.2f}"
            running.add_row(str(run.number), stage, eer, _duration(time.monotonic() - run.started))
        last = Table(title="last results", title_justify="left", box=None, show_edge=False)
        for col in ("trial", "state", "EER %", "bytes", "note"):
            last.add_column(col, justify="right")
        for rec in self.recent:
            eer = "-" if rec.eer is None else f"{rec.eer:.2f}"
            size = "-" if rec.size_bytes is None else f"{int(rec.size_bytes):,}"
            note = (f"memoized from {rec.memoized_from}" if rec.memoized_from is not None
                    else (rec.reason or "")[:60])
            last.add_row(str(rec.number), rec.state, eer, size, note)
        return Group(head, running, last)

    def __enter__(self) -> ProgressBoard:
        if self.live_view:
            self._live = Live(get_renderable=self.render, console=self.console, refresh_per_second=2,
                              transient=False)
            self._live.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None
