#!/usr/bin/env python3
"""Speaker verification with an exported lsv-quant model: no PyTorch, no lsv-quant.

Needs only onnxruntime, numpy, kaldi-native-fbank and soundfile (``pip install -r requirements.txt``).
Reads ``infer.json`` and ``model.onnx`` from this script's folder (or ``--bundle DIR``).

    python infer.py embed a.wav [b.wav ...] [--out emb.npy]   # one embedding per wav (JSON, or .npy; --force)
    python infer.py score enroll.wav test.wav                  # cosine score, decision at the EER threshold
    python infer.py score enroll.wav test.wav --operating-point min_dcf

``score`` prints one JSON object: the cosine score, the threshold, the operating point and
``"same_speaker"`` (score >= threshold). The thresholds were measured when the model was exported, on
the study's evaluation trials (``infer.json`` says how many and the error rates they gave there).

Audio: 16 kHz (the rate ``infer.json`` names), any channel count (averaged to mono), any format
soundfile reads. A file at another rate, an empty or unreadable file is an error (exit status 2);
resample it first (e.g. ``sox in.wav -r 16000 out.wav``). So is a clip too short for the network (its
pooling needs a few frames after downsampling): the message gives the model's minimum length, and no
score or embedding is printed (every number printed is finite: the output is strict JSON).

The features are the ones the model was trained and evaluated with: Kaldi log-mel filterbanks
(kaldi-native-fbank, no dither) of the waveform scaled to the int16 range, then per-utterance mean
normalisation. This file is copied verbatim from ``lsv_core/export/infer_script.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import kaldi_native_fbank as knf
import numpy as np
import onnxruntime as ort
import soundfile as sf

INFER_FORMAT = "lsv-infer/1"
EXIT_BAD_INPUT = 2


class InputError(Exception):
    """Bad input the user can fix (a wav, the bundle); reported on stderr with exit status 2."""


def load_config(bundle: Path) -> dict:
    path = bundle / "infer.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise InputError(f"{path}: cannot read the bundle's inference settings ({err})") from None
    if config.get("format") != INFER_FORMAT:
        raise InputError(f"{path}: format={config.get('format')!r}, expected {INFER_FORMAT!r}")
    return config


def read_wav(path: str, sample_rate: int) -> np.ndarray:
    """Mono float32 samples in [-1, 1]; every problem is an InputError naming the file."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{path}: no such file")
    try:
        wav, rate = sf.read(str(p), dtype="float32", always_2d=True)
    except Exception as err:  # soundfile raises several types for corrupt files
        raise InputError(f"{path}: unreadable audio ({err})") from None
    if wav.shape[0] == 0:
        raise InputError(f"{path}: empty audio (0 samples)")
    if rate != sample_rate:
        raise InputError(f"{path}: sample rate {rate} Hz, the model needs {sample_rate} Hz; resample it first")
    wav = wav.mean(axis=1) if wav.shape[1] > 1 else wav[:, 0]
    return np.ascontiguousarray(wav, dtype=np.float32)


def fbank(wav: np.ndarray, feats: dict, where: str) -> np.ndarray:
    """(frames, bins) float32 log-mel features, as the model's training pipeline computes them."""
    opts = knf.FbankOptions()
    opts.frame_opts.samp_freq = feats["sample_rate"]
    opts.frame_opts.frame_length_ms = feats["frame_length_ms"]
    opts.frame_opts.frame_shift_ms = feats["frame_shift_ms"]
    opts.frame_opts.dither = feats["dither"]
    opts.frame_opts.snip_edges = feats["snip_edges"]
    opts.mel_opts.num_bins = feats["num_mel_bins"]
    computer = knf.OnlineFbank(opts)
    computer.accept_waveform(feats["sample_rate"], (wav * feats["waveform_scale"]).astype(np.float32))
    computer.input_finished()
    n = computer.num_frames_ready
    if n == 0:
        raise InputError(f"{where}: {len(wav)} samples is shorter than one {feats['frame_length_ms']} ms frame")
    out = np.stack([computer.get_frame(i) for i in range(n)]).astype(np.float32)
    if feats["cmn"]:
        out -= out.mean(axis=0, keepdims=True)
    return out


