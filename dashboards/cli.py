"""``lsv report``: the dashboards' subcommand, added to the ``lsv`` command line through the
``lsv.commands`` entry point (see ``search.cli.COMMAND_GROUP``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console

console = Console(stderr=True, soft_wrap=True)


def _report(args: argparse.Namespace) -> int:
    from dashboards.report import write_report
    from search.config import load_study_config
    from search.study.preflight import PreflightFailed, Problem, check_folders

    config = load_study_config(args.study)
    problems: list[Problem] = []
    check_folders({"--out": args.out}, problems)
    if problems:
        raise PreflightFailed(problems, what="the report")
    index = write_report(config, args.out, log_to_mlflow=not args.no_mlflow)
    console.print(f"[green]report[/] {index} (a static page: open it in a browser, no server needed)")
    return 0


def add_report_command(sub: argparse._SubParsersAction) -> None:
    rp = sub.add_parser("report", help="static HTML report of a study (Pareto front, hypervolume, bit widths)")
    rp.add_argument("study", type=Path, help="study config (.toml)")
    rp.add_argument("--out", type=Path, help="report folder (default: runs/<study>/report)")
    rp.add_argument("--no-mlflow", action="store_true", help="do not tag runs nor log the report to MLflow")
    rp.set_defaults(func=_report)
