"""Model registry: WeSpeaker model names (``model:`` in its YAML confs) -> networks with validated kwargs.

``build_model("ResNet34", feat_dim=80, embed_dim=256)`` is WeSpeaker's
``get_speaker_model("ResNet34")(feat_dim=80, embed_dim=256)`` with the same state-dict layout, plus a
recorded ``model.arch`` so checkpoints can rebuild the network.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lsv_core.errors import ConfigError
from lsv_core.models.dfresnet import GEMINI_DEPTHS, wespeaker_gemini_dfresnet
from lsv_core.models.embedder import SpeakerEmbedder
from lsv_core.models.pooling import POOLING_FUNCS
from lsv_core.models.resnet import RESNET_DEPTHS, thin_resnet, wespeaker_resnet

# WeSpeaker's factories have no defaults for feat_dim/embed_dim; these are its VoxCeleb v2 recipe values
# (conf/resnet.yaml, conf/gemini_dfresnet_adam.yaml: 80 mel bins, 256-d, TSTP, one embedding layer),
# which are also the settings of its published pretrained ResNet34 / Gemini DF-ResNet checkpoints.
WESPEAKER_DEFAULTS: dict[str, Any] = {
    "feat_dim": 80,
    "embed_dim": 256,
    "pooling_func": "TSTP",
    "two_emb_layer": False,
}
THIN_RESNET_DEFAULTS: dict[str, Any] = {
    "m_channels": 8,
    "num_blocks": [1, 1, 1, 1],
    "feat_dim": 80,
    "embed_dim": 128,
    "pooling_func": "TSTP",
    "two_emb_layer": False,
    "first_stride": 1,
}


@dataclass(frozen=True)
class ModelSpec:
    """How to build one registered name: a factory taking exactly the keys of ``defaults``. ``wespeaker``: the
    name is one of WeSpeaker's own models (``get_speaker_model(name)``), built by WeSpeaker's class with the same
    arguments and state-dict layout, so an exported ``avg_model.pt`` loads into it; False for our own networks."""

    factory: Callable[..., SpeakerEmbedder]
    defaults: dict[str, Any]
    min_feat_dim: int  # below this the network downsamples frequency to zero bins
    wespeaker: bool = False


_REGISTRY: dict[str, ModelSpec] = {}
for _name in RESNET_DEPTHS:
    _REGISTRY[_name] = ModelSpec(functools.partial(wespeaker_resnet, _name), WESPEAKER_DEFAULTS, 8, wespeaker=True)
for _name in GEMINI_DEPTHS:
    _REGISTRY[_name] = ModelSpec(functools.partial(wespeaker_gemini_dfresnet, _name), WESPEAKER_DEFAULTS, 16,
                                 wespeaker=True)
# Ours: WeSpeaker has no model of this name (and its ResNet has no stride-2 first stage, `first_stride`).
_REGISTRY["ThinResNet"] = ModelSpec(thin_resnet, THIN_RESNET_DEFAULTS, 8)


def available_models() -> list[str]:
    """Names accepted by :func:`build_model`."""
    return list(_REGISTRY)


def is_wespeaker_model(name: str) -> bool:
    """Whether ``name`` is one of WeSpeaker's own models (its class loads our state dicts strictly)."""
    spec = _REGISTRY.get(name)
    return spec is not None and spec.wespeaker


def _positive_int(name: str, value: Any, model: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{model}: {name}={value!r} should be an int >= {minimum}")
    return value


def _validated_kwargs(name: str, spec: ModelSpec, kwargs: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(kwargs) - set(spec.defaults))
    if unknown:
        raise ConfigError(f"{name}: unknown argument(s) {unknown}; allowed: {sorted(spec.defaults)}")
    merged = {**spec.defaults, **kwargs}
    merged["feat_dim"] = _positive_int("feat_dim", merged["feat_dim"], name, spec.min_feat_dim)
    merged["embed_dim"] = _positive_int("embed_dim", merged["embed_dim"], name)
    if merged["pooling_func"] not in POOLING_FUNCS:
        raise ConfigError(
            f"{name}: pooling_func={merged['pooling_func']!r}; allowed: {sorted(POOLING_FUNCS)}"
        )
    if not isinstance(merged["two_emb_layer"], bool):
        raise ConfigError(f"{name}: two_emb_layer={merged['two_emb_layer']!r} should be True or False")
    if "m_channels" in merged:
        merged["m_channels"] = _positive_int("m_channels", merged["m_channels"], name)
    if "first_stride" in merged and merged["first_stride"] not in (1, 2):
        raise ConfigError(f"{name}: first_stride={merged['first_stride']!r}; allowed: 1 (WeSpeaker), 2 (CPU)")
    if "num_blocks" in merged:
        blocks = merged["num_blocks"]
        if (
            not isinstance(blocks, list | tuple)
            or len(blocks) != 4
            or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in blocks)
        ):
            raise ConfigError(
                f"{name}: num_blocks={blocks!r} should be a list of 4 ints >= 1 (blocks per stage)"
            )
        merged["num_blocks"] = list(blocks)  # a list, so arch round-trips through JSON unchanged
    return merged


def build_model(name: str, **kwargs: Any) -> SpeakerEmbedder:
    """Build a speaker-embedding network by WeSpeaker name; ``available_models()`` lists the names.

    WeSpeaker names (``ResNet18/34/50/101/152/221/293``, ``Gemini_DF_ResNet60/114/183/237``) take
    ``feat_dim`` (mel bins, default 80), ``embed_dim`` (default 256), ``pooling_func`` (TSTP, TAP, TSDP,
    ASTP; default TSTP) and ``two_emb_layer`` (default False). ``ThinResNet`` additionally takes
    ``m_channels`` (default 8) and ``num_blocks`` (default ``[1, 1, 1, 1]``) and defaults to
    ``embed_dim=128``. The model's state dict has WeSpeaker's keys and shapes; ``forward`` maps fbank
    ``(batch, frames, feat_dim)`` to the scoring embedding ``(batch, embed_dim)``.

    Raises ConfigError naming the argument, the value and what is allowed.
    """
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ConfigError(f"model name={name!r} is not known; allowed: {available_models()}")
    spec = _REGISTRY[name]
    full_kwargs = _validated_kwargs(name, spec, kwargs)
    model = spec.factory(**full_kwargs)
    model.arch = {"name": name, "kwargs": full_kwargs}
    return model
