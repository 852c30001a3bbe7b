"""Load WeSpeaker-trained weights: ``exp/<run>/models/avg_model.pt`` or a published ``avg_model.pt``.

WeSpeaker's ``average_model.py`` saves a plain state dict with ``torch.save``: the backbone keys
(``conv1.weight``, ..., ``seg_1.bias``) plus the training head ``projection.*`` (e.g.
``projection.weight`` of shape ``(num_speakers, embed_dim)`` for ArcMarginProduct). Checkpoints saved
from a DistributedDataParallel wrapper may carry a ``module.`` prefix on every key.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from lsv_core.errors import CheckpointError
from lsv_core.models.checkpoint import HEAD_PREFIX, load_state_strict
from lsv_core.models.embedder import SpeakerEmbedder
from lsv_core.models.registry import build_model

_DDP_PREFIX = "module."


def read_wespeaker_state_dict(
    path: str | os.PathLike[str],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Read a WeSpeaker ``.pt`` state dict; returns ``(backbone, head)``.

    ``backbone`` has the network's keys with any ``module.`` prefix stripped; ``head`` holds the
    ``projection.*`` tensors with that prefix removed. Always ``torch.load(..., weights_only=True)``: a
    checkpoint is data and must not be able to run code on load.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"WeSpeaker checkpoint {path} does not exist")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle/zip errors of several types; all mean "not a readable state dict"
        raise CheckpointError(f"cannot read {path} as a torch state dict (weights_only=True): {err}") from err
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} holds a {type(raw).__name__}, expected a state dict (str -> Tensor)")
    non_tensor = [k for k, v in raw.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if non_tensor:
        raise CheckpointError(f"{path} is not a plain state dict; non-tensor entries: {non_tensor[:10]}")

    backbone: dict[str, torch.Tensor] = {}
    head: dict[str, torch.Tensor] = {}
    for key, value in raw.items():
        key = key.removeprefix(_DDP_PREFIX)
        if key.startswith(HEAD_PREFIX):
            head[key[len(HEAD_PREFIX) :]] = value
        else:
            backbone[key] = value
    return backbone, head


def load_pretrained(path: str | os.PathLike[str], name: str, **kwargs: Any) -> SpeakerEmbedder:
    """Build ``name`` with ``kwargs`` (see :func:`build_model`) and load a WeSpeaker ``avg_model.pt`` strictly.

    The ``projection.*`` head is dropped; every other key must match the architecture exactly, else
    CheckpointError lists the missing keys, unexpected keys and shape mismatches. The model is returned
    in eval mode (BatchNorm uses running statistics), ready to extract embeddings.

    Example: WeSpeaker's VoxCeleb ResNet34 is ``load_pretrained(p, "ResNet34", feat_dim=80, embed_dim=256)``.
    """
    model = build_model(name, **kwargs)
    backbone, _head = read_wespeaker_state_dict(path)
    load_state_strict(model, backbone, path)
    return model.eval()
