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
"""

from __future__ import annotations

import logging
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

__all__ = ["LEASE_ATTR", "DriverLease", "LeaseInfo", "StudyBusy"]

LEASE_ATTR = "lsv.lease"
log = logging.getLogger(__name__)


class StudyBusy(LsvError):
    """Another live driver holds the study's lease."""


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

    def __init__(self, study: optuna.Study, timeout_s: float, *, settle_s: float = 1.0) -> None:
        self.study = study
        self.timeout_s = float(timeout_s)
        self.settle_s = settle_s
        self.token = uuid.uuid4().hex
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.taken_over: LeaseInfo | None = None
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

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

    def _beat(self) -> None:
        interval = max(0.5, self.timeout_s / 4)
        while not self._stop.wait(interval):
            try:
                held = self.current()
                if held is None or held.token != self.token:
                    log.error("the study lease was taken by another driver (%s)",
                              held.describe() if held else "none")
                    self.lost.set()
                    return
                self._write(LeaseInfo(self.token, self.host, self.pid, held.since, time.time()))
            except Exception as err:  # noqa: BLE001 - a storage hiccup: try again at the next beat
                log.warning("study lease heartbeat failed: %s", err)

    def __enter__(self) -> DriverLease:
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()
