"""Size of the deployable model: the byte count of the file a user ships, and the tensors behind it.

One number for size (STYLE.md: one source of truth): :func:`packed_size_bytes` is the exact byte count
of ``model.onnx``, the ONNX file that keeps the codebooks (:mod:`lsv_core.export.onnx_codebook`: graph,
header and metadata included), which the export writes and ``infer.py`` runs. The search minimises it,
MLflow logs it as ``size_bytes``, and the front, the report and the export show it. It is computed from
shapes alone by the same module that writes the file (no k-means, no writing; the first call per
architecture traces the graph once), so workers and the budget repair can ask for it per recipe.

:func:`packed_tensors` is the ``{name: tensor}`` dict that both files store (the ONNX initializers hold
the same bytes) and ``lsv_core.export.save_packed`` writes as safetensors; :func:`packed_tensor_bytes`
is their summed ``nbytes`` (the size objective before the file's graph and header were counted).

What is stored, per state-dict entry of the embedding network:

* quantized layer ``L``: ``L.weight.packed``, the codebook indices bit-packed (uint8,
  ``ceil(n * b / 8)`` bytes, see ``bitpack.py``); ``L.weight.codebook``, the ``2^b`` levels as float32
  (adaptive binary: its two levels); or ``L.weight.alpha``, one float32 (static binary);
* every other tensor inference needs, as float32: biases, BatchNorm weight/bias/running mean/var, the
  weights of layers left in float;
* not stored: BatchNorm ``num_batches_tracked`` (inference uses the running statistics; it only matters
  when training with ``momentum=None``) and training-only heads (``projection.*``, docs/method.md).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from lsv_core.errors import ConfigError
from lsv_core.quant.bitpack import pack_bits, packed_nbytes
from lsv_core.quant.quantize import latent_weight, plain_state_items, quantizer_of, recipe_of
from lsv_core.quant.recipe import TRAINING_ONLY_MODULES, BitRecipe, LayerSpec, SpecLike, quantizable_layers

__all__ = ["average_bits", "codebook_layout", "packed_layout", "packed_size_bytes", "packed_tensor_bytes",
           "packed_tensors"]

PACKED_SUFFIX = "packed"
# Buffers inference does not read (see module docstring).
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


def packed_size_bytes(model: nn.Module, recipe: BitRecipe | Mapping[str, SpecLike] | None = None) -> int:
    """Bytes of the deployable file ``model.onnx`` (header and graph included): the size objective.

    ``recipe=None`` sizes the model as quantized now; a recipe sizes it as if quantized that way (a float
    model with ``recipe={}`` gives the size of its float32 file). Shapes only, cheap enough for a search.
    The model needs an ``arch`` (:func:`lsv_core.models.build_model`).
    """
    from lsv_core.export.onnx_codebook import codebook_onnx_size

    recipe = recipe_of(model) if recipe is None else recipe
    return codebook_onnx_size(model, recipe if isinstance(recipe, BitRecipe) else BitRecipe(recipe))


def packed_tensor_bytes(model: nn.Module, recipe: BitRecipe | Mapping[str, SpecLike] | None = None) -> int:
    """Summed ``nbytes`` of :func:`packed_tensors` (no file header, no graph); same ``recipe`` rules."""
    recipe = recipe_of(model) if recipe is None else recipe
    recipe = recipe if isinstance(recipe, BitRecipe) else BitRecipe(recipe)
    return int(sum(t.nbytes for t in _build(model, recipe, materialize=False).values()))


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


def average_bits(model: nn.Module, recipe: BitRecipe | Mapping[str, LayerSpec]) -> float:
    """Weight-count-weighted mean bits over the quantizable layers (float layers count 32)."""
    modules = dict(model.named_modules())
    total = bits = 0
    for name in quantizable_layers(model):
        n = latent_weight(modules[name]).numel()
        total += n
        bits += n * (recipe[name].bits if name in recipe else 32)
    return bits / max(1, total)
