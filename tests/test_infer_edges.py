"""The bundle's infer.py at its edges, run for real as a user runs it (``python bundle/infer.py ...``): clips
too short for the network, ``--out`` in a missing folder, on a folder, on an existing file, bad ``--threads``.
Every refusal is exit 2 with a message naming the file or flag, no traceback, strict JSON or nothing on stdout.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from lsv_core.metrics.thresholds import eer_threshold, min_dcf_threshold
from lsv_core.models import build_model
from lsv_core.quant import BitRecipe, quantize
from tests.conftest import write_tone
from tests.test_deploy import QUICKSTART, _bundle, _trained_bn

SR = 16000


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("infer_edges")
    model = _trained_bn(build_model("ThinResNet", **QUICKSTART))
    quantize(model, BitRecipe.uniform(model, 4))
    model.eval()
    points = {"eer": eer_threshold([0.9, 0.5, 0.2, 0.1], [1, 1, 0, 0]),
              "min_dcf": min_dcf_threshold([0.9, 0.5, 0.2, 0.1], [1, 1, 0, 0])}
    return _bundle(root, model, points)


def _infer(bundle: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(bundle / "infer.py"), *args], capture_output=True, text=True,
                          timeout=120)


def _clip(path: Path, samples: int) -> Path:
    rng = np.random.default_rng(samples)
    sf.write(path, (0.1 * rng.standard_normal(samples)).astype(np.float32), SR, subtype="PCM_16")
    return path


def _refused(res: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
    assert "Traceback" not in res.stderr and res.stdout == "", res.stderr
    for needle in needles:
        assert needle in res.stderr, (needle, res.stderr)


def _frames_to_samples(frames: int) -> int:
    return 400 + (frames - 1) * 160  # 25 ms window, 10 ms shift at 16 kHz


def test_short_clips_are_refused_at_the_models_minimum_length(bundle: Path, tmp_path: Path) -> None:
    from lsv_core.export.infer_script import Verifier

    need = Verifier(bundle).min_frames()
    assert need is not None and need > 1  # the quickstart net downsamples time: one frame is not enough
    long = write_tone(tmp_path / "long.wav", seconds=2.0)
    just = _clip(tmp_path / "just.wav", _frames_to_samples(need))
    for ms in (50, 100, 150):
        if _frames_to_samples(need) <= ms * SR // 1000:
            continue
        short = _clip(tmp_path / f"short{ms}.wav", ms * SR // 1000)
        _refused(_infer(bundle, "score", str(long), str(short)), str(short), "too short", "at least")
    below = _clip(tmp_path / "below.wav", _frames_to_samples(need - 1))
    res = _infer(bundle, "score", str(just), str(below))
    _refused(res, str(below), f"at least {25 + (need - 1) * 10} ms ({need} frames")
    ok = _infer(bundle, "score", str(long), str(just))  # exactly the minimum: a finite score, strict JSON
    assert ok.returncode == 0, ok.stderr
    got = json.loads(ok.stdout, parse_constant=lambda c: pytest.fail(f"non-finite {c} in {ok.stdout}"))
    assert -1.0 <= got["score"] <= 1.0


def test_embed_of_a_short_clip_writes_nothing(bundle: Path, tmp_path: Path) -> None:
    long = write_tone(tmp_path / "long.wav", seconds=1.0)
    short = _clip(tmp_path / "short.wav", 2400)  # 150 ms
    out = tmp_path / "emb.npy"
    _refused(_infer(bundle, "embed", str(long), str(short), "--out", str(out)), str(short), "too short")
    _refused(_infer(bundle, "embed", str(short)), "too short")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["long.wav", "short.wav"]


def test_out_must_be_a_new_file_in_an_existing_folder(bundle: Path, tmp_path: Path) -> None:
    wav = write_tone(tmp_path / "a.wav", seconds=1.0)
    missing = tmp_path / "no" / "such" / "emb.npy"
    _refused(_infer(bundle, "embed", str(wav), "--out", str(missing)), "--out", str(missing.parent), "does not exist")
    assert not (tmp_path / "no").exists()
    _refused(_infer(bundle, "embed", str(wav), "--out", str(tmp_path)), "--out", "is a folder")
    under_file = wav / "emb.npy"
    _refused(_infer(bundle, "embed", str(wav), "--out", str(under_file)), "--out", "does not exist")
    out = tmp_path / "emb.npy"
    out.write_bytes(b"precious")
    _refused(_infer(bundle, "embed", str(wav), "--out", str(out)), "--out", "--force")
    assert out.read_bytes() == b"precious"
    res = _infer(bundle, "embed", str(wav), "--out", str(out), "--force")
    assert res.returncode == 0, res.stderr
    emb = np.load(out)
    assert emb.shape == (1, QUICKSTART["embed_dim"]) and np.isfinite(emb).all()
    plain = tmp_path / "emb"  # written to exactly the name given, no ".npy" added
    assert _infer(bundle, "embed", str(wav), "--out", str(plain)).returncode == 0
    assert np.array_equal(np.load(plain), emb) and not (tmp_path / "emb.npy.npy").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


@pytest.mark.parametrize("threads", ["0", "-2", "two"])
def test_threads_below_one_are_refused(bundle: Path, tmp_path: Path, threads: str) -> None:
    wav = write_tone(tmp_path / "a.wav", seconds=1.0)
    res = _infer(bundle, "--threads", threads, "embed", str(wav))
    assert res.returncode == 2 and "--threads" in res.stderr and ">= 1" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr and res.stdout == ""
