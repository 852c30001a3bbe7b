"""`lsv data prepare voxceleb` on a small fake VoxCeleb tree the test makes itself (WAV and AAC .m4a),
and the audio audit (every bad file reported at once, cached by content)."""

from __future__ import annotations

import os
from pathlib import Path

import av
import numpy as np
import pytest

from lsv_core.data.audio import read_audio, read_header
from lsv_core.data.audit import audit_audio, raise_for_problems
from lsv_core.data.features import extract_features
from lsv_core.data.manifest import read_data, read_kaldi_dir
from lsv_core.data.trials import read_trials
from lsv_core.data.voxceleb import prepare_voxceleb
from lsv_core.errors import DataError
from search.cli import main
from tests.conftest import write_tone


def write_m4a(path: Path, seconds: float = 1.0, sr: int = 16000, freq: float = 300.0) -> Path:
    """AAC in an MP4 container, as VoxCeleb2 ships it, encoded by PyAV's bundled FFmpeg."""
    t = np.arange(int(seconds * sr)) / sr
    pcm = (0.3 * np.sin(2 * np.pi * freq * t) * 32767).astype(np.int16)[None, :]
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w", format="mp4") as out:
        stream = out.add_stream("aac", rate=sr, layout="mono")
        frame = av.AudioFrame.from_ndarray(pcm, format="s16", layout="mono")
        frame.sample_rate = sr
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return path


@pytest.fixture
def vox_root(tmp_path: Path) -> Path:
    root = tmp_path / "downloads"
    for spk in ("id10001", "id10002", "id10003"):
        for vid in ("vidA", "vidB"):
            for n in (1, 2):
                write_tone(root / "vox1_dev_wav" / "wav" / spk / vid / f"0000{n}.wav", seconds=0.6,
                           freq=150.0 * int(spk[-1]) + n, seed=n)
    for spk in ("id00012", "id00015"):
        for n in (1, 2, 3):
            write_m4a(root / "vox2_dev_aac" / "dev" / "aac" / spk / "xYz_1" / f"0000{n}.m4a", seconds=0.8,
                      freq=200.0 * int(spk[-1]))
    write_m4a(root / "vox2_test_aac" / "test" / "aac" / "id00017" / "v" / "00001.m4a", seconds=0.5)
    (root / "veri_test2.txt").write_text(
        "1 id10001/vidA/00001.wav id10001/vidB/00002.wav\n0 id10001/vidA/00001.wav id10002/vidA/00001.wav\n"
        "0 id10003/vidB/00002.wav id10002/vidB/00001.wav\n")
    (root / "list_test_hard2.txt").write_text("1 id10002/vidA/00001.wav id10002/vidB/00002.wav\n"
                                              "0 id10002/vidA/00002.wav id10003/vidA/00001.wav\n")
    return root


def test_m4a_is_decoded_without_system_ffmpeg(tmp_path: Path) -> None:
    path = write_m4a(tmp_path / "a.m4a", seconds=1.0, freq=440.0)
    header = read_header(path)
    assert header.sample_rate == 16000 and header.channels == 1
    wav = read_audio(path)
    # AAC adds encoder priming/padding (a frame or two of 1024 samples), never drops audio.
    assert wav.dtype == np.float32 and 16000 <= len(wav) <= 16000 + 3 * 1024
    spectrum = np.abs(np.fft.rfft(wav[2048:14000]))
    assert abs(np.argmax(spectrum) * 16000 / len(wav[2048:14000]) - 440.0) < 5.0


