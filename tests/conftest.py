"""Shared fixtures: small real audio written to disk and read back through the real readers."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

# Two cores: keep each test process from oversubscribing them.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def write_tone(path: Path, seconds: float = 1.0, sr: int = 16000, freq: float = 220.0, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    wav = 0.3 * np.sin(2 * np.pi * freq * t) + 0.01 * rng.standard_normal(t.size)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, wav.astype(np.float32), sr, subtype="PCM_16")
    return path


@pytest.fixture
def kaldi_dir(tmp_path: Path) -> Path:
    """A 2-speaker Kaldi data dir with relative wav.scp paths."""
    d = tmp_path / "data"
    d.mkdir()
    lines, u2s = [], []
    for spk, freq in (("spkA", 200.0), ("spkB", 330.0)):
        for i in range(3):
            utt = f"{spk}-{i}"
            write_tone(tmp_path / "wav" / f"{utt}.wav", freq=freq * (1 + 0.01 * i), seed=i)
            lines.append(f"{utt} ../wav/{utt}.wav")
            u2s.append(f"{utt} {spk}")
    (d / "wav.scp").write_text("\n".join(lines) + "\n")
    (d / "utt2spk").write_text("\n".join(u2s) + "\n")
    return d
