"""The live view of a running study, rendered into a real pseudo-terminal, and plain lines otherwise."""

from __future__ import annotations

import io
import os
import pty
import re
import select
import time

from rich.console import Console

from search.results.reading import CostSummary, StudyStatus
from search.results.tracking import TrialRecord
from search.study.progress import ProgressBoard


def _read_all(fd: int, wait_s: float = 0.5) -> str:
    chunks = []
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.05)
        if ready:
            try:
                chunks.append(os.read(fd, 65536))
            except OSError:
                break
    text = b"".join(chunks).decode(errors="replace")
    return re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", text)  # drop cursor movement and colours


def _status(done: int, front: int, best: float | None) -> StudyStatus:
    return StudyStatus("live", n_complete=done, n_pruned=1, n_failed=0, pareto_size=front,
                       best_eer_under_budget=best, cost=CostSummary(total_fte=done + 0.4))


def test_live_view_in_a_pseudo_terminal() -> None:
    master, slave = pty.openpty()
    term = os.fdopen(slave, "w")
    console = Console(file=term, width=110)
    assert console.is_terminal  # a real tty: the live view is on by itself
    with ProgressBoard("live", n_trials=10, timeout_s=None, console=console) as board:
        board.update("t1", 0, {"started": True})
        board.update("t2", 1, {"started": True})
        board.update("t1", 0, {"stage": 1, "n_stages": 3, "eer": 4.25})
        time.sleep(0.7)
        first = _read_all(master)
        assert "live" in first and "2 running" in first and "0 done" in first
        assert re.search(r"\b0\s+2/3\s+4\.25\b", first), first  # trial 0 at stage 2 of 3, its stage EER
        board.finished(TrialRecord(number=0, state="complete", recipe={}, eer=3.5, size_bytes=40_000),
                       _status(1, 1, 3.5))
        board.finished(TrialRecord(number=1, state="pruned", recipe={}, reason="stopped after MSFT stage 0"),
                       _status(1, 1, 3.5))
        time.sleep(0.7)
        second = _read_all(master)
    assert "1 done" in second and "0 running" in second and "ETA" in second
    assert "best EER under budget 3.50 %" in second and "1.4 full-trial equivalents" in second
    assert re.search(r"\b0\s+complete\s+3\.50\s+40,000", second) and "stopped after MSFT stage 0" in second
    term.close()
    os.close(master)


def test_plain_lines_when_not_a_terminal() -> None:
    out = io.StringIO()
    console = Console(file=out, width=200)
    assert not console.is_terminal
    with ProgressBoard("plain", n_trials=4, timeout_s=None, console=console) as board:
        board.update("t1", 0, {"started": True})
        board.finished(TrialRecord(number=0, state="complete", recipe={}, eer=2.0, size_bytes=10),
                       _status(1, 1, 2.0))
    text = out.getvalue()
    assert text.count("\n") == 1 and "live: done 1" in text and "\x1b" not in text
    assert board.eta_s() is not None and board.eta_s() >= 0
