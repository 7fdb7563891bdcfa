"""Vectorised bit packing of k-bit codes (k ∈ {1, 2, 4, 8}) into bytes and back.

Layout: codes are taken in order and grouped 8/k to a byte; within a byte the FIRST code sits in
the LEAST significant bits ("little-endian" code order: byte = Σ_j code[j] << (k·j)). The last
byte is padded with zero codes. Packed size is ceil(count·k/8) bytes. Whole-array tensor ops
replace the per-byte Python loop of the reference code: on CPU the codes go through numpy
(``numpy.packbits``/``unpackbits`` with little bit order for 1 bit, which is exactly this layout;
column-wise shifts for 2 and 4 bits), elsewhere the same column-wise shifts run as torch ops on
the tensor's own device. Single-threaded numpy is also the steadier choice on a busy 2-core CPU,
where torch's intra-op threads were measured to stall (benchmarks/bench_packing.py).
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

PACK_BITS: tuple[int, ...] = (1, 2, 4, 8)


def _check(bits: int) -> int:
    if isinstance(bits, bool) or bits not in PACK_BITS:
        raise ValueError(f"bits={bits!r} cannot be packed; choose one of {PACK_BITS}")
    return bits


def packed_size(count: int, bits: int) -> int:
    """Bytes needed for ``count`` codes of ``bits`` bits: ceil(count·bits/8)."""
    return math.ceil(count * _check(bits) / 8)


def pack_bits(codes: Tensor, bits: int) -> Tensor:
    """Pack uint8 ``codes`` (any shape, flattened in C order; each < 2**bits) into a 1-D uint8 tensor."""
    _check(bits)
    if codes.dtype != torch.uint8:
        raise TypeError(f"codes must be uint8, got {codes.dtype}")
    flat = codes.reshape(-1)
    if flat.device.type == "cpu":
        if bits == 8:
            return torch.from_numpy(flat.numpy().copy())
        array = flat.numpy()
        if array.size and (array >> np.uint8(bits)).any():
            raise ValueError(f"codes must be < {2 ** bits} for {bits} bits, got max {int(array.max())}")
        pad = (-array.size) % (8 // bits)
        if pad:
            array = np.concatenate([array, np.zeros(pad, dtype=np.uint8)])
        return torch.from_numpy(_pack_numpy(array, bits))
    if flat.numel() and bool((flat >> bits).any()):
        raise ValueError(f"codes must be < {2 ** bits} for {bits} bits, got max {int(flat.max())}")
    pad = (-flat.numel()) % (8 // bits)
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.clone() if bits == 8 else _pack_torch(flat, bits)


def _pack_numpy(flat: np.ndarray, bits: int) -> np.ndarray:
    if bits == 1:
        return np.packbits(flat, bitorder="little")
    groups = flat.reshape(-1, 8 // bits)
    out = groups[:, 0].copy()
    for j in range(1, groups.shape[1]):
        out |= groups[:, j] << np.uint8(bits * j)
    return out


def _pack_torch(flat: Tensor, bits: int) -> Tensor:
    groups = flat.view(-1, 8 // bits)
    out = groups[:, 0].clone()
    for j in range(1, groups.shape[1]):
        out |= groups[:, j] << (bits * j)
    return out


def unpack_bits(packed: Tensor, bits: int, count: int) -> Tensor:
    """The first ``count`` codes (1-D uint8) stored in ``packed`` by :func:`pack_bits`."""
    _check(bits)
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed codes must be uint8, got {packed.dtype}")
    flat = packed.reshape(-1)
    expected = packed_size(count, bits)
    if flat.numel() != expected:
        raise ValueError(
            f"{count} codes of {bits} bits need {expected} packed bytes, got {flat.numel()}"
        )
    if flat.device.type == "cpu":
        return torch.from_numpy(_unpack_numpy(flat.numpy(), bits, count))
    return flat.clone() if bits == 8 else _unpack_torch(flat, bits, count)


def _unpack_numpy(flat: np.ndarray, bits: int, count: int) -> np.ndarray:
    if bits == 8:
        return flat.copy()
    if bits == 1:
        return np.unpackbits(flat, count=count, bitorder="little")
    per_byte, mask = 8 // bits, np.uint8((1 << bits) - 1)
    out = np.empty((flat.size, per_byte), dtype=np.uint8)
    for j in range(per_byte):
        out[:, j] = (flat >> np.uint8(bits * j)) & mask
    return out.reshape(-1)[:count].copy()


def _unpack_torch(flat: Tensor, bits: int, count: int) -> Tensor:
    per_byte, mask = 8 // bits, (1 << bits) - 1
    out = flat.new_empty((flat.numel(), per_byte))
    for j in range(per_byte):
        out[:, j] = (flat >> (bits * j)) & mask
    return out.reshape(-1)[:count].contiguous()