def test_prepare_voxceleb_through_the_cli(vox_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "prepared"
    assert main(["data", "prepare", "voxceleb", "--root", str(vox_root), "--out", str(out)]) == 0
    vox1, dev, test = (read_kaldi_dir(out / n) for n in ("vox1", "vox2_dev", "vox2_test"))
    assert len(vox1) == 12 and vox1.speakers == ["id10001", "id10002", "id10003"]
    assert "id10002/vidB/00001.wav" in vox1
    assert len(dev) == 6 and dev.speakers == ["id00012", "id00015"] and len(test) == 1
    assert all(u.path.suffix == ".m4a" and u.path.is_absolute() for u in dev)
    assert (out / "vox1" / "spk2utt").read_text().startswith("id10001 id10001/vidA/00001.wav")
    o = read_trials(out / "vox1" / "vox1_O_cleaned.kaldi", vox1)
    assert o.labels.tolist() == [1, 0, 0] and (out / "vox1" / "vox1_O_cleaned.kaldi").read_text().split("\n")[0] \
        == "id10001/vidA/00001.wav id10001/vidB/00002.wav target"
    assert len(read_trials(out / "vox1" / "vox1_H_cleaned.kaldi", vox1)) == 2
    # The m4a training data goes through the real feature pipeline.
    feats = extract_features(dev, workers=1, progress=False)
    assert 75 <= feats.num_frames("id00012/xYz_1/00001.m4a") <= 100
    # Refuses to replace its output without --force.
    assert main(["data", "prepare", "voxceleb", "--root", str(vox_root), "--out", str(out)]) == 2
    assert "exists" in capsys.readouterr().err


def test_prepare_voxceleb_can_convert_m4a_once(vox_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "prepared"
    summary = prepare_voxceleb(vox_root, out, convert_m4a=True, workers=1, progress=False)
    assert summary.converted == 7
    dev = read_kaldi_dir(out / "vox2_dev")
    assert all(u.path.suffix == ".wav" and u.path.is_file() and out.resolve() in u.path.parents for u in dev)
    assert not any(out.parent.glob(".prepared.*"))  # nothing left beside the output
    a = read_audio(dev.utterances["id00015/xYz_1/00002.m4a"].path)
    b = read_audio(vox_root / "vox2_dev_aac" / "dev" / "aac" / "id00015" / "xYz_1" / "00002.m4a")
    np.testing.assert_allclose(a, b, atol=1 / 16000)  # 16-bit PCM of the same decode


def test_prepare_voxceleb_refuses_a_trial_list_naming_unknown_utterances(vox_root: Path, tmp_path: Path) -> None:
    (vox_root / "list_test_all2.txt").write_text("1 id10001/vidA/00001.wav id10001/vidB/00002.wav\n"
                                                 "0 id10001/vidA/00001.wav id19999/gone/00001.wav\n")
    out = tmp_path / "prepared"
    with pytest.raises(DataError, match=r"list_test_all2\.txt:2: utterance 'id19999/gone/00001\.wav' is not in"):
        prepare_voxceleb(vox_root, out, progress=False)
    assert not out.exists()  # all or nothing
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no VoxCeleb audio"):
        prepare_voxceleb(tmp_path / "empty", tmp_path / "o2", progress=False)


def test_voxceleb_m4a_folder_reads_as_data(vox_root: Path) -> None:
    data = read_data(vox_root / "vox2_dev_aac" / "dev" / "aac")
    assert len(data) == 6 and "id00015/xYz_1/00003.m4a" in data


# -- audit ----------------------------------------------------------------------------------------------
def _bad_data_dir(tmp_path: Path) -> Path:
    """A Kaldi dir with good files and one of each kind of bad file."""
    import soundfile as sf

    wav = tmp_path / "wav"
    files = {f"good{i}": write_tone(wav / f"good{i}.wav", seconds=0.5, seed=i) for i in range(3)}
    files["good_m4a"] = write_m4a(wav / "good.m4a", seconds=0.5)
    files["corrupt"] = wav / "corrupt.wav"
    files["corrupt"].write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt garbage that is not a header")
    files["zero_bytes"] = wav / "zero.wav"
    files["zero_bytes"].write_bytes(b"")
    files["no_samples"] = wav / "nosamples.wav"
    sf.write(files["no_samples"], np.zeros(0, dtype=np.float32), 16000)
    files["rate8k"] = write_tone(wav / "r8k.wav", sr=8000, seconds=0.5)
    files["short"] = write_tone(wav / "short.wav", seconds=0.01)  # 160 samples < one 400-sample frame
    files["missing"] = wav / "missing.wav"
    files["a_folder"] = wav / "folder.wav"
    files["a_folder"].mkdir()
    files["corrupt_m4a"] = wav / "corrupt.m4a"
    files["corrupt_m4a"].write_bytes(os.urandom(2000))
    d = tmp_path / "data"
    d.mkdir()
    (d / "wav.scp").write_text("".join(f"{u} {p}\n" for u, p in files.items()))
    (d / "utt2spk").write_text("".join(f"{u} spk{i % 2}\n" for i, u in enumerate(files)))
    return d


def test_audit_reports_every_bad_file_at_once(tmp_path: Path) -> None:
    data = read_kaldi_dir(_bad_data_dir(tmp_path))
    problems = audit_audio(data, workers=2, progress=False)
    by_utt = {p.utt: p for p in problems}
    assert sorted(by_utt) == sorted(["corrupt", "zero_bytes", "no_samples", "rate8k", "short", "missing",
                                     "a_folder", "corrupt_m4a"])
    assert [p.utt for p in problems] == [u for u in data.utterances if u in by_utt]  # listing order
    assert "unreadable" in by_utt["corrupt"].reason and "unreadable" in by_utt["corrupt_m4a"].reason
    assert by_utt["zero_bytes"].reason == "is empty (0 bytes)"
    assert by_utt["no_samples"].reason == "is empty (0 samples)"
    assert by_utt["rate8k"].reason == "has sample rate 8000 Hz, expected 16000 Hz"
    assert "160 samples long, shorter than one 400-sample fbank frame" in by_utt["short"].reason
    assert by_utt["missing"].reason == "does not exist"
    assert by_utt["a_folder"].path == data.utterances["a_folder"].path
    with pytest.raises(DataError) as err:
        raise_for_problems(problems, source="train")
    text = str(err.value)
    assert text.startswith("train: 8 bad audio file(s):")
    assert "utterance rate8k: " in text and str(data.utterances["rate8k"].path) in text


def test_audit_is_cached_by_content(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lsv_core.data import audit as audit_mod

    data = read_kaldi_dir(_bad_data_dir(tmp_path))
    cache = tmp_path / "cache"
    first = audit_audio(data, cache_dir=cache, progress=False)
    assert (cache / "audit").is_dir()
    checked: list[str] = []
    real = audit_mod._check
    monkeypatch.setattr(audit_mod, "_check", lambda utt, *a: checked.append(utt) or real(utt, *a))
    second = audit_audio(data, cache_dir=cache, progress=False)
    assert second == first
    # Files that passed are not opened again; problems are always re-checked.
    assert sorted(checked) == sorted(p.utt for p in first)
    # A good file replaced by a bad one (same path) is caught: its content key changed.
    write_tone(data.utterances["good1"].path, sr=22050, seconds=0.5)
    checked.clear()
    third = audit_audio(data, cache_dir=cache, progress=False)
    assert "good1" in checked and any(p.utt == "good1" and "22050 Hz" in p.reason for p in third)


def test_lsv_data_audit_and_cache_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = _bad_data_dir(tmp_path / "bad")
    assert main(["data", "audit", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "8 bad audio file(s)" in err and "utterance corrupt_m4a" in err and "Traceback" not in err
    good = tmp_path / "good"
    good.mkdir()
    (good / "wav.scp").write_text("".join(f"u{i} {write_tone(tmp_path / f'g{i}.wav', seconds=0.4)}\n" for i in range(5)))
    (good / "utt2spk").write_text("".join(f"u{i} s{i % 2}\n" for i in range(5)))
    assert main(["data", "audit", str(good)]) == 0
    cache = tmp_path / "cache"
    assert main(["data", "cache", str(good), "--cache", str(cache), "--shard-utts", "2", "--workers", "1"]) == 0
    assert "5 computed now" in capsys.readouterr().err
    assert main(["data", "cache", str(good), "--cache", str(cache), "--workers", "1"]) == 0
    assert "0 computed now, 5 already stored" in capsys.readouterr().err
