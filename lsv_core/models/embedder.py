"""Shared segment-level tail of WeSpeaker's ResNet and Gemini DF-ResNet: ``pool``, ``seg_1``, ``seg_bn_1``, ``seg_2``.

Both WeSpeaker files (``resnet.py``, ``gemini_dfresnet.py``) end the same way: statistics pooling, a
linear ``seg_1`` to ``embed_dim`` and, with ``two_emb_layer=True``, ReLU -> ``seg_bn_1`` (BatchNorm1d
without affine, so only running stats in the state dict) -> ``seg_2``. Without the second layer
``seg_bn_1``/``seg_2`` are ``nn.Identity`` and contribute no keys.

WeSpeaker's ``forward`` returns a pair ``(embed_a, embed_b)`` (``(tensor(0.0), embed_a)`` without the
second layer) and its training and extraction scripts take ``outputs[-1]``. Our ``forward`` returns that
one tensor directly: ``seg_1``'s output without a second layer, ``seg_2``'s output with one.
:meth:`SpeakerEmbedder.embeddings` gives both.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lsv_core.models.pooling import StatsPooling, build_pooling


class SpeakerEmbedder(nn.Module):
    """Base class of every network ``build_model`` returns: fbank ``(B, T, F)`` -> embedding ``(B, embed_dim)``.

    ``arch`` is set by :func:`lsv_core.models.build_model`: ``{"name": ..., "kwargs": {...}}`` such that
    ``build_model(arch["name"], **arch["kwargs"])`` rebuilds the same architecture.
    """

    arch: dict[str, Any]
    pool: StatsPooling
    embed_dim: int
    two_emb_layer: bool

    def _add_segment_layers(
        self, pooling_func: str, pool_in_dim: int, embed_dim: int, two_emb_layer: bool
    ) -> None:
        # Called last in __init__ so the state-dict key order matches WeSpeaker's (pool, seg_1, seg_bn_1, seg_2).
        self.embed_dim = embed_dim
        self.two_emb_layer = two_emb_layer
        self.pool = build_pooling(pooling_func, pool_in_dim)
        self.pool_out_dim = self.pool.out_dim
        self.seg_1 = nn.Linear(self.pool_out_dim, embed_dim)
        if two_emb_layer:
            self.seg_bn_1: nn.Module = nn.BatchNorm1d(embed_dim, affine=False)
            self.seg_2: nn.Module = nn.Linear(embed_dim, embed_dim)
        else:
            self.seg_bn_1 = nn.Identity()
            self.seg_2 = nn.Identity()

    def frame_level_features(self, x: torch.Tensor) -> torch.Tensor:
        """Last feature map ``(B, C, F', T')`` for fbank input ``(B, T, F)``."""
        raise NotImplementedError

    def embeddings(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(embed_a, embed_b)`` as WeSpeaker computes them; ``embed_b`` is None without ``two_emb_layer``."""
        embed_a = self.seg_1(self.pool(self.frame_level_features(x)))
        if not self.two_emb_layer:
            return embed_a, None
        return embed_a, self.seg_2(self.seg_bn_1(F.relu(embed_a)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Scoring embedding ``(B, embed_dim)``: WeSpeaker's ``outputs[-1]`` (see module docstring)."""
        embed_a, embed_b = self.embeddings(x)
        return embed_a if embed_b is None else embed_b


def fbank_to_image(x: torch.Tensor) -> torch.Tensor:
    """``(B, T, F)`` fbank -> ``(B, 1, F, T)``: WeSpeaker's 2-D nets convolve frequency x time, time last."""
    if x.dim() != 3:
        raise ValueError(f"expected fbank features (batch, frames, feat_dim), got shape {tuple(x.shape)}")
    # Out-of-place (WeSpeaker uses unsqueeze_ on a view): never touch the caller's tensor.
    return x.permute(0, 2, 1).unsqueeze(1)
