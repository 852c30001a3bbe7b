"""A deployable bundle of one quantized model: the files a user ships, written and checked as one unit.

:func:`stage_bundle` writes, into a staging folder beside the destination:

* ``model.packed.safetensors``: a copy of the given packed file, loaded back and compared (same recipe,
  same outputs bit for bit);
* ``wespeaker_avg_model.pt``: the dequantized state dict in WeSpeaker's layout (strict load checked);
* ``model.onnx``: the dequantized float network (onnxruntime vs torch within 1e-4 at two lengths);
* ``recipe.json``: the recipe (``BitRecipe.load`` reads it) plus the caller's provenance and metrics;
* ``model_card.md``.

It knows nothing of studies: the caller states what it knows in :class:`BundleFacts`. The staged
bundle is moved into place by :meth:`StagedBundle.commit` (one rename; an existing folder is replaced
only when asked); leaving the ``with`` block without committing removes it. Between the two, the caller
can do what must succeed before the bundle appears (e.g. register it in a model registry).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lsv_core.atomic import replace_dir
from lsv_core.errors import CheckpointError
from lsv_core.export.card import LayerRow, ModelCard, render_model_card
from lsv_core.export.onnx_export import check_onnx, export_onnx
from lsv_core.export.packed import load_packed
from lsv_core.export.wespeaker import (
    WESPEAKER_FILENAME,
    check_wespeaker_state_dict,
    dequantized_model,
    save_wespeaker_state_dict,
)
from lsv_core.quant import average_bits, latent_weight, packed_size_bytes, quantizable_layers, recipe_of

__all__ = ["PACKED_NAME", "Accuracy", "BundleFacts", "StagedBundle", "packed_file_sizes", "stage_bundle"]

PACKED_NAME = "model.packed.safetensors"


@dataclass(frozen=True)
class Accuracy:
    """The model's scores as the card states them: ``eer*`` as recorded, ``reeval_*`` as re-measured by the
    caller before exporting (EER in percent), accepted within ``eer_tolerance`` points."""

    eer: float
    eer_ci_low: float | None
    eer_ci_high: float | None
    min_dcf_001: float | None
    reeval_eer: float
    reeval_min_dcf_001: float
    eer_tolerance: float
    n_eval_trials: int


@dataclass(frozen=True)
class BundleFacts:
    """What the caller knows about the model: a title, its accuracy, the fp32 size it is compared with,
    provenance (shown in the card, stored in ``recipe.json`` and the ONNX metadata), a few lines on how
    it was found and extra metrics for ``recipe.json``."""

    title: str
    accuracy: Accuracy
    fp32_bytes: int
    provenance: Mapping[str, Any] = field(default_factory=dict)
    how_found: Sequence[str] = ()
    metrics: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class StagedBundle:
    """A complete, checked bundle in its staging folder ``dir``."""

    dir: Path
    file_bytes: int  # the packed file, header included
    size_bytes: int  # its tensors (the size objective)
    onnx_max_abs_diff: float
    committed: Path | None = None

    def commit(self, out: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
        """Move the bundle to ``out`` (replacing an existing folder only with ``overwrite``)."""
        for f in self.dir.iterdir():
            f.chmod(0o644)  # atomic writes create private temp files; the bundle is meant to be shared
        self.committed = replace_dir(self.dir, out, overwrite=overwrite)
        return self.committed


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


@contextlib.contextmanager
def stage_bundle(model: nn.Module, packed_file: str | os.PathLike[str], facts: BundleFacts, *,
                 near: str | os.PathLike[str]) -> Iterator[StagedBundle]:
    """Write and check the bundle of ``model`` (loaded from ``packed_file``) in a staging folder beside
    ``near`` (the destination, so that :meth:`StagedBundle.commit` is a rename); see the module docstring.

    Raises:
        CheckpointError: a written file does not load back to the same model.
    """
    near = Path(near)
    near.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{near.name}.", dir=near.parent))
    tmp.chmod(0o755)
    try:
        yield _write(model, Path(packed_file), facts, tmp)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def _write(model: nn.Module, packed_file: Path, facts: BundleFacts, tmp: Path) -> StagedBundle:
    recipe = recipe_of(model)
    file_bytes, _ = packed_file_sizes(packed_file)
    # 1. packed copy, checked by loading it back: same recipe, same outputs bit for bit.
    shutil.copyfile(packed_file, tmp / PACKED_NAME)
    again = load_packed(tmp / PACKED_NAME)
    probe = torch.randn(2, 200, int(model.arch["kwargs"].get("feat_dim", 80)),
                        generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(probe)
        if recipe_of(again) != recipe or not torch.equal(again(probe), want):
            raise CheckpointError(f"{tmp / PACKED_NAME}: the copy does not load back to the same model")
    # 2. the float network with the dequantized weights: the reference for the other formats.
    plain = dequantized_model(model)
    with torch.no_grad():
        gap = float((plain(probe) - want).abs().max())
    if not gap <= 1e-5:
        raise CheckpointError(f"the dequantized network differs from the packed model by {gap:.3g}")
    save_wespeaker_state_dict(model, tmp / WESPEAKER_FILENAME)
    check_wespeaker_state_dict(tmp / WESPEAKER_FILENAME, plain)
    # 3. ONNX of the float network, run in onnxruntime at two lengths.
    provenance = dict(facts.provenance)
    onnx_meta = {"lsv.arch": json.dumps(model.arch, sort_keys=True), "lsv.recipe": recipe.to_json(),
                 **{f"lsv.{k}": str(v) for k, v in provenance.items() if v is not None}}
    export_onnx(plain, tmp / "model.onnx", metadata=onnx_meta)
    onnx_diff = check_onnx(tmp / "model.onnx", plain, lengths=(200, 317))

    size = packed_size_bytes(model)
    avg = average_bits(model, recipe)
    metrics = {**facts.metrics, "size_bytes": size, "file_bytes": file_bytes, "avg_bits": avg}
    (tmp / "recipe.json").write_text(json.dumps(
        {**json.loads(recipe.to_json()), "provenance": provenance, "metrics": metrics}, indent=2) + "\n")
    modules = dict(model.named_modules())
    rows = [LayerRow(name, tuple(latent_weight(modules[name]).shape), recipe[name].token if name in recipe else "fp32")
            for name in quantizable_layers(model)]
    acc = facts.accuracy
    card = ModelCard(
        title=facts.title, arch=model.arch, eer=acc.eer, eer_ci_low=acc.eer_ci_low, eer_ci_high=acc.eer_ci_high,
        min_dcf_001=acc.min_dcf_001, reeval_eer=acc.reeval_eer, reeval_min_dcf_001=acc.reeval_min_dcf_001,
        eer_tolerance=acc.eer_tolerance, n_eval_trials=acc.n_eval_trials, size_bytes=size, file_bytes=file_bytes,
        fp32_bytes=facts.fp32_bytes, avg_bits=avg, layers=rows, provenance=provenance, how_found=facts.how_found,
        files={
            "recipe.json": "bit widths per layer (`BitRecipe.load` / `lsv quantize --recipe` read it), "
                           "provenance, metrics",
            PACKED_NAME: "the packed model: bit-packed codebook indices + codebooks (`load_packed`)",
            WESPEAKER_FILENAME: "dequantized float state dict in WeSpeaker's key layout (`torch.load`)",
            "model.onnx": "the dequantized float network; input `fbank` (batch, frames, 80), dynamic "
                          "batch and frames; output `embedding`",
            "model_card.md": "this card",
        },
        onnx_max_abs_diff=onnx_diff,
    )
    (tmp / "model_card.md").write_text(render_model_card(card))
    return StagedBundle(tmp, file_bytes=file_bytes, size_bytes=size, onnx_max_abs_diff=onnx_diff)
