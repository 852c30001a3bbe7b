"""Opening a database that Optuna or MLflow may be creating at the same moment in another process.

Both make (and MLflow migrates) their tables when a client first opens a database, checking first and
writing after. Two drivers starting together on one new database (or ``lsv status`` beside ``lsv run``)
can both see no tables; the slower one then fails with "table ... already exists", a duplicate
``alembic_version`` row, or an MLflow migration that "expected to match one row". For a SQLite file the
opening is therefore serialized between the processes of this host (an advisory lock on the file's
folder, so no lock file is left behind); for server databases, and where the lock cannot be taken, an
opening that fails that way is tried again after a short random wait, as by then the tables exist.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

__all__ = ["RACE_TRIES", "open_racing", "schema_race", "sqlite_file"]

RACE_TRIES = 8
T = TypeVar("T")
# Messages of a schema being made by someone else (SQLite, PostgreSQL, MySQL, Alembic via MLflow).
_RACE_MARKS = ("already exists", "UNIQUE constraint failed", "duplicate key", "Duplicate entry",
               "duplicate column", "database is locked", "expected to match one row")


def sqlite_file(url: str) -> Path | None:
    """The database file of a ``sqlite:///`` URL (None for other databases and in-memory SQLite)."""
    if not isinstance(url, str) or not url.startswith("sqlite:///"):
        return None
    path = url[len("sqlite:///"):].split("?", 1)[0]
    return Path(path) if path and path != ":memory:" else None


def schema_race(err: BaseException) -> bool:
    """Whether ``err`` (or an error it was raised from) says another client was creating the tables."""
    seen: BaseException | None = err
    while seen is not None:
        if any(mark in str(seen) for mark in _RACE_MARKS):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


@contextlib.contextmanager
def _folder_lock(db: Path | None) -> Iterator[None]:
    """An exclusive advisory lock on ``db``'s folder while the body runs (nothing when it cannot be had)."""
    folder = db.expanduser().parent if db is not None else None
    fd = None
    if folder is not None and folder.is_dir():
        with contextlib.suppress(OSError):
            fd = os.open(folder, os.O_RDONLY)
            fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)  # closing releases the lock


def open_racing(open_: Callable[[], T], url: str, *, tries: int = RACE_TRIES) -> T:
    """``open_()``, which opens (and may create) the database at ``url``, safe against other processes
    opening it at the same time: see the module's docstring. Errors other than that race, and the race
    ``tries`` times over, are raised as they are."""
    for attempt in range(tries):
        try:
            with _folder_lock(sqlite_file(url)):
                return open_()
        except Exception as err:
            if attempt + 1 == tries or not schema_race(err):
                raise
            time.sleep(random.uniform(0.05, 0.25) * (attempt + 1))
    raise AssertionError("unreachable")
