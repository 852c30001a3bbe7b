"""The deployable file: an ONNX graph that keeps the codebooks, and its exact size from shapes alone.

``model.onnx`` is what a user ships to a device and what ``infer.py`` runs; its byte count is the size
objective of the search (:func:`lsv_core.quant.size.packed_size_bytes` returns :func:`codebook_onnx_size`).

What the file holds, for the ``j``-th quantizable Conv/Linear layer (names are short because every name
is stored twice, as an initializer and as a node input, and a small model's graph would otherwise be a
large part of its bytes; :attr:`GraphTemplate.layers` and the model card give the mapping):

* quantized: ``w<j>p``, the bit-packed ``uint8`` indices (byte for byte those of
  ``model.packed.safetensors``, little-endian bit stream, see ``lsv_core/quant/bitpack.py``), and
  ``w<j>c``, the ``2^b`` float32 levels (adaptive binary: two), or ``w<j>a``, one float32 scale (static
  binary: levels ``[-a, +a]``). Standard ONNX ops rebuild the weight ``w<j>`` in front of the float
  ``Conv``/``Gemm``: ``BitShift`` and ``BitwiseAnd`` unpack the indices (widths that do not divide 8
  unpack bit planes and sum them), ``Cast``, ``Gather`` on the codebook, ``Reshape``;
* float: ``w<j>``, the float32 weight.

**BatchNorm is folded** into the convolution it follows (``Conv -> BatchNormalization`` pairs; any other
BatchNorm stays a node): with ``s = gamma / sqrt(var + eps)`` the conv gets the bias
``beta + (b - mean) * s`` (``w<j>b``), a float weight is stored as ``W * s``, and a quantized weight keeps
its codebook and is multiplied by ``s`` (``w<j>s``, one float per output channel) after the ``Gather``.
So the codebooks are exactly the quantized torch model's, and the file stores 2 floats per BatchNorm
channel instead of 4. Every dequantization node reads only initializers, so onnxruntime folds them into
plain weights once, when it creates a session: inference runs the float graph of the dequantized float
ONNX (``bench/deploy.py`` measures both).

Exact size without writing anything: the graph comes from tracing a fresh network of the model's
architecture once per process (cached), with every floating tensor set to distinct values (the
TorchScript exporter would otherwise merge equal tensors, e.g. the ones of untrained BatchNorms), then
made canonical (BatchNorms folded, ``Constant`` nodes turned into initializers, no node names or doc
strings, no attribute that restates its default, short names, fixed producer and metadata) so that
nothing in it depends on weight values, torch's naming or the time. A protobuf message is the sum of its
fields, and the graph's own length is written as a fixed-width varint, so the file is a fixed part plus,
per quantizable layer, the encoded bytes of what stands for its weight. Those parts are measured once
per (layer, spec) from the very protos the writer emits, and cached: a size query adds a few dozen
integers, and sizes are exactly additive over layers.
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
    "GraphTemplate",
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
_BN_EPS_DEFAULT = 1e-5  # ONNX BatchNormalization's default epsilon

# Field numbers (onnx.proto) of the repeated fields whose elements the size sums.
_GRAPH_NODE, _GRAPH_INITIALIZER, _MODEL_GRAPH, _TENSOR_RAW_DATA = 1, 5, 7, 9


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


def _float_init_bytes(name: str, dims: Sequence[int]) -> int:
    """Encoded bytes of a float32 initializer (as a graph field) of ``dims``, data included."""
    t = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=list(dims))
    return _field_len(_GRAPH_INITIALIZER, t.ByteSize() + _field_len(_TENSOR_RAW_DATA, 4 * math.prod(dims)))


# -- the graph template ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Fold:
    """A BatchNorm folded into the convolution before it (see the module docstring)."""

    bn: str  # the BatchNorm's state-dict prefix
    eps: float
    affine: bool  # whether it has weight and bias (else 1 and 0)
    conv_bias: str | None  # state key of the convolution's own bias, folded in too
    bias_name: str  # ONNX name of the folded bias


@dataclass(frozen=True)
class LayerSlot:
    """Where a quantizable layer's weight goes: its ONNX value name, shape and BatchNorm fold (if any)."""

    name: str
    shape: tuple[int, ...]
    fold: Fold | None


