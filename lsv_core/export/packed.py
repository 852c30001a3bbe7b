"""The packed deployable model: bit-packed codebook indices, codebooks and float tensors in one safetensors file.

Tensors: exactly :func:`lsv_core.quant.layout.packed_tensors` of the model (so the file size is
``packed_size_bytes(model)`` plus the safetensors header: an 8-byte length and the header JSON).
Header metadata (safetensors' ``__metadata__``, all JSON strings):

* ``format``: ``"lsv-packed/1"``;
* ``arch``: ``model.arch`` (``{"name", "kwargs"}``; :func:`lsv_core.models.build_model` rebuilds it);
* ``recipe``: the model's :class:`~lsv_core.quant.recipe.BitRecipe` as canonical JSON;
* ``layers``: per quantized layer ``{"shape", "bits", "mode"}``, what unpacking needs;
* ``user``: the caller's ``metadata`` (JSON object).

:func:`load_packed` needs nothing but the file: it rebuilds the network, sets each quantized layer's
latent weight to its dequantized value and attaches a quantizer holding the stored codebook, so the
loaded model's eval outputs equal the saved model's exactly and it can be fine-tuned further.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.nn.utils import parametrize

from lsv_core.atomic import atomic_path
from lsv_core.errors import CheckpointError, ConfigError
from lsv_core.quant.bitpack import pack_bits, unpack_bits
from lsv_core.quant.codebook import KMQATConfig
from lsv_core.quant.layout import PACKED_SUFFIX, codebook_layout, packed_layout, packed_tensors
from lsv_core.quant.quantize import recipe_of
from lsv_core.quant.recipe import TRAINING_ONLY_MODULES, BitRecipe, LayerSpec

__all__ = ["PACKED_FORMAT", "load_packed", "pack_bits", "read_packed_header", "save_packed", "unpack_bits"]

PACKED_FORMAT = "lsv-packed/1"
_MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit on the header


def save_packed(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``model`` (quantized or not) as a packed safetensors file, atomically; returns the path.

    Raises:
        RefuseOverwrite: ``path`` exists and ``overwrite`` is False.
        ConfigError: ``model`` has no ``arch`` (build it with :func:`lsv_core.models.build_model`), or
            ``metadata`` is not JSON-serialisable.
    """
    arch = getattr(model, "arch", None)
    if not isinstance(arch, Mapping) or "name" not in arch:
        raise ConfigError("model has no .arch {'name', 'kwargs'}; build it with lsv_core.models.build_model")
    try:
        user = json.dumps(dict(metadata or {}), sort_keys=True)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"metadata is not JSON-serialisable: {err}") from None
    header = {
        "format": PACKED_FORMAT,
        "arch": json.dumps(arch, sort_keys=True),
        "recipe": recipe_of(model).to_json(),
        "layers": json.dumps(packed_layout(model), sort_keys=True),
        "user": user,
    }
    tensors = packed_tensors(model)
    with atomic_path(path, overwrite=overwrite) as tmp:
        save_file(tensors, str(tmp), metadata=header)
    return Path(path)


