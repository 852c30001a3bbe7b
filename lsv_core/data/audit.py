"""Check every audio file of a data set before any work starts, and report all problems at once.

Each file's header is read (soundfile; PyAV for ``.m4a`` and other containers) and checked: it exists,
is not empty, is readable, has the expected sample rate and is at least one fbank frame long. Files run
in parallel threads. Files that passed are remembered in ``<cache_dir>/audit/`` by their content key (id,
size and digest, :mod:`lsv_core.data.fingerprint`), so a second audit of the same data only stats the
files; a changed file is checked again. Problems are never cached: they are re-checked every time.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lsv_core.atomic import atomic_path
from lsv_core.data.audio import SAMPLE_RATE, read_header
from lsv_core.data.manifest import DataSet
from lsv_core.errors import DataError

__all__ = ["AudioProblem", "AudioProblemsError", "audit_audio", "raise_for_problems"]


@dataclass(frozen=True)
class AudioProblem:
    """One bad file: its utterance id, its path and what is wrong with it."""

    utt: str
    path: Path
    reason: str

    def __str__(self) -> str:
        return f"utterance {self.utt}: {self.path}: {self.reason}"


class AudioProblemsError(DataError):
    """Raised by :func:`raise_for_problems`; ``problems`` holds every one."""

    def __init__(self, message: str, problems: list[AudioProblem]) -> None:
        super().__init__(message)
        self.problems = problems


def _check(utt: str, path: Path, sample_rate: int, min_samples: int) -> str | None:
    try:
        size = os.stat(path).st_size
    except FileNotFoundError:
        return "does not exist"
    except OSError as exc:
        return f"cannot be read ({exc.strerror})"
    if size == 0:
        return "is empty (0 bytes)"
    if not os.access(path, os.R_OK):
        return "cannot be read (permission denied)"
    try:
        header = read_header(path)
    except Exception as exc:  # soundfile and PyAV raise several types for a file they cannot parse
        return f"is unreadable: {str(exc).strip() or type(exc).__name__}"
    if header.frames <= 0:
        return "is empty (0 samples)"
    if header.sample_rate != sample_rate:
        return f"has sample rate {header.sample_rate} Hz, expected {sample_rate} Hz"
    if header.frames < min_samples:
        return (f"is {header.frames} samples long, shorter than one {min_samples}-sample fbank frame "
                f"({1000 * min_samples / sample_rate:g} ms)")
    return None


def _passed_file(cache_dir: Path, sample_rate: int, min_samples: int) -> Path:
    return cache_dir / "audit" / f"passed-{sample_rate}-{min_samples}.npy"


def audit_audio(data: DataSet, *, utts: list[str] | None = None, cache_dir: str | Path | None = None,
                workers: int | None = None, progress: bool = True, sample_rate: int = SAMPLE_RATE,
                frame_length_ms: float = 25.0) -> list[AudioProblem]:
    """Every problem of the audio files of ``utts`` (default: all) of ``data``, in listing order.

    ``cache_dir`` remembers the files that passed (by content), so auditing again is nearly free.
    """
    from tqdm import tqdm

    from lsv_core.data.fingerprint import manifest_of
    from lsv_core.data.store import entry_keys

    utts = list(data.utterances) if utts is None else list(utts)
    min_samples = int(sample_rate * frame_length_ms / 1000)
    workers = workers or min(2 * len(os.sched_getaffinity(0)), 16)
    todo = list(range(len(utts)))
    keys = passed = store = None
    if cache_dir is not None:
        # Missing and unreadable files cannot be fingerprinted: audit them (uncached) and the rest by content.
        present = [i for i, u in enumerate(utts)
                   if os.path.isfile(data.utterances[u].path) and os.access(data.utterances[u].path, os.R_OK)]
        manifest = manifest_of(data, [utts[i] for i in present], cache_dir=cache_dir, workers=workers,
                               progress=progress)
        keys = entry_keys(manifest)
        store = _passed_file(Path(cache_dir), sample_rate, min_samples)
        try:
            passed = np.load(store)
        except (OSError, ValueError):
            passed = np.zeros(0, dtype="S16")
        known = np.isin(keys, passed)
        skip = {present[j] for j in np.flatnonzero(known)}
        todo = [i for i in todo if i not in skip]
        key_of = {present[j]: keys[j] for j in range(len(present))}

    def check(i: int) -> str | None:
        u = utts[i]
        return _check(u, data.utterances[u].path, sample_rate, min_samples)

    problems: list[AudioProblem] = []
    newly_passed = []
    with ThreadPoolExecutor(workers) as pool, tqdm(total=len(todo), desc=f"audit {data.root.name}", unit="file",
                                                    disable=not progress, leave=False) as bar:
        for i, reason in zip(todo, pool.map(check, todo), strict=True):
            bar.update()
            if reason is None:
                if keys is not None and i in key_of:
                    newly_passed.append(key_of[i])
            else:
                problems.append(AudioProblem(utts[i], data.utterances[utts[i]].path, reason))
    if store is not None and newly_passed:
        merged = np.union1d(passed, np.array(newly_passed, dtype="S16"))
        with atomic_path(store, overwrite=True) as tmp, open(tmp, "wb") as fh:
            np.save(fh, merged)
    return problems


def raise_for_problems(problems: list[AudioProblem], *, source: str = "", limit: int = 50) -> None:
    """Raise :class:`AudioProblemsError` listing every problem (the first ``limit`` in full)."""
    if not problems:
        return
    head = f"{source}: " if source else ""
    lines = [f"{head}{len(problems)} bad audio file(s):"] + [f"  {p}" for p in problems[:limit]]
    if len(problems) > limit:
        lines.append(f"  ... and {len(problems) - limit} more")
    raise AudioProblemsError("\n".join(lines), problems)
