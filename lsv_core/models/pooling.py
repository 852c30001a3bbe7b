"""Temporal pooling layers; mirrors WeSpeaker ``wespeaker/models/pooling_layers.py`` (TAP, TSDP, TSTP, ASTP).

State-dict keys match WeSpeaker under the model's ``pool.`` prefix: TAP/TSDP/TSTP have no parameters,
ASTP has ``pool.linear1.{weight,bias}`` (Conv1d, kernel 1) and ``pool.linear2.{weight,bias}``.
Inputs are ``(batch, channels, freq, time)`` (ResNet feature maps) or ``(batch, dim, time)``; time is
always the last axis and the statistics are flattened channel-major, as in WeSpeaker, so a pretrained
``seg_1`` weight lines up with our statistics vector.
"""

from __future__ import annotations

import torch
from torch import nn

# WeSpeaker's current pooling_layers.py uses 1e-7 (older releases used 1e-8/1e-10); the difference only
# matters for constant feature maps, where it sets the floor of the std statistic.
STD_EPS = 1e-7


class StatsPooling(nn.Module):
    """Base class: ``in_dim`` is the flattened per-frame feature size; ``out_dim`` the pooled size."""

    def __init__(self, in_dim: int) -> None:
        super().__init__()
        self.in_dim = in_dim

    @property
    def out_dim(self) -> int:
        raise NotImplementedError

    def get_out_dim(self) -> int:
        """WeSpeaker's name for :attr:`out_dim`."""
        return self.out_dim


def _frames_last(x: torch.Tensor) -> torch.Tensor:
    """(B, C, F, T) -> (B, C*F, T); (B, D, T) unchanged."""
    if x.dim() == 4:
        return x.reshape(x.shape[0], x.shape[1] * x.shape[2], x.shape[3])
    if x.dim() != 3:
        raise ValueError(f"pooling expects a 3-D or 4-D tensor with time last, got shape {tuple(x.shape)}")
    return x


def _std(x: torch.Tensor) -> torch.Tensor:
    # Unbiased variance (torch default), as WeSpeaker; needs >= 2 frames after the network's downsampling.
    return torch.sqrt(torch.var(x, dim=-1) + STD_EPS)


class TAP(StatsPooling):
    """Temporal average pooling (mean only)."""

    @property
    def out_dim(self) -> int:
        return self.in_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _frames_last(x).mean(dim=-1)


class TSDP(StatsPooling):
    """Temporal standard-deviation pooling (std only)."""

    @property
    def out_dim(self) -> int:
        return self.in_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _std(_frames_last(x))


class TSTP(StatsPooling):
    """Temporal statistics pooling (x-vector): ``[mean, std]`` concatenated, ``out_dim = 2 * in_dim``."""

    @property
    def out_dim(self) -> int:
        return 2 * self.in_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _frames_last(x)
        return torch.cat((x.mean(dim=-1), _std(x)), dim=1)


class ASTP(StatsPooling):
    """Attentive statistics pooling (ECAPA-TDNN style), WeSpeaker ``ASTP`` with its defaults.

    ``linear1``/``linear2`` are 1x1 Conv1d layers so the attention runs on ``(B, D, T)`` without a
    transpose; the keys (``pool.linear1.weight`` of shape ``(bottleneck_dim, in_dim, 1)``) match WeSpeaker.
    """

    def __init__(self, in_dim: int, bottleneck_dim: int = 128, global_context_att: bool = False) -> None:
        super().__init__(in_dim)
        self.global_context_att = global_context_att
        att_in = 3 * in_dim if global_context_att else in_dim
        self.linear1 = nn.Conv1d(att_in, bottleneck_dim, kernel_size=1)
        self.linear2 = nn.Conv1d(bottleneck_dim, in_dim, kernel_size=1)

    @property
    def out_dim(self) -> int:
        return 2 * self.in_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _frames_last(x)
        if self.global_context_att:
            context_mean = x.mean(dim=-1, keepdim=True).expand_as(x)
            context_std = torch.sqrt(torch.var(x, dim=-1, keepdim=True) + STD_EPS).expand_as(x)
            x_in = torch.cat((x, context_mean, context_std), dim=1)
        else:
            x_in = x
        # tanh, not ReLU: WeSpeaker notes ReLU here converges poorly.
        alpha = torch.softmax(self.linear2(torch.tanh(self.linear1(x_in))), dim=2)
        mean = torch.sum(alpha * x, dim=2)
        var = torch.sum(alpha * x.pow(2), dim=2) - mean.pow(2)
        return torch.cat((mean, torch.sqrt(var.clamp(min=STD_EPS))), dim=1)


POOLING_FUNCS: dict[str, type[StatsPooling]] = {"TAP": TAP, "TSDP": TSDP, "TSTP": TSTP, "ASTP": ASTP}


def build_pooling(pooling_func: str, in_dim: int) -> StatsPooling:
    """Pooling layer by WeSpeaker name (``pooling_func`` in :data:`POOLING_FUNCS`)."""
    try:
        cls = POOLING_FUNCS[pooling_func]
    except KeyError:
        raise ValueError(f"pooling_func={pooling_func!r}; allowed: {sorted(POOLING_FUNCS)}") from None
    return cls(in_dim)
