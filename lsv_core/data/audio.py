"""Reading audio for speaker verification: 16 kHz mono float32, every problem named by file.

WAV/FLAC/OGG go through soundfile (libsndfile). Other containers, VoxCeleb2's AAC ``.m4a`` above all, are
decoded with PyAV, whose wheels ship their own FFmpeg libraries: no system ffmpeg is needed.

The front end that turns audio into features is here too (:func:`fbank`, :func:`features_of_file`):
Kaldi-compatible log-mel filterbanks (kaldi-native-fbank) matching WeSpeaker's: 80 bins, 25 ms windows every
10 ms, povey window, waveform scaled to the int16 range as Kaldi expects, no dither (so features are
deterministic), then per-utterance mean normalisation (CMN) over time. Both the in-memory features
(:mod:`lsv_core.data.features`) and the on-disk store (:mod:`lsv_core.data.store`) compute them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import kaldi_native_fbank as knf
import numpy as np
import soundfile as sf

from lsv_core.errors import DataError

SAMPLE_RATE = 16000
# libsndfile reads these itself; anything else is handed to PyAV (FFmpeg).
SOUNDFILE_SUFFIXES = frozenset({".wav", ".flac", ".ogg", ".aiff", ".aif", ".au", ".w64", ".caf"})


@dataclass(frozen=True)
class AudioHeader:
    """What a file's header says, without decoding it: rate (Hz), samples per channel, channels."""

    sample_rate: int
    frames: int
    channels: int

    @property
    def seconds(self) -> float:
        return self.frames / self.sample_rate if self.sample_rate else 0.0


def _uses_soundfile(path: Path) -> bool:
    return path.suffix.lower() in SOUNDFILE_SUFFIXES


def _av_open(path: Path):  # -> av.container.InputContainer
    import av

    return av.open(str(path), mode="r")


def read_header(path: str | Path) -> AudioHeader:
    """The header of ``path`` (soundfile, or PyAV's probe for other containers). Raises what the
    reader raises for a file it cannot parse; :func:`read_audio` and the audit turn that into DataError."""
    path = Path(path)
    if _uses_soundfile(path):
        info = sf.info(str(path))
        return AudioHeader(int(info.samplerate), int(info.frames), int(info.channels))
    with _av_open(path) as container:
        if not container.streams.audio:
            raise ValueError("no audio stream")
        stream = container.streams.audio[0]
        frames = 0  # (stream.frames counts packets, not samples)
        if stream.duration is not None and stream.time_base is not None:
            frames = int(stream.duration * stream.time_base * stream.rate)
        if not frames and container.duration:  # microseconds
            frames = int(container.duration * stream.rate / 1_000_000)
        return AudioHeader(int(stream.rate), int(frames or 0), int(stream.channels))


def _decode_av(path: Path) -> tuple[np.ndarray, int]:
    """(samples, channels) float32 and the rate, decoded by PyAV."""
    import av

    with _av_open(path) as container:
        if not container.streams.audio:
            raise ValueError("no audio stream")
        stream = container.streams.audio[0]
        rate = int(stream.rate)
        resampler = av.AudioResampler(format="flt", layout="mono", rate=rate)
        chunks = []
        for frame in container.decode(stream):
            for out in resampler.resample(frame):
                chunks.append(out.to_ndarray().reshape(-1))
        for out in resampler.resample(None):
            chunks.append(out.to_ndarray().reshape(-1))
    wav = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.float32)
    return wav.astype(np.float32, copy=False)[:, None], rate


def read_audio(path: str | Path, *, sample_rate: int = SAMPLE_RATE, resample: bool = False,
               where: str = "") -> np.ndarray:
    """Return the waveform of ``path`` as float32 mono in [-1, 1] at ``sample_rate`` Hz.

    ``where`` (e.g. ``"wav.scp:12"`` or ``"utterance id00012/abc/00001.m4a"``) is prepended to errors so
    a user can find the listing line. A file at another rate is an error unless ``resample`` is true
    (soxr, high quality).
    """
    prefix = f"{where}: " if where else ""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{prefix}audio file {path} does not exist")
    try:
        if _uses_soundfile(path):
            wav, sr = sf.read(str(path), dtype="float32", always_2d=True)
        else:
            wav, sr = _decode_av(path)
    except Exception as exc:  # soundfile and PyAV raise several types for corrupt files
        raise DataError(f"{prefix}audio file {path} is unreadable: {exc}") from exc
    if wav.shape[0] == 0:
        raise DataError(f"{prefix}audio file {path} is empty (0 samples)")
    wav = wav.mean(axis=1) if wav.shape[1] > 1 else wav[:, 0]
    if sr != sample_rate:
        if not resample:
            raise DataError(
                f"{prefix}audio file {path} has sample rate {sr} Hz, expected {sample_rate} Hz "
                "(resample it first, e.g. with sox, or pass resample=True to read_audio)"
            )
        import soxr

        wav = soxr.resample(wav, sr, sample_rate, quality="HQ").astype(np.float32)
    return np.ascontiguousarray(wav, dtype=np.float32)


# -- the feature front end ----------------------------------------------------------------------------------
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
