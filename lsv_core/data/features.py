"""Kaldi-compatible log-mel filterbanks (kaldi-native-fbank) and an on-disk feature cache.

Features match WeSpeaker's front end: 80 bins, 25 ms windows every 10 ms, povey window, waveform scaled
to the int16 range as Kaldi expects, no dither (so features are deterministic), then per-utterance mean
normalisation (CMN) over time.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import kaldi_native_fbank as knf
import numpy as np
from safetensors.numpy import load_file, save_file

from lsv_core.atomic import atomic_path
from lsv_core.data.audio import SAMPLE_RATE, read_audio
from lsv_core.data.manifest import DataSet
from lsv_core.errors import DataError


@dataclass(frozen=True)
class FbankConfig:
    num_mel_bins: int = 80
    frame_length_ms: float = 25.0
    frame_shift_ms: float = 10.0
    sample_rate: int = SAMPLE_RATE
    cmn: bool = True
    resample: bool = False


def fbank(wav: np.ndarray, config: FbankConfig = FbankConfig()) -> np.ndarray:
    """Return (frames, num_mel_bins) float32 log-mel features of a float waveform in [-1, 1]."""
    opts = knf.FbankOptions()
    opts.frame_opts.samp_freq = config.sample_rate
    opts.frame_opts.frame_length_ms = config.frame_length_ms
    opts.frame_opts.frame_shift_ms = config.frame_shift_ms
    opts.frame_opts.dither = 0.0
    opts.frame_opts.snip_edges = True
    opts.mel_opts.num_bins = config.num_mel_bins
    computer = knf.OnlineFbank(opts)
    # Kaldi (and WeSpeaker, which multiplies by 1 << 15) works on int16-scaled samples.
    computer.accept_waveform(config.sample_rate, (wav * 32768.0).astype(np.float32))
    computer.input_finished()
    n = computer.num_frames_ready
    if n == 0:
        raise DataError(f"waveform of {len(wav)} samples is shorter than one {config.frame_length_ms} ms frame")
    feats = np.stack([computer.get_frame(i) for i in range(n)]).astype(np.float32)
    if config.cmn:
        feats -= feats.mean(axis=0, keepdims=True)
    return feats


def _features_of(item: tuple[str, str, FbankConfig]) -> np.ndarray:
    utt, path, config = item
    wav = read_audio(path, sample_rate=config.sample_rate, resample=config.resample, where=f"utterance {utt}")
    return fbank(wav, config)


class FeatureStore:
    """Features of a data set held in one array; ``store[utt]`` is a (frames, bins) view."""

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


def _cache_key(data: DataSet, utts: list[str], config: FbankConfig) -> str:
    h = hashlib.sha256(json.dumps(asdict(config), sort_keys=True).encode())
    for utt in utts:
        u = data.utterances[utt]
        try:
            st = u.path.stat()
        except OSError as exc:
            raise DataError(f"{data.root}: utterance {utt} points to unreadable audio {u.path}: {exc}") from exc
        h.update(f"{utt}\0{u.path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:20]


def extract_features(
    data: DataSet,
    *,
    config: FbankConfig = FbankConfig(),
    cache_dir: str | Path | None = None,
    utts: list[str] | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> FeatureStore:
    """Compute (or load from ``cache_dir``) the features of ``utts`` (default: all) of ``data``.

    The cache key covers the fbank config and each file's path, size and mtime, so a changed corpus is
    recomputed and an unchanged one never is.
    """
    utts = list(data.utterances) if utts is None else list(utts)
    if not utts:
        raise DataError(f"{data.root}: no utterances to extract features from")
    cache_file = None
    if cache_dir is not None:
        cache_file = Path(cache_dir) / f"fbank-{_cache_key(data, utts, config)}.safetensors"
        if cache_file.exists():
            arrays = load_file(str(cache_file))
            return FeatureStore(utts, arrays["feats"], arrays["offsets"])
    items = [(u, str(data.utterances[u].path), config) for u in utts]
    workers = workers or min(len(os.sched_getaffinity(0)), 8)
    from tqdm import tqdm

    bar = tqdm(total=len(items), desc=f"fbank {data.root.name}", unit="utt", disable=not progress)
    if workers > 1 and len(items) >= 64:
        with ProcessPoolExecutor(workers) as pool:
            feats = []
            for f in pool.map(_features_of, items, chunksize=32):
                feats.append(f)
                bar.update()
    else:
        feats = []
        for it in items:
            feats.append(_features_of(it))
            bar.update()
    bar.close()
    offsets = np.zeros(len(feats) + 1, dtype=np.int64)
    np.cumsum([len(f) for f in feats], out=offsets[1:])
    store = FeatureStore(utts, np.concatenate(feats), offsets)
    if cache_file is not None:
        with atomic_path(cache_file, overwrite=True) as tmp:
            save_file({"feats": store.feats, "offsets": store.offsets}, str(tmp),
                      metadata={"utts": json.dumps(utts), "config": json.dumps(asdict(config))})
    return store
