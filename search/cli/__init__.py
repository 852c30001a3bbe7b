"""``lsv``: the command line, a thin shell over the Python API.

Every subcommand maps onto one library call; errors caused by input (configs, data, existing outputs)
print one clear line and exit with status 2.

One module per command (``search/cli/<command>.py``: its parser and what it runs); ``output`` holds
the console and the exit statuses, ``arguments`` the flags several commands share.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from importlib.metadata import entry_points

from lsv_core.errors import LsvError
from search.cli.corpus import add_corpus_parser
from search.cli.data import add_data_parser
from search.cli.evaluate import add_evaluate_parser
from search.cli.export import add_export_parser
from search.cli.output import EXIT_BAD_INPUT, EXIT_FAILED_TRIALS, EXIT_INTERRUPTED, EXIT_OK, console
from search.cli.quantize import add_quantize_parser
from search.cli.run import add_run_parser
from search.cli.status import add_status_parser
from search.cli.train import add_train_parser
from search.cli.verify import add_verify_parser

__all__ = ["COMMAND_GROUP", "EXIT_BAD_INPUT", "EXIT_FAILED_TRIALS", "EXIT_INTERRUPTED", "EXIT_OK", "build_parser", "main"]
# Other packages add subcommands through this entry-point group: ``f(subparsers)`` adds a parser whose
# ``func(args) -> int`` runs it. The dashboards package adds ``report`` so that search never imports it.
COMMAND_GROUP = "lsv.commands"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lsv", description="Bit-width search for speaker-verification networks.")
    sub = p.add_subparsers(dest="command", required=True)
    for add_parser in (add_corpus_parser, add_train_parser, add_evaluate_parser, add_quantize_parser,
                       add_data_parser, add_run_parser, add_status_parser, add_verify_parser, add_export_parser):
        add_parser(sub)
    for command in entry_points(group=COMMAND_GROUP):  # e.g. `lsv report`, from the dashboards package
        command.load()(sub)
    return p


def _show_library_log() -> None:
    """Library decisions worth a line (e.g. which feature source was chosen) go to the console."""
    import logging

    from rich.logging import RichHandler

    logger = logging.getLogger("lsv")
    if not logger.handlers:
        logger.addHandler(RichHandler(console=console, show_time=False, show_path=False))
        logger.setLevel(logging.INFO)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _show_library_log()
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except LsvError as exc:
        from search.redaction import scrub_known

        console.print(f"[bold red]error:[/] {scrub_known(str(exc))}")  # no password, whatever raised it
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]")
        return EXIT_INTERRUPTED
