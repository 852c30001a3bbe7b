"""Content identity of a data set: each utterance's id, byte size and BLAKE2b digest of its file.

Caches built from a data set (feature shards, audio audits) are keyed by this manifest, not by absolute
paths and modification times, so two nodes holding their own copies of VoxCeleb under different mount
points compute the same keys and share one cache folder, and a file that changes under the same path is
never served stale.

Hashing every file is a full read of the corpus, so each node remembers the digests it computed in
``<cache_dir>/digests/``, next to the file's size and mtime: an unchanged file (same size and mtime) is
not read again, only stat'ed. A changed file, or a new node, is re-hashed.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lsv_core.atomic import atomic_path
from lsv_core.data.manifest import DataSet
from lsv_core.errors import DataError

__all__ = ["Manifest", "file_digest", "manifest_of"]

_DIGEST_BYTES = 16
_READ_CHUNK = 1 << 20


def file_digest(path: str | Path) -> bytes:
    """BLAKE2b-128 of the file's bytes (hashlib releases the GIL, so threads hash in parallel)."""
    h = hashlib.blake2b(digest_size=_DIGEST_BYTES)
    with open(path, "rb") as fh:
        while chunk := fh.read(_READ_CHUNK):
            h.update(chunk)
    return h.digest()


@dataclass(frozen=True)
class Manifest:
    """Utterance ids in order, with each file's size (bytes) and digest (16 raw bytes each)."""

    utts: list[str]
    sizes: np.ndarray  # int64
    digests: np.ndarray  # (n, 16) uint8

    def __len__(self) -> int:
        return len(self.utts)

    def entry_key(self, i: int) -> bytes:
        """The identity of utterance ``i``: id, size and content digest."""
        return f"{self.utts[i]}\0{int(self.sizes[i])}\0".encode() + self.digests[i].tobytes()

    def key(self, salt: str = "", rows: range | None = None) -> str:
        """Hex key of ``rows`` (default: all) of the manifest, salted (e.g. with a feature config)."""
        h = hashlib.sha256(salt.encode())
        for i in rows if rows is not None else range(len(self)):
            h.update(self.entry_key(i))
        return h.hexdigest()[:32]

    @property
    def total_bytes(self) -> int:
        return int(self.sizes.sum())


def _stat(items: list[tuple[str, str]]) -> list[tuple[int, int]]:
    out = []
    for utt, path in items:
        try:
            st = os.stat(path)
        except OSError as exc:
            raise DataError(f"utterance {utt}: audio file {path} is unreadable: {exc.strerror}") from exc
        out.append((st.st_size, st.st_mtime_ns))
    return out


def _index_file(cache_dir: Path, data: DataSet, utts: list[str]) -> Path:
    """This node's digest index for exactly these utterances of this data set (path-keyed: it is local)."""
    h = hashlib.sha256(str(data.root.resolve()).encode())
    for u in utts:
        h.update(f"\n{u}\0{data.utterances[u].location}".encode())
    return cache_dir / "digests" / f"{h.hexdigest()[:24]}.npz"


def _load_index(path: Path, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    try:
        with np.load(path) as z:
            sizes, mtimes, digests = z["sizes"], z["mtimes"], z["digests"]
    except (OSError, ValueError, KeyError, EOFError):
        return None  # absent, or damaged: recompute (the index is only a shortcut)
    if len(sizes) != n or digests.shape != (n, _DIGEST_BYTES):
        return None
    return sizes, mtimes, digests


def manifest_of(data: DataSet, utts: list[str] | None = None, *, cache_dir: str | Path | None = None,
                workers: int | None = None, progress: bool = True) -> Manifest:
    """The :class:`Manifest` of ``utts`` (default: all) of ``data``.

    Every file is stat'ed (in threads); files whose size and mtime match this node's digest index in
    ``cache_dir`` keep their recorded digest, the others are hashed, with a progress bar. A missing or
    unreadable file is a :class:`DataError` naming the utterance and its path.
    """
    from tqdm import tqdm

    utts = list(data.utterances) if utts is None else list(utts)
    items = [(u, data.utterances[u].location) for u in utts]
    workers = workers or min(2 * len(os.sched_getaffinity(0)), 16)
    # In chunks: a future per file costs more than the stat itself on a warm cache.
    chunks = [items[a : a + 1024] for a in range(0, len(items), 1024)]
    with ThreadPoolExecutor(workers) as pool:
        stats = np.array([s for part in pool.map(_stat, chunks) for s in part], dtype=np.int64).reshape(-1, 2)
    sizes, mtimes = stats[:, 0].copy(), stats[:, 1].copy()
    digests = np.zeros((len(utts), _DIGEST_BYTES), dtype=np.uint8)
    todo = np.ones(len(utts), dtype=bool)
    index = _index_file(Path(cache_dir), data, utts) if cache_dir is not None else None
    known = _load_index(index, len(utts)) if index is not None else None
    if known is not None:
        same = (known[0] == sizes) & (known[1] == mtimes)
        digests[same] = known[2][same]
        todo = ~same
    if todo.any():
        rows = np.flatnonzero(todo)
        bar = tqdm(total=len(rows), desc=f"hash {data.root.name}", unit="file", disable=not progress, leave=False)

        def digest(i: int) -> bytes:
            utt, path = items[i]
            try:
                return file_digest(path)
            except OSError as exc:
                raise DataError(f"utterance {utt}: audio file {path} is unreadable: {exc.strerror}") from exc
            finally:
                bar.update()

        with ThreadPoolExecutor(workers) as pool:
            for i, d in zip(rows, pool.map(digest, rows), strict=True):
                digests[i] = np.frombuffer(d, dtype=np.uint8)
        bar.close()
        if index is not None:
            with atomic_path(index, overwrite=True) as tmp, open(tmp, "wb") as fh:
                np.savez(fh, sizes=sizes, mtimes=mtimes, digests=digests)
    return Manifest(utts, sizes, digests)
