"""``lsv corpus``: generate the deterministic espeak-ng multi-speaker corpus."""

from __future__ import annotations

import argparse
from pathlib import Path

from search.cli.arguments import refuse_bad_folders
from search.cli.output import console
from search.flags import SEED, WORKERS, Bounded


def _corpus_synth(args: argparse.Namespace) -> int:
    from lsv_core.data.synth import SynthConfig, synthesize_corpus

    refuse_bad_folders({"--out": args.out}, "the synthesis")
    cfg = SynthConfig(speakers=args.speakers, utts=args.utts, seed=args.seed, eval_speakers=args.eval_speakers)
    summary = synthesize_corpus(args.out, cfg, workers=args.workers, overwrite=args.force)
    console.print(f"[green]corpus written[/] to {args.out}: {summary}")
    return 0


def add_corpus_parser(sub: argparse._SubParsersAction) -> None:
    """`lsv corpus synth`."""
    from lsv_core.data.synth import DEFAULT_EVAL_SPEAKERS, DEFAULT_SEED, DEFAULT_SPEAKERS, DEFAULT_UTTS

    corpus = sub.add_parser("corpus", help="embedded synthetic corpus").add_subparsers(dest="action", required=True)
    s = corpus.add_parser("synth", help="generate the deterministic espeak-ng multi-speaker corpus")
    s.add_argument("--out", required=True, type=Path)
    s.add_argument("--speakers", type=Bounded(int, ge=2), default=DEFAULT_SPEAKERS,
                   help="total speakers (train + eval)")
    s.add_argument("--utts", type=Bounded(int, ge=2), default=DEFAULT_UTTS, help="utterances per speaker")
    s.add_argument("--eval-speakers", type=Bounded(int, ge=1), default=DEFAULT_EVAL_SPEAKERS)
    s.add_argument("--seed", type=SEED, default=DEFAULT_SEED)
    s.add_argument("--workers", type=WORKERS, default=2)
    s.add_argument("--force", action="store_true", help="replace an existing corpus")
    s.set_defaults(func=_corpus_synth)
