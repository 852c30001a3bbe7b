"""Where the `lsv` commands print (one console, on stderr) and the exit statuses they return."""

from __future__ import annotations

from rich.console import Console

console = Console(stderr=True, soft_wrap=True)
# Exit statuses of every command (README, "Exit codes").
EXIT_OK = 0
EXIT_BAD_INPUT = 2
EXIT_FAILED_TRIALS = 3  # `lsv run`: the study ended, but some trials failed (their reasons are printed)
EXIT_INTERRUPTED = 130  # Ctrl-C (SIGINT) after a clean stop: running trials re-queued, nothing lost
EXIT_SIGTERM = 143
EXIT_LEASE_LOST = 4  # `lsv run`: another driver took the study over while this one was stalled
