"""Reading audio for speaker verification: 16 kHz mono float32, every problem named by file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf

from lsv_core.errors import DataError

SAMPLE_RATE = 16000


def read_audio(path: str | Path, *, sample_rate: int = SAMPLE_RATE, resample: bool = False,
               where: str = "") -> np.ndarray:
    """Return the waveform of ``path`` as float32 mono in [-1, 1] at ``sample_rate`` Hz.

    ``where`` (e.g. ``"wav.scp:12"``) is prepended to errors so a user can find the listing line.
    A file at another rate is an error unless ``resample`` is true (soxr, high quality).
    """
    prefix = f"{where}: " if where else ""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{prefix}audio file {path} does not exist")
    try:
        wav, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as exc:  # soundfile raises several types for corrupt files
        raise DataError(f"{prefix}audio file {path} is unreadable: {exc}") from exc
    if wav.shape[0] == 0:
        raise DataError(f"{prefix}audio file {path} is empty (0 samples)")
    wav = wav.mean(axis=1) if wav.shape[1] > 1 else wav[:, 0]
    if sr != sample_rate:
        if not resample:
            raise DataError(
                f"{prefix}audio file {path} has sample rate {sr} Hz, expected {sample_rate} Hz "
                "(enable resampling: resample=True / --resample)"
            )
        import soxr

        wav = soxr.resample(wav, sr, sample_rate, quality="HQ").astype(np.float32)
    return np.ascontiguousarray(wav, dtype=np.float32)
