"""Adaptive k-means weight quantization (KMQAT) of speaker-embedding networks.

Import from here::

    from lsv_core.quant import BitRecipe, KMQATConfig, quantize, recluster_all, packed_size_bytes

* ``kmeans_1d`` - fast deterministic 1-D k-means (per-layer codebooks);
* ``BitRecipe`` / ``LayerSpec`` / ``QuantPolicy`` / ``apply_policy`` / ``quantizable_layers`` - what to
  quantize at which bit width;
* ``quantize`` (in place) / ``recluster_all`` / ``KMQATConfig`` - quantization-aware training;
  ``InitialCodebooks`` - the baseline's k-means codebooks, computed once for many recipes;
* ``dequantized_state_dict`` / ``layer_codebooks`` / ``is_quantized`` / ``recipe_of`` - inspecting a
  quantized model;
* ``packed_size_bytes`` - the deployable size: bytes of the ``model.onnx`` that keeps the codebooks;
  ``packed_tensors`` / ``packed_tensor_bytes`` - the tensors it and ``lsv_core.export.save_packed``
  store; ``pack_bits`` / ``unpack_bits`` - the index packing.
"""

from lsv_core.quant.binary import AdaptiveBinaryQuantizer, StaticBinaryQuantizer
from lsv_core.quant.bitpack import pack_bits, packed_nbytes, unpack_bits
from lsv_core.quant.codebook import CodebookQuantizer, KMQATConfig, WeightQuantizer
from lsv_core.quant.initial_codebooks import InitialCodebooks
from lsv_core.quant.kmeans import kmeans_1d, kmeans_inertia, nearest_centroid
from lsv_core.quant.quantize import (
    dequantized_state_dict,
    is_quantized,
    latent_weight,
    layer_codebooks,
    quantize,
    quantized_layers,
    quantizer_of,
    recipe_of,
    recluster_all,
)
from lsv_core.quant.recipe import (
    ALLOWED_BITS,
    BitRecipe,
    LayerSpec,
    QuantPolicy,
    apply_policy,
    binary_modes,
    quantizable_layers,
    shortcut_owner,
)
from lsv_core.quant.size import average_bits, packed_size_bytes, packed_tensor_bytes, packed_tensors

__all__ = [
    "ALLOWED_BITS",
    "AdaptiveBinaryQuantizer",
    "BitRecipe",
    "CodebookQuantizer",
    "InitialCodebooks",
    "KMQATConfig",
    "LayerSpec",
    "QuantPolicy",
    "StaticBinaryQuantizer",
    "WeightQuantizer",
    "apply_policy",
    "average_bits",
    "binary_modes",
    "dequantized_state_dict",
    "is_quantized",
    "kmeans_1d",
    "kmeans_inertia",
    "latent_weight",
    "layer_codebooks",
    "nearest_centroid",
    "pack_bits",
    "packed_nbytes",
    "packed_size_bytes",
    "packed_tensor_bytes",
    "packed_tensors",
    "quantizable_layers",
    "quantize",
    "quantized_layers",
    "quantizer_of",
    "recipe_of",
    "recluster_all",
    "shortcut_owner",
    "unpack_bits",
]
