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
from lsv_core.models.campplus import NONLINEARITIES, CAMPPlus
from lsv_core.models.dfresnet import GEMINI_DEPTHS, wespeaker_gemini_dfresnet
from lsv_core.models.ecapa_tdnn import (
    ECAPA_VARIANTS,
    ECAPATDNN,
    MFA_CHANNELS,
    RES2_SCALE,
    wespeaker_ecapa_tdnn,
)
from lsv_core.models.embedder import SpeakerEmbedder
from lsv_core.models.plugin import build_from_factory, is_factory_reference, resolve_factory
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
# WeSpeaker's VoxCeleb recipes conf/ecapa_tdnn*.yaml and conf/campplus.yaml (the published checkpoints).
ECAPA_DEFAULTS: dict[str, Any] = {"feat_dim": 80, "embed_dim": 192, "pooling_func": "ASTP", "emb_bn": False}
# ``ECAPA_TDNN``: any width, e.g. a CPU-sized one; WeSpeaker's class with its fixed aggregation width exposed.
ECAPA_TDNN_DEFAULTS: dict[str, Any] = {**ECAPA_DEFAULTS, "channels": 512, "global_context_att": False,
                                       "mfa_channels": MFA_CHANNELS}
CAMPPLUS_DEFAULTS: dict[str, Any] = {"feat_dim": 80, "embed_dim": 512, "pooling_func": "TSTP", "growth_rate": 32,
                                     "bn_size": 4, "init_channels": 128, "config_str": "batchnorm-relu"}
# CAM++ registers its pooling twice (``pool`` and ``xvector.stats``, as WeSpeaker does): a pooling with
# weights would appear under both names, so only the parameter-free ones are offered.
_CAMPPLUS_POOLINGS = ("TAP", "TSDP", "TSTP")


@dataclass(frozen=True)
class ModelSpec:
    """How to build one registered name: a factory taking exactly the keys of ``defaults``."""

    factory: Callable[..., SpeakerEmbedder]
    defaults: dict[str, Any]
    min_feat_dim: int  # below this the network downsamples frequency to zero bins
    wespeaker: bool = False  # a WeSpeaker model name: its state dict loads into WeSpeaker's own code
    feat_dim_step: int = 1  # feat_dim must be a multiple of this


_REGISTRY: dict[str, ModelSpec] = {}
for _name in RESNET_DEPTHS:
    _REGISTRY[_name] = ModelSpec(functools.partial(wespeaker_resnet, _name), WESPEAKER_DEFAULTS, 8, wespeaker=True)
for _name in GEMINI_DEPTHS:
    _REGISTRY[_name] = ModelSpec(functools.partial(wespeaker_gemini_dfresnet, _name), WESPEAKER_DEFAULTS, 16,
                                 wespeaker=True)
for _name in ECAPA_VARIANTS:
    _REGISTRY[_name] = ModelSpec(functools.partial(wespeaker_ecapa_tdnn, _name), ECAPA_DEFAULTS, 1, wespeaker=True)
_REGISTRY["CAMPPlus"] = ModelSpec(CAMPPlus, CAMPPLUS_DEFAULTS, 8, wespeaker=True, feat_dim_step=8)
_REGISTRY["ThinResNet"] = ModelSpec(thin_resnet, THIN_RESNET_DEFAULTS, 8)
_REGISTRY["ECAPA_TDNN"] = ModelSpec(ECAPATDNN, ECAPA_TDNN_DEFAULTS, 1)


def available_models() -> list[str]:
    """Names accepted by :func:`build_model`."""
    return list(_REGISTRY)


