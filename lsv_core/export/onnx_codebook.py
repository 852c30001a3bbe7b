"""The deployable file: an ONNX graph that keeps the codebooks, and its exact size from shapes alone.

``model.onnx`` is what a user ships to a device and what ``infer.py`` runs; its byte count is the size
objective of the search (:func:`lsv_core.quant.size.packed_size_bytes` returns :func:`codebook_onnx_size`).

What the file holds, per state tensor of the embedding network:

* a quantized Conv/Linear ``L``: the packed-file tensors under the packed file's names, i.e.
  ``L.weight.packed`` (the bit-packed ``uint8`` indices, byte for byte those of
  ``model.packed.safetensors``) and ``L.weight.codebook`` (``2^b`` float32 levels, ascending; adaptive
  binary: two) or ``L.weight.alpha`` (static binary: one float32 scale, levels ``[-alpha, +alpha]``),
  plus a few small constants. Standard ONNX ops rebuild ``L.weight`` in front of the float ``Conv`` /
  ``Gemm``: bit unpacking (``BitShift``, ``BitwiseAnd``; for widths that do not divide 8 a bit-plane
  sum), ``Cast``, ``Gather`` on the codebook and ``Reshape``;
* every other tensor inference needs (biases, BatchNorm parameters and statistics, float layers) as a
  float32 initializer named by its state-dict key.

BatchNorm is **kept** (``BatchNormalization`` nodes with the trained statistics), not folded: the
codebook then holds the weights the quantized torch model uses, and the file holds exactly the packed
file's tensors. Every dequantization node has only constant inputs, so onnxruntime folds them into
plain initializers when it creates a session and then fuses each Conv with its BatchNorm: a session
runs the same float graph as the dequantized float ONNX (``bench/deploy.py`` measures it).

Exact size without writing anything: the graph comes from tracing a fresh network of the model's
architecture once per process (cached), with every floating tensor set to distinct values (the
TorchScript exporter would otherwise merge equal tensors, e.g. the ones of untrained BatchNorms), then
canonicalised (no node names or doc strings, short intermediate names, fixed producer and metadata) so
that nothing in it depends on weight values, the torch version's naming or the time. A protobuf message
is the sum of its fields, so the file is ``other model fields + graph tag + varint(G) + G`` with ``G``
the fixed graph plus, per quantizable layer, the encoded bytes of what stands for its weight (the float
initializer, or the codebook nodes and initializers). Those per-layer parts are measured once per
(layer, spec) from the very protos the writer emits and cached, so a size query is a sum of a few dozen
integers. The only coupling between layers is the 1-5 byte varint of ``G``.
"""

from __future__ import annotations

import io
import json
import math
import os
import threading
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from lsv_core.atomic import atomic_path
from lsv_core.errors import ConfigError
from lsv_core.quant.recipe import BitRecipe, LayerSpec, quantizable_layers

__all__ = [
    "CODEBOOK_ONNX_FORMAT",
    "CODEBOOK_OPSET",
    "INPUT_NAME",
    "OUTPUT_NAME",
    "codebook_onnx_bytes",
    "codebook_onnx_size",
    "graph_template",
    "save_codebook_onnx",
]

CODEBOOK_ONNX_FORMAT = "lsv-codebook-onnx/1"
# BitwiseAnd is opset 18; onnxruntime runs opset 18 since 1.14.
CODEBOOK_OPSET = 18
INPUT_NAME = "fbank"
OUTPUT_NAME = "embedding"
_TRACE_FRAMES = 200

# Field numbers (onnx.proto) of the repeated fields whose elements the size sums.
_GRAPH_NODE, _GRAPH_INITIALIZER, _MODEL_GRAPH = 1, 5, 7


