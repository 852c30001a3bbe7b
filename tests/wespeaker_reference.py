"""WeSpeaker's own model files, loaded by path from the ``wespeaker-unofficial`` wheel (a test-only dependency).

The package's ``__init__`` imports heavy optional modules, so the wheel is installed ``--no-deps`` and only the
model files are loaded, ``pooling_layers`` first (the model files import it by its package name). The parent
packages ``wespeaker`` and ``wespeaker.models`` are registered as empty packages so that import does not run
their ``__init__``.
"""

from __future__ import annotations

import functools
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest


@functools.cache  # before the stubs below replace the package in sys.modules
def _models_dir() -> Path:
    spec = importlib.util.find_spec("wespeaker")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("the wespeaker-unofficial wheel is not installed: pip install --no-deps wespeaker-unofficial "
                    "(a test dependency; see tests/wespeaker_reference.py)")
    return Path(next(iter(spec.submodule_search_locations))) / "models"


def wespeaker_module(name: str) -> ModuleType:
    """``wespeaker.models.<name>`` loaded from its file, without importing the ``wespeaker`` package."""
    models_dir = _models_dir()
    for package, path in (("wespeaker", models_dir.parent), ("wespeaker.models", models_dir)):
        if package not in sys.modules:
            stub = ModuleType(package)
            stub.__path__ = [str(path)]
            sys.modules[package] = stub
    for module in ("pooling_layers", name):
        full = f"wespeaker.models.{module}"
        if full not in sys.modules:
            spec = importlib.util.spec_from_file_location(full, models_dir / f"{module}.py")
            assert spec is not None and spec.loader is not None
            loaded = importlib.util.module_from_spec(spec)
            sys.modules[full] = loaded
            spec.loader.exec_module(loaded)
    return sys.modules[f"wespeaker.models.{name}"]
