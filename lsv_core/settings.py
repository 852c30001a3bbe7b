"""Settings of the library's config dataclasses, each declared once with its default and its bounds.

A field declared with :func:`setting` carries its bounds in the dataclass field's metadata.
:func:`check_settings` enforces them (and the type: no bool for a number, no float for an int) in the
dataclass's ``__post_init__``, and the study config and the CLI read the same default and bounds with
:func:`default_of` / :func:`bounds_of`, so a default or a limit never differs between the library, a
study TOML and a command-line flag.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from lsv_core.errors import ConfigError

__all__ = ["bounds_of", "check_settings", "default_of", "setting"]


def setting(default: Any, *, ge: float | None = None, gt: float | None = None, le: float | None = None,
            choices: tuple[Any, ...] | None = None, optional: bool = False) -> Any:
    """A dataclass field with ``default`` and its bounds (``ge``/``gt``/``le``) or allowed ``choices``.

    ``optional``: None is also allowed (it means "off" or "the default behaviour"; the docstring says which).
    """
    bounds = {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le)) if v is not None}
    return dataclasses.field(default=default, metadata={"bounds": bounds, "choices": choices,
                                                        "optional": optional})


def _field(cls: type, name: str) -> dataclasses.Field:
    for f in dataclasses.fields(cls):
        if f.name == name:
            return f
    raise KeyError(f"{cls.__name__} has no setting {name!r}")


def default_of(cls: type, name: str) -> Any:
    """The declared default of ``cls.name``."""
    return _field(cls, name).default


def bounds_of(cls: type, name: str) -> dict[str, float]:
    """The declared bounds of ``cls.name`` as pydantic ``Field`` keywords (``ge``, ``gt``, ``le``)."""
    return dict(_field(cls, name).metadata.get("bounds") or {})


def check_settings(obj: Any) -> None:
    """Raise :class:`ConfigError` naming the first field of ``obj`` outside its declared type or bounds."""
    for f in dataclasses.fields(obj):
        if "bounds" not in f.metadata:
            continue
        value = getattr(obj, f.name)
        if value is None and f.metadata.get("optional"):
            continue
        choices = f.metadata.get("choices")
        if choices is not None:
            if value not in choices or isinstance(value, bool) != isinstance(choices[0], bool):
                raise ConfigError(f"{f.name}={value!r} is not allowed; allowed: {list(choices)}")
            continue
        # Annotations are strings here (postponed evaluation): "int", "int | None", "float", ...
        want_int = str(f.type).replace(" ", "") in ("int", "int|None")
        ok_type = isinstance(value, int) if want_int else isinstance(value, (int, float))
        if isinstance(value, bool) or not ok_type or (not want_int and not math.isfinite(value)):
            kind = "an integer" if want_int else "a finite number"
            raise ConfigError(f"{f.name}={value!r} should be {kind}")
        bounds = f.metadata["bounds"]
        if "ge" in bounds and not value >= bounds["ge"]:
            raise ConfigError(f"{f.name}={value!r} should be >= {bounds['ge']:g}")
        if "gt" in bounds and not value > bounds["gt"]:
            raise ConfigError(f"{f.name}={value!r} should be > {bounds['gt']:g}")
        if "le" in bounds and not value <= bounds["le"]:
            raise ConfigError(f"{f.name}={value!r} should be <= {bounds['le']:g}")
