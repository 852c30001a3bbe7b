"""Export formats: the packed deployable model (bit-packed codebook indices in safetensors).

Import from here: ``save_packed``, ``load_packed``, ``read_packed_header``, ``pack_bits``, ``unpack_bits``.
"""

from lsv_core.export.packed import (
    PACKED_FORMAT,
    load_packed,
    pack_bits,
    read_packed_header,
    save_packed,
    unpack_bits,
)

__all__ = ["PACKED_FORMAT", "load_packed", "pack_bits", "read_packed_header", "save_packed", "unpack_bits"]
