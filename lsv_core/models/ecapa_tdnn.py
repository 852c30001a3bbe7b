"""WeSpeaker's ECAPA-TDNN (Desplanques et al., Interspeech 2020); mirrors ``wespeaker/models/ecapa_tdnn.py`` key for key.

A 1-D network over time with the mel bins as channels: a kernel-5 TDNN stem, three SE-Res2Blocks
(dilations 2, 3, 4; Res2Net scale 8), multi-layer feature aggregation (the three blocks' outputs
concatenated, a 1x1 conv to ``mfa_channels`` = 1536 in WeSpeaker), attentive statistics pooling,
BatchNorm and the embedding Linear. As in WeSpeaker, every conv unit is ``conv -> ReLU -> BatchNorm``
(so the BatchNorm cannot be folded into the conv: a ReLU stands between them).

State-dict keys (identical to WeSpeaker checkpoints)::

    layer1.conv.{weight,bias}           (channels, feat_dim, 5), layer1.bn.*
    layer{2-4}.se_res2block.0.conv.*    1x1 conv in, .0.bn.*
    layer{2-4}.se_res2block.1.convs.{0-6}.*, .1.bns.{0-6}.*   the Res2Net branch convs (k3, dilated)
    layer{2-4}.se_res2block.2.conv.*    1x1 conv out, .2.bn.*
    layer{2-4}.se_res2block.3.linear{1,2}.*   squeeze-excitation Linears (bottleneck 128)
    conv.{weight,bias}                  (mfa_channels, 3 * channels, 1)
    pool.linear{1,2}.*                  ASTP attention (3 * mfa_channels inputs with global context)
    bn.*, linear.{weight,bias}, [bn2.*  with emb_bn]

``ECAPA_TDNN_c512`` / ``_c1024`` have ``channels`` 512 / 1024, the ``GLOB`` variants use global context in
the attention. Their forward returns WeSpeaker's ``outputs[-1]`` (the embedding) only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lsv_core.models.embedder import SpeakerEmbedder
from lsv_core.models.pooling import ASTP, POOLING_FUNCS, StatsPooling

# WeSpeaker fixes the aggregation width at 512 * 3 whatever the block width.
MFA_CHANNELS = 1536
RES2_SCALE = 8
SE_BOTTLENECK = 128


class Conv1dReluBn(nn.Module):
    """``bn(relu(conv(x)))``: WeSpeaker's TDNN unit (keys ``conv.*``, ``bn.*``)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, padding: int = 0,
                 dilation: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv1d(in_channels, out_channels, kernel_size, padding=padding, dilation=dilation)
        self.bn = nn.BatchNorm1d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(F.relu(self.conv(x)))


class Res2Conv1dReluBn(nn.Module):
    """Res2Net over channels: ``scale`` groups, each but the last convolved after adding the previous
    group's output (a growing receptive field within one layer); the last group passes through."""

    def __init__(self, channels: int, kernel_size: int, padding: int, dilation: int, scale: int = RES2_SCALE) -> None:
        super().__init__()
        if channels % scale:
            raise ValueError(f"channels={channels} should be a multiple of the Res2Net scale {scale}")
        self.width = channels // scale
        self.nums = scale if scale == 1 else scale - 1
        self.convs = nn.ModuleList(
            nn.Conv1d(self.width, self.width, kernel_size, padding=padding, dilation=dilation)
            for _ in range(self.nums)
        )
        self.bns = nn.ModuleList(nn.BatchNorm1d(self.width) for _ in range(self.nums))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        groups = torch.split(x, self.width, dim=1)
        out = []
        sp = groups[0]
        for i, (conv, bn) in enumerate(zip(self.convs, self.bns, strict=True)):
            if i >= 1:
                sp = sp + groups[i]
            sp = bn(F.relu(conv(sp)))
            out.append(sp)
        if self.nums != len(groups):
            out.append(groups[self.nums])
        return torch.cat(out, dim=1)


