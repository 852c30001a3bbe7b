"""A deployable bundle of one quantized model: the files a user ships, written and checked as one unit.

:func:`stage_bundle` writes, into a staging folder beside the destination:

* ``model.onnx``: **the deployable file** (:mod:`lsv_core.export.onnx_codebook`): bit-packed indices and
  codebooks, dequantized in the graph; its byte count is the study's size objective, checked here to
  the byte, and its embeddings are checked against the quantized torch model (cosine >= 0.9999);
* ``infer.py``, ``infer.json``, ``requirements.txt``: torch-free inference (wav -> embedding, two wavs ->
  score and decision at the thresholds measured at export; :mod:`lsv_core.export.inference`);
* ``model.packed.safetensors``: a copy of the given packed file, loaded back and compared (same recipe,
  same outputs bit for bit): the quantized model for lsv-quant (fine-tune further, re-export);
* ``wespeaker_avg_model.pt``: the dequantized state dict in WeSpeaker's layout (strict load checked);
* ``model.float.onnx`` (only when asked): the dequantized float network, BatchNorm folded, for runtimes
  that want plain float weights;
* ``recipe.json``: the recipe (``BitRecipe.load`` reads it) plus the caller's provenance and metrics;
* ``model_card.md``, and ``.lsv-bundle.json``: the marker that says lsv-quant wrote this folder and
  which files it holds.

It knows nothing of studies: the caller states what it knows in :class:`BundleFacts`. The staged
bundle is moved into place by :meth:`StagedBundle.commit` (one rename); leaving the ``with`` block
without committing removes it. An existing destination is replaced only when asked *and* only if it is
a bundle this code wrote (its marker lists every file in it): a folder lsv-quant did not create is
never deleted (:func:`check_out_dir`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lsv_core.atomic import RefuseOverwrite, replace_dir
from lsv_core.errors import CheckpointError, ConfigError
from lsv_core.export.card import Accuracy, LayerRow, ModelCard, OnnxCheck, render_model_card
from lsv_core.export.onnx_codebook import INPUT_NAME, OUTPUT_NAME, graph_template, save_codebook_onnx
from lsv_core.export.packed import load_packed
from lsv_core.export.wespeaker import (
    WESPEAKER_FILENAME,
    check_wespeaker_state_dict,
    dequantized_model,
    save_wespeaker_state_dict,
)
from lsv_core.quant import (
    average_bits,
    latent_weight,
    packed_size_bytes,
    packed_tensor_bytes,
    quantizable_layers,
    recipe_of,
)

__all__ = ["BUNDLE_FORMAT", "FLOAT_ONNX_NAME", "MARKER_NAME", "MAX_SCORE_DIFF", "MIN_COSINE", "ONNX_NAME", "PACKED_NAME", "Accuracy",
           "BundleFacts", "OnnxAgreement", "StagedBundle", "check_out_dir", "packed_file_sizes", "read_marker",
           "stage_bundle"]

PACKED_NAME = "model.packed.safetensors"
ONNX_NAME = "model.onnx"
FLOAT_ONNX_NAME = "model.float.onnx"
MARKER_NAME = ".lsv-bundle.json"
BUNDLE_FORMAT = "lsv-bundle/1"
MIN_COSINE = 0.9999  # onnxruntime vs the quantized torch model, per embedding
# onnxruntime vs torch, per trial score (cosine): what is meant to be equal. Not the EER: on a small trial
# subset a trial within float noise of the threshold flips and moves the EER by 100/n_target points.
MAX_SCORE_DIFF = 1e-3


@dataclass(frozen=True)
class BundleFacts:
    """What the caller knows about the model: a title, its accuracy, provenance (shown in the card, stored
    in ``recipe.json``), a few lines on how it was found, extra metrics for ``recipe.json``, and for
    ``infer.py`` the decision thresholds (``{"eer": ..., "min_dcf": ...}``, measured on the evaluation
    named in ``evaluated_on``) and the fbank settings the model was evaluated with."""

    title: str
    accuracy: Accuracy
    provenance: Mapping[str, Any] = field(default_factory=dict)
    how_found: Sequence[str] = ()
    metrics: Mapping[str, Any] = field(default_factory=dict)
    thresholds: Mapping[str, Any] = field(default_factory=dict)  # name -> lsv_core.metrics.thresholds.OperatingPoint
    evaluated_on: Mapping[str, Any] = field(default_factory=dict)
    fbank: Any = None  # lsv_core.data.features.FbankConfig; None = its defaults


@dataclass(frozen=True)
class OnnxAgreement:
    """The shipped ONNX run on real evaluation utterances against the torch model: the EER (percent) its
    embeddings give on the trials (reported, not compared), the lowest per-utterance cosine to the torch
    embedding, how many utterances, and the largest difference of a trial's score from the torch score."""

    eer: float
    min_cosine: float
    n_utterances: int
    max_score_diff: float = 0.0


