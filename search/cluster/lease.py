"""One live driver per study: a lease with a heartbeat, kept in the study's own storage.

Two drivers on one study (the same PostgreSQL) would each treat the other's running trials as left over
by a dead driver, fail and re-queue them, and then crash telling results to trials the other closed. The
lease prevents that: :meth:`DriverLease.acquire` writes ``{host, pid, since, heartbeat, token}`` into the
Optuna study's user attributes and a background thread refreshes ``heartbeat`` every ``timeout / 4``
seconds. A second driver finds a fresh heartbeat and is refused (:class:`StudyBusy`, exit 2, naming the
holder). A lease whose heartbeat is older than the timeout, or whose holder process is gone from this
very host, belongs to a dead driver: it is taken over, and the study resumes from its storage.

Optuna's storage has no compare-and-swap, so two drivers starting in the same instant could both see a
dead lease and both write theirs; each waits ``settle_s`` after writing and reads the lease back, and
only the one whose token is there goes on (the last writer wins, the other is refused).

A driver that stalls (a hung host, a suspended process, a storage outage) longer than the timeout is taken
over while it still runs. When it wakes up it must not ask, train or tell anything more: :meth:`holds`
answers whether the lease is still this driver's (read back from the storage at most every
``recheck_s``, so a driver that was frozen reads it before its first step after waking), the searcher asks
it before every ``ask``/``tell``, Ray Tune's stopper before every step, and the study then stops its trials
and raises :class:`LeaseLost` (``lsv run`` exits 4). The driver that took over has already closed and
re-queued the displaced driver's running trials. Without compare-and-swap one window is left: a driver
frozen between that check and the write right after it (microseconds) could still write once.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from lsv_core.errors import LsvError

if TYPE_CHECKING:
    import optuna

__all__ = ["LEASE_ATTR", "DriverLease", "LeaseInfo", "LeaseLost", "StudyBusy"]

LEASE_ATTR = "lsv.lease"
log = logging.getLogger(__name__)


class StudyBusy(LsvError):
    """Another live driver holds the study's lease."""


class LeaseLost(LsvError):
    """Another driver took the study over while this one was stalled: this one stopped (``lsv run`` exit 4)."""

    def __init__(self, study_name: str, holder: LeaseInfo | None, timeout_s: float) -> None:
        self.holder = holder
        who = holder.describe() if holder is not None else "unknown"
        super().__init__(f"study {study_name!r} was taken over by another driver ({who}) while this one was stalled "
                         f"for more than storage.lease_timeout_s = {timeout_s:g} s; this driver stopped its trials "
                         "and told nothing more (the other driver re-queued them and carries on)")


