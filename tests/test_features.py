"""Fbank front end (kaldi-native-fbank) and the feature cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lsv_core.data import store as store_mod
from lsv_core.data.audio import read_audio
from lsv_core.data.features import FbankConfig, extract_features, fbank
from lsv_core.data.manifest import read_kaldi_dir


def test_fbank_shape_and_mean_normalisation(kaldi_dir: Path) -> None:
    data = read_kaldi_dir(kaldi_dir)
    wav = read_audio(data.utterances["spkA-0"].path)
    f = fbank(wav)
    # 1 s at 16 kHz, 25 ms / 10 ms frames with snip_edges: 1 + (16000 - 400) // 160 = 98 frames.
    assert f.shape == (98, 80)
    assert f.dtype == np.float32
    np.testing.assert_allclose(f.mean(axis=0), 0.0, atol=1e-4)
    raw = fbank(wav, FbankConfig(cmn=False))
    np.testing.assert_allclose(raw - raw.mean(axis=0), f, atol=1e-4)


def test_fbank_sees_pitch_in_the_right_mel_band(tmp_path: Path) -> None:
    sr = 16000
    t = np.arange(sr) / sr
    low = fbank((0.5 * np.sin(2 * np.pi * 300 * t)).astype(np.float32), FbankConfig(cmn=False))
    high = fbank((0.5 * np.sin(2 * np.pi * 3000 * t)).astype(np.float32), FbankConfig(cmn=False))
    assert low.mean(0).argmax() < high.mean(0).argmax()


def test_fbank_is_deterministic(kaldi_dir: Path) -> None:
    wav = read_audio(read_kaldi_dir(kaldi_dir).utterances["spkB-1"].path)
    assert np.array_equal(fbank(wav), fbank(wav))


def test_feature_cache_never_recomputes(kaldi_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = read_kaldi_dir(kaldi_dir)
    cache = tmp_path / "cache"
    first = extract_features(data, cache_dir=cache, workers=1, progress=False)
    assert len(list(cache.glob("features/*/*.idx.npz"))) == 1  # one shard of 6 utterances
    calls = []
    real = store_mod._features_job
    monkeypatch.setattr(store_mod, "_features_job", lambda item: calls.append(item) or real(item))
    second = extract_features(data, cache_dir=cache, workers=1, progress=False)
    assert calls == []
    for u in data.utterances:
        assert np.array_equal(first[u], second[u])
    # A changed file changes the key: features are recomputed, not served stale.
    path = data.utterances["spkA-0"].path
    wav = read_audio(path)
    import soundfile as sf

    sf.write(path, wav[: len(wav) // 2], 16000, subtype="PCM_16")
    third = extract_features(data, cache_dir=cache, workers=1, progress=False)
    assert [c[0] for c in calls] == ["spkA-0"]  # content-keyed per utterance: only the changed file
    assert third.num_frames("spkA-0") < first.num_frames("spkA-0")