def read_packed_header(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The decoded header: ``{"format", "arch", "recipe" (BitRecipe), "layers", "user"}``.

    Reads only the safetensors header (8-byte length, JSON), without checking the tensor data, so a file
    whose data was cut or extended still says what it claims to be (callers compare its bytes with that).
    """
    path = Path(path)
    try:
        with path.open("rb") as f:
            raw_len = f.read(8)
            (n,) = struct.unpack("<Q", raw_len) if len(raw_len) == 8 else (-1,)
            if not 0 < n <= _MAX_HEADER_BYTES:
                raise ValueError(f"header length {n} is not that of a safetensors file")
            header = json.loads(f.read(n))
        meta = header.get("__metadata__") or {}
        if not isinstance(meta, dict):
            raise ValueError("__metadata__ is not an object")
    except (OSError, ValueError, UnicodeDecodeError, AttributeError) as err:
        raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from None
    return _decode_header(path, meta)


def _decode_header(path: Path, raw: Mapping[str, str]) -> dict[str, Any]:
    if raw.get("format") != PACKED_FORMAT:
        raise CheckpointError(f"{path}: format={raw.get('format')!r}, expected {PACKED_FORMAT!r}")
    try:
        return {
            "format": raw["format"],
            "arch": json.loads(raw["arch"]),
            "recipe": BitRecipe.from_json(raw["recipe"]),
            "layers": json.loads(raw["layers"]),
            "user": json.loads(raw.get("user", "{}")),
        }
    except (KeyError, json.JSONDecodeError, ConfigError) as err:
        raise CheckpointError(f"{path}: malformed packed header ({err})") from None


def load_packed(
    path: str | os.PathLike[str],
    *,
    map_location: str | torch.device = "cpu",
    config: KMQATConfig | None = None,
    builder: Callable[..., nn.Module] | None = None,
) -> nn.Module:
    """Rebuild the quantized model saved by :func:`save_packed`, in eval mode, on ``map_location``.

    Args:
        path: the packed file.
        map_location: device for the model.
        config: training behaviour of the re-created quantizers (default :class:`KMQATConfig()`).
        builder: ``builder(name, **kwargs)`` rebuilding the network from the header's ``arch``; default
            :func:`lsv_core.models.build_model`.
    """
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            header = _decode_header(path, f.metadata() or {})
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except CheckpointError:
        raise
    except Exception as err:  # safetensors raises its own SafetensorError
        raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from None
    if builder is None:
        from lsv_core.models import build_model as builder
    arch = header["arch"]
    model = builder(arch["name"], **arch.get("kwargs", {}))
    config = config if config is not None else KMQATConfig()

    state: dict[str, torch.Tensor] = {}
    codebooks: dict[str, tuple[LayerSpec, torch.Tensor]] = {}
    for name, info in header["layers"].items():
        key = f"{name}.weight"
        try:
            spec = LayerSpec(info["bits"], info["mode"])
            shape = tuple(info["shape"])
            packed = tensors.pop(f"{key}.{PACKED_SUFFIX}")
            stored = {suffix: tensors.pop(f"{key}.{suffix}") for suffix in codebook_layout(spec)}
            levels = spec.quantizer_class.stored_levels(stored)
            index = unpack_bits(packed, spec.bits, math.prod(shape)).long().reshape(shape)
        except KeyError as err:
            raise CheckpointError(f"{path}: entry {err} of quantized layer {name!r} is missing") from None
        except (ValueError, RuntimeError) as err:  # ConfigError is a ValueError
            raise CheckpointError(f"{path}: quantized layer {name!r} is malformed ({err})") from None
        # The latent weight starts at the dequantized value; the nearest level of levels[i] is i again
        # (ties go to the lower index), so the re-created quantizer reproduces the stored weights exactly.
        state[key] = levels[index]
        codebooks[name] = (spec, levels)
    state.update(tensors)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches
        raise CheckpointError(f"{path}: tensors do not fit arch {arch['name']} ({err})") from None
    allowed_missing = [
        k
        for k in missing
        if k.endswith("num_batches_tracked") or any(p in TRAINING_ONLY_MODULES for p in k.split(".")[:-1])
    ]
    if unexpected or len(allowed_missing) != len(missing):
        bad_missing = sorted(set(missing) - set(allowed_missing))
        raise CheckpointError(
            f"{path}: tensors do not match arch {arch['name']}: missing {bad_missing[:5]}, unexpected {unexpected[:5]}"
        )
    model.to(map_location)
    modules = dict(model.named_modules())
    for name, (spec, levels) in codebooks.items():
        module = modules[name]
        quantizer = spec.quantizer_class.from_stored(levels.to(dtype=module.weight.dtype), spec.bits, config)
        quantizer.to(module.weight.device)
        parametrize.register_parametrization(module, "weight", quantizer, unsafe=True)
    if recipe_of(model) != header["recipe"]:
        raise CheckpointError(f"{path}: rebuilt recipe {recipe_of(model)} differs from the header's")
    return model.eval()