def _varint_len(n: int) -> int:
    return max(1, (int(n).bit_length() + 6) // 7)


def _field_len(field_number: int, payload: int) -> int:
    """Bytes of one length-delimited field: tag, varint length, payload."""
    return _varint_len(field_number << 3 | 2) + _varint_len(payload) + payload


# The graph's length is written as a 5-byte varint (protobuf parsers accept overlong varints; 5 bytes
# cover the 2 GiB protobuf limit), so that no layer's bytes change the width of another field: the size
# is then exactly a fixed part plus one part per layer, which the knapsack allocator relies on.
_GRAPH_LENGTH_BYTES = 5


def _graph_field_header(length: int) -> bytes:
    """Tag and fixed-width varint length of ``ModelProto.graph``."""
    if not 0 <= length < 1 << (7 * _GRAPH_LENGTH_BYTES):
        raise ValueError(f"graph of {length} bytes exceeds protobuf's limit")
    groups = [(length >> (7 * i)) & 0x7F for i in range(_GRAPH_LENGTH_BYTES)]
    return bytes([_MODEL_GRAPH << 3 | 2, *(g | 0x80 for g in groups[:-1]), groups[-1]])


# -- the graph template ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GraphTemplate:
    """The canonical float graph of one architecture, without the state tensors' data.

    ``skeleton`` holds every node of the network (topologically sorted), the graph's input and output
    and the metadata, but no initializers. ``tensors`` lists the state tensors in file order as
    ``(state-dict key, ONNX name, dims)``; ``layers`` maps each quantizable layer to the ONNX name of its
    weight and the weight's shape. Names are short (``w<j>`` is the weight of the ``j``-th quantizable
    layer, ``w<j>p``/``w<j>c``/``w<j>a`` its packed indices/codebook/scale, ``t<k>`` other state
    tensors): they appear twice each in the file (initializer and consumer) and would otherwise be a
    large part of a small model's bytes. :meth:`onnx_names` gives the mapping. ``extra_inits`` are any
    initializers that are not state tensors (kept verbatim).
    """

    arch_key: str
    skeleton: onnx.ModelProto
    tensors: tuple[tuple[str, str, tuple[int, ...]], ...]
    layers: Mapping[str, tuple[str, tuple[int, ...]]]
    extra_inits: tuple[TensorProto, ...]
    fixed_graph_bytes: int  # skeleton graph + every initializer but the quantizable weights
    model_other_bytes: int  # every ModelProto field but the graph

    def size(self, recipe: BitRecipe) -> int:
        """Bytes of the file for ``recipe`` (layers not in it stay float32)."""
        graph = self.fixed_graph_bytes
        for layer, (name, shape) in self.layers.items():
            graph += _part_bytes(name, shape, recipe.get(layer))
        return self.model_other_bytes + 1 + _GRAPH_LENGTH_BYTES + graph

    def onnx_names(self) -> dict[str, str]:
        """State-dict key -> name of the tensor (or of the dequantized weight) in the file."""
        return {key: name for key, name, _ in self.tensors}


_TEMPLATES: dict[str, GraphTemplate] = {}
_LOCK = threading.Lock()  # Ray actors may size from several threads


def _arch_of(model: nn.Module) -> dict:
    arch = getattr(model, "arch", None)
    if not isinstance(arch, Mapping) or "name" not in arch:
        raise ConfigError("model has no .arch {'name', 'kwargs'}; the deployable size and file need the "
                          "architecture: build the model with lsv_core.models.build_model")
    return {"name": arch["name"], "kwargs": dict(arch.get("kwargs", {}))}


def graph_template(model_or_arch: nn.Module | Mapping) -> GraphTemplate:
    """The cached :class:`GraphTemplate` of a model's architecture (traced on first use, 0.1-0.5 s)."""
    arch = _arch_of(model_or_arch) if isinstance(model_or_arch, nn.Module) else dict(model_or_arch)
    key = json.dumps(arch, sort_keys=True)
    with _LOCK:
        template = _TEMPLATES.get(key)
        if template is None:
            template = _TEMPLATES[key] = _build_template(arch, key)
    return template


def _trace(arch: dict) -> tuple[onnx.ModelProto, nn.Module]:
    from lsv_core.models import build_model

    net = build_model(arch["name"], **arch["kwargs"]).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for tensor in net.state_dict().values():
            if tensor.is_floating_point():  # distinct, and positive (valid variances): nothing is merged
                tensor.copy_(torch.rand(tensor.shape, generator=gen) + 0.5)
    feat_dim = int(arch["kwargs"].get("feat_dim", 80))
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        # The TorchScript exporter (onnx_export.py says why that one) warns of its deprecation on every call.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            net, (torch.zeros(1, _TRACE_FRAMES, feat_dim),), buf, dynamo=False, opset_version=CODEBOOK_OPSET,
            # PRESERVE (the net is in eval mode) keeps the BatchNormalization nodes: EVAL would fold them
            # into the conv weights, which would then no longer be codebook values.
            training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=True,
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch", 1: "frames"}, OUTPUT_NAME: {0: "batch"}},
        )
    return onnx.load_from_string(buf.getvalue()), net


