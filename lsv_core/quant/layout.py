"""The deployable layout: which tensors a quantized model's files store, by name and shape.

Its own module because two sides read it: the size objective (:mod:`lsv_core.quant.size`) and the writers
of the files (:mod:`lsv_core.export.onnx_codebook`, whose byte count *is* the size objective, and
:mod:`lsv_core.export.packed`). See :mod:`lsv_core.quant.size` for what is stored per state-dict entry.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from lsv_core.errors import ConfigError
from lsv_core.quant.bitpack import pack_bits, packed_nbytes
from lsv_core.quant.quantize import plain_state_items, quantizer_of, recipe_of
from lsv_core.quant.recipe import TRAINING_ONLY_MODULES, BitRecipe, LayerSpec, SpecLike

__all__ = ["PACKED_SUFFIX", "codebook_layout", "packed_layout", "packed_tensors"]

PACKED_SUFFIX = "packed"
# Buffers inference does not read (see lsv_core.quant.size's docstring).
_SKIPPED_LEAVES = ("num_batches_tracked",)


def codebook_layout(spec: LayerSpec) -> dict[str, tuple[int, ...]]:
    """Codebook tensors stored for a layer with ``spec``: name suffix -> shape (all float32)."""
    return spec.quantizer_class.stored_layout(spec.bits)


def packed_tensors(
    model: nn.Module, recipe: BitRecipe | Mapping[str, SpecLike] | None = None
) -> dict[str, Tensor]:
    """The tensors of the packed file, by name (CPU, contiguous), in state-dict order.

    With ``recipe=None`` they describe ``model`` as quantized now (real data: what ``save_packed``
    writes). With a recipe they describe ``model`` as if quantized by that recipe (layers not in it in
    float32), as shape-only ``meta`` tensors: what the file would hold, without running k-means.
    """
    if recipe is None:
        return _build(model, recipe_of(model), materialize=True)
    recipe = recipe if isinstance(recipe, BitRecipe) else BitRecipe(recipe)
    return _build(model, recipe, materialize=False)


def packed_layout(model: nn.Module) -> dict[str, dict[str, Any]]:
    """For each quantized layer: ``{"shape": [...], "bits": b, "mode": m}`` (what unpacking needs)."""
    modules = dict(model.named_modules())
    out: dict[str, dict[str, Any]] = {}
    for key, value, is_latent in plain_state_items(model):
        if is_latent:
            name = key.rpartition(".")[0]
            q = quantizer_of(modules[name])
            assert q is not None
            out[name] = {"shape": list(value.shape), "bits": q.bits, "mode": q.mode}
    return out


def _is_training_only(key: str) -> bool:
    return any(part in TRAINING_ONLY_MODULES for part in key.split(".")[:-1])


def _build(model: nn.Module, recipe: BitRecipe, materialize: bool) -> dict[str, Tensor]:
    recipe.validate(model)
    modules = dict(model.named_modules())
    out: dict[str, Tensor] = {}
    for key, value, _ in plain_state_items(model):
        owner, _, leaf = key.rpartition(".")
        if leaf in _SKIPPED_LEAVES or _is_training_only(key):
            continue
        spec = recipe.get(owner) if leaf == "weight" else None
        if spec is None:
            dtype = torch.float32 if value.is_floating_point() else value.dtype
            if materialize:
                out[key] = value.detach().to("cpu", dtype).contiguous()
            else:
                out[key] = torch.empty(value.shape, dtype=dtype, device="meta")
            continue
        layout = codebook_layout(spec)
        n = value.numel()
        if not materialize:
            out[f"{key}.{PACKED_SUFFIX}"] = torch.empty(
                packed_nbytes(n, spec.bits), dtype=torch.uint8, device="meta"
            )
            for suffix, shape in layout.items():
                out[f"{key}.{suffix}"] = torch.empty(shape, dtype=torch.float32, device="meta")
            continue
        q = quantizer_of(modules[owner])
        if q is None or q.spec != spec:
            raise ConfigError(f"layer {owner!r} is not quantized as {spec}; quantize the model first")
        with torch.no_grad():
            out[f"{key}.{PACKED_SUFFIX}"] = pack_bits(q.assign(value), spec.bits).cpu()
            codebook = q.packed_codebook(value)
        if {s: tuple(t.shape) for s, t in codebook.items()} != layout:
            raise AssertionError(f"quantizer of {owner!r} stores {codebook.keys()} not matching {layout}")
        for suffix, tensor in codebook.items():
            out[f"{key}.{suffix}"] = tensor.detach().to("cpu", torch.float32).contiguous()
    return out
