"""WeSpeaker's CAM++ (Wang et al., Interspeech 2023); mirrors ``wespeaker/models/campplus.py`` key for key.

A 2-D front-end (FCM: a small ResNet over frequency x time that halves frequency three times and keeps
time) whose map is flattened to ``32 * (feat_dim // 8)`` channels, then a densely connected TDNN: a
stride-2 TDNN layer, three dense blocks of 12, 24 and 16 CAM layers (each adds ``growth_rate`` channels
to the running concatenation; its conv is gated by a context-aware mask from utterance and 100-frame
segment means), a transit layer after each block (halves the channels), statistics pooling and a
1x1 "dense" conv to the embedding with a BatchNorm without affine parameters.

Nonlinearities follow ``config_str`` (WeSpeaker's ``get_nonlinear``: ``-``-joined ``batchnorm``,
``batchnorm_`` (no affine), ``relu``, ``prelu``; default ``batchnorm-relu``). Dense and transit layers
are pre-activation (BatchNorm before the conv), so only the FCM convs and the first TDNN layer have a
BatchNorm right after them.

State-dict keys (identical to WeSpeaker checkpoints)::

    head.conv1.weight (32, 1, 3, 3), head.bn1.*, head.layer{1,2}.{0,1}.conv{1,2}.weight, .bn{1,2}.*,
    head.layer{1,2}.0.shortcut.{0,1}.*, head.conv2.weight, head.bn2.*
    xvector.tdnn.linear.weight, xvector.tdnn.nonlinear.batchnorm.*
    xvector.block{1-3}.tdnnd{i}.nonlinear1.batchnorm.*, .linear1.weight, .nonlinear2.batchnorm.*,
        .cam_layer.linear_local.weight, .cam_layer.linear{1,2}.{weight,bias}
    xvector.transit{1-3}.nonlinear.batchnorm.*, .linear.weight
    xvector.out_nonlinear.batchnorm.*, xvector.dense.linear.weight, xvector.dense.nonlinear.batchnorm.*

The pooling layer has no parameters with TSTP (WeSpeaker's CAM++ recipe); it sits at ``xvector.stats``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lsv_core.models.embedder import SpeakerEmbedder
from lsv_core.models.pooling import build_pooling

# (layers, kernel size, dilation) of the three dense blocks, as in WeSpeaker and 3D-Speaker.
DENSE_BLOCKS: tuple[tuple[int, int, int], ...] = ((12, 3, 1), (24, 3, 2), (16, 3, 2))
FCM_CHANNELS = 32
SEGMENT_FRAMES = 100  # CAM's segment pooling length
NONLINEARITIES = ("batchnorm", "batchnorm_", "relu", "prelu")


def nonlinear(config_str: str, channels: int) -> nn.Sequential:
    """WeSpeaker's ``get_nonlinear``: modules named ``batchnorm``, ``relu``, ``prelu`` in the order given."""
    out = nn.Sequential()
    for name in config_str.split("-"):
        if name == "relu":
            out.add_module("relu", nn.ReLU())
        elif name == "prelu":
            out.add_module("prelu", nn.PReLU(channels))
        elif name in ("batchnorm", "batchnorm_"):
            out.add_module("batchnorm", nn.BatchNorm1d(channels, affine=name == "batchnorm"))
        else:
            raise ValueError(f"config_str={config_str!r}: {name!r} is not one of {list(NONLINEARITIES)}")
    return out


class TDNNLayer(nn.Module):
    """Conv1d (``linear``, no bias) then the nonlinearity; "same" padding for odd kernels."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, dilation: int = 1,
                 config_str: str = "batchnorm-relu") -> None:
        super().__init__()
        padding = (kernel_size - 1) // 2 * dilation
        self.linear = nn.Conv1d(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                                dilation=dilation, bias=False)
        self.nonlinear = nonlinear(config_str, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.nonlinear(self.linear(x))


class CAMLayer(nn.Module):
    """Context-aware masking: ``linear_local(x)`` gated by a sigmoid of utterance mean + segment means."""

    def __init__(self, bn_channels: int, out_channels: int, kernel_size: int, padding: int, dilation: int,
                 reduction: int = 2) -> None:
        super().__init__()
        self.linear_local = nn.Conv1d(bn_channels, out_channels, kernel_size, padding=padding, dilation=dilation,
                                      bias=False)
        self.linear1 = nn.Conv1d(bn_channels, bn_channels // reduction, 1)
        self.linear2 = nn.Conv1d(bn_channels // reduction, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        context = x.mean(-1, keepdim=True) + self.segment_means(x)
        mask = torch.sigmoid(self.linear2(F.relu(self.linear1(context))))
        return self.linear_local(x) * mask

    @staticmethod
    def segment_means(x: torch.Tensor, seg_len: int = SEGMENT_FRAMES) -> torch.Tensor:
        """Each frame's mean over its 100-frame segment (the last segment may be shorter), shape of ``x``."""
        seg = F.avg_pool1d(x, kernel_size=seg_len, stride=seg_len, ceil_mode=True)
        b, c, n = seg.shape
        return seg.unsqueeze(-1).expand(b, c, n, seg_len).reshape(b, c, -1)[..., : x.shape[-1]]


