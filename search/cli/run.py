"""``lsv run``: run or resume a bit-width search study (Optuna + Ray + MLflow)."""

from __future__ import annotations

import argparse
import signal
from pathlib import Path

from search.cli.output import (
    EXIT_FAILED_TRIALS,
    EXIT_INTERRUPTED,
    EXIT_LEASE_LOST,
    EXIT_OK,
    EXIT_SIGTERM,
    console,
)
from search.flags import Bounded


def _run(args: argparse.Namespace) -> int:
    from search.cluster.lease import LeaseLost
    from search.config import load_study_config
    from search.redaction import redacted
    from search.results.tracking import StudyTracker
    from search.study.run import StudyInterrupted, run_study

    config = load_study_config(args.study, n_trials=args.n_trials)
    try:
        result = run_study(config, address=args.address, fresh=args.fresh, control_only=args.control_only)
    except LeaseLost as exc:
        console.print(f"[bold red]lease lost:[/] {exc}", soft_wrap=True)
        return EXIT_LEASE_LOST
    except StudyInterrupted as exc:
        console.print(f"[yellow]study {config.study.name} {exc}[/]")
        return EXIT_SIGTERM if exc.signum == signal.SIGTERM else EXIT_INTERRUPTED
    st = result.status
    console.print(f"[green]study {config.study.name}[/] {'resumed' if result.resumed else 'created'} in "
                  f"{result.wall_s:.0f} s -> {result.study_dir}")
    console.print(st.line())
    console.print(st.cost.line())
    tracker = StudyTracker(config.mlflow_uri, config.study.name)
    if config.mlflow_uri.startswith("sqlite:"):
        console.print(f"browse: mlflow ui --backend-store-uri {redacted(config.mlflow_uri)} --host 127.0.0.1, then "
                      f"{tracker.runs_url()}")
    else:
        console.print(f"browse: {redacted(config.mlflow_uri).rstrip('/')}/#/experiments/{tracker.experiment_id}/runs")
    if st.n_failed:
        console.print(f"[red]{st.n_failed} trial(s) failed[/]:")
        for reason, n in sorted(st.failure_reasons.items(), key=lambda kv: -kv[1]):
            console.print(f"  {n} x {reason}", soft_wrap=True)
        return EXIT_FAILED_TRIALS
    return EXIT_OK


def add_run_parser(sub: argparse._SubParsersAction) -> None:
    """`lsv run`."""
    r = sub.add_parser("run", help="run or resume a bit-width search study (Optuna + Ray + MLflow)")
    r.add_argument("study", type=Path, help="study config (.toml), e.g. studies/quickstart.toml")
    r.add_argument("--address", help="Ray cluster address HOST:PORT (default: a local Ray)")
    r.add_argument("--n-trials", type=Bounded(int, ge=1), help="override study.n_trials")
    r.add_argument("--control-only", action="store_true",
                   help="run only the study's fp32 control (fine-tuned like a trial, nothing quantized)")
    r.add_argument("--fresh", action="store_true",
                   help="start over: the existing study folder is moved aside (never deleted)")
    r.set_defaults(func=_run)
