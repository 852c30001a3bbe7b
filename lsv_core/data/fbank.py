"""Kaldi-compatible log-mel filterbanks (kaldi-native-fbank) of one waveform or audio file.

Features match WeSpeaker's front end: 80 bins, 25 ms windows every 10 ms, povey window, waveform scaled
to the int16 range as Kaldi expects, no dither (so features are deterministic), then per-utterance mean
normalisation (CMN) over time.

Its own module because both the in-memory features (:mod:`lsv_core.data.features`) and the on-disk store
(:mod:`lsv_core.data.store`, which the in-memory path reads through) compute them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import kaldi_native_fbank as knf
import numpy as np

from lsv_core.data.audio import SAMPLE_RATE, read_audio
from lsv_core.errors import DataError

__all__ = ["FbankConfig", "features_of_file", "fbank"]


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


def features_of_file(utt: str, path: str | Path, config: FbankConfig = FbankConfig()) -> np.ndarray:
    """Fbank of one audio file; errors name the utterance and the path."""
    wav = read_audio(path, sample_rate=config.sample_rate, resample=config.resample, where=f"utterance {utt}")
    try:
        return fbank(wav, config)
    except DataError as exc:
        raise DataError(f"utterance {utt}: audio file {path}: {exc}") from None
