"""Our baseline checkpoint format: a safetensors file whose tensors are the WeSpeaker-layout state dict.

Tensor names are exactly the model's state-dict keys (``conv1.weight``, ``layer1.0.bn1.running_mean``,
``seg_1.bias``, ...), so the file reads like a WeSpeaker ``avg_model.pt``; the optional training head
goes under ``projection.*`` as in WeSpeaker. The safetensors header metadata holds one JSON string under
:data:`HEADER_KEY`::

    {"format_version": 1, "arch": {"name": "ResNet34", "kwargs": {...}}, "metadata": {...caller's...}}

which is enough to rebuild the network with ``build_model`` without knowing the architecture up front.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from lsv_core.atomic import atomic_path
from lsv_core.errors import CheckpointError, ConfigError
from lsv_core.models.registry import build_model

HEADER_KEY = "lsv_checkpoint"
FORMAT_VERSION = 1
HEAD_PREFIX = "projection."  # WeSpeaker's attribute name for the training head
EXTRA_TENSORS_KEY = "extra_tensors"
_MAX_LISTED = 20


def load_state_strict(
    model: nn.Module, state: Mapping[str, torch.Tensor], source: str | os.PathLike[str]
) -> None:
    """``model.load_state_dict(state, strict=True)`` with one CheckpointError listing every mismatch.

    The message names ``source`` and lists missing keys, unexpected keys and shape mismatches
    (``key: checkpoint shape vs model shape``) in our error type instead of torch's RuntimeError.
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in state and tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or mismatched:
        parts = [f"{source} does not match the {_arch_name(model)} architecture:"]
        listed = (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches", mismatched),
        )
        for label, items in listed:
            if items:
                shown = ", ".join(items[:_MAX_LISTED])
                more = f", ... ({len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else ""
                parts.append(f"  {label} ({len(items)}): {shown}{more}")
        raise CheckpointError("\n".join(parts))
    model.load_state_dict(state, strict=True)


def _arch_name(model: nn.Module) -> str:
    arch = getattr(model, "arch", None)
    if isinstance(arch, dict):
        return f"{arch.get('name')} {arch.get('kwargs')}"
    return type(model).__name__


def _storable(t: torch.Tensor) -> torch.Tensor:
    # safetensors refuses tensors that share storage and needs contiguous data; a detached contiguous
    # clone per tensor costs one state dict of memory and removes both problems.
    return t.detach().to("cpu").contiguous().clone()


def save_checkpoint(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    metadata: dict[str, Any] | None = None,
    extra_tensors: Mapping[str, torch.Tensor] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``model``'s state dict and ``model.arch`` (+ ``metadata``) to a safetensors file; return its path.

    ``metadata`` must be JSON-serialisable (e.g. epoch, EER in percent, data manifest). ``extra_tensors``
    (typically ``AAMSoftmax.state_dict()``) are stored as ``projection.<key>`` so training can resume the
    head; they never reach the model on load. The write is atomic and refuses to replace an existing
    file (``lsv_core.atomic.RefuseOverwrite``) unless ``overwrite=True``.
    """
    arch = getattr(model, "arch", None)
    if not isinstance(arch, dict) or "name" not in arch or "kwargs" not in arch:
        raise ConfigError(
            "model.arch is missing; build the model with lsv_core.models.build_model so it can be rebuilt"
        )
    metadata = dict(metadata or {})
    if EXTRA_TENSORS_KEY in metadata:
        raise ConfigError(f"metadata key {EXTRA_TENSORS_KEY!r} is reserved; pass tensors via extra_tensors=")
    try:
        header = json.dumps({"format_version": FORMAT_VERSION, "arch": arch, "metadata": metadata})
    except (TypeError, ValueError) as err:
        raise ConfigError(f"metadata={metadata!r} is not JSON-serialisable: {err}") from err

    tensors = {k: _storable(v) for k, v in model.state_dict().items()}
    clash = [k for k in tensors if k.startswith(HEAD_PREFIX)]
    if clash:
        raise ConfigError(
            f"model state dict already uses the {HEAD_PREFIX!r} prefix reserved for the head: {clash}"
        )
    for key, value in (extra_tensors or {}).items():
        tensors[HEAD_PREFIX + key] = _storable(value)

    with atomic_path(path, overwrite=overwrite) as tmp:
        save_file(tensors, str(tmp), metadata={HEADER_KEY: header})
    return Path(path)


def load_checkpoint(
    path: str | os.PathLike[str], device: str | torch.device = "cpu", *, with_extra: bool = False
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild and load a model written by :func:`save_checkpoint`; returns ``(model, metadata)``.

    The model comes back in eval mode on ``device``; ``metadata`` is the caller's dict as saved. With
    ``with_extra=True`` it also holds ``"extra_tensors"``: the ``projection.*`` tensors with the prefix
    removed (ready for ``AAMSoftmax.load_state_dict``). Raises CheckpointError for a missing, corrupt or
    non-lsv file and for any key/shape mismatch.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            header_meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # safetensors raises its own error types (and OSError) for bad files
        raise CheckpointError(f"cannot read checkpoint {path} as safetensors: {err}") from err
    if HEADER_KEY not in header_meta:
        raise CheckpointError(
            f"{path} has no {HEADER_KEY!r} header: not written by save_checkpoint "
            "(for a WeSpeaker avg_model.pt use lsv_core.models.load_pretrained)"
        )
    try:
        header = json.loads(header_meta[HEADER_KEY])
        version = header["format_version"]
        arch = header["arch"]
        metadata = dict(header.get("metadata") or {})
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{path}: malformed {HEADER_KEY!r} header: {err}") from err
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version={version!r}; this code reads {FORMAT_VERSION}")
    try:
        model = build_model(arch["name"], **arch["kwargs"])
    except (ConfigError, KeyError, TypeError) as err:
        raise CheckpointError(f"{path}: cannot rebuild architecture {arch!r}: {err}") from err

    head = {k[len(HEAD_PREFIX) :]: v for k, v in state.items() if k.startswith(HEAD_PREFIX)}
    backbone = {k: v for k, v in state.items() if not k.startswith(HEAD_PREFIX)}
    load_state_strict(model, backbone, path)
    model.to(device).eval()
    if with_extra:
        metadata[EXTRA_TENSORS_KEY] = {k: v.to(device) for k, v in head.items()}
    return model, metadata
