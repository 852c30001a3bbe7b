"""Size of the deployable model: the byte count of the file a user ships, and the tensors behind it.

One number for size (STYLE.md: one source of truth): :func:`packed_size_bytes` is the exact byte count
of ``model.onnx``, the ONNX file that keeps the codebooks (:mod:`lsv_core.export.onnx_codebook`: graph,
header and metadata included), which the export writes and ``infer.py`` runs. The search minimises it,
MLflow logs it as ``size_bytes``, and the front, the report and the export show it. It is computed from
shapes alone by the same module that writes the file (no k-means, no writing; the first call per
architecture traces the graph once), so workers and the budget repair can ask for it per recipe.

:func:`packed_tensors` (:mod:`lsv_core.quant.layout`, which the writers read too) is the
``{name: tensor}`` dict that both files store (the ONNX initializers hold the same bytes) and
``lsv_core.export.save_packed`` writes as safetensors; :func:`packed_tensor_bytes` is their summed
``nbytes`` (the size objective before the file's graph and header were counted).

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

from torch import nn

from lsv_core.quant.layout import PACKED_SUFFIX, codebook_layout, packed_layout, packed_tensors
from lsv_core.quant.quantize import latent_weight, recipe_of
from lsv_core.quant.recipe import BitRecipe, LayerSpec, SpecLike, quantizable_layers

__all__ = ["PACKED_SUFFIX", "average_bits", "codebook_layout", "packed_layout", "packed_size_bytes",
           "packed_tensor_bytes", "packed_tensors"]


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
    return int(sum(t.nbytes for t in packed_tensors(model, recipe).values()))


def average_bits(model: nn.Module, recipe: BitRecipe | Mapping[str, LayerSpec]) -> float:
    """Weight-count-weighted mean bits over the quantizable layers (float layers count 32)."""
    modules = dict(model.named_modules())
    total = bits = 0
    for name in quantizable_layers(model):
        n = latent_weight(modules[name]).numel()
        total += n
        bits += n * (recipe[name].bits if name in recipe else 32)
    return bits / max(1, total)