def _build_template(arch: dict, key: str) -> GraphTemplate:
    proto, net = _trace(arch)
    state = {k: tuple(v.shape) for k, v in net.state_dict().items() if v.is_floating_point()}
    layer_of = {f"{name}.weight": (j, name) for j, name in enumerate(quantizable_layers(net))}
    graph = proto.graph
    tensors, extra, names = [], [], {}
    for init in graph.initializer:
        if init.name in state and init.data_type == TensorProto.FLOAT:
            j_layer = layer_of.get(init.name)
            names[init.name] = f"w{j_layer[0]}" if j_layer else f"t{len(tensors)}"
            tensors.append((init.name, names[init.name], tuple(init.dims)))
        else:
            extra.append(TensorProto.FromString(init.SerializeToString()))
    missing = [k for k in layer_of if k not in names]
    if missing:
        raise ConfigError(f"{arch['name']}: the traced graph has no initializer for {missing[:3]}; layer "
                          "weights must be plain parameters to be stored as codebooks")
    layers = {name: (names[k], state[k]) for k, (_, name) in layer_of.items()}
    del graph.initializer[:]
    _canonicalize(proto, arch, names)
    fixed = proto.graph.ByteSize() + sum(_field_len(_GRAPH_INITIALIZER, t.ByteSize()) for t in extra)
    fixed += sum(_field_len(_GRAPH_INITIALIZER, _float_init_bytes(name, dims))
                 for key, name, dims in tensors if key not in layer_of)
    other = onnx.ModelProto()
    other.CopyFrom(proto)
    other.ClearField("graph")
    return GraphTemplate(key, proto, tuple(tensors), layers, tuple(extra), fixed, other.ByteSize())


def _canonicalize(proto: onnx.ModelProto, arch: dict, names: Mapping[str, str]) -> None:
    """Make the skeleton independent of torch's naming and versions, and small (module docstring):
    short names, no node names or doc strings, no attribute that only restates its default."""
    graph = proto.graph
    renamed = dict(names)
    keep = {v.name for v in graph.input} | {v.name for v in graph.output}
    for node in graph.node:
        # ClearField, not = "": an empty string is still a field of 2 bytes in proto2.
        node.ClearField("name")
        node.ClearField("doc_string")
        for i, name in enumerate(node.input):
            node.input[i] = renamed.get(name, name)
        for i, name in enumerate(node.output):
            if name and name not in keep:
                renamed[name] = node.output[i] = f"v{len(renamed) - len(names)}"
        _drop_default_attributes(node, proto)
    del graph.value_info[:]
    graph.name = "lsv"
    graph.ClearField("doc_string")
    proto.producer_name = "lsv-quant"
    proto.producer_version = CODEBOOK_ONNX_FORMAT
    proto.ClearField("doc_string")
    del proto.metadata_props[:]
    for k, v in (("lsv.format", CODEBOOK_ONNX_FORMAT), ("lsv.arch", json.dumps(arch, sort_keys=True))):
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v


# Conv attributes whose documented default (ONNX operator docs) has no schema default_value to compare with;
# kernel_shape "should be inferred from input W" when absent, and W is always an initializer here.
_CONV_NEUTRAL = {"dilations": 1, "strides": 1, "pads": 0}
_CONV_INFERRED = ("kernel_shape",)


def _drop_default_attributes(node: onnx.NodeProto, proto: onnx.ModelProto) -> None:
    opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    schema = onnx.defs.get_schema(node.op_type, opset, node.domain)
    keep = []
    for attr in node.attribute:
        default = schema.attributes[attr.name].default_value if attr.name in schema.attributes else None
        is_default = default is not None and default.type != 0 and default == attr
        if node.op_type == "Conv" and attr.name in _CONV_NEUTRAL:
            is_default = all(v == _CONV_NEUTRAL[attr.name] for v in attr.ints)
        if node.op_type == "Conv" and attr.name in _CONV_INFERRED:
            is_default = True
        if not is_default:
            keep.append(attr)
    del node.attribute[:]
    node.attribute.extend(keep)


