"""Numeric command-line flags with their allowed range, checked while argparse reads the command line.

A flag declared ``type=Bounded(int, ge=1)`` refuses ``--workers -1`` before the command's function runs,
with argparse's own exit status 2 and a message naming the flag, the value and what is allowed
(``argument --workers: -1 should be >= 1``): no traceback, nothing read, hashed or written first.
:func:`setting_flag` takes the range a library dataclass declares (:func:`lsv_core.settings.setting`),
so a flag and the field it sets never disagree. ``tests/test_bad_flags.py`` walks the whole parser and
fails on any ``type=int`` / ``type=float`` flag left without a range.
"""

from __future__ import annotations

import argparse
import dataclasses
import math

from lsv_core.settings import bounds_of

__all__ = ["SEED", "TRIAL_NUMBER", "WORKERS", "Bounded", "setting_flag"]


@dataclasses.dataclass(frozen=True)
class Bounded:
    """An argparse ``type``: parse an ``int`` or ``float`` and check ``>= ge``, ``> gt``, ``<= le``."""

    kind: type
    ge: float | None = None
    gt: float | None = None
    le: float | None = None

    @property
    def __name__(self) -> str:  # argparse names the type in some of its messages
        return self.kind.__name__

    def allowed(self) -> str:
        """What the flag accepts, in words (used in the error and by the tests)."""
        parts = [f"{op} {bound:g}" for op, bound in ((">=", self.ge), (">", self.gt), ("<=", self.le))
                 if bound is not None]
        what = "an integer" if self.kind is int else "a finite number"
        return f"{' and '.join(parts)} ({what})" if parts else what

    def __call__(self, text: str) -> int | float:
        try:
            value = self.kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} should be {self.allowed()}") from None
        if self.kind is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} should be {self.allowed()}")
        if ((self.ge is not None and not value >= self.ge) or (self.gt is not None and not value > self.gt)
                or (self.le is not None and not value <= self.le)):
            raise argparse.ArgumentTypeError(f"{text} should be {self.allowed()}")
        return value


def setting_flag(cls: type, name: str, kind: type) -> Bounded:
    """The range ``cls.name`` declares with :func:`lsv_core.settings.setting`, as a flag type."""
    return Bounded(kind, **bounds_of(cls, name))


SEED = Bounded(int, ge=0)  # numpy's generators refuse negative seeds
WORKERS = Bounded(int, ge=1)  # processes or threads; leave the flag out for the default
TRIAL_NUMBER = Bounded(int, ge=0)  # Optuna numbers trials from 0