@dataclass(frozen=True)
class GraphTemplate:
    """The canonical graph of one architecture, without the tensors' data.

    ``skeleton`` holds the network's nodes (topologically sorted), the graph's input, output and
    metadata, and ``constants`` (what were ``Constant`` nodes); ``stored`` lists the state tensors kept
    as they are, as ``(state-dict key, ONNX name, dims)``; ``layers`` maps each quantizable layer to its
    :class:`LayerSlot`. Byte counts are exact encodings (module docstring).
    """

    arch_key: str
    skeleton: onnx.ModelProto
    constants: tuple[TensorProto, ...]
    stored: tuple[tuple[str, str, tuple[int, ...]], ...]
    layers: Mapping[str, LayerSlot]
    fixed_graph_bytes: int  # skeleton graph, constants, stored tensors, folded biases
    model_other_bytes: int  # every ModelProto field but the graph

    def size(self, recipe: BitRecipe) -> int:
        """Bytes of the file for ``recipe`` (layers not in it stay float32)."""
        graph = self.fixed_graph_bytes
        for layer, slot in self.layers.items():
            graph += _part_bytes(slot.name, slot.shape, recipe.get(layer), slot.fold is not None)
        return self.model_other_bytes + 1 + _GRAPH_LENGTH_BYTES + graph


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
        try:
            torch.onnx.export(
                net, (torch.zeros(1, _TRACE_FRAMES, feat_dim),), buf, dynamo=False, opset_version=CODEBOOK_OPSET,
                # PRESERVE (the net is in eval mode) keeps the BatchNormalization nodes with their tensors under
                # their state-dict names; EVAL would fold them into weights we then could not tell apart.
                training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=True,
                input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch", 1: "frames"}, OUTPUT_NAME: {0: "batch"}},
            )
        except Exception as err:  # an op without an ONNX export (plugin networks): the file cannot exist
            raise ConfigError(f"{arch['name']}: cannot be exported to ONNX opset {CODEBOOK_OPSET}, so it has no "
                              f"deployable file or size ({type(err).__name__}: {str(err)[:300]})") from None
    return onnx.load_from_string(buf.getvalue()), net


def _build_template(arch: dict, key: str) -> GraphTemplate:
    proto, net = _trace(arch)
    state = {k: tuple(v.shape) for k, v in net.state_dict().items() if v.is_floating_point()}
    weights = {f"{name}.weight": (j, name) for j, name in enumerate(quantizable_layers(net))}
    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    missing = [k for k in weights if k not in inits]
    if missing:
        raise ConfigError(f"{arch['name']}: the traced graph has no initializer for {missing[:3]}; layer "
                          "weights must be plain parameters to be stored as codebooks")
    folds, folded_keys = _fold_batchnorms(graph, weights, state)
    names: dict[str, str] = {}
    stored, constants = [], []
    for init in graph.initializer:
        if init.name in weights:
            names[init.name] = f"w{weights[init.name][0]}"
        elif init.name in folded_keys:
            continue
        elif init.name in state and init.data_type == TensorProto.FLOAT:
            names[init.name] = f"t{len(stored)}"
            stored.append((init.name, names[init.name], tuple(init.dims)))
        else:  # not a state tensor (none in these networks): kept verbatim
            names[init.name] = f"c{len(names)}"
            constants.append(_renamed(init, names[init.name]))
    del graph.initializer[:]
    constants += _constants_to_initializers(graph, names)
    _canonicalize(proto, arch, names)
    layers = {name: LayerSlot(f"w{j}", state[k], folds.get(name)) for k, (j, name) in weights.items()}
    fixed = proto.graph.ByteSize() + sum(_field_len(_GRAPH_INITIALIZER, t.ByteSize()) for t in constants)
    fixed += sum(_float_init_bytes(name, dims) for _, name, dims in stored)
    fixed += sum(_float_init_bytes(s.fold.bias_name, s.shape[:1]) for s in layers.values() if s.fold)
    other = onnx.ModelProto()
    other.CopyFrom(proto)
    other.ClearField("graph")
    return GraphTemplate(key, proto, tuple(constants), tuple(stored), layers, fixed, other.ByteSize())


