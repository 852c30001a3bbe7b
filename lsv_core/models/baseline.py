"""A float baseline as fine-tuning needs it: the embedding network, its AAM head and what is known of it.

:func:`read_baseline` reads either kind of checkpoint a user hands us: ours (``lsv train`` writes the
head under ``projection.*`` and the training-time evaluation in the header) or a WeSpeaker
``avg_model.pt`` (give its architecture; its ``projection.*`` head is WeSpeaker's). A :class:`Baseline`
travels as plain tensors (:meth:`Baseline.weights`, :meth:`Baseline.from_weights`): that is how a study
hands it to Ray workers through the object store, so no worker needs the checkpoint file.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lsv_core.errors import CheckpointError
from lsv_core.models.checkpoint import load_checkpoint, load_state_strict
from lsv_core.models.pretrained import read_wespeaker_state_dict
from lsv_core.models.registry import build_model

__all__ = ["Baseline", "BaselineWeights", "read_baseline"]

WESPEAKER_SUFFIXES = (".pt", ".pth")


@dataclass(frozen=True)
class BaselineWeights:
    """A baseline as plain CPU tensors: ``arch`` (``{"name", "kwargs"}``), the network's and the head's state."""

    arch: Mapping[str, Any]
    backbone: Mapping[str, torch.Tensor]
    head: Mapping[str, torch.Tensor]
    meta: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class Baseline:
    """The embedding network (eval mode, CPU), its AAM head's state (empty if the checkpoint has none) and the
    checkpoint's metadata (``meta["eval"]``: the evaluation ``lsv train`` stored, if any)."""

    model: nn.Module
    head: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def has_head(self) -> bool:
        return "weight" in self.head

    def weights(self) -> BaselineWeights:
        return BaselineWeights(dict(self.model.arch), {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
                               {k: v.detach().cpu() for k, v in self.head.items()}, dict(self.meta))

    @classmethod
    def from_weights(cls, weights: BaselineWeights) -> Baseline:
        model = build_model(weights.arch["name"], **dict(weights.arch.get("kwargs", {})))
        load_state_strict(model, weights.backbone, f"baseline {weights.arch['name']}")
        return cls(model.eval(), dict(weights.head), dict(weights.meta))


def read_baseline(checkpoint: str | os.PathLike[str], arch: str | None = None,
                  arch_kwargs: Mapping[str, Any] | None = None) -> Baseline:
    """Read our checkpoint (``.safetensors``) or a WeSpeaker state dict (``.pt``/``.pth``, with ``arch``)."""
    path = Path(checkpoint)
    if path.suffix in WESPEAKER_SUFFIXES:
        if arch is None:
            raise CheckpointError(f"{path} is a WeSpeaker state dict: give its architecture (model.arch / --arch, "
                                  "e.g. ResNet34)")
        backbone, head = read_wespeaker_state_dict(path)
        model = build_model(arch, **dict(arch_kwargs or {}))
        load_state_strict(model, backbone, str(path))
        return Baseline(model.eval(), dict(head), {})
    model, meta = load_checkpoint(path, with_extra=True)
    head = dict(meta.pop("extra_tensors", None) or {})
    return Baseline(model.eval(), head, meta)
