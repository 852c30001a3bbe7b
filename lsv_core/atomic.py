"""Atomic, no-clobber file writes: a file is either absent, the old one, or the complete new one."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from lsv_core.errors import LsvError

T = TypeVar("T")


class RefuseOverwrite(LsvError, FileExistsError):
    """The target exists and the caller did not ask to overwrite it."""


def check_writable(path: str | os.PathLike[str], overwrite: bool) -> Path:
    """``path`` if it may be written: absent (or ``overwrite``) and not under a regular file."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise RefuseOverwrite(f"{path} exists; pass overwrite=True (CLI: --force) to replace it")
    base = path.parent
    while not base.exists() and base != base.parent:
        base = base.parent
    if base.exists() and not base.is_dir():  # mkdir would raise FileExistsError / NotADirectoryError later
        raise LsvError(f"cannot create {path}: {base} is a file, not a folder")
    return path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is renamed onto ``path``.

    Writers that take a filename (safetensors, torch, soundfile) write to the yielded path, so a crash
    never leaves a half-written file under the final name.
    """
    target = check_writable(path, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        check_writable(target, overwrite)
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text_atomic(path: str | os.PathLike[str], text: str, *, overwrite: bool = False) -> Path:
    with atomic_path(path, overwrite=overwrite) as tmp:
        tmp.write_text(text)
    return Path(path)


def replace_dir(new: str | os.PathLike[str], target: str | os.PathLike[str], *, overwrite: bool) -> Path:
    """Move the finished folder ``new`` onto ``target`` by renames (same filesystem).

    A reader sees the old folder or the complete new one, never a mix. An existing ``target`` is replaced
    only with ``overwrite`` (it is renamed aside first, then deleted).
    """
    new, target = Path(new), Path(target)
    old = None
    if target.exists():
        if not overwrite:
            raise RefuseOverwrite(f"{target} exists; pass overwrite=True (CLI: --force) to replace it")
        old = target.with_name(f".{target.name}.old-{os.getpid()}-{time.monotonic_ns()}")
        os.replace(target, old)
    os.replace(new, target)
    if old is not None:
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink()
    return target


def build_dir(target: str | os.PathLike[str], build: Callable[[Path], T]) -> T:
    """Run ``build(tmp)`` in a fresh sibling folder of ``target`` and rename it onto ``target`` when it returns.

    ``target`` must not exist. An interrupted build leaves only ``.<name>.partial-*`` folders, never a
    half-built ``target``; they are removed by the next build of the same target.
    """
    target = Path(target)
    if target.exists():
        raise RefuseOverwrite(f"{target} exists")
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".{target.name}.partial-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        result = build(tmp)
        tmp.chmod(0o755)
        os.replace(tmp, target)
        return result
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
