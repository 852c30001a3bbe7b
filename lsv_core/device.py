"""Run-time device choice: CUDA when present, else CPU; users can force either."""

from __future__ import annotations

import torch

from lsv_core.errors import ConfigError


def pick_device(name: str = "auto") -> torch.device:
    """``"auto"`` -> ``cuda`` if available else ``cpu``; ``"cpu"``, ``"cuda"``, ``"cuda:N"`` are taken as is."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu" or name.startswith("cuda"):
        if name.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"device={name!r} requested but CUDA is not available; allowed here: 'cpu', 'auto'")
        return torch.device(name)
    raise ConfigError(f"device={name!r} is not valid; allowed: 'auto', 'cpu', 'cuda', 'cuda:N'")
