"""``lsv train``: train a baseline speaker-embedding network (AAM-softmax)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from lsv_core.errors import LsvError
from search.cli.arguments import corpus_paths
from search.cli.output import console
from search.flags import SEED, Bounded


def _train(args: argparse.Namespace) -> int:
    import dataclasses

    from lsv_core.train import TrainConfig, train_baseline
    from lsv_core.workbench import DataPaths
    from search.study.preflight import (
        PreflightFailed,
        Problem,
        check_architecture,
        check_data,
        check_device,
        check_folders,
        check_outputs,
    )

    values: dict[str, Any] = {}
    if args.config:
        try:
            values = json.loads(Path(args.config).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise LsvError(f"--config {args.config}: cannot read it as JSON ({err})") from None
        allowed = {f.name for f in dataclasses.fields(TrainConfig)}
        unknown = sorted(set(values) - allowed) if isinstance(values, dict) else ["(not an object)"]
        if unknown:
            raise LsvError(f"--config {args.config}: unknown field(s) {unknown}; allowed: {sorted(allowed)}")
    for name in ("steps", "seed", "device", "optimizer", "lr", "batch_size", "model", "time_budget_s"):
        if getattr(args, name) is not None:
            values[name] = getattr(args, name)
    cfg = TrainConfig(**values)  # built once, with --model, so model_kwargs defaults follow the model
    if args.m_channels is not None:
        cfg.model_kwargs = {**(cfg.model_kwargs or {}), "m_channels": args.m_channels}
    train_dir, eval_dir, trials = corpus_paths(args)
    problems: list[Problem] = []
    check_outputs({"--out": args.out, "--out (summary)": args.out.with_suffix(".json")}, args.force, problems)
    cache = check_folders({"--cache": args.cache}, problems)["--cache"]
    check_device(cfg.device, problems)
    check_architecture(cfg.model, cfg.model_kwargs or {}, problems)
    if cfg.steps < 1:
        problems.append(Problem("--steps", f"{cfg.steps} should be >= 1"))
    fields = ("--corpus",) * 3 if args.corpus is not None else ("--train", "--eval", "--trials")
    if eval_dir is not None and trials is not None:
        check_data(DataPaths(train_dir, eval_dir, trials), problems, fields=fields, cache_dir=cache)
    elif not train_dir.exists():
        problems.append(Problem(fields[0], f"data dir {train_dir} does not exist"))
    if problems:
        raise PreflightFailed(problems, what="the training")
    summary = train_baseline(cfg, train_dir, out=args.out, eval_dir=eval_dir, trials=trials,
                             cache_dir=args.cache, overwrite=args.force)
    ev = summary.eval
    msg = f"[green]baseline[/] {summary.checkpoint}: {summary.params} params, {summary.train_wall_s:.0f} s training"
    if ev:
        msg += (f"; EER {ev['eer']:.2f} % [{ev['eer_ci_low']:.2f}, {ev['eer_ci_high']:.2f}], "
                f"minDCF(0.01) {ev['min_dcf_001']:.3f} on {ev['n_trials']} trials")
    console.print(msg)
    return 0


def add_train_parser(sub: argparse._SubParsersAction) -> None:
    """`lsv train`."""
    t = sub.add_parser("train", help="train a baseline speaker-embedding network (AAM-softmax)")
    t.add_argument("--corpus", help="corpus root holding train/, eval/ and eval/trials")
    t.add_argument("--train", help="Kaldi data dir or VoxCeleb folder to train on")
    t.add_argument("--eval", help="data to evaluate on")
    t.add_argument("--trials", help="trial list over --eval")
    t.add_argument("--out", required=True, type=Path, help="checkpoint path (.safetensors); summary goes to .json")
    t.add_argument("--config", help="JSON file of TrainConfig fields")
    t.add_argument("--model")
    t.add_argument("--m-channels", type=Bounded(int, ge=1))
    t.add_argument("--steps", type=Bounded(int, ge=1))
    t.add_argument("--batch-size", type=Bounded(int, ge=1))
    t.add_argument("--optimizer", choices=["sgd", "adam"])
    t.add_argument("--lr", type=Bounded(float, gt=0))
    t.add_argument("--seed", type=SEED)
    t.add_argument("--time-budget-s", type=Bounded(float, gt=0))
    t.add_argument("--device", help="auto | cpu | cuda[:N]")
    t.add_argument("--cache", type=Path, help="feature cache folder")
    t.add_argument("--force", action="store_true", help="replace an existing checkpoint")
    t.set_defaults(func=_train)
