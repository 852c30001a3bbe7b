"""Bring your own network: a model factory named ``package.module:function`` instead of a registered name.

``build_model("my_pkg.nets:tiny_tdnn", feat_dim=40)`` imports ``my_pkg.nets``, calls ``tiny_tdnn(feat_dim=40)``
and checks what it returns, once per (factory, arguments) in a process:

* an ``nn.Module`` mapping fbank ``(batch, frames, feat_dim)`` to embeddings ``(batch, dim)`` (one forward
  on a short random input, in eval mode);
* every parameter lives in a layer the project can quantize (``Conv1d``, ``Conv2d``, ``Linear``: k-means
  codebooks, ONNX ``Conv``/``Gemm``) or keeps in float (:data:`FLOAT_LAYERS`: BatchNorm, LayerNorm,
  GroupNorm, PReLU). Anything else (an LSTM, attention with packed projections, a bare ``nn.Parameter``)
  is a ConfigError naming the layer and its type: its weights could neither be quantized nor sized.

The factory must take ``feat_dim`` (the mel bins the network reads); its arguments, defaults filled in, become
``model.arch["kwargs"]``, so checkpoints, packed files and the ONNX writer rebuild the network by calling it
again: the factory's module must be importable wherever the model is rebuilt (Ray workers included).
docs/plugins.md has a worked example (docs/plugin_example.py).
"""

from __future__ import annotations

import importlib
import inspect
import json
import re
import threading
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lsv_core.errors import ConfigError

__all__ = ["FLOAT_LAYERS", "QUANTIZED_LAYERS", "build_from_factory", "is_factory_reference", "resolve_factory"]

FACTORY_RE = re.compile(r"^[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*:[A-Za-z_]\w*$")
QUANTIZED_LAYERS: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Linear)
# Their parameters stay float32 in every file; the ONNX exporter writes them as standard nodes.
FLOAT_LAYERS: tuple[type[nn.Module], ...] = (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm, nn.PReLU)
_CHECK_FRAMES = 64

_CHECKED: set[str] = set()
_LOCK = threading.Lock()


def is_factory_reference(name: object) -> bool:
    """Whether ``name`` has the form ``package.module:function``."""
    return isinstance(name, str) and FACTORY_RE.match(name) is not None


def resolve_factory(reference: str, *, field: str = "factory") -> Callable[..., Any]:
    """The callable ``package.module:function`` names; ConfigError (naming ``field``) if it cannot be had."""
    if not is_factory_reference(reference):
        raise ConfigError(f"{field}={reference!r} should look like 'package.module:function'")
    module_name, _, attr = reference.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # any import-time failure of user code means the same: no factory
        raise ConfigError(f"{field}={reference!r}: module {module_name!r} cannot be imported "
                          f"({type(err).__name__}: {err}); is it on PYTHONPATH?") from None
    factory = getattr(module, attr, None)
    if factory is None:
        raise ConfigError(f"{field}={reference!r}: module {module_name!r} has no attribute {attr!r}")
    if not callable(factory):
        raise ConfigError(f"{field}={reference!r}: {attr!r} is a {type(factory).__name__}, not a callable")
    return factory


def _bound_kwargs(reference: str, factory: Callable[..., Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    try:
        signature = inspect.signature(factory)
        bound = signature.bind(**kwargs)
    except TypeError as err:
        allowed = [p for p in inspect.signature(factory).parameters] if callable(factory) else []
        raise ConfigError(f"{reference}: arguments {sorted(kwargs)} do not fit the factory ({err}); "
                          f"it takes {allowed}") from None
    bound.apply_defaults()
    full = dict(bound.arguments)
    if "feat_dim" not in signature.parameters:
        raise ConfigError(f"{reference}: the factory should take a feat_dim argument (the mel bins of its input)")
    feat_dim = full.get("feat_dim")
    if isinstance(feat_dim, bool) or not isinstance(feat_dim, int) or feat_dim < 1:
        raise ConfigError(f"{reference}: feat_dim={feat_dim!r} should be an int >= 1")
    try:
        json.dumps(full)
    except (TypeError, ValueError):
        raise ConfigError(f"{reference}: arguments {full!r} should be JSON values (they are stored with the model "
                          "to rebuild it)") from None
    return full


def check_supported_layers(model: nn.Module, reference: str) -> None:
    """ConfigError naming the first layer whose parameters the project can neither quantize nor keep in float."""
    allowed = QUANTIZED_LAYERS + FLOAT_LAYERS
    for name, module in model.named_modules():
        own = [p for p, _ in module.named_parameters(recurse=False)]
        if own and type(module) not in allowed:
            where = f"layer {name!r}" if name else "the model itself"
            raise ConfigError(
                f"{reference}: {where} ({type(module).__name__}) holds parameters {own[:4]} that cannot be "
                f"quantized or exported; supported: {[t.__name__ for t in QUANTIZED_LAYERS]} (quantized), "
                f"{[t.__name__ for t in FLOAT_LAYERS]} (kept float)")


@torch.no_grad()
def _check_forward(model: nn.Module, reference: str, feat_dim: int) -> None:
    was_training = model.training
    model.eval()
    try:
        out = model(torch.randn(2, _CHECK_FRAMES, feat_dim, generator=torch.Generator().manual_seed(0)))
    except Exception as err:  # user code: any failure means the contract is not met
        raise ConfigError(f"{reference}: the model fails on fbank input (2, {_CHECK_FRAMES}, {feat_dim}): "
                          f"{type(err).__name__}: {err}") from None
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != 2:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(f"{reference}: the model should map fbank (batch, frames, feat_dim) to embeddings "
                          f"(batch, dim); for (2, {_CHECK_FRAMES}, {feat_dim}) it returned {shape}")


def build_from_factory(reference: str, **kwargs: Any) -> nn.Module:
    """Call the factory ``reference`` names with ``kwargs``, check the network (module docstring), set ``arch``."""
    factory = resolve_factory(reference)
    full = _bound_kwargs(reference, factory, kwargs)
    model = factory(**full)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"{reference}: the factory returned a {type(model).__name__}, not a torch.nn.Module")
    key = json.dumps({"name": reference, "kwargs": full}, sort_keys=True)
    with _LOCK:
        checked = key in _CHECKED
    if not checked:
        check_supported_layers(model, reference)
        _check_forward(model, reference, full["feat_dim"])
        with _LOCK:
            _CHECKED.add(key)
    model.arch = {"name": reference, "kwargs": full}
    return model