@dataclass
class StagedBundle:
    """A complete, checked bundle in its staging folder ``dir`` (sizes in bytes)."""

    dir: Path
    size_bytes: int  # model.onnx: the deployable file and the size objective
    tensor_bytes: int  # the packed tensors (model.packed.safetensors without its header)
    packed_file_bytes: int  # model.packed.safetensors with its header
    onnx_max_abs_diff: float
    onnx_min_cosine: float
    onnx_eer: float | None
    files: list[str]
    committed: Path | None = None

    def commit(self, out: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
        """Move the bundle to ``out``; an existing ``out`` is replaced only with ``overwrite`` and only if it is
        a bundle written here (:func:`check_out_dir`)."""
        check_out_dir(out, force=overwrite)
        for f in self.dir.iterdir():
            f.chmod(0o755 if f.name == "infer.py" else 0o644)  # temp files are private; a bundle is shared
        self.committed = replace_dir(self.dir, out, overwrite=overwrite)
        return self.committed


# -- where a bundle may go ----------------------------------------------------------------------------------------
def read_marker(folder: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The marker of a bundle folder, or None when ``folder`` is not one."""
    path = Path(folder) / MARKER_NAME
    try:
        marker = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(marker, dict) or marker.get("format") != BUNDLE_FORMAT or not isinstance(marker.get("files"), list):
        return None
    return marker


def check_out_dir(out: str | os.PathLike[str], *, force: bool, protected: Sequence[str | os.PathLike[str]] = ()) -> Path:
    """Refuse a destination that export must not write: nothing is written or deleted before this passes.

    * ``out`` may not be, lie inside, or contain any ``protected`` folder (e.g. the study's), even with
      ``force``;
    * an existing ``out`` is refused without ``force``; with ``force`` it must be a bundle folder this
      module wrote whose marker lists every file in it (so nobody's own files are deleted).

    Raises:
        ConfigError: ``out`` overlaps a protected folder, or exists and is not a replaceable bundle.
        RefuseOverwrite: ``out`` exists and ``force`` is False.
    """
    out = Path(out)
    real = Path(os.path.realpath(out))
    for p in protected:
        guard = Path(os.path.realpath(p))
        if real == guard or guard in real.parents or real in guard.parents:
            relation = "is" if real == guard else ("lies inside" if guard in real.parents else "contains")
            raise ConfigError(f"--out {out} {relation} {p}; export writes a new folder of its own there and "
                              "would replace it (refused even with --force): choose a folder outside it")
    if not (out.exists() or out.is_symlink()):
        return out
    if not force:
        raise RefuseOverwrite(f"{out} exists; pass --force to replace it (only a bundle lsv export wrote)")
    marker = read_marker(out) if out.is_dir() and not out.is_symlink() else None
    if marker is None:
        raise ConfigError(f"{out} exists and is not a bundle written by lsv export (no valid {MARKER_NAME}); "
                          "refusing to replace it, even with --force")
    foreign = sorted({p.name for p in out.iterdir()} - set(marker["files"]) - {MARKER_NAME})
    if foreign:
        raise ConfigError(f"{out} holds files the bundle did not write ({', '.join(foreign[:5])}); refusing to "
                          "replace it, even with --force: move them away first")
    return out


def packed_file_sizes(path: str | os.PathLike[str]) -> tuple[int, int]:
    """``(file bytes, header bytes)`` of a safetensors file: the header is an 8-byte length plus its JSON."""
    path = Path(path)
    total = path.stat().st_size
    with path.open("rb") as f:
        raw = f.read(8)
    if len(raw) != 8:
        raise CheckpointError(f"{path} is too short ({total} bytes) to be a safetensors file")
    (header_len,) = struct.unpack("<Q", raw)
    if header_len > total - 8:
        raise CheckpointError(f"{path}: header length {header_len} exceeds the file ({total} bytes)")
    return total, 8 + header_len


# -- staging -------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def stage_bundle(model: nn.Module, packed_file: str | os.PathLike[str], facts: BundleFacts, *,
                 near: str | os.PathLike[str], float_onnx: bool = False,
                 onnx_check: Callable[[Path], OnnxAgreement] | None = None) -> Iterator[StagedBundle]:
    """Write and check the bundle of ``model`` (loaded from ``packed_file``) in a staging folder beside
    ``near`` (the destination, so that :meth:`StagedBundle.commit` is a rename); see the module docstring.

    ``onnx_check(path)`` runs the written ``model.onnx`` on real data (the caller's trials); its embeddings'
    cosines to the torch ones must be >= :data:`MIN_COSINE` and its trial scores within
    :data:`MAX_SCORE_DIFF` of the torch scores (its EER is reported in the card, not compared).
    ``float_onnx`` also writes ``model.float.onnx``.

    Raises:
        CheckpointError: a written file does not load back to the same model, or disagrees with it.
    """
    near = Path(near)
    near.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{near.name}.", dir=near.parent))
    tmp.chmod(0o755)
    try:
        yield _write(model, Path(packed_file), facts, tmp, float_onnx, onnx_check)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def _probe(model: nn.Module) -> torch.Tensor:
    return torch.randn(2, 200, int(model.arch["kwargs"].get("feat_dim", 80)), generator=torch.Generator().manual_seed(0))


def _copy_packed(model: nn.Module, packed_file: Path, tmp: Path) -> int:
    """The packed copy, loaded back: same recipe, same outputs bit for bit. Returns its file bytes."""
    shutil.copyfile(packed_file, tmp / PACKED_NAME)
    again = load_packed(tmp / PACKED_NAME)
    probe = _probe(model)
    with torch.no_grad():
        if recipe_of(again) != recipe_of(model) or not torch.equal(again(probe), model(probe)):
            raise CheckpointError(f"{tmp / PACKED_NAME}: the copy does not load back to the same model")
    return packed_file_sizes(tmp / PACKED_NAME)[0]


def _write_onnx(model: nn.Module, tmp: Path, accuracy: Accuracy,
                onnx_check: Callable[[Path], OnnxAgreement] | None) -> tuple[int, OnnxCheck]:
    """model.onnx: exactly the predicted bytes, and the torch model's embeddings (random and real input)."""
    from lsv_core.export.inference import onnx_session

    path = save_codebook_onnx(model, tmp / ONNX_NAME)
    size, expected = path.stat().st_size, packed_size_bytes(model)
    if size != expected:
        raise CheckpointError(f"{path}: {size:,} bytes written, the size objective says {expected:,}")
    session = onnx_session(path)
    feat_dim = int(model.arch["kwargs"].get("feat_dim", 80))
    worst_diff, worst_cos = 0.0, 1.0
    for frames in (200, 317):  # two lengths: the frame axis is dynamic
        x = torch.randn(2, frames, feat_dim, generator=torch.Generator().manual_seed(frames))
        with torch.no_grad():
            want = model(x).numpy()
        got = session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0]
        worst_diff = max(worst_diff, float(np.abs(got - want).max()))
        worst_cos = min(worst_cos, _min_cosine(got, want))
    agreement = onnx_check(path) if onnx_check is not None else None
    if agreement is not None:
        worst_cos = min(worst_cos, agreement.min_cosine)
    if not worst_cos >= MIN_COSINE:
        raise CheckpointError(f"{path}: onnxruntime embeddings differ from the torch model's (cosine "
                              f"{worst_cos:.6f} < {MIN_COSINE})")
    if agreement is not None and not agreement.max_score_diff <= MAX_SCORE_DIFF:
        raise CheckpointError(f"{path}: its trial scores differ from the torch model's by up to "
                              f"{agreement.max_score_diff:.3g} (allowed {MAX_SCORE_DIFF:g}, cosine) on "
                              f"{agreement.n_utterances} utterances: onnxruntime does not compute the same network")
    return size, OnnxCheck(max_abs_diff=worst_diff, min_cosine=worst_cos,
                           eer=agreement.eer if agreement is not None else None,
                           n_utterances=agreement.n_utterances if agreement is not None else 0)


def _min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    num = (a.astype(np.float64) * b).sum(axis=1)
    den = np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)
    return float((num / den).min())


def _write_wespeaker(model: nn.Module, tmp: Path) -> nn.Module:
    """The dequantized float network (the reference for the float formats) and its WeSpeaker state dict."""
    plain = dequantized_model(model)
    probe = _probe(model)
    with torch.no_grad():
        gap = float((plain(probe) - model(probe)).abs().max())
    if not gap <= 1e-5:
        raise CheckpointError(f"the dequantized network differs from the packed model by {gap:.3g}")
    save_wespeaker_state_dict(model, tmp / WESPEAKER_FILENAME)
    check_wespeaker_state_dict(tmp / WESPEAKER_FILENAME, plain)
    return plain


def _write(model: nn.Module, packed_file: Path, facts: BundleFacts, tmp: Path, float_onnx: bool,
           onnx_check: Callable[[Path], OnnxAgreement] | None) -> StagedBundle:
    from lsv_core.data.features import FbankConfig
    from lsv_core.export.inference import infer_settings, write_infer_files
    from lsv_core.export.onnx_export import check_onnx, export_onnx

    model = model.eval()
    recipe = recipe_of(model)
    packed_bytes = _copy_packed(model, packed_file, tmp)
    size, check = _write_onnx(model, tmp, facts.accuracy, onnx_check)
    settings = infer_settings(ONNX_NAME, facts.fbank or FbankConfig(), facts.thresholds, facts.evaluated_on)
    write_infer_files(tmp, settings)
    plain = _write_wespeaker(model, tmp)
    float_diff = None
    if float_onnx:
        export_onnx(plain, tmp / FLOAT_ONNX_NAME, metadata={"lsv.arch": json.dumps(model.arch, sort_keys=True),
                                                             "lsv.recipe": recipe.to_json()})
        float_diff = check_onnx(tmp / FLOAT_ONNX_NAME, plain, lengths=(200, 317))

    tensor_bytes = packed_tensor_bytes(model)
    fp32 = packed_size_bytes(model, {})
    avg = average_bits(model, recipe)
    metrics = {**facts.metrics, "size_bytes": size, "tensor_bytes": tensor_bytes, "packed_file_bytes": packed_bytes,
               "fp32_bytes": fp32, "compression_ratio": fp32 / size, "avg_bits": avg,
               "onnx_min_cosine": check.min_cosine, "onnx_eer": check.eer}
    (tmp / "recipe.json").write_text(json.dumps(
        {**json.loads(recipe.to_json()), "provenance": dict(facts.provenance), "metrics": metrics}, indent=2) + "\n")
    slots = graph_template(model).layers
    modules = dict(model.named_modules())
    rows = [LayerRow(name, tuple(latent_weight(modules[name]).shape), recipe[name].token if name in recipe else "fp32",
                     slots[name].name) for name in quantizable_layers(model)]
    files = sorted([p.name for p in tmp.iterdir()] + ["model_card.md"])
    card = ModelCard(
        title=facts.title, arch=model.arch, accuracy=facts.accuracy, size_bytes=size, tensor_bytes=tensor_bytes,
        packed_file_bytes=packed_bytes, fp32_bytes=fp32, avg_bits=avg, layers=rows, provenance=facts.provenance,
        how_found=facts.how_found, files=_file_lines(files), onnx=check, float_onnx_max_abs_diff=float_diff,
        infer=settings,
    )
    (tmp / "model_card.md").write_text(render_model_card(card))
    (tmp / MARKER_NAME).write_text(json.dumps({"format": BUNDLE_FORMAT, "files": files}, indent=2) + "\n")
    return StagedBundle(tmp, size_bytes=size, tensor_bytes=tensor_bytes, packed_file_bytes=packed_bytes,
                        onnx_max_abs_diff=check.max_abs_diff, onnx_min_cosine=check.min_cosine, onnx_eer=check.eer,
                        files=files)


_FILE_LINES = {
    ONNX_NAME: "**the deployable model**: ONNX with bit-packed indices and codebooks, dequantized in the graph "
               "(input `fbank` (batch, frames, bins), dynamic batch and frames; output `embedding`); its bytes "
               "are the size the search minimised",
    "infer.py": "torch-free inference: wav -> embedding, two wavs -> score and decision (see Use)",
    "infer.json": "what infer.py reads: feature settings, input/output names, decision thresholds",
    "requirements.txt": "the four packages infer.py needs",
    PACKED_NAME: "the quantized model for lsv-quant (`load_packed`): fine-tune further, re-export",
    WESPEAKER_FILENAME: "dequantized float state dict in WeSpeaker's key layout (`torch.load`)",
    FLOAT_ONNX_NAME: "the dequantized float network as ONNX (BatchNorm folded), for runtimes that want float weights",
    "recipe.json": "bit widths per layer (`BitRecipe.load` / `lsv quantize --recipe` read it), provenance, metrics",
    "model_card.md": "this card",
}


def _file_lines(files: Sequence[str]) -> dict[str, str]:
    return {name: _FILE_LINES[name] for name in _FILE_LINES if name in files}
