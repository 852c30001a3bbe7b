"""Bit packing of codebook indices: ``b``-bit integers stored densely in uint8 bytes.

Layout (the packed file relies on it): the indices form one little-endian bit stream; index ``i``
occupies stream bits ``i*b .. i*b+b-1`` (least significant bit first), and stream bit ``j`` is bit
``j % 8`` of byte ``j // 8``; the last byte is zero-padded. So ``n`` indices take
``ceil(n * b / 8)`` bytes, for any ``b`` in 1..8 (3-bit indices straddle byte boundaries).

Pure functions; numpy arrays and torch tensors (any device) are accepted and the same kind is returned.
"""

from __future__ import annotations

from typing import TypeVar

import numpy as np
import torch

__all__ = ["pack_bits", "packed_nbytes", "unpack_bits"]

ArrayT = TypeVar("ArrayT", np.ndarray, torch.Tensor)


def packed_nbytes(n: int, bits: int) -> int:
    """Bytes that ``n`` indices of ``bits`` bits take when packed: ``ceil(n * bits / 8)``."""
    _check_bits(bits)
    if n < 0:
        raise ValueError(f"n={n} should be >= 0")
    return (n * bits + 7) // 8


def pack_bits(indices: ArrayT, bits: int) -> ArrayT:
    """Pack integer ``indices`` (any shape, flattened; each in ``[0, 2**bits)``) into a 1-D uint8 array."""
    _check_bits(bits)
    if isinstance(indices, torch.Tensor):
        if indices.is_floating_point() or indices.is_complex() or indices.dtype == torch.bool:
            raise ValueError(f"indices should be integers, got dtype {indices.dtype}")
        flat = indices.reshape(-1)
        _check_range(int(flat.min()) if flat.numel() else 0, int(flat.max()) if flat.numel() else 0, bits)
        flat = flat.to(torch.uint8)
        if bits == 8:
            return flat.clone()
        device = flat.device
        shifts = torch.arange(bits, device=device, dtype=torch.uint8)
        stream = ((flat.unsqueeze(1) >> shifts) & 1).reshape(-1)
        pad = (-stream.numel()) % 8
        if pad:
            stream = torch.cat([stream, stream.new_zeros(pad)])
        weights = torch.arange(8, device=device, dtype=torch.uint8)
        return (stream.reshape(-1, 8) << weights).sum(dim=1, dtype=torch.int32).to(torch.uint8)
    arr = np.asarray(indices)
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"indices should be integers, got dtype {arr.dtype}")
    flat_np = arr.reshape(-1)
    _check_range(int(flat_np.min()) if flat_np.size else 0, int(flat_np.max()) if flat_np.size else 0, bits)
    flat_np = flat_np.astype(np.uint8)
    if bits == 8:
        return flat_np.copy()
    planes = ((flat_np[:, None] >> np.arange(bits, dtype=np.uint8)) & 1).astype(np.uint8)
    return np.packbits(planes.reshape(-1), bitorder="little")


def unpack_bits(packed: ArrayT, bits: int, n: int) -> ArrayT:
    """Inverse of :func:`pack_bits`: the first ``n`` indices (uint8, 1-D) from ``packed``."""
    _check_bits(bits)
    expected = packed_nbytes(n, bits)
    if isinstance(packed, torch.Tensor):
        if packed.dtype != torch.uint8 or packed.dim() != 1:
            raise ValueError(f"packed should be a 1-D uint8 tensor, got {packed.dtype} {tuple(packed.shape)}")
        if packed.numel() != expected:
            raise ValueError(f"packed has {packed.numel()} bytes; {n} indices of {bits} bits need {expected}")
        if bits == 8:
            return packed.clone()
        device = packed.device
        stream = ((packed.unsqueeze(1) >> torch.arange(8, device=device, dtype=torch.uint8)) & 1).reshape(-1)
        planes = stream[: n * bits].reshape(n, bits)
        weights = torch.arange(bits, device=device, dtype=torch.uint8)
        return (planes << weights).sum(dim=1, dtype=torch.int32).to(torch.uint8)
    arr = np.asarray(packed)
    if arr.dtype != np.uint8 or arr.ndim != 1:
        raise ValueError(f"packed should be a 1-D uint8 array, got {arr.dtype} {arr.shape}")
    if arr.size != expected:
        raise ValueError(f"packed has {arr.size} bytes; {n} indices of {bits} bits need {expected}")
    if bits == 8:
        return arr.copy()
    planes_np = np.unpackbits(arr, count=n * bits, bitorder="little").reshape(n, bits)
    return (planes_np << np.arange(bits, dtype=np.uint8)).sum(axis=1, dtype=np.int32).astype(np.uint8)


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not 1 <= bits <= 8:
        raise ValueError(f"bits={bits!r} should be an integer in 1..8")


def _check_range(lo: int, hi: int, bits: int) -> None:
    if lo < 0 or hi >= 2**bits:
        raise ValueError(f"indices should lie in [0, {2**bits}) for bits={bits}, got range [{lo}, {hi}]")
