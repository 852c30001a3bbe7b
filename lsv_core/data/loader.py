"""Where training and evaluation features come from, and the batches of random crops fed to training.

Three sources, one interface (``utts``, ``__getitem__(utt)``, ``num_frames(utt)``, ``crop(i, frac, n)``):

* ``"memory"``: every feature in one float32 array (:class:`~lsv_core.data.features.FeatureStore`): the
  fastest for a small corpus, and the only one before this module existed;
* ``"store"``: the sharded on-disk store (:class:`~lsv_core.data.store.ShardedFeatures`), built once and
  read row by row: memory stays flat whatever the corpus size;
* ``"audio"``: fbank computed on the fly from the audio (:class:`AudioFeatures`) for a corpus too big to
  cache; it costs a full decode + fbank of an utterance per crop (about 12 ms per 4 s of 16 kHz audio on
  one core), so give it DataLoader workers.

``"auto"`` takes memory when the features would fit ``memory_budget_mb`` (estimated from file sizes),
else the store when a cache folder is given, else audio, and says which and why in the log.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from lsv_core.data.features import FbankConfig, extract_features
from lsv_core.data.manifest import DataSet
from lsv_core.errors import ConfigError
from lsv_core.settings import check_settings, setting

__all__ = ["AudioFeatures", "CropBatches", "DataLoading", "FeatureSource", "estimated_feature_bytes",
           "open_features"]

log = logging.getLogger("lsv.data")

FEATURE_MODES = ("auto", "memory", "store", "audio")
# Bytes of float32 fbank (100 frames/s x 80 bins x 4 B = 32 kB/s) per byte of file, by container: 16 kHz
# PCM16 WAV is 32 kB/s; FLAC about half of that; AAC/MP3/Opus (VoxCeleb2's .m4a) about a fifth.
_FEATURE_BYTES_PER_FILE_BYTE = {".wav": 1.0, ".flac": 2.0}
_COMPRESSED_FACTOR = 5.0


@dataclass(frozen=True)
class DataLoading:
    """How features reach training and evaluation (see the module docstring).

    ``loader_workers``: DataLoader worker processes that prepare batches in the background; None picks
    0 on the CPU with cached features (the model uses the cores) and 4 otherwise (a GPU, or fbank on
    the fly). ``dtype``: of the on-disk store (float16 halves it; EER is unchanged, BENCHMARKS.md).
    """

    features: str = setting("auto", choices=FEATURE_MODES)
    memory_budget_mb: float = setting(1024.0, gt=0)
    dtype: str = setting("float16", choices=("float16", "float32"))
    loader_workers: int | None = setting(None, ge=0, optional=True)

    def __post_init__(self) -> None:
        check_settings(self)

    def workers_for(self, mode: str, device: torch.device | str) -> int:
        if self.loader_workers is not None:
            return self.loader_workers
        if mode == "audio" or torch.device(device).type == "cuda":
            return min(4, max(1, (os.cpu_count() or 2) - 1))
        return 0


class FeatureSource(Protocol):
    utts: list[str]

    def __len__(self) -> int: ...

    def __getitem__(self, utt: str) -> np.ndarray: ...

    def num_frames(self, utt: str) -> int: ...


def take_crop(read: Callable[[int, int], np.ndarray], n: int, frac: float, crop: int) -> np.ndarray:
    """A ``crop``-row window at relative position ``frac`` in [0, 1) of an ``n``-row utterance read by
    ``read(start, stop)``; utterances shorter than a crop are tiled (as WeSpeaker repeats short audio)."""
    if n >= crop:
        start = min(int(frac * (n - crop + 1)), n - crop)
        return read(start, start + crop)
    rows = np.tile(read(0, n), (math.ceil(crop / n), 1))
    start = min(int(frac * (len(rows) - crop + 1)), len(rows) - crop)
    return rows[start : start + crop]


def crop_of(source: FeatureSource, i: int, frac: float, crop: int) -> np.ndarray:
    """Crop of utterance ``i`` (positional) of any source, reading only the rows it needs."""
    own = getattr(source, "crop", None)
    if own is not None:
        return own(i, frac, crop)
    return take_crop(lambda a, b: source.read(i, a, b), int(source.lengths[i]), frac, crop)  # type: ignore[attr-defined]


class AudioFeatures:
    """Fbank computed from the audio when asked (nothing cached): the source for corpora too big to cache."""

    def __init__(self, data: DataSet, utts: list[str], config: FbankConfig = FbankConfig()) -> None:
        self.utts = list(utts)
        self._paths = [data.utterances[u].location for u in self.utts]
        self.config = config
        self._index: dict[str, int] | None = None
        self._frames: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self.utts)

    def _position(self, utt: str) -> int:
        if self._index is None:
            self._index = {u: i for i, u in enumerate(self.utts)}
        return self._index[utt]

    def __contains__(self, utt: object) -> bool:
        if self._index is None:
            self._index = {u: i for i, u in enumerate(self.utts)}
        return utt in self._index

    def features(self, i: int) -> np.ndarray:
        from lsv_core.data.features import features_of_file

        feats = features_of_file(self.utts[i], self._paths[i], self.config)
        self._frames[i] = len(feats)
        return feats

    def __getitem__(self, utt: str) -> np.ndarray:
        return self.features(self._position(utt))

    def num_frames(self, utt: str) -> int:
        """Frames of ``utt`` (from the header: the exact count once the file has been decoded)."""
        i = self._position(utt)
        if i not in self._frames:
            from lsv_core.data.audio import read_header

            try:
                h = read_header(self._paths[i])
                samples = h.frames * self.config.sample_rate // max(1, h.sample_rate)
            except Exception:  # an unreadable file fails with its name when it is decoded
                samples = 0
            win = int(self.config.sample_rate * self.config.frame_length_ms / 1000)
            hop = int(self.config.sample_rate * self.config.frame_shift_ms / 1000)
            return max(1, 1 + (samples - win) // hop) if samples >= win else 1
        return self._frames[i]

    def crop(self, i: int, frac: float, crop: int) -> np.ndarray:
        feats = self.features(i)
        return take_crop(lambda a, b: feats[a:b], len(feats), frac, crop)


def estimated_feature_bytes(data: DataSet, utts: list[str], sizes: np.ndarray | None = None) -> int:
    """Float32 fbank bytes of ``utts`` estimated from their file sizes (``sizes``, or stat'ed here)."""
    total = 0.0
    for k, u in enumerate(utts):
        location = data.utterances[u].location
        size = int(sizes[k]) if sizes is not None else os.stat(location).st_size
        suffix = os.path.splitext(location)[1].lower()
        total += size * _FEATURE_BYTES_PER_FILE_BYTE.get(suffix, _COMPRESSED_FACTOR)
    return int(total)


def open_features(data: DataSet, utts: list[str] | None = None, *, loading: DataLoading = DataLoading(),
                  cache_dir: str | Path | None = None, config: FbankConfig = FbankConfig(),
                  workers: int | None = None, progress: bool = True, role: str = "train") -> tuple[FeatureSource, str]:
    """The features of ``utts`` (default: all) of ``data`` from the source ``loading.features`` names
    (``auto``: see the module docstring); returns the source and the mode taken, which is logged."""
    from lsv_core.data.fingerprint import manifest_of
    from lsv_core.data.store import StoreConfig, build_store, open_store

    utts = list(data.utterances) if utts is None else list(utts)
    mode, why = loading.features, "asked for"
    manifest = None
    if mode in ("auto", "store") and cache_dir is not None:
        manifest = manifest_of(data, utts, cache_dir=cache_dir, workers=workers, progress=progress)
    if mode == "auto":
        est = estimated_feature_bytes(data, utts, manifest.sizes if manifest is not None else None)
        if est <= loading.memory_budget_mb * 1e6:
            mode, why = "memory", f"about {est / 1e6:,.0f} MB of features fit memory_budget_mb={loading.memory_budget_mb:g}"
        elif cache_dir is not None:
            mode, why = "store", f"about {est / 1e6:,.0f} MB of features exceed memory_budget_mb={loading.memory_budget_mb:g}"
        else:
            mode, why = "audio", (f"about {est / 1e6:,.0f} MB of features exceed memory_budget_mb="
                                  f"{loading.memory_budget_mb:g} and no cache folder is set")
    if mode == "store" and cache_dir is None:
        raise ConfigError("data.features='store' needs a cache folder (data.cache_dir / --cache)")
    log.info("%s features of %s (%d utterances): %s (%s)", role, data.root, len(utts), mode, why)
    if mode == "memory":
        source: FeatureSource = extract_features(data, utts=utts, config=config, cache_dir=cache_dir,
                                                 workers=workers, progress=progress, dtype=loading.dtype,
                                                 manifest=manifest)
    elif mode == "store":
        assert manifest is not None and cache_dir is not None
        store = StoreConfig(dtype=loading.dtype)
        build_store(data, manifest, cache_dir, fbank=config, store=store, workers=workers, progress=progress)
        source = open_store(manifest, cache_dir, fbank=config, store=store)
    else:
        source = AudioFeatures(data, utts, config)
    return source, mode


# -- training batches -----------------------------------------------------------------------------------
class _CropDataset(torch.utils.data.Dataset):
    """Turns a batch plan (utterance positions, crop positions) into a (batch, crop, bins) tensor and labels."""

    def __init__(self, source: FeatureSource, labels: np.ndarray, crop: int) -> None:
        self.source = source
        self.labels = labels
        self.crop = crop

    def __len__(self) -> int:  # never used for sampling (the plan sampler is endless)
        return len(self.labels)

    def __getitem__(self, plan: tuple[np.ndarray, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        idx, fracs = plan
        x = np.stack([crop_of(self.source, int(i), float(f), self.crop) for i, f in zip(idx, fracs, strict=True)])
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), torch.from_numpy(self.labels[idx])


class _Plans(torch.utils.data.Sampler):
    """Endless seeded batch plans, drawn in the main process so that batches do not depend on the
    number of workers."""

    def __init__(self, n: int, batch_size: int, seed: int) -> None:
        self.n, self.batch_size = n, batch_size
        self.rng = np.random.default_rng(seed)

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        while True:
            yield self.next_plan()

    def next_plan(self) -> tuple[np.ndarray, np.ndarray]:
        idx = self.rng.integers(0, self.n, size=self.batch_size)
        return idx, self.rng.random(self.batch_size)


class CropBatches:
    """Endless batches of random ``crop`` frame crops of random utterances of ``source``, seeded.

    With ``workers`` > 0 a DataLoader prepares them in background processes (``prefetch`` batches ahead
    per worker); the batches are the same for any number of workers.
    """

    def __init__(self, source: FeatureSource, labels: np.ndarray, *, crop: int = 200, batch_size: int = 64,
                 seed: int = 0, workers: int = 0, prefetch: int = 4, pin_memory: bool = False) -> None:
        if len(labels) != len(source):
            raise ValueError(f"{len(labels)} labels for {len(source)} utterances")
        self.dataset = _CropDataset(source, np.asarray(labels, dtype=np.int64), crop)
        self.plans = _Plans(len(source), batch_size, seed)
        self.workers = workers
        self._loader_iter: Iterator | None = None
        if workers > 0:
            loader = torch.utils.data.DataLoader(self.dataset, batch_size=None, sampler=self.plans,
                                                 num_workers=workers, prefetch_factor=prefetch,
                                                 pin_memory=pin_memory, persistent_workers=False)
            self._loader_iter = iter(loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._loader_iter is not None:
            return next(self._loader_iter)
        return self.dataset[self.plans.next_plan()]

    def close(self) -> None:
        """Stop the worker processes now (they also stop when this object is garbage collected)."""
        it, self._loader_iter = self._loader_iter, None
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
