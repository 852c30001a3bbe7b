"""Features of a data set held in memory; the filterbanks themselves are
:mod:`lsv_core.data.audio`'s (Kaldi-compatible, as WeSpeaker's front end), re-exported here."""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from lsv_core.data.audio import FbankConfig, fbank, features_of_file
from lsv_core.data.manifest import DataSet

if TYPE_CHECKING:
    from lsv_core.data.fingerprint import Manifest
from lsv_core.errors import DataError

__all__ = ["FbankConfig", "FeatureStore", "extract_features", "features_of_file", "fbank"]


def _features_of(item: tuple[str, str, FbankConfig]) -> np.ndarray:
    return features_of_file(*item)


class FeatureStore:
    """Features of a data set held in memory in one array; ``store[utt]`` is a (frames, bins) view.

    The array is float32 when computed here and the on-disk store's dtype (float16 by default: half the
    memory) when read from it; consumers convert the crops and batches they take to float32."""

    def __init__(self, utts: list[str], feats: np.ndarray, offsets: np.ndarray) -> None:
        self.utts = utts
        self.feats = feats
        self.offsets = offsets
        self._index = {u: i for i, u in enumerate(utts)}

    def __len__(self) -> int:
        return len(self.utts)

    def __contains__(self, utt: object) -> bool:
        return utt in self._index

    def __getitem__(self, utt: str) -> np.ndarray:
        i = self._index[utt]
        return self.feats[self.offsets[i] : self.offsets[i + 1]]

    def num_frames(self, utt: str) -> int:
        i = self._index[utt]
        return int(self.offsets[i + 1] - self.offsets[i])

    @property
    def lengths(self) -> np.ndarray:
        """Frames per utterance, in ``utts`` order."""
        return np.diff(self.offsets)

    def read(self, i: int, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` of utterance ``i`` (positional)."""
        return self.feats[self.offsets[i] + start : self.offsets[i] + stop]


def _compute(data: DataSet, utts: list[str], config: FbankConfig, workers: int | None,
             progress: bool) -> list[np.ndarray]:
    items = [(u, data.utterances[u].location, config) for u in utts]
    workers = workers or min(len(os.sched_getaffinity(0)), 8)
    from tqdm import tqdm

    bar = tqdm(total=len(items), desc=f"fbank {data.root.name}", unit="utt", disable=not progress)
    feats: list[np.ndarray] = []
    if workers > 1 and len(items) >= 64:
        with ProcessPoolExecutor(workers) as pool:
            for f in pool.map(_features_of, items, chunksize=32):
                feats.append(f)
                bar.update()
    else:
        for it in items:
            feats.append(_features_of(it))
            bar.update()
    bar.close()
    return feats


def extract_features(
    data: DataSet,
    *,
    config: FbankConfig = FbankConfig(),
    cache_dir: str | Path | None = None,
    utts: list[str] | None = None,
    workers: int | None = None,
    progress: bool = True,
    dtype: str = "float16",
    manifest: Manifest | None = None,
) -> FeatureStore:
    """The features of ``utts`` (default: all) of ``data``, in memory.

    With ``cache_dir`` they come from (and missing ones go to) the sharded store there
    (:mod:`lsv_core.data.store`, rows of ``dtype``), keyed by each file's content, so a changed file is
    recomputed and an unchanged one, wherever it lies, never is; ``manifest`` (of ``utts``) saves
    fingerprinting again when the caller has it. Without ``cache_dir`` they are computed, as float32.
    """
    utts = list(data.utterances) if utts is None else list(utts)
    if not utts:
        raise DataError(f"{data.root}: no utterances to extract features from")
    if cache_dir is None:
        feats = _compute(data, utts, config, workers, progress)
        offsets = np.zeros(len(feats) + 1, dtype=np.int64)
        np.cumsum([len(f) for f in feats], out=offsets[1:])
        return FeatureStore(utts, np.concatenate(feats), offsets)
    from lsv_core.data.fingerprint import manifest_of
    from lsv_core.data.store import StoreConfig, build_store, open_store

    if manifest is None or manifest.utts != utts:
        manifest = manifest_of(data, utts, cache_dir=cache_dir, progress=progress)
    store_cfg = StoreConfig(dtype=dtype)
    build_store(data, manifest, cache_dir, fbank=config, store=store_cfg, workers=workers, progress=progress)
    stored = open_store(manifest, cache_dir, fbank=config, store=store_cfg)
    offsets = np.zeros(len(utts) + 1, dtype=np.int64)
    np.cumsum(stored.lengths, out=offsets[1:])
    rows = np.empty((int(offsets[-1]), stored.bins), dtype=stored.dtype)
    for i in range(len(utts)):  # straight into place: no per-utterance arrays, no concatenation
        stored.read_into(i, rows[offsets[i] : offsets[i + 1]])
    stored.close()
    return FeatureStore(utts, rows, offsets)
