"""A model plugin: a small TDNN speaker network that the project quantizes, sizes and exports like its own.

Use it (from the repository root, so that ``docs`` is importable)::

    PYTHONPATH=docs lsv quantize --factory plugin_example:tiny_tdnn --arch-kwargs '{"feat_dim": 80}' \\
        --model my_tdnn.pt --corpus data/corpus --bits 4 --out tdnn4.packed.safetensors

or, in a study, ``[model] factory = "plugin_example:tiny_tdnn"`` with ``checkpoint = "my_tdnn.pt"``. The
checkpoint is a plain ``torch.save(model.state_dict())`` (plus the AAM head under ``projection.*`` for
fine-tuning), as WeSpeaker's ``avg_model.pt``. docs/plugins.md says what a factory must do.
"""

from __future__ import annotations

import torch
from torch import nn


class TinyTDNN(nn.Module):
    """Three dilated TDNN layers (Conv1d -> BatchNorm -> ReLU), mean+std pooling, LayerNorm, embedding Linear."""

    def __init__(self, feat_dim: int, channels: int, embed_dim: int) -> None:
        super().__init__()
        layers = []
        in_channels = feat_dim
        for kernel, dilation in ((5, 1), (3, 2), (3, 3)):
            layers += [nn.Conv1d(in_channels, channels, kernel, dilation=dilation, padding=dilation * (kernel // 2)),
                       nn.BatchNorm1d(channels), nn.ReLU()]
            in_channels = channels
        self.frames = nn.Sequential(*layers)
        self.norm = nn.LayerNorm(2 * channels)
        self.embedding = nn.Linear(2 * channels, embed_dim)

    def forward(self, fbank: torch.Tensor) -> torch.Tensor:
        """fbank ``(batch, frames, feat_dim)`` -> embeddings ``(batch, embed_dim)``."""
        x = self.frames(fbank.transpose(1, 2))
        stats = torch.cat((x.mean(dim=2), x.std(dim=2)), dim=1)
        return self.embedding(self.norm(stats))


def tiny_tdnn(feat_dim: int = 80, channels: int = 64, embed_dim: int = 64) -> TinyTDNN:
    """The factory: takes ``feat_dim`` (required by the plugin contract) and JSON-valued arguments."""
    return TinyTDNN(feat_dim, channels, embed_dim)
