"""A sharded, content-addressed feature store on disk, shared by every process and node that sees it.

Layout: ``<cache_dir>/features/<config key>/<shard key>.npy`` holds the fbank rows of up to
``shard_utts`` utterances back to back (a plain ``.npy``: ``np.load(..., mmap_mode="r")`` opens it), and
``<shard key>.idx.npz`` lists them: per utterance a 16-byte entry key (its id, size and content digest,
:mod:`lsv_core.data.fingerprint`), its first row and its number of frames. A data set's features are
found by looking its entry keys up in the union of all shard indices, so any subset of a data set that
was cached before (``lsv data cache``) is served without recomputing, whatever the subset, and two nodes
with their own copies of the audio address the same shards.

Writing: the ``.npy`` is written under a temporary name and renamed, then its index, so a shard exists
only once both are complete; an index whose shard is missing or of the wrong size is ignored (and the
shard rebuilt). An interrupted build keeps every finished shard: the next build computes only what is
missing. Nothing is ever overwritten in place.

Reading (:class:`ShardedFeatures`): positioned reads (``os.pread``) of exactly the rows asked for. The
pages stay in the OS page cache, shared by all processes of the node, and out of each process's RSS,
which a random-access memory map would grow (every page a crop touches stays mapped) up to the size
of the store.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from lsv_core.atomic import atomic_path
from lsv_core.data.audio import FbankConfig, features_of_file
from lsv_core.data.fingerprint import Manifest
from lsv_core.data.manifest import DataSet
from lsv_core.errors import DataError
from lsv_core.settings import check_settings, setting

__all__ = ["ShardedFeatures", "StoreConfig", "build_store", "open_store", "store_folder"]

_HEADER_ALIGN = 64


@dataclass(frozen=True)
class StoreConfig:
    """How features are stored: ``dtype`` of the rows (float16 halves the disk and page-cache footprint;
    fbank values after CMN lie within about ±30, where float16 keeps 3 significant digits) and how many
    utterances one shard holds."""

    dtype: str = setting("float16", choices=("float16", "float32"))
    shard_utts: int = setting(1024, ge=1)

    def __post_init__(self) -> None:
        check_settings(self)


def store_folder(cache_dir: str | Path, fbank: FbankConfig, store: StoreConfig) -> Path:
    """The folder of shards for one feature config (resampling does not change features: not keyed)."""
    cfg = {k: v for k, v in asdict(fbank).items() if k != "resample"}
    key = hashlib.sha256(json.dumps({"fbank": cfg, "dtype": store.dtype}, sort_keys=True).encode()).hexdigest()
    return Path(cache_dir) / "features" / key[:16]


def entry_keys(manifest: Manifest) -> np.ndarray:
    """(n,) ``S16`` array: one content key per utterance of ``manifest``."""
    return np.array([hashlib.blake2b(manifest.entry_key(i), digest_size=16).digest() for i in range(len(manifest))],
                    dtype="S16")


# -- shard index ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Located:
    shard: np.ndarray  # int32: index into ``paths``
    row: np.ndarray  # int64: first row in the shard
    frames: np.ndarray  # int32
    paths: list[Path]
    header_bytes: list[int]
    bins: int
    dtype: np.dtype
    missing: np.ndarray  # positions (into the query) that no shard holds


def _npy_header(path: Path) -> tuple[int, tuple[int, ...], np.dtype]:
    """(header bytes, shape, dtype) of a ``.npy`` file."""
    fmt = np.lib.format
    with open(path, "rb") as fh:
        version = fmt.read_magic(fh)
        read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
        shape, _, dtype = read(fh)
        return fh.tell(), shape, dtype


@dataclass(frozen=True)
class _Shard:
    path: Path
    header: int
    bins: int
    dtype: np.dtype
    keys: np.ndarray
    starts: np.ndarray
    frames: np.ndarray


def _valid_shards(folder: Path) -> Iterator[_Shard]:
    """Shards whose index and rows are both complete and consistent."""
    for idx in sorted(folder.glob("*.idx.npz")):
        path = idx.with_name(idx.name.removesuffix(".idx.npz") + ".npy")
        try:
            with np.load(idx) as z:
                keys, starts, frames, rows = z["keys"], z["starts"], z["frames"], int(z["rows"])
            header, shape, dtype = _npy_header(path)
            if (len(shape) != 2 or shape[0] != rows or int(frames.sum()) != rows
                    or path.stat().st_size != header + rows * shape[1] * dtype.itemsize):
                continue  # a damaged or foreign shard: rebuilt from the audio, never read
        except (OSError, ValueError, KeyError, EOFError):
            continue
        yield _Shard(path, header, shape[1], dtype, keys, starts, frames)


def _locate(folder: Path, keys: np.ndarray) -> _Located:
    """Where each of ``keys`` lives in the shards of ``folder`` (first shard that has it)."""
    all_keys, all_shard, all_row, all_frames = [], [], [], []
    paths: list[Path] = []
    headers: list[int] = []
    bins, dtype = 0, np.dtype("float16")
    for shard in _valid_shards(folder):
        bins, dtype = shard.bins, shard.dtype
        all_keys.append(shard.keys)
        all_row.append(shard.starts)
        all_frames.append(shard.frames)
        all_shard.append(np.full(len(shard.keys), len(paths), dtype=np.int32))
        paths.append(shard.path)
        headers.append(shard.header)
    n = len(keys)
    if not paths:
        empty = np.zeros(n, dtype=np.int64)
        return _Located(empty.astype(np.int32), empty, empty.astype(np.int32), [], [], 0, dtype, np.arange(n))
    k = np.concatenate(all_keys)
    order = np.argsort(k, kind="stable")
    k_sorted = k[order]
    pos = np.searchsorted(k_sorted, keys)
    pos_c = np.minimum(pos, len(k_sorted) - 1)
    found = k_sorted[pos_c] == keys
    src = order[pos_c]
    return _Located(np.concatenate(all_shard)[src], np.concatenate(all_row)[src],
                    np.concatenate(all_frames)[src].astype(np.int32), paths, headers, bins, dtype,
                    np.flatnonzero(~found))


# -- building ---------------------------------------------------------------------------------------
def _write_shard(folder: Path, keys: np.ndarray, feats: list[np.ndarray], dtype: str) -> None:
    frames = np.array([len(f) for f in feats], dtype=np.int32)
    starts = np.zeros(len(feats), dtype=np.int64)
    np.cumsum(frames[:-1], out=starts[1:])
    name = hashlib.sha256(b"".join(k.tobytes() for k in keys)).hexdigest()[:32]
    rows = np.concatenate(feats).astype(dtype, copy=False)
    folder.mkdir(parents=True, exist_ok=True)
    # The rows first, then the index that makes them visible: a crash in between leaves an orphan .npy
    # that no index points to (ignored, and replaced by the next build), never a readable half shard.
    with atomic_path(folder / f"{name}.npy", overwrite=True) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, rows)
            fh.flush()
            os.fsync(fh.fileno())
    with atomic_path(folder / f"{name}.idx.npz", overwrite=True) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, keys=keys, starts=starts, frames=frames, rows=np.int64(len(rows)))
            fh.flush()
            os.fsync(fh.fileno())


def _features_job(item: tuple[str, str, FbankConfig]) -> np.ndarray:
    return features_of_file(*item)


def build_store(data: DataSet, manifest: Manifest, cache_dir: str | Path, *, fbank: FbankConfig = FbankConfig(),
                store: StoreConfig = StoreConfig(), workers: int | None = None, progress: bool = True) -> int:
    """Compute and store the features of every utterance of ``manifest`` the store lacks; returns how
    many were computed. Parallel over ``workers`` processes, resumable, with a progress bar."""
    from tqdm import tqdm

    folder = store_folder(cache_dir, fbank, store)
    keys = entry_keys(manifest)
    todo = _locate(folder, keys).missing
    if len(todo) == 0:
        return 0
    workers = workers or min(len(os.sched_getaffinity(0)), 8)
    items = [(manifest.utts[i], data.utterances[manifest.utts[i]].location, fbank) for i in todo]
    bar = tqdm(total=len(items), desc=f"features {data.root.name}", unit="utt", disable=not progress)
    pending_keys: list[bytes] = []
    pending: list[np.ndarray] = []

    def take(i: int, feats: np.ndarray) -> None:
        pending_keys.append(keys[todo[i]])
        pending.append(feats)
        bar.update()
        if len(pending) == store.shard_utts or i == len(items) - 1:
            _write_shard(folder, np.array(pending_keys, dtype="S16"), pending, store.dtype)
            pending_keys.clear()
            pending.clear()

    try:
        if workers > 1 and len(items) >= 64:
            with ProcessPoolExecutor(workers) as pool:
                for i, f in enumerate(pool.map(_features_job, items, chunksize=16)):
                    take(i, f)
        else:
            for i, item in enumerate(items):
                take(i, _features_job(item))
    finally:
        bar.close()
    return len(items)


# -- reading ----------------------------------------------------------------------------------------
class ShardedFeatures:
    """Features of ``utts`` read from the store on demand; ``store[utt]`` is a (frames, bins) float32 array.

    Holds only small per-utterance arrays (shard, first row, frames: 16 bytes each) and a file
    descriptor per shard, opened lazily so that forked DataLoader workers open their own.
    """

    def __init__(self, utts: list[str], located: _Located) -> None:
        self.utts = utts
        self._shard = located.shard
        self._row = located.row
        self._frames = located.frames
        self._paths = located.paths
        self._headers = located.header_bytes
        self.bins = located.bins
        self.dtype = located.dtype
        self._row_bytes = self.bins * self.dtype.itemsize
        self._fds: dict[int, int] = {}
        self._pid = os.getpid()
        self._index: dict[str, int] | None = None

    def __len__(self) -> int:
        return len(self.utts)

    def __contains__(self, utt: object) -> bool:
        return utt in self._position

    @property
    def _position(self) -> dict[str, int]:
        if self._index is None:
            self._index = {u: i for i, u in enumerate(self.utts)}
        return self._index

    @property
    def lengths(self) -> np.ndarray:
        return self._frames

    def num_frames(self, utt: str) -> int:
        return int(self._frames[self._position[utt]])

    def __getitem__(self, utt: str) -> np.ndarray:
        i = self._position[utt]
        return self.read(i, 0, int(self._frames[i]))

    def _fd(self, shard: int) -> int:
        if self._pid != os.getpid():  # forked: descriptors are shared with the parent; open our own
            self._fds, self._pid = {}, os.getpid()
        fd = self._fds.get(shard)
        if fd is None:
            fd = self._fds[shard] = os.open(self._paths[shard], os.O_RDONLY)
        return fd

    def read(self, i: int, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` of utterance ``i`` (positional), as float32."""
        shard = int(self._shard[i])
        n = stop - start
        offset = self._headers[shard] + (int(self._row[i]) + start) * self._row_bytes
        buf = os.pread(self._fd(shard), n * self._row_bytes, offset)
        if len(buf) != n * self._row_bytes:
            raise DataError(f"feature shard {self._paths[shard]} is shorter than its index says; "
                            "delete it and rebuild the cache (`lsv data cache`)")
        return np.frombuffer(buf, dtype=self.dtype).reshape(n, self.bins).astype(np.float32)

    def read_into(self, i: int, out: np.ndarray) -> None:
        """All rows of utterance ``i`` straight into ``out`` (C-contiguous, the store's dtype and shape)."""
        shard = int(self._shard[i])
        want = int(self._frames[i]) * self._row_bytes
        if out.dtype != self.dtype or out.nbytes != want or not out.flags.c_contiguous:
            raise ValueError(f"out must be a contiguous {self.dtype} array of {want} bytes")
        offset = self._headers[shard] + int(self._row[i]) * self._row_bytes
        if os.preadv(self._fd(shard), [memoryview(out).cast("B")], offset) != want:
            raise DataError(f"feature shard {self._paths[shard]} is shorter than its index says; "
                            "delete it and rebuild the cache (`lsv data cache`)")

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_fds"] = {}
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._pid = os.getpid()

    def __del__(self) -> None:
        if getattr(self, "_pid", None) == os.getpid():
            for fd in getattr(self, "_fds", {}).values():
                try:
                    os.close(fd)
                except OSError:
                    pass


def open_store(manifest: Manifest, cache_dir: str | Path, *, fbank: FbankConfig = FbankConfig(),
               store: StoreConfig = StoreConfig()) -> ShardedFeatures:
    """Open the stored features of every utterance of ``manifest``; DataError when any is not stored."""
    folder = store_folder(cache_dir, fbank, store)
    located = _locate(folder, entry_keys(manifest))
    if len(located.missing):
        first = manifest.utts[int(located.missing[0])]
        raise DataError(f"the feature store {folder} lacks {len(located.missing)} utterance(s) (first: {first}); "
                        "build it with `lsv data cache`")
    return ShardedFeatures(list(manifest.utts), located)
