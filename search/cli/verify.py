"""``lsv verify``: re-run front / knee / given trials with other seeds and longer fine-tuning."""

from __future__ import annotations

import argparse
from pathlib import Path

from search.cli.output import EXIT_OK, console
from search.flags import TRIAL_NUMBER, Bounded


def _verify(args: argparse.Namespace) -> int:
    from search.config import load_study_config
    from search.results.verify import VerifyPlan, verify_study

    config = load_study_config(args.study)
    which = "knee" if args.knee else ("trials" if args.trials else "front")
    plan = VerifyPlan(which=which, trials=tuple(args.trials or ()), seeds=args.seeds, steps_mult=args.steps_mult)
    report = verify_study(config, plan, address=args.address, toml=str(args.study))
    for line in report.lines():
        console.print(line, soft_wrap=True)
    return EXIT_OK


def add_verify_parser(sub: argparse._SubParsersAction) -> None:
    """`lsv verify`."""
    from lsv_core.settings import default_of
    from search.results.verify import VerifyPlan

    v = sub.add_parser("verify", help="re-run front / knee / given trials with other seeds and longer fine-tuning")
    v.add_argument("study", type=Path, help="study config (.toml)")
    which = v.add_mutually_exclusive_group()
    which.add_argument("--front", action="store_true", help="every point of the Pareto front (default)")
    which.add_argument("--knee", action="store_true", help="the knee only")
    which.add_argument("--trials", type=TRIAL_NUMBER, nargs="+", help="these Optuna trial numbers")
    v.add_argument("--seeds", type=Bounded(int, ge=1), default=default_of(VerifyPlan, "seeds"),
                   help="fine-tuning seeds per point (other than the study's)")
    v.add_argument("--steps-mult", type=Bounded(float, gt=0), default=default_of(VerifyPlan, "steps_mult"),
                   help="fine-tuning steps as a multiple of the study's")
    v.add_argument("--address", help="Ray cluster address HOST:PORT (default: a local Ray)")
    v.set_defaults(func=_verify)
