"""Vectorised bit packing of k-bit codes (k ∈ {1, 2, 4, 8}) into bytes and back.

Layout: codes are taken in order and grouped 8/k to a byte; within a byte the FIRST code sits in
the LEAST significant bits ("little-endian" code order: byte = Σ_j code[j] << (k·j)). The last
byte is padded with zero codes. Packed size is ceil(count·k/8) bytes. Whole-array tensor ops
(shift, sum over the group axis) replace the per-byte Python loop of the reference code.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

PACK_BITS: tuple[int, ...] = (1, 2, 4, 8)


def _check(bits: int) -> int:
    if isinstance(bits, bool) or bits not in PACK_BITS:
        raise ValueError(f"bits={bits!r} cannot be packed; choose one of {PACK_BITS}")
    return bits


def _shifts(bits: int, device: torch.device) -> Tensor:
    return torch.arange(0, 8, bits, dtype=torch.uint8, device=device)


def packed_size(count: int, bits: int) -> int:
    """Bytes needed for ``count`` codes of ``bits`` bits: ceil(count·bits/8)."""
    return math.ceil(count * _check(bits) / 8)


def pack_bits(codes: Tensor, bits: int) -> Tensor:
    """Pack uint8 ``codes`` (any shape, flattened in C order; each < 2**bits) into a 1-D uint8 tensor."""
    _check(bits)
    if codes.dtype != torch.uint8:
        raise TypeError(f"codes must be uint8, got {codes.dtype}")
    flat = codes.reshape(-1)
    if bits == 8:
        return flat.clone()
    if flat.numel() and bool((flat >> bits).any()):
        raise ValueError(f"codes must be < {2 ** bits} for {bits} bits, got max {int(flat.max())}")
    per_byte = 8 // bits
    pad = (-flat.numel()) % per_byte
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    groups = flat.view(-1, per_byte) << _shifts(bits, flat.device)
    # the shifted codes occupy disjoint bits, so their sum is their bitwise OR and cannot overflow
    return groups.sum(dim=1, dtype=torch.uint8)


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
    if bits == 8:
        return flat.clone()
    mask = (1 << bits) - 1
    codes = (flat.unsqueeze(1) >> _shifts(bits, flat.device)) & mask
    return codes.reshape(-1)[:count].contiguous()