def _float_init_bytes(name: str, dims: Sequence[int]) -> int:
    t = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=list(dims))
    return t.ByteSize() + _field_len(9, 4 * math.prod(dims))  # raw_data is field 9


# -- one quantized layer ----------------------------------------------------------------------------------------
def _dequant_part(out: str, shape: tuple[int, ...], spec: LayerSpec,
                  stored: Mapping[str, np.ndarray]) -> tuple[list[onnx.NodeProto], list[TensorProto]]:
    """Nodes and initializers that compute the weight value ``out`` (shape ``shape``) from the packed
    tensors ``stored`` (suffix -> array: ``packed``, and ``codebook`` or ``alpha``)."""
    bits, n = spec.bits, math.prod(shape)
    nodes: list[onnx.NodeProto] = []
    inits: list[TensorProto] = []

    counter = iter(range(1 << 30))

    def v() -> str:  # short, unique intermediate names keep the graph small
        return f"{out}.{next(counter)}"

    def const(array: np.ndarray) -> str:
        name = v()
        inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def node(op: str, inputs: Sequence[str], last: bool = False, **attrs: object) -> str:
        name = out if last else v()
        nodes.append(helper.make_node(op, list(inputs), [name], **attrs))
        return name

    if "alpha" in stored:  # static binary: one scale, levels [-alpha, +alpha]
        alpha = f"{out}a"
        inits.append(numpy_helper.from_array(stored["alpha"].astype(np.float32).reshape(1), alpha))
        codebook = node("Concat", [node("Neg", [alpha]), alpha], axis=0)
    else:
        codebook = f"{out}c"
        inits.append(numpy_helper.from_array(stored["codebook"].astype(np.float32).reshape(-1), codebook))
    packed = stored["packed"].astype(np.uint8).reshape(-1)
    name_packed = f"{out}p"
    if bits == 8:  # one index per byte: the initializer already has the weight's shape
        inits.append(numpy_helper.from_array(packed.reshape(shape), name_packed))
        node("Gather", [codebook, node("Cast", [name_packed], to=TensorProto.INT32)], last=True)
        return nodes, inits
    inits.append(numpy_helper.from_array(packed.reshape(-1, 1), name_packed))
    nb = packed.size
    if 8 % bits == 0:  # whole indices per byte, least significant first: byte >> (b*k) & mask
        shifts = const(np.arange(8 // bits, dtype=np.uint8) * bits)
        fields = node("BitShift", [name_packed, shifts], direction="RIGHT")
        mask = const(np.array(2**bits - 1, dtype=np.uint8))
        index = node("Cast", [node("BitwiseAnd", [fields, mask])], to=TensorProto.INT32)
        count = nb * (8 // bits)
    else:  # indices straddle bytes: unpack the bit stream, then sum each index's b bit planes
        stream = node("BitShift", [name_packed, const(np.arange(8, dtype=np.uint8))], direction="RIGHT")
        stream = node("BitwiseAnd", [stream, const(np.array(1, dtype=np.uint8))])
        if nb * 8 != n * bits:
            stream = node("Reshape", [stream, const(np.array([-1], dtype=np.int64))])
            stream = node("Slice", [stream, const(np.array([0], dtype=np.int64)),
                                    const(np.array([n * bits], dtype=np.int64))])
        planes = node("Reshape", [stream, const(np.array([n, bits], dtype=np.int64))])
        planes = node("Cast", [planes], to=TensorProto.INT32)
        weighted = node("Mul", [planes, const((1 << np.arange(bits)).astype(np.int32))])
        index = node("ReduceSum", [weighted, const(np.array([1], dtype=np.int64))], keepdims=0)
        count = n
    values = node("Gather", [codebook, index])
    if count != n:  # the last byte's padding fields
        values = node("Reshape", [values, const(np.array([-1], dtype=np.int64))])
        values = node("Slice", [values, const(np.array([0], dtype=np.int64)),
                                const(np.array([n], dtype=np.int64))])
    node("Reshape", [values, const(np.array(shape, dtype=np.int64))], last=True)
    return nodes, inits


_PARTS: dict[tuple[str, tuple[int, ...], LayerSpec | None], int] = {}


def _part_bytes(name: str, shape: tuple[int, ...], spec: LayerSpec | None) -> int:
    """Encoded graph bytes standing for the weight ``name``: its float initializer, or its codebook part."""
    key = (name, shape, spec)
    size = _PARTS.get(key)
    if size is None:
        if spec is None:
            size = _field_len(_GRAPH_INITIALIZER, _float_init_bytes(name, shape))
        else:
            from lsv_core.quant.bitpack import packed_nbytes

            # Zeros have the byte count of real data (raw bytes of fixed length); the protos are the writer's.
            layout = spec.quantizer_class.stored_layout(spec.bits)
            stored = {"packed": np.zeros(packed_nbytes(math.prod(shape), spec.bits), np.uint8),
                      **{suffix: np.zeros(dims, np.float32) for suffix, dims in layout.items()}}
            nodes, inits = _dequant_part(name, shape, spec, stored)
            size = sum(_field_len(_GRAPH_NODE, p.ByteSize()) for p in nodes)
            size += sum(_field_len(_GRAPH_INITIALIZER, t.ByteSize()) for t in inits)
        _PARTS[key] = size
    return size


# -- public API -------------------------------------------------------------------------------------------------
def codebook_onnx_size(model: nn.Module, recipe: BitRecipe | None = None) -> int:
    """Bytes of the file :func:`save_codebook_onnx` writes for ``model`` quantized by ``recipe``.

    ``recipe=None``: as quantized now (:func:`lsv_core.quant.recipe_of`). Shapes only: no k-means, no
    writing; the first call per architecture traces it (see the module docstring).
    """
    from lsv_core.quant.quantize import recipe_of

    recipe = recipe_of(model) if recipe is None else recipe
    recipe.validate(model)
    return graph_template(model).size(recipe)


def codebook_onnx_bytes(model: nn.Module) -> bytes:
    """The serialized ONNX file of ``model`` as quantized now (float layers stay float32)."""
    from lsv_core.quant.quantize import recipe_of
    from lsv_core.quant.size import PACKED_SUFFIX, packed_tensors

    template = graph_template(model)
    recipe = recipe_of(model)
    tensors = packed_tensors(model)
    proto = onnx.ModelProto()
    proto.CopyFrom(template.skeleton)
    graph = proto.graph
    dequant: list[onnx.NodeProto] = []
    weights = {f"{layer}.weight": layer for layer in template.layers}
    for key, name, dims in template.tensors:
        spec = recipe.get(weights[key]) if key in weights else None
        if spec is None:
            array = tensors[key].numpy().astype(np.float32, copy=False)
            if tuple(array.shape) != tuple(dims):
                raise ConfigError(f"{key}: shape {tuple(array.shape)} differs from the architecture's {dims}")
            graph.initializer.append(numpy_helper.from_array(array, name))
            continue
        suffixes = (PACKED_SUFFIX, *spec.quantizer_class.stored_layout(spec.bits))
        stored = {s: tensors[f"{key}.{s}"].numpy() for s in suffixes}
        nodes, inits = _dequant_part(name, tuple(dims), spec, stored)
        dequant += nodes
        graph.initializer.extend(inits)
    graph.initializer.extend(template.extra_inits)
    # The codebook nodes only read initializers: in front of the network they keep the order topological.
    network = list(graph.node)
    del graph.node[:]
    graph.node.extend(dequant + network)
    # Every other field first, then the graph with its fixed-width length (fields may come in any order).
    graph_bytes = graph.SerializeToString()
    proto.ClearField("graph")
    data = proto.SerializeToString() + _graph_field_header(len(graph_bytes)) + graph_bytes
    expected = template.size(recipe)
    if len(data) != expected:
        raise AssertionError(f"codebook ONNX of {template.arch_key}: {len(data)} bytes written, size model says "
                             f"{expected}; the size accounting is out of step with the writer")
    return data


def save_codebook_onnx(model: nn.Module, path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """Write ``model`` (quantized or not) as the codebook ONNX, atomically; the file has exactly
    :func:`codebook_onnx_size` bytes. Input ``fbank`` ``(batch, frames, feat_dim)``, output ``embedding``.

    Raises:
        RefuseOverwrite: ``path`` exists and ``overwrite`` is False.
        ConfigError: ``model`` has no ``arch``.
    """
    data = codebook_onnx_bytes(model)
    with atomic_path(path, overwrite=overwrite) as tmp:
        tmp.write_bytes(data)
    return Path(path)
