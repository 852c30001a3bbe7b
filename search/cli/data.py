"""``lsv data``: build the content-keyed feature store of a data dir ahead of a study."""

from __future__ import annotations

import argparse
from pathlib import Path

from search.cli.arguments import refuse_bad_folders
from search.cli.output import console
from search.flags import WORKERS, setting_flag


def _data_cache(args: argparse.Namespace) -> int:
    from lsv_core.data.features import FbankConfig
    from lsv_core.data.fingerprint import manifest_of
    from lsv_core.data.manifest import read_data
    from lsv_core.data.store import StoreConfig, build_store, store_folder

    refuse_bad_folders({"--cache": args.cache}, "the feature store")
    data = read_data(args.data)
    manifest = manifest_of(data, cache_dir=args.cache, workers=args.workers)
    store = StoreConfig(dtype=args.dtype, shard_utts=args.shard_utts)
    n = build_store(data, manifest, args.cache, store=store, workers=args.workers)
    console.print(f"[green]feature store[/] {store_folder(args.cache, FbankConfig(), store)}: {len(data)} utterances "
                  f"of {args.data} ({n} computed now, {len(data) - n} already stored)")
    return 0


def _data_audit(args: argparse.Namespace) -> int:
    from lsv_core.data.audit import audit_audio, raise_for_problems
    from lsv_core.data.manifest import read_data

    refuse_bad_folders({"--cache": args.cache}, "the audit")
    data = read_data(args.data)
    problems = audit_audio(data, cache_dir=args.cache, workers=args.workers)
    raise_for_problems(problems, source=str(args.data))
    console.print(f"[green]audio ok[/]: {len(data)} files of {args.data}")
    return 0


def _data_prepare_voxceleb(args: argparse.Namespace) -> int:
    from lsv_core.data.voxceleb import prepare_voxceleb

    refuse_bad_folders({"--out": args.out}, "the preparation")
    summary = prepare_voxceleb(args.root, args.out, convert_m4a=args.convert_m4a, workers=args.workers,
                               overwrite=args.force)
    for name, counts in summary.sets.items():
        console.print(f"[green]{name}[/]: {counts['utterances']} utterances, {counts['speakers']} speakers -> "
                      f"{summary.out / name}")
    for name, n in summary.trials.items():
        console.print(f"[green]{name}[/]: {n} trials -> {summary.out / 'vox1' / name}")
    return 0


def add_data_parser(sub: argparse._SubParsersAction) -> None:
    """`lsv data cache | audit | prepare voxceleb`."""
    from lsv_core.data.store import StoreConfig
    from lsv_core.settings import default_of

    data = sub.add_parser("data", help="prepare, check and cache data").add_subparsers(dest="action", required=True)
    dc = data.add_parser("cache", help="build the content-keyed feature store of a data dir ahead of a study")
    dc.add_argument("data", type=Path, help="Kaldi data dir or VoxCeleb folder")
    dc.add_argument("--cache", type=Path, default=Path("runs/cache"), help="cache folder (a study's data.cache_dir)")
    dc.add_argument("--dtype", choices=("float16", "float32"), default=default_of(StoreConfig, "dtype"))
    dc.add_argument("--shard-utts", type=setting_flag(StoreConfig, "shard_utts", int),
                    default=default_of(StoreConfig, "shard_utts"))
    dc.add_argument("--workers", type=WORKERS, help="processes computing fbank (default: the CPU count, at most 8)")
    dc.set_defaults(func=_data_cache)
    da = data.add_parser("audit", help="check every audio file (readable, non-empty, 16 kHz, long enough)")
    da.add_argument("data", type=Path, help="Kaldi data dir or VoxCeleb folder")
    da.add_argument("--cache", type=Path, help="remember files that passed here (by content)")
    da.add_argument("--workers", type=WORKERS)
    da.set_defaults(func=_data_audit)
    dp = data.add_parser("prepare", help="turn a downloaded corpus into Kaldi data dirs and trial lists")
    prep = dp.add_subparsers(dest="corpus", required=True)
    vox = prep.add_parser("voxceleb", help="VoxCeleb1/2 download layout -> vox1/, vox2_dev/, Vox1-O/E/H trials")
    vox.add_argument("--root", required=True, type=Path, help="folder holding the VoxCeleb downloads")
    vox.add_argument("--out", required=True, type=Path, help="folder to create")
    vox.add_argument("--convert-m4a", action="store_true", help="decode .m4a once to 16 kHz WAV under OUT/wav")
    vox.add_argument("--workers", type=WORKERS)
    vox.add_argument("--force", action="store_true", help="replace an existing --out folder")
    vox.set_defaults(func=_data_prepare_voxceleb)
