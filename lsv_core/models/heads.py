"""Training-only classification head; mirrors WeSpeaker ``wespeaker/models/projections.py::ArcMarginProduct``.

In WeSpeaker checkpoints the head is attached as ``model.projection``, so its single parameter appears as
``projection.weight`` of shape ``(num_classes, embed_dim)``; :func:`lsv_core.models.load_pretrained`
drops it and :func:`lsv_core.models.save_checkpoint` can store it under the same key via
``extra_tensors=head.state_dict()``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class AAMSoftmax(nn.Module):
    """Additive angular margin softmax head (ArcFace; Deng et al., 2019) as WeSpeaker's ``ArcMarginProduct``.

    ``forward(emb, labels)`` returns logits ``scale * cos(theta_j)`` for non-target classes and
    ``scale * cos(theta_y + margin)`` for the target class; feed them to ``nn.CrossEntropyLoss``.
    ``margin`` is in radians; ``update(margin)`` changes it for WeSpeaker's margin schedule
    (0 -> 0.2 between epochs 20 and 40 in the VoxCeleb ResNet recipe).

    Past ``theta + margin > pi`` the target logit would start to rise again; like WeSpeaker (not the
    original ArcFace ``cos - sin(pi - m) * m``) we use ``cos(theta) - (1 + cos(pi - m))`` there, which is
    continuous at the switch point. ``easy_margin=True`` applies the margin only where ``cos(theta) > 0``.
    """

    def __init__(
        self,
        embed_dim: int,
        num_classes: int,
        margin: float = 0.2,
        scale: float = 32.0,
        easy_margin: bool = False,
    ) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.num_classes = num_classes
        self.scale = scale
        self.easy_margin = easy_margin
        self.weight = nn.Parameter(torch.empty(num_classes, embed_dim))
        nn.init.xavier_uniform_(self.weight)
        self.update(margin)

    def update(self, margin: float) -> None:
        """Set the angular margin (radians); called by the training loop's margin scheduler."""
        self.margin = float(margin)
        self._cos_m = math.cos(self.margin)
        self._sin_m = math.sin(self.margin)
        self._threshold = math.cos(math.pi - self.margin)
        self._fallback_shift = 1.0 + math.cos(math.pi - self.margin)

    def cosine(self, emb: torch.Tensor) -> torch.Tensor:
        """Cosine similarity ``(batch, num_classes)`` between embeddings and class centres."""
        return F.linear(F.normalize(emb), F.normalize(self.weight))

    def forward(self, emb: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Margin logits ``(batch, num_classes)``; with ``labels=None`` plain ``scale * cosine`` (no margin)."""
        cosine = self.cosine(emb)
        if labels is None:
            return cosine * self.scale
        # Clamped: sqrt has an infinite gradient at 0 and rounding can push cos^2 slightly above 1.
        sine = torch.sqrt((1.0 - cosine.pow(2)).clamp(min=1e-9))
        phi = cosine * self._cos_m - sine * self._sin_m
        if self.easy_margin:
            phi = torch.where(cosine > 0, phi, cosine)
        else:
            phi = torch.where(cosine > self._threshold, phi, cosine - self._fallback_shift)
        target = F.one_hot(labels.long().view(-1), self.num_classes).to(dtype=torch.bool)
        return torch.where(target, phi, cosine) * self.scale

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_classes={self.num_classes}, margin={self.margin}, "
            f"scale={self.scale}, easy_margin={self.easy_margin}"
        )
