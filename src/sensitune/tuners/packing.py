"""Vectorised bit packing of k-bit codes (k ∈ {1, 2, 4, 8}) into bytes and back.

Layout: codes are taken in order and grouped 8/k to a byte; within a byte the FIRST code sits in
the LEAST significant bits ("little-endian" code order: byte = Σ_j code[j] << (k·j)). The last
byte is padded with zero codes. Packed size is ceil(count·k/8) bytes. Whole-array tensor ops
replace the per-byte Python loop of the reference code: on CPU the codes go through numpy
(``numpy.packbits``/``unpackbits`` with little bit order for 1 bit, which is exactly this layout;
column-wise shifts for 2 and 4 bits), elsewhere the same column-wise shifts run as torch ops on
the tensor's own device. Single-threaded numpy is also the steadier choice on a busy 2-core CPU,
where torch's intra-op threads were measured to stall (benchmarks/bench_packing.py).

:func:`pack_uints` / :func:`unpack_uints` extend the same layout to any width from 1 to 63 bits
(the sparse indices of a delta, at ceil(log2 numel) bits each): value j takes bits
[j·bits, (j+1)·bits) of a little-endian bit stream, so for 1, 2, 4 and 8 bits they give exactly
:func:`pack_bits`' bytes.
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


#: values per step of pack_uints / unpack_uints: a multiple of 8, so each step ends on a byte
#: boundary, and small enough that the 64-bit-per-value scratch arrays stay a few MB
_UINT_CHUNK = 1 << 16


def _check_width(bits: int) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 63:
        raise ValueError(f"bits={bits!r}: packed integers take 1 to 63 bits")
    return bits


def pack_uints(values: Tensor, bits: int) -> Tensor:
    """Non-negative integers (any integer dtype, each < 2**bits) as a 1-D uint8 tensor of
    ceil(count·bits/8) bytes: value j at stream bits [j·bits, (j+1)·bits), least significant first."""
    _check_width(bits)
    if values.dtype.is_floating_point or values.dtype.is_complex or values.dtype == torch.bool:
        raise TypeError(f"values must be integers, got {values.dtype}")
    flat = values.detach().reshape(-1).to("cpu", torch.int64).numpy()
    if flat.size and (int(flat.min()) < 0 or int(flat.max()) >> bits):
        raise ValueError(f"values must lie in [0, {2 ** bits}) for {bits} bits, got "
                         f"[{int(flat.min())}, {int(flat.max())}]")
    words = flat.astype("<u8")  # little-endian bytes: byte k of a row holds value bits 8k..8k+7
    out = [np.packbits(np.unpackbits(words[s:s + _UINT_CHUNK].view(np.uint8).reshape(-1, 8), axis=1,
                                     bitorder="little")[:, :bits].reshape(-1), bitorder="little")
           for s in range(0, words.size, _UINT_CHUNK)]
    return torch.from_numpy(np.concatenate(out)) if out else torch.zeros(0, dtype=torch.uint8)


def unpack_uints(packed: Tensor, bits: int, count: int) -> Tensor:
    """The ``count`` integers (1-D int64) that :func:`pack_uints` stored in ``packed`` at ``bits`` bits.

    ``packed`` must hold exactly ceil(count·bits/8) bytes with zero padding bits in the last
    one (the encoding is canonical), else ValueError.
    """
    _check_width(bits)
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed integers must be uint8, got {packed.dtype}")
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    flat = packed.detach().reshape(-1).cpu().numpy()
    expected = math.ceil(count * bits / 8)
    if flat.size != expected:
        raise ValueError(f"{count} integers of {bits} bits need {expected} packed bytes, got {flat.size}")
    tail = count * bits % 8
    if tail and int(flat[-1]) >> tail:
        raise ValueError(f"the last packed byte has non-zero padding bits ({int(flat[-1]):#04x}, {tail} bits used)")
    out = np.empty(count, dtype="<u8")
    wide = np.zeros((min(count, _UINT_CHUNK), 64), dtype=np.uint8)
    for s in range(0, count, _UINT_CHUNK):
        n = min(_UINT_CHUNK, count - s)
        start = s * bits // 8  # s is a multiple of 8: a byte boundary
        wide[:n, :bits] = np.unpackbits(flat[start:start + math.ceil(n * bits / 8)], count=n * bits,
                                        bitorder="little").reshape(n, bits)
        out[s:s + n] = np.packbits(wide[:n], axis=1, bitorder="little").view("<u8").reshape(-1)
    return torch.from_numpy(out.view(np.int64))