def _fold_batchnorms(graph: onnx.GraphProto, weights: Mapping[str, tuple[int, str]],
                     state: Mapping[str, tuple[int, ...]]) -> tuple[dict[str, Fold], set[str]]:
    """Fold every BatchNormalization that is the only reader of a quantizable Conv's output into that Conv
    (the graph is edited: the Conv takes the folded bias and the BatchNorm's output name). Returns the
    folds by layer and the state keys no longer stored (BatchNorm tensors, folded conv biases)."""
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    outputs = {v.name for v in graph.output}
    folds: dict[str, Fold] = {}
    gone: set[str] = set()
    dropped: list[onnx.NodeProto] = []
    for conv in graph.node:
        if conv.op_type != "Conv" or len(conv.input) < 2 or conv.input[1] not in weights:
            continue
        after = readers.get(conv.output[0], [])
        if len(after) != 1 or after[0].op_type != "BatchNormalization" or conv.output[0] in outputs:
            continue
        bn = after[0]
        attrs = {a.name: helper.get_attribute_value(a) for a in bn.attribute}
        prefix = bn.input[3].removesuffix(".running_mean")
        if attrs.get("training_mode", 0) or bn.input[3] != f"{prefix}.running_mean" or \
                bn.input[4] != f"{prefix}.running_var" or bn.input[3] not in state:
            continue
        affine = bn.input[1] == f"{prefix}.weight" and bn.input[2] == f"{prefix}.bias"
        if not affine and (bn.input[1] in state or bn.input[2] in state):
            continue
        layer_j, layer = weights[conv.input[1]]
        conv_bias = conv.input[2] if len(conv.input) > 2 and conv.input[2] else None
        folds[layer] = Fold(prefix, float(attrs.get("epsilon", _BN_EPS_DEFAULT)), affine, conv_bias, f"w{layer_j}b")
        gone |= {bn.input[3], bn.input[4], *([bn.input[1], bn.input[2]] if affine else []),
                 *([conv_bias] if conv_bias else [])}
        del conv.input[2:]
        conv.input.append(folds[layer].bias_name)
        conv.output[0] = bn.output[0]
        dropped.append(bn)
    for bn in dropped:
        graph.node.remove(bn)
    return folds, gone


def _renamed(tensor: TensorProto, name: str) -> TensorProto:
    out = TensorProto()
    out.CopyFrom(tensor)
    out.name = name
    return out


def _constants_to_initializers(graph: onnx.GraphProto, names: dict[str, str]) -> list[TensorProto]:
    """``Constant`` nodes holding a tensor become initializers (the same data, fewer bytes)."""
    out, keep = [], []
    for node in graph.node:
        if node.op_type == "Constant" and len(node.attribute) == 1 and node.attribute[0].name == "value":
            names[node.output[0]] = f"c{len(names)}"
            out.append(_renamed(node.attribute[0].t, names[node.output[0]]))
        else:
            keep.append(node)
    del graph.node[:]
    graph.node.extend(keep)
    return out


def _canonicalize(proto: onnx.ModelProto, arch: dict, names: Mapping[str, str]) -> None:
    """Make the skeleton independent of torch's naming and versions, and small (module docstring)."""
    graph = proto.graph
    renamed = dict(names)
    keep = {v.name for v in graph.input} | {v.name for v in graph.output}
    fresh = 0
    for node in graph.node:
        # ClearField, not = "": an empty string is still a field of 2 bytes in proto2.
        node.ClearField("name")
        node.ClearField("doc_string")
        for i, name in enumerate(node.input):
            node.input[i] = renamed.get(name, name)
        for i, name in enumerate(node.output):
            if name and name not in keep:
                renamed[name] = node.output[i] = f"v{fresh}"
                fresh += 1
        _drop_default_attributes(node, proto)
    del graph.value_info[:]
    graph.name = "lsv"
    graph.ClearField("doc_string")
    proto.producer_name = "lsv-quant"
    proto.ClearField("producer_version")
    proto.ClearField("doc_string")
    del proto.metadata_props[:]
    for k, v in (("lsv.format", CODEBOOK_ONNX_FORMAT),
                 ("lsv.arch", json.dumps(arch, sort_keys=True, separators=(",", ":")))):
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


