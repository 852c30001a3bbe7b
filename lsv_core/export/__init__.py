"""Export formats: the deployable ONNX that keeps the codebooks, the packed model, WeSpeaker, bundles.

Import from here: ``save_codebook_onnx`` / ``codebook_onnx_size`` (``model.onnx``, the file a user ships
and whose bytes are the size objective), ``save_packed``, ``load_packed``, ``read_packed_header``,
``pack_bits``, ``unpack_bits`` (the packed safetensors for lsv-quant itself).
"""

from lsv_core.export.onnx_codebook import CODEBOOK_ONNX_FORMAT, codebook_onnx_size, save_codebook_onnx
from lsv_core.export.packed import (
    PACKED_FORMAT,
    load_packed,
    pack_bits,
    read_packed_header,
    save_packed,
    unpack_bits,
)

__all__ = ["CODEBOOK_ONNX_FORMAT", "PACKED_FORMAT", "codebook_onnx_size", "load_packed", "pack_bits",
           "read_packed_header", "save_codebook_onnx", "save_packed", "unpack_bits"]