def is_wespeaker_model(name: str) -> bool:
    """Whether ``name`` is one of WeSpeaker's model names (its state dict is WeSpeaker's, for WeSpeaker's code)."""
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
    if merged["feat_dim"] % spec.feat_dim_step:
        raise ConfigError(f"{name}: feat_dim={merged['feat_dim']} should be a multiple of {spec.feat_dim_step}")
    merged["embed_dim"] = _positive_int("embed_dim", merged["embed_dim"], name)
    poolings = _CAMPPLUS_POOLINGS if spec.factory is CAMPPlus else sorted(POOLING_FUNCS)
    if merged["pooling_func"] not in poolings:
        raise ConfigError(f"{name}: pooling_func={merged['pooling_func']!r}; allowed: {list(poolings)}")
    for flag in ("two_emb_layer", "emb_bn", "global_context_att"):
        if flag in merged and not isinstance(merged[flag], bool):
            raise ConfigError(f"{name}: {flag}={merged[flag]!r} should be True or False")
    for width in ("m_channels", "mfa_channels", "growth_rate", "bn_size", "init_channels"):
        if width in merged:
            merged[width] = _positive_int(width, merged[width], name)
    if "channels" in merged:
        merged["channels"] = _positive_int("channels", merged["channels"], name, RES2_SCALE)
        if merged["channels"] % RES2_SCALE:
            raise ConfigError(f"{name}: channels={merged['channels']} should be a multiple of {RES2_SCALE} "
                              "(the Res2Net scale)")
    if "bn_size" in merged and merged["bn_size"] * merged["growth_rate"] < 2:
        raise ConfigError(f"{name}: bn_size * growth_rate should be >= 2 (the CAM mask halves it)")
    if "config_str" in merged:
        parts = merged["config_str"].split("-") if isinstance(merged["config_str"], str) else [None]
        if not parts or any(p not in NONLINEARITIES for p in parts):
            raise ConfigError(f"{name}: config_str={merged['config_str']!r} should be '-'-joined names from "
                              f"{list(NONLINEARITIES)}, e.g. 'batchnorm-relu'")
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


def model_arguments(name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """All arguments of model ``name`` (its defaults updated with ``kwargs``), checked without building it.

    Raises ConfigError naming the argument, the value and what is allowed.
    """
    if is_factory_reference(name) and name not in _REGISTRY:
        resolve_factory(name, field="model")  # a plugin checks its own arguments when it builds
        return dict(kwargs)
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ConfigError(f"model name={name!r} is not known; allowed: {available_models()} or a model factory "
                          "'package.module:function'")
    return _validated_kwargs(name, _REGISTRY[name], kwargs)


def build_model(name: str, **kwargs: Any) -> SpeakerEmbedder:
    """Build a speaker-embedding network by WeSpeaker name; ``available_models()`` lists the names.

    WeSpeaker names (``ResNet18/34/50/101/152/221/293``, ``Gemini_DF_ResNet60/114/183/237``) take
    ``feat_dim`` (mel bins, default 80), ``embed_dim`` (default 256), ``pooling_func`` (TSTP, TAP, TSDP,
    ASTP; default TSTP) and ``two_emb_layer`` (default False). ``ThinResNet`` additionally takes
    ``m_channels`` (default 8) and ``num_blocks`` (default ``[1, 1, 1, 1]``) and defaults to
    ``embed_dim=128``. ``ECAPA_TDNN_c512``, ``ECAPA_TDNN_c1024``, ``ECAPA_TDNN_GLOB_c512``,
    ``ECAPA_TDNN_GLOB_c1024`` take ``feat_dim``, ``embed_dim`` (default 192), ``pooling_func`` (default
    ASTP) and ``emb_bn`` (default False); ``ECAPA_TDNN`` also ``channels`` (multiple of 8, default 512),
    ``global_context_att`` and ``mfa_channels`` (default 1536). ``CAMPPlus`` takes ``feat_dim`` (a multiple
    of 8), ``embed_dim`` (default 512), ``pooling_func`` (TSTP, TAP, TSDP), ``growth_rate`` (32),
    ``bn_size`` (4), ``init_channels`` (128) and ``config_str`` (``"batchnorm-relu"``). The model's state
    dict has WeSpeaker's keys and shapes; ``forward`` maps fbank ``(batch, frames, feat_dim)`` to the
    scoring embedding ``(batch, embed_dim)``.

    A ``package.module:function`` name builds a network from that factory instead (a plugin,
    :mod:`lsv_core.models.plugin`): ``kwargs`` go to the factory, which must take ``feat_dim``.

    Raises ConfigError naming the argument, the value and what is allowed.
    """
    if is_factory_reference(name) and name not in _REGISTRY:
        return build_from_factory(name, **kwargs)  # type: ignore[return-value]
    full_kwargs = model_arguments(name, kwargs)
    model = _REGISTRY[name].factory(**full_kwargs)
    model.arch = {"name": name, "kwargs": full_kwargs}
    return model