# -- one quantized layer ----------------------------------------------------------------------------------------
def _dequant_part(out: str, shape: tuple[int, ...], spec: LayerSpec, stored: Mapping[str, np.ndarray],
                  scale: np.ndarray | None) -> tuple[list[onnx.NodeProto], list[TensorProto]]:
    """Nodes and initializers that compute the weight value ``out`` (shape ``shape``) from the packed
    tensors ``stored`` (suffix -> array: ``packed``, and ``codebook`` or ``alpha``), times the per-channel
    ``scale`` of a folded BatchNorm when given."""
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

    def node(op: str, inputs: Sequence[str], **attrs: object) -> str:
        name = v()
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
        values = node("Gather", [codebook, node("Cast", [name_packed], to=TensorProto.INT32)])
    else:
        values = _unpacked(name_packed, packed, bits, n, codebook, inits, node, const)
        values = node("Reshape", [values, const(np.array(shape, dtype=np.int64))])
    if scale is not None:
        inits.append(numpy_helper.from_array(scale.astype(np.float32).reshape(-1, *[1] * (len(shape) - 1)), f"{out}s"))
        values = node("Mul", [values, f"{out}s"])
    nodes[-1].output[0] = out
    return nodes, inits


def _unpacked(name_packed: str, packed: np.ndarray, bits: int, n: int, codebook: str, inits: list[TensorProto],
              node: object, const: object) -> str:
    """The flat ``n`` codebook values of the bit-packed indices (bits 1..7)."""
    inits.append(numpy_helper.from_array(packed.reshape(-1, 1), name_packed))
    nb = packed.size
    if 8 % bits == 0:  # whole indices per byte, least significant first: byte >> (b*k) & mask
        fields = node("BitShift", [name_packed, const(np.arange(8 // bits, dtype=np.uint8) * bits)],
                      direction="RIGHT")
        index = node("Cast", [node("BitwiseAnd", [fields, const(np.array(2**bits - 1, dtype=np.uint8))])],
                     to=TensorProto.INT32)
        count = nb * (8 // bits)
    else:  # indices straddle bytes: unpack the bit stream, then sum each index's b bit planes
        stream = node("BitShift", [name_packed, const(np.arange(8, dtype=np.uint8))], direction="RIGHT")
        stream = node("BitwiseAnd", [stream, const(np.array(1, dtype=np.uint8))])
        if nb * 8 != n * bits:
            stream = node("Reshape", [stream, const(np.array([-1], dtype=np.int64))])
            stream = node("Slice", [stream, const(np.array([0], dtype=np.int64)),
                                    const(np.array([n * bits], dtype=np.int64))])
        planes = node("Cast", [node("Reshape", [stream, const(np.array([n, bits], dtype=np.int64))])],
                      to=TensorProto.INT32)
        weighted = node("Mul", [planes, const((1 << np.arange(bits)).astype(np.int32))])
        index = node("ReduceSum", [weighted, const(np.array([1], dtype=np.int64))], keepdims=0)
        count = n
    values = node("Gather", [codebook, index])
    if count != n:  # the last byte's padding fields
        values = node("Reshape", [values, const(np.array([-1], dtype=np.int64))])
        values = node("Slice", [values, const(np.array([0], dtype=np.int64)), const(np.array([n], dtype=np.int64))])
    return values


_PARTS: dict[tuple[str, tuple[int, ...], LayerSpec | None, bool], int] = {}


def _part_bytes(name: str, shape: tuple[int, ...], spec: LayerSpec | None, folded: bool) -> int:
    """Encoded graph bytes standing for the weight ``name``: its float initializer, or its codebook part."""
    key = (name, shape, spec, folded)
    size = _PARTS.get(key)
    if size is None:
        if spec is None:
            size = _float_init_bytes(name, shape)
        else:
            from lsv_core.quant.bitpack import packed_nbytes

            # Zeros have the byte count of real data (raw bytes of fixed length); the protos are the writer's.
            layout = spec.quantizer_class.stored_layout(spec.bits)
            stored = {"packed": np.zeros(packed_nbytes(math.prod(shape), spec.bits), np.uint8),
                      **{suffix: np.zeros(dims, np.float32) for suffix, dims in layout.items()}}
            nodes, inits = _dequant_part(name, shape, spec, stored, np.zeros(shape[0]) if folded else None)
            size = sum(_field_len(_GRAPH_NODE, p.ByteSize()) for p in nodes)
            size += sum(_field_len(_GRAPH_INITIALIZER, t.ByteSize()) for t in inits)
        _PARTS[key] = size
    return size


def _folded(tensors: Mapping[str, torch.Tensor], fold: Fold, channels: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel scale and the conv's new bias, float64: ``s = gamma / sqrt(var + eps)``,
    ``bias = beta + (b - mean) * s``."""
    def get(key: str, default: float) -> np.ndarray:
        return tensors[key].double().numpy() if key in tensors else np.full(channels, default)

    gamma = get(f"{fold.bn}.weight", 1.0) if fold.affine else np.ones(channels)
    beta = get(f"{fold.bn}.bias", 0.0) if fold.affine else np.zeros(channels)
    scale = gamma / np.sqrt(tensors[f"{fold.bn}.running_var"].double().numpy() + fold.eps)
    conv_bias = tensors[fold.conv_bias].double().numpy() if fold.conv_bias else 0.0
    return scale, beta + (conv_bias - tensors[f"{fold.bn}.running_mean"].double().numpy()) * scale


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
    from lsv_core.quant.layout import PACKED_SUFFIX, packed_tensors
    from lsv_core.quant.quantize import recipe_of

    template = graph_template(model)
    recipe = recipe_of(model)
    tensors = packed_tensors(model)
    proto = onnx.ModelProto()
    proto.CopyFrom(template.skeleton)
    graph = proto.graph
    for key, name, dims in template.stored:
        graph.initializer.append(numpy_helper.from_array(_checked(tensors, key, dims), name))
    graph.initializer.extend(template.constants)
    dequant: list[onnx.NodeProto] = []
    for layer, slot in template.layers.items():
        spec = recipe.get(layer)
        scale = None
        if slot.fold is not None:
            scale, bias = _folded(tensors, slot.fold, slot.shape[0])
            graph.initializer.append(numpy_helper.from_array(bias.astype(np.float32), slot.fold.bias_name))
        if spec is None:
            weight = _checked(tensors, f"{layer}.weight", slot.shape).astype(np.float64 if scale is not None else np.float32)
            if scale is not None:
                weight = (weight * scale.reshape(-1, *[1] * (len(slot.shape) - 1))).astype(np.float32)
            graph.initializer.append(numpy_helper.from_array(weight, slot.name))
            continue
        suffixes = (PACKED_SUFFIX, *spec.quantizer_class.stored_layout(spec.bits))
        stored = {s: tensors[f"{layer}.weight.{s}"].numpy() for s in suffixes}
        nodes, inits = _dequant_part(slot.name, slot.shape, spec, stored, scale)
        dequant += nodes
        graph.initializer.extend(inits)
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
        raise AssertionError(f"codebook ONNX of {template.arch_key}: {len(data)} bytes written, the size model "
                             f"says {expected}; the size accounting is out of step with the writer")
    return data


def _checked(tensors: Mapping[str, torch.Tensor], key: str, dims: Sequence[int]) -> np.ndarray:
    array = tensors[key].numpy().astype(np.float32, copy=False)
    if tuple(array.shape) != tuple(dims):
        raise ConfigError(f"{key}: shape {tuple(array.shape)} differs from the architecture's {tuple(dims)}")
    return array


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
