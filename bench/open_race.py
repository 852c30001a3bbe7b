"""Drivers starting together on one new database: how often an opening failed before search/schema_race.py,
and what the lock and retry cost in opening time.

Each round makes a new SQLite file and releases ``--drivers`` forked processes at the same moment; each
opens it as a driver does (Optuna: ``open_study(config, create=True)``; MLflow: ``StudyTracker``, which
creates the study's experiment). ``without`` opens with Optuna's and MLflow's own calls, ``with`` through
``open_racing`` (what lsv does). Printed per backend and mode: failed openings, rounds with a failure, and
the time from release to opened (median and slowest process).

    .venv/bin/python bench/open_race.py --rounds 20 --json bench/results/open_race.json
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import optuna

import search.cluster.storage as storage
import search.results.tracking as tracking
from search.cluster.storage import open_study
from search.config import parse_study_config
from search.results.tracking import StudyTracker
from search.schema_race import open_racing

BACKENDS = ("optuna", "mlflow")


def _opener(backend: str, url: str, j: int) -> Callable[[], object]:
    if backend == "optuna":
        config = parse_study_config({"study": {"name": f"s{j % 2}", "out_dir": "/nonexistent"},
                                     "model": {"checkpoint": "/nonexistent/b.safetensors"},
                                     "storage": {"optuna": url}})
        return lambda: open_study(config, create=True)
    return lambda: StudyTracker(url, f"s{j}")


def _round(backend: str, url: str, drivers: int) -> list[tuple[bool, float]]:
    """(opened, seconds from release to done) per process."""
    ctx = mp.get_context("fork")
    barrier, results = ctx.Barrier(drivers), ctx.Queue()
    calls = [_opener(backend, url, j) for j in range(drivers)]

    def run(call: Callable[[], object]) -> None:
        barrier.wait()
        t0 = time.perf_counter()
        try:
            call()
            results.put((True, time.perf_counter() - t0))
        except Exception:  # noqa: BLE001 - counted
            results.put((False, time.perf_counter() - t0))

    procs = [ctx.Process(target=run, args=(c,)) for c in calls]
    for p in procs:
        p.start()
    out = [results.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    return out


def measure(backend: str, fixed: bool, rounds: int, drivers: int, root: Path) -> dict:
    # Without the fix: the two modules that open databases call Optuna and MLflow directly again.
    for module in (storage, tracking):
        module.open_racing = open_racing if fixed else (lambda open_, url, **_: open_())
    try:
        opened, times, bad_rounds = [], [], 0
        for i in range(rounds):
            folder = root / f"{backend}-{fixed}-{i}"
            folder.mkdir()
            got = _round(backend, f"sqlite:///{folder / 'db.sqlite'}", drivers)
            opened += [ok for ok, _ in got]
            times += [t for ok, t in got if ok]
            bad_rounds += not all(ok for ok, _ in got)
    finally:
        for module in (storage, tracking):
            module.open_racing = open_racing
    return {"backend": backend, "mode": "with" if fixed else "without", "rounds": rounds, "drivers": drivers,
            "failed_openings": opened.count(False), "openings": len(opened), "rounds_with_failure": bad_rounds,
            "median_s": round(statistics.median(times), 3) if times else None,
            "slowest_s": round(max(times), 3) if times else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--drivers", type=int, default=4)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for backend in BACKENDS:
            for fixed in (False, True):
                row = measure(backend, fixed, args.rounds, args.drivers, Path(tmp))
                rows.append(row)
                print(f"{backend:7s} {row['mode']:8s} failed {row['failed_openings']:3d}/{row['openings']} openings, "
                      f"{row['rounds_with_failure']:2d}/{row['rounds']} rounds; opened in median "
                      f"{row['median_s']} s, slowest {row['slowest_s']} s", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
