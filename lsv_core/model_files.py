"""One entry point for every model file a user may hand us: our baseline checkpoints, packed quantized
models, and WeSpeaker ``avg_model.pt`` state dicts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from safetensors import safe_open
from torch import nn

from lsv_core.errors import CheckpointError
from lsv_core.models import load_checkpoint, load_pretrained
from lsv_core.models.checkpoint import HEADER_KEY


def load_model_file(path: str | Path, name: str | None = None, **kwargs: Any) -> nn.Module:
    """Load ``path`` in eval mode on the CPU, whatever its kind.

    ``name``/``kwargs`` are the architecture for WeSpeaker ``.pt`` files (which do not record it);
    safetensors files written by this project carry their architecture in the header.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"model file {path} does not exist")
    if path.suffix in (".pt", ".pth", ".tar"):
        if name is None:
            raise CheckpointError(f"{path} is a WeSpeaker state dict: give its architecture (--arch, e.g. ResNet34)")
        model = load_pretrained(path, name, **kwargs)
        return model.eval()
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
    except Exception as exc:
        raise CheckpointError(f"cannot read {path} as safetensors: {exc}") from exc
    if HEADER_KEY in meta:
        return load_checkpoint(path)[0].eval()
    from lsv_core.export.packed import load_packed

    return load_packed(path).eval()
