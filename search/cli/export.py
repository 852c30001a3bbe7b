"""``lsv export``: verify one trial and export it (model.onnx with codebooks, torch-free infer.py, packed model, WeSpeaker .pt for WeSpeaker architectures, model card)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from search.cli.arguments import refuse_bad_folders
from search.cli.output import console
from search.flags import TRIAL_NUMBER, Bounded


def _export(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from search.config import load_study_config
    from search.results.export import ExportOptions, export_trial
    from search.results.selection import SelectionRule

    config = load_study_config(args.study)
    refuse_bad_folders({"--out": args.out}, "the export")
    rule = SelectionRule(trial=args.trial, max_size_mb=args.max_size_mb, max_eer=args.max_eer, knee=args.knee,
                         knee_ci=args.knee_ci, not_worse_than_control=args.not_worse_than_control,
                         within_pp=args.within_pp)
    options = ExportOptions(force=args.force, register=not args.no_register, eer_tolerance=args.eer_tolerance,
                            alias=args.alias, require_verified=args.require_verified,
                            float_onnx=args.float_onnx)
    result = export_trial(config, rule, args.out, options)
    for note in result.notes:
        console.print(f"[yellow]warning:[/] {note}")
    console.print(f"[green]exported[/] {result.line()}")
    print(json.dumps(asdict(result), indent=2, default=str))
    return 0


def add_export_parser(sub: argparse._SubParsersAction) -> None:
    """`lsv export`."""
    from lsv_core.settings import default_of
    from search.results.export import ExportOptions

    ex = sub.add_parser("export", help="verify one trial and export it (model.onnx with codebooks, torch-free "
                                       "infer.py, packed model, WeSpeaker .pt for WeSpeaker architectures, model card)")
    ex.add_argument("study", type=Path, help="study config (.toml)")
    pick = ex.add_mutually_exclusive_group(required=True)
    pick.add_argument("--trial", type=TRIAL_NUMBER, help="this Optuna trial number")
    pick.add_argument("--max-size-mb", type=Bounded(float, gt=0),
                      help="lowest EER with model size <= X MB (1e6 bytes of model.onnx)")
    pick.add_argument("--max-eer", type=Bounded(float, ge=0, le=100), help="smallest model with EER <= Y percent")
    pick.add_argument("--knee", action="store_true", help="the knee of the Pareto front")
    pick.add_argument("--knee-ci", action="store_true",
                      help="the smallest model not significantly worse than the knee (paired bootstrap)")
    pick.add_argument("--not-worse-than-control", action="store_true",
                      help="the smallest model not significantly worse than the study's fp32 control")
    pick.add_argument("--within-pp", type=Bounded(float, ge=0),
                      help="the smallest model within X EER points of the fp32 control")
    ex.add_argument("--require-verified", action="store_true",
                    help="refuse a trial `lsv verify` has not re-run")
    ex.add_argument("--out", required=True, type=Path, help="folder to create")
    ex.add_argument("--force", action="store_true",
                    help="replace an existing --out folder, only if it is a bundle lsv export wrote")
    ex.add_argument("--float-onnx", action="store_true",
                    help="also write model.float.onnx, the dequantized float network (for runtimes that want it)")
    ex.add_argument("--no-register", action="store_true", help="skip the MLflow Model Registry")
    ex.add_argument("--alias", default=default_of(ExportOptions, "alias"),
                    help="registry alias to point at the new version")
    ex.add_argument("--eer-tolerance", type=Bounded(float, ge=0), default=default_of(ExportOptions, "eer_tolerance"),
                    help="allowed |re-evaluated - logged| EER in percent points, checked before anything is "
                    "written (model.onnx is compared with the torch model by embeddings and trial scores, "
                    "not by EER)")
    ex.set_defaults(func=_export)
