"""Flags and argument parsing that several `lsv` commands share."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from lsv_core.errors import LsvError
from search.flags import setting_flag


def refuse_bad_folders(folders: dict[str, Path | None], what: str) -> None:
    """Folders a command creates or writes (``--out DIR``, ``--cache``) that cannot be: refused, naming the flag,
    before anything is written (e.g. one under a regular file)."""
    from search.study.preflight import PreflightFailed, Problem, check_folders

    problems: list[Problem] = []
    check_folders(folders, problems)
    if problems:
        raise PreflightFailed(problems, what=what)


def arch_kwargs(text: str | None) -> dict[str, Any]:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise LsvError(f"--arch-kwargs={text!r} is not JSON: {err}") from None
    if not isinstance(value, dict):
        raise LsvError(f"--arch-kwargs={text!r} should be a JSON object, e.g. '{{\"embed_dim\": 256}}'")
    return value


def loading(args: argparse.Namespace) -> Any:
    from lsv_core.data.loader import DataLoading

    return DataLoading(features=args.features, loader_workers=args.loader_workers)


def corpus_paths(args: argparse.Namespace) -> tuple[Path, Path | None, Path | None]:
    from lsv_core.workbench import DataPaths

    if args.corpus is not None:
        paths = DataPaths.corpus(args.corpus)
        return paths.train, paths.eval, paths.trials
    if args.train is None:
        raise LsvError("give --corpus DIR (with train/ and eval/) or --train DIR [--eval DIR --trials FILE]")
    return Path(args.train), (Path(args.eval) if args.eval else None), (Path(args.trials) if args.trials else None)


def add_loading_flags(p: argparse.ArgumentParser) -> None:
    from lsv_core.data.loader import FEATURE_MODES, DataLoading
    from lsv_core.settings import default_of

    p.add_argument("--features", choices=FEATURE_MODES, default=default_of(DataLoading, "features"),
                   help="where features come from: memory, the sharded store in --cache, audio (fbank on the "
                   "fly), or auto (memory when small)")
    p.add_argument("--loader-workers", type=setting_flag(DataLoading, "loader_workers", int),
                   default=default_of(DataLoading, "loader_workers"),
                   help="DataLoader worker processes for training batches (default: 0 on CPU, 4 on GPU)")
