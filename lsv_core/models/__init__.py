"""Speaker-embedding networks with WeSpeaker's state-dict layout (``wespeaker/models/``).

Import from here: ``build_model``, ``available_models``, ``is_wespeaker_model``, ``load_pretrained``, ``save_checkpoint``,
``load_checkpoint``, ``AAMSoftmax``. Every model maps fbank ``(batch, frames, feat_dim)`` to one
scoring embedding ``(batch, embed_dim)`` (WeSpeaker's ``outputs[-1]``) and carries ``model.arch``.
"""

from lsv_core.models.campplus import CAMPPlus
from lsv_core.models.checkpoint import load_checkpoint, load_state_strict, save_checkpoint
from lsv_core.models.dfresnet import GeminiDFResNet
from lsv_core.models.ecapa_tdnn import ECAPATDNN
from lsv_core.models.embedder import SpeakerEmbedder
from lsv_core.models.heads import AAMSoftmax
from lsv_core.models.pooling import POOLING_FUNCS
from lsv_core.models.pretrained import load_pretrained, read_wespeaker_state_dict
from lsv_core.models.registry import available_models, build_model, is_wespeaker_model
from lsv_core.models.resnet import ResNet

__all__ = [
    "POOLING_FUNCS",
    "AAMSoftmax",
    "CAMPPlus",
    "ECAPATDNN",
    "GeminiDFResNet",
    "ResNet",
    "SpeakerEmbedder",
    "available_models",
    "build_model",
    "is_wespeaker_model",
    "load_checkpoint",
    "load_pretrained",
    "load_state_strict",
    "read_wespeaker_state_dict",
    "save_checkpoint",
]
