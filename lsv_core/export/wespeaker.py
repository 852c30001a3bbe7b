"""A quantized model as a plain float network in WeSpeaker's layout, and as WeSpeaker's ``avg_model.pt``.

WeSpeaker's ``average_model.py`` writes a plain ``{key: tensor}`` dict with ``torch.save``; its
extraction scripts build the network from the YAML conf and load that dict. Our quantized layers hold
their weight as a parametrization (latent weight + codebook); :func:`dequantized_model` replaces each
by its dequantized value in a freshly built network, so every other tool (WeSpeaker, ONNX, plain
PyTorch) sees an ordinary float model whose weights take only the codebook's values.

The training head (``projection.*``) is not exported: the file is for embedding extraction, and
WeSpeaker's loader (``load_checkpoint(..., strict=False)``) and ours (:func:`lsv_core.models.load_pretrained`)
both accept it without one.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from lsv_core.atomic import atomic_path
from lsv_core.errors import CheckpointError, ConfigError

__all__ = ["WESPEAKER_FILENAME", "check_wespeaker_state_dict", "dequantized_model", "not_wespeaker_reason",
           "save_wespeaker_state_dict"]

WESPEAKER_FILENAME = "wespeaker_avg_model.pt"  # WeSpeaker calls its averaged checkpoint avg_model.pt


def _arch_of(model: nn.Module) -> dict:
    arch = getattr(model, "arch", None)
    if not isinstance(arch, dict) or "name" not in arch:
        raise ConfigError("model has no .arch {'name', 'kwargs'}; build it with lsv_core.models.build_model")
    return arch


def not_wespeaker_reason(model: nn.Module) -> str | None:
    """Why ``model`` has no WeSpeaker ``avg_model.pt`` (None when its architecture is one of WeSpeaker's models,
    :func:`lsv_core.models.is_wespeaker_model`): a state dict in WeSpeaker's key layout is of use only with a
    WeSpeaker class that builds the same network."""
    from lsv_core.models import is_wespeaker_model

    arch = _arch_of(model)
    name = arch["name"]
    if is_wespeaker_model(name, arch.get("kwargs")):
        return None
    return (f"{name} is not an architecture WeSpeaker has (its models: ResNet18-293, Gemini DF-ResNet, ...; "
            "or not with these arguments, e.g. ThinResNet's first_stride=2 or an ECAPA_TDNN with mfa_channels other than "
            "1536), so no WeSpeaker class would load its state "
            "dict; use model.onnx, or model.packed.safetensors with lsv-quant")


def dequantized_model(model: nn.Module) -> nn.Module:
    """A new float network of ``model``'s architecture holding its dequantized weights, in eval mode, on CPU.

    Loaded with ``strict=True``: a key the fresh network lacks (or misses) is an error, not a silent skip.
    """
    from lsv_core.models import build_model
    from lsv_core.quant import dequantized_state_dict

    arch = _arch_of(model)
    plain = build_model(arch["name"], **arch.get("kwargs", {}))
    state = {k: v.detach().to("cpu") for k, v in dequantized_state_dict(model).items()}
    plain.load_state_dict(state, strict=True)
    return plain.eval()


def save_wespeaker_state_dict(model: nn.Module, path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """``torch.save`` the dequantized state dict of ``model`` as a plain dict (WeSpeaker's ``avg_model.pt``).

    Raises:
        ConfigError: the architecture is not one of WeSpeaker's (:func:`not_wespeaker_reason`).
    """
    from lsv_core.quant import dequantized_state_dict

    why = not_wespeaker_reason(model)
    if why is not None:
        raise ConfigError(f"no WeSpeaker state dict: {why}")
    # Contiguous CPU clones: torch.save would otherwise keep views into larger storages (bigger files).
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in dequantized_state_dict(model).items()}
    with atomic_path(path, overwrite=overwrite) as tmp:
        torch.save(state, tmp)
    return Path(path)


@torch.no_grad()
def check_wespeaker_state_dict(path: str | os.PathLike[str], reference: nn.Module, *,
                               frames: int = 200, atol: float = 1e-5) -> None:
    """Check that ``path`` loads strictly and computes what ``reference`` (a model of the same arch) does.

    Two loaders are checked: ``build_model(arch).load_state_dict(torch.load(path, weights_only=True),
    strict=True)`` (what WeSpeaker-style code does) and :func:`lsv_core.models.load_pretrained`. Both must give embeddings
    within ``atol`` of ``reference``'s on a seeded random fbank of ``frames`` frames.

    Raises:
        CheckpointError: a loader fails or the embeddings differ.
    """
    from lsv_core.models import build_model, load_pretrained

    arch = _arch_of(reference)
    path = Path(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    plain = build_model(arch["name"], **arch.get("kwargs", {}))
    try:
        plain.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"{path} does not load strictly into {arch['name']}: {err}") from None
    ours = load_pretrained(path, arch["name"], **arch.get("kwargs", {}))
    feat_dim = int(arch.get("kwargs", {}).get("feat_dim", 80))
    x = torch.randn(2, frames, feat_dim, generator=torch.Generator().manual_seed(0))
    want = reference.eval()(x)
    for name, model in (("strict load_state_dict", plain.eval()), ("load_pretrained", ours)):
        diff = float((model(x) - want).abs().max())
        if not diff <= atol:
            raise CheckpointError(f"{path} via {name}: embeddings differ from the exported model by {diff:.3g} "
                                  f"(allowed {atol:g})")
