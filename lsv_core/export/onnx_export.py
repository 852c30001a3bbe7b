"""ONNX export of a speaker-embedding network: fbank ``(batch, frames, feat_dim)`` -> embedding ``(batch, embed_dim)``.

Export the *dequantized* float network (:func:`lsv_core.export.wespeaker.dequantized_model`): tracing a
model with quantizer parametrizations would put the nearest-centroid search into the graph.

Why the TorchScript exporter (``dynamo=False``): the default ``torch.export`` based exporter needs the
``onnxscript`` package, which this project does not depend on, and these networks (convolutions,
BatchNorm, statistics pooling) trace exactly. Both the batch and the frame axis are dynamic;
:func:`check_onnx` runs the file in onnxruntime at two frame counts to prove it.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lsv_core.atomic import atomic_path
from lsv_core.errors import CheckpointError

__all__ = ["INPUT_NAME", "ONNX_OPSET", "OUTPUT_NAME", "check_onnx", "export_onnx"]

INPUT_NAME = "fbank"
OUTPUT_NAME = "embedding"
ONNX_OPSET = 17  # supported by the TorchScript exporter and by onnxruntime since 1.13


def _feat_dim(model: nn.Module) -> int:
    return int(getattr(model, "arch", {}).get("kwargs", {}).get("feat_dim", 80))


@torch.no_grad()
def export_onnx(model: nn.Module, path: str | os.PathLike[str], *, frames: int = 200, opset: int = ONNX_OPSET,
                metadata: Mapping[str, str] | None = None, overwrite: bool = False) -> Path:
    """Write ``model`` (a float network, put in eval mode) as ONNX with dynamic batch and frame axes.

    ``metadata`` goes into the ONNX ``metadata_props`` (e.g. arch, recipe, study provenance). ``frames``
    is only the length of the example used for tracing.
    """
    import onnx

    model = model.eval()
    example = torch.zeros(1, frames, _feat_dim(model))
    with atomic_path(path, overwrite=overwrite) as tmp:
        with warnings.catch_warnings():
            # The TorchScript exporter announces its deprecation on every call (see the module docstring).
            warnings.simplefilter("ignore", category=DeprecationWarning)
            warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
            torch.onnx.export(
                model, (example,), str(tmp), dynamo=False, opset_version=opset,
                input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch", 1: "frames"}, OUTPUT_NAME: {0: "batch"}},
            )
        proto = onnx.load(str(tmp))
        for key, value in (metadata or {}).items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = str(key), str(value)
        onnx.checker.check_model(proto)
        onnx.save(proto, str(tmp))
    return Path(path)


@torch.no_grad()
def check_onnx(path: str | os.PathLike[str], model: nn.Module, *, lengths: Sequence[int] = (200, 317),
               batch: int = 2, atol: float = 1e-4, seed: int = 0) -> float:
    """Run ``path`` in onnxruntime and ``model`` in torch on seeded random fbanks; returns the max abs difference.

    Every length in ``lengths`` (at least two different ones, so the dynamic frame axis is exercised)
    must agree within ``atol``.

    Raises:
        CheckpointError: the outputs differ by more than ``atol`` or have another shape.
    """
    import onnxruntime as ort

    if len(set(lengths)) < 2:
        raise ValueError(f"lengths={list(lengths)!r} should hold at least two different frame counts")
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # two shared cores; and one thread keeps reductions in a fixed order
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(seed)
    worst = 0.0
    model = model.eval()
    for frames in lengths:
        x = torch.randn(batch, int(frames), _feat_dim(model), generator=gen)
        want = model(x).numpy()
        got = session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0]
        if got.shape != want.shape:
            raise CheckpointError(f"{path}: ONNX output shape {got.shape} != torch {want.shape} at {frames} frames")
        diff = float(np.abs(got - want).max())
        worst = max(worst, diff)
        if not diff <= atol:
            raise CheckpointError(f"{path}: onnxruntime differs from torch by {diff:.3g} at {frames} frames "
                                  f"(allowed {atol:g})")
    return worst