class Verifier:
    """The bundle's model: wav -> embedding, two wavs -> cosine score and decision."""

    def __init__(self, bundle: str | Path, threads: int = 1) -> None:
        self.bundle = Path(bundle)
        self.config = load_config(self.bundle)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors only
        model = self.bundle / self.config["model"]
        try:
            self.session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime raises its own Fail / InvalidProtobuf
            raise InputError(f"{model}: onnxruntime cannot load it ({err})") from None

    def _run(self, x: np.ndarray) -> np.ndarray:
        return self.session.run([self.config["output"]], {self.config["input"]: x[None]})[0][0].astype(np.float32)

    def embed(self, path: str) -> np.ndarray:
        feats = self.config["features"]
        x = fbank(read_wav(path, feats["sample_rate"]), feats, path)
        out = self._run(x)
        if not np.isfinite(out).all():
            raise InputError(self._too_short(path, x.shape[0]))
        return out

    def min_frames(self, limit: int = 4096) -> int | None:
        """The fewest feature frames that give a finite embedding (None: none up to ``limit``).

        A clip too short leaves the statistics pooling one frame or none after the network's strides, and
        the standard deviation is NaN; that depends on the shape only, so random features find the bound.
        """
        bins = self.config["features"]["num_mel_bins"]
        rng = np.random.default_rng(0)

        def finite(n: int) -> bool:
            return bool(np.isfinite(self._run(rng.standard_normal((n, bins)).astype(np.float32))).all())

        hi = 1
        while not finite(hi):
            if hi >= limit:
                return None
            hi *= 2
        lo = hi // 2  # not finite (or 0); the bound lies in (lo, hi]
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if finite(mid) else (mid, hi)
        return hi

    def _too_short(self, path: str, frames: int) -> str:
        feats = self.config["features"]
        need = self.min_frames()
        if need is None or frames >= need:
            return f"{path}: the model gives a non-finite embedding for this clip ({frames} frames)"
        shift, length = feats["frame_shift_ms"], feats["frame_length_ms"]
        have_ms, need_ms = length + (frames - 1) * shift, length + (need - 1) * shift
        return (f"{path}: about {have_ms:g} ms of audio ({frames} frames) is too short for this model; it needs "
                f"at least {need_ms:g} ms ({need} frames of {shift:g} ms)")

    def score(self, enroll: str, test: str, operating_point: str = "eer") -> dict:
        points = self.config["thresholds"]
        if operating_point not in points:
            raise InputError(f"operating point {operating_point!r} is not in infer.json; choose one of {sorted(points)}")
        a, b = self.embed(enroll), self.embed(test)
        score = float(np.dot(a, b) / max(float(np.linalg.norm(a) * np.linalg.norm(b)), 1e-12))
        threshold = float(points[operating_point]["threshold"])
        return {"enroll": enroll, "test": test, "score": score, "threshold": threshold,
                "operating_point": operating_point, "same_speaker": score >= threshold}


def _at_least_one(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} should be an integer >= 1")
    return value


def check_out(out: Path, force: bool) -> None:
    """``--out`` must be a file in an existing folder; an existing file is replaced only with ``--force``."""
    if out.is_dir():
        raise InputError(f"--out {out} is a folder; give a file name, e.g. {out / 'emb.npy'}")
    if not out.parent.is_dir():
        raise InputError(f"--out {out}: folder {out.parent} does not exist; create it first")
    if out.exists() and not force:
        raise InputError(f"--out {out} exists; add --force to replace it")


def save_npy(out: Path, array: np.ndarray) -> None:
    """Write ``array`` to exactly ``out`` (no ``.npy`` appended), atomically: a reader never sees half a file."""
    try:
        fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    except OSError as err:
        raise InputError(f"--out {out}: cannot write in {out.parent} ({err.strerror})") from None
    try:
        with os.fdopen(fd, "wb") as fh:
            np.save(fh, array)
        os.replace(tmp, out)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        raise InputError(f"--out {out}: cannot write it ({err.strerror})") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def main(argv: list[str] | None = None) -> int:
    here = Path(__file__).resolve().parent
    p = argparse.ArgumentParser(description="Speaker verification with an exported lsv-quant model.")
    p.add_argument("--bundle", type=Path, default=here, help="folder with infer.json and the model (default: here)")
    p.add_argument("--threads", type=_at_least_one, default=1, help="onnxruntime intra-op threads (>= 1)")
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("embed", help="embedding of each wav")
    e.add_argument("wavs", nargs="+")
    e.add_argument("--out", type=Path, help="write a (n, dim) float32 .npy here instead of printing JSON")
    e.add_argument("--force", action="store_true", help="replace an existing --out file")
    s = sub.add_parser("score", help="cosine score of two wavs and the same-speaker decision")
    s.add_argument("enroll")
    s.add_argument("test")
    s.add_argument("--operating-point", default="eer", help="eer (default) or min_dcf: whose threshold decides")
    args = p.parse_args(argv)
    try:
        if args.command == "embed" and args.out is not None:
            check_out(args.out, args.force)
        verifier = Verifier(args.bundle, threads=args.threads)
        if args.command == "embed":
            emb = np.stack([verifier.embed(w) for w in args.wavs])
            if args.out is not None:
                save_npy(args.out, emb)
            else:
                print(json.dumps({w: e.tolist() for w, e in zip(args.wavs, emb, strict=True)}, allow_nan=False))
        else:
            print(json.dumps(verifier.score(args.enroll, args.test, args.operating_point), allow_nan=False))
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


if __name__ == "__main__":
    sys.exit(main())