class SEConnect(nn.Module):
    """Squeeze-excitation over time: channel gates from the time-averaged input (``linear1``, ``linear2``)."""

    def __init__(self, channels: int, bottleneck: int = SE_BOTTLENECK) -> None:
        super().__init__()
        self.linear1 = nn.Linear(channels, bottleneck)
        self.linear2 = nn.Linear(bottleneck, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = torch.sigmoid(self.linear2(F.relu(self.linear1(x.mean(dim=2)))))
        return x * gate.unsqueeze(2)


class SERes2Block(nn.Module):
    """1x1 conv, Res2Net conv, 1x1 conv, SE, plus the identity; WeSpeaker keys them ``se_res2block.{0-3}``."""

    def __init__(self, channels: int, kernel_size: int, padding: int, dilation: int) -> None:
        super().__init__()
        self.se_res2block = nn.Sequential(
            Conv1dReluBn(channels, channels),
            Res2Conv1dReluBn(channels, kernel_size, padding, dilation),
            Conv1dReluBn(channels, channels),
            SEConnect(channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.se_res2block(x)


class ECAPATDNN(SpeakerEmbedder):
    """WeSpeaker ``ECAPA_TDNN(channels, feat_dim, embed_dim, pooling_func, global_context_att, emb_bn)``.

    ``mfa_channels`` is WeSpeaker's fixed ``512 * 3``; smaller values give CPU-sized variants (not
    loadable from WeSpeaker checkpoints unless 1536).
    """

    def __init__(self, channels: int = 512, feat_dim: int = 80, embed_dim: int = 192, pooling_func: str = "ASTP",
                 global_context_att: bool = False, emb_bn: bool = False, mfa_channels: int = MFA_CHANNELS) -> None:
        super().__init__()
        self.feat_dim = feat_dim
        self.embed_dim = embed_dim
        self.two_emb_layer = False
        self.layer1 = Conv1dReluBn(feat_dim, channels, kernel_size=5, padding=2)
        self.layer2 = SERes2Block(channels, kernel_size=3, padding=2, dilation=2)
        self.layer3 = SERes2Block(channels, kernel_size=3, padding=3, dilation=3)
        self.layer4 = SERes2Block(channels, kernel_size=3, padding=4, dilation=4)
        self.conv = nn.Conv1d(3 * channels, mfa_channels, kernel_size=1)
        self.pool = _pooling(pooling_func, mfa_channels, global_context_att)
        self.pool_out_dim = self.pool.out_dim
        self.bn = nn.BatchNorm1d(self.pool_out_dim)
        self.linear = nn.Linear(self.pool_out_dim, embed_dim)
        self.emb_bn = emb_bn
        self.bn2: nn.Module = nn.BatchNorm1d(embed_dim) if emb_bn else nn.Identity()

    def frame_level_features(self, x: torch.Tensor) -> torch.Tensor:
        """The aggregated map ``(B, mfa_channels, T)`` before the ReLU that precedes pooling."""
        if x.dim() != 3:
            raise ValueError(f"expected fbank features (batch, frames, feat_dim), got shape {tuple(x.shape)}")
        out1 = self.layer1(x.permute(0, 2, 1))
        out2 = self.layer2(out1)
        out3 = self.layer3(out2)
        out4 = self.layer4(out3)
        return self.conv(torch.cat((out2, out3, out4), dim=1))

    def embeddings(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        out = self.linear(self.bn(self.pool(F.relu(self.frame_level_features(x)))))
        return self.bn2(out), None


def _pooling(pooling_func: str, in_dim: int, global_context_att: bool) -> StatsPooling:
    if pooling_func not in POOLING_FUNCS:
        raise ValueError(f"pooling_func={pooling_func!r}; allowed: {sorted(POOLING_FUNCS)}")
    if pooling_func == "ASTP":
        return ASTP(in_dim, global_context_att=global_context_att)
    return POOLING_FUNCS[pooling_func](in_dim)  # WeSpeaker's other poolings ignore global_context_att


# WeSpeaker's factory names: (channels, global context attention).
ECAPA_VARIANTS: dict[str, tuple[int, bool]] = {
    "ECAPA_TDNN_c512": (512, False),
    "ECAPA_TDNN_c1024": (1024, False),
    "ECAPA_TDNN_GLOB_c512": (512, True),
    "ECAPA_TDNN_GLOB_c1024": (1024, True),
}


def wespeaker_ecapa_tdnn(name: str, feat_dim: int, embed_dim: int, pooling_func: str = "ASTP",
                         emb_bn: bool = False) -> ECAPATDNN:
    """WeSpeaker factory ``ECAPA_TDNN[_GLOB]_c512/c1024(feat_dim, embed_dim, pooling_func, emb_bn)``."""
    channels, global_context_att = ECAPA_VARIANTS[name]
    return ECAPATDNN(channels, feat_dim, embed_dim, pooling_func, global_context_att, emb_bn)
