"""One live driver per study: the lease in the study's storage (SQLite and a real PostgreSQL)."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from pathlib import Path

import optuna
import pytest

from search.cluster.lease import LEASE_ATTR, DriverLease, StudyBusy


def _study(url: str, name: str) -> optuna.Study:
    return optuna.create_study(study_name=name, storage=url, directions=["minimize", "minimize"],
                               load_if_exists=True)


def _lease_semantics(url: str) -> None:
    study = _study(url, "leased")
    first = DriverLease(study, timeout_s=2.0, settle_s=0.1)
    first.acquire()
    try:
        second = DriverLease(_study(url, "leased"), timeout_s=2.0, settle_s=0.1)
        with pytest.raises(StudyBusy, match=rf"another driver \(host {socket.gethostname()}, pid \d+"):
            second.acquire()
        time.sleep(1.2)  # the heartbeat (every timeout/4) keeps the lease fresh past the timeout
        with pytest.raises(StudyBusy):
            second.acquire()
        # The first driver hangs (its heartbeat stops without releasing): after the timeout it is dead.
        first._stop.set()
        first._thread.join()
        time.sleep(2.3)
        second.acquire()
        assert second.taken_over is not None and second.taken_over.token == first.token
        time.sleep(1.0)
        assert first.current().token == second.token
        second.release()
        held = second.current()
        assert held.released and held.token == second.token
        third = DriverLease(_study(url, "leased"), timeout_s=60.0, settle_s=0.1)
        third.acquire()  # a released lease is free at once
        assert third.taken_over is None
        third.release()
    finally:
        first._stop.set()


def test_lease_in_sqlite(tmp_path: Path) -> None:
    _lease_semantics(f"sqlite:///{tmp_path / 'lease.db'}")


@pytest.mark.slow
def test_lease_in_postgres(postgres, monkeypatch: pytest.MonkeyPatch) -> None:
    _lease_semantics(postgres.create_database("lease_semantics"))
    # The password may also come from PGPASSWORD (or ~/.pgpass) instead of the URL.
    monkeypatch.setenv("PGPASSWORD", postgres.password)
    study = _study(postgres.url("lease_semantics", password=False), "leased")
    assert study.user_attrs[LEASE_ATTR]["released"]


def test_a_dead_local_driver_is_taken_over_at_once(tmp_path: Path) -> None:
    import subprocess
    import sys

    study = _study(f"sqlite:///{tmp_path / 'l.db'}", "s")
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(gone.stdout)
    now = time.time()
    study.set_user_attr(LEASE_ATTR, {"token": "old", "host": socket.gethostname(), "pid": dead_pid,
                                     "since": now, "heartbeat": now})
    lease = DriverLease(study, timeout_s=600, settle_s=0.05)
    lease.acquire()  # fresh heartbeat, but its process is gone from this host
    assert lease.taken_over is not None and lease.taken_over.pid == dead_pid
    lease.release()
    # A fresh lease of a live driver on another host is respected.
    study.set_user_attr(LEASE_ATTR, {"token": "other", "host": "elsewhere", "pid": 1, "since": now,
                                     "heartbeat": time.time()})
    with pytest.raises(StudyBusy, match="host elsewhere, pid 1"):
        DriverLease(study, timeout_s=600, settle_s=0.05).acquire()


# -- drivers starting together on one new database ------------------------------------------------------------
def _start_together(url_of: Callable[[int], str], rounds: int, drivers: int = 4) -> None:
    """``rounds`` times, ``drivers`` processes open two studies in one new database at the same moment."""
    from search.cluster.storage import open_study, redacted
    from search.config import parse_study_config
    from tests.conftest import at_once

    for i in range(rounds):
        url = url_of(i)
        configs = [parse_study_config({"study": {"name": f"s{j}", "out_dir": "/nonexistent"},
                                       "model": {"checkpoint": "/nonexistent/b.safetensors"},
                                       "storage": {"optuna": url}}) for j in range(2)]
        got = at_once([lambda c=configs[j % 2]: open_study(c, create=True) for j in range(drivers)])
        assert got == ["ok"] * drivers, (redacted(url), got)
        assert sorted(s.study_name for s in optuna.get_all_study_summaries(url)) == ["s0", "s1"]


def test_drivers_starting_together_on_a_new_sqlite(tmp_path: Path) -> None:
    """Optuna makes its tables when a storage is opened, checking first and writing after; without the lock
    and retry one opening in four failed, in 12 of 20 rounds of four drivers on a new file ("table ... already
    exists", or a duplicate alembic_version; bench/open_race.py), which is how CI lost a two-driver test."""
    _start_together(lambda i: f"sqlite:///{tmp_path / f'new{i}.db'}", rounds=8)


@pytest.mark.slow
def test_drivers_starting_together_on_a_new_postgres(postgres) -> None:
    _start_together(lambda i: postgres.create_database(f"together{i}"), rounds=4)
