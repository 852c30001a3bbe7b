"""WeSpeaker's ResNet speaker-embedding networks; mirrors ``wespeaker/models/resnet.py`` key for key.

Differences from the image ResNet (He et al., 2016), as in WeSpeaker: 3x3 stem with stride 1, no
max-pooling, ``m_channels=32`` base width, input is a 1-channel ``(freq, time)`` fbank image. Stages 2-4
halve both frequency and time, so the pooled statistics have ``int(feat_dim / 8) * m_channels * 8 *
expansion`` features per frame (2560 for ResNet34 at 80 mel bins; TSTP doubles it to ``seg_1``'s 5120).

State-dict keys (identical to WeSpeaker checkpoints)::

    conv1.weight                      (m, 1, 3, 3)
    bn1.{weight,bias,running_mean,running_var,num_batches_tracked}
    layer{1-4}.{i}.conv{1,2[,3]}.weight, layer{1-4}.{i}.bn{1,2[,3]}.*
    layer{2-4}.0.shortcut.0.weight    1x1 projection conv, shortcut.1.* its BatchNorm
    pool.*                            only for ASTP
    seg_1.{weight,bias}
    seg_bn_1.{running_mean,running_var,num_batches_tracked}, seg_2.{weight,bias}   with two_emb_layer

The factories take WeSpeaker's arguments ``(feat_dim, embed_dim, pooling_func, two_emb_layer)``; use
:func:`lsv_core.models.build_model` to get a model with ``arch`` recorded.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lsv_core.models.embedder import SpeakerEmbedder, fbank_to_image


def _projection_shortcut(in_planes: int, out_planes: int, stride: int) -> nn.Sequential:
    """Empty (identity) unless the shape changes; WeSpeaker keys the conv/BN as ``shortcut.0``/``shortcut.1``."""
    if stride == 1 and in_planes == out_planes:
        return nn.Sequential()
    return nn.Sequential(
        nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False),
        nn.BatchNorm2d(out_planes),
    )


class BasicBlock(nn.Module):
    """Two 3x3 convs (stride on the first) plus shortcut; ResNet18/34 and ThinResNet."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _projection_shortcut(in_planes, self.expansion * planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        # Out-of-place add (WeSpeaker uses +=): after BN folding bn2 is an Identity and an in-place add
        # would overwrite conv2's output, which quantization hooks may hold on to.
        return F.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (stride) -> 1x1 with 4x expansion; ResNet50 and deeper."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, self.expansion * planes, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(self.expansion * planes)
        self.shortcut = _projection_shortcut(in_planes, self.expansion * planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


class ResNet(SpeakerEmbedder):
    """WeSpeaker ``ResNet(block, num_blocks, m_channels, feat_dim, embed_dim, pooling_func, two_emb_layer)``."""

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        num_blocks: Sequence[int],
        m_channels: int = 32,
        feat_dim: int = 40,
        embed_dim: int = 128,
        pooling_func: str = "TSTP",
        two_emb_layer: bool = False,
        first_stride: int = 1,
    ) -> None:
        super().__init__()
        if len(num_blocks) != 4:
            raise ValueError(f"num_blocks={list(num_blocks)} should have 4 entries (one per stage)")
        self.feat_dim = feat_dim
        # WeSpeaker's layer1 keeps full resolution (stride 1); the CPU ThinResNet may halve it there,
        # which quarters the cost of every layer and leaves the state-dict key names unchanged.
        self.stats_dim = int(feat_dim / (8 * first_stride)) * m_channels * 8
        self.conv1 = nn.Conv2d(1, m_channels, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(m_channels)
        in_planes = m_channels
        stages = []
        for stage, (width_mult, stride) in enumerate(zip((1, 2, 4, 8), (first_stride, 2, 2, 2), strict=True)):
            blocks = []
            for i in range(num_blocks[stage]):
                blocks.append(block(in_planes, m_channels * width_mult, stride if i == 0 else 1))
                in_planes = m_channels * width_mult * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self._add_segment_layers(pooling_func, self.stats_dim * block.expansion, embed_dim, two_emb_layer)

    def frame_level_features(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(fbank_to_image(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(out))))


# WeSpeaker's factory depths; BasicBlock up to 34 layers, Bottleneck beyond.
RESNET_DEPTHS: dict[str, tuple[type[BasicBlock] | type[Bottleneck], tuple[int, int, int, int]]] = {
    "ResNet18": (BasicBlock, (2, 2, 2, 2)),
    "ResNet34": (BasicBlock, (3, 4, 6, 3)),
    "ResNet50": (Bottleneck, (3, 4, 6, 3)),
    "ResNet101": (Bottleneck, (3, 4, 23, 3)),
    "ResNet152": (Bottleneck, (3, 8, 36, 3)),
    "ResNet221": (Bottleneck, (6, 16, 48, 3)),
    "ResNet293": (Bottleneck, (10, 20, 64, 3)),
}


def wespeaker_resnet(
    name: str, feat_dim: int, embed_dim: int, pooling_func: str = "TSTP", two_emb_layer: bool = False
) -> ResNet:
    """WeSpeaker factory ``ResNet18/34/50/101/152/221/293(feat_dim, embed_dim, pooling_func, two_emb_layer)``."""
    block, num_blocks = RESNET_DEPTHS[name]
    return ResNet(
        block,
        num_blocks,
        m_channels=32,
        feat_dim=feat_dim,
        embed_dim=embed_dim,
        pooling_func=pooling_func,
        two_emb_layer=two_emb_layer,
    )


def thin_resnet(
    m_channels: int = 8,
    num_blocks: Sequence[int] = (1, 1, 1, 1),
    feat_dim: int = 80,
    embed_dim: int = 128,
    pooling_func: str = "TSTP",
    two_emb_layer: bool = False,
    first_stride: int = 1,
) -> ResNet:
    """CPU-sized WeSpeaker ResNet with BasicBlocks: same module names, so quantization treats it like ResNet34."""
    return ResNet(
        BasicBlock,
        num_blocks,
        m_channels=m_channels,
        feat_dim=feat_dim,
        embed_dim=embed_dim,
        pooling_func=pooling_func,
        two_emb_layer=two_emb_layer,
        first_stride=first_stride,
    )