class CAMDenseTDNNLayer(nn.Module):
    """Pre-activation bottleneck (BN-ReLU, 1x1 conv to ``bn_channels``, BN-ReLU) then a CAM layer."""

    def __init__(self, in_channels: int, out_channels: int, bn_channels: int, kernel_size: int, dilation: int = 1,
                 config_str: str = "batchnorm-relu") -> None:
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size={kernel_size} should be odd (same padding)")
        self.nonlinear1 = nonlinear(config_str, in_channels)
        self.linear1 = nn.Conv1d(in_channels, bn_channels, 1, bias=False)
        self.nonlinear2 = nonlinear(config_str, bn_channels)
        self.cam_layer = CAMLayer(bn_channels, out_channels, kernel_size, (kernel_size - 1) // 2 * dilation,
                                  dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cam_layer(self.nonlinear2(self.linear1(self.nonlinear1(x))))


class CAMDenseTDNNBlock(nn.ModuleList):
    """``num_layers`` dense layers (``tdnnd1``, ...), each reading the concatenation of all before it."""

    def __init__(self, num_layers: int, in_channels: int, out_channels: int, bn_channels: int, kernel_size: int,
                 dilation: int = 1, config_str: str = "batchnorm-relu") -> None:
        super().__init__()
        for i in range(num_layers):
            self.add_module(f"tdnnd{i + 1}", CAMDenseTDNNLayer(in_channels + i * out_channels, out_channels,
                                                               bn_channels, kernel_size, dilation, config_str))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self:
            x = torch.cat((x, layer(x)), dim=1)
        return x


class TransitLayer(nn.Module):
    """Pre-activation 1x1 conv that halves the channels after a dense block."""

    def __init__(self, in_channels: int, out_channels: int, config_str: str = "batchnorm-relu") -> None:
        super().__init__()
        self.nonlinear = nonlinear(config_str, in_channels)
        self.linear = nn.Conv1d(in_channels, out_channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.nonlinear(x))


class DenseLayer(nn.Module):
    """The embedding layer: a 1x1 conv on the pooled vector (as ``(B, D, 1)``), then the nonlinearity."""

    def __init__(self, in_channels: int, out_channels: int, config_str: str = "batchnorm_") -> None:
        super().__init__()
        self.linear = nn.Conv1d(in_channels, out_channels, 1, bias=False)
        self.nonlinear = nonlinear(config_str, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            return self.nonlinear(self.linear(x.unsqueeze(-1)).squeeze(-1))
        return self.nonlinear(self.linear(x))


class BasicResBlock(nn.Module):
    """ResNet basic block whose stride applies to frequency only (time resolution is kept)."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=(stride, 1), padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=(stride, 1), bias=False),
                                          nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))  # out of place: BN folding may make bn2 an Identity


class FCM(nn.Module):
    """The 2-D front-end: ``(B, F, T)`` -> ``(B, m_channels * F / 8, T)``."""

    def __init__(self, num_blocks: Sequence[int] = (2, 2), m_channels: int = FCM_CHANNELS, feat_dim: int = 80) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, m_channels, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(m_channels)
        self.layer1 = nn.Sequential(*(BasicResBlock(m_channels, m_channels, 2 if i == 0 else 1)
                                      for i in range(num_blocks[0])))
        self.layer2 = nn.Sequential(*(BasicResBlock(m_channels, m_channels, 2 if i == 0 else 1)
                                      for i in range(num_blocks[1])))
        self.conv2 = nn.Conv2d(m_channels, m_channels, 3, stride=(2, 1), padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(m_channels)
        self.out_channels = m_channels * (feat_dim // 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x.unsqueeze(1))))
        out = F.relu(self.bn2(self.conv2(self.layer2(self.layer1(out)))))
        b, c, f, t = out.shape
        return out.reshape(b, c * f, t)


class CAMPPlus(SpeakerEmbedder):
    """WeSpeaker ``CAMPPlus(feat_dim, embed_dim, pooling_func, growth_rate, bn_size, init_channels, config_str)``."""

    def __init__(self, feat_dim: int = 80, embed_dim: int = 512, pooling_func: str = "TSTP", growth_rate: int = 32,
                 bn_size: int = 4, init_channels: int = 128, config_str: str = "batchnorm-relu") -> None:
        super().__init__()
        if feat_dim % 8:
            raise ValueError(f"feat_dim={feat_dim} should be a multiple of 8 (FCM halves frequency three times)")
        self.feat_dim = feat_dim
        self.embed_dim = embed_dim
        self.two_emb_layer = False
        self.head = FCM(feat_dim=feat_dim)
        self.xvector = nn.Sequential()
        self.xvector.add_module("tdnn", TDNNLayer(self.head.out_channels, init_channels, 5, stride=2,
                                                  config_str=config_str))
        channels = init_channels
        for i, (num_layers, kernel_size, dilation) in enumerate(DENSE_BLOCKS):
            self.xvector.add_module(f"block{i + 1}", CAMDenseTDNNBlock(
                num_layers, channels, growth_rate, bn_size * growth_rate, kernel_size, dilation, config_str))
            channels += num_layers * growth_rate
            self.xvector.add_module(f"transit{i + 1}", TransitLayer(channels, channels // 2, config_str))
            channels //= 2
        self.xvector.add_module("out_nonlinear", nonlinear(config_str, channels))
        self.pool = build_pooling(pooling_func, channels)
        self.pool_out_dim = self.pool.out_dim
        self.xvector.add_module("stats", self.pool)
        self.xvector.add_module("dense", DenseLayer(self.pool_out_dim, embed_dim, config_str="batchnorm_"))
        for m in self.modules():  # WeSpeaker's initialisation (matters for training from scratch only)
            if isinstance(m, nn.Conv1d | nn.Linear):
                nn.init.kaiming_normal_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def frame_level_features(self, x: torch.Tensor) -> torch.Tensor:
        """The map ``(B, C, T/2)`` that statistics pooling reads."""
        if x.dim() != 3:
            raise ValueError(f"expected fbank features (batch, frames, feat_dim), got shape {tuple(x.shape)}")
        out = self.head(x.permute(0, 2, 1))
        for layer in list(self.xvector)[:-2]:
            out = layer(out)
        return out

    def embeddings(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.xvector.dense(self.pool(self.frame_level_features(x))), None
