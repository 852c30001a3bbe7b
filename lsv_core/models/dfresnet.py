"""WeSpeaker's Gemini DF-ResNet; mirrors ``wespeaker/models/gemini_dfresnet.py`` key for key.

DF-ResNet (Liu et al., Interspeech 2022) is a depth-first ResNet of inverted bottlenecks (1x1 expand x4,
3x3 depthwise, 1x1 project) with separate strided downsampling convs between stages. "Gemini"
(Liu et al., "Golden Gemini is All You Need", arXiv:2312.03620) keeps temporal resolution: frequency
stride 2 at every downsampling layer, time stride only at the second (WeSpeaker's T14c strategy:
``stride_f = [2, 2, 2, 2]``, ``stride_t = [1, 2, 1, 1]``). Pooled statistics therefore have
``int(feat_dim / 16) * dims[-1]`` features per frame (1280 at 80 mel bins; TSTP gives seg_1 2560 inputs).

State-dict keys (identical to WeSpeaker checkpoints)::

    downsample_layers.0.0.weight      (32, 1, 3, 3) stem conv, downsample_layers.0.1.* its BatchNorm
    downsample_layers.{1-4}.0.weight  strided 3x3 conv, downsample_layers.{1-4}.1.* BatchNorm
    stages.{0-3}.{i}.conv{1,2,3}.weight, stages.{0-3}.{i}.bn{1,2,3}.*
    pool.*, seg_1.*, [seg_bn_1.*, seg_2.*]   as in resnet.py
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lsv_core.models.embedder import SpeakerEmbedder, fbank_to_image

# Golden Gemini T14c: (frequency, time) strides of downsample_layers[1..4].
GEMINI_STRIDES: tuple[tuple[int, int], ...] = ((2, 1), (2, 2), (2, 1), (2, 1))


class InvertedBottleneck(nn.Module):
    """WeSpeaker ``Inverted_Bottleneck(dim)``: 1x1 (dim -> 4 dim), depthwise 3x3, 1x1 (4 dim -> dim), identity skip."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        hidden = 4 * dim
        self.conv1 = nn.Conv2d(dim, hidden, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(hidden)
        self.conv2 = nn.Conv2d(hidden, hidden, kernel_size=3, padding=1, groups=hidden, bias=False)
        self.bn2 = nn.BatchNorm2d(hidden)
        self.conv3 = nn.Conv2d(hidden, dim, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        # Out-of-place for the same reason as resnet.BasicBlock (BN may be folded away).
        return F.relu(out + x)


class GeminiDFResNet(SpeakerEmbedder):
    """WeSpeaker ``Gemini_DF_ResNet(depths, dims, feat_dim, embed_dim, pooling_func, two_emb_layer)``."""

    def __init__(
        self,
        depths: Sequence[int],
        dims: Sequence[int],
        feat_dim: int = 40,
        embed_dim: int = 128,
        pooling_func: str = "TSTP",
        two_emb_layer: bool = False,
    ) -> None:
        super().__init__()
        if len(depths) != 4 or len(dims) != 5:
            raise ValueError(f"depths={list(depths)} needs 4 entries and dims={list(dims)} 5")
        self.feat_dim = feat_dim
        self.stats_dim = int(feat_dim / 8 / 2) * dims[-1]
        self.downsample_layers = nn.ModuleList()
        self.downsample_layers.append(
            nn.Sequential(
                nn.Conv2d(1, dims[0], kernel_size=3, stride=1, padding=1, bias=False),
                nn.BatchNorm2d(dims[0]),
                nn.ReLU(),
            )
        )
        for i, stride in enumerate(GEMINI_STRIDES):
            # No activation after the downsampling BN: the following inverted bottleneck starts with 1x1 conv.
            self.downsample_layers.append(
                nn.Sequential(
                    nn.Conv2d(dims[i], dims[i + 1], kernel_size=3, stride=stride, padding=1, bias=False),
                    nn.BatchNorm2d(dims[i + 1]),
                )
            )
        self.stages = nn.ModuleList(
            nn.Sequential(*(InvertedBottleneck(dims[i + 1]) for _ in range(depths[i]))) for i in range(4)
        )
        self._add_segment_layers(pooling_func, self.stats_dim, embed_dim, two_emb_layer)

    def frame_level_features(self, x: torch.Tensor) -> torch.Tensor:
        out = self.downsample_layers[0](fbank_to_image(x))
        for downsample, stage in zip(self.downsample_layers[1:], self.stages, strict=True):
            out = stage(downsample(out))
        return out


# WeSpeaker's factories; the layer count includes the separate downsampling layers.
GEMINI_DEPTHS: dict[str, tuple[int, int, int, int]] = {
    "Gemini_DF_ResNet60": (3, 3, 9, 3),
    "Gemini_DF_ResNet114": (3, 3, 27, 3),
    "Gemini_DF_ResNet183": (3, 8, 45, 3),
    "Gemini_DF_ResNet237": (3, 8, 63, 3),
}
GEMINI_DIMS: tuple[int, int, int, int, int] = (32, 32, 64, 128, 256)


def wespeaker_gemini_dfresnet(
    name: str, feat_dim: int, embed_dim: int, pooling_func: str = "TSTP", two_emb_layer: bool = False
) -> GeminiDFResNet:
    """WeSpeaker factory ``Gemini_DF_ResNet60/114/183/237(feat_dim, embed_dim, pooling_func, two_emb_layer)``."""
    return GeminiDFResNet(
        GEMINI_DEPTHS[name],
        GEMINI_DIMS,
        feat_dim=feat_dim,
        embed_dim=embed_dim,
        pooling_func=pooling_func,
        two_emb_layer=two_emb_layer,
    )
