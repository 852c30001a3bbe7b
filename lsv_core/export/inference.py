"""Torch-free inference for a bundle: the files ``infer.py`` needs, and onnxruntime embeddings of a data set.

A bundle carries ``infer.py`` (a verbatim copy of :mod:`lsv_core.export.infer_script`), ``infer.json``
(:func:`infer_settings`: feature settings, input/output names and the decision thresholds measured at
export) and ``requirements.txt`` (:data:`INFER_REQUIREMENTS`). :func:`onnx_embeddings` runs an ONNX file
over a :class:`~lsv_core.data.features.FeatureStore` exactly as :func:`lsv_core.evaluate.extract_embeddings`
runs a torch model (same length-sorted batches cut to their shortest member), so the export can score
the shipped file on the study's trials and compare it with the torch re-evaluation score for score.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lsv_core.errors import ConfigError
from lsv_core.export.onnx_codebook import INPUT_NAME, OUTPUT_NAME

if TYPE_CHECKING:
    import onnxruntime as ort

    from lsv_core.data.features import FbankConfig, FeatureStore
    from lsv_core.metrics.thresholds import OperatingPoint

__all__ = ["INFER_FORMAT", "INFER_REQUIREMENTS", "INFER_SCRIPT", "infer_settings", "onnx_embeddings",
           "onnx_session", "write_infer_files"]

INFER_FORMAT = "lsv-infer/1"
# What infer.py imports, and nothing else (a test installs exactly these into a fresh venv).
INFER_REQUIREMENTS: tuple[str, ...] = ("onnxruntime>=1.17", "numpy>=1.26", "kaldi-native-fbank>=1.20",
                                       "soundfile>=0.12")
INFER_SCRIPT = Path(__file__).with_name("infer_script.py")
# Kaldi (and WeSpeaker) compute fbank on int16-scaled samples; lsv_core.data.features does the same.
WAVEFORM_SCALE = 32768.0


def infer_settings(model_file: str, fbank: FbankConfig, thresholds: Mapping[str, OperatingPoint],
                   evaluated_on: Mapping[str, Any]) -> dict[str, Any]:
    """The content of ``infer.json``: how ``infer.py`` turns a wav into the model's input, and the thresholds.

    ``thresholds`` maps an operating-point name (``"eer"``, ``"min_dcf"``) to where it was measured;
    ``evaluated_on`` says on what (study, number of trials, EER), for the card and for people.
    """
    if fbank.resample:
        raise ConfigError("FbankConfig(resample=True): infer.py does not resample; its input must be "
                          f"{fbank.sample_rate} Hz audio, so export with resample=False")
    return {
        "format": INFER_FORMAT,
        "model": model_file,
        "input": INPUT_NAME,
        "output": OUTPUT_NAME,
        "features": {"sample_rate": fbank.sample_rate, "num_mel_bins": fbank.num_mel_bins,
                     "frame_length_ms": fbank.frame_length_ms, "frame_shift_ms": fbank.frame_shift_ms,
                     "dither": 0.0, "snip_edges": True, "waveform_scale": WAVEFORM_SCALE, "cmn": fbank.cmn},
        "scoring": "cosine; same speaker when score >= threshold",
        "thresholds": {name: point.to_dict() for name, point in thresholds.items()},
        "evaluated_on": dict(evaluated_on),
    }


def write_infer_files(folder: str | os.PathLike[str], settings: Mapping[str, Any]) -> list[Path]:
    """Write ``infer.py``, ``infer.json`` and ``requirements.txt`` into ``folder`` (a staging folder)."""
    folder = Path(folder)
    script = folder / "infer.py"
    script.write_text(INFER_SCRIPT.read_text())
    script.chmod(0o755)
    (folder / "infer.json").write_text(json.dumps(settings, indent=2) + "\n")
    (folder / "requirements.txt").write_text("\n".join(INFER_REQUIREMENTS) + "\n")
    return [script, folder / "infer.json", folder / "requirements.txt"]


def onnx_session(model: str | os.PathLike[str] | bytes, threads: int = 1) -> ort.InferenceSession:
    """An onnxruntime CPU session with ``threads`` intra-op threads, reporting errors only."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def onnx_embeddings(session: ort.InferenceSession, store: FeatureStore, utts: Sequence[str], *,
                    batch_size: int = 32, max_frames: int | None = None) -> dict[str, np.ndarray]:
    """Embeddings of ``utts`` from ``session``, batched as :func:`lsv_core.evaluate.extract_embeddings`."""
    order = sorted(utts, key=store.num_frames)
    out: dict[str, np.ndarray] = {}
    for i in range(0, len(order), batch_size):
        chunk = order[i : i + batch_size]
        # The features themselves, not num_frames: for audio decoded on the fly (m4a) that is only the
        # header's estimate, and the batch must be cut to what every member really has.
        feats = [store[u] for u in chunk]
        n = min(len(f) for f in feats)
        if max_frames is not None:
            n = min(n, max_frames)
        x = np.stack([f[:n] for f in feats]).astype(np.float32, copy=False)
        emb = session.run([OUTPUT_NAME], {INPUT_NAME: x})[0]
        out.update(zip(chunk, emb, strict=True))
    return out
