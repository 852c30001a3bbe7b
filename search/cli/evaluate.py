"""``lsv evaluate``: score a model on a trial list (EER %, minDCF, bootstrap CI)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lsv_core.atomic import write_text_atomic
from lsv_core.errors import LsvError
from search.cli.arguments import add_loading_flags, loading
from search.flags import Bounded


def _evaluate(args: argparse.Namespace) -> int:
    from lsv_core.evaluate import evaluate_dir
    from lsv_core.model_files import load_model_file
    from lsv_core.workbench import DataPaths
    from search.study.preflight import PreflightFailed, Problem, check_data, check_folders, check_outputs

    problems: list[Problem] = []
    check_outputs({"--json": args.json}, args.force, problems)
    cache = check_folders({"--cache": args.cache}, problems)["--cache"]
    if args.n_boot < 1:
        problems.append(Problem("--n-boot", f"{args.n_boot} should be >= 1 (bootstrap replicates of the EER interval)"))
    model = None
    try:
        model = load_model_file(args.model, name=args.arch)
    except LsvError as err:
        problems.append(Problem("--model", str(err)))
    check_data(DataPaths(args.data, args.data, args.trials), problems, fields=("--data", "--data", "--trials"),
               cache_dir=cache, need_train=False)
    if args.cohort is not None and not args.cohort.is_dir():
        problems.append(Problem("--cohort", f"{args.cohort} does not exist"))
    if problems:
        raise PreflightFailed(problems, what="the evaluation")
    result = evaluate_dir(model, args.data, args.trials, cache_dir=args.cache, cohort_dir=args.cohort,
                          n_boot=args.n_boot, loading=loading(args))
    payload = {"model": str(args.model), "data": str(args.data), "trials": str(args.trials), **result.to_dict()}
    print(json.dumps(payload, indent=2))
    if args.json:
        write_text_atomic(args.json, json.dumps(payload, indent=2), overwrite=args.force)
    return 0


def add_evaluate_parser(sub: argparse._SubParsersAction) -> None:
    """`lsv evaluate`."""
    e = sub.add_parser("evaluate", help="score a model on a trial list (EER %%, minDCF, bootstrap CI)")
    e.add_argument("--model", required=True, type=Path, help="our checkpoint (.safetensors), a packed model, "
                   "or a WeSpeaker avg_model.pt (then give --arch)")
    e.add_argument("--arch", help="architecture name for a WeSpeaker .pt checkpoint, e.g. ResNet34")
    e.add_argument("--data", required=True, type=Path)
    e.add_argument("--trials", required=True, type=Path)
    e.add_argument("--cohort", type=Path, help="data for AS-norm's cohort (enables AS-norm)")
    e.add_argument("--cache", type=Path, help="feature cache folder")
    add_loading_flags(e)
    e.add_argument("--n-boot", type=Bounded(int, ge=1), default=1000, help="bootstrap replicates for the EER CI")
    e.add_argument("--json", type=Path, help="also write the result here")
    e.add_argument("--force", action="store_true")
    e.set_defaults(func=_evaluate)