@dataclass(frozen=True)
class LeaseInfo:
    token: str
    host: str
    pid: int
    since: float  # epoch seconds
    heartbeat: float  # epoch seconds
    released: bool = False

    def describe(self, now: float | None = None) -> str:
        now = time.time() if now is None else now
        return (f"host {self.host}, pid {self.pid}, since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(self.since))}, "
                f"last heartbeat {now - self.heartbeat:.0f} s ago")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class DriverLease:
    """The study's driver lease (see the module docstring); use as a context manager or acquire/release."""

    def __init__(self, study: optuna.Study, timeout_s: float, *, settle_s: float = 1.0,
                 recheck_s: float = 1.0) -> None:
        self.study = study
        self.timeout_s = float(timeout_s)
        self.settle_s = settle_s
        self.recheck_s = min(recheck_s, self.interval_s)
        self.token = uuid.uuid4().hex
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.taken_over: LeaseInfo | None = None
        self.taken_by: LeaseInfo | None = None  # who holds the lease after this driver lost it
        self.lost = threading.Event()
        self._confirmed = -math.inf  # time.monotonic() when the storage last showed the lease as ours
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def interval_s(self) -> float:
        """Seconds between heartbeats."""
        return max(0.5, self.timeout_s / 4)

    @property
    def holder(self) -> str:
        """``host:pid`` of this driver (what trials record as the driver that ran them)."""
        return f"{self.host}:{self.pid}"

    # -- state in the storage ------------------------------------------------------------------------
    def current(self) -> LeaseInfo | None:
        raw = self.study._storage.get_study_user_attrs(self.study._study_id).get(LEASE_ATTR)
        if not isinstance(raw, dict):
            return None
        try:
            return LeaseInfo(**{k: raw[k] for k in LeaseInfo.__dataclass_fields__ if k in raw})
        except TypeError:
            return None

    def _write(self, info: LeaseInfo) -> None:
        self.study._storage.set_study_user_attr(self.study._study_id, LEASE_ATTR, asdict(info))

    def is_dead(self, info: LeaseInfo, now: float | None = None) -> bool:
        """Whether ``info`` belongs to no live driver: released, heartbeat too old, or a gone local pid."""
        now = time.time() if now is None else now
        if info.released or now - info.heartbeat > self.timeout_s:
            return True
        return info.host == self.host and info.pid != self.pid and not _pid_alive(info.pid)

    # -- life cycle ------------------------------------------------------------------------------------
    def acquire(self) -> None:
        """Take the lease or raise :class:`StudyBusy`; starts the heartbeat thread."""
        held = self.current()
        if held is not None and held.token != self.token and not self.is_dead(held):
            raise StudyBusy(f"study {self.study.study_name!r} is being run by another driver ({held.describe()}); "
                            f"wait for it to finish, stop it, or wait {self.timeout_s:g} s after it died "
                            "(storage.lease_timeout_s)")
        now = time.time()
        self._write(LeaseInfo(self.token, self.host, self.pid, now, now))
        time.sleep(self.settle_s)
        after = self.current()
        if after is None or after.token != self.token:
            other = after.describe() if after is not None else "unknown"
            raise StudyBusy(f"study {self.study.study_name!r} was taken by another driver starting at the same "
                            f"time ({other})")
        if held is not None and not held.released and held.token != self.token:
            self.taken_over = held
        self._confirmed = time.monotonic()
        self._thread = threading.Thread(target=self._beat, name="lsv-lease", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Stop the heartbeat and mark the lease released (when it is still ours)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        try:
            held = self.current()
            if held is not None and held.token == self.token:
                self._write(LeaseInfo(self.token, self.host, self.pid, held.since, time.time(), released=True))
        except Exception as err:  # noqa: BLE001 - the storage may be gone; a stale lease expires anyway
            log.warning("could not release the study lease: %s", err)

    def holds(self) -> bool:
        """Whether this driver still holds the lease: False once another driver took it over. Reads the
        lease back from the storage when the last confirmation is older than ``recheck_s`` (a driver that
        was frozen finds out before its next step); a storage error counts as holding (the write that
        follows meets the same storage and fails on its own)."""
        if self.lost.is_set():
            return False
        if time.monotonic() - self._confirmed <= self.recheck_s:
            return True
        try:
            held = self.current()
        except Exception as err:  # noqa: BLE001 - see the docstring
            log.warning("could not read the study lease: %s", err)
            return True
        if held is None or held.token != self.token:
            self._mark_lost(held)
            return False
        self._confirmed = time.monotonic()
        return True

    def check(self) -> None:
        """Raise :class:`LeaseLost` when another driver took the study over."""
        if not self.holds():
            raise LeaseLost(self.study.study_name, self.taken_by, self.timeout_s)

    def _mark_lost(self, held: LeaseInfo | None) -> None:
        if not self.lost.is_set():
            self.taken_by = held
            log.error("the study lease was taken by another driver (%s)", held.describe() if held else "none")
            self.lost.set()

    def _beat(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                held = self.current()
                if held is None or held.token != self.token:
                    self._mark_lost(held)
                    return
                self._write(LeaseInfo(self.token, self.host, self.pid, held.since, time.time()))
                self._confirmed = time.monotonic()
            except Exception as err:  # noqa: BLE001 - a storage hiccup: try again at the next beat
                log.warning("study lease heartbeat failed: %s", err)

    def __enter__(self) -> DriverLease:
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()
