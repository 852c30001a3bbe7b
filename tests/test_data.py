"""Readers: Kaldi dirs, VoxCeleb folders, trial lists, audio - and every bad-input case names file and line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from lsv_core.data.audio import read_audio
from lsv_core.data.manifest import read_data, read_kaldi_dir, read_voxceleb_dir
from lsv_core.data.trials import read_trials
from lsv_core.errors import DataError
from tests.conftest import write_tone


def test_kaldi_dir_reads_relative_paths(kaldi_dir: Path) -> None:
    data = read_kaldi_dir(kaldi_dir)
    assert len(data) == 6
    assert data.speakers == ["spkA", "spkB"]
    assert data.spk2utt()["spkB"] == ["spkB-0", "spkB-1", "spkB-2"]
    u = data.utterances["spkA-1"]
    assert u.path.resolve() == (kaldi_dir.parent / "wav" / "spkA-1.wav").resolve()
    data.check_audio()


def test_duplicate_utterance_id_names_file_and_line(kaldi_dir: Path) -> None:
    scp = kaldi_dir / "wav.scp"
    scp.write_text(scp.read_text() + "spkA-0 ../wav/spkA-1.wav\n")
    with pytest.raises(DataError, match=r"wav\.scp:7: duplicate utterance id 'spkA-0' \(first at line 1\)"):
        read_kaldi_dir(kaldi_dir)


def test_utt2spk_naming_unknown_utterance(kaldi_dir: Path) -> None:
    (kaldi_dir / "utt2spk").write_text((kaldi_dir / "utt2spk").read_text() + "ghost spkA\n")
    with pytest.raises(DataError, match=r"utt2spk:7: utterance 'ghost' is not in"):
        read_kaldi_dir(kaldi_dir)


def test_spk2utt_inconsistent(kaldi_dir: Path) -> None:
    (kaldi_dir / "spk2utt").write_text("spkA spkA-0 spkB-0\n")
    with pytest.raises(DataError, match=r"spk2utt:1: utterance 'spkB-0' listed under speaker 'spkA'"):
        read_kaldi_dir(kaldi_dir)


def test_missing_audio_is_reported_with_utterance(kaldi_dir: Path) -> None:
    (kaldi_dir.parent / "wav" / "spkB-2.wav").unlink()
    data = read_kaldi_dir(kaldi_dir)
    with pytest.raises(DataError, match=r"utterance spkB-2 points to missing audio file .*spkB-2\.wav"):
        data.check_audio()
    with pytest.raises(DataError, match=r"spkB-2\.wav does not exist"):
        read_audio(data.utterances["spkB-2"].path, where="wav.scp:6")


def test_unreadable_empty_and_wrong_rate_audio(tmp_path: Path) -> None:
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF not really a wav file")
    with pytest.raises(DataError, match=r"wav\.scp:3: audio file .*bad\.wav is unreadable"):
        read_audio(bad, where="wav.scp:3")
    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros(0, dtype=np.float32), 16000)
    with pytest.raises(DataError, match="is empty"):
        read_audio(empty)
    r8k = write_tone(tmp_path / "r8k.wav", sr=8000, seconds=0.5)
    with pytest.raises(DataError, match="sample rate 8000 Hz, expected 16000 Hz"):
        read_audio(r8k)
    wav = read_audio(r8k, resample=True)
    assert wav.dtype == np.float32 and abs(len(wav) - 8000) <= 2


def test_voxceleb_folder(tmp_path: Path) -> None:
    for spk in ("id10001", "id10002"):
        for vid in ("vidA", "vidB"):
            write_tone(tmp_path / "vox" / spk / vid / "00001.wav", seconds=0.3)
    data = read_voxceleb_dir(tmp_path / "vox")
    assert len(data) == 4
    assert "id10002/vidB/00001.wav" in data
    assert data.utterances["id10001/vidA/00001.wav"].speaker == "id10001"
    assert read_data(tmp_path / "vox").speakers == ["id10001", "id10002"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no"):
        read_voxceleb_dir(tmp_path / "empty")


def test_trials_both_forms(kaldi_dir: Path, tmp_path: Path) -> None:
    data = read_kaldi_dir(kaldi_dir)
    vox = tmp_path / "vox_trials.txt"
    vox.write_text("1 spkA-0 spkA-1\n0 spkA-0 spkB-1\n")
    kaldi = tmp_path / "kaldi_trials"
    kaldi.write_text("spkA-0 spkA-1 target\nspkA-0 spkB-1 nontarget\n")
    a, b = read_trials(vox, data), read_trials(kaldi, data)
    assert a.enroll == b.enroll and a.test == b.test
    assert a.labels.tolist() == b.labels.tolist() == [1, 0]
    assert a.utterances == ["spkA-0", "spkA-1", "spkB-1"]


def test_trials_bad_inputs(kaldi_dir: Path, tmp_path: Path) -> None:
    data = read_kaldi_dir(kaldi_dir)
    f = tmp_path / "trials"
    f.write_text("spkA-0 spkA-1 target\nspkA-0 nobody nontarget\n")
    with pytest.raises(DataError, match=r"trials:2: utterance 'nobody' is not in the data"):
        read_trials(f, data)
    f.write_text("spkA-0 spkA-1 target\nspkA-0 spkB-1 maybe\n")
    with pytest.raises(DataError, match=r"trials:2: not a trial line"):
        read_trials(f, data)
    f.write_text("spkA-0 spkA-1\n")
    with pytest.raises(DataError, match=r"trials:1: expected 3 fields, got 2"):
        read_trials(f, data)
    f.write_text("spkA-0 spkA-1 target\n")
    with pytest.raises(DataError, match="only target trials"):
        read_trials(f, data)
    with pytest.raises(DataError, match="does not exist"):
        read_trials(tmp_path / "nope", data)
