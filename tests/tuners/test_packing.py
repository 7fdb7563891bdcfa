"""Bit packing: identity at every width and odd size, documented byte layout, bad input."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sensitune.tuners.packing import pack_bits, packed_size, unpack_bits

SIZES = (0, 1, 2, 3, 5, 7, 8, 9, 15, 17, 31, 1000, 4097)


@pytest.mark.parametrize("bits", (1, 2, 4, 8))
@pytest.mark.parametrize("count", SIZES)
def test_pack_unpack_identity(bits, count):
    g = torch.Generator().manual_seed(count * 10 + bits)
    codes = torch.randint(0, 2**bits, (count,), generator=g, dtype=torch.uint8)
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.ndim == 1
    assert packed.numel() == math.ceil(count * bits / 8) == packed_size(count, bits)
    assert torch.equal(unpack_bits(packed, bits, count), codes)


@pytest.mark.parametrize("bits", (1, 2, 4, 8))
def test_layout_first_code_in_least_significant_bits(bits):
    """Compare with an independent per-byte construction (pure Python) of the documented layout."""
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, (23,), generator=g, dtype=torch.uint8)
    per = 8 // bits
    values = codes.tolist() + [0] * ((-len(codes)) % per)
    expected = [sum(values[i + j] << (bits * j) for j in range(per)) for i in range(0, len(values), per)]
    assert pack_bits(codes, bits).tolist() == expected


def test_one_bit_layout_matches_numpy_little_bitorder():
    codes = np.random.default_rng(0).integers(0, 2, 29).astype(np.uint8)
    ours = pack_bits(torch.from_numpy(codes), 1).numpy()
    assert np.array_equal(ours, np.packbits(codes, bitorder="little"))


def test_multidimensional_codes_are_flattened_in_c_order():
    codes = torch.randint(0, 4, (3, 5), dtype=torch.uint8)
    assert torch.equal(pack_bits(codes, 2), pack_bits(codes.reshape(-1), 2))


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="< 4"):
        pack_bits(torch.tensor([0, 1, 4], dtype=torch.uint8), 2)
    with pytest.raises(TypeError, match="uint8"):
        pack_bits(torch.tensor([0, 1]), 1)
    with pytest.raises(ValueError, match="bits"):
        pack_bits(torch.zeros(4, dtype=torch.uint8), 3)
    with pytest.raises(ValueError, match="need 2 packed bytes"):
        unpack_bits(torch.zeros(3, dtype=torch.uint8), 1, 9)


@pytest.mark.parametrize("bits", (1, 2, 4))
@pytest.mark.parametrize("count", (1, 7, 9, 33, 1001))
def test_torch_and_numpy_backends_agree(bits, count):
    """The torch path (used off-CPU) and the numpy path (CPU) produce the same bytes and codes."""
    from sensitune.tuners import packing

    g = torch.Generator().manual_seed(count + bits)
    codes = torch.randint(0, 2**bits, (count,), generator=g, dtype=torch.uint8)
    per = 8 // bits
    padded = torch.cat([codes, codes.new_zeros((-count) % per)])
    via_torch = packing._pack_torch(padded, bits)
    assert torch.equal(via_torch, pack_bits(codes, bits))
    assert torch.equal(packing._unpack_torch(via_torch, bits, count), codes)
