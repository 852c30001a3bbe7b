"""Exceptions raised at the project's boundaries (data files, configs, checkpoints)."""

from __future__ import annotations


class LsvError(Exception):
    """Base class: every error a user can cause by bad input."""


class DataError(LsvError, ValueError):
    """A data file (audio, Kaldi list, trial list) is missing or malformed; the message names file and line."""


class ConfigError(LsvError, ValueError):
    """A config field is invalid; the message names the field, the value and what is allowed."""


class CheckpointError(LsvError, ValueError):
    """A checkpoint cannot be read or does not match the architecture."""
